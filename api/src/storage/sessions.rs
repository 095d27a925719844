//! Dashboard sign-in sessions (`dashboard_sessions`, migration 0019): a browser session acts
//! with the role of the API token it was opened with, and ends with it.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::Result;
use crate::model::Role;

/// The token behind a live session.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionOwner {
    pub token_id: Uuid,
    pub name: String,
    #[sqlx(try_from = "String")]
    pub role: Role,
    pub expires_at: DateTime<Utc>,
}

/// Opens a session for `token_id` lasting `ttl`.
pub async fn insert(
    db: impl PgExecutor<'_>,
    id_hash: &[u8],
    token_id: Uuid,
    ttl: std::time::Duration,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO dashboard_sessions (id_hash, token_id, expires_at)
         VALUES ($1, $2, now() + $3 * interval '1 second')",
    )
    .bind(id_hash)
    .bind(token_id)
    .bind(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX))
    .execute(db)
    .await?;
    Ok(())
}

/// The owner of a session that has not expired and whose token is not revoked.
pub async fn find(db: impl PgExecutor<'_>, id_hash: &[u8]) -> Result<Option<SessionOwner>> {
    Ok(sqlx::query_as(
        "SELECT t.id AS token_id, t.name, t.role, s.expires_at
         FROM dashboard_sessions s JOIN api_tokens t ON t.id = s.token_id
         WHERE s.id_hash = $1 AND s.expires_at > now() AND t.revoked_at IS NULL",
    )
    .bind(id_hash)
    .fetch_optional(db)
    .await?)
}

/// Ends a session (sign-out).
pub async fn delete(db: impl PgExecutor<'_>, id_hash: &[u8]) -> Result<()> {
    sqlx::query("DELETE FROM dashboard_sessions WHERE id_hash = $1")
        .bind(id_hash)
        .execute(db)
        .await?;
    Ok(())
}

/// Removes expired sessions (at most `batch`); returns how many.
pub async fn delete_expired(db: impl PgExecutor<'_>, batch: i64) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM dashboard_sessions WHERE id_hash IN (
             SELECT id_hash FROM dashboard_sessions WHERE expires_at <= now() LIMIT $1)",
    )
    .bind(batch)
    .execute(db)
    .await?
    .rows_affected())
}
