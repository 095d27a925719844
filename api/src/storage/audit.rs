//! The audit log: who did what to which object, for every mutating API call.

use serde_json::Value;
use sqlx::{PgExecutor, types::Json};
use uuid::Uuid;

use super::Result;

/// One audit entry.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    pub token_id: Option<Uuid>,
    pub actor: &'a str,
    pub action: &'a str,
    pub target_type: &'a str,
    pub target_id: Option<String>,
    pub detail: Value,
}

pub async fn record(db: impl PgExecutor<'_>, entry: &AuditEntry<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (token_id, actor, action, target_type, target_id, detail)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(entry.token_id)
    .bind(entry.actor)
    .bind(entry.action)
    .bind(entry.target_type)
    .bind(entry.target_id.as_deref())
    .bind(Json(&entry.detail))
    .execute(db)
    .await?;
    Ok(())
}
