//! API tokens, stored as sha256 hashes.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::{Result, StorageError};
use crate::model::token::WorkerBinding;
use crate::model::{Role, Token};

const TOKEN_COLUMNS: &str = "id, name, role, token_prefix, created_at, last_used_at, revoked_at, \
                             worker_labels, worker_executors";

pub async fn insert_token(
    db: impl PgExecutor<'_>,
    name: &str,
    role: Role,
    hash: &[u8],
    prefix: &str,
    created_by: Option<Uuid>,
) -> Result<Token> {
    insert_bound_token(
        db,
        name,
        role,
        hash,
        prefix,
        created_by,
        &WorkerBinding::default(),
    )
    .await
}

/// Inserts a token; a worker token may be bound to the labels and executors its workers may
/// declare.
pub async fn insert_bound_token(
    db: impl PgExecutor<'_>,
    name: &str,
    role: Role,
    hash: &[u8],
    prefix: &str,
    created_by: Option<Uuid>,
    binding: &WorkerBinding,
) -> Result<Token> {
    let sql = format!(
        "INSERT INTO api_tokens (id, name, role, token_hash, token_prefix, created_by,
                                 worker_labels, worker_executors)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {TOKEN_COLUMNS}"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::now_v7())
        .bind(name)
        .bind(role.as_str())
        .bind(hash)
        .bind(prefix)
        .bind(created_by)
        .bind(binding.labels.as_ref().map(sqlx::types::Json))
        .bind(binding.executors.as_deref())
        .fetch_one(db)
        .await?)
}

/// Whether the token `id` exists and is not revoked (a worker stream re-checks this on every
/// heartbeat, in case a revocation's notification was missed).
pub async fn is_live(db: impl PgExecutor<'_>, id: Uuid) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM api_tokens WHERE id = $1 AND revoked_at IS NULL)",
    )
    .bind(id)
    .fetch_one(db)
    .await?)
}

/// The live (not revoked) token with this hash.
pub async fn find_by_hash(db: impl PgExecutor<'_>, hash: &[u8]) -> Result<Option<Token>> {
    let sql = format!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(hash)
        .fetch_optional(db)
        .await?)
}

/// Records use at most once a minute per token, so reads stay reads.
pub async fn touch(db: impl PgExecutor<'_>, id: Uuid) -> Result<()> {
    sqlx::query(
        "UPDATE api_tokens SET last_used_at = now()
         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn list_tokens(db: impl PgExecutor<'_>) -> Result<Vec<Token>> {
    let sql = format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(db)
        .await?)
}

/// Revokes a token (kept for the audit trail).
/// Every replica forgets the token when the transaction commits (`NOTIFY` on
/// [`REVOKED_CHANNEL`]).
pub async fn revoke_token(db: impl PgExecutor<'_>, id: Uuid) -> Result<()> {
    let revoked: Option<bool> = sqlx::query_scalar(
        "WITH revoked AS (
             UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING id
         )
         SELECT pg_notify($2, id::text) IS NULL FROM revoked",
    )
    .bind(id)
    .bind(REVOKED_CHANNEL)
    .fetch_optional(db)
    .await?;
    if revoked.is_none() {
        return Err(StorageError::TokenNotFound(id));
    }
    Ok(())
}

/// The channel a revocation is announced on; the payload is the token's id.
pub const REVOKED_CHANNEL: &str = "baton_token_revoked";

/// Whether any live admin token exists (the bootstrap generates one when none does).
pub async fn admin_exists(db: impl PgExecutor<'_>) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL)",
    )
    .fetch_one(db)
    .await?)
}

/// Whether a token with this hash is stored: `Some(true)` live, `Some(false)` revoked, `None`
/// unknown (the admin bootstrap must tell a revoked token from an unknown one).
pub async fn hash_is_live(db: impl PgExecutor<'_>, hash: &[u8]) -> Result<Option<bool>> {
    Ok(
        sqlx::query_scalar("SELECT revoked_at IS NULL FROM api_tokens WHERE token_hash = $1")
            .bind(hash)
            .fetch_optional(db)
            .await?,
    )
}
