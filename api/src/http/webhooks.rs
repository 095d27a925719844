//! `/api/v1/events/{id}/webhooks`: webhook triggers of an event (create, list, revoke).
//! Deliveries arrive at `/hooks/{key}` (see `hooks.rs`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::json;
use uuid::Uuid;

use super::audit;
use super::extract::{JsonBody, parse_uuid};
use crate::AppState;
use crate::auth::{Caller, hash_token};
use crate::error::{ApiError, ErrorBody};
use crate::model::Role;
use crate::model::webhook::{NewWebhook, Webhook, WebhookCreated};
use crate::storage::{Target, events, webhooks as store, workflows};
use crate::webhooks::{generate_key, secret_identity};

#[utoipa::path(post, path = "/api/v1/events/{id}/webhooks", tag = "webhooks", params(("id" = Uuid, Path)),
    request_body = NewWebhook,
    responses((status = 201, body = WebhookCreated, description = "the key (and so the URL) is shown this once"),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "a signing secret needs BATON_MASTER_KEY")))]
pub async fn create_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(new): JsonBody<NewWebhook>,
) -> Result<(StatusCode, axum::Json<WebhookCreated>), ApiError> {
    let target = Target::Event(parse_uuid("id", &id)?);
    create(state, caller, target, new).await
}

#[utoipa::path(post, path = "/api/v1/workflows/{id}/webhooks", tag = "webhooks", params(("id" = Uuid, Path)),
    request_body = NewWebhook,
    responses((status = 201, body = WebhookCreated, description = "the key (and so the URL) is shown this once; each delivery starts a run of the workflow"),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "a signing secret needs BATON_MASTER_KEY")))]
pub async fn create_workflow_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(new): JsonBody<NewWebhook>,
) -> Result<(StatusCode, axum::Json<WebhookCreated>), ApiError> {
    let target = Target::Workflow(parse_uuid("id", &id)?);
    create(state, caller, target, new).await
}

/// 404 unless the event or workflow exists.
async fn check_target(db: impl sqlx::PgExecutor<'_>, target: Target) -> Result<(), ApiError> {
    match target {
        Target::Event(id) => events::get_event(db, id).await.map(|_| ()),
        Target::Workflow(id) => workflows::get_workflow(db, id).await.map(|_| ()),
    }
    .map_err(ApiError::from)
}

async fn create(
    state: AppState,
    caller: Caller,
    target: Target,
    mut new: NewWebhook,
) -> Result<(StatusCode, axum::Json<WebhookCreated>), ApiError> {
    caller.require(Role::Admin)?;
    new.validate()?;
    let webhook_id = Uuid::now_v7();
    let sealed = new
        .signing_secret
        .as_deref()
        .map(|secret| {
            state
                .vault
                .seal(secret.as_bytes(), secret_identity(webhook_id).as_bytes())
        })
        .transpose()?;
    let key = generate_key();
    let headers = new.headers.unwrap_or_default();
    let mut tx = state.pool.begin().await?;
    check_target(&mut *tx, target).await?;
    let webhook = store::insert_webhook(
        &mut *tx,
        &store::NewWebhookRow {
            id: webhook_id,
            target,
            name: new.name.trim(),
            key_hash: &hash_token(&key),
            key_prefix: &key[..8],
            sealed_secret: sealed.as_deref(),
            headers: &headers,
            created_by: Some(caller.token_id),
        },
    )
    .await?;
    audit(
        &mut *tx,
        &caller,
        "webhook.create",
        "webhook",
        webhook.id,
        json!({"event_id": target.event_id(), "workflow_id": target.workflow_id(),
               "name": webhook.name, "signed": webhook.signed}),
    )
    .await?;
    tx.commit().await?;
    let url = format!("/hooks/{key}");
    Ok((
        StatusCode::CREATED,
        axum::Json(WebhookCreated { webhook, key, url }),
    ))
}

#[utoipa::path(get, path = "/api/v1/events/{id}/webhooks", tag = "webhooks", params(("id" = Uuid, Path)),
    responses((status = 200, body = Vec<Webhook>, description = "the event's webhooks, revoked ones included (never keys or secrets)"),
              (status = 404, body = ErrorBody)))]
pub async fn list_webhooks(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<Webhook>>, ApiError> {
    let target = Target::Event(parse_uuid("id", &id)?);
    list(state, caller, target).await
}

#[utoipa::path(get, path = "/api/v1/workflows/{id}/webhooks", tag = "webhooks", params(("id" = Uuid, Path)),
    responses((status = 200, body = Vec<Webhook>, description = "the workflow's webhooks, revoked ones included (never keys or secrets)"),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn list_workflow_webhooks(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<Webhook>>, ApiError> {
    let target = Target::Workflow(parse_uuid("id", &id)?);
    list(state, caller, target).await
}

async fn list(
    state: AppState,
    caller: Caller,
    target: Target,
) -> Result<axum::Json<Vec<Webhook>>, ApiError> {
    caller.require(Role::Viewer)?;
    check_target(&state.pool, target).await?;
    Ok(axum::Json(store::list_webhooks(&state.pool, target).await?))
}

#[utoipa::path(delete, path = "/api/v1/events/{id}/webhooks/{webhook_id}", tag = "webhooks",
    params(("id" = Uuid, Path), ("webhook_id" = Uuid, Path)),
    responses((status = 200, body = Webhook, description = "revoked: its key no longer starts runs"),
              (status = 404, body = ErrorBody)))]
pub async fn revoke_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, webhook_id)): Path<(String, String)>,
) -> Result<axum::Json<Webhook>, ApiError> {
    let target = Target::Event(parse_uuid("id", &id)?);
    revoke(state, caller, target, &webhook_id).await
}

#[utoipa::path(delete, path = "/api/v1/workflows/{id}/webhooks/{webhook_id}", tag = "webhooks",
    params(("id" = Uuid, Path), ("webhook_id" = Uuid, Path)),
    responses((status = 200, body = Webhook, description = "revoked: its key no longer starts runs"),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn revoke_workflow_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, webhook_id)): Path<(String, String)>,
) -> Result<axum::Json<Webhook>, ApiError> {
    let target = Target::Workflow(parse_uuid("id", &id)?);
    revoke(state, caller, target, &webhook_id).await
}

async fn revoke(
    state: AppState,
    caller: Caller,
    target: Target,
    webhook_id: &str,
) -> Result<axum::Json<Webhook>, ApiError> {
    caller.require(Role::Admin)?;
    let webhook_id = parse_uuid("webhook_id", webhook_id)?;
    let mut tx = state.pool.begin().await?;
    let webhook = store::revoke_webhook(&mut *tx, target, webhook_id).await?;
    audit(
        &mut *tx,
        &caller,
        "webhook.revoke",
        "webhook",
        webhook_id,
        json!({"event_id": target.event_id(), "workflow_id": target.workflow_id()}),
    )
    .await?;
    tx.commit().await?;
    Ok(axum::Json(webhook))
}
