//! Deleting old history (`BATON_RETENTION_DAYS`): finished jobs, with their logs (the
//! `job_logs` rows go by `ON DELETE CASCADE`; children, reruns and outbox rows keep their own
//! rows with the reference cleared).

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::Result;

/// The smallest UUIDv7 of `t`'s millisecond: every job created at or after `t` has a greater
/// id (ids are UUIDv7), so `id < bound` limits the scan to rows created before `t`.
pub fn id_bound(t: DateTime<Utc>) -> Uuid {
    let ms = u128::try_from(t.timestamp_millis().max(0)).unwrap_or(0);
    Uuid::from_u128(ms << 80)
}

/// Deletes up to `batch` jobs that finished before `cutoff` (oldest first, skipping rows
/// locked by others, so replicas sweeping at once do not wait on each other); returns how
/// many were deleted. A job finished before `cutoff` was created before it, so the walk of
/// the primary key stops at [`id_bound`]`(cutoff)` whatever the size of the newer history.
pub async fn delete_finished_before(
    db: impl PgExecutor<'_>,
    cutoff: DateTime<Utc>,
    batch: i64,
) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM jobs WHERE id IN (
             SELECT id FROM jobs
             WHERE id < $1 AND finished_at < $2
             ORDER BY id LIMIT $3
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(id_bound(cutoff))
    .bind(cutoff)
    .bind(batch)
    .execute(db)
    .await?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_below_every_id_of_its_millisecond_and_above_older_ones() {
        let now = Utc::now();
        let bound = id_bound(now);
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            now.timestamp() as u64,
            now.timestamp_subsec_nanos(),
        );
        assert!(Uuid::new_v7(ts) >= bound);
        assert!(Uuid::now_v7() >= bound);
        assert!(id_bound(now - chrono::Duration::milliseconds(1)) < bound);
    }
}
