//! The reaper: returns jobs whose worker stopped renewing its lease to the queue. Every
//! replica runs one; the claim's `SKIP LOCKED` makes concurrent reapers harmless.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::storage::queue;

pub async fn run(pool: PgPool, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match queue::reap_expired(&pool).await {
            Ok(reaped) => {
                for job in reaped {
                    tracing::warn!(job.id = %job.id, status = %job.status, attempt = job.attempt, "lease expired; job taken back");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reaper pass failed; will retry"),
        }
    }
}
