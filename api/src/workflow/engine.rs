//! Runs a workflow in the database. Every entry point works in the caller's transaction and
//! holds the run's row lock (`storage::workflows::lock_run`) while it reads and changes steps:
//!
//! - [`start_run`]: the run and its steps are inserted, and the root steps start;
//! - [`on_job_finished`]: called by `crate::actions::after_finish` in the transaction that
//!   records a step job's end — the step's outcome and whatever it unblocks (next steps'
//!   jobs, skips, the run's end and its `on_failure` job) commit with that completion;
//! - [`cancel_run`], [`retry_run`].
//!
//! Why no step is lost or run twice: the completion and the next steps commit together or
//! not at all (a crash before commit leaves the job unfinished, so it is reported or reaped
//! and completed again); decisions about one run are serialised by its row lock, and each
//! transaction re-reads the steps after taking it (READ COMMITTED: every statement sees what
//! committed before it), so a fan-in whose parents end at the same instant on two replicas
//! is decided by the second transaction only, once it sees both parents ended; and a step's
//! job is unique per (run, step, item, attempt), so even a repeated decision queues nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::dag::{self, Move, StepView};
use super::expr;
use crate::model::workflow::{NewWorkflow, RunStatus, SkipReason, StepSpec, StepStatus, Workflow};
use crate::model::{Event, Job, JobStatus};
use crate::storage::workflows::{self as store, NewStepJob, RunRow, StepEnd, StepRow};
use crate::storage::{StorageError, events};

type Result<T> = std::result::Result<T, StorageError>;

/// The step id of a run's `on_failure` job (step ids start with a letter: no clash).
pub const ON_FAILURE_STEP: &str = "_on_failure";
/// Most elements a `for_each` list may have.
pub const MAX_ITEMS: usize = 10_000;

/// Inserts a run of `workflow` and starts its root steps. With an idempotency key that already
/// started a run, returns that run instead (`false`: not created now).
pub async fn start_run(
    conn: &mut PgConnection,
    workflow: &Workflow,
    input: &Value,
    created_by: Option<Uuid>,
    idempotency_key: Option<&str>,
) -> Result<(RunRow, bool)> {
    let origin = store::RunOrigin {
        slot: None,
        idempotency_key,
    };
    if let Some(run) = store::insert_run(&mut *conn, workflow, input, created_by, &origin).await? {
        advance(conn, &run).await?;
        return Ok((run, true));
    }
    let existing = match idempotency_key {
        Some(key) => store::run_by_key(&mut *conn, workflow.id, key).await?,
        None => None,
    };
    existing
        .map(|run| (run, false))
        .ok_or(StorageError::WorkflowNotFound(workflow.id))
}

/// The run a schedule fires for its nominal time `slot`, unless that slot already has one
/// (then None: `(schedule_id, scheduled_for)` is unique, as for event schedules).
pub async fn start_scheduled_run(
    conn: &mut PgConnection,
    workflow: &Workflow,
    input: &Value,
    created_by: Option<Uuid>,
    slot: store::ScheduleSlot,
) -> Result<Option<RunRow>> {
    let origin = store::RunOrigin {
        slot: Some(slot),
        idempotency_key: None,
    };
    let Some(run) = store::insert_run(&mut *conn, workflow, input, created_by, &origin).await?
    else {
        return Ok(None);
    };
    advance(conn, &run).await?;
    Ok(Some(run))
}

/// A job ended (succeeded, failed, timed out or cancelled — not a retry): if it is a step's,
/// record the step's progress and move the run on, in the caller's transaction.
pub async fn on_job_finished(conn: &mut PgConnection, job: &Job) -> Result<()> {
    let Some(link) = store::step_job_link(&mut *conn, job.id).await? else {
        return Ok(());
    };
    if link.step_id.starts_with('_') {
        return Ok(()); // the run's on_failure job
    }
    let run = store::lock_run(&mut *conn, link.workflow_run_id).await?;
    if run.status != RunStatus::Running {
        return Ok(()); // cancelled (or ended) meanwhile: nothing more starts
    }
    let Some(step) = store::load_step(&mut *conn, run.id, &link.step_id).await? else {
        return Ok(());
    };
    if step.status != StepStatus::Running || step.attempt != link.step_attempt {
        return Ok(()); // a job of an earlier attempt, or the step already ended
    }
    let Some(spec) = run.definition.0.steps.iter().find(|s| s.id == link.step_id) else {
        return Ok(());
    };
    if step.items.is_some() {
        for_each_progress(conn, &run, spec, &step).await?;
    } else {
        let status = match job.status {
            JobStatus::Succeeded => StepStatus::Succeeded,
            JobStatus::Cancelled => StepStatus::Cancelled,
            _ => StepStatus::Failed,
        };
        let error = job
            .error
            .as_ref()
            .filter(|_| status != StepStatus::Succeeded)
            .map(|e| format!("{}: {}", e.kind, e.message));
        store::end_step(
            &mut *conn,
            run.id,
            &spec.id,
            step.attempt,
            &StepEnd {
                status,
                skip_reason: None,
                error: error.as_deref(),
                output: job.output.as_ref(),
            },
        )
        .await?;
    }
    advance(conn, &run).await
}

/// Cancels a running run: its open steps become `cancelled`, nothing more starts. Returns the
/// run's jobs still queued or running (locked), for the caller to cancel in this transaction.
pub async fn cancel_run(conn: &mut PgConnection, run_id: Uuid) -> Result<(RunRow, Vec<Uuid>)> {
    // Jobs first, then the run: the order a completion takes them in.
    store::lock_open_jobs(&mut *conn, run_id).await?;
    let run = store::lock_run(&mut *conn, run_id).await?;
    if run.status != RunStatus::Running {
        return Err(StorageError::WorkflowRunFinished {
            run_id,
            status: run.status.to_string(),
        });
    }
    store::cancel_open_steps(&mut *conn, run_id).await?;
    store::set_run_status(&mut *conn, run_id, RunStatus::Cancelled, run.attempt).await?;
    // A completion that committed while this transaction waited for the run may have queued
    // more jobs: take them too.
    let open = store::lock_open_jobs(&mut *conn, run_id).await?;
    let run = store::get_run(&mut *conn, run_id).await?;
    Ok((run, open))
}

/// Runs a failed or cancelled run again from where it failed: failed, cancelled and
/// failure-skipped steps go back to pending under the next attempt; succeeded steps keep
/// their outputs.
pub async fn retry_run(conn: &mut PgConnection, run_id: Uuid) -> Result<RunRow> {
    let run = store::lock_run(&mut *conn, run_id).await?;
    if !matches!(run.status, RunStatus::Failed | RunStatus::Cancelled) {
        return Err(StorageError::WorkflowRunNotRetryable {
            run_id,
            status: run.status.to_string(),
        });
    }
    let rows = store::load_steps(&mut *conn, run_id).await?;
    let targets = dag::retry_targets(&run.definition.0, &views(&rows));
    let attempt = run.attempt + 1;
    store::reset_steps(&mut *conn, run_id, &targets, attempt).await?;
    store::set_run_status(&mut *conn, run_id, RunStatus::Running, attempt).await?;
    let run = RunRow {
        status: RunStatus::Running,
        attempt,
        finished_at: None,
        ..run
    };
    advance(conn, &run).await?;
    store::get_run(&mut *conn, run_id).await
}

fn views(rows: &[StepRow]) -> BTreeMap<String, StepView> {
    rows.iter()
        .map(|r| (r.step_id.clone(), StepView::new(r.status, r.skip_reason())))
        .collect()
}

/// Decides every pending step that can be decided, until none can; ends the run when every
/// step has ended. The caller holds the run's lock.
async fn advance(conn: &mut PgConnection, run: &RunRow) -> Result<()> {
    let def = &run.definition.0;
    let ancestors = dag::ancestors(def);
    let mut events: BTreeMap<Uuid, Option<Event>> = BTreeMap::new();
    loop {
        let rows = store::load_steps(&mut *conn, run.id).await?;
        let moves = dag::next_moves(def, &views(&rows));
        if moves.is_empty() {
            if let Some(outcome) = dag::run_outcome(def, &views(&rows)) {
                finish_run(conn, run, outcome, &rows).await?;
            }
            return Ok(());
        }
        for (id, verdict) in moves {
            let Some(spec) = def.steps.iter().find(|s| s.id == id) else {
                continue;
            };
            match verdict {
                Move::Skip(reason) => {
                    end(
                        conn,
                        run,
                        spec,
                        StepStatus::Skipped,
                        Some(reason),
                        None,
                        None,
                    )
                    .await?;
                }
                Move::Start => {
                    let empty = BTreeSet::new();
                    let mine = ancestors.get(&id).unwrap_or(&empty);
                    start_step(conn, run, spec, &rows, mine, &mut events).await?;
                }
            }
        }
    }
}

async fn end(
    conn: &mut PgConnection,
    run: &RunRow,
    spec: &StepSpec,
    status: StepStatus,
    skip_reason: Option<SkipReason>,
    error: Option<&str>,
    output: Option<&Value>,
) -> Result<()> {
    store::end_step(
        conn,
        run.id,
        &spec.id,
        run.attempt,
        &StepEnd {
            status,
            skip_reason,
            error,
            output,
        },
    )
    .await
}

/// The `steps` variable of expressions: each ancestor's status and output.
fn steps_var(rows: &[StepRow], only: &BTreeSet<String>) -> Value {
    Value::Object(
        rows.iter()
            .filter(|r| only.contains(&r.step_id))
            .map(|r| {
                (
                    r.step_id.clone(),
                    json!({
                        "status": r.status.as_str(),
                        "skip_reason": r.skip_reason,
                        "output": r.output.as_ref().map(|o| o.0.clone()).unwrap_or(Value::Null),
                    }),
                )
            })
            .collect(),
    )
}

/// The event a step runs, with the step's retry settings, or None if it was deleted.
async fn step_event(
    conn: &mut PgConnection,
    spec: &StepSpec,
    cache: &mut BTreeMap<Uuid, Option<Event>>,
) -> Result<Option<Event>> {
    let cached = match cache.entry(spec.event_id) {
        std::collections::btree_map::Entry::Occupied(known) => known.into_mut(),
        std::collections::btree_map::Entry::Vacant(slot) => {
            let found = match events::get_event(&mut *conn, spec.event_id).await {
                Ok(e) => Some(e),
                Err(StorageError::EventNotFound(_)) => None,
                Err(e) => return Err(e),
            };
            slot.insert(found)
        }
    };
    let Some(mut event) = cached.clone() else {
        return Ok(None);
    };
    if let Some(retry) = spec.retry {
        if let Some(n) = retry.max_attempts {
            event.spec.max_attempts = n;
        }
        if let Some(s) = retry.backoff_seconds {
            event.spec.retry_backoff_seconds = s;
        }
        if let Some(s) = retry.backoff_max_seconds {
            event.spec.retry_backoff_max_seconds = s;
        }
    }
    Ok(Some(event))
}

/// A step job's input: the run's input (an object's keys), `steps` (the outputs of the
/// step's direct needs), `item` / `index` for a `for_each` element, then the step's `input`
/// mapping (CEL strings evaluated, other values as they are).
fn job_input(
    run: &RunRow,
    spec: &StepSpec,
    rows: &[StepRow],
    steps: &Value,
    item: Option<(usize, &Value)>,
) -> std::result::Result<Value, String> {
    let mut input = match &run.input.0 {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    let parents: Map<String, Value> = spec
        .needs
        .iter()
        .map(|n| {
            let output = rows
                .iter()
                .find(|r| &r.step_id == n)
                .and_then(|r| r.output.as_ref().map(|o| o.0.clone()))
                .unwrap_or(Value::Null);
            (n.clone(), output)
        })
        .collect();
    input.insert("steps".into(), Value::Object(parents));
    let (item_value, index_value) = match item {
        Some((i, v)) => (v.clone(), json!(i)),
        None => (Value::Null, Value::Null),
    };
    if item.is_some() {
        input.insert("item".into(), item_value.clone());
        input.insert("index".into(), index_value.clone());
    }
    if let Some(mapping) = &spec.input {
        let vars = [
            ("input", &run.input.0),
            ("steps", steps),
            ("item", &item_value),
            ("index", &index_value),
        ];
        for (key, value) in mapping {
            let mapped = match value {
                Value::String(source) => {
                    expr::eval(source, &vars).map_err(|e| format!("input.{key}: {e}"))?
                }
                other => other.clone(),
            };
            input.insert(key.clone(), mapped);
        }
    }
    Ok(Value::Object(input))
}

/// Starts a step whose needs allow it: its `if`, then its job (or its first `for_each` jobs).
/// A step that cannot start (an expression fails, its event is gone) fails with the reason.
async fn start_step(
    conn: &mut PgConnection,
    run: &RunRow,
    spec: &StepSpec,
    rows: &[StepRow],
    ancestors: &BTreeSet<String>,
    events: &mut BTreeMap<Uuid, Option<Event>>,
) -> Result<()> {
    let steps = steps_var(rows, ancestors);
    let vars = [("input", &run.input.0), ("steps", &steps)];
    let failed = |reason: String| reason;
    let reason = 'start: {
        if let Some(condition) = &spec.if_ {
            match expr::eval_bool(condition, &vars) {
                Ok(true) => {}
                Ok(false) => {
                    return end(
                        conn,
                        run,
                        spec,
                        StepStatus::Skipped,
                        Some(SkipReason::Condition),
                        None,
                        None,
                    )
                    .await;
                }
                Err(e) => break 'start failed(format!("if: {e}")),
            }
        }
        let Some(event) = step_event(conn, spec, events).await? else {
            break 'start failed(format!("event {} no longer exists", spec.event_id));
        };
        let Some(source) = &spec.for_each else {
            let input = match job_input(run, spec, rows, &steps, None) {
                Ok(input) => input,
                Err(e) => break 'start e,
            };
            store::start_step(&mut *conn, run.id, &spec.id, run.attempt, None).await?;
            store::enqueue_step_job(
                conn,
                &NewStepJob {
                    event: &event,
                    input: &input,
                    run_id: run.id,
                    step_id: &spec.id,
                    item: None,
                    attempt: run.attempt,
                },
            )
            .await?;
            return Ok(());
        };
        let items = match expr::eval(source, &vars) {
            Ok(Value::Array(items)) if items.len() <= MAX_ITEMS => items,
            Ok(Value::Array(items)) => {
                break 'start format!("for_each: {} elements, at most {MAX_ITEMS}", items.len());
            }
            Ok(other) => {
                break 'start format!("for_each: must yield a list, got {}", expr::short(&other));
            }
            Err(e) => break 'start format!("for_each: {e}"),
        };
        store::start_step(&mut *conn, run.id, &spec.id, run.attempt, Some(&items)).await?;
        if items.is_empty() {
            return end(
                conn,
                run,
                spec,
                StepStatus::Succeeded,
                None,
                None,
                Some(&json!([])),
            )
            .await;
        }
        let first = spec
            .max_parallel
            .map_or(items.len(), |n| usize::try_from(n).unwrap_or(1).max(1))
            .min(items.len());
        for (index, item) in items.iter().enumerate().take(first) {
            if let Err(e) = launch_item(conn, run, spec, &event, rows, &steps, index, item).await? {
                break 'start e;
            }
        }
        store::set_next_item(&mut *conn, run.id, &spec.id, first as i32).await?;
        return Ok(());
    };
    end(
        conn,
        run,
        spec,
        StepStatus::Failed,
        None,
        Some(&reason),
        None,
    )
    .await
}

/// Queues one element of a `for_each` step; the inner error is a mapping that failed.
#[allow(clippy::too_many_arguments)]
async fn launch_item(
    conn: &mut PgConnection,
    run: &RunRow,
    spec: &StepSpec,
    event: &Event,
    rows: &[StepRow],
    steps: &Value,
    index: usize,
    item: &Value,
) -> Result<std::result::Result<(), String>> {
    let input = match job_input(run, spec, rows, steps, Some((index, item))) {
        Ok(input) => input,
        Err(e) => return Ok(Err(format!("item {index}: {e}"))),
    };
    store::enqueue_step_job(
        conn,
        &NewStepJob {
            event,
            input: &input,
            run_id: run.id,
            step_id: &spec.id,
            item: Some(index as i32),
            attempt: run.attempt,
        },
    )
    .await?;
    Ok(Ok(()))
}

/// One of a `for_each` step's jobs ended: start the next elements within `max_parallel`
/// (none after a failure without `continue_on_error`), and end the step when its last job
/// has. The caller holds the run's lock, and this job's end is written in its transaction,
/// so the counts below are exact.
async fn for_each_progress(
    conn: &mut PgConnection,
    run: &RunRow,
    spec: &StepSpec,
    step: &StepRow,
) -> Result<()> {
    let items: &[Value] = step.items.as_ref().map(|j| j.0.as_slice()).unwrap_or(&[]);
    let n = items.len();
    let counts = store::item_counts(&mut *conn, run.id, &spec.id, step.attempt).await?;
    let stop = counts.failed > 0 && !spec.continue_on_error;
    let limit = spec
        .max_parallel
        .map_or(usize::MAX, |p| usize::try_from(p).unwrap_or(1).max(1));
    let mut active = usize::try_from(counts.active).unwrap_or(0);
    let mut next = usize::try_from(step.next_item).unwrap_or(0);
    if !stop && next < n && active < limit {
        let rows = store::load_steps(&mut *conn, run.id).await?;
        let ancestors = dag::ancestors(&run.definition.0);
        let empty = BTreeSet::new();
        let steps = steps_var(&rows, ancestors.get(&spec.id).unwrap_or(&empty));
        let mut cache = BTreeMap::new();
        let Some(event) = step_event(conn, spec, &mut cache).await? else {
            let reason = format!("event {} no longer exists", spec.event_id);
            return end_for_each(conn, run, spec, step, n, counts.failed, Some(reason)).await;
        };
        while next < n && active < limit {
            if let Err(e) =
                launch_item(conn, run, spec, &event, &rows, &steps, next, &items[next]).await?
            {
                return end_for_each(conn, run, spec, step, n, counts.failed, Some(e)).await;
            }
            next += 1;
            active += 1;
        }
        store::set_next_item(&mut *conn, run.id, &spec.id, next as i32).await?;
    }
    if active == 0 && (next >= n || stop) {
        let not_started = (next < n).then(|| format!("{} not started", n - next));
        return end_for_each(conn, run, spec, step, n, counts.failed, not_started).await;
    }
    Ok(())
}

/// Ends a `for_each` step: its output is the list of its jobs' outputs (null for failed ones).
async fn end_for_each(
    conn: &mut PgConnection,
    run: &RunRow,
    spec: &StepSpec,
    step: &StepRow,
    n: usize,
    failed_items: i64,
    note: Option<String>,
) -> Result<()> {
    let mut outputs = vec![Value::Null; n];
    for (index, output) in store::item_outputs(&mut *conn, run.id, &spec.id, step.attempt).await? {
        if let (Ok(i), Some(output)) = (usize::try_from(index), output)
            && i < n
        {
            outputs[i] = output;
        }
    }
    let failed = failed_items > 0 || note.as_ref().is_some_and(|n| !n.ends_with("not started"));
    let error = failed.then(|| {
        let mut text = format!("{failed_items} of {n} items failed");
        if let Some(note) = &note {
            text.push_str("; ");
            text.push_str(note);
        }
        text
    });
    store::end_step(
        conn,
        run.id,
        &spec.id,
        step.attempt,
        &StepEnd {
            status: if failed {
                StepStatus::Failed
            } else {
                StepStatus::Succeeded
            },
            skip_reason: None,
            error: error.as_deref(),
            output: Some(&Value::Array(outputs)),
        },
    )
    .await
}

/// Every step ended: record the run's outcome, and queue its `on_failure` event if it failed.
async fn finish_run(
    conn: &mut PgConnection,
    run: &RunRow,
    outcome: RunStatus,
    rows: &[StepRow],
) -> Result<()> {
    store::set_run_status(&mut *conn, run.id, outcome, run.attempt).await?;
    let def: &NewWorkflow = &run.definition.0;
    let Some(on_failure) = def
        .on_failure
        .as_ref()
        .filter(|_| outcome == RunStatus::Failed)
    else {
        return Ok(());
    };
    let event = match events::get_event(&mut *conn, on_failure.event_id).await {
        Ok(e) => e,
        Err(StorageError::EventNotFound(id)) => {
            tracing::warn!(workflow_run.id = %run.id, event.id = %id, "on_failure event no longer exists");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| matches!(r.status, StepStatus::Failed | StepStatus::Cancelled))
        .map(|r| r.step_id.as_str())
        .collect();
    let steps: Map<String, Value> = rows
        .iter()
        .map(|r| {
            (
                r.step_id.clone(),
                json!({"status": r.status.as_str(), "skip_reason": r.skip_reason, "error": r.error}),
            )
        })
        .collect();
    let input = json!({
        "workflow_run_id": run.id,
        "workflow_id": run.workflow_id,
        "workflow_name": run.workflow_name,
        "status": outcome.as_str(),
        "attempt": run.attempt,
        "input": run.input.0,
        "failed_steps": failed,
        "steps": steps,
    });
    let job_id = store::enqueue_step_job(
        conn,
        &NewStepJob {
            event: &event,
            input: &input,
            run_id: run.id,
            step_id: ON_FAILURE_STEP,
            item: None,
            attempt: run.attempt,
        },
    )
    .await?;
    store::set_on_failure_job(&mut *conn, run.id, job_id).await
}
