//! `/api/v1/events`: define events and run them.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::extract::{JsonBody, page_limit, parse_uuid};
use super::{Page, audit};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::model::{Event, EventPatch, NewEvent, Role, RunRequest};
use crate::storage::audit::AuditEntry;
use crate::storage::{StorageError, events, queue};

#[utoipa::path(post, path = "/api/v1/events", tag = "events", request_body = NewEvent,
    responses((status = 201, body = Event), (status = 422, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_event(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(mut spec): JsonBody<NewEvent>,
) -> Result<(StatusCode, axum::Json<Event>), ApiError> {
    caller.require(Role::Admin)?;
    spec.validate()?;
    let mut tx = state.pool.begin().await?;
    check_server(&mut *tx, &spec).await?;
    let event = events::insert_event(&mut *tx, &spec).await?;
    audit(
        &mut *tx,
        &caller,
        "event.create",
        "event",
        event.id,
        json!({"name": event.spec.name}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(event)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListEventsQuery {
    /// Page size, 1-500 (default 100).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(ListEventsQuery),
    responses((status = 200, body = Page<Event>)))]
pub async fn list_events(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListEventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Page<Event>>, ApiError> {
    caller.require(Role::Viewer)?;
    let Query(q) = query.map_err(super::jobs::query_error)?;
    let limit = page_limit(q.limit.as_deref(), 100, 500)?;
    let items = events::list_events(&state.pool, q.cursor.as_deref(), limit).await?;
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last().map(|e| e.spec.name.clone()))
        .flatten();
    let items = items
        .into_iter()
        .map(|e| crate::redact::event(caller.role, e))
        .collect();
    Ok(axum::Json(Page { items, next_cursor }))
}

#[utoipa::path(get, path = "/api/v1/events/{id}", tag = "events", params(("id" = Uuid, Path)),
    responses((status = 200, body = Event), (status = 404, body = ErrorBody)))]
pub async fn get_event(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Event>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = parse_uuid("id", &id)?;
    let event = events::get_event(&state.pool, id).await?;
    Ok(axum::Json(crate::redact::event(caller.role, event)))
}

#[utoipa::path(patch, path = "/api/v1/events/{id}", tag = "events", params(("id" = Uuid, Path)),
    request_body = EventPatch,
    responses((status = 200, body = Event), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn patch_event(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<EventPatch>,
) -> Result<axum::Json<Event>, ApiError> {
    caller.require(Role::Admin)?;
    let id = parse_uuid("id", &id)?;
    let mut tx = state.pool.begin().await?;
    let current = events::get_event(&mut *tx, id).await?;
    let mut spec = merge_patch(&current.spec, patch)?;
    spec.validate()?;
    check_server(&mut *tx, &spec).await?;
    let event = events::update_event(&mut *tx, id, &spec).await?;
    audit(
        &mut *tx,
        &caller,
        "event.update",
        "event",
        id,
        json!({"name": event.spec.name}),
    )
    .await?;
    tx.commit().await?;
    state.events.forget(id);
    Ok(axum::Json(event))
}

/// An ssh event must name a registered server.
async fn check_server(db: impl sqlx::PgExecutor<'_>, spec: &NewEvent) -> Result<(), ApiError> {
    if let Some(server_id) = spec.server_id
        && !crate::storage::servers::server_exists(db, server_id).await?
    {
        return Err(crate::model::FieldError::new(
            "server_id",
            format!("no server {server_id} is registered (POST /api/v1/servers first)"),
        )
        .into());
    }
    Ok(())
}

/// Applies a JSON merge patch to an event definition and parses the result, so a patch is
/// checked exactly like a new event. `executor` is re-derived unless the patch sets it.
fn merge_patch(current: &NewEvent, patch: EventPatch) -> Result<NewEvent, ApiError> {
    let mut merged = serde_json::to_value(current).map_err(|e| ApiError::BadBody {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        message: e.to_string(),
        field: None,
    })?;
    let obj = merged
        .as_object_mut()
        .expect("an event serializes to an object");
    if patch.0.contains_key("server_id") && !patch.0.contains_key("executor") {
        obj.remove("executor");
    }
    for (key, value) in patch.0 {
        if value.is_null() {
            obj.remove(&key);
        } else {
            obj.insert(key, value);
        }
    }
    super::extract::parse_json(merged.to_string().as_bytes())
}

#[utoipa::path(delete, path = "/api/v1/events/{id}", tag = "events", params(("id" = Uuid, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_event(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    let id = parse_uuid("id", &id)?;
    let mut tx = state.pool.begin().await?;
    events::delete_event(&mut *tx, id).await?;
    audit(&mut *tx, &caller, "event.delete", "event", id, json!({})).await?;
    tx.commit().await?;
    state.events.forget(id);
    Ok(StatusCode::NO_CONTENT)
}

/// The answer to a run request.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunAccepted {
    pub job_id: Uuid,
    /// False when the idempotency key matched an earlier run (that job is returned).
    pub created: bool,
}

#[utoipa::path(post, path = "/api/v1/events/{id}/run", tag = "events", params(("id" = Uuid, Path),
        ("traceparent" = Option<String>, Header, description = "W3C trace context: the job's trace becomes a child of it (an invalid value is ignored)")),
    request_body(content = Option<RunRequest>, description = "optional"),
    responses((status = 202, body = RunAccepted), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "event_changed: the event changed twice while the run was being queued; try again"),
        (status = 422, body = ErrorBody)))]
pub async fn run_event(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    JsonBody(request): JsonBody<Option<RunRequest>>,
) -> Result<(StatusCode, axum::Json<RunAccepted>), ApiError> {
    caller.require(Role::Operator)?;
    let id = parse_uuid("id", &id)?;
    let mut request = request.unwrap_or_default();
    request.validate()?;
    let (span, trace_context) = super::trace::enqueue_span(&headers);
    span.record("event.id", tracing::field::display(id));
    // Usually one statement: the event comes from this replica's cache, and the job and its
    // audit row are inserted together, only if the event is still at the cached revision.
    // Otherwise the event is read again and the insert retried once.
    let mut event = state.events.get(&state.pool, id).await?;
    // The insert does not notify: this guard announces the run when the handler ends, also
    // if the request is dropped while the insert is in flight (it may have committed).
    let mut announce = Announce {
        state: &state,
        later: request.run_at.is_some(),
        armed: true,
    };
    let mut input = request.input.take().unwrap_or_else(|| json!({}));
    if crate::admission::needed(&event) {
        // `skip` and `cancel_previous` decide under the group's lock, in a transaction (the
        // row trigger notifies the dispatchers on commit).
        announce.armed = false;
        let enqueued =
            run_admitted(&state, &caller, id, request, input, trace_context.clone()).await?;
        span.record("job.id", tracing::field::display(enqueued.job_id));
        if enqueued.created {
            crate::metrics::job_enqueued();
        }
        return Ok((StatusCode::ACCEPTED, axum::Json(enqueued)));
    }
    let mut second_try = false;
    let enqueued = loop {
        let job = queue::NewJob {
            event: &event,
            input,
            priority: request.priority.unwrap_or(event.spec.priority),
            run_at: request.run_at,
            idempotency_key: request.idempotency_key.as_deref(),
            parent: None,
            created_by: Some(caller.token_id),
            trace_context: trace_context.clone(),
        };
        let entry = AuditEntry {
            token_id: Some(caller.token_id),
            actor: &caller.name,
            action: "event.run",
            target_type: "job",
            target_id: None,
            detail: json!({"event_id": id}),
        };
        match queue::enqueue_audited(&state.pool, &job, &entry).await {
            Err(StorageError::EventChanged(_) | StorageError::EventNotFound(_)) if !second_try => {
                second_try = true;
                input = job.input;
                // Replaces the stale entry (or forgets it if the event is gone).
                event = state.events.load(&state.pool, id).await?;
            }
            Err(e) => {
                // A database error may have hit the commit itself: announce then, to be sure.
                announce.armed = matches!(e, StorageError::Database(_));
                return Err(e.into());
            }
            Ok(done) => break done,
        }
    };
    // A repeat of an idempotent run queued nothing new.
    announce.armed = enqueued.created;
    span.record("job.id", tracing::field::display(enqueued.job_id));
    if enqueued.created {
        crate::metrics::job_enqueued();
    }
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(RunAccepted {
            job_id: enqueued.job_id,
            created: enqueued.created,
        }),
    ))
}

/// A run of an event whose concurrency strategy decides at enqueue (`skip`,
/// `cancel_previous`): the job, its audit row and the admission in one transaction, from the
/// event as it is now.
async fn run_admitted(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    request: RunRequest,
    input: serde_json::Value,
    trace_context: Option<String>,
) -> Result<RunAccepted, ApiError> {
    let mut tx = state.pool.begin().await?;
    let event = events::get_event(&mut *tx, id).await?;
    let job = queue::NewJob {
        event: &event,
        input,
        priority: request.priority.unwrap_or(event.spec.priority),
        run_at: request.run_at,
        idempotency_key: request.idempotency_key.as_deref(),
        parent: None,
        created_by: Some(caller.token_id),
        trace_context,
    };
    let enqueued = queue::enqueue(&mut *tx, &job).await?;
    if enqueued.created {
        crate::admission::admit(
            &mut tx,
            &state.vault,
            state.config.chain_depth_limit,
            enqueued.job_id,
        )
        .await?;
        crate::storage::audit::record(
            &mut *tx,
            &AuditEntry {
                token_id: Some(caller.token_id),
                actor: &caller.name,
                action: "event.run",
                target_type: "job",
                target_id: Some(enqueued.job_id.to_string()),
                detail: json!({"event_id": id}),
            },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(RunAccepted {
        job_id: enqueued.job_id,
        created: enqueued.created,
    })
}

/// Announces a run queued through the REST API when dropped (see [`crate::announce`]): wakes
/// this replica's dispatcher and tells the others. An announcement of a run that did not
/// commit only costs a dispatch pass.
struct Announce<'a> {
    state: &'a AppState,
    /// Any `run_at` counts as later: whether it is due is the database clock's call.
    later: bool,
    armed: bool,
}

impl Drop for Announce<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if self.later {
            self.state.dispatcher.wake_for_later();
        } else {
            self.state.dispatcher.wake();
        }
        self.state.announcer.queued(self.later);
    }
}
