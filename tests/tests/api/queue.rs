//! The queue's guarantees, exercised through the storage layer on a real database.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use baton_api::model::job::ErrorKind;
use baton_api::model::{Event, JobStatus, NewEvent};
use baton_api::storage::queue::{self, ClaimRequest, Completion, NewJob, Outcome};
use baton_api::storage::{StorageError, events};
use baton_tests::test_pool;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Barrier;
use uuid::Uuid;

async fn event(pool: &PgPool, name: &str, max_attempts: i32) -> Event {
    let mut spec: NewEvent = serde_json::from_value(json!({
        "name": name, "runtime": "bash", "content": "true", "executor": "local",
        "max_attempts": max_attempts, "retry_backoff_seconds": 0
    }))
    .expect("spec");
    spec.validate().expect("valid");
    events::insert_event(pool, &spec)
        .await
        .expect("insert event")
}

fn new_job(event: &Event) -> NewJob<'_> {
    NewJob {
        event,
        input: json!({}),
        priority: 0,
        run_at: None,
        idempotency_key: None,
        parent: None,
        created_by: None,
        trace_context: None,
    }
}

fn offer(
    worker_id: Uuid,
    limit: i64,
    lease: Duration,
) -> (
    Vec<String>,
    serde_json::Map<String, serde_json::Value>,
    Uuid,
    i64,
    Duration,
) {
    (
        vec!["local".to_owned()],
        serde_json::Map::new(),
        worker_id,
        limit,
        lease,
    )
}

async fn claim(
    pool: &PgPool,
    worker_id: Uuid,
    limit: i64,
    lease: Duration,
) -> Vec<queue::ClaimedJob> {
    let (executors, labels, worker_id, limit, lease) = offer(worker_id, limit, lease);
    queue::claim_batch(
        pool,
        &ClaimRequest {
            worker_id,
            executors: &executors,
            labels: &labels,
            limit,
            lease,
        },
    )
    .await
    .expect("claim")
}

#[tokio::test]
async fn concurrent_claimers_never_claim_a_job_twice() {
    let pool = test_pool().await;
    let ev = event(&pool, "many", 1).await;
    let mut all = HashSet::new();
    for _ in 0..400 {
        all.insert(
            queue::enqueue(&pool, &new_job(&ev))
                .await
                .expect("enqueue")
                .job_id,
        );
    }
    const CLAIMERS: usize = 8;
    let barrier = Arc::new(Barrier::new(CLAIMERS));
    let mut tasks = Vec::new();
    for _ in 0..CLAIMERS {
        let (pool, barrier) = (pool.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let worker = Uuid::now_v7();
            let mut mine = Vec::new();
            // Everyone starts claiming at the same instant, and keeps going until empty.
            barrier.wait().await;
            loop {
                let batch = claim(&pool, worker, 7, Duration::from_secs(60)).await;
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch.into_iter().map(|j| j.id));
            }
        }));
    }
    let mut seen = HashSet::new();
    for task in tasks {
        for id in task.await.expect("claimer") {
            assert!(seen.insert(id), "job {id} was claimed twice");
        }
    }
    assert_eq!(seen, all, "every job claimed exactly once");
}

#[tokio::test]
async fn claims_by_priority_then_run_at_then_id() {
    let pool = test_pool().await;
    let ev = event(&pool, "order", 1).await;
    let now = chrono::Utc::now();
    let enqueue = |priority: i32, secs_ago: i64| {
        let pool = pool.clone();
        let ev = ev.clone();
        async move {
            let job = NewJob {
                priority,
                run_at: Some(now - chrono::Duration::seconds(secs_ago)),
                ..new_job(&ev)
            };
            queue::enqueue(&pool, &job).await.expect("enqueue").job_id
        }
    };
    let low_old = enqueue(0, 100).await;
    let high_new = enqueue(10, 1).await;
    let high_old = enqueue(10, 50).await;
    let low_new = enqueue(0, 2).await;
    let future = {
        let job = NewJob {
            priority: 100,
            run_at: Some(now + chrono::Duration::hours(1)),
            ..new_job(&ev)
        };
        queue::enqueue(&pool, &job).await.expect("enqueue").job_id
    };
    let claimed: Vec<Uuid> = claim(&pool, Uuid::now_v7(), 10, Duration::from_secs(60))
        .await
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(
        claimed,
        vec![high_old, high_new, low_old, low_new],
        "not yet due jobs wait"
    );
    assert!(!claimed.contains(&future));
    let due = queue::next_due_at(&pool)
        .await
        .expect("next due")
        .expect("one pending");
    assert!(due > now);

    // Batches respect the limit.
    let ev2 = event(&pool, "order2", 1).await;
    for _ in 0..5 {
        queue::enqueue(&pool, &new_job(&ev2))
            .await
            .expect("enqueue");
    }
    assert_eq!(
        claim(&pool, Uuid::now_v7(), 3, Duration::from_secs(60))
            .await
            .len(),
        3
    );
}

#[tokio::test]
async fn claims_only_what_the_worker_can_run() {
    let pool = test_pool().await;
    let mut spec: NewEvent = serde_json::from_value(json!({
        "name": "gpu", "runtime": "bash", "content": "true", "executor": "local", "labels": {"gpu": "yes"}
    }))
    .expect("spec");
    spec.validate().expect("valid");
    let ev = events::insert_event(&pool, &spec).await.expect("event");
    let id = queue::enqueue(&pool, &new_job(&ev))
        .await
        .expect("enqueue")
        .job_id;
    // No labels: nothing. Other executor: nothing.
    assert!(
        claim(&pool, Uuid::now_v7(), 10, Duration::from_secs(60))
            .await
            .is_empty()
    );
    let mut labels = serde_json::Map::new();
    labels.insert("gpu".into(), json!("yes"));
    labels.insert("zone".into(), json!("a"));
    let container = vec!["container".to_owned()];
    let req = ClaimRequest {
        worker_id: Uuid::now_v7(),
        executors: &container,
        labels: &labels,
        limit: 10,
        lease: Duration::from_secs(60),
    };
    assert!(
        queue::claim_batch(&pool, &req)
            .await
            .expect("claim")
            .is_empty()
    );
    let local = vec!["local".to_owned(), "container".to_owned()];
    let req = ClaimRequest {
        executors: &local,
        ..req
    };
    let got = queue::claim_batch(&pool, &req).await.expect("claim");
    assert_eq!(got.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id]);
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job_even_under_a_race() {
    let pool = test_pool().await;
    let ev = event(&pool, "idem", 1).await;
    let barrier = Arc::new(Barrier::new(6));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (pool, ev, barrier) = (pool.clone(), ev.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let job = NewJob {
                idempotency_key: Some("deploy-42"),
                ..new_job(&ev)
            };
            queue::enqueue(&pool, &job).await.expect("enqueue")
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("task"));
    }
    let ids: HashSet<Uuid> = results.iter().map(|r| r.job_id).collect();
    assert_eq!(ids.len(), 1, "one job for one key");
    assert_eq!(
        results.iter().filter(|r| r.created).count(),
        1,
        "created exactly once"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(count, 1);
}

#[tokio::test]
async fn fencing_rejects_a_stale_completion() {
    let pool = test_pool().await;
    let ev = event(&pool, "fence", 3).await;
    let id = queue::enqueue(&pool, &new_job(&ev))
        .await
        .expect("enqueue")
        .job_id;
    let first = claim(&pool, Uuid::now_v7(), 1, Duration::from_millis(1))
        .await
        .remove(0);
    // The first worker's lease expires; the reaper hands the job to a second worker.
    wait_until_lease_expired(&pool, id).await;
    let reaped = queue::reap_expired(&pool).await.expect("reap");
    assert_eq!(reaped.len(), 1);
    let second = claim(&pool, Uuid::now_v7(), 1, Duration::from_secs(60))
        .await
        .remove(0);
    assert_eq!(second.id, id);
    assert_ne!(second.lease_token, first.lease_token);

    let mut conn = pool.acquire().await.expect("conn");
    let stale = queue::complete(&mut conn, id, first.lease_token, &Outcome::success()).await;
    assert!(
        matches!(stale, Err(StorageError::LeaseLost { job_id }) if job_id == id),
        "{stale:?}"
    );
    assert!(matches!(
        queue::mark_running(&mut *conn, id, first.lease_token).await,
        Err(StorageError::LeaseLost { .. })
    ));
    let job = queue::get_job(&pool, id).await.expect("job");
    assert_eq!(
        job.status,
        JobStatus::Claimed,
        "the stale report wrote nothing"
    );

    queue::mark_running(&mut *conn, id, second.lease_token)
        .await
        .expect("running");
    let done = queue::complete(&mut conn, id, second.lease_token, &Outcome::success())
        .await
        .expect("complete");
    assert_eq!(
        done,
        Completion::Finished {
            status: JobStatus::Succeeded,
            dead: false,
            has_actions: false,
        }
    );
    // Completing twice is refused too: the lease is gone once the job finished.
    assert!(matches!(
        queue::complete(&mut conn, id, second.lease_token, &Outcome::success()).await,
        Err(StorageError::LeaseLost { .. })
    ));
    assert!(matches!(
        queue::complete(&mut conn, Uuid::now_v7(), 1, &Outcome::success()).await,
        Err(StorageError::JobNotFound(_))
    ));
}

async fn wait_until_lease_expired(pool: &PgPool, id: Uuid) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let expired: bool =
            sqlx::query_scalar("SELECT lease_expires_at < now() FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
                .expect("lease");
        if expired {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "lease never expired");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn reaper_requeues_an_expired_lease_with_the_next_attempt() {
    let pool = test_pool().await;
    let ev = event(&pool, "reap", 1).await;
    let id = queue::enqueue(&pool, &new_job(&ev))
        .await
        .expect("enqueue")
        .job_id;
    let live = queue::enqueue(&pool, &new_job(&ev))
        .await
        .expect("enqueue")
        .job_id;
    let worker = Uuid::now_v7();
    let claimed = claim(&pool, worker, 1, Duration::from_millis(1)).await;
    assert_eq!(claimed[0].id, id);
    let other = claim(&pool, worker, 1, Duration::from_secs(600)).await;
    assert_eq!(other[0].id, live);
    wait_until_lease_expired(&pool, id).await;

    let reaped = queue::reap_expired(&pool).await.expect("reap");
    assert_eq!(reaped.len(), 1, "only the expired lease is taken back");
    let job = queue::get_job(&pool, id).await.expect("job");
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempt, 2);
    assert_eq!(job.error.expect("reason").kind, ErrorKind::LeaseLost);
    assert_eq!(job.worker_id, None);
    // A lost lease does not use up the event's attempts: it runs again, and can succeed.
    let again = claim(&pool, Uuid::now_v7(), 5, Duration::from_secs(60)).await;
    assert_eq!(again.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id]);
    let mut conn = pool.acquire().await.expect("conn");
    queue::complete(&mut conn, id, again[0].lease_token, &Outcome::success())
        .await
        .expect("complete");
    let job = queue::get_job(&pool, id).await.expect("job");
    assert_eq!((job.status, job.error), (JobStatus::Succeeded, None));
}

#[tokio::test]
async fn renewing_keeps_the_lease_and_reports_lost_ones_and_cancels() {
    let pool = test_pool().await;
    let ev = event(&pool, "renew", 1).await;
    let a = queue::enqueue(&pool, &new_job(&ev))
        .await
        .expect("enqueue")
        .job_id;
    let b = queue::enqueue(&pool, &new_job(&ev))
        .await
        .expect("enqueue")
        .job_id;
    let worker = Uuid::now_v7();
    let jobs = claim(&pool, worker, 2, Duration::from_secs(60)).await;
    let leases: Vec<(Uuid, i64)> = jobs.iter().map(|j| (j.id, j.lease_token)).collect();
    let mut conn = pool.acquire().await.expect("conn");
    assert!(matches!(
        queue::request_cancel(&mut conn, b, false).await,
        Ok(queue::CancelOutcome::Requested { .. })
    ));
    let held = queue::renew_leases(&pool, worker, &leases, Duration::from_secs(60))
        .await
        .expect("renew");
    assert_eq!(held.len(), 2);
    assert!(held.iter().any(|h| h.id == b && h.cancel_requested));
    assert!(held.iter().any(|h| h.id == a && !h.cancel_requested));
    // Another worker id, or a wrong token, holds nothing.
    assert!(
        queue::renew_leases(&pool, Uuid::now_v7(), &leases, Duration::from_secs(60))
            .await
            .expect("renew")
            .is_empty()
    );
    let wrong: Vec<(Uuid, i64)> = leases.iter().map(|(id, t)| (*id, t + 1000)).collect();
    assert!(
        queue::renew_leases(&pool, worker, &wrong, Duration::from_secs(60))
            .await
            .expect("renew")
            .is_empty()
    );
}

#[tokio::test]
async fn failures_retry_with_backoff_then_go_dead() {
    let pool = test_pool().await;
    let ev = event(&pool, "flaky", 2).await;
    let id = queue::enqueue(&pool, &new_job(&ev))
        .await
        .expect("enqueue")
        .job_id;
    let mut conn = pool.acquire().await.expect("conn");
    let fail = Outcome {
        exit_code: Some(3),
        ..Outcome::failure(ErrorKind::Script, "exit status 3")
    };

    let first = claim(&pool, Uuid::now_v7(), 1, Duration::from_secs(60))
        .await
        .remove(0);
    let r = queue::complete(&mut conn, id, first.lease_token, &fail)
        .await
        .expect("complete");
    assert!(
        matches!(r, Completion::Retrying { attempt: 2, .. }),
        "{r:?}"
    );
    let job = queue::get_job(&pool, id).await.expect("job");
    assert_eq!(
        (job.status, job.attempt, job.exit_code),
        (JobStatus::Queued, 2, Some(3))
    );

    let second = claim(&pool, Uuid::now_v7(), 1, Duration::from_secs(60))
        .await
        .remove(0);
    let r = queue::complete(&mut conn, id, second.lease_token, &fail)
        .await
        .expect("complete");
    assert_eq!(
        r,
        Completion::Finished {
            status: JobStatus::Failed,
            dead: true,
            has_actions: false,
        }
    );
    let job = queue::get_job(&pool, id).await.expect("job");
    assert!(job.dead && job.finished_at.is_some());
    assert_eq!(job.error.expect("error").message, "exit status 3");

    // A non-retryable failure does not retry even with attempts left.
    let ev = event(&pool, "auth", 5).await;
    let id = queue::enqueue(&pool, &new_job(&ev))
        .await
        .expect("enqueue")
        .job_id;
    let c = claim(&pool, Uuid::now_v7(), 1, Duration::from_secs(60))
        .await
        .remove(0);
    let no_retry = Outcome {
        retryable: false,
        ..Outcome::failure(ErrorKind::Infrastructure, "auth failed")
    };
    let r = queue::complete(&mut conn, id, c.lease_token, &no_retry)
        .await
        .expect("complete");
    assert_eq!(
        r,
        Completion::Finished {
            status: JobStatus::Failed,
            dead: true,
            has_actions: false,
        }
    );
}

#[tokio::test]
async fn cancelling_a_queued_job_is_immediate_and_a_finished_one_conflicts() {
    let pool = test_pool().await;
    let ev = event(&pool, "cancel", 3).await;
    let id = queue::enqueue(&pool, &new_job(&ev))
        .await
        .expect("enqueue")
        .job_id;
    let mut conn = pool.acquire().await.expect("conn");
    assert_eq!(
        queue::request_cancel(&mut conn, id, false)
            .await
            .expect("cancel"),
        queue::CancelOutcome::Cancelled
    );
    let job = queue::get_job(&pool, id).await.expect("job");
    assert_eq!(job.status, JobStatus::Cancelled);
    assert!(
        claim(&pool, Uuid::now_v7(), 1, Duration::from_secs(60))
            .await
            .is_empty()
    );
    assert!(matches!(
        queue::request_cancel(&mut conn, id, false).await,
        Err(StorageError::JobFinished { .. })
    ));

    // A running job being cancelled is not retried when its worker reports the failure.
    let id = queue::enqueue(&pool, &new_job(&ev))
        .await
        .expect("enqueue")
        .job_id;
    let c = claim(&pool, Uuid::now_v7(), 1, Duration::from_secs(60))
        .await
        .remove(0);
    queue::request_cancel(&mut conn, id, false)
        .await
        .expect("cancel");
    let r = queue::complete(
        &mut conn,
        id,
        c.lease_token,
        &Outcome::failure(ErrorKind::Cancelled, "cancelled"),
    )
    .await;
    assert_eq!(
        r.expect("complete"),
        Completion::Finished {
            status: JobStatus::Cancelled,
            dead: false,
            has_actions: false,
        }
    );
}

#[tokio::test]
async fn enqueue_notifies_listeners_on_commit() {
    let pool = test_pool().await;
    let ev = event(&pool, "notify", 1).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .expect("listener");
    listener
        .listen(queue::QUEUED_CHANNEL)
        .await
        .expect("listen");
    let mut tx = pool.begin().await.expect("tx");
    queue::enqueue(&mut *tx, &new_job(&ev))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    let note = tokio::time::timeout(Duration::from_secs(30), listener.recv())
        .await
        .expect("in time")
        .expect("notification");
    assert_eq!(note.payload(), "local");

    // A job for later says so: dispatchers then look up when it is due.
    let mut later = new_job(&ev);
    later.run_at = Some(chrono::Utc::now() + chrono::Duration::seconds(60));
    queue::enqueue(&pool, &later).await.expect("enqueue");
    let note = tokio::time::timeout(Duration::from_secs(30), listener.recv())
        .await
        .expect("in time")
        .expect("notification");
    assert_eq!(note.payload(), "local:later");
}

/// A group of successes completes in one statement, except a run whose lease is gone (left
/// for the one-by-one path to refuse) and a run whose event has actions (they must be
/// evaluated in the completion's own transaction).
#[tokio::test]
async fn successes_complete_together_but_not_stale_ones_or_those_with_actions() {
    let pool = test_pool().await;
    let plain = event(&pool, "plain", 1).await;
    let chained = event(&pool, "chained", 1).await;
    let action: baton_api::model::action::NewAction = serde_json::from_value(json!({
        "trigger": "always", "action": {"type": "run_event", "event_id": plain.id}
    }))
    .expect("action");
    baton_api::storage::actions::insert_action(&pool, chained.id, &action)
        .await
        .expect("insert action");
    for ev in [&plain, &plain, &plain, &chained] {
        queue::enqueue(&pool, &new_job(ev)).await.expect("enqueue");
    }
    let jobs = claim(&pool, Uuid::now_v7(), 10, Duration::from_secs(60)).await;
    assert_eq!(jobs.len(), 4);
    let mut success = Outcome::success();
    success.output = Some(json!({"ok": true}));
    let runs: Vec<_> = jobs
        .iter()
        .enumerate()
        // The second run reports with a stale token.
        .map(|(i, j)| (j.id, j.lease_token + i64::from(i == 1), &success))
        .collect();
    let done: HashSet<Uuid> = queue::complete_successes(&pool, &runs)
        .await
        .expect("complete")
        .into_iter()
        .collect();
    let expected: HashSet<Uuid> = jobs
        .iter()
        .enumerate()
        .filter(|(i, j)| *i != 1 && j.event_id == plain.id)
        .map(|(_, j)| j.id)
        .collect();
    assert_eq!(done, expected);
    for job in &jobs {
        let (status, output): (String, Option<serde_json::Value>) =
            sqlx::query_as("SELECT status, output FROM jobs WHERE id = $1")
                .bind(job.id)
                .fetch_one(&pool)
                .await
                .expect("job");
        if done.contains(&job.id) {
            assert_eq!(status, "succeeded");
            assert_eq!(output, Some(json!({"ok": true})));
        } else {
            assert_eq!(status, "claimed", "job {} must be left alone", job.id);
        }
    }
}
