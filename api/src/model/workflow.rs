//! Workflows as the API shows them: the definition (`POST /api/v1/workflows`), runs and their
//! steps. The definition's rules (ids, the graph, expressions) are checked by
//! `crate::workflow::validate`, which names the step and field of any problem.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::text_enum;

/// A workflow's definition: the body of `POST /api/v1/workflows`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWorkflow {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The steps; `needs` between them makes the graph (no cycles).
    pub steps: Vec<StepSpec>,
    /// An event run once when a run ends `failed`, with the run's summary as its input.
    #[serde(default)]
    pub on_failure: Option<OnFailure>,
    /// After a step fails (without `continue_on_error`), start no other `all_succeeded` step:
    /// the run stops once the running steps end (`any_failed` / `always` steps still run).
    #[serde(default)]
    pub stop_on_error: bool,
}

/// One step: an event run once (or once per element of `for_each`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Unique in the workflow: a letter, then letters, digits or `_` (a CEL identifier).
    pub id: String,
    pub event_id: Uuid,
    /// Steps that must end before this one starts.
    #[serde(default)]
    pub needs: Vec<String>,
    /// CEL over `input` (the run's input) and `steps.<id>.output` / `.status` of ancestors:
    /// false skips the step.
    #[serde(default, rename = "if")]
    pub if_: Option<String>,
    /// Keys of the step's input: a string is a CEL expression (over `input`, `steps`, and
    /// `item` / `index` in a `for_each` step), any other JSON value is taken as is.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub input: Option<serde_json::Map<String, Value>>,
    /// CEL yielding a list: one job per element (`input.item`, `input.index`); the step's
    /// output is the list of the jobs' outputs, in order.
    #[serde(default)]
    pub for_each: Option<String>,
    /// At most this many of a `for_each` step's jobs are queued or running at once (1-1000;
    /// default: every element at once, bounded only by the workers' slots).
    #[serde(default)]
    pub max_parallel: Option<i32>,
    /// When the step may run, given how its needs ended (default `all_succeeded`).
    #[serde(default)]
    pub when: When,
    /// A failure of this step does not fail the run, and `all_succeeded` dependants still run.
    #[serde(default)]
    pub continue_on_error: bool,
    /// Overrides the event's retry settings for this step's jobs.
    #[serde(default)]
    pub retry: Option<StepRetry>,
}

/// A step's retry settings (unset fields: the event's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepRetry {
    pub max_attempts: Option<i32>,
    pub backoff_seconds: Option<i32>,
    pub backoff_max_seconds: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Every need succeeded (or failed with `continue_on_error`).
    #[default]
    AllSucceeded,
    /// At least one need failed (or was skipped because something before it failed).
    AnyFailed,
    /// Whatever happened to the needs.
    Always,
}
text_enum!(When { AllSucceeded => "all_succeeded", AnyFailed => "any_failed", Always => "always" });

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OnFailure {
    pub event_id: Uuid,
}

/// A stored workflow.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Workflow {
    pub id: Uuid,
    #[serde(flatten)]
    pub spec: NewWorkflow,
    pub revision: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /api/v1/workflows/{id}/run`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunWorkflowRequest {
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub input: Option<Value>,
    /// A repeat with the same key (per workflow) starts nothing and returns the first run.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct RunStarted {
    pub run_id: Uuid,
    /// False when the idempotency key matched an earlier run (that run is returned).
    pub created: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}
text_enum!(RunStatus {
    Running => "running", Succeeded => "succeeded", Failed => "failed", Cancelled => "cancelled",
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}
text_enum!(StepStatus {
    Pending => "pending", Running => "running", Succeeded => "succeeded", Failed => "failed",
    Skipped => "skipped", Cancelled => "cancelled",
});

impl StepStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }
}

/// Why a step was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Its `if` was false.
    Condition,
    /// Its `when` did not hold (e.g. `any_failed` and nothing failed).
    When,
    /// A need failed, was cancelled or was itself skipped because of a failure.
    UpstreamFailed,
    /// A need was skipped for another reason (its `if` was false…).
    UpstreamSkipped,
    /// The workflow's `stop_on_error` after another step failed.
    StopOnError,
}
text_enum!(SkipReason {
    Condition => "condition", When => "when", UpstreamFailed => "upstream_failed",
    UpstreamSkipped => "upstream_skipped", StopOnError => "stop_on_error",
});

impl SkipReason {
    /// Skipped because something failed: `retry` runs such steps again.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::UpstreamFailed | Self::StopOnError)
    }
}

/// A run as `GET /api/v1/workflow-runs/{id}` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkflowRun {
    pub id: Uuid,
    pub workflow_id: Uuid,
    pub workflow_name: String,
    pub status: RunStatus,
    #[schema(value_type = Object)]
    pub input: Value,
    /// 1, then +1 per `retry`.
    pub attempt: i32,
    /// The `on_failure` event's job, once the run failed.
    pub on_failure_job_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Every step, in definition order (absent from lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<WorkflowStep>>,
    /// The definition the run follows (taken when it started; absent from lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub definition: Option<NewWorkflow>,
}

/// One step of a run.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkflowStep {
    pub id: String,
    pub status: StepStatus,
    pub skip_reason: Option<SkipReason>,
    /// Why it failed when no job says so (an expression failed, the event is gone…).
    pub error: Option<String>,
    pub needs: Vec<String>,
    /// The run attempt that last ran it.
    pub attempt: i32,
    /// The step's jobs (of its latest attempt; one per item for `for_each`).
    pub job_ids: Vec<Uuid>,
    /// For `for_each`: how many items.
    pub items: Option<i32>,
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Filters of `GET /api/v1/workflow-runs`.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub workflow_id: Option<Uuid>,
    pub status: Option<RunStatus>,
    pub before: Option<Uuid>,
    pub limit: i64,
}
