//! Conditional actions of events, and the outbox messages they produce.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, types::Json};
use uuid::Uuid;

use super::{Result, StorageError};
use crate::model::action::{Action, ActionSpec, NewAction, Trigger};

#[derive(Debug, sqlx::FromRow)]
struct ActionRow {
    id: Uuid,
    event_id: Uuid,
    #[sqlx(try_from = "String")]
    trigger: Trigger,
    delay_seconds: i32,
    if_expr: Option<String>,
    action: Json<ActionSpec>,
    created_at: DateTime<Utc>,
}

impl From<ActionRow> for Action {
    fn from(r: ActionRow) -> Self {
        Action {
            id: r.id,
            event_id: r.event_id,
            trigger: r.trigger,
            delay_seconds: r.delay_seconds,
            if_: r.if_expr,
            action: r.action.0,
            created_at: r.created_at,
        }
    }
}

pub async fn insert_action(
    db: impl PgExecutor<'_>,
    event_id: Uuid,
    new: &NewAction,
) -> Result<Action> {
    let target = match &new.action {
        ActionSpec::RunEvent { event_id } => Some(*event_id),
        ActionSpec::SendMessage { .. } => None,
    };
    let row: ActionRow = sqlx::query_as(
        "INSERT INTO event_actions (id, event_id, trigger, delay_seconds, action, target_event_id, if_expr)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         RETURNING id, event_id, trigger, delay_seconds, if_expr, action, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(event_id)
    .bind(new.trigger.as_str())
    .bind(new.delay_seconds)
    .bind(Json(&new.action))
    .bind(target)
    .bind(new.if_.as_deref())
    .fetch_one(db)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("23503") => {
            StorageError::EventNotFound(
                if d.constraint() == Some("event_actions_target_event_id_fkey") {
                    target.unwrap_or_default()
                } else {
                    event_id
                },
            )
        }
        _ => e.into(),
    })?;
    Ok(row.into())
}

pub async fn list_actions(db: impl PgExecutor<'_>, event_id: Uuid) -> Result<Vec<Action>> {
    let rows: Vec<ActionRow> = sqlx::query_as(
        "SELECT id, event_id, trigger, delay_seconds, if_expr, action, created_at FROM event_actions
         WHERE event_id = $1 ORDER BY created_at, id",
    )
    .bind(event_id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Action::from).collect())
}

pub async fn delete_action(
    db: impl PgExecutor<'_>,
    event_id: Uuid,
    action_id: Uuid,
) -> Result<bool> {
    let done = sqlx::query("DELETE FROM event_actions WHERE id = $1 AND event_id = $2")
        .bind(action_id)
        .bind(event_id)
        .execute(db)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Records why some of a job's actions did not run.
pub async fn add_note(db: impl PgExecutor<'_>, job_id: Uuid, note: &str) -> Result<()> {
    sqlx::query("UPDATE jobs SET action_notes = array_append(action_notes, $2) WHERE id = $1")
        .bind(job_id)
        .bind(note)
        .execute(db)
        .await?;
    Ok(())
}

/// A message to deliver.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    pub job_id: Uuid,
    pub action_id: Uuid,
    pub channel: &'a str,
    pub target: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    pub payload: &'a Value,
    pub delay_seconds: i32,
}

pub async fn enqueue_message(db: impl PgExecutor<'_>, m: &NewMessage<'_>) -> Result<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO message_outbox (id, job_id, action_id, channel, target, subject, body, payload, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + $9 * interval '1 second')",
    )
    .bind(id)
    .bind(m.job_id)
    .bind(m.action_id)
    .bind(m.channel)
    .bind(m.target)
    .bind(m.subject)
    .bind(m.body)
    .bind(Json(m.payload))
    .bind(m.delay_seconds)
    .execute(db)
    .await?;
    Ok(id)
}

/// A message claimed for delivery.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxMessage {
    pub id: Uuid,
    pub channel: String,
    pub target: String,
    pub subject: String,
    pub body: String,
    pub payload: Json<Value>,
    pub attempts: i32,
    pub max_attempts: i32,
}

/// Claims due messages for `hold` (another replica skips them meanwhile).
pub async fn claim_messages(
    db: impl PgExecutor<'_>,
    limit: i64,
    hold_seconds: i32,
) -> Result<Vec<OutboxMessage>> {
    Ok(sqlx::query_as(
        "WITH due AS (
             SELECT id FROM message_outbox
             WHERE status = 'pending' AND next_attempt_at <= now()
               AND (locked_until IS NULL OR locked_until < now())
             ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED
         )
         UPDATE message_outbox m SET locked_until = now() + $2 * interval '1 second', attempts = attempts + 1
         FROM due WHERE m.id = due.id
         RETURNING m.id, m.channel, m.target, m.subject, m.body, m.payload, m.attempts, m.max_attempts",
    )
    .bind(limit)
    .bind(hold_seconds)
    .fetch_all(db)
    .await?)
}

pub async fn mark_delivered(db: impl PgExecutor<'_>, id: Uuid) -> Result<()> {
    sqlx::query(
        "UPDATE message_outbox SET status = 'delivered', delivered_at = now(), locked_until = NULL, last_error = NULL
         WHERE id = $1",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// Schedules another attempt after `retry_in`, or gives up after the last attempt.
pub async fn mark_failed(
    db: impl PgExecutor<'_>,
    id: Uuid,
    error: &str,
    retry_in: std::time::Duration,
) -> Result<()> {
    sqlx::query(
        "UPDATE message_outbox SET locked_until = NULL, last_error = $2,
             status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
             next_attempt_at = now() + $3 * interval '1 millisecond'
         WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(i64::try_from(retry_in.as_millis()).unwrap_or(i64::MAX))
    .execute(db)
    .await?;
    Ok(())
}

/// When the next pending message is due (for the delivery loop's sleep).
pub async fn next_message_due(db: impl PgExecutor<'_>) -> Result<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "SELECT min(greatest(next_attempt_at, coalesce(locked_until, next_attempt_at)))
         FROM message_outbox WHERE status = 'pending'",
    )
    .fetch_one(db)
    .await?)
}
