//! The database writes a worker's job messages ask for (`Started`, `Progress`, `LogBatch`,
//! `Finished`), applied as a group: the messages that were already waiting on a stream are
//! written in one transaction — one commit for many jobs' starts, log batches and completions
//! instead of one each.
//!
//! Completions that are all plain successes (the usual burst from a busy worker) skip the
//! transaction: one statement completes every one whose event has no actions.
//!
//! A refusal about one job (its lease is lost, a log gap, lines missing before a completion)
//! writes nothing and does not spoil the group: those checks come before any write. Any other
//! error (the database) rolls the group back, and its writes are applied again one per
//! transaction, so one bad write cannot hold back the others.

use std::collections::{HashMap, HashSet};

use sqlx::PgConnection;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::AppState;
use crate::model::JobStatus;
use crate::storage::StorageError;
use crate::storage::logs::{self, NewChunk};
use crate::storage::queue::{self, Completion, Outcome};

/// One job message's write, checked and decoded.
#[derive(Debug)]
pub(super) enum JobWrite {
    Started {
        job_id: Uuid,
        token: i64,
    },
    Progress {
        job_id: Uuid,
        token: i64,
        percent: i16,
    },
    Logs {
        job_id: Uuid,
        token: i64,
        /// Checked, and already masked.
        chunk: NewChunk,
    },
    Finished {
        job_id: Uuid,
        token: i64,
        outcome: Outcome,
        variables: HashMap<String, String>,
        /// The worker's run span (`Finished.traceparent`): the completion's parent.
        traceparent: Option<String>,
    },
}

impl JobWrite {
    /// A success with no variables to write: it can complete in one statement with others.
    fn plain_success(&self) -> Option<(Uuid, i64, &Outcome)> {
        match self {
            JobWrite::Finished {
                job_id,
                token,
                outcome,
                variables,
                ..
            } if outcome.error.is_none() && variables.is_empty() => {
                Some((*job_id, *token, outcome))
            }
            _ => None,
        }
    }

    pub(super) fn job_id(&self) -> Uuid {
        match self {
            JobWrite::Started { job_id, .. }
            | JobWrite::Progress { job_id, .. }
            | JobWrite::Logs { job_id, .. }
            | JobWrite::Finished { job_id, .. } => *job_id,
        }
    }
}

/// What a write did, acted on (acknowledged, counted) once its transaction committed.
#[derive(Debug)]
pub(super) enum Applied {
    Started,
    Progress,
    Logs {
        job_id: Uuid,
        stored_seq: i64,
        bytes: usize,
    },
    Finished {
        job_id: Uuid,
        done: Completion,
        outcome: Outcome,
    },
    /// Nothing was written for this message.
    Refused {
        job_id: Uuid,
        error: StorageError,
    },
}

/// Applies `writes` in order; returns what each did, in the same order.
pub(super) async fn apply(state: &AppState, writes: Vec<JobWrite>) -> Vec<Applied> {
    if let [write @ (JobWrite::Started { .. } | JobWrite::Progress { .. })] = writes.as_slice() {
        // One statement alone needs no transaction around it (two round trips fewer before
        // `started_at` is taken).
        let job_id = write.job_id();
        let done = match state.pool.acquire().await {
            Ok(mut conn) => write_one(state, &mut conn, write).await,
            Err(e) => Err(e.into()),
        };
        return vec![done.unwrap_or_else(|error| Applied::Refused { job_id, error })];
    }
    if writes.iter().all(|w| w.plain_success().is_some()) {
        return apply_successes(state, writes).await;
    }
    if writes.len() > 1 {
        match apply_in_one_transaction(state, &writes).await {
            Ok(applied) => return applied,
            Err(e) => {
                tracing::warn!(error = %e, writes = writes.len(), "a grouped write failed; applying its writes one by one");
            }
        }
    }
    one_by_one(state, writes).await
}

/// Completions that are all plain successes: one autocommitted statement for those whose event
/// has no actions, the usual path (one transaction each) for the rest — which also tells a
/// refused one apart.
async fn apply_successes(state: &AppState, writes: Vec<JobWrite>) -> Vec<Applied> {
    let runs: Vec<_> = writes.iter().filter_map(JobWrite::plain_success).collect();
    // A completion span per traced job, over the one statement completing them all.
    let _spans: Vec<tracing::Span> = writes
        .iter()
        .filter_map(|w| match w {
            JobWrite::Finished {
                job_id,
                traceparent: Some(tp),
                ..
            } => Some(completion_span(*job_id, Some(tp))),
            _ => None,
        })
        .collect();
    let mut completed: HashSet<Uuid> = match queue::complete_successes(&state.pool, &runs).await {
        Ok(ids) => ids.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, writes = writes.len(), "completing a group failed; completing its jobs one by one");
            HashSet::new()
        }
    };
    let mut slots = Vec::with_capacity(writes.len());
    let mut others = Vec::new();
    for write in writes {
        match write {
            // `remove`: a job reported twice in one group completes once.
            JobWrite::Finished {
                job_id, outcome, ..
            } if completed.remove(&job_id) => slots.push(Ok(Applied::Finished {
                job_id,
                done: Completion::Finished {
                    status: JobStatus::Succeeded,
                    dead: false,
                    has_actions: false,
                },
                outcome,
            })),
            other => {
                slots.push(Err(other.job_id()));
                others.push(other);
            }
        }
    }
    let mut others = one_by_one(state, others).await.into_iter();
    slots
        .into_iter()
        .map(|slot| {
            slot.unwrap_or_else(|job_id| {
                // `one_by_one` answers every write; this is only a fallback.
                others.next().unwrap_or(Applied::Refused {
                    job_id,
                    error: StorageError::JobNotFound(job_id),
                })
            })
        })
        .collect()
}

/// Each write in its own transaction, so one failing write cannot hold back the others.
async fn one_by_one(state: &AppState, writes: Vec<JobWrite>) -> Vec<Applied> {
    let mut applied = Vec::with_capacity(writes.len());
    for write in writes {
        let job_id = write.job_id();
        let single = std::slice::from_ref(&write);
        applied.push(match apply_in_one_transaction(state, single).await {
            Ok(mut one) => one.pop().unwrap_or(Applied::Refused {
                job_id,
                error: StorageError::JobNotFound(job_id),
            }),
            Err(error) => Applied::Refused { job_id, error },
        });
    }
    applied
}

async fn apply_in_one_transaction(
    state: &AppState,
    writes: &[JobWrite],
) -> Result<Vec<Applied>, StorageError> {
    let mut tx = state.pool.begin().await?;
    let mut applied = Vec::with_capacity(writes.len());
    for write in writes {
        applied.push(write_one(state, &mut tx, write).await?);
    }
    tx.commit().await?;
    Ok(applied)
}

/// Errors decided before the write makes any change, so the transaction can go on.
fn is_refusal(e: &StorageError) -> bool {
    matches!(
        e,
        StorageError::LeaseLost { .. }
            | StorageError::JobNotFound(_)
            | StorageError::LogGap { .. }
            | StorageError::LogsIncomplete { .. }
    )
}

/// One write. A refusal is an [`Applied::Refused`]; an error returned here aborts the
/// transaction.
async fn write_one(
    state: &AppState,
    conn: &mut PgConnection,
    write: &JobWrite,
) -> Result<Applied, StorageError> {
    let job_id = write.job_id();
    let refused = |error: StorageError| {
        if is_refusal(&error) {
            Ok(Applied::Refused { job_id, error })
        } else {
            Err(error)
        }
    };
    match write {
        JobWrite::Started { token, .. } => {
            match queue::mark_running(&mut *conn, job_id, *token).await {
                Ok(()) => Ok(Applied::Started),
                Err(e) => refused(e),
            }
        }
        JobWrite::Progress { token, percent, .. } => {
            match queue::set_progress(&mut *conn, job_id, *token, *percent).await {
                Ok(()) => Ok(Applied::Progress),
                Err(e) => refused(e),
            }
        }
        JobWrite::Logs { token, chunk, .. } => {
            let appended = logs::append_batch(
                conn,
                job_id,
                *token,
                chunk,
                state.config.log_cap_bytes,
                state.config.lease,
            )
            .await;
            match appended {
                Ok(appended) => Ok(Applied::Logs {
                    job_id,
                    stored_seq: appended.stored_seq,
                    bytes: chunk.summary.text_bytes,
                }),
                Err(e) => refused(e),
            }
        }
        JobWrite::Finished {
            token,
            outcome,
            variables,
            traceparent,
            ..
        } => {
            // The completion and the actions it fires (chained jobs continue this trace).
            let span = completion_span(job_id, traceparent.as_deref());
            async {
                let done = match queue::complete(conn, job_id, *token, outcome).await {
                    Ok(done) => done,
                    Err(e) => return refused(e),
                };
                if let Completion::Finished { has_actions, .. } = done
                    && (has_actions || !variables.is_empty())
                {
                    // Past the completion's write: whatever fails here aborts the transaction.
                    crate::actions::after_finish(
                        conn,
                        &state.vault,
                        state.config.chain_depth_limit,
                        job_id,
                        variables,
                    )
                    .await?;
                }
                Ok(Applied::Finished {
                    job_id,
                    done,
                    outcome: outcome.clone(),
                })
            }
            .instrument(span)
            .await
        }
    }
}

/// The span of a job's completion, a child of the worker's run (`traceparent`).
fn completion_span(job_id: Uuid, traceparent: Option<&str>) -> tracing::Span {
    let span =
        tracing::info_span!("job.complete", job.id = %job_id, trace_id = tracing::field::Empty);
    baton_telemetry::link(&span, traceparent);
    span
}
