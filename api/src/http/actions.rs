//! `/api/v1/events/{id}/actions`: what happens when a run of the event ends.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::json;

use super::audit;
use super::extract::{JsonBody, parse_uuid};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::model::action::{Action, ActionSpec, NewAction};
use crate::model::{FieldError, Role};
use crate::storage::{StorageError, actions, events};

#[utoipa::path(post, path = "/api/v1/events/{id}/actions", tag = "actions", params(("id" = Uuid, Path)),
    request_body = NewAction,
    responses((status = 201, body = Action), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_action(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(new): JsonBody<NewAction>,
) -> Result<(StatusCode, axum::Json<Action>), ApiError> {
    caller.require(Role::Admin)?;
    let id = parse_uuid("id", &id)?;
    new.validate()?;
    let mut tx = state.pool.begin().await?;
    events::get_event(&mut *tx, id).await?;
    if let ActionSpec::RunEvent { event_id } = &new.action {
        match events::get_event(&mut *tx, *event_id).await {
            Err(StorageError::EventNotFound(_)) => {
                return Err(
                    FieldError::new("action.event_id", format!("no event {event_id}")).into(),
                );
            }
            other => {
                other?;
            }
        }
    }
    let action = actions::insert_action(&mut *tx, id, &new).await?;
    audit(
        &mut *tx,
        &caller,
        "action.create",
        "action",
        action.id,
        json!({"event_id": id}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(action)))
}

#[utoipa::path(get, path = "/api/v1/events/{id}/actions", tag = "actions", params(("id" = Uuid, Path)),
    responses((status = 200, body = Vec<Action>), (status = 404, body = ErrorBody)))]
pub async fn list_actions(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<Action>>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = parse_uuid("id", &id)?;
    events::get_event(&state.pool, id).await?;
    let actions = actions::list_actions(&state.pool, id).await?;
    Ok(axum::Json(
        actions
            .into_iter()
            .map(|a| crate::redact::action(caller.role, a))
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/api/v1/events/{id}/actions/{action_id}", tag = "actions",
    params(("id" = Uuid, Path), ("action_id" = Uuid, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_action(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, action_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    let id = parse_uuid("id", &id)?;
    let action_id = parse_uuid("action_id", &action_id)?;
    let mut tx = state.pool.begin().await?;
    if !actions::delete_action(&mut *tx, id, action_id).await? {
        return Err(ApiError::NotFound(format!(
            "event {id} has no action {action_id}"
        )));
    }
    audit(
        &mut *tx,
        &caller,
        "action.delete",
        "action",
        action_id,
        json!({"event_id": id}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
