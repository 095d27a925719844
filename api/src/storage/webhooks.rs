//! Webhook triggers: their keys are stored as SHA-256 hashes, their signing secrets sealed.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::{Result, StorageError, Target};
use crate::model::webhook::Webhook;

const WEBHOOK_COLUMNS: &str = "id, event_id, workflow_id, name, key_prefix, signing_secret IS NOT NULL AS signed, \
                               headers, created_at, revoked_at";

/// A webhook to insert; `id` is chosen by the caller (the signing secret is sealed to it).
#[derive(Debug)]
pub struct NewWebhookRow<'a> {
    pub id: Uuid,
    pub target: Target,
    pub name: &'a str,
    pub key_hash: &'a [u8],
    pub key_prefix: &'a str,
    pub sealed_secret: Option<&'a [u8]>,
    pub headers: &'a [String],
    pub created_by: Option<Uuid>,
}

pub async fn insert_webhook(db: impl PgExecutor<'_>, row: &NewWebhookRow<'_>) -> Result<Webhook> {
    let sql = format!(
        "INSERT INTO webhooks (id, event_id, name, key_hash, key_prefix, signing_secret, headers, created_by,
                               workflow_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {WEBHOOK_COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(row.id)
        .bind(row.target.event_id())
        .bind(row.name)
        .bind(row.key_hash)
        .bind(row.key_prefix)
        .bind(row.sealed_secret)
        .bind(row.headers)
        .bind(row.created_by)
        .bind(row.target.workflow_id())
        .fetch_one(db)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_foreign_key_violation() => row.target.not_found(),
            other => other.into(),
        })
}

/// The webhooks of an event or workflow, revoked ones included, oldest first.
pub async fn list_webhooks(db: impl PgExecutor<'_>, target: Target) -> Result<Vec<Webhook>> {
    let sql = format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks
         WHERE event_id IS NOT DISTINCT FROM $1 AND workflow_id IS NOT DISTINCT FROM $2
         ORDER BY created_at, id"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(target.event_id())
        .bind(target.workflow_id())
        .fetch_all(db)
        .await?)
}

/// Revokes a webhook of an event or workflow (revoking twice is fine); its key stops working
/// at once.
pub async fn revoke_webhook(
    db: impl PgExecutor<'_>,
    target: Target,
    webhook_id: Uuid,
) -> Result<Webhook> {
    let sql = format!(
        "UPDATE webhooks SET revoked_at = coalesce(revoked_at, now())
         WHERE id = $1 AND event_id IS NOT DISTINCT FROM $2 AND workflow_id IS NOT DISTINCT FROM $3
         RETURNING {WEBHOOK_COLUMNS}"
    );
    let row: Option<Webhook> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(webhook_id)
        .bind(target.event_id())
        .bind(target.workflow_id())
        .fetch_optional(db)
        .await?;
    row.ok_or(StorageError::WebhookNotFound(webhook_id))
}

/// What a delivery needs of a live webhook.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HookTarget {
    pub id: Uuid,
    /// What a delivery starts: an event's run, or (`workflow_id`) a workflow's.
    pub event_id: Option<Uuid>,
    pub workflow_id: Option<Uuid>,
    pub name: String,
    pub signing_secret: Option<Vec<u8>>,
    pub headers: Vec<String>,
}

/// The live (not revoked) webhook whose key has this hash; a revoked or unknown key is the
/// same `None`, found by the same index lookup.
pub async fn find_live_by_hash(db: impl PgExecutor<'_>, hash: &[u8]) -> Result<Option<HookTarget>> {
    Ok(sqlx::query_as(
        "SELECT id, event_id, workflow_id, name, signing_secret, headers FROM webhooks
         WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(hash)
    .fetch_optional(db)
    .await?)
}
