//! The retention sweep (`BATON_RETENTION_DAYS`, off by default): on every replica, every
//! [`INTERVAL`], finished jobs (and their logs) that finished more than N days ago are
//! deleted in batches of [`BATCH`], one short transaction each with a pause between, so the
//! sweep never holds many locks or starves the queue. Expired dashboard sessions go too.
//! Replicas sweeping at once skip each other's rows.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::storage::{retention, sessions};

pub const BATCH: i64 = 500;
pub const INTERVAL: Duration = Duration::from_secs(60);
const PAUSE: Duration = Duration::from_millis(50);

/// One sweep: deletes, batch by batch, every job finished more than `days` days ago; returns
/// how many.
pub async fn sweep(
    pool: &PgPool,
    days: u32,
    batch: i64,
    stop: &CancellationToken,
) -> crate::storage::Result<u64> {
    let cutoff = Utc::now() - chrono::Duration::days(i64::from(days));
    let mut total = 0;
    loop {
        let deleted = retention::delete_finished_before(pool, cutoff, batch).await?;
        total += deleted;
        if deleted < u64::try_from(batch).unwrap_or(u64::MAX) || stop.is_cancelled() {
            return Ok(total);
        }
        tokio::time::sleep(PAUSE).await;
    }
}

/// Sweeps every [`INTERVAL`] until `stop` (only when `days` is set).
pub async fn run(pool: PgPool, days: Option<u32>, stop: CancellationToken) {
    loop {
        if let Some(days) = days {
            match sweep(&pool, days, BATCH, &stop).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    jobs = n,
                    days,
                    "retention: deleted finished jobs and their logs"
                ),
                Err(e) => tracing::warn!(error = %e, "retention sweep failed; next one later"),
            }
        }
        if let Err(e) = sessions::delete_expired(&pool, BATCH).await {
            tracing::warn!(error = %e, "removing expired dashboard sessions failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}
