//! Concurrency groups (migration 0018): the statements admission runs for events whose
//! strategy is `skip` or `cancel_previous`. The claim side lives in `claim_jobs`.

use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::Result;
use crate::policy::concurrency::Member;

/// A job's group, as stored at enqueue (None: its event has no concurrency policy).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JobGroup {
    pub event_id: Uuid,
    pub concurrency_key: String,
    pub status: String,
    /// The policy as snapshotted with the job (`spec.concurrency`).
    pub policy: sqlx::types::Json<crate::model::event::Concurrency>,
}

/// The group of `job_id`, or None when the job has no policy.
pub async fn group_of(db: impl PgExecutor<'_>, job_id: Uuid) -> Result<Option<JobGroup>> {
    Ok(sqlx::query_as(
        "SELECT event_id, concurrency_key, status, spec->'concurrency' AS policy FROM jobs
         WHERE id = $1 AND concurrency_key IS NOT NULL AND jsonb_typeof(spec->'concurrency') = 'object'",
    )
    .bind(job_id)
    .fetch_optional(db)
    .await?)
}

/// Serialises admissions to one group until the caller's transaction ends (the same lock the
/// claim takes with `pg_try_advisory_xact_lock`). Statements after it see every admission
/// and claim of the group that committed before.
pub async fn lock_group(conn: &mut PgConnection, event_id: Uuid, key: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('baton.concurrency/' || $1::text || '/' || $2, 0))")
        .bind(event_id)
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

/// The group's unfinished runs other than `except`, oldest first.
pub async fn unfinished(
    db: impl PgExecutor<'_>,
    event_id: Uuid,
    key: &str,
    except: Uuid,
) -> Result<Vec<Member>> {
    let rows: Vec<(Uuid, bool)> = sqlx::query_as(
        "SELECT id, status = 'queued' FROM jobs
         WHERE event_id = $1 AND concurrency_key = $2 AND id <> $3
           AND status IN ('queued', 'claimed', 'running')
         ORDER BY id",
    )
    .bind(event_id)
    .bind(key)
    .bind(except)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, queued)| Member { id, queued })
        .collect())
}

/// Ends queued jobs at once as `cancelled` with `error.kind = "concurrency"` and `message`.
/// Returns the ids actually ended (a job claimed in between is left alone).
pub async fn end_queued(db: impl PgExecutor<'_>, ids: &[Uuid], message: &str) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "UPDATE jobs SET status = 'cancelled', finished_at = now(), cancel_requested = true,
             error_kind = 'concurrency', error_message = $2
         WHERE id = ANY ($1) AND status = 'queued'
         RETURNING id",
    )
    .bind(ids)
    .bind(message)
    .fetch_all(db)
    .await?)
}
