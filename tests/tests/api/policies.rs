//! Run policies of events at the api: validation of `concurrency`, `stuck_after_seconds` and
//! `startup_window_seconds`, and the claim keeping concurrency groups within `max` when many
//! claimers race on a real database.

use std::sync::Arc;
use std::time::Duration;

use baton_api::model::{Event, NewEvent};
use baton_api::storage::events;
use baton_api::storage::queue::{self, ClaimRequest, NewJob};
use baton_tests::{spawn_app, test_pool};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Barrier;
use uuid::Uuid;

fn spec(extra: Value) -> Value {
    let mut spec = json!({"name": "policy", "runtime": "bash", "content": "true",
                          "executor": "local"});
    for (k, v) in extra.as_object().expect("object") {
        spec[k] = v.clone();
    }
    spec
}

#[tokio::test]
async fn bad_policies_are_refused_naming_the_field() {
    let app = spawn_app().await;
    for (extra, field) in [
        (json!({"concurrency": {"max": 0}}), "concurrency.max"),
        (json!({"concurrency": {"max": -3}}), "concurrency.max"),
        (
            json!({"concurrency": {"max": 1, "strategy": "drop"}}),
            "concurrency.strategy",
        ),
        (
            json!({"concurrency": {"max": 1, "key": "{{ input.host "}}),
            "concurrency.key",
        ),
        (json!({"concurrency": {"max": 1, "size": 2}}), "concurrency"),
        (json!({"concurrency": {"key": "x"}}), "concurrency"),
        (json!({"stuck_after_seconds": 0}), "stuck_after_seconds"),
        (
            json!({"startup_window_seconds": -1}),
            "startup_window_seconds",
        ),
        (
            json!({"startup_window_seconds": 3601}),
            "startup_window_seconds",
        ),
    ] {
        let (status, body) = app.post("/api/v1/events", &spec(extra.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{extra}: {body}");
        let named = body["error"]["field"].as_str().unwrap_or("");
        assert!(named.starts_with(field), "{extra}: field {named:?}, {body}");
    }
}

#[tokio::test]
async fn policies_are_stored_shown_patched_and_snapshotted_with_keys() {
    let app = spawn_app().await;
    let created = app
        .create_event(&spec(json!({
            "concurrency": {"max": 2, "key": "{{ input.host }}", "strategy": "skip"},
            "stuck_after_seconds": 30
        })))
        .await;
    assert_eq!(
        created["concurrency"],
        json!({"max": 2, "key": "{{ input.host }}", "strategy": "skip"})
    );
    assert_eq!(created["stuck_after_seconds"], 30);
    assert_eq!(created["startup_window_seconds"], 5, "the default");
    let id = created["id"].as_str().expect("id");
    let job = app.run_event(id, &json!({"input": {"host": "db1"}})).await;
    let (_, shown) = app.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(shown["concurrency_key"], "db1", "{shown}");
    assert_eq!(shown["stuck"], false);
    // Skip: the group (max 2) holds one queued run; a second fits, a third is skipped.
    let second = app.run_event(id, &json!({"input": {"host": "db1"}})).await;
    let third = app.run_event(id, &json!({"input": {"host": "db1"}})).await;
    let other = app.run_event(id, &json!({"input": {"host": "db2"}})).await;
    for (job, status) in [
        (&second, "queued"),
        (&third, "cancelled"),
        (&other, "queued"),
    ] {
        let (_, shown) = app.get(&format!("/api/v1/jobs/{job}")).await;
        assert_eq!(shown["status"], status, "{shown}");
    }
    let (_, skipped) = app.get(&format!("/api/v1/jobs/{third}")).await;
    assert_eq!(skipped["error"]["kind"], "concurrency", "{skipped}");
    // A missing key is the shared group.
    let shared = app.run_event(id, &json!({"input": {}})).await;
    let (_, shown) = app.get(&format!("/api/v1/jobs/{shared}")).await;
    assert_eq!(shown["concurrency_key"], "", "{shown}");

    let (status, patched) = app
        .patch(
            &format!("/api/v1/events/{id}"),
            &json!({"concurrency": null, "startup_window_seconds": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert!(patched["concurrency"].is_null(), "{patched}");
    assert_eq!(patched["startup_window_seconds"], 0);
    let free = app.run_event(id, &json!({"input": {"host": "db1"}})).await;
    let (_, shown) = app.get(&format!("/api/v1/jobs/{free}")).await;
    assert!(shown["concurrency_key"].is_null(), "no policy: {shown}");
    let (status, body) = app.get("/api/v1/jobs?stuck=maybe").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "stuck");
}

#[tokio::test]
async fn on_stuck_is_an_action_trigger() {
    let app = spawn_app().await;
    let ev = app.create_event(&spec(json!({}))).await;
    let id = ev["id"].as_str().expect("id");
    let (status, body) = app
        .post(
            &format!("/api/v1/events/{id}/actions"),
            &json!({"trigger": "on_stuck", "action": {"type": "send_message",
                    "channel": "webhook", "target": "https://example.com/hook"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["trigger"], "on_stuck");
}

async fn policy_event(pool: &PgPool, name: &str, concurrency: Value) -> Event {
    let mut spec: NewEvent = serde_json::from_value(json!({
        "name": name, "runtime": "bash", "content": "true", "executor": "local",
        "concurrency": concurrency
    }))
    .expect("spec");
    spec.validate().expect("valid");
    events::insert_event(pool, &spec).await.expect("insert")
}

/// Eight claimers start at the same instant (a barrier), each asking for 10 jobs, over and
/// over; the claimed-or-running jobs of each group never exceed `max`, jobs without a policy
/// are claimed as usual alongside, and every job is eventually claimed exactly once.
#[tokio::test]
async fn racing_claimers_never_exceed_a_groups_max() {
    let pool = test_pool().await;
    let grouped = policy_event(&pool, "grouped", json!({"max": 2, "key": "{{ input.g }}"})).await;
    let plain = {
        let mut spec: NewEvent = serde_json::from_value(json!({
            "name": "plain", "runtime": "bash", "content": "true", "executor": "local"
        }))
        .expect("spec");
        spec.validate().expect("valid");
        events::insert_event(&pool, &spec).await.expect("insert")
    };
    for i in 0..40 {
        let (event, input) = if i % 4 == 3 {
            (&plain, json!({}))
        } else {
            (&grouped, json!({"g": i % 2}))
        };
        queue::enqueue(
            &pool,
            &NewJob {
                event,
                input,
                priority: 0,
                run_at: None,
                idempotency_key: None,
                parent: None,
                created_by: None,
                trace_context: None,
            },
        )
        .await
        .expect("enqueue");
    }
    let claimers = 8;
    let executors = Arc::new(vec!["local".to_owned()]);
    let mut claimed_total = std::collections::HashSet::new();
    for _round in 0..100 {
        let barrier = Arc::new(Barrier::new(claimers));
        let tasks: Vec<_> = (0..claimers)
            .map(|_| {
                let (pool, barrier, executors) = (pool.clone(), barrier.clone(), executors.clone());
                tokio::spawn(async move {
                    let labels = serde_json::Map::new();
                    barrier.wait().await;
                    queue::claim_batch(
                        &pool,
                        &ClaimRequest {
                            worker_id: Uuid::now_v7(),
                            executors: &executors,
                            labels: &labels,
                            limit: 10,
                            lease: Duration::from_secs(60),
                        },
                    )
                    .await
                    .expect("claim")
                })
            })
            .collect();
        for task in tasks {
            for job in task.await.expect("task") {
                assert!(claimed_total.insert(job.id), "claimed twice: {}", job.id);
            }
        }
        let over: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT concurrency_key, count(*) FROM jobs
             WHERE status IN ('claimed', 'running') AND concurrency_key IS NOT NULL
             GROUP BY concurrency_key HAVING count(*) > 2",
        )
        .fetch_all(&pool)
        .await
        .expect("count");
        assert!(over.is_empty(), "a group over its max: {over:?}");
        // Finish one claimed job of each group (a slot frees), as a worker would.
        sqlx::query(
            "UPDATE jobs SET status = 'succeeded', finished_at = now(), lease_token = NULL,
                 lease_expires_at = NULL
             WHERE id IN (SELECT DISTINCT ON (concurrency_key) id FROM jobs
                          WHERE status = 'claimed' ORDER BY concurrency_key, id)",
        )
        .execute(&pool)
        .await
        .expect("finish");
        if claimed_total.len() == 40 {
            break;
        }
    }
    assert_eq!(claimed_total.len(), 40, "every job claimed");
    let plain_claimed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE event_id = $1 AND status <> 'queued'")
            .bind(plain.id)
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(plain_claimed, 10);
}
