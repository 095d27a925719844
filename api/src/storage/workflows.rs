//! Workflows, their runs, the runs' steps, and the jobs steps queue.
//!
//! Steps change only under the run's row lock ([`lock_run`]), taken by the transaction that
//! records a step job's completion, starts a run, cancels or retries it (`crate::workflow::engine`).
//! Step jobs are unique per (run, step, item, attempt) (`jobs_workflow_step`, migration 0020).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, types::Json};
use uuid::Uuid;

use super::{Result, StorageError, is_unique_violation};
use crate::model::Event;
use crate::model::workflow::{
    NewWorkflow, RunFilter, RunStatus, SkipReason, StepStatus, Workflow, WorkflowRun,
};

#[derive(Debug, sqlx::FromRow)]
struct WorkflowRow {
    id: Uuid,
    definition: Json<NewWorkflow>,
    revision: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<WorkflowRow> for Workflow {
    fn from(r: WorkflowRow) -> Self {
        Workflow {
            id: r.id,
            spec: r.definition.0,
            revision: r.revision,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

const WORKFLOW_COLUMNS: &str = "id, definition, revision, created_at, updated_at";

pub async fn insert_workflow(db: impl PgExecutor<'_>, spec: &NewWorkflow) -> Result<Workflow> {
    let sql = format!(
        "INSERT INTO workflows (id, name, definition) VALUES ($1, $2, $3) RETURNING {WORKFLOW_COLUMNS}"
    );
    let row: WorkflowRow = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::now_v7())
        .bind(&spec.name)
        .bind(Json(spec))
        .fetch_one(db)
        .await
        .map_err(|e| {
            if is_unique_violation(&e, "workflows_name_key") {
                StorageError::WorkflowNameTaken(spec.name.clone())
            } else {
                e.into()
            }
        })?;
    Ok(row.into())
}

pub async fn get_workflow(db: impl PgExecutor<'_>, id: Uuid) -> Result<Workflow> {
    let sql = format!("SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE id = $1");
    let row: Option<WorkflowRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db)
        .await?;
    row.map(Workflow::from)
        .ok_or(StorageError::WorkflowNotFound(id))
}

/// Workflows by name, paged by name (`after` is the last name of the previous page).
pub async fn list_workflows(
    db: impl PgExecutor<'_>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Workflow>> {
    let sql = format!(
        "SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE ($1::text IS NULL OR name > $1)
         ORDER BY name LIMIT $2"
    );
    let rows: Vec<WorkflowRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(after)
        .bind(limit)
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(Workflow::from).collect())
}

/// Deletes a workflow and its finished runs. Refused while a run of it is running.
pub async fn delete_workflow(db: impl PgExecutor<'_>, id: Uuid) -> Result<()> {
    let (found, busy): (bool, bool) = sqlx::query_as(
        "WITH busy AS (
             SELECT EXISTS (SELECT 1 FROM workflow_runs WHERE workflow_id = $1 AND status = 'running') AS busy
         ), gone AS (
             DELETE FROM workflows WHERE id = $1 AND NOT (SELECT busy FROM busy) RETURNING id
         )
         SELECT EXISTS (SELECT 1 FROM workflows WHERE id = $1) OR EXISTS (SELECT 1 FROM gone),
                (SELECT busy FROM busy)",
    )
    .bind(id)
    .fetch_one(db)
    .await?;
    match (found, busy) {
        (false, _) => Err(StorageError::WorkflowNotFound(id)),
        (true, true) => Err(StorageError::WorkflowBusy(id)),
        (true, false) => Ok(()),
    }
}

/// A run as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunRow {
    pub id: Uuid,
    pub workflow_id: Uuid,
    pub workflow_name: String,
    pub definition: Json<NewWorkflow>,
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    pub input: Json<Value>,
    pub attempt: i32,
    pub on_failure_job_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl RunRow {
    /// The API's view (without steps; see [`load_steps`]).
    pub fn view(self, with_definition: bool) -> WorkflowRun {
        WorkflowRun {
            id: self.id,
            workflow_id: self.workflow_id,
            workflow_name: self.workflow_name,
            status: self.status,
            input: self.input.0,
            attempt: self.attempt,
            on_failure_job_id: self.on_failure_job_id,
            created_at: self.created_at,
            finished_at: self.finished_at,
            steps: None,
            definition: with_definition.then_some(self.definition.0),
        }
    }
}

const RUN_COLUMNS: &str = "id, workflow_id, workflow_name, definition, status, input, attempt,
    on_failure_job_id, created_at, finished_at";

/// The schedule slot a run is fired for: `(schedule_id, scheduled_for)` is unique.
pub type ScheduleSlot = (Uuid, DateTime<Utc>);

/// What started a run, for its unique keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOrigin<'a> {
    pub slot: Option<ScheduleSlot>,
    /// Unique per workflow: a repeat finds the first run ([`run_by_key`]).
    pub idempotency_key: Option<&'a str>,
}

/// The run of `workflow_id` started with this idempotency key.
pub async fn run_by_key(
    db: impl PgExecutor<'_>,
    workflow_id: Uuid,
    key: &str,
) -> Result<Option<RunRow>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM workflow_runs WHERE workflow_id = $1 AND idempotency_key = $2"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(workflow_id)
        .bind(key)
        .fetch_optional(db)
        .await?)
}

/// Inserts a run and one `pending` row per step. With a schedule slot or an idempotency key
/// that already has a run, inserts nothing and returns None.
pub async fn insert_run(
    conn: &mut PgConnection,
    workflow: &Workflow,
    input: &Value,
    created_by: Option<Uuid>,
    origin: &RunOrigin<'_>,
) -> Result<Option<RunRow>> {
    // DO NOTHING without a target covers both unique keys: the schedule slot and the
    // idempotency key.
    let sql = format!(
        "INSERT INTO workflow_runs (id, workflow_id, workflow_name, definition, status, input, created_by,
                                    schedule_id, scheduled_for, idempotency_key)
         VALUES ($1, $2, $3, $4, 'running', $5, $6, $7, $8, $9)
         ON CONFLICT DO NOTHING
         RETURNING {RUN_COLUMNS}"
    );
    let run: Option<RunRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::now_v7())
        .bind(workflow.id)
        .bind(&workflow.spec.name)
        .bind(Json(&workflow.spec))
        .bind(Json(input))
        .bind(created_by)
        .bind(origin.slot.map(|s| s.0))
        .bind(origin.slot.map(|s| s.1))
        .bind(origin.idempotency_key)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
                StorageError::WorkflowNotFound(workflow.id)
            }
            other => other.into(),
        })?;
    let Some(run) = run else {
        return Ok(None);
    };
    let ids: Vec<&str> = workflow.spec.steps.iter().map(|s| s.id.as_str()).collect();
    sqlx::query(
        "INSERT INTO workflow_steps (run_id, step_id, position, status)
         SELECT $1, s.id, s.pos - 1, 'pending' FROM unnest($2::text[]) WITH ORDINALITY AS s(id, pos)",
    )
    .bind(run.id)
    .bind(&ids)
    .execute(&mut *conn)
    .await?;
    Ok(Some(run))
}

/// Locks a run's row for the caller's transaction: every change to its steps happens under
/// this lock, so two completions of the same run are decided one after the other.
pub async fn lock_run(db: impl PgExecutor<'_>, id: Uuid) -> Result<RunRow> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM workflow_runs WHERE id = $1 FOR UPDATE");
    let row: Option<RunRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db)
        .await?;
    row.ok_or(StorageError::WorkflowRunNotFound(id))
}

pub async fn get_run(db: impl PgExecutor<'_>, id: Uuid) -> Result<RunRow> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM workflow_runs WHERE id = $1");
    let row: Option<RunRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db)
        .await?;
    row.ok_or(StorageError::WorkflowRunNotFound(id))
}

/// Runs, newest first; `before` is the cursor.
pub async fn list_runs(db: impl PgExecutor<'_>, filter: &RunFilter) -> Result<Vec<RunRow>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM workflow_runs
         WHERE ($1::uuid IS NULL OR workflow_id = $1) AND ($2::text IS NULL OR status = $2)
           AND ($3::uuid IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(filter.workflow_id)
        .bind(filter.status.map(RunStatus::as_str))
        .bind(filter.before)
        .bind(filter.limit)
        .fetch_all(db)
        .await?)
}

/// Sets a run's status (and `finished_at` when it is not `running`).
pub async fn set_run_status(
    db: impl PgExecutor<'_>,
    id: Uuid,
    status: RunStatus,
    attempt: i32,
) -> Result<()> {
    sqlx::query(
        "UPDATE workflow_runs SET status = $2, attempt = $3,
             finished_at = CASE WHEN $2 = 'running' THEN NULL ELSE now() END
         WHERE id = $1",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(attempt)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn set_on_failure_job(db: impl PgExecutor<'_>, id: Uuid, job_id: Uuid) -> Result<()> {
    sqlx::query("UPDATE workflow_runs SET on_failure_job_id = $2 WHERE id = $1")
        .bind(id)
        .bind(job_id)
        .execute(db)
        .await?;
    Ok(())
}

/// A step of a run as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepRow {
    pub step_id: String,
    #[sqlx(try_from = "String")]
    pub status: StepStatus,
    pub skip_reason: Option<String>,
    pub error: Option<String>,
    pub attempt: i32,
    /// The `for_each` list (read by [`load_step`] only; [`load_steps`] leaves it out).
    pub items: Option<Json<Vec<Value>>>,
    /// How many elements the `for_each` list has (None for other steps).
    pub item_count: Option<i32>,
    pub next_item: i32,
    pub output: Option<Json<Value>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl StepRow {
    pub fn skip_reason(&self) -> Option<SkipReason> {
        self.skip_reason.as_deref().and_then(|r| r.parse().ok())
    }
}

/// A run's steps, in definition order, without their `for_each` lists (which may be long and
/// are needed only by the step's own progress): `item_count` says how long they are.
pub async fn load_steps(db: impl PgExecutor<'_>, run_id: Uuid) -> Result<Vec<StepRow>> {
    Ok(sqlx::query_as(
        "SELECT step_id, status, skip_reason, error, attempt, NULL::jsonb AS items,
                jsonb_array_length(items) AS item_count, next_item, output, started_at, finished_at
         FROM workflow_steps WHERE run_id = $1 ORDER BY position",
    )
    .bind(run_id)
    .fetch_all(db)
    .await?)
}

/// A step's row, or None if the run has no such step.
pub async fn load_step(
    db: impl PgExecutor<'_>,
    run_id: Uuid,
    step_id: &str,
) -> Result<Option<StepRow>> {
    Ok(sqlx::query_as(
        "SELECT step_id, status, skip_reason, error, attempt, items, jsonb_array_length(items) AS item_count,
                next_item, output, started_at, finished_at
         FROM workflow_steps WHERE run_id = $1 AND step_id = $2",
    )
    .bind(run_id)
    .bind(step_id)
    .fetch_optional(db)
    .await?)
}

/// A step that starts running (for `for_each`, with its items; `next_item` elements launched).
pub async fn start_step(
    db: impl PgExecutor<'_>,
    run_id: Uuid,
    step_id: &str,
    attempt: i32,
    items: Option<&[Value]>,
) -> Result<()> {
    sqlx::query(
        "UPDATE workflow_steps SET status = 'running', attempt = $3, items = $4, next_item = 0,
             skip_reason = NULL, error = NULL, output = NULL, started_at = now(), finished_at = NULL
         WHERE run_id = $1 AND step_id = $2",
    )
    .bind(run_id)
    .bind(step_id)
    .bind(attempt)
    .bind(items.map(Json))
    .execute(db)
    .await?;
    Ok(())
}

pub async fn set_next_item(
    db: impl PgExecutor<'_>,
    run_id: Uuid,
    step_id: &str,
    next_item: i32,
) -> Result<()> {
    sqlx::query("UPDATE workflow_steps SET next_item = $3 WHERE run_id = $1 AND step_id = $2")
        .bind(run_id)
        .bind(step_id)
        .bind(next_item)
        .execute(db)
        .await?;
    Ok(())
}

/// How a step ended.
#[derive(Debug, Clone)]
pub struct StepEnd<'a> {
    pub status: StepStatus,
    pub skip_reason: Option<SkipReason>,
    pub error: Option<&'a str>,
    pub output: Option<&'a Value>,
}

pub async fn end_step(
    db: impl PgExecutor<'_>,
    run_id: Uuid,
    step_id: &str,
    attempt: i32,
    end: &StepEnd<'_>,
) -> Result<()> {
    sqlx::query(
        "UPDATE workflow_steps SET status = $3, skip_reason = $4, error = $5, output = $6,
             attempt = $7, finished_at = now()
         WHERE run_id = $1 AND step_id = $2",
    )
    .bind(run_id)
    .bind(step_id)
    .bind(end.status.as_str())
    .bind(end.skip_reason.map(SkipReason::as_str))
    .bind(end.error)
    .bind(end.output.map(Json))
    .bind(attempt)
    .execute(db)
    .await?;
    Ok(())
}

/// `retry`: the steps named go back to `pending` under the run's new attempt.
pub async fn reset_steps(
    db: impl PgExecutor<'_>,
    run_id: Uuid,
    step_ids: &[String],
    attempt: i32,
) -> Result<()> {
    sqlx::query(
        "UPDATE workflow_steps SET status = 'pending', skip_reason = NULL, error = NULL, output = NULL,
             items = NULL, next_item = 0, attempt = $3, started_at = NULL, finished_at = NULL
         WHERE run_id = $1 AND step_id = ANY($2)",
    )
    .bind(run_id)
    .bind(step_ids)
    .bind(attempt)
    .execute(db)
    .await?;
    Ok(())
}

/// `cancel`: every step not yet ended becomes `cancelled`.
pub async fn cancel_open_steps(db: impl PgExecutor<'_>, run_id: Uuid) -> Result<()> {
    sqlx::query(
        "UPDATE workflow_steps SET status = 'cancelled', finished_at = now()
         WHERE run_id = $1 AND status IN ('pending', 'running')",
    )
    .bind(run_id)
    .execute(db)
    .await?;
    Ok(())
}

/// A step job to queue.
#[derive(Debug, Clone)]
pub struct NewStepJob<'a> {
    /// The event, its retry settings already replaced by the step's.
    pub event: &'a Event,
    pub input: &'a Value,
    pub run_id: Uuid,
    pub step_id: &'a str,
    /// The element of a `for_each` step (None otherwise).
    pub item: Option<i32>,
    pub attempt: i32,
}

/// Queues a step's job unless that (run, step, item, attempt) already has one; returns the
/// job's id either way. The row trigger notifies the dispatchers on commit.
pub async fn enqueue_step_job(conn: &mut PgConnection, job: &NewStepJob<'_>) -> Result<Uuid> {
    let id = Uuid::now_v7();
    let spec = serde_json::to_value(job.event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let created: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO jobs (id, event_id, status, priority, run_at, max_attempts, executor, labels, spec,
                           input, root_job_id, depth, workflow_run_id, step_id, step_item, step_attempt)
         VALUES ($1, $2, 'queued', $3, now(), $4, $5, $6, $7, $8, $1, 0, $9, $10, $11, $12)
         ON CONFLICT (workflow_run_id, step_id, step_item, step_attempt)
             WHERE workflow_run_id IS NOT NULL DO NOTHING
         RETURNING id",
    )
    .bind(id)
    .bind(job.event.id)
    .bind(job.event.spec.priority)
    .bind(job.event.spec.max_attempts)
    .bind(job.event.spec.executor.resolved().as_str())
    .bind(Json(&job.event.spec.labels))
    .bind(spec)
    .bind(Json(job.input))
    .bind(job.run_id)
    .bind(job.step_id)
    .bind(job.item)
    .bind(job.attempt)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| match e {
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
            StorageError::EventNotFound(job.event.id)
        }
        other => other.into(),
    })?;
    if let Some(id) = created {
        return Ok(id);
    }
    Ok(sqlx::query_scalar(
        "SELECT id FROM jobs WHERE workflow_run_id = $1 AND step_id = $2
           AND step_item IS NOT DISTINCT FROM $3 AND step_attempt = $4",
    )
    .bind(job.run_id)
    .bind(job.step_id)
    .bind(job.item)
    .bind(job.attempt)
    .fetch_one(&mut *conn)
    .await?)
}

/// Where a step job belongs, if it belongs to a run.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepJobLink {
    pub workflow_run_id: Uuid,
    pub step_id: String,
    pub step_item: Option<i32>,
    pub step_attempt: i32,
}

pub async fn step_job_link(db: impl PgExecutor<'_>, job_id: Uuid) -> Result<Option<StepJobLink>> {
    Ok(sqlx::query_as(
        "SELECT workflow_run_id, step_id, step_item, step_attempt FROM jobs
         WHERE id = $1 AND workflow_run_id IS NOT NULL AND step_id IS NOT NULL",
    )
    .bind(job_id)
    .fetch_optional(db)
    .await?)
}

/// How a `for_each` step's jobs of one attempt stand.
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
pub struct ItemCounts {
    /// Queued, claimed or running (a job waiting to retry counts).
    pub active: i64,
    /// Ended failed, timed out or cancelled.
    pub failed: i64,
}

pub async fn item_counts(
    db: impl PgExecutor<'_>,
    run_id: Uuid,
    step_id: &str,
    attempt: i32,
) -> Result<ItemCounts> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status IN ('queued', 'claimed', 'running')) AS active,
                count(*) FILTER (WHERE status IN ('failed', 'timed_out', 'cancelled')) AS failed
         FROM jobs WHERE workflow_run_id = $1 AND step_id = $2 AND step_attempt = $3",
    )
    .bind(run_id)
    .bind(step_id)
    .bind(attempt)
    .fetch_one(db)
    .await?)
}

/// The outputs of a `for_each` step's jobs of one attempt, by item (failed items: null).
pub async fn item_outputs(
    db: impl PgExecutor<'_>,
    run_id: Uuid,
    step_id: &str,
    attempt: i32,
) -> Result<Vec<(i32, Option<Value>)>> {
    let rows: Vec<(i32, Option<Json<Value>>)> = sqlx::query_as(
        "SELECT step_item, CASE WHEN status = 'succeeded' THEN coalesce(output, 'null'::jsonb) END
         FROM jobs WHERE workflow_run_id = $1 AND step_id = $2 AND step_attempt = $3
           AND step_item IS NOT NULL
         ORDER BY step_item",
    )
    .bind(run_id)
    .bind(step_id)
    .bind(attempt)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|(i, o)| (i, o.map(|j| j.0))).collect())
}

/// The ids of a run's jobs per step and attempt, item order.
pub async fn run_jobs(db: impl PgExecutor<'_>, run_id: Uuid) -> Result<Vec<(String, i32, Uuid)>> {
    Ok(sqlx::query_as(
        "SELECT step_id, step_attempt, id FROM jobs WHERE workflow_run_id = $1 AND step_id IS NOT NULL
         ORDER BY step_id, step_attempt, step_item NULLS FIRST",
    )
    .bind(run_id)
    .fetch_all(db)
    .await?)
}

/// The run's jobs still queued, claimed or running, locked in id order (`cancel` locks them
/// before the run, like a completion does: the same order everywhere, so no deadlock).
pub async fn lock_open_jobs(db: impl PgExecutor<'_>, run_id: Uuid) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM jobs WHERE workflow_run_id = $1 AND status IN ('queued', 'claimed', 'running')
         ORDER BY id FOR UPDATE",
    )
    .bind(run_id)
    .fetch_all(db)
    .await?)
}
