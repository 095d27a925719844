//! Event definitions.

use sqlx::{PgExecutor, types::Json};
use uuid::Uuid;

use super::{Result, StorageError, is_unique_violation};
use crate::model::{Event, NewEvent};

const EVENT_COLUMNS: &str = "id, name, description, runtime, content, command, request, executor, server_id,
    image, env, timeout_seconds, max_attempts, retry_backoff_seconds, retry_backoff_max_seconds, retry_on,
    network, limits, priority, labels, variables_write, concurrency, stuck_after_seconds, startup_window_seconds,
    revision, created_at, updated_at";

/// Stores a validated event.
pub async fn insert_event(db: impl PgExecutor<'_>, spec: &NewEvent) -> Result<Event> {
    let sql = format!(
        "INSERT INTO events (id, name, description, runtime, content, command, request, executor, server_id,
             image, env, timeout_seconds, max_attempts, retry_backoff_seconds, retry_backoff_max_seconds,
             priority, labels, retry_on, network, limits, variables_write, concurrency,
             stuck_after_seconds, startup_window_seconds)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21,
                 $22, $23, $24)
         RETURNING {EVENT_COLUMNS}"
    );
    bind_spec(
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(Uuid::now_v7()),
        spec,
    )
    .fetch_one(db)
    .await
    .map_err(|e| name_taken_or(e, spec))
}

/// Replaces an event's definition (PATCH merges on the caller's side, then validates).
pub async fn update_event(db: impl PgExecutor<'_>, id: Uuid, spec: &NewEvent) -> Result<Event> {
    let sql = format!(
        "UPDATE events SET name = $2, description = $3, runtime = $4, content = $5, command = $6,
             request = $7, executor = $8, server_id = $9, image = $10, env = $11, timeout_seconds = $12,
             max_attempts = $13, retry_backoff_seconds = $14, retry_backoff_max_seconds = $15,
             priority = $16, labels = $17, retry_on = $18, network = $19, limits = $20, variables_write = $21,
             concurrency = $22, stuck_after_seconds = $23, startup_window_seconds = $24,
             updated_at = now(),
             revision = revision + 1
         WHERE id = $1
         RETURNING {EVENT_COLUMNS}"
    );
    bind_spec(sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id), spec)
        .fetch_optional(db)
        .await
        .map_err(|e| name_taken_or(e, spec))?
        .ok_or(StorageError::EventNotFound(id))
}

type EventQuery<'q> = sqlx::query::QueryAs<'q, sqlx::Postgres, Event, sqlx::postgres::PgArguments>;

fn bind_spec<'q>(query: EventQuery<'q>, spec: &'q NewEvent) -> EventQuery<'q> {
    query
        .bind(&spec.name)
        .bind(&spec.description)
        .bind(spec.runtime.as_str())
        .bind(spec.content.as_deref())
        .bind(spec.command.as_ref().map(Json))
        .bind(spec.request.as_ref().map(Json))
        .bind(spec.executor.resolved().as_str())
        .bind(spec.server_id)
        .bind(spec.image.as_deref())
        .bind(Json(&spec.env))
        .bind(spec.timeout_seconds)
        .bind(spec.max_attempts)
        .bind(spec.retry_backoff_seconds)
        .bind(spec.retry_backoff_max_seconds)
        .bind(spec.priority)
        .bind(Json(&spec.labels))
        .bind(spec.retry_on.as_str())
        .bind(spec.network)
        .bind(spec.limits.as_ref().map(Json))
        .bind(spec.variables_write.as_str())
        .bind(spec.concurrency.as_ref().map(Json))
        .bind(spec.stuck_after_seconds)
        .bind(spec.startup_window_seconds)
}

fn name_taken_or(err: sqlx::Error, spec: &NewEvent) -> StorageError {
    if is_unique_violation(&err, "events_name_key") {
        StorageError::EventNameTaken(spec.name.clone())
    } else {
        err.into()
    }
}

pub async fn get_event(db: impl PgExecutor<'_>, id: Uuid) -> Result<Event> {
    let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or(StorageError::EventNotFound(id))
}

/// Events by name, paged by name (`after` is the last name of the previous page).
pub async fn list_events(
    db: impl PgExecutor<'_>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Event>> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE ($1::text IS NULL OR name > $1) ORDER BY name LIMIT $2"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(after)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

/// Deletes an event and its finished jobs' history. Refused while a job of it is queued or
/// running, so no worker is left running a job whose row vanished.
pub async fn delete_event(db: impl PgExecutor<'_>, id: Uuid) -> Result<()> {
    let (found, busy): (bool, bool) = sqlx::query_as(
        "WITH busy AS (
             SELECT EXISTS (SELECT 1 FROM jobs WHERE event_id = $1
                            AND status IN ('queued', 'claimed', 'running')) AS busy
         ), gone AS (
             DELETE FROM events WHERE id = $1 AND NOT (SELECT busy FROM busy) RETURNING id
         )
         SELECT EXISTS (SELECT 1 FROM events WHERE id = $1) OR EXISTS (SELECT 1 FROM gone),
                (SELECT busy FROM busy)",
    )
    .bind(id)
    .fetch_one(db)
    .await?;
    match (found, busy) {
        (false, _) => Err(StorageError::EventNotFound(id)),
        (true, true) => Err(StorageError::EventBusy(id)),
        (true, false) => Ok(()),
    }
}
