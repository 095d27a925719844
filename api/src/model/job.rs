//! Jobs: one run of an event, from queued to a terminal status, and its logs.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{FieldError, text_enum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Claimed,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}
text_enum!(JobStatus {
    Queued => "queued", Claimed => "claimed", Running => "running", Succeeded => "succeeded",
    Failed => "failed", TimedOut => "timed_out", Cancelled => "cancelled",
});

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::TimedOut | Self::Cancelled
        )
    }
}

/// Why a job did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The script ran and failed (non-zero exit, HTTP status ≥ 400).
    Script,
    /// Baton could not run it (interpreter or image missing, host unreachable...).
    Infrastructure,
    Timeout,
    Cancelled,
    /// The worker running it stopped renewing its lease (crashed, cut off).
    LeaseLost,
    /// The script's output was malformed or too large.
    Output,
    /// Ended by its event's concurrency policy: skipped (`skip`, its group was full) or
    /// cancelled while queued by a newer run (`cancel_previous`).
    Concurrency,
}
text_enum!(ErrorKind {
    Script => "script", Infrastructure => "infrastructure", Timeout => "timeout",
    Cancelled => "cancelled", LeaseLost => "lease_lost", Output => "output",
    Concurrency => "concurrency",
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    pub kind: ErrorKind,
    pub message: String,
    /// The run exited non-zero within its event's startup window (`startup_window_seconds`):
    /// it failed to start rather than ran and failed.
    /// Present (and true) only for a start failure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub start_failure: bool,
}

impl JobError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            start_failure: false,
        }
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub event_id: Uuid,
    pub event_name: String,
    pub status: JobStatus,
    pub attempt: i32,
    pub max_attempts: i32,
    pub dead: bool,
    pub priority: i32,
    pub run_at: DateTime<Utc>,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    pub error: Option<JobError>,
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    #[schema(value_type = Option<Object>)]
    pub output: Option<serde_json::Value>,
    pub condition: Option<bool>,
    pub progress: Option<i16>,
    pub cancel_requested: bool,
    pub parent_job_id: Option<Uuid>,
    pub root_job_id: Uuid,
    pub depth: i32,
    pub idempotency_key: Option<String>,
    pub worker_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Why some of the actions this run triggered did not run (e.g. the chain depth limit).
    pub action_notes: Vec<String>,
    /// Output lines not kept because the job reached its log limit.
    pub log_lines_dropped: i64,
    /// The job this one re-runs (`POST /jobs/{id}/rerun`).
    pub rerun_of: Option<Uuid>,
    /// The schedule that fired this run (None for other runs, or once the schedule is deleted).
    pub schedule_id: Option<Uuid>,
    /// The nominal fire time this run was fired for (unique per schedule).
    pub scheduled_for: Option<DateTime<Utc>>,
    /// The run's concurrency group within its event (its key rendered from the input; `""`
    /// is the shared group); null when the event has no concurrency policy.
    pub concurrency_key: Option<String>,
    /// Running with no log line, progress or start for the event's `stuck_after_seconds`
    /// (cleared when it moves again).
    pub stuck: bool,
    /// The workflow run this job is a step of (`GET /workflow-runs/{id}`).
    pub workflow_run_id: Option<Uuid>,
    /// The step of that run (`_on_failure` for the run's on_failure job).
    pub step_id: Option<String>,
    /// The element of a `for_each` step.
    pub step_item: Option<i32>,
}

/// A job in a list (`GET /api/v1/jobs`): everything [`Job`] has except the run's `input` and
/// `output` bodies, which may be megabytes each; `GET /api/v1/jobs/{id}` returns them.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobSummary {
    pub id: Uuid,
    pub event_id: Uuid,
    pub event_name: String,
    pub status: JobStatus,
    pub attempt: i32,
    pub max_attempts: i32,
    pub dead: bool,
    pub priority: i32,
    pub run_at: DateTime<Utc>,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    pub error: Option<JobError>,
    pub condition: Option<bool>,
    pub progress: Option<i16>,
    pub cancel_requested: bool,
    pub parent_job_id: Option<Uuid>,
    pub root_job_id: Uuid,
    pub depth: i32,
    pub idempotency_key: Option<String>,
    pub worker_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub action_notes: Vec<String>,
    pub log_lines_dropped: i64,
    pub rerun_of: Option<Uuid>,
    pub schedule_id: Option<Uuid>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub concurrency_key: Option<String>,
    pub stuck: bool,
    /// The workflow run this job is a step of (`GET /workflow-runs/{id}`).
    pub workflow_run_id: Option<Uuid>,
    /// The step of that run (`_on_failure` for the run's on_failure job).
    pub step_id: Option<String>,
    /// The element of a `for_each` step.
    pub step_item: Option<i32>,
}

impl From<Job> for JobSummary {
    fn from(j: Job) -> Self {
        Self {
            id: j.id,
            event_id: j.event_id,
            event_name: j.event_name,
            status: j.status,
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            dead: j.dead,
            priority: j.priority,
            run_at: j.run_at,
            exit_code: j.exit_code,
            exit_signal: j.exit_signal,
            error: j.error,
            condition: j.condition,
            progress: j.progress,
            cancel_requested: j.cancel_requested,
            parent_job_id: j.parent_job_id,
            root_job_id: j.root_job_id,
            depth: j.depth,
            idempotency_key: j.idempotency_key,
            worker_id: j.worker_id,
            created_at: j.created_at,
            claimed_at: j.claimed_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            action_notes: j.action_notes,
            log_lines_dropped: j.log_lines_dropped,
            rerun_of: j.rerun_of,
            schedule_id: j.schedule_id,
            scheduled_for: j.scheduled_for,
            concurrency_key: j.concurrency_key,
            stuck: j.stuck,
            workflow_run_id: j.workflow_run_id,
            step_id: j.step_id,
            step_item: j.step_item,
        }
    }
}

/// The body of `POST /api/v1/events/{id}/run` (all optional).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Made available to the script as its input (`baton_input`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub input: Option<serde_json::Value>,
    /// Overrides the event's priority for this run (higher runs first).
    #[serde(default)]
    pub priority: Option<i32>,
    /// Do not start before this time.
    #[serde(default)]
    pub run_at: Option<DateTime<Utc>>,
    /// A repeated key for the same event returns the job created the first time.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

impl RunRequest {
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(p) = self.priority {
            super::event::check_range("priority", p, -1000, 1000)?;
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > 200 || key.chars().any(char::is_control))
        {
            return Err(FieldError::new(
                "idempotency_key",
                "must be 1 to 200 printable characters",
            ));
        }
        if let Some(at) = self.run_at {
            // PostgreSQL's timestamps end long before chrono's: bound both sides.
            if at > Utc::now() + chrono::Duration::days(366) {
                return Err(FieldError::new("run_at", "must be within a year from now"));
            }
            if at < DateTime::UNIX_EPOCH {
                return Err(FieldError::new("run_at", "must not be before 1970"));
            }
        }
        Ok(())
    }
}

/// One line of a job's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    pub seq: i64,
    /// `stdout`, `stderr`, or `system` (Baton's own notes, such as a truncation marker).
    pub stream: String,
    pub text: String,
    pub ts: DateTime<Utc>,
}

/// `GET /api/v1/jobs/{id}/logs?after=SEQ`: lines after `after`, the `after` to ask for next,
/// and whether the job has finished (so no more lines will come).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LogPage {
    pub lines: Vec<LogLine>,
    pub next: i64,
    pub done: bool,
}
