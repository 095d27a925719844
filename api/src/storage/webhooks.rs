//! Webhook triggers: their keys are stored as SHA-256 hashes, their signing secrets sealed.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::{Result, StorageError};
use crate::model::webhook::Webhook;

const WEBHOOK_COLUMNS: &str = "id, event_id, name, key_prefix, signing_secret IS NOT NULL AS signed, \
                               headers, created_at, revoked_at";

/// A webhook to insert; `id` is chosen by the caller (the signing secret is sealed to it).
#[derive(Debug)]
pub struct NewWebhookRow<'a> {
    pub id: Uuid,
    pub event_id: Uuid,
    pub name: &'a str,
    pub key_hash: &'a [u8],
    pub key_prefix: &'a str,
    pub sealed_secret: Option<&'a [u8]>,
    pub headers: &'a [String],
    pub created_by: Option<Uuid>,
}

pub async fn insert_webhook(db: impl PgExecutor<'_>, row: &NewWebhookRow<'_>) -> Result<Webhook> {
    let sql = format!(
        "INSERT INTO webhooks (id, event_id, name, key_hash, key_prefix, signing_secret, headers, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {WEBHOOK_COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(row.id)
        .bind(row.event_id)
        .bind(row.name)
        .bind(row.key_hash)
        .bind(row.key_prefix)
        .bind(row.sealed_secret)
        .bind(row.headers)
        .bind(row.created_by)
        .fetch_one(db)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
                StorageError::EventNotFound(row.event_id)
            }
            other => other.into(),
        })
}

/// The webhooks of an event, revoked ones included, oldest first.
pub async fn list_webhooks(db: impl PgExecutor<'_>, event_id: Uuid) -> Result<Vec<Webhook>> {
    let sql = format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE event_id = $1 ORDER BY created_at, id"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(event_id)
        .fetch_all(db)
        .await?)
}

/// Revokes a webhook of an event (revoking twice is fine); its key stops working at once.
pub async fn revoke_webhook(
    db: impl PgExecutor<'_>,
    event_id: Uuid,
    webhook_id: Uuid,
) -> Result<Webhook> {
    let sql = format!(
        "UPDATE webhooks SET revoked_at = coalesce(revoked_at, now())
         WHERE id = $1 AND event_id = $2 RETURNING {WEBHOOK_COLUMNS}"
    );
    let row: Option<Webhook> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(webhook_id)
        .bind(event_id)
        .fetch_optional(db)
        .await?;
    row.ok_or(StorageError::WebhookNotFound(webhook_id))
}

/// What a delivery needs of a live webhook.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HookTarget {
    pub id: Uuid,
    pub event_id: Uuid,
    pub name: String,
    pub signing_secret: Option<Vec<u8>>,
    pub headers: Vec<String>,
}

/// The live (not revoked) webhook whose key has this hash; a revoked or unknown key is the
/// same `None`, found by the same index lookup.
pub async fn find_live_by_hash(db: impl PgExecutor<'_>, hash: &[u8]) -> Result<Option<HookTarget>> {
    Ok(sqlx::query_as(
        "SELECT id, event_id, name, signing_secret, headers FROM webhooks
         WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(hash)
    .fetch_optional(db)
    .await?)
}
