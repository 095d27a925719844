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
use crate::storage::{events, webhooks as store};
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
    JsonBody(mut new): JsonBody<NewWebhook>,
) -> Result<(StatusCode, axum::Json<WebhookCreated>), ApiError> {
    caller.require(Role::Admin)?;
    let event_id = parse_uuid("id", &id)?;
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
    events::get_event(&mut *tx, event_id).await?;
    let webhook = store::insert_webhook(
        &mut *tx,
        &store::NewWebhookRow {
            id: webhook_id,
            event_id,
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
        json!({"event_id": event_id, "name": webhook.name, "signed": webhook.signed}),
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
    caller.require(Role::Viewer)?;
    let event_id = parse_uuid("id", &id)?;
    events::get_event(&state.pool, event_id).await?;
    Ok(axum::Json(
        store::list_webhooks(&state.pool, event_id).await?,
    ))
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
    caller.require(Role::Admin)?;
    let event_id = parse_uuid("id", &id)?;
    let webhook_id = parse_uuid("webhook_id", &webhook_id)?;
    let mut tx = state.pool.begin().await?;
    let webhook = store::revoke_webhook(&mut *tx, event_id, webhook_id).await?;
    audit(
        &mut *tx,
        &caller,
        "webhook.revoke",
        "webhook",
        webhook_id,
        json!({"event_id": event_id}),
    )
    .await?;
    tx.commit().await?;
    Ok(axum::Json(webhook))
}
