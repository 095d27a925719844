//! Announces the jobs this replica's REST API queued: one `NOTIFY baton_job_queued` per burst.
//!
//! PostgreSQL serialises commits that `NOTIFY` (a database-wide lock through commit, then a
//! signal to every listener), so a notification per run bounded how fast runs could be queued.
//! A run queued through `POST /events/{id}/run` is inserted without one
//! ([`crate::storage::queue::enqueue_audited`]); the handler wakes this replica's dispatcher
//! in-process and asks the announcer to tell the other replicas. The announcer sends one
//! notification at a time: the runs queued while one is on its way share the next. A failed
//! notification is sent again (after a short pause). If this replica dies between a run's
//! commit and its announcement, the other replicas find the job on their fallback poll
//! (seconds), and nothing is lost.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::storage::queue::QUEUED_CHANNEL;

const DUE_NOW: u8 = 1;
const LATER: u8 = 2;
/// The pause before a failed notification is sent again.
const RETRY_AFTER: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
pub struct Announcer {
    /// What the next notification must say (`DUE_NOW` and/or `LATER`).
    pending: AtomicU8,
    wake: Notify,
}

impl Announcer {
    /// A run was queued (and committed); `later` when it is not due yet.
    pub fn queued(&self, later: bool) {
        self.pending
            .fetch_or(if later { LATER } else { DUE_NOW }, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Sends the announcements until `stop`, then the last one owed. The replica stops it
    /// after its HTTP server drained, so runs queued during the drain are announced too.
    pub async fn run(&self, pool: PgPool, stop: CancellationToken) {
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = self.wake.notified() => false,
            };
            if !self.announce(&pool).await && !stopping {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                }
                self.wake.notify_one();
                continue;
            }
            if stopping {
                return;
            }
        }
    }

    /// Sends what is owed, if anything; false when that failed (it stays owed).
    async fn announce(&self, pool: &PgPool) -> bool {
        let pending = self.pending.swap(0, Ordering::SeqCst);
        if pending == 0 {
            return true;
        }
        // The payload names no executor (dispatchers do not filter on it); `:later` makes
        // them look up when the next delayed job is due.
        let payload = if pending & LATER != 0 {
            "any:later"
        } else {
            "any"
        };
        if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(QUEUED_CHANNEL)
            .bind(payload)
            .execute(pool)
            .await
        {
            tracing::warn!(error = %e, "could not announce queued jobs; trying again");
            self.pending.fetch_or(pending, Ordering::SeqCst);
            return false;
        }
        true
    }
}
