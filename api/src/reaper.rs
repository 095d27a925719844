//! The reaper: returns jobs whose worker stopped renewing its lease to the queue, and ends
//! those that must not run again (a cancel was pending, or too many leases were lost) together
//! with the actions their end fires; and flags running jobs that went silent past their
//! event's `stuck_after_seconds` as stuck, with their `on_stuck` actions. Every replica runs
//! one; `SKIP LOCKED` makes concurrent reapers harmless.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::crypto::Vault;
use crate::storage::StorageError;
use crate::storage::queue::{self, ReapedJob};

/// The most jobs one pass ends (each in its own transaction); the rest wait for the next pass.
const MAX_FINISHED_PER_PASS: usize = 1000;

/// What the reaper needs: the database, the vault (actions may write secrets) and the chain
/// depth limit (actions may start runs).
#[derive(Debug, Clone)]
pub struct Reaper {
    pub pool: PgPool,
    pub vault: Vault,
    pub chain_depth_limit: i32,
}

impl Reaper {
    pub fn from_state(state: &crate::AppState) -> Self {
        Self {
            pool: state.pool.clone(),
            vault: state.vault.clone(),
            chain_depth_limit: state.config.chain_depth_limit,
        }
    }

    /// Reaps every `every` until `stop` is cancelled.
    pub async fn run(self, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reap_once().await {
                Ok(reaped) => {
                    for job in reaped {
                        tracing::warn!(job.id = %job.id, status = %job.status, attempt = job.attempt, "lease expired; job taken back");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reaper pass failed; will retry"),
            }
        }
    }

    /// One pass: ends the expired jobs that must not run again, each in its own transaction
    /// with the actions its end fires (so both commit, or neither), then requeues the others.
    /// A failure while ending one job rolls that job back untouched; it is retried next pass,
    /// and the requeueing still happens.
    pub async fn reap_once(&self) -> Result<Vec<ReapedJob>, StorageError> {
        let mut reaped = Vec::new();
        let mut failure = None;
        while reaped.len() < MAX_FINISHED_PER_PASS {
            match self.finish_one().await {
                Ok(Some(job)) => reaped.push(job),
                Ok(None) => break,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        match queue::reap_expired(&self.pool).await {
            Ok(requeued) => reaped.extend(requeued),
            Err(e) => failure = failure.or(Some(e)),
        }
        for _ in 0..MAX_FINISHED_PER_PASS {
            match self.flag_stuck_one().await {
                Ok(Some(job_id)) => {
                    tracing::warn!(job.id = %job_id, "job flagged stuck: no log line or progress within its event's stuck_after_seconds");
                }
                Ok(None) => break,
                Err(e) => {
                    failure = failure.or(Some(e));
                    break;
                }
            }
        }
        if let Some(e) = failure {
            for job in &reaped {
                tracing::warn!(job.id = %job.id, status = %job.status, "lease expired; job taken back");
            }
            return Err(e);
        }
        Ok(reaped)
    }

    /// Flags one silent running job as stuck and fires its `on_stuck` actions, in one
    /// transaction: the actions fire once per time the job becomes stuck.
    async fn flag_stuck_one(&self) -> Result<Option<uuid::Uuid>, StorageError> {
        let mut tx = self.pool.begin().await?;
        let Some(job_id) = crate::storage::stuck::flag_one(&mut *tx).await? else {
            return Ok(None);
        };
        crate::actions::after_stuck(&mut tx, &self.vault, self.chain_depth_limit, job_id).await?;
        tx.commit().await?;
        Ok(Some(job_id))
    }

    async fn finish_one(&self) -> Result<Option<ReapedJob>, StorageError> {
        let mut tx = self.pool.begin().await?;
        let Some(job) = queue::finish_expired(&mut *tx).await? else {
            return Ok(None);
        };
        crate::actions::after_terminal(&mut tx, &self.vault, self.chain_depth_limit, job.id)
            .await?;
        tx.commit().await?;
        crate::metrics::job_finished(job.status.as_str());
        Ok(Some(job))
    }
}
