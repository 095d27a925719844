//! Schedules: their definitions, and the due-row locking and advancing the firing loop uses.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, types::Json};
use uuid::Uuid;

pub use super::Target;
use super::{Result, StorageError};
use crate::schedule::{Missed, ScheduleFields};

/// The channel told when a schedule is created or changed: every replica's firing loop
/// re-reads its earliest due time.
pub const SCHEDULES_CHANNEL: &str = "baton_schedules";

const COLUMNS: &str = "id, event_id, workflow_id, cron, interval_seconds, timezone, missed, max_catch_up, jitter_seconds,
    start_at, end_at, input, paused, anchor_at, next_fire_at, next_due_at, last_fired_at, created_by,
    created_at, updated_at, revision";

/// A stored schedule.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRow {
    pub id: Uuid,
    /// What the schedule runs: an event, or (`workflow_id`) a workflow.
    pub event_id: Option<Uuid>,
    pub workflow_id: Option<Uuid>,
    pub cron: Option<String>,
    pub interval_seconds: Option<i64>,
    pub timezone: String,
    pub missed: String,
    pub max_catch_up: i32,
    pub jitter_seconds: i32,
    pub start_at: Option<DateTime<Utc>>,
    pub end_at: Option<DateTime<Utc>>,
    pub input: Json<Value>,
    pub paused: bool,
    pub anchor_at: DateTime<Utc>,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub next_due_at: Option<DateTime<Utc>>,
    pub last_fired_at: Option<DateTime<Utc>>,
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub revision: i64,
}

impl ScheduleRow {
    /// The definition as the API takes it.
    pub fn fields(&self) -> ScheduleFields {
        ScheduleFields {
            cron: self.cron.clone(),
            interval_seconds: self.interval_seconds,
            timezone: self.timezone.clone(),
            missed: self.missed.parse().unwrap_or(Missed::Last),
            max_catch_up: self.max_catch_up,
            jitter_seconds: self.jitter_seconds,
            start_at: self.start_at,
            end_at: self.end_at,
            input: self.input.0.clone(),
            paused: self.paused,
        }
    }
}

/// Where a schedule's next slot stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextSlot {
    /// The nominal time (None: the schedule has ended).
    pub fire_at: Option<DateTime<Utc>>,
    /// When it is due (nominal plus jitter).
    pub due_at: Option<DateTime<Utc>>,
}

/// Stores a validated schedule.
pub async fn insert_schedule(
    db: impl PgExecutor<'_>,
    id: Uuid,
    target: Target,
    fields: &ScheduleFields,
    anchor_at: DateTime<Utc>,
    next: NextSlot,
    created_by: Option<Uuid>,
) -> Result<ScheduleRow> {
    let sql = format!(
        "INSERT INTO schedules (id, event_id, cron, interval_seconds, timezone, missed, max_catch_up,
             jitter_seconds, start_at, end_at, input, paused, anchor_at, next_fire_at, next_due_at, created_by,
             workflow_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
         RETURNING {COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(target.event_id())
        .bind(fields.cron.as_deref())
        .bind(fields.interval_seconds)
        .bind(&fields.timezone)
        .bind(fields.missed.as_str())
        .bind(fields.max_catch_up)
        .bind(fields.jitter_seconds)
        .bind(fields.start_at)
        .bind(fields.end_at)
        .bind(Json(&fields.input))
        .bind(fields.paused)
        .bind(anchor_at)
        .bind(next.fire_at)
        .bind(next.due_at)
        .bind(created_by)
        .bind(target.workflow_id())
        .fetch_one(db)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_foreign_key_violation() => target.not_found(),
            other => other.into(),
        })
}

/// One schedule; `for_update` locks it until the transaction ends (PATCH, pause, resume).
pub async fn get_schedule(
    db: impl PgExecutor<'_>,
    id: Uuid,
    for_update: bool,
) -> Result<ScheduleRow> {
    let lock = if for_update { " FOR UPDATE" } else { "" };
    let sql = format!("SELECT {COLUMNS} FROM schedules WHERE id = $1{lock}");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or(StorageError::ScheduleNotFound(id))
}

/// A page of schedules in id order (creation order), optionally of one event or workflow.
pub async fn list_schedules(
    db: impl PgExecutor<'_>,
    event_id: Option<Uuid>,
    workflow_id: Option<Uuid>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<ScheduleRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM schedules
         WHERE ($1::uuid IS NULL OR event_id = $1) AND ($2::uuid IS NULL OR id > $2)
           AND ($4::uuid IS NULL OR workflow_id = $4)
         ORDER BY id LIMIT $3"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(event_id)
        .bind(after)
        .bind(limit)
        .bind(workflow_id)
        .fetch_all(db)
        .await?)
}

/// Replaces a schedule's definition and its next slot.
pub async fn update_schedule(
    db: impl PgExecutor<'_>,
    id: Uuid,
    fields: &ScheduleFields,
    anchor_at: DateTime<Utc>,
    next: NextSlot,
) -> Result<ScheduleRow> {
    let sql = format!(
        "UPDATE schedules SET cron = $2, interval_seconds = $3, timezone = $4, missed = $5,
             max_catch_up = $6, jitter_seconds = $7, start_at = $8, end_at = $9, input = $10, paused = $11,
             anchor_at = $12, next_fire_at = $13, next_due_at = $14, updated_at = now(), revision = revision + 1
         WHERE id = $1
         RETURNING {COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(fields.cron.as_deref())
        .bind(fields.interval_seconds)
        .bind(&fields.timezone)
        .bind(fields.missed.as_str())
        .bind(fields.max_catch_up)
        .bind(fields.jitter_seconds)
        .bind(fields.start_at)
        .bind(fields.end_at)
        .bind(Json(&fields.input))
        .bind(fields.paused)
        .bind(anchor_at)
        .bind(next.fire_at)
        .bind(next.due_at)
        .fetch_optional(db)
        .await?
        .ok_or(StorageError::ScheduleNotFound(id))
}

/// Pauses or resumes a schedule. Its next slot stays: on resume, the slots that passed
/// meanwhile are handled by its `missed` policy.
pub async fn set_paused(db: impl PgExecutor<'_>, id: Uuid, paused: bool) -> Result<ScheduleRow> {
    let sql = format!(
        "UPDATE schedules SET paused = $2, updated_at = now(), revision = revision + 1
         WHERE id = $1 RETURNING {COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(paused)
        .fetch_optional(db)
        .await?
        .ok_or(StorageError::ScheduleNotFound(id))
}

pub async fn delete_schedule(db: impl PgExecutor<'_>, id: Uuid) -> Result<()> {
    let deleted = sqlx::query("DELETE FROM schedules WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(StorageError::ScheduleNotFound(id));
    }
    Ok(())
}

/// Tells every replica's firing loop that schedules changed (sent on commit).
pub async fn notify_changed(db: impl PgExecutor<'_>) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(SCHEDULES_CHANNEL)
        .execute(db)
        .await?;
    Ok(())
}

/// Locks up to `limit` unpaused schedules due at `now`, skipping rows another replica holds:
/// two replicas never fire the same schedule at once.
pub async fn lock_due(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<ScheduleRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM schedules
         WHERE NOT paused AND next_due_at IS NOT NULL AND next_due_at <= $1
         ORDER BY next_due_at
         LIMIT $2
         FOR UPDATE SKIP LOCKED"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

/// Moves a schedule past the slots just fired (in the firing transaction).
pub async fn advance(
    db: impl PgExecutor<'_>,
    id: Uuid,
    next: NextSlot,
    last_fired_at: Option<DateTime<Utc>>,
) -> Result<()> {
    sqlx::query(
        "UPDATE schedules SET next_fire_at = $2, next_due_at = $3,
             last_fired_at = coalesce($4, last_fired_at)
         WHERE id = $1",
    )
    .bind(id)
    .bind(next.fire_at)
    .bind(next.due_at)
    .bind(last_fired_at)
    .execute(db)
    .await?;
    Ok(())
}

/// When the earliest unpaused schedule is due (None: none is).
pub async fn earliest_due(db: impl PgExecutor<'_>) -> Result<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "SELECT next_due_at FROM schedules
         WHERE NOT paused AND next_due_at IS NOT NULL
         ORDER BY next_due_at LIMIT 1",
    )
    .fetch_optional(db)
    .await?)
}
