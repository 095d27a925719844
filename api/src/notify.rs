//! One `LISTEN` connection per replica, fanned out in-process: queued jobs wake the
//! dispatcher, cancel requests reach the worker connected here, log/finish pointers wake
//! live log streams, and revoked tokens leave the token cache. Notifications carry ids only, never log text.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::storage::queue::{CANCEL_CHANNEL, QUEUED_CHANNEL};
use crate::storage::schedules::SCHEDULES_CHANNEL;
use crate::storage::tokens::REVOKED_CHANNEL;

pub const LOGS_CHANNEL: &str = "baton_job_logs";
pub const OUTBOX_CHANNEL: &str = "baton_outbox";

/// Something changed for a job's live log readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSignal {
    /// New lines up to this sequence number are stored.
    Lines { job_id: Uuid, seq: i64 },
    /// The job reached a terminal status.
    Finished { job_id: Uuid },
    /// Notifications may have been missed (listener reconnected): everyone re-reads.
    Resync,
}

impl LogSignal {
    pub fn concerns(&self, job: Uuid) -> bool {
        match self {
            Self::Lines { job_id, .. } | Self::Finished { job_id } => *job_id == job,
            Self::Resync => true,
        }
    }

    fn parse(payload: &str) -> Option<Self> {
        let (id, rest) = payload.split_once(':')?;
        let job_id = Uuid::parse_str(id).ok()?;
        if rest == "done" {
            Some(Self::Finished { job_id })
        } else {
            Some(Self::Lines {
                job_id,
                seq: rest.parse().ok()?,
            })
        }
    }
}

/// Subscribe to learn when a job's logs or status change.
#[derive(Debug, Clone)]
pub struct LogHub {
    tx: broadcast::Sender<LogSignal>,
}

impl Default for LogHub {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(4096).0,
        }
    }
}

impl LogHub {
    pub fn subscribe(&self) -> broadcast::Receiver<LogSignal> {
        self.tx.subscribe()
    }

    fn publish(&self, signal: LogSignal) {
        // No subscribers is fine.
        let _ = self.tx.send(signal);
    }
}

/// Listens until `stop`; reconnects on its own (sqlx's listener does) and tells everyone to
/// resync after a reconnect, since notifications sent meanwhile are lost.
pub async fn run(state: crate::AppState, stop: CancellationToken) {
    let (pool, dispatcher, hub) = (
        state.pool.clone(),
        state.dispatcher.clone(),
        state.hub.clone(),
    );
    let mut first = true;
    loop {
        let mut listener = match connect(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if !first {
            // Revocations may have been missed.
            state.tokens.clear();
            state.outbox_wake.notify_one();
            state.schedules_wake.notify_one();
            dispatcher.wake_for_later();
            hub.publish(LogSignal::Resync);
        }
        first = false;
        loop {
            let note = tokio::select! {
                _ = stop.cancelled() => return,
                note = listener.try_recv() => note,
            };
            match note {
                Ok(Some(note)) => match note.channel() {
                    // The payload is the executor, with `:later` for a job not yet due.
                    QUEUED_CHANNEL if note.payload().ends_with(":later") => {
                        dispatcher.wake_for_later()
                    }
                    QUEUED_CHANNEL => dispatcher.wake(),
                    OUTBOX_CHANNEL => state.outbox_wake.notify_one(),
                    SCHEDULES_CHANNEL => state.schedules_wake.notify_one(),
                    REVOKED_CHANNEL => match Uuid::parse_str(note.payload()) {
                        Ok(id) => state.tokens.forget(id),
                        Err(_) => state.tokens.clear(),
                    },
                    // The payload is the job id, with `:force` for a cancel without grace.
                    CANCEL_CHANNEL => {
                        let (id, force) = match note.payload().strip_suffix(":force") {
                            Some(id) => (id, true),
                            None => (note.payload(), false),
                        };
                        if let Ok(job_id) = Uuid::parse_str(id) {
                            dispatcher.cancel(job_id, "cancelled through the API", force);
                        }
                    }
                    LOGS_CHANNEL => {
                        if let Some(signal) = LogSignal::parse(note.payload()) {
                            hub.publish(signal);
                        }
                    }
                    _ => {}
                },
                // The connection dropped; sqlx reconnects on the next call. Resync then.
                Ok(None) => {
                    state.tokens.clear();
                    state.schedules_wake.notify_one();
                    dispatcher.wake_for_later();
                    hub.publish(LogSignal::Resync);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                    break;
                }
            }
        }
    }
}

async fn connect(pool: &sqlx::PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([
            QUEUED_CHANNEL,
            CANCEL_CHANNEL,
            LOGS_CHANNEL,
            OUTBOX_CHANNEL,
            REVOKED_CHANNEL,
            SCHEDULES_CHANNEL,
        ])
        .await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pointers() {
        let id = Uuid::now_v7();
        assert_eq!(
            LogSignal::parse(&format!("{id}:42")),
            Some(LogSignal::Lines {
                job_id: id,
                seq: 42
            })
        );
        assert_eq!(
            LogSignal::parse(&format!("{id}:done")),
            Some(LogSignal::Finished { job_id: id })
        );
        assert_eq!(LogSignal::parse("garbage"), None);
        assert_eq!(LogSignal::parse(&format!("{id}:x")), None);
    }
}
