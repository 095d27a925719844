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
pub(crate) fn query_error(rejection: QueryRejection) -> ApiError {
    let text = rejection.body_text();
    let field = text
        .split("unknown field `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or("query")
        .to_owned();
    FieldError::new(field, text).into()
}

#[derive(Debug, Default, Clone, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListJobsQuery {
    /// queued, claimed, running, succeeded, failed, timed_out or cancelled.
    pub status: Option<String>,
    pub event_id: Option<String>,
    /// All jobs of one chain.
    pub root_job_id: Option<String>,
    /// Only dead-lettered (true) or only live (false) jobs.
    pub dead: Option<String>,
    /// Only the runs fired by this schedule.
    pub schedule_id: Option<String>,
    /// Only the runs this worker took.
    pub worker_id: Option<String>,
    /// Only jobs flagged stuck (true) or only jobs not flagged (false): see the event's
    /// `stuck_after_seconds`.
    pub stuck: Option<String>,
    /// Only the jobs of this workflow run.
    pub workflow_run_id: Option<String>,
    /// Page size, 1-500 (default 100).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl ListJobsQuery {
    /// The storage filter these parameters ask for (422 naming a bad parameter).
    pub fn filter(&self, default_limit: i64) -> Result<queue::JobFilter, ApiError> {
        let uuid = |field: &str, raw: &Option<String>| {
            raw.as_deref()
                .filter(|r| !r.is_empty())
                .map(|r| parse_uuid(field, r))
                .transpose()
        };
        fn text(raw: &Option<String>) -> Option<&str> {
            raw.as_deref().filter(|r| !r.is_empty())
        }
        Ok(queue::JobFilter {
            status: parse_param::<JobStatus>("status", text(&self.status))?,
            event_id: uuid("event_id", &self.event_id)?,
            root_job_id: uuid("root_job_id", &self.root_job_id)?,
            dead: parse_param::<bool>("dead", text(&self.dead))?,
            schedule_id: uuid("schedule_id", &self.schedule_id)?,
            worker_id: uuid("worker_id", &self.worker_id)?,
            workflow_run_id: uuid("workflow_run_id", &self.workflow_run_id)?,
            stuck: parse_param::<bool>("stuck", text(&self.stuck))?,
            active: false,
            before: uuid("cursor", &self.cursor)?,
            limit: page_limit(text(&self.limit), default_limit, 500)?,
        })
    }
}

/// A page of jobs and the cursor of the next page (the last id when the page is full).
pub async fn job_page(
    db: impl sqlx::PgExecutor<'_>,
    filter: &queue::JobFilter,
) -> Result<Page<JobSummary>, ApiError> {
    let items = queue::list_jobs(db, filter).await?;
    let next_cursor = (items.len() as i64 == filter.limit)
        .then(|| items.last().map(|j| j.id.to_string()))
        .flatten();
    Ok(Page { items, next_cursor })
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
    let filter = q.filter(100)?;
    Ok(axum::Json(job_page(&state.pool, &filter).await?))
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
    pub force: Option<String>,
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
    // A rerun enters its concurrency group like any new run (`skip` may end it at once).
    crate::admission::admit(
        &mut tx,
        &state.vault,
        state.config.chain_depth_limit,
        job_id,
    )
    .await?;
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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogsTextQuery {
    /// `true`: keep ANSI escape sequences (colours) as the script wrote them.
    raw: Option<String>,
}

/// Lines read per database round trip while a log is downloaded.
const TEXT_PAGE: usize = 5000;

#[utoipa::path(get, path = "/api/v1/jobs/{id}/logs.txt", tag = "jobs", params(("id" = Uuid, Path), LogsTextQuery),
    responses((status = 200, content_type = "text/plain", body = String,
               description = "the whole log as a plain text file (ANSI escape sequences removed unless raw=true), streamed"),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn get_logs_text(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<LogsTextQuery>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    caller.require(Role::Viewer)?;
    let id = parse_uuid("id", &id)?;
    let Query(q) = query.map_err(query_error)?;
    let raw = parse_param::<bool>("raw", q.raw.as_deref())?.unwrap_or(false);
    queue::job_status(&state.pool, id).await?;
    // Page by page, so a 16 MiB log is never held whole.
    let pool = state.pool.clone();
    let body = futures::stream::unfold(Some(0i64), move |after| {
        let pool = pool.clone();
        async move {
            let after = after?;
            match logs::lines_after(&pool, id, after, TEXT_PAGE).await {
                Ok(lines) if lines.is_empty() => None,
                Ok(lines) => {
                    let next =
                        (lines.len() == TEXT_PAGE).then(|| lines.last().map_or(after, |l| l.seq));
                    let mut text = String::new();
                    for line in &lines {
                        if raw {
                            text.push_str(&line.text);
                        } else {
                            text.push_str(&crate::dashboard::ansi::strip(&line.text));
                        }
                        text.push('\n');
                    }
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(text)), next))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_owned(),
            ),
            (
                axum::http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"baton-job-{id}.log.txt\""),
            ),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}
