//! Workers as the api last saw them (for `GET /api/v1/workers` and operations).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, types::Json};
use utoipa::ToSchema;
use uuid::Uuid;

use super::Result;

#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct Worker {
    pub id: Uuid,
    pub name: String,
    #[schema(value_type = Object)]
    pub labels: Json<serde_json::Value>,
    pub executors: Vec<String>,
    pub slots: i32,
    pub running: i32,
    pub version: Option<String>,
    pub hostname: Option<String>,
    /// Whether the worker holds a stream to an api replica now: a replica recorded it and it
    /// was heard from within a lease (a replica killed without closing its streams cannot
    /// record their end; its workers then show disconnected once their heartbeats stop).
    pub connected: bool,
    pub connected_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub disconnected_at: Option<DateTime<Utc>>,
}

/// What a worker said in its `Hello`.
#[derive(Debug, Clone)]
pub struct WorkerHello<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub token_id: Uuid,
    pub labels: &'a serde_json::Map<String, serde_json::Value>,
    pub executors: &'a [String],
    pub slots: i32,
    pub running: i32,
    pub version: &'a str,
    pub hostname: &'a str,
    pub api_id: &'a str,
}

pub async fn connected(db: impl PgExecutor<'_>, w: &WorkerHello<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO workers (id, name, token_id, labels, executors, slots, running, version, hostname, api_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (id) DO UPDATE SET name = $2, token_id = $3, labels = $4, executors = $5, slots = $6,
             running = $7, version = $8, hostname = $9, api_id = $10, connected_at = now(),
             last_seen_at = now(), disconnected_at = NULL",
    )
    .bind(w.id)
    .bind(w.name)
    .bind(w.token_id)
    .bind(Json(w.labels))
    .bind(w.executors)
    .bind(w.slots)
    .bind(w.running)
    .bind(w.version)
    .bind(w.hostname)
    .bind(w.api_id)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn seen(db: impl PgExecutor<'_>, id: Uuid, running: i32) -> Result<()> {
    sqlx::query("UPDATE workers SET last_seen_at = now(), running = $2 WHERE id = $1")
        .bind(id)
        .bind(running)
        .execute(db)
        .await?;
    Ok(())
}

/// Marks the worker disconnected, unless it already reconnected through another replica.
pub async fn disconnected(db: impl PgExecutor<'_>, id: Uuid, api_id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE workers SET api_id = NULL, disconnected_at = now() WHERE id = $1 AND api_id = $2",
    )
    .bind(id)
    .bind(api_id)
    .execute(db)
    .await?;
    Ok(())
}

/// Every worker, connected ones first. A worker counts as connected while a replica holds its
/// stream (`api_id`) and its last heartbeat is less than `silence` old: workers heartbeat
/// several times per lease, so `silence` is the lease.
pub async fn list(db: impl PgExecutor<'_>, silence: std::time::Duration) -> Result<Vec<Worker>> {
    Ok(sqlx::query_as(
        "SELECT id, name, labels, executors, slots, running, version, hostname,
                (api_id IS NOT NULL AND last_seen_at > now() - $1 * interval '1 millisecond') AS connected,
                connected_at, last_seen_at, disconnected_at
         FROM workers ORDER BY connected DESC, name, id",
    )
    .bind(i64::try_from(silence.as_millis()).unwrap_or(i64::MAX))
    .fetch_all(db)
    .await?)
}
