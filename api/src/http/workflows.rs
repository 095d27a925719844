//! `/api/v1/workflows` and `/api/v1/workflow-runs`: define DAGs of steps, run, watch, cancel
//! and retry them. The rules live in `crate::workflow`; these handlers authenticate, validate,
//! call the engine in one transaction and audit.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

use super::extract::{JsonBody, JsonOrYamlBody, page_limit, parse_param, parse_uuid};
use super::jobs::query_error;
use super::{Page, audit};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::model::workflow::{
    NewWorkflow, RunFilter, RunStarted, RunStatus, RunWorkflowRequest, Workflow, WorkflowRun,
    WorkflowStep,
};
use crate::model::{FieldError, Role};
use crate::storage::workflows::{self as store, RunRow};
use crate::storage::{StorageError, events, queue};
use crate::workflow::{engine, validate};

#[utoipa::path(post, path = "/api/v1/workflows", tag = "workflows",
    request_body(description = "JSON, or YAML with `Content-Type: application/yaml`",
        content((NewWorkflow = "application/json"), (NewWorkflow = "application/yaml"))),
    responses((status = 201, body = Workflow),
        (status = 422, body = ErrorBody, description = "a field is invalid, named in `field` (`steps[2].if`): unknown step, cycle, expression that does not compile or names a step that is not an ancestor, unknown event"),
        (status = 409, body = ErrorBody, description = "the name is taken")))]
pub async fn create_workflow(
    State(state): State<AppState>,
    caller: Caller,
    JsonOrYamlBody(spec): JsonOrYamlBody<NewWorkflow>,
) -> Result<(StatusCode, axum::Json<Workflow>), ApiError> {
    caller.require(Role::Admin)?;
    validate::validate(&spec)?;
    let mut tx = state.pool.begin().await?;
    check_events(&mut tx, &spec).await?;
    let workflow = store::insert_workflow(&mut *tx, &spec).await?;
    audit(
        &mut *tx,
        &caller,
        "workflow.create",
        "workflow",
        workflow.id,
        json!({"name": workflow.spec.name}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(workflow)))
}

/// Every event a definition names must exist (422 naming the field otherwise).
async fn check_events(conn: &mut sqlx::PgConnection, spec: &NewWorkflow) -> Result<(), ApiError> {
    let named = spec
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("steps[{i}].event_id"), s.event_id))
        .chain(
            spec.on_failure
                .iter()
                .map(|f| ("on_failure.event_id".to_owned(), f.event_id)),
        );
    let mut known = std::collections::BTreeSet::new();
    for (field, id) in named {
        if known.contains(&id) {
            continue;
        }
        match events::get_event(&mut *conn, id).await {
            Ok(_) => {
                known.insert(id);
            }
            Err(StorageError::EventNotFound(_)) => {
                return Err(FieldError::new(field, format!("event {id} does not exist")).into());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListWorkflowsQuery {
    /// Page size, 1-500 (default 100).
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

impl ListWorkflowsQuery {
    /// The first page of `limit` (the dashboard's list).
    pub fn first(limit: Option<&str>) -> Self {
        Self {
            limit: limit.map(str::to_owned),
            cursor: None,
        }
    }
}

#[utoipa::path(get, path = "/api/v1/workflows", tag = "workflows", params(ListWorkflowsQuery),
    responses((status = 200, body = Page<Workflow>), (status = 422, body = ErrorBody)))]
pub async fn list_workflows(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListWorkflowsQuery>, QueryRejection>,
) -> Result<axum::Json<Page<Workflow>>, ApiError> {
    caller.require(Role::Viewer)?;
    let Query(q) = query.map_err(query_error)?;
    let limit = page_limit(q.limit.as_deref(), 100, 500)?;
    let items = store::list_workflows(&state.pool, q.cursor.as_deref(), limit).await?;
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last().map(|w| w.spec.name.clone()))
        .flatten();
    Ok(axum::Json(Page { items, next_cursor }))
}

#[utoipa::path(get, path = "/api/v1/workflows/{id}", tag = "workflows", params(("id" = Uuid, Path)),
    responses((status = 200, body = Workflow), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn get_workflow(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Workflow>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = parse_uuid("id", &id)?;
    Ok(axum::Json(store::get_workflow(&state.pool, id).await?))
}

#[utoipa::path(delete, path = "/api/v1/workflows/{id}", tag = "workflows", params(("id" = Uuid, Path)),
    responses((status = 204, description = "deleted with its finished runs"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "a run is still running"), (status = 422, body = ErrorBody)))]
pub async fn delete_workflow(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    let id = parse_uuid("id", &id)?;
    let mut tx = state.pool.begin().await?;
    store::delete_workflow(&mut *tx, id).await?;
    audit(
        &mut *tx,
        &caller,
        "workflow.delete",
        "workflow",
        id,
        json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/workflows/{id}/run", tag = "workflows", params(("id" = Uuid, Path)),
    request_body = RunWorkflowRequest,
    responses((status = 202, body = RunStarted), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn run_workflow(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<Option<RunWorkflowRequest>>,
) -> Result<(StatusCode, axum::Json<RunStarted>), ApiError> {
    caller.require(Role::Operator)?;
    let id = parse_uuid("id", &id)?;
    let request = request.unwrap_or_default();
    let key = request.idempotency_key.as_deref();
    if let Some(key) = key
        && (key.is_empty() || key.len() > 200 || key.chars().any(char::is_control))
    {
        return Err(FieldError::new(
            "idempotency_key",
            "must be 1 to 200 characters, without control characters",
        )
        .into());
    }
    let input = request.input.unwrap_or_else(|| json!({}));
    let mut tx = state.pool.begin().await?;
    let workflow = store::get_workflow(&mut *tx, id).await?;
    let (run, created) =
        engine::start_run(&mut tx, &workflow, &input, Some(caller.token_id), key).await?;
    if created {
        audit(
            &mut *tx,
            &caller,
            "workflow.run",
            "workflow_run",
            run.id,
            json!({"workflow_id": id}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(RunStarted {
            run_id: run.id,
            created,
        }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListRunsQuery {
    workflow_id: Option<String>,
    /// running, succeeded, failed or cancelled.
    status: Option<String>,
    /// Page size, 1-500 (default 100).
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

impl ListRunsQuery {
    /// The newest `limit` runs of every workflow (the dashboard's list).
    pub fn first(limit: Option<&str>) -> Self {
        Self {
            workflow_id: None,
            status: None,
            limit: limit.map(str::to_owned),
            cursor: None,
        }
    }
}

#[utoipa::path(get, path = "/api/v1/workflow-runs", tag = "workflows", params(ListRunsQuery),
    responses((status = 200, body = Page<WorkflowRun>, description = "runs, newest first, without their steps"),
        (status = 422, body = ErrorBody)))]
pub async fn list_runs(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListRunsQuery>, QueryRejection>,
) -> Result<axum::Json<Page<WorkflowRun>>, ApiError> {
    caller.require(Role::Viewer)?;
    let Query(q) = query.map_err(query_error)?;
    let uuid = |field: &str, raw: &Option<String>| {
        raw.as_deref().map(|r| parse_uuid(field, r)).transpose()
    };
    let filter = RunFilter {
        workflow_id: uuid("workflow_id", &q.workflow_id)?,
        status: parse_param::<RunStatus>("status", q.status.as_deref())?,
        before: uuid("cursor", &q.cursor)?,
        limit: page_limit(q.limit.as_deref(), 100, 500)?,
    };
    let rows = store::list_runs(&state.pool, &filter).await?;
    let next_cursor = (rows.len() as i64 == filter.limit)
        .then(|| rows.last().map(|r| r.id.to_string()))
        .flatten();
    let items = rows.into_iter().map(|r| r.view(false)).collect();
    Ok(axum::Json(Page { items, next_cursor }))
}

/// A run with every step: status, skip reason, job ids (latest attempt), timings, output.
async fn full_view(conn: &mut sqlx::PgConnection, run: RunRow) -> Result<WorkflowRun, ApiError> {
    let rows = store::load_steps(&mut *conn, run.id).await?;
    let jobs = store::run_jobs(&mut *conn, run.id).await?;
    let needs: std::collections::BTreeMap<&str, &Vec<String>> = run
        .definition
        .0
        .steps
        .iter()
        .map(|s| (s.id.as_str(), &s.needs))
        .collect();
    let steps: Vec<WorkflowStep> = rows
        .into_iter()
        .map(|r| {
            let job_ids = jobs
                .iter()
                .filter(|(step, attempt, _)| *step == r.step_id && *attempt == r.attempt)
                .map(|(_, _, id)| *id)
                .collect();
            WorkflowStep {
                needs: needs
                    .get(r.step_id.as_str())
                    .map(|n| (*n).clone())
                    .unwrap_or_default(),
                status: r.status,
                skip_reason: r.skip_reason(),
                error: r.error.clone(),
                attempt: r.attempt,
                job_ids,
                items: r.item_count,
                output: r.output.map(|o| o.0),
                started_at: r.started_at,
                finished_at: r.finished_at,
                id: r.step_id,
            }
        })
        .collect();
    let mut view = run.view(true);
    view.steps = Some(steps);
    Ok(view)
}

#[utoipa::path(get, path = "/api/v1/workflow-runs/{id}", tag = "workflows", params(("id" = Uuid, Path)),
    responses((status = 200, body = WorkflowRun), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<WorkflowRun>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = parse_uuid("id", &id)?;
    // One snapshot for the run, its steps and its jobs.
    let mut tx = state.pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let run = store::get_run(&mut *tx, id).await?;
    let view = full_view(&mut tx, run).await?;
    tx.commit().await?;
    Ok(axum::Json(view))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CancelRunQuery {
    /// `true`: kill the running steps at once (SIGKILL) instead of SIGTERM and a grace period.
    force: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/workflow-runs/{id}/cancel", tag = "workflows",
    params(("id" = Uuid, Path), CancelRunQuery),
    responses((status = 202, body = WorkflowRun, description = "cancelled; running steps were told to stop"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the run already ended"),
        (status = 422, body = ErrorBody)))]
pub async fn cancel_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<CancelRunQuery>, QueryRejection>,
) -> Result<(StatusCode, axum::Json<WorkflowRun>), ApiError> {
    caller.require(Role::Operator)?;
    let id = parse_uuid("id", &id)?;
    let Query(q) = query.map_err(query_error)?;
    let force = parse_param::<bool>("force", q.force.as_deref())?.unwrap_or(false);
    let mut tx = state.pool.begin().await?;
    let (run, open_jobs) = engine::cancel_run(&mut tx, id).await?;
    for job_id in &open_jobs {
        match queue::request_cancel(&mut tx, *job_id, force).await {
            Ok(queue::CancelOutcome::Cancelled) => {
                // Its end fires its own actions, in the cancel's transaction.
                crate::actions::after_terminal(
                    &mut tx,
                    &state.vault,
                    state.config.chain_depth_limit,
                    *job_id,
                )
                .await?;
            }
            Ok(queue::CancelOutcome::Requested { .. }) | Err(StorageError::JobFinished { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    audit(
        &mut *tx,
        &caller,
        "workflow_run.cancel",
        "workflow_run",
        id,
        json!({"jobs": open_jobs.len(), "force": force}),
    )
    .await?;
    let view = full_view(&mut tx, run).await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, axum::Json(view)))
}

#[utoipa::path(post, path = "/api/v1/workflow-runs/{id}/retry", tag = "workflows", params(("id" = Uuid, Path)),
    responses((status = 202, body = WorkflowRun, description = "failed, cancelled and failure-skipped steps run again; succeeded steps keep their outputs"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the run is running or succeeded"),
        (status = 422, body = ErrorBody)))]
pub async fn retry_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, axum::Json<WorkflowRun>), ApiError> {
    caller.require(Role::Operator)?;
    let id = parse_uuid("id", &id)?;
    let mut tx = state.pool.begin().await?;
    let run = engine::retry_run(&mut tx, id).await?;
    audit(
        &mut *tx,
        &caller,
        "workflow_run.retry",
        "workflow_run",
        id,
        json!({"attempt": run.attempt}),
    )
    .await?;
    let view = full_view(&mut tx, run).await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, axum::Json(view)))
}
