//! `/api/v1/events/{id}/schedules` and `/api/v1/schedules`: run events on a schedule.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;
use uuid::Uuid;

use super::extract::{JsonBody, page_limit, parse_uuid};
use super::{Page, audit};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::model::Role;
use crate::model::schedule::{NewSchedule, Schedule, SchedulePatch};
use crate::schedule::ScheduleSpec;
use crate::storage::schedules::{self, NextSlot, ScheduleRow, Target};

/// How many upcoming fire times a schedule shows.
const NEXT_RUNS: usize = 5;

fn view(row: ScheduleRow) -> Schedule {
    let spec = row.fields();
    let (next_runs, jitter) = match ScheduleSpec::compile(&spec, row.id, row.anchor_at) {
        Ok(compiled) => {
            let runs = match row.next_fire_at {
                Some(next) => {
                    let tz = compiled.timezone();
                    let mut runs = vec![next.with_timezone(&tz).to_rfc3339()];
                    runs.extend(compiled.upcoming_rfc3339(next, NEXT_RUNS - 1));
                    runs
                }
                None => Vec::new(),
            };
            (runs, compiled.jitter().num_seconds())
        }
        Err(_) => (Vec::new(), 0),
    };
    Schedule {
        id: row.id,
        event_id: row.event_id,
        workflow_id: row.workflow_id,
        spec,
        next_fire_at: row.next_fire_at,
        next_runs,
        last_fired_at: row.last_fired_at,
        jitter_offset_seconds: jitter,
        revision: row.revision,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

fn next_slot(spec: &ScheduleSpec, fire_at: Option<DateTime<Utc>>) -> NextSlot {
    NextSlot {
        fire_at,
        due_at: fire_at.map(|t| spec.due_at(t)),
    }
}

#[utoipa::path(post, path = "/api/v1/events/{id}/schedules", tag = "schedules",
    params(("id" = Uuid, Path)), request_body = NewSchedule,
    responses((status = 201, body = Schedule), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "a field is invalid (named in `field`): cron, interval_seconds, timezone, end_at…")))]
pub async fn create_schedule(
    State(state): State<AppState>,
    caller: Caller,
    Path(event_id): Path<String>,
    JsonBody(fields): JsonBody<NewSchedule>,
) -> Result<(StatusCode, axum::Json<Schedule>), ApiError> {
    let target = Target::Event(parse_uuid("id", &event_id)?);
    create(state, caller, target, fields).await
}

#[utoipa::path(post, path = "/api/v1/workflows/{id}/schedules", tag = "schedules",
    params(("id" = Uuid, Path)), request_body = NewSchedule,
    responses((status = 201, body = Schedule, description = "each fire time starts one run of the workflow"),
        (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "a field is invalid (named in `field`): cron, interval_seconds, timezone, end_at…")))]
pub async fn create_workflow_schedule(
    State(state): State<AppState>,
    caller: Caller,
    Path(workflow_id): Path<String>,
    JsonBody(fields): JsonBody<NewSchedule>,
) -> Result<(StatusCode, axum::Json<Schedule>), ApiError> {
    let target = Target::Workflow(parse_uuid("id", &workflow_id)?);
    create(state, caller, target, fields).await
}

async fn create(
    state: AppState,
    caller: Caller,
    target: Target,
    fields: NewSchedule,
) -> Result<(StatusCode, axum::Json<Schedule>), ApiError> {
    caller.require(Role::Admin)?;
    let now = state.clock.now();
    let id = Uuid::now_v7();
    let spec = ScheduleSpec::compile(&fields, id, now)?;
    let next = next_slot(&spec, spec.next_after(now));
    let mut tx = state.pool.begin().await?;
    let row = schedules::insert_schedule(
        &mut *tx,
        id,
        target,
        &fields,
        now,
        next,
        Some(caller.token_id),
    )
    .await?;
    audit(
        &mut *tx,
        &caller,
        "schedule.create",
        "schedule",
        id,
        json!({"event_id": target.event_id(), "workflow_id": target.workflow_id()}),
    )
    .await?;
    schedules::notify_changed(&mut *tx).await?;
    tx.commit().await?;
    state.schedules_wake.notify_one();
    Ok((StatusCode::CREATED, axum::Json(view(row))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListSchedulesQuery {
    /// Only this event's schedules.
    pub event_id: Option<String>,
    /// Only this workflow's schedules.
    pub workflow_id: Option<String>,
    /// Page size, 1-500 (default 100).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/schedules", tag = "schedules", params(ListSchedulesQuery),
    responses((status = 200, body = Page<Schedule>), (status = 422, body = ErrorBody)))]
pub async fn list_schedules(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListSchedulesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Page<Schedule>>, ApiError> {
    caller.require(Role::Viewer)?;
    let Query(q) = query.map_err(super::jobs::query_error)?;
    let event_id = q
        .event_id
        .as_deref()
        .map(|r| parse_uuid("event_id", r))
        .transpose()?;
    let after = q
        .cursor
        .as_deref()
        .map(|r| parse_uuid("cursor", r))
        .transpose()?;
    let limit = page_limit(q.limit.as_deref(), 100, 500)?;
    let workflow_id = q
        .workflow_id
        .as_deref()
        .map(|r| parse_uuid("workflow_id", r))
        .transpose()?;
    let rows = schedules::list_schedules(&state.pool, event_id, workflow_id, after, limit).await?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(axum::Json(Page {
        items: rows.into_iter().map(view).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/schedules/{id}", tag = "schedules", params(("id" = Uuid, Path)),
    responses((status = 200, body = Schedule), (status = 404, body = ErrorBody)))]
pub async fn get_schedule(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Schedule>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = parse_uuid("id", &id)?;
    let row = schedules::get_schedule(&state.pool, id, false).await?;
    Ok(axum::Json(view(row)))
}

/// The first slot of an edited schedule: counted from now, except that a slot of the old
/// definition that was already due and not yet fired is not skipped (the new definition's
/// slots from that time on count), and nothing at or before the last fired slot counts again.
fn edited_next(
    spec: &ScheduleSpec,
    current: &ScheduleRow,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let mut from = now;
    if let (Some(pending), Some(due)) = (current.next_fire_at, current.next_due_at)
        && due <= now
    {
        from = pending - Duration::seconds(1);
    }
    if let Some(last) = current.last_fired_at {
        from = from.max(last);
    }
    spec.next_after(from)
}

#[utoipa::path(patch, path = "/api/v1/schedules/{id}", tag = "schedules", params(("id" = Uuid, Path)),
    request_body = SchedulePatch,
    responses((status = 200, body = Schedule), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn patch_schedule(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<SchedulePatch>,
) -> Result<axum::Json<Schedule>, ApiError> {
    caller.require(Role::Admin)?;
    let id = parse_uuid("id", &id)?;
    let mut tx = state.pool.begin().await?;
    // Locked: a firing transaction on any replica waits (or skips it) until this commits.
    let current = schedules::get_schedule(&mut *tx, id, true).await?;
    let fields = merge_patch(&current.fields(), patch)?;
    let spec = ScheduleSpec::compile(&fields, id, current.anchor_at)?;
    let now = state.clock.now();
    let next = next_slot(&spec, edited_next(&spec, &current, now));
    let row = schedules::update_schedule(&mut *tx, id, &fields, current.anchor_at, next).await?;
    audit(
        &mut *tx,
        &caller,
        "schedule.update",
        "schedule",
        id,
        json!({"event_id": row.event_id, "workflow_id": row.workflow_id}),
    )
    .await?;
    schedules::notify_changed(&mut *tx).await?;
    tx.commit().await?;
    state.schedules_wake.notify_one();
    Ok(axum::Json(view(row)))
}

/// Applies a JSON merge patch to a schedule definition; the result parses like a new one.
/// Setting `cron` drops `interval_seconds` and the reverse, unless the patch sets both.
fn merge_patch(current: &NewSchedule, patch: SchedulePatch) -> Result<NewSchedule, ApiError> {
    let mut merged = serde_json::to_value(current).map_err(|e| ApiError::BadBody {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        message: e.to_string(),
        field: None,
    })?;
    let obj = merged
        .as_object_mut()
        .expect("a schedule serializes to an object");
    for (set, other) in [("cron", "interval_seconds"), ("interval_seconds", "cron")] {
        if patch.0.get(set).is_some_and(|v| !v.is_null()) && !patch.0.contains_key(other) {
            obj.remove(other);
        }
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

#[utoipa::path(delete, path = "/api/v1/schedules/{id}", tag = "schedules", params(("id" = Uuid, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_schedule(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    let id = parse_uuid("id", &id)?;
    let mut tx = state.pool.begin().await?;
    schedules::delete_schedule(&mut *tx, id).await?;
    audit(
        &mut *tx,
        &caller,
        "schedule.delete",
        "schedule",
        id,
        json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/schedules/{id}/pause", tag = "schedules", params(("id" = Uuid, Path)),
    responses((status = 200, body = Schedule), (status = 404, body = ErrorBody)))]
pub async fn pause_schedule(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Schedule>, ApiError> {
    set_paused(state, caller, id, true).await
}

#[utoipa::path(post, path = "/api/v1/schedules/{id}/resume", tag = "schedules", params(("id" = Uuid, Path)),
    responses((status = 200, body = Schedule, description = "resumed; slots that passed while paused follow `missed`"),
        (status = 404, body = ErrorBody)))]
pub async fn resume_schedule(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Schedule>, ApiError> {
    set_paused(state, caller, id, false).await
}

async fn set_paused(
    state: AppState,
    caller: Caller,
    id: String,
    paused: bool,
) -> Result<axum::Json<Schedule>, ApiError> {
    caller.require(Role::Operator)?;
    let id = parse_uuid("id", &id)?;
    let mut tx = state.pool.begin().await?;
    if !paused {
        skip_paused_slots(&mut tx, id, state.clock.now()).await?;
    }
    let row = schedules::set_paused(&mut *tx, id, paused).await?;
    let action = if paused {
        "schedule.pause"
    } else {
        "schedule.resume"
    };
    audit(&mut *tx, &caller, action, "schedule", id, json!({})).await?;
    schedules::notify_changed(&mut *tx).await?;
    tx.commit().await?;
    state.schedules_wake.notify_one();
    Ok(axum::Json(view(row)))
}

/// On resume: slots that passed while the schedule was paused were missed (not late, however
/// recent), so `missed` alone decides which still fire. Moves the schedule's next slot
/// accordingly, under the row lock; a running schedule is left as it is.
async fn skip_paused_slots(
    tx: &mut sqlx::PgConnection,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let current = schedules::get_schedule(&mut *tx, id, true).await?;
    let Some(next) = current.next_fire_at.filter(|_| current.paused) else {
        return Ok(());
    };
    // A stored definition that no longer compiles is ended by the firing loop.
    let Ok(spec) = ScheduleSpec::compile(&current.fields(), current.id, current.anchor_at) else {
        return Ok(());
    };
    let fire_at = spec.on_resume(next, now);
    let due_at = fire_at.map(|n| spec.due_at(n));
    schedules::advance(&mut *tx, id, NextSlot { fire_at, due_at }, None).await?;
    Ok(())
}
