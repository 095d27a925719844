//! Registered SSH servers and their (encrypted) credentials.

use sqlx::{PgExecutor, types::Json};
use uuid::Uuid;

use super::{Result, StorageError, is_unique_violation};
use crate::model::server::{NewServer, Server};

const SERVER_COLUMNS: &str =
    "id, name, host, port, username, auth_method, host_key_policy, host_key,
    host_key_recorded_at, max_concurrent, labels, created_at, updated_at";

/// Stores a validated server with its sealed credentials.
pub async fn insert_server(
    db: impl PgExecutor<'_>,
    id: Uuid,
    new: &NewServer,
    auth_method: &str,
    sealed_credentials: &[u8],
) -> Result<Server> {
    let sql = format!(
        "INSERT INTO servers (id, name, host, port, username, auth_method, credentials, host_key_policy,
             host_key, host_key_recorded_at, max_concurrent, labels)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, CASE WHEN $9::text IS NULL THEN NULL ELSE now() END, $10, $11)
         RETURNING {SERVER_COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(&new.name)
        .bind(&new.host)
        .bind(new.port)
        .bind(&new.username)
        .bind(auth_method)
        .bind(sealed_credentials)
        .bind(new.host_key_policy.as_str())
        .bind(new.host_key.as_deref().map(str::trim))
        .bind(new.max_concurrent)
        .bind(Json(&new.labels))
        .fetch_one(db)
        .await
        .map_err(|e| {
            if is_unique_violation(&e, "servers_name_key") {
                StorageError::ServerNameTaken(new.name.clone())
            } else {
                e.into()
            }
        })
}

pub async fn get_server(db: impl PgExecutor<'_>, id: Uuid) -> Result<Server> {
    let sql = format!("SELECT {SERVER_COLUMNS} FROM servers WHERE id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or(StorageError::ServerNotFound(id))
}

pub async fn list_servers(db: impl PgExecutor<'_>) -> Result<Vec<Server>> {
    let sql = format!("SELECT {SERVER_COLUMNS} FROM servers ORDER BY name");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(db)
        .await?)
}

/// The sealed credentials of a server.
pub async fn sealed_credentials(db: impl PgExecutor<'_>, id: Uuid) -> Result<Vec<u8>> {
    sqlx::query_scalar("SELECT credentials FROM servers WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or(StorageError::ServerNotFound(id))
}

/// Deletes a server no event uses.
pub async fn delete_server(db: impl PgExecutor<'_>, id: Uuid) -> Result<()> {
    let done = sqlx::query("DELETE FROM servers WHERE id = $1")
        .bind(id)
        .execute(db)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("23503") => {
                StorageError::ServerInUse(id)
            }
            _ => e.into(),
        })?;
    if done.rows_affected() == 0 {
        return Err(StorageError::ServerNotFound(id));
    }
    Ok(())
}

/// What recording a host key seen on first use did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyRecord {
    /// No key was pinned; this one is now.
    Recorded,
    /// The same key was already pinned.
    Unchanged,
    /// A different key is pinned: this one is refused.
    Mismatch { pinned: String },
}

/// Pins `key` for an `accept_new` server that has none yet (first use wins, atomically).
pub async fn record_host_key(
    db: impl PgExecutor<'_>,
    id: Uuid,
    key: &str,
) -> Result<HostKeyRecord> {
    let key = key.trim();
    let row: Option<(Option<String>, bool)> = sqlx::query_as(
        "WITH pinned AS (
             UPDATE servers SET host_key = $2, host_key_recorded_at = now(), updated_at = now()
             WHERE id = $1 AND host_key IS NULL AND host_key_policy = 'accept_new'
             RETURNING host_key
         )
         SELECT s.host_key, EXISTS (SELECT 1 FROM pinned) FROM servers s WHERE s.id = $1",
    )
    .bind(id)
    .bind(key)
    .fetch_optional(db)
    .await?;
    match row {
        None => Err(StorageError::ServerNotFound(id)),
        Some((_, true)) => Ok(HostKeyRecord::Recorded),
        Some((Some(pinned), false)) if same_key(&pinned, key) => Ok(HostKeyRecord::Unchanged),
        Some((Some(pinned), false)) => Ok(HostKeyRecord::Mismatch { pinned }),
        // A strict server without a key cannot exist (CHECK); nothing to record.
        Some((None, false)) => Ok(HostKeyRecord::Unchanged),
    }
}

/// Keys compare by type and data, not comment.
fn same_key(a: &str, b: &str) -> bool {
    a.split_whitespace()
        .take(2)
        .eq(b.split_whitespace().take(2))
}

pub async fn server_exists(db: impl PgExecutor<'_>, id: Uuid) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM servers WHERE id = $1)")
            .bind(id)
            .fetch_one(db)
            .await?,
    )
}
