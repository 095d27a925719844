//! Variables. Secret values are stored sealed; this module stores and returns the sealed bytes
//! and leaves sealing to the caller (which holds the vault).

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{Result, StorageError};

/// A variable row as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VariableRow {
    pub id: Uuid,
    pub key: String,
    pub event_id: Option<Uuid>,
    pub secret: bool,
    pub value: Option<String>,
    pub sealed: Option<Vec<u8>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub updated_by_job: Option<Uuid>,
    /// Sealed to [`identity`] (every value written since migration 0012); rows sealed before
    /// are bound to their id.
    pub sealed_to_identity: bool,
}

impl VariableRow {
    /// The associated data this row's sealed value was sealed with.
    pub fn sealed_with(&self) -> Vec<u8> {
        if self.sealed_to_identity {
            identity(&self.key, self.event_id)
        } else {
            self.id.as_bytes().to_vec()
        }
    }
}

/// What a secret value is sealed to: the variable's identity (scope and key), which is known
/// before it is stored and never changes, so concurrent first writes of a key cannot seal a
/// value against another row's id, and a sealed value cannot be moved to another variable.
pub fn identity(key: &str, event_id: Option<Uuid>) -> Vec<u8> {
    match event_id {
        Some(id) => format!("baton.variable/event:{id}/{key}"),
        None => format!("baton.variable/global/{key}"),
    }
    .into_bytes()
}

const COLUMNS: &str =
    "id, key, event_id, secret, value, sealed, created_at, updated_at, updated_by_job,
    sealed_to_identity";

/// The value to store: plain, or sealed to the variable's [`identity`].
#[derive(Debug, Clone)]
pub enum StoredValue {
    Plain(String),
    Sealed(Vec<u8>),
}

/// Creates or replaces a variable.
pub async fn upsert(
    db: impl PgExecutor<'_>,
    key: &str,
    event_id: Option<Uuid>,
    value: &StoredValue,
    by_token: Option<Uuid>,
    by_job: Option<Uuid>,
) -> Result<VariableRow> {
    let (secret, plain, sealed) = match value {
        StoredValue::Plain(v) => (false, Some(v.as_str()), None),
        StoredValue::Sealed(s) => (true, None, Some(s.as_slice())),
    };
    let sql = format!(
        "INSERT INTO variables (id, key, event_id, secret, value, sealed, updated_by_token, updated_by_job,
                                sealed_to_identity)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, true)
         ON CONFLICT (key, event_id) DO UPDATE SET secret = $4, value = $5, sealed = $6,
             updated_by_token = $7, updated_by_job = $8, updated_at = now(), sealed_to_identity = true
         RETURNING {COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::now_v7())
        .bind(key)
        .bind(event_id)
        .bind(secret)
        .bind(plain)
        .bind(sealed)
        .bind(by_token)
        .bind(by_job)
        .fetch_one(db)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("23503") => {
                StorageError::EventNotFound(event_id.unwrap_or_default())
            }
            _ => e.into(),
        })
}

pub async fn get(
    db: impl PgExecutor<'_>,
    key: &str,
    event_id: Option<Uuid>,
) -> Result<Option<VariableRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM variables WHERE key = $1 AND event_id IS NOT DISTINCT FROM $2"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(key)
        .bind(event_id)
        .fetch_optional(db)
        .await?)
}

/// Every variable, or those of one scope.
pub async fn list(
    db: impl PgExecutor<'_>,
    scope: Option<Option<Uuid>>,
) -> Result<Vec<VariableRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM variables
         WHERE NOT $1 OR event_id IS NOT DISTINCT FROM $2
         ORDER BY key, event_id NULLS FIRST"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(scope.is_some())
        .bind(scope.flatten())
        .fetch_all(db)
        .await?)
}

/// What a run of `event_id` may read: global variables, overridden by the event's own.
pub async fn visible_to(db: impl PgExecutor<'_>, event_id: Uuid) -> Result<Vec<VariableRow>> {
    let sql = format!(
        "SELECT DISTINCT ON (key) {COLUMNS} FROM variables
         WHERE event_id IS NULL OR event_id = $1
         ORDER BY key, event_id NULLS LAST"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(event_id)
        .fetch_all(db)
        .await?)
}

pub async fn delete(db: impl PgExecutor<'_>, key: &str, event_id: Option<Uuid>) -> Result<bool> {
    let done =
        sqlx::query("DELETE FROM variables WHERE key = $1 AND event_id IS NOT DISTINCT FROM $2")
            .bind(key)
            .bind(event_id)
            .execute(db)
            .await?;
    Ok(done.rows_affected() == 1)
}
