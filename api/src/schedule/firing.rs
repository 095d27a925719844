//! The firing loop every replica runs (no leader, no lease).
//!
//! A replica sleeps until the earliest `next_due_at` of all unpaused schedules (read once per
//! wake-up), woken early by `NOTIFY baton_schedules` when any replica creates or changes a
//! schedule, with a slow fallback poll. Then it fires what is due, in transactions of up to
//! [`BATCH`] schedules: lock the due rows `FOR UPDATE SKIP LOCKED`, insert each slot's job
//! with `ON CONFLICT (schedule_id, scheduled_for) DO NOTHING`, advance `next_fire_at`,
//! commit. A fire and the advance commit together or not at all, and the unique index
//! refuses a second job for a slot whatever happens, so a slot fires exactly once: two
//! replicas skip each other's locked rows, a replica that dies mid-transaction leaves
//! nothing behind (its rows unlock and the others fire them on their next wake-up).
//!
//! The clock is injected ([`Clock`]). The production clock is the system clock: the loop
//! needs a local clock to sleep on anyway, and exactly-once does not depend on it (only the
//! row locks and the unique index do); replicas' clocks (NTP) only shift how late or early
//! within their skew a fire is. The jobs' `run_at` and `created_at` are the database's `now()`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::ScheduleSpec;
use crate::actions::Effects;
use crate::storage::schedules::{self, NextSlot, ScheduleRow};
use crate::storage::{Result, events, queue};

/// Schedules fired per transaction.
pub const BATCH: i64 = 64;
/// The longest sleep without a look at the schedules (covers a lost notification).
pub const FALLBACK_POLL: Duration = Duration::from_secs(30);
/// The pause when the due schedules are all locked by another replica, or after an error.
const BUSY_PAUSE: Duration = Duration::from_millis(20);
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Where the firing loop gets the time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock (see the module documentation for why).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// What one pass fired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FireReport {
    /// Schedules evaluated (locked and advanced).
    pub schedules: u64,
    /// Jobs (or workflow runs) inserted.
    pub jobs: u64,
    /// Slots whose job already existed (never a second job).
    pub duplicates: u64,
}

/// Fires every schedule due at `now`, in transactions of up to [`BATCH`] schedules. Each
/// run enters its event's concurrency group as it is queued (`skip` may end it at once, a
/// recorded skipped job that fires its actions: hence `effects`).
pub async fn fire_due(pool: &PgPool, now: DateTime<Utc>, effects: &Effects) -> Result<FireReport> {
    let mut report = FireReport::default();
    loop {
        let mut tx = pool.begin().await?;
        let due = schedules::lock_due(&mut *tx, now, BATCH).await?;
        for row in &due {
            fire_one(&mut tx, row, now, effects, &mut report).await?;
        }
        tx.commit().await?;
        report.schedules += due.len() as u64;
        if (due.len() as i64) < BATCH {
            return Ok(report);
        }
    }
}

/// Fires one locked schedule's due slots and advances it, in the caller's transaction.
async fn fire_one(
    tx: &mut sqlx::PgConnection,
    row: &ScheduleRow,
    now: DateTime<Utc>,
    effects: &Effects,
    report: &mut FireReport,
) -> Result<()> {
    let Some(next) = row.next_fire_at else {
        return Ok(());
    };
    let spec = match ScheduleSpec::compile(&row.fields(), row.id, row.anchor_at) {
        Ok(spec) => spec,
        Err(e) => {
            // Stored definitions were validated; a time zone database update could still
            // retire a zone. End the schedule rather than retry it forever.
            tracing::warn!(schedule = %row.id, error = %e, "schedule no longer valid; ending it");
            let ended = NextSlot {
                fire_at: None,
                due_at: None,
            };
            return schedules::advance(&mut *tx, row.id, ended, None).await;
        }
    };
    let slots = spec.decide(next, now);
    if slots.passed_over > 0 {
        tracing::info!(schedule = %row.id, passed_over = slots.passed_over, missed = %row.missed,
            "slots passed while the schedule was not fired");
    }
    if let (Some(workflow_id), false) = (row.workflow_id, slots.fire.is_empty()) {
        // Deleting the workflow deletes its schedules (in the same transaction).
        let workflow = crate::storage::workflows::get_workflow(&mut *tx, workflow_id).await?;
        for slot in &slots.fire {
            let started = crate::workflow::engine::start_scheduled_run(
                tx,
                &workflow,
                &row.input.0,
                row.created_by,
                (row.id, *slot),
            )
            .await?;
            match started {
                Some(_) => report.jobs += 1,
                None => report.duplicates += 1,
            }
        }
    } else if let (Some(event_id), false) = (row.event_id, slots.fire.is_empty()) {
        // Deleting the event deletes its schedules (in the same transaction as the event).
        let event = events::get_event(&mut *tx, event_id).await?;
        for slot in &slots.fire {
            let job = queue::NewJob {
                event: &event,
                input: row.input.0.clone(),
                priority: event.spec.priority,
                run_at: None,
                idempotency_key: None,
                parent: None,
                created_by: row.created_by,
                trace_context: baton_telemetry::current_traceparent(),
            };
            match queue::enqueue_scheduled(&mut *tx, &job, row.id, *slot).await? {
                Some(job_id) => {
                    report.jobs += 1;
                    crate::metrics::job_enqueued();
                    // How late the slot fires after its due time (nominal + jitter): the
                    // firing loop's own lateness, plus any catch-up after downtime or a pause.
                    let lag = (now - spec.due_at(*slot)).to_std().unwrap_or_default();
                    metrics::histogram!(crate::metrics::SCHEDULE_LAG).record(lag.as_secs_f64());
                    if crate::admission::needed(&event) {
                        crate::admission::admit(
                            tx,
                            &effects.vault,
                            effects.chain_depth_limit,
                            job_id,
                        )
                        .await?;
                    }
                }
                None => report.duplicates += 1,
            }
        }
    }
    let advanced = NextSlot {
        fire_at: slots.next,
        due_at: slots.next.map(|n| spec.due_at(n)),
    };
    schedules::advance(&mut *tx, row.id, advanced, slots.fire.last().copied()).await
}

/// The firing loop of one replica.
pub struct Scheduler {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    wake: Arc<Notify>,
    effects: Effects,
}

impl Scheduler {
    pub fn new(pool: PgPool, clock: Arc<dyn Clock>, wake: Arc<Notify>, effects: Effects) -> Self {
        Self {
            pool,
            clock,
            wake,
            effects,
        }
    }

    /// Fires due schedules until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let wait = match self.pass().await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::warn!(error = %e, "firing schedules failed; retrying");
                    ERROR_PAUSE
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Fires what is due and says how long to sleep.
    async fn pass(&self) -> Result<Duration> {
        let report = fire_due(&self.pool, self.clock.now(), &self.effects).await?;
        if report.jobs > 0 {
            tracing::debug!(?report, "schedules fired");
        }
        let Some(next) = schedules::earliest_due(&self.pool).await? else {
            return Ok(FALLBACK_POLL);
        };
        Ok(match (next - self.clock.now()).to_std() {
            // Due but not ours (locked by another replica's firing transaction), or due
            // since the pass: look again shortly.
            Err(_) => BUSY_PAUSE,
            Ok(wait) => wait.min(FALLBACK_POLL),
        })
    }
}
