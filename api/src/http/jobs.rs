//! `/api/v1/jobs`: the queue and its history, cancellation, logs.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::extract::{page_limit, parse_param, parse_uuid, seq_cursor};
use super::{Page, audit};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::model::{FieldError, Job, JobStatus, JobSummary, LogPage, Role};
use crate::storage::{logs, queue};

/// A query string that does not parse: name the parameter when serde does.
pub(super) fn query_error(rejection: QueryRejection) -> ApiError {
    let text = rejection.body_text();
    let field = text
        .split("unknown field `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or("query")
        .to_owned();
    FieldError::new(field, text).into()
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListJobsQuery {
    /// queued, claimed, running, succeeded, failed, timed_out or cancelled.
    status: Option<String>,
    event_id: Option<String>,
    /// All jobs of one chain.
    root_job_id: Option<String>,
    /// Only dead-lettered (true) or only live (false) jobs.
    dead: Option<String>,
    /// Only the runs fired by this schedule.
    schedule_id: Option<String>,
    /// Page size, 1-500 (default 100).
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(ListJobsQuery),
    responses((status = 200, body = Page<JobSummary>, description = "jobs without their input and output (get one job for those)"),
              (status = 422, body = ErrorBody)))]
pub async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListJobsQuery>, QueryRejection>,
) -> Result<axum::Json<Page<JobSummary>>, ApiError> {
    caller.require(Role::Viewer)?;
    let Query(q) = query.map_err(query_error)?;
    let uuid = |field: &str, raw: &Option<String>| {
        raw.as_deref().map(|r| parse_uuid(field, r)).transpose()
    };
    let filter = queue::JobFilter {
        status: parse_param::<JobStatus>("status", q.status.as_deref())?,
        event_id: uuid("event_id", &q.event_id)?,
        root_job_id: uuid("root_job_id", &q.root_job_id)?,
        dead: parse_param::<bool>("dead", q.dead.as_deref())?,
        schedule_id: uuid("schedule_id", &q.schedule_id)?,
        before: uuid("cursor", &q.cursor)?,
        limit: page_limit(q.limit.as_deref(), 100, 500)?,
    };
    let items = queue::list_jobs(&state.pool, &filter).await?;
    let next_cursor = (items.len() as i64 == filter.limit)
        .then(|| items.last().map(|j| j.id.to_string()))
        .flatten();
    Ok(axum::Json(Page { items, next_cursor }))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
pub async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Job>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = parse_uuid("id", &id)?;
    Ok(axum::Json(queue::get_job(&state.pool, id).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CancelQuery {
    /// `true`: kill the run at once (SIGKILL to its process tree) instead of SIGTERM and a
    /// grace period; also cuts short the grace of an earlier cancel.
    force: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = Uuid, Path), CancelQuery),
    responses((status = 202, body = Job, description = "cancelled, or the worker was told to stop it"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "already finished")))]
pub async fn cancel_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<CancelQuery>, QueryRejection>,
) -> Result<(axum::http::StatusCode, axum::Json<Job>), ApiError> {
    caller.require(Role::Operator)?;
    let id = parse_uuid("id", &id)?;
    let Query(q) = query.map_err(query_error)?;
    let force = parse_param::<bool>("force", q.force.as_deref())?.unwrap_or(false);
    let mut tx = state.pool.begin().await?;
    let outcome = queue::request_cancel(&mut tx, id, force).await?;
    let immediate = outcome == queue::CancelOutcome::Cancelled;
    if immediate {
        // Its end fires its actions, in the cancel's transaction.
        crate::actions::after_terminal(&mut tx, &state.vault, state.config.chain_depth_limit, id)
            .await?;
    }
    audit(
        &mut *tx,
        &caller,
        "job.cancel",
        "job",
        id,
        json!({"immediate": immediate, "force": force}),
    )
    .await?;
    let job = queue::get_job(&mut *tx, id).await?;
    tx.commit().await?;
    if immediate {
        crate::metrics::job_finished("cancelled");
    }
    Ok((axum::http::StatusCode::ACCEPTED, axum::Json(job)))
}

/// The answer to a rerun.
#[derive(Debug, Serialize, ToSchema)]
pub struct RerunAccepted {
    /// The new job (its `rerun_of` is the job rerun).
    pub job_id: Uuid,
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/rerun", tag = "jobs", params(("id" = Uuid, Path),
        ("traceparent" = Option<String>, Header, description = "W3C trace context: the new job's trace becomes a child of it (an invalid value is ignored)")),
    responses((status = 202, body = RerunAccepted, description = "a new job with the same event snapshot and input was queued"),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "job_not_finished: the job is still queued or running")))]
pub async fn rerun_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<(axum::http::StatusCode, axum::Json<RerunAccepted>), ApiError> {
    caller.require(Role::Operator)?;
    let id = parse_uuid("id", &id)?;
    let (span, trace_context) = super::trace::enqueue_span(&headers);
    let mut tx = state.pool.begin().await?;
    let job_id = queue::rerun(&mut tx, id, Some(caller.token_id), trace_context.as_deref()).await?;
    audit(
        &mut *tx,
        &caller,
        "job.rerun",
        "job",
        job_id,
        json!({"rerun_of": id}),
    )
    .await?;
    tx.commit().await?;
    span.record("job.id", tracing::field::display(job_id));
    crate::metrics::job_enqueued();
    Ok((
        axum::http::StatusCode::ACCEPTED,
        axum::Json(RerunAccepted { job_id }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Return lines with a sequence number greater than this (default 0).
    after: Option<String>,
    /// At most this many lines, 1-10000 (default 1000).
    limit: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}/logs", tag = "jobs", params(("id" = Uuid, Path), LogsQuery),
    responses((status = 200, body = LogPage), (status = 404, body = ErrorBody)))]
pub async fn get_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<axum::Json<LogPage>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = parse_uuid("id", &id)?;
    let Query(q) = query.map_err(query_error)?;
    let after = seq_cursor(
        "after",
        parse_param::<i64>("after", q.after.as_deref())?.unwrap_or(0),
    )?;
    let limit = page_limit(q.limit.as_deref(), 1000, 10_000)?;
    // Read the status first: if it is terminal, every line was stored before it was set.
    let status = queue::job_status(&state.pool, id).await?;
    let lines = logs::lines_after(&state.pool, id, after, limit as usize).await?;
    let next = lines.last().map_or(after, |l| l.seq);
    let done = status.is_terminal() && (lines.len() as i64) < limit;
    Ok(axum::Json(LogPage { lines, next, done }))
}
