//! The database side of the `/metrics` gauges: one statement, read by the metrics refresh
//! loop (never by a scrape).

use sqlx::PgExecutor;

use super::Result;

/// What the database says now about the queue and the outbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueGauges {
    /// Jobs `queued` (due or not), `claimed` and `running`.
    pub queued: i64,
    pub claimed: i64,
    pub running: i64,
    /// Queued jobs by priority (only priorities that have some).
    pub queued_by_priority: Vec<(i32, i64)>,
    /// Messages waiting for delivery (`pending`, including those waiting for a retry).
    pub outbox_pending: i64,
    /// Running jobs flagged stuck (the event's `stuck_after_seconds`).
    pub stuck: i64,
}

/// Reads every gauge in one round trip.
pub async fn read(db: impl PgExecutor<'_>) -> Result<QueueGauges> {
    let rows: Vec<(String, Option<String>, i64)> = sqlx::query_as(
        "SELECT 'status', status, count(*) FROM jobs
           WHERE status IN ('queued', 'claimed', 'running') GROUP BY status
         UNION ALL
         SELECT 'priority', priority::text, count(*) FROM jobs WHERE status = 'queued' GROUP BY priority
         UNION ALL
         SELECT 'outbox', NULL, count(*) FROM message_outbox WHERE status = 'pending'
         UNION ALL
         SELECT 'stuck', NULL, count(*) FROM jobs WHERE status = 'running' AND stuck",
    )
    .fetch_all(db)
    .await?;
    let mut gauges = QueueGauges::default();
    for (kind, key, n) in rows {
        match (kind.as_str(), key.as_deref()) {
            ("status", Some("queued")) => gauges.queued = n,
            ("status", Some("claimed")) => gauges.claimed = n,
            ("status", Some("running")) => gauges.running = n,
            ("priority", Some(p)) => {
                if let Ok(p) = p.parse() {
                    gauges.queued_by_priority.push((p, n));
                }
            }
            ("outbox", _) => gauges.outbox_pending = n,
            ("stuck", _) => gauges.stuck = n,
            _ => {}
        }
    }
    gauges.queued_by_priority.sort_unstable();
    Ok(gauges)
}
