//! Every SQL statement of the api lives here, one file per table family.
//!
//! Functions take `impl PgExecutor` (a pool, a connection or `&mut *tx`) when they run one
//! statement, and `&mut PgConnection` when they need several, so callers compose them into
//! one transaction — the completion of a job, for example, writes the job, its logs' end
//! and (later) its chained jobs and messages atomically.

pub mod actions;
pub mod audit;
pub mod concurrency;
pub mod events;
pub mod gauges;
pub mod logs;
pub mod queue;
pub mod retention;
pub mod schedules;
pub mod servers;
pub mod sessions;
pub mod stuck;
pub mod tokens;
pub mod variables;
pub mod webhooks;
pub mod workers;
pub mod workflows;

use uuid::Uuid;

/// What can go wrong in the storage layer, in domain terms. `crate::error` maps these to
/// HTTP statuses and gRPC codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("event {0} not found")]
    EventNotFound(Uuid),
    #[error("job {0} not found")]
    JobNotFound(Uuid),
    #[error("schedule {0} not found")]
    ScheduleNotFound(Uuid),
    #[error("token {0} not found")]
    TokenNotFound(Uuid),
    #[error("server {0} not found")]
    ServerNotFound(Uuid),
    #[error("a server named {0:?} already exists")]
    ServerNameTaken(String),
    #[error("server {0} is used by events; change or delete them first")]
    ServerInUse(Uuid),
    #[error("an event named {0:?} already exists")]
    EventNameTaken(String),
    /// The event was changed or deleted after the copy a job was to be made from was read.
    #[error("event {0} changed while the job was being queued; try again")]
    EventChanged(Uuid),
    #[error("event {0} has queued or running jobs; cancel them first")]
    EventBusy(Uuid),
    /// The caller's fencing token is not the job's current one, or the lease expired: another
    /// worker may own the job now, so nothing was written.
    #[error("lease lost for job {job_id}: the fencing token is stale or the lease expired")]
    LeaseLost { job_id: Uuid },
    /// A log batch does not continue the stored sequence: lines would be lost.
    #[error("log lines of job {job_id} must continue at {expected}, got {got}")]
    LogGap {
        job_id: Uuid,
        expected: i64,
        got: i64,
    },
    /// A completion arrived before all of the job's log lines were stored.
    #[error(
        "job {job_id} cannot complete: log lines up to {expected} were sent but only {stored} are stored"
    )]
    LogsIncomplete {
        job_id: Uuid,
        expected: i64,
        stored: i64,
    },
    #[error("webhook {0} not found")]
    WebhookNotFound(Uuid),
    /// A rerun was asked of a job that has not finished.
    #[error("job {job_id} has not finished (status {status}); only finished jobs can be rerun")]
    JobNotFinished { job_id: Uuid, status: String },
    #[error("job {job_id} already finished with status {status}")]
    JobFinished { job_id: Uuid, status: String },
    #[error("workflow {0} not found")]
    WorkflowNotFound(Uuid),
    #[error("a workflow named {0:?} already exists")]
    WorkflowNameTaken(String),
    #[error("workflow {0} has running runs; cancel them first")]
    WorkflowBusy(Uuid),
    #[error("workflow run {0} not found")]
    WorkflowRunNotFound(Uuid),
    /// Cancel of a run that already ended.
    #[error("workflow run {run_id} already ended with status {status}")]
    WorkflowRunFinished { run_id: Uuid, status: String },
    /// Retry of a run that is running or succeeded.
    #[error("workflow run {run_id} is {status}; only failed or cancelled runs can be retried")]
    WorkflowRunNotRetryable { run_id: Uuid, status: String },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// What a schedule (or a webhook) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Event(Uuid),
    Workflow(Uuid),
}

impl Target {
    pub fn event_id(self) -> Option<Uuid> {
        match self {
            Target::Event(id) => Some(id),
            Target::Workflow(_) => None,
        }
    }

    pub fn workflow_id(self) -> Option<Uuid> {
        match self {
            Target::Workflow(id) => Some(id),
            Target::Event(_) => None,
        }
    }

    /// The error for a target that does not exist.
    pub fn not_found(self) -> StorageError {
        match self {
            Target::Event(id) => StorageError::EventNotFound(id),
            Target::Workflow(id) => StorageError::WorkflowNotFound(id),
        }
    }
}

/// True when `err` is a unique-constraint violation on the named constraint.
pub(crate) fn is_unique_violation(err: &sqlx::Error, constraint: &str) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("23505") && db.constraint() == Some(constraint)
        }
        _ => false,
    }
}
