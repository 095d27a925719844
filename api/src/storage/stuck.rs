//! Stuck detection (migration 0018): a running job whose event sets `stuck_after_seconds` and
//! that showed no sign of life (start, log batch, progress — `active_at`, written by the
//! statements that record those anyway) for that long is flagged `stuck`. The statements that
//! record activity clear the flag.
//!
//! The check walks only running jobs, through `jobs_status_idx` (at most as many as worker
//! slots), so it stays cheap however long the history grows; no index on `active_at` is
//! added, which would make every log batch's update of its job row a non-HOT update.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::Result;

/// Flags one running job that has been silent past its threshold, locking it (`SKIP LOCKED`:
/// replicas checking at once take different jobs). Returns it, or None when there is none.
/// Meant for a transaction that then fires the job's `on_stuck` actions.
pub async fn flag_one(db: impl PgExecutor<'_>) -> Result<Option<Uuid>> {
    Ok(sqlx::query_scalar(
        "WITH silent AS (
             SELECT id FROM jobs
             WHERE status = 'running' AND NOT stuck
               AND jsonb_typeof(spec->'stuck_after_seconds') = 'number'
               AND coalesce(active_at, started_at, claimed_at)
                   < now() - (spec->>'stuck_after_seconds')::int * interval '1 second'
             ORDER BY id
             LIMIT 1
             FOR UPDATE SKIP LOCKED
         )
         UPDATE jobs j SET stuck = true FROM silent WHERE j.id = silent.id
         RETURNING j.id",
    )
    .fetch_optional(db)
    .await?)
}

/// How many running jobs are flagged stuck (the `baton_jobs_stuck` gauge).
pub async fn count(db: impl PgExecutor<'_>) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'running' AND stuck")
            .fetch_one(db)
            .await?,
    )
}
