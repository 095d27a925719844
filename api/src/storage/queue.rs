//! The job queue: enqueue, batch claim under a lease, renew, complete, reap, cancel.
//!
//! Correctness rests on three rules:
//! - a claim is one `UPDATE … FROM (SELECT … FOR UPDATE SKIP LOCKED)` (inside the `claim_jobs`
//!   function, which pins the plan to the claim index's order): concurrent claimers skip each
//!   other's rows instead of waiting or double-claiming;
//! - every claim draws a new fencing token, 63 random bits (`random_lease_token()`, migration
//!   0011: not guessable); every later write by the worker names the token and is refused
//!   ([`StorageError::LeaseLost`]) if it is not current or the lease has expired (the api's
//!   worker session also accepts a job's reports only on the stream holding it);
//! - a row trigger sends `NOTIFY baton_job_queued` whenever a job becomes `queued`, in the
//!   same transaction, so dispatchers wake on commit and never poll for work — except for runs
//!   queued through the REST API, which their replica announces once per burst
//!   (`crate::announce`; a lost announcement is covered by the dispatchers' fallback poll).

use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, types::Json};
use std::time::Duration;
use uuid::Uuid;

use super::{Result, StorageError};
use crate::model::job::ErrorKind;
use crate::model::{Event, Job, JobError, JobStatus, JobSummary};

/// The channel the enqueue trigger notifies; the payload is the job's executor.
pub const QUEUED_CHANNEL: &str = "baton_job_queued";

/// Requeues after a lost lease allowed before the job is given up as dead.
pub const MAX_LEASE_LOSSES: i32 = 5;

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub event: &'a Event,
    pub input: Value,
    pub priority: i32,
    pub run_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<&'a str>,
    /// The job whose completion created this one (chains).
    pub parent: Option<ChainLink>,
    pub created_by: Option<Uuid>,
    /// The W3C `traceparent` the job's trace continues (see migration 0021).
    pub trace_context: Option<String>,
}

/// Where a chained job sits in its chain.
#[derive(Debug, Clone, Copy)]
pub struct ChainLink {
    pub parent_job_id: Uuid,
    pub root_job_id: Uuid,
    pub depth: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub job_id: Uuid,
    /// False when an idempotency key matched an existing job.
    pub created: bool,
}

/// Queues a job. With an idempotency key, a repeat for the same event returns the first job.
pub async fn enqueue(db: impl PgExecutor<'_>, job: &NewJob<'_>) -> Result<Enqueued> {
    insert_job(db, job, None).await
}

/// [`enqueue`], recording `entry` in the audit log when the job is new (its target is the new
/// job, whatever `entry` says), in the same statement: one round trip for `POST /events/{id}/run`.
///
/// The row trigger does not `NOTIFY` for this job: the caller announces it once the statement
/// committed (`crate::announce`), so a burst of runs costs one notification instead of one per
/// job. Use it only outside an explicit transaction (the quiet setting lasts until commit).
/// The job is inserted only while the event is still at `job.event`'s revision (the caller's
/// copy may be cached): [`StorageError::EventChanged`] otherwise.
pub async fn enqueue_audited(
    db: impl PgExecutor<'_>,
    job: &NewJob<'_>,
    entry: &super::audit::AuditEntry<'_>,
) -> Result<Enqueued> {
    insert_job(db, job, Some(entry)).await
}

async fn insert_job(
    db: impl PgExecutor<'_>,
    job: &NewJob<'_>,
    audit: Option<&super::audit::AuditEntry<'_>>,
) -> Result<Enqueued> {
    let id = Uuid::now_v7();
    let (parent, root, depth) = match job.parent {
        Some(link) => (Some(link.parent_job_id), link.root_job_id, link.depth),
        None => (None, id, 0),
    };
    let spec = serde_json::to_value(job.event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let group = concurrency_group(job);
    // The no-op DO UPDATE makes a conflicting insert wait for and return the existing row
    // (DO NOTHING would return nothing under a race); `xmax = 0` tells a fresh insert apart.
    // The audit row ($15…) is written only for a fresh insert, and only when an action is given.
    // With an audit entry (the REST path, whose copy of the event may come from a cache) the
    // job is inserted only while the event is at the revision `spec` was taken from ($19), and
    // the caller announces the job itself: `quiet` sets `baton.announced` for this transaction before the row is
    // inserted, and the `jobs_notify_queued` trigger skips such rows (migration 0010).
    let row: Option<(Uuid, bool)> = sqlx::query_as(
        "WITH quiet AS (
             SELECT CASE WHEN $16 IS NOT NULL THEN set_config('baton.announced', 'on', true) END
         ), job AS (
             INSERT INTO jobs (id, event_id, status, priority, run_at, max_attempts, idempotency_key,
                               executor, labels, spec, input, parent_job_id, root_job_id, depth, created_by,
                               concurrency_key, concurrency_max, trace_context)
             SELECT $1, e.id, 'queued', $3, coalesce($4, now()), $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                    $20, $21,
                    -- A chained job without a trace of its own continues its parent's.
                    coalesce($22, (SELECT p.trace_context FROM jobs p WHERE p.id = $11))
             FROM events e CROSS JOIN quiet
             WHERE e.id = $2 AND ($19::bigint IS NULL OR e.revision = $19)
             ON CONFLICT (event_id, idempotency_key) DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
             RETURNING id, (xmax = 0) AS created
         ), audited AS (
             INSERT INTO audit_log (token_id, actor, action, target_type, target_id, detail)
             SELECT $18, $15, $16, 'job', job.id::text, $17 FROM job WHERE job.created AND $16 IS NOT NULL
         )
         SELECT id, created FROM job",
    )
    .bind(id)
    .bind(job.event.id)
    .bind(job.priority)
    .bind(job.run_at)
    .bind(job.event.spec.max_attempts)
    .bind(job.idempotency_key)
    .bind(job.event.spec.executor.resolved().as_str())
    .bind(Json(&job.event.spec.labels))
    .bind(spec)
    .bind(Json(&job.input))
    .bind(parent)
    .bind(root)
    .bind(depth)
    .bind(job.created_by)
    .bind(audit.map(|a| a.actor))
    .bind(audit.map(|a| a.action))
    .bind(audit.map(|a| Json(&a.detail)))
    .bind(audit.and_then(|a| a.token_id))
    .bind(audit.map(|_| job.event.revision))
    .bind(group.as_ref().map(|g| g.0.as_str()))
    .bind(group.as_ref().map(|g| g.1))
    .bind(job.trace_context.as_deref())
    .fetch_optional(db)
    .await
    .map_err(|e| match e {
        // The event was deleted since it was read.
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
            StorageError::EventNotFound(job.event.id)
        }
        other => other.into(),
    })?;
    let row = row.ok_or(if audit.is_some() {
        StorageError::EventChanged(job.event.id)
    } else {
        // Without a revision to match, only a deleted event inserts nothing.
        StorageError::EventNotFound(job.event.id)
    })?;
    Ok(Enqueued {
        job_id: row.0,
        created: row.1,
    })
}

/// The run's concurrency group (key, max) when its event has a policy.
fn concurrency_group(job: &NewJob<'_>) -> Option<(String, i32)> {
    let policy = job.event.spec.concurrency.as_ref()?;
    Some((
        crate::policy::concurrency::group_key(policy, &job.input),
        policy.max,
    ))
}

/// Queues the run a schedule fires for its nominal time `scheduled_for`, unless that slot
/// already has a job: `(schedule_id, scheduled_for)` is unique, so a second fire of the same
/// slot (another replica, a retried transaction, an edit) inserts nothing and returns None.
/// The row trigger notifies the dispatchers on commit.
pub async fn enqueue_scheduled(
    db: impl PgExecutor<'_>,
    job: &NewJob<'_>,
    schedule_id: Uuid,
    scheduled_for: DateTime<Utc>,
) -> Result<Option<Uuid>> {
    let id = Uuid::now_v7();
    let spec = serde_json::to_value(job.event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let group = concurrency_group(job);
    let row: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO jobs (id, event_id, status, priority, run_at, max_attempts, executor, labels, spec,
                           input, root_job_id, depth, created_by, schedule_id, scheduled_for,
                           concurrency_key, concurrency_max, trace_context)
         VALUES ($1, $2, 'queued', $3, coalesce($4, now()), $5, $6, $7, $8, $9, $1, 0, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (schedule_id, scheduled_for) DO NOTHING
         RETURNING id",
    )
    .bind(id)
    .bind(job.event.id)
    .bind(job.priority)
    .bind(job.run_at)
    .bind(job.event.spec.max_attempts)
    .bind(job.event.spec.executor.resolved().as_str())
    .bind(Json(&job.event.spec.labels))
    .bind(spec)
    .bind(Json(&job.input))
    .bind(job.created_by)
    .bind(schedule_id)
    .bind(scheduled_for)
    .bind(group.as_ref().map(|g| g.0.as_str()))
    .bind(group.as_ref().map(|g| g.1))
    .bind(job.trace_context.as_deref())
    .fetch_optional(db)
    .await?;
    Ok(row)
}

/// What a worker offers when it asks for work.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    pub worker_id: Uuid,
    pub executors: &'a [String],
    pub labels: &'a serde_json::Map<String, Value>,
    pub limit: i64,
    pub lease: Duration,
}

/// A job handed to a worker: everything it needs to run it, and the lease to report under.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedJob {
    pub id: Uuid,
    pub event_id: Uuid,
    pub attempt: i32,
    pub priority: i32,
    pub run_at: DateTime<Utc>,
    pub lease_token: i64,
    pub lease_expires_at: DateTime<Utc>,
    pub spec: Json<Value>,
    pub input: Json<Value>,
    pub parent_job_id: Option<Uuid>,
    pub root_job_id: Uuid,
    /// The last log line stored for the job (by earlier attempts): this run's lines follow.
    pub last_log_seq: i64,
    /// The job's W3C `traceparent`, set when it was queued.
    pub trace_context: Option<String>,
}

/// Claims up to `limit` due jobs that the worker can run, highest priority first, each under
/// a fresh lease. Concurrent claimers never get the same job.
pub async fn claim_batch(
    db: impl PgExecutor<'_>,
    req: &ClaimRequest<'_>,
) -> Result<Vec<ClaimedJob>> {
    // The statement lives in a function (migration 0006) that pins its plan to the claim
    // index's order.
    let mut jobs: Vec<ClaimedJob> = sqlx::query_as(
        "SELECT id, event_id, attempt, priority, run_at, lease_token, lease_expires_at, spec, input,
                parent_job_id, root_job_id, last_log_seq, trace_context
         FROM claim_jobs($1, $2, $3, $4, $5)",
    )
    .bind(req.worker_id)
    .bind(req.executors)
    .bind(Json(req.labels))
    .bind(req.limit)
    .bind(millis(req.lease))
    .fetch_all(db)
    .await?;
    // RETURNING does not keep the CTE's order.
    jobs.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.run_at.cmp(&b.run_at))
            .then(a.id.cmp(&b.id))
    });
    Ok(jobs)
}

/// When the next queued job that is not yet due becomes due, so a dispatcher can sleep
/// exactly until then instead of polling.
pub async fn next_due_at(db: impl PgExecutor<'_>) -> Result<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "SELECT min(run_at) FROM jobs WHERE status = 'queued' AND run_at > now()",
    )
    .fetch_one(db)
    .await?)
}

/// Marks a claimed job as running (the worker started the process).
pub async fn mark_running(db: impl PgExecutor<'_>, job_id: Uuid, token: i64) -> Result<()> {
    let done = sqlx::query(
        "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, now()), heartbeat_at = now(),
             active_at = now(), stuck = false
         WHERE id = $1 AND lease_token = $2 AND lease_expires_at > now()
           AND status IN ('claimed', 'running')",
    )
    .bind(job_id)
    .bind(token)
    .execute(db)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StorageError::LeaseLost { job_id });
    }
    Ok(())
}

/// A lease a worker still holds after renewing, and whether someone asked to cancel its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct HeldLease {
    pub id: Uuid,
    pub cancel_requested: bool,
    /// The cancel asks to kill the run at once (`POST /jobs/{id}/cancel?force=true`).
    pub cancel_force: bool,
}

/// Extends the leases a worker holds. Jobs missing from the answer are lost: the worker must
/// stop running them.
pub async fn renew_leases(
    db: impl PgExecutor<'_>,
    worker_id: Uuid,
    leases: &[(Uuid, i64)],
    lease: Duration,
) -> Result<Vec<HeldLease>> {
    let (ids, tokens): (Vec<Uuid>, Vec<i64>) = leases.iter().copied().unzip();
    Ok(sqlx::query_as(
        "UPDATE jobs j SET lease_expires_at = now() + $4 * interval '1 millisecond', heartbeat_at = now()
         FROM unnest($2::uuid[], $3::bigint[]) AS held(id, token)
         WHERE j.id = held.id AND j.lease_token = held.token AND j.worker_id = $1
           AND j.lease_expires_at > now()
         RETURNING j.id, j.cancel_requested, j.cancel_force",
    )
    .bind(worker_id)
    .bind(ids)
    .bind(tokens)
    .bind(millis(lease))
    .fetch_all(db)
    .await?)
}

/// How a run ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    /// `None` means success.
    pub error: Option<JobError>,
    /// Whether another attempt could help (false for e.g. an auth failure).
    pub retryable: bool,
    pub output: Option<Value>,
    pub condition: Option<bool>,
    /// The last log line the worker sent; the completion waits until it is stored.
    pub last_log_seq: Option<i64>,
}

impl Outcome {
    pub fn success() -> Self {
        Self {
            exit_code: Some(0),
            exit_signal: None,
            error: None,
            retryable: false,
            output: None,
            condition: None,
            last_log_seq: None,
        }
    }

    pub fn failure(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            exit_code: None,
            exit_signal: None,
            error: Some(JobError::new(kind, message)),
            retryable: matches!(
                kind,
                ErrorKind::Script | ErrorKind::Infrastructure | ErrorKind::Timeout
            ),
            output: None,
            condition: None,
            last_log_seq: None,
        }
    }
}

/// What completing a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Finished {
        status: JobStatus,
        dead: bool,
        /// Whether the job's event has actions, so the completion may set something in motion
        /// (see `crate::actions::after_finish`); most completions need no more queries.
        has_actions: bool,
    },
    /// Another attempt was queued for `run_at`.
    Retrying { attempt: i32, run_at: DateTime<Utc> },
}

#[derive(Debug, sqlx::FromRow)]
struct LeasedState {
    attempt: i32,
    max_attempts: i32,
    lease_losses: i32,
    cancel_requested: bool,
    last_log_seq: i64,
    backoff_seconds: Option<i32>,
    backoff_max_seconds: Option<i32>,
    retry_on: Option<String>,
}

/// Records how a run ended — or queues its next attempt — if `token` still holds the lease.
/// Runs inside the caller's transaction so the actions a completion triggers commit with it.
pub async fn complete(
    conn: &mut PgConnection,
    job_id: Uuid,
    token: i64,
    outcome: &Outcome,
) -> Result<Completion> {
    if outcome.error.is_none()
        && let Some(done) = complete_success(&mut *conn, job_id, token, outcome).await?
    {
        return Ok(done);
    }
    let state: Option<LeasedState> = sqlx::query_as(
        "SELECT attempt, max_attempts, lease_losses, cancel_requested, last_log_seq,
                (spec->>'retry_backoff_seconds')::int AS backoff_seconds,
                (spec->>'retry_backoff_max_seconds')::int AS backoff_max_seconds,
                spec->>'retry_on' AS retry_on
         FROM jobs
         WHERE id = $1 AND lease_token = $2 AND lease_expires_at > now() AND status IN ('claimed', 'running')
         FOR UPDATE",
    )
    .bind(job_id)
    .bind(token)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(state) = state else {
        return Err(lease_lost_or_missing(conn, job_id).await);
    };

    if let Some(expected) = outcome.last_log_seq
        && expected > state.last_log_seq
    {
        return Err(StorageError::LogsIncomplete {
            job_id,
            expected,
            stored: state.last_log_seq,
        });
    }
    let error = outcome.error.as_ref();
    let own_attempts = state.attempt - state.lease_losses;
    // An event may retry only failures that were not its script's own.
    let script_fault = matches!(
        error.map(|e| e.kind),
        Some(ErrorKind::Script | ErrorKind::Timeout)
    );
    let opted_out = script_fault && state.retry_on.as_deref() == Some("infrastructure");
    if let Some(err) = error
        && outcome.retryable
        && !opted_out
        && !state.cancel_requested
        && own_attempts < state.max_attempts
    {
        let delay = retry_delay(
            own_attempts,
            state.backoff_seconds.unwrap_or(10),
            state.backoff_max_seconds.unwrap_or(3600),
        );
        let run_at: DateTime<Utc> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'queued', attempt = attempt + 1,
                 run_at = now() + $2 * interval '1 millisecond',
                 lease_token = NULL, lease_expires_at = NULL, worker_id = NULL, completed_token = $7,
                 exit_code = $3, exit_signal = $4, error_kind = $5, error_message = $6, progress = NULL,
                 start_failure = $8, stuck = false
             WHERE id = $1 RETURNING run_at",
        )
        .bind(job_id)
        .bind(millis(delay))
        .bind(outcome.exit_code)
        .bind(outcome.exit_signal)
        .bind(err.kind.as_str())
        .bind(&err.message)
        .bind(token)
        .bind(err.start_failure)
        .fetch_one(&mut *conn)
        .await?;
        return Ok(Completion::Retrying {
            attempt: state.attempt + 1,
            run_at,
        });
    }

    let status = match error.map(|e| e.kind) {
        None => JobStatus::Succeeded,
        Some(ErrorKind::Timeout) => JobStatus::TimedOut,
        Some(ErrorKind::Cancelled) => JobStatus::Cancelled,
        Some(_) => JobStatus::Failed,
    };
    let dead = matches!(status, JobStatus::Failed | JobStatus::TimedOut);
    let has_actions: bool = sqlx::query_scalar(
        "UPDATE jobs SET status = $2, dead = $3, finished_at = now(),
             started_at = coalesce(started_at, now()),
             lease_token = NULL, lease_expires_at = NULL, completed_token = $10,
             exit_code = $4, exit_signal = $5, error_kind = $6, error_message = $7,
             output = $8, condition = $9, start_failure = $11,
             progress = CASE WHEN $2 = 'succeeded' THEN 100 ELSE progress END
         WHERE id = $1
         RETURNING EXISTS (SELECT 1 FROM event_actions a WHERE a.event_id = jobs.event_id)
                   OR jobs.workflow_run_id IS NOT NULL",
    )
    .bind(job_id)
    .bind(status.as_str())
    .bind(dead)
    .bind(outcome.exit_code)
    .bind(outcome.exit_signal)
    .bind(error.map(|e| e.kind.as_str()))
    .bind(error.map(|e| e.message.as_str()))
    .bind(outcome.output.as_ref().map(Json))
    .bind(outcome.condition)
    .bind(token)
    .bind(error.is_some_and(|e| e.start_failure))
    .fetch_one(&mut *conn)
    .await?;
    Ok(Completion::Finished {
        status,
        dead,
        has_actions,
    })
}

/// The common case in one statement: a success under a live lease with every line stored.
/// `None` when any of that does not hold; [`complete`] then finds out what to do or report.
async fn complete_success(
    conn: &mut PgConnection,
    job_id: Uuid,
    token: i64,
    outcome: &Outcome,
) -> Result<Option<Completion>> {
    let done = succeed(conn, &[(job_id, token, outcome)], true).await?;
    Ok(done.first().map(|&(_, has_actions)| Completion::Finished {
        status: JobStatus::Succeeded,
        dead: false,
        has_actions,
    }))
}

/// Completes many successful runs in one statement: the common case of a busy worker, whose
/// waiting completions arrive together. Only jobs whose event has no actions are completed here
/// (an action must be evaluated in the completion's transaction); the ids completed are
/// returned, and the caller completes the others one by one with [`complete`], which also
/// explains a refusal.
pub async fn complete_successes(
    db: impl PgExecutor<'_>,
    runs: &[(Uuid, i64, &Outcome)],
) -> Result<Vec<Uuid>> {
    let done = succeed(db, runs, false).await?;
    Ok(done.into_iter().map(|(id, _)| id).collect())
}

/// Records `runs` as succeeded, each only under its live lease with every line stored (and,
/// unless `with_actions`, only if its event has no actions). Returns the jobs completed, each
/// with whether its event has actions.
async fn succeed(
    db: impl PgExecutor<'_>,
    runs: &[(Uuid, i64, &Outcome)],
    with_actions: bool,
) -> Result<Vec<(Uuid, bool)>> {
    let mut ids = Vec::with_capacity(runs.len());
    let mut tokens = Vec::with_capacity(runs.len());
    let mut exit_codes = Vec::with_capacity(runs.len());
    let mut exit_signals = Vec::with_capacity(runs.len());
    let mut outputs = Vec::with_capacity(runs.len());
    let mut conditions = Vec::with_capacity(runs.len());
    let mut last_seqs = Vec::with_capacity(runs.len());
    for (id, token, outcome) in runs {
        debug_assert!(outcome.error.is_none(), "only successes complete here");
        ids.push(*id);
        tokens.push(*token);
        exit_codes.push(outcome.exit_code);
        exit_signals.push(outcome.exit_signal);
        outputs.push(outcome.output.as_ref().map(Json));
        conditions.push(outcome.condition);
        last_seqs.push(outcome.last_log_seq.unwrap_or(0));
    }
    Ok(sqlx::query_as(
        "UPDATE jobs SET status = 'succeeded', dead = false, finished_at = now(),
             started_at = coalesce(started_at, now()),
             lease_token = NULL, lease_expires_at = NULL, completed_token = r.token,
             exit_code = r.exit_code, exit_signal = r.exit_signal, error_kind = NULL,
             error_message = NULL, output = r.output, condition = r.condition, progress = 100,
             start_failure = false
         FROM unnest($1::uuid[], $2::bigint[], $3::int[], $4::int[], $5::jsonb[], $6::bool[],
                     $7::bigint[]) AS r(id, token, exit_code, exit_signal, output, condition, last_seq)
         WHERE jobs.id = r.id AND jobs.lease_token = r.token AND jobs.lease_expires_at > now()
           AND jobs.status IN ('claimed', 'running') AND jobs.last_log_seq >= r.last_seq
           AND ($8 OR (NOT EXISTS (SELECT 1 FROM event_actions a WHERE a.event_id = jobs.event_id)
                       AND jobs.workflow_run_id IS NULL))
         RETURNING jobs.id,
                   $8 AND (EXISTS (SELECT 1 FROM event_actions a WHERE a.event_id = jobs.event_id)
                           OR jobs.workflow_run_id IS NOT NULL)",
    )
    .bind(ids)
    .bind(tokens)
    .bind(exit_codes)
    .bind(exit_signals)
    .bind(outputs)
    .bind(conditions)
    .bind(last_seqs)
    .bind(with_actions)
    .fetch_all(db)
    .await?)
}

/// Exponential backoff with "equal jitter": half the capped delay, plus a random part of the
/// other half, so retries of many jobs failing together spread out.
pub fn retry_delay(attempts_done: i32, base_seconds: i32, max_seconds: i32) -> Duration {
    let exp = attempts_done.saturating_sub(1).clamp(0, 30) as u32;
    let capped_ms = (i64::from(base_seconds.max(0)) * 1000)
        .saturating_mul(1_i64 << exp)
        .min(i64::from(max_seconds.max(0)) * 1000)
        .max(0) as u64;
    let half = capped_ms / 2;
    let jitter = if half > 0 {
        rand::rng().random_range(0..=half)
    } else {
        0
    };
    Duration::from_millis(capped_ms - half + jitter)
}

/// Why a fenced write found nothing: the job exists (the lease is lost) or it does not.
pub(crate) async fn lease_lost_or_missing(conn: &mut PgConnection, job_id: Uuid) -> StorageError {
    match sqlx::query_scalar::<_, bool>("SELECT true FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(conn)
        .await
    {
        Ok(Some(_)) => StorageError::LeaseLost { job_id },
        Ok(None) => StorageError::JobNotFound(job_id),
        Err(e) => e.into(),
    }
}

/// Puts a claimed job that could not be handed to its worker back in the queue, as if it had
/// never been claimed (no attempt used).
pub async fn release(db: impl PgExecutor<'_>, job_id: Uuid, token: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET status = 'queued', lease_token = NULL, lease_expires_at = NULL, worker_id = NULL,
             claimed_at = NULL
         WHERE id = $1 AND lease_token = $2 AND status = 'claimed'",
    )
    .bind(job_id)
    .bind(token)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a job's progress (0-100) if `token` holds its lease.
pub async fn set_progress(
    db: impl PgExecutor<'_>,
    job_id: Uuid,
    token: i64,
    percent: i16,
) -> Result<()> {
    let done = sqlx::query(
        "UPDATE jobs SET progress = $3, heartbeat_at = now(), active_at = now(), stuck = false
         WHERE id = $1 AND lease_token = $2 AND lease_expires_at > now()",
    )
    .bind(job_id)
    .bind(token)
    .bind(percent.clamp(0, 100))
    .execute(db)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StorageError::LeaseLost { job_id });
    }
    Ok(())
}

/// The server an ssh job runs on (`None` for other jobs), if `token` holds its lease.
pub async fn server_of_leased_job(
    db: impl PgExecutor<'_>,
    job_id: Uuid,
    token: i64,
) -> Result<Option<Uuid>> {
    let row: Option<(Option<String>,)> = sqlx::query_as(
        "SELECT spec->>'server_id' FROM jobs
         WHERE id = $1 AND lease_token = $2 AND lease_expires_at > now()",
    )
    .bind(job_id)
    .bind(token)
    .fetch_optional(db)
    .await?;
    let (server_id,) = row.ok_or(StorageError::LeaseLost { job_id })?;
    Ok(server_id.and_then(|s| Uuid::parse_str(&s).ok()))
}

/// Where a job a reconnecting worker says it holds stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeState {
    /// The worker still holds the lease (renewed now).
    pub held: bool,
    /// The completion under this token was recorded (the acknowledgement was lost).
    pub finished: bool,
    pub stored_seq: i64,
}

/// For a worker reconnecting with a job it was running: renews the lease if still held.
pub async fn resume(
    db: impl PgExecutor<'_>,
    worker_id: Uuid,
    job_id: Uuid,
    token: i64,
    lease: Duration,
) -> Result<ResumeState> {
    let row: Option<(bool, bool, i64)> = sqlx::query_as(
        "UPDATE jobs SET
             lease_expires_at = CASE WHEN lease_token = $3 AND worker_id = $2 AND lease_expires_at > now()
                                     THEN now() + $4 * interval '1 millisecond' ELSE lease_expires_at END
         WHERE id = $1
         RETURNING lease_token IS NOT DISTINCT FROM $3 AND worker_id = $2 AND lease_expires_at > now(),
                   completed_token IS NOT DISTINCT FROM $3,
                   last_log_seq",
    )
    .bind(job_id)
    .bind(worker_id)
    .bind(token)
    .bind(millis(lease))
    .fetch_optional(db)
    .await?;
    let (held, finished, stored_seq) = row.ok_or(StorageError::JobNotFound(job_id))?;
    Ok(ResumeState {
        held,
        finished,
        stored_seq,
    })
}

/// A job the reaper took back from a worker whose lease expired.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReapedJob {
    pub id: Uuid,
    #[sqlx(try_from = "String")]
    pub status: JobStatus,
    pub attempt: i32,
}

/// Returns jobs whose lease expired to the queue (attempt + 1). Jobs that end instead (a
/// cancel was pending, or too many leases were lost) are left to [`finish_expired`], one per
/// transaction with their actions. Safe to run on every replica at once: rows are locked with
/// SKIP LOCKED and the lease condition is rechecked by the UPDATE. The leased jobs are found
/// through `jobs_status_idx` (there are at most as many as worker slots; migration 0009 says
/// why there is no index on the lease's expiry).
pub async fn reap_expired(db: impl PgExecutor<'_>) -> Result<Vec<ReapedJob>> {
    Ok(sqlx::query_as(
        "WITH expired AS (
             SELECT id FROM jobs
             WHERE status IN ('claimed', 'running') AND lease_token IS NOT NULL
               AND lease_expires_at < now()
               AND NOT cancel_requested AND lease_losses + 1 <= $1
             ORDER BY lease_expires_at
             LIMIT 1000
             FOR UPDATE SKIP LOCKED
         )
         UPDATE jobs j SET
             status = 'queued',
             attempt = j.attempt + 1,
             lease_losses = j.lease_losses + 1,
             run_at = now(),
             worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
             error_kind = 'lease_lost',
             error_message = 'the worker running it stopped renewing its lease; requeued'
         FROM expired e WHERE j.id = e.id
         RETURNING j.id, j.status, j.attempt",
    )
    .bind(MAX_LEASE_LOSSES)
    .fetch_all(db)
    .await?)
}

/// Ends one job whose lease expired and that does not go back to the queue: `cancelled` when
/// a cancel was pending, `failed` (dead) when it lost its lease once more after
/// [`MAX_LEASE_LOSSES`] requeues. Returns it, or
/// `None` when there is no such job. Meant for a transaction that then evaluates the job's
/// actions (`crate::actions::after_terminal`), so both commit together.
pub async fn finish_expired(db: impl PgExecutor<'_>) -> Result<Option<ReapedJob>> {
    Ok(sqlx::query_as(
        "WITH expired AS (
             SELECT id, cancel_requested FROM jobs
             WHERE status IN ('claimed', 'running') AND lease_token IS NOT NULL
               AND lease_expires_at < now()
               AND (cancel_requested OR lease_losses + 1 > $1)
             ORDER BY lease_expires_at
             LIMIT 1
             FOR UPDATE SKIP LOCKED
         )
         UPDATE jobs j SET
             status = CASE WHEN e.cancel_requested THEN 'cancelled' ELSE 'failed' END,
             lease_losses = j.lease_losses + 1,
             dead = NOT e.cancel_requested,
             run_at = now(),
             finished_at = now(),
             lease_token = NULL, lease_expires_at = NULL,
             error_kind = CASE WHEN e.cancel_requested THEN 'cancelled' ELSE 'lease_lost' END,
             error_message = CASE
                 WHEN e.cancel_requested THEN 'cancelled; the worker running it stopped responding'
                 ELSE 'the worker running it stopped renewing its lease ' || (j.lease_losses + 1)
                      || ' times; giving up' END
         FROM expired e WHERE j.id = e.id
         RETURNING j.id, j.status, j.attempt",
    )
    .bind(MAX_LEASE_LOSSES)
    .fetch_optional(db)
    .await?)
}

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was queued and is now cancelled.
    Cancelled,
    /// A worker holds it; it was asked to stop (see [`CANCEL_CHANNEL`]).
    Requested { worker_id: Option<Uuid> },
}

/// The channel that tells the replica holding a worker's stream to pass a cancel on.
pub const CANCEL_CHANNEL: &str = "baton_job_cancel";

/// Cancels a queued job at once, or flags a claimed/running one and notifies its worker.
///
/// With `force` the worker is told to kill the run at once, without the SIGTERM grace (the
/// request is kept in `cancel_force`, so a heartbeat repeats it; the notification's payload
/// is `job_id:force`).
pub async fn request_cancel(
    conn: &mut PgConnection,
    job_id: Uuid,
    force: bool,
) -> Result<CancelOutcome> {
    let row: Option<(String, Option<Uuid>)> = sqlx::query_as(
        "UPDATE jobs SET
             cancel_requested = true,
             cancel_force = cancel_force OR $2,
             status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
             finished_at = CASE WHEN status = 'queued' THEN now() END,
             error_kind = CASE WHEN status = 'queued' THEN 'cancelled' ELSE error_kind END,
             error_message = CASE WHEN status = 'queued' THEN 'cancelled before it started' ELSE error_message END
         WHERE id = $1 AND status IN ('queued', 'claimed', 'running')
         RETURNING status, worker_id",
    )
    .bind(job_id)
    .bind(force)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some((status, _)) if status == "cancelled" => Ok(CancelOutcome::Cancelled),
        Some((_, worker_id)) => {
            let payload = if force {
                format!("{job_id}:force")
            } else {
                job_id.to_string()
            };
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CANCEL_CHANNEL)
                .bind(payload)
                .execute(&mut *conn)
                .await?;
            Ok(CancelOutcome::Requested { worker_id })
        }
        None => {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
                    .bind(job_id)
                    .fetch_optional(&mut *conn)
                    .await?;
            Err(match status {
                Some(status) => StorageError::JobFinished { job_id, status },
                None => StorageError::JobNotFound(job_id),
            })
        }
    }
}

/// Queues a new run of a finished job (any terminal status, dead ones included: dead-letter
/// replay): the same event snapshot (`spec`), input, priority, attempts and routing, with
/// `rerun_of` set. It starts a chain of its own. The row trigger notifies dispatchers.
/// [`StorageError::JobNotFinished`] for a job still queued or running.
pub async fn rerun(
    conn: &mut PgConnection,
    job_id: Uuid,
    created_by: Option<Uuid>,
    trace_context: Option<&str>,
) -> Result<Uuid> {
    let id = Uuid::now_v7();
    let created: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO jobs (id, event_id, status, priority, run_at, max_attempts, executor, labels,
                           spec, input, root_job_id, depth, created_by, rerun_of, concurrency_key,
                           concurrency_max, trace_context)
         SELECT $1, j.event_id, 'queued', j.priority, now(), j.max_attempts, j.executor, j.labels,
                j.spec, j.input, $1, 0, $2, j.id, j.concurrency_key, j.concurrency_max, $4
         FROM jobs j
         WHERE j.id = $3 AND j.status IN ('succeeded', 'failed', 'timed_out', 'cancelled')
         RETURNING id",
    )
    .bind(id)
    .bind(created_by)
    .bind(job_id)
    .bind(trace_context)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = created {
        return Ok(id);
    }
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(&mut *conn)
        .await?;
    Err(match status {
        Some(status) => StorageError::JobNotFinished { job_id, status },
        None => StorageError::JobNotFound(job_id),
    })
}

/// The columns behind [`Job`], joined with the event's name.
const JOB_COLUMNS: &str = "j.id, j.event_id, coalesce(j.spec->>'name', '') AS event_name, j.status, j.attempt,
    j.max_attempts, j.dead, j.priority, j.run_at, j.exit_code, j.exit_signal, j.error_kind, j.error_message,
    j.input, j.output, j.condition, j.progress, j.cancel_requested, j.parent_job_id, j.root_job_id, j.depth,
    j.idempotency_key, j.worker_id, j.created_at, j.claimed_at, j.started_at, j.finished_at, j.action_notes,
    j.log_lines_dropped, j.rerun_of, j.schedule_id, j.scheduled_for, j.concurrency_key, j.stuck, j.start_failure,
    j.workflow_run_id, j.step_id, j.step_item";

#[derive(Debug, sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    event_id: Uuid,
    event_name: String,
    #[sqlx(try_from = "String")]
    status: JobStatus,
    attempt: i32,
    max_attempts: i32,
    dead: bool,
    priority: i32,
    run_at: DateTime<Utc>,
    exit_code: Option<i32>,
    exit_signal: Option<i32>,
    error_kind: Option<String>,
    error_message: Option<String>,
    input: Json<Value>,
    output: Option<Json<Value>>,
    condition: Option<bool>,
    progress: Option<i16>,
    cancel_requested: bool,
    parent_job_id: Option<Uuid>,
    root_job_id: Uuid,
    depth: i32,
    idempotency_key: Option<String>,
    worker_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    claimed_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    action_notes: Vec<String>,
    log_lines_dropped: i64,
    rerun_of: Option<Uuid>,
    schedule_id: Option<Uuid>,
    scheduled_for: Option<DateTime<Utc>>,
    concurrency_key: Option<String>,
    stuck: bool,
    start_failure: bool,
    workflow_run_id: Option<Uuid>,
    step_id: Option<String>,
    step_item: Option<i32>,
}

impl From<JobRow> for Job {
    fn from(r: JobRow) -> Self {
        let error = match (
            r.error_kind.as_deref().map(str::parse::<ErrorKind>),
            r.error_message,
        ) {
            (Some(Ok(kind)), Some(message)) => Some(JobError {
                kind,
                message,
                start_failure: r.start_failure,
            }),
            _ => None,
        };
        Job {
            id: r.id,
            event_id: r.event_id,
            event_name: r.event_name,
            status: r.status,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            dead: r.dead,
            priority: r.priority,
            run_at: r.run_at,
            exit_code: r.exit_code,
            exit_signal: r.exit_signal,
            error,
            input: r.input.0,
            output: r.output.map(|o| o.0),
            condition: r.condition,
            progress: r.progress,
            cancel_requested: r.cancel_requested,
            parent_job_id: r.parent_job_id,
            root_job_id: r.root_job_id,
            depth: r.depth,
            idempotency_key: r.idempotency_key,
            worker_id: r.worker_id,
            created_at: r.created_at,
            claimed_at: r.claimed_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            action_notes: r.action_notes,
            log_lines_dropped: r.log_lines_dropped,
            rerun_of: r.rerun_of,
            schedule_id: r.schedule_id,
            scheduled_for: r.scheduled_for,
            concurrency_key: r.concurrency_key,
            stuck: r.stuck,
            workflow_run_id: r.workflow_run_id,
            step_id: r.step_id,
            step_item: r.step_item,
        }
    }
}

pub async fn get_job(db: impl PgExecutor<'_>, job_id: Uuid) -> Result<Job> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1");
    let row: Option<JobRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(job_id)
        .fetch_optional(db)
        .await?;
    row.map(Job::from).ok_or(StorageError::JobNotFound(job_id))
}

/// Filters of `GET /api/v1/jobs` and the dashboard's runs; results are newest first, `before`
/// is the cursor. Only the filters given appear in the statement, so each combination is
/// planned for the index that serves it (status, event, root, worker, schedule, dead).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub event_id: Option<Uuid>,
    pub root_job_id: Option<Uuid>,
    pub dead: Option<bool>,
    pub schedule_id: Option<Uuid>,
    pub worker_id: Option<Uuid>,
    /// Flagged stuck (true: see the event's `stuck_after_seconds`), or not.
    pub stuck: Option<bool>,
    /// Only claimed and running jobs.
    pub active: bool,
    pub workflow_run_id: Option<Uuid>,
    pub before: Option<Uuid>,
    pub limit: i64,
}

/// A page of jobs, newest first, without their input and output bodies (never read: a page of
/// 500 jobs with 4 MiB inputs each would be 2 GiB).
pub async fn list_jobs(db: impl PgExecutor<'_>, filter: &JobFilter) -> Result<Vec<JobSummary>> {
    let columns = JOB_COLUMNS.replace(
        "j.input, j.output,",
        "'null'::jsonb AS input, NULL::jsonb AS output,",
    );
    let mut conditions: Vec<String> = Vec::new();
    let mut n = 0;
    let mut next = |condition: &str| {
        n += 1;
        conditions.push(condition.replace('?', &format!("${n}")));
    };
    if filter.status.is_some() {
        next("j.status = ?");
    }
    if filter.event_id.is_some() {
        next("j.event_id = ?");
    }
    if filter.root_job_id.is_some() {
        next("j.root_job_id = ?");
    }
    if filter.dead.is_some() {
        next("j.dead = ?");
    }
    if filter.schedule_id.is_some() {
        next("j.schedule_id = ?");
    }
    if filter.worker_id.is_some() {
        next("j.worker_id = ?");
    }
    if filter.workflow_run_id.is_some() {
        next("j.workflow_run_id = ?");
    }
    if filter.before.is_some() {
        next("j.id < ?");
    }
    if filter.stuck.is_some() {
        next("j.stuck = ?");
    }
    if filter.active {
        conditions.push("j.status IN ('claimed', 'running')".into());
    }
    let limit_param = n + 1;
    let where_clause = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT {columns} FROM jobs j {where_clause} ORDER BY j.id DESC LIMIT ${limit_param}"
    );
    let mut query = sqlx::query_as::<_, JobRow>(sqlx::AssertSqlSafe(sql));
    if let Some(status) = filter.status {
        query = query.bind(status.as_str());
    }
    if let Some(v) = filter.event_id {
        query = query.bind(v);
    }
    if let Some(v) = filter.root_job_id {
        query = query.bind(v);
    }
    if let Some(v) = filter.dead {
        query = query.bind(v);
    }
    if let Some(v) = filter.schedule_id {
        query = query.bind(v);
    }
    if let Some(v) = filter.worker_id {
        query = query.bind(v);
    }
    if let Some(v) = filter.workflow_run_id {
        query = query.bind(v);
    }
    if let Some(v) = filter.before {
        query = query.bind(v);
    }
    if let Some(v) = filter.stuck {
        query = query.bind(v);
    }
    let rows = query.bind(filter.limit).fetch_all(db).await?;
    Ok(rows
        .into_iter()
        .map(|row| JobSummary::from(Job::from(row)))
        .collect())
}

/// How many jobs have each status, counted up to `cap` per status (an index-only walk of
/// `jobs_status_idx` that stops at `cap`, so the cost does not grow with the history): a
/// count equal to `cap` means "at least".
pub async fn count_by_status(db: impl PgExecutor<'_>, cap: i64) -> Result<Vec<(JobStatus, i64)>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT s.status, (SELECT count(*) FROM (SELECT 1 FROM jobs j WHERE j.status = s.status LIMIT $1) c)
         FROM unnest(ARRAY['queued', 'claimed', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled']) AS s(status)",
    )
    .bind(cap)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(status, count)| status.parse().ok().map(|s| (s, count)))
        .collect())
}

/// How many dead-lettered jobs there are, up to `cap`.
pub async fn count_dead(db: impl PgExecutor<'_>, cap: i64) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM (SELECT 1 FROM jobs WHERE dead LIMIT $1) c")
            .bind(cap)
            .fetch_one(db)
            .await?,
    )
}

/// Whether a job has reached a terminal status (used by log readers to know when to stop).
pub async fn job_status(db: impl PgExecutor<'_>, job_id: Uuid) -> Result<JobStatus> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(db)
        .await?;
    let status = status.ok_or(StorageError::JobNotFound(job_id))?;
    status
        .parse()
        .map_err(|e: String| StorageError::Database(sqlx::Error::Decode(e.into())))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_caps() {
        for _ in 0..100 {
            let first = retry_delay(1, 10, 3600);
            assert!(
                (5_000..=10_000).contains(&(first.as_millis() as u64)),
                "{first:?}"
            );
            let third = retry_delay(3, 10, 3600);
            assert!(
                (20_000..=40_000).contains(&(third.as_millis() as u64)),
                "{third:?}"
            );
            let capped = retry_delay(30, 10, 60);
            assert!(
                (30_000..=60_000).contains(&(capped.as_millis() as u64)),
                "{capped:?}"
            );
        }
        assert_eq!(retry_delay(1, 0, 3600), Duration::ZERO);
    }
}
