//! `BATON_RETENTION_DAYS`: finished jobs older than N days go, with their logs, in batches;
//! newer and unfinished ones stay, and references to deleted jobs are cleared.

use std::time::Duration;

use baton_tests::{spawn_app, spawn_app_with};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A UUIDv7 of `t` (as the api would have made for a job created then).
fn id_at(t: DateTime<Utc>) -> Uuid {
    Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        t.timestamp() as u64,
        t.timestamp_subsec_nanos(),
    ))
}

/// Inserts a job created at `created` (finished 2 s later unless `finished` is false), with
/// one stored log chunk, and returns its id.
async fn job_at(
    pool: &PgPool,
    event_id: Uuid,
    created: DateTime<Utc>,
    finished: bool,
    parent: Option<Uuid>,
) -> Uuid {
    let id = id_at(created);
    let (status, finished_at) = if finished {
        ("succeeded", Some(created + chrono::Duration::seconds(2)))
    } else {
        ("queued", None)
    };
    sqlx::query(
        "INSERT INTO jobs (id, event_id, status, priority, run_at, max_attempts, executor, spec,
                           root_job_id, parent_job_id, created_at, finished_at)
         VALUES ($1, $2, $3, 0, $4, 1, 'local', '{}', $1, $5, $4, $6)",
    )
    .bind(id)
    .bind(event_id)
    .bind(status)
    .bind(created)
    .bind(parent)
    .bind(finished_at)
    .execute(pool)
    .await
    .expect("insert a job");
    let line = json!([{"seq": 1, "stream": "stdout", "text": "old line", "ts": created}]);
    sqlx::query(
        "INSERT INTO job_logs (job_id, first_seq, last_seq, lines, bytes) VALUES ($1, 1, 1, $2, 8)",
    )
    .bind(id)
    .bind(line.to_string())
    .execute(pool)
    .await
    .expect("insert its log");
    id
}

async fn exists(pool: &PgPool, id: Uuid) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("query")
}

async fn log_chunks(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM job_logs WHERE job_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("query")
}

#[tokio::test]
async fn a_sweep_deletes_old_finished_jobs_and_their_logs_in_batches() {
    let app = spawn_app().await;
    let event = app
        .create_event(&baton_tests::bash_event("kept-history"))
        .await;
    let event_id: Uuid = event["id"].as_str().expect("id").parse().expect("uuid");
    let now = Utc::now();
    let mut old = Vec::new();
    for days in [30, 20, 10, 9, 8] {
        old.push(
            job_at(
                &app.pool,
                event_id,
                now - chrono::Duration::days(days),
                true,
                None,
            )
            .await,
        );
    }
    // Newer than the cutoff, or not finished: kept. A recent child of an old job keeps its
    // row; its parent reference is cleared.
    let recent = job_at(
        &app.pool,
        event_id,
        now - chrono::Duration::days(6),
        true,
        None,
    )
    .await;
    let unfinished = job_at(
        &app.pool,
        event_id,
        now - chrono::Duration::days(40),
        false,
        None,
    )
    .await;
    let child = job_at(
        &app.pool,
        event_id,
        now - chrono::Duration::days(1),
        true,
        Some(old[0]),
    )
    .await;

    let stop = CancellationToken::new();
    // Batches of 2: three batches for five jobs.
    let deleted = baton_api::retention::sweep(&app.pool, 7, 2, &stop)
        .await
        .expect("sweep");
    assert_eq!(deleted, 5);
    for id in &old {
        assert!(!exists(&app.pool, *id).await, "{id} should be gone");
        assert_eq!(
            log_chunks(&app.pool, *id).await,
            0,
            "its log should be gone"
        );
    }
    for id in [recent, unfinished, child] {
        assert!(exists(&app.pool, id).await, "{id} should stay");
        assert_eq!(log_chunks(&app.pool, id).await, 1);
    }
    let (_, kept) = app.get(&format!("/api/v1/jobs/{child}")).await;
    assert_eq!(kept["parent_job_id"], serde_json::Value::Null);
    // Nothing left to do.
    assert_eq!(
        baton_api::retention::sweep(&app.pool, 7, 2, &stop)
            .await
            .expect("sweep"),
        0
    );
}

#[tokio::test]
async fn the_api_sweeps_on_its_own_when_retention_is_set() {
    let app = spawn_app_with(|c| c.retention_days = Some(3)).await;
    let event = app.create_event(&baton_tests::bash_event("swept")).await;
    let event_id: Uuid = event["id"].as_str().expect("id").parse().expect("uuid");
    // Inserted after the first sweep may have run: a replica restarted on the database
    // sweeps at start.
    let old = job_at(
        &app.pool,
        event_id,
        Utc::now() - chrono::Duration::days(5),
        true,
        None,
    )
    .await;
    let recent = job_at(
        &app.pool,
        event_id,
        Utc::now() - chrono::Duration::days(1),
        true,
        None,
    )
    .await;
    let app = app.restart(|c| c.retention_days = Some(3)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while exists(&app.pool, old).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old job was never swept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(exists(&app.pool, recent).await);
}
