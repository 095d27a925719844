//! Admission of a new run into its concurrency group, for events whose strategy is `skip` or
//! `cancel_previous` (a `queue` run needs nothing at enqueue: the claim keeps its group within
//! `max`). Called in the enqueue's transaction, after the insert: the group's lock (a
//! transaction-level advisory lock, the one the claim tries) is taken, the group's other
//! unfinished runs are read with a snapshot that includes every admission that committed
//! before, the pure policy decides (`crate::policy::concurrency::admit`), and the decision is
//! applied — a skipped run ends `cancelled` with `error.kind = "concurrency"` and fires its
//! actions like any terminal job, in the same transaction.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::crypto::Vault;
use crate::model::Event;
use crate::model::event::ConcurrencyStrategy;
use crate::policy::concurrency;
use crate::storage::{StorageError, actions, queue};

/// Whether runs of `event` go through [`admit`] when queued.
pub fn needed(event: &Event) -> bool {
    event.spec.concurrency.as_ref().is_some_and(|c| {
        matches!(
            c.strategy,
            ConcurrencyStrategy::Skip | ConcurrencyStrategy::CancelPrevious
        )
    })
}

/// What admission did with the new run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// It is queued (and waits for a free slot of its group).
    Queued,
    /// It was ended at once (`skip`, its group was full).
    Skipped,
}

/// Admits the freshly inserted, still uncommitted job `job_id` into its group, in the
/// caller's transaction (see the module documentation).
pub async fn admit(
    conn: &mut PgConnection,
    vault: &Vault,
    chain_depth_limit: i32,
    job_id: Uuid,
) -> Result<Admitted, StorageError> {
    use crate::storage::concurrency as groups;
    let Some(group) = groups::group_of(&mut *conn, job_id).await? else {
        return Ok(Admitted::Queued);
    };
    let policy = &group.policy.0;
    if policy.strategy == ConcurrencyStrategy::Queue || group.status != "queued" {
        return Ok(Admitted::Queued);
    }
    groups::lock_group(conn, group.event_id, &group.concurrency_key).await?;
    let earlier =
        groups::unfinished(&mut *conn, group.event_id, &group.concurrency_key, job_id).await?;
    let decision = concurrency::admit(policy, &earlier);
    let key = describe_key(&group.concurrency_key);
    if decision.skip_new {
        let message = format!(
            "skipped: its concurrency group{key} already had {} unfinished run(s) (max {}, strategy skip)",
            earlier.len(),
            policy.max
        );
        for id in groups::end_queued(&mut *conn, &[job_id], &message).await? {
            Box::pin(crate::actions::after_terminal(
                conn,
                vault,
                chain_depth_limit,
                id,
            ))
            .await?;
        }
        return Ok(Admitted::Skipped);
    }
    if !decision.cancel_queued.is_empty() {
        let message = format!(
            "cancelled before it started: newer run {job_id} of its concurrency group{key} replaced it (strategy cancel_previous)"
        );
        for id in groups::end_queued(&mut *conn, &decision.cancel_queued, &message).await? {
            Box::pin(crate::actions::after_terminal(
                conn,
                vault,
                chain_depth_limit,
                id,
            ))
            .await?;
        }
    }
    for id in decision.cancel_running {
        match queue::request_cancel(conn, id, false).await {
            Ok(_) => {
                let note = format!(
                    "cancelled by newer run {job_id} of its concurrency group{key} (strategy cancel_previous)"
                );
                actions::add_note(&mut *conn, id, &note).await?;
            }
            // It ended in the meantime: nothing to cancel.
            Err(StorageError::JobFinished { .. } | StorageError::JobNotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Admitted::Queued)
}

fn describe_key(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!(" {key:?}")
    }
}
