//! Workflows under faults, with real `baton-api` and `baton-worker` processes: parents of a
//! fan-in ending together on two replicas, and an api replica and a worker killed with
//! SIGKILL mid-run. Every step must be recorded exactly once (one job per step and item,
//! every fan-in fired once), and every run must still end.

use std::time::Duration;

use baton_tests::test_database;
use baton_tests::workflows::{create_workflow, run_workflow, statuses, step, wait_run_ended};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::support::{ApiProcess, WorkerProcess, local_event};

async fn noop_event(app: &baton_tests::TestApp, name: &str) -> String {
    let ev = app
        .create_event(&json!({"name": name, "runtime": "noop", "executor": "local"}))
        .await;
    ev["id"].as_str().expect("id").to_owned()
}

/// Jobs of a run per (step, item), with how many there are and how many succeeded.
async fn job_counts(pool: &PgPool, run_id: &str) -> Vec<(String, Option<i32>, i64, i64)> {
    sqlx::query_as(
        "SELECT step_id, step_item, count(*), count(*) FILTER (WHERE status = 'succeeded')
         FROM jobs WHERE workflow_run_id = $1::uuid GROUP BY step_id, step_item
         ORDER BY step_id, step_item",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .expect("job counts")
}

#[tokio::test]
async fn a_fan_in_whose_parents_end_together_on_two_replicas_fires_once() {
    let db = test_database().await;
    let a = ApiProcess::start(&db, &[]).await;
    let b = ApiProcess::start(&db, &[]).await;
    let app = b.app(&db).await;
    // One worker per replica, so completions of the same run arrive on both at once.
    let _wa = WorkerProcess::start_on(
        &app,
        &a.grpc_address,
        16,
        &["--allow-local", "--no-container"],
    )
    .await;
    let _wb = WorkerProcess::start_on(
        &app,
        &b.grpc_address,
        16,
        &["--allow-local", "--no-container"],
    )
    .await;
    let noop = noop_event(&app, "noop").await;
    let parents: Vec<String> = (0..30).map(|i| format!("p{i}")).collect();
    let mut steps = vec![json!({"id": "root", "event_id": noop})];
    steps.extend(
        parents
            .iter()
            .map(|p| json!({"id": p, "event_id": noop, "needs": ["root"], "input": {"me": format!("'{p}'")}})),
    );
    steps.push(json!({"id": "join", "event_id": noop, "needs": parents}));
    let wf = create_workflow(&app, &json!({"name": "wide-join", "steps": steps})).await;
    let mut runs = Vec::new();
    for _ in 0..10 {
        runs.push(run_workflow(&app, &wf, &json!({})).await);
    }
    for run_id in &runs {
        let run = wait_run_ended(&app, run_id).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        let join = step(&run, "join");
        assert_eq!(join["job_ids"].as_array().map(Vec::len), Some(1), "{join}");
        // Fired after every parent: its input holds all 30 parents' outputs.
        let seen = join["output"]["steps"]
            .as_object()
            .expect("parents' outputs");
        assert_eq!(seen.len(), 30);
        for p in &parents {
            assert_eq!(seen[p]["me"], p.as_str(), "{p} in {join}");
        }
        for (step_id, item, jobs, ok) in job_counts(&app.pool, run_id).await {
            assert_eq!((jobs, ok), (1, 1), "{step_id} item {item:?}");
        }
    }
    // The parents of one run did end on both replicas' workers.
    let workers: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT worker_id) FROM jobs WHERE workflow_run_id IS NOT NULL",
    )
    .fetch_one(&app.pool)
    .await
    .expect("workers");
    assert_eq!(workers, 2);
}

#[tokio::test]
async fn killing_an_api_replica_and_a_worker_mid_workflow_loses_and_repeats_no_step() {
    let db = test_database().await;
    let settings = [
        ("BATON_LEASE_SECONDS", "4"),
        ("BATON_REAPER_INTERVAL_SECONDS", "0.2"),
    ];
    let mut a = ApiProcess::start(&db, &settings).await;
    let b = ApiProcess::start(&db, &settings).await;
    let app = b.app(&db).await;
    let noop = noop_event(&app, "noop").await;
    let work = local_event(
        &app,
        "work",
        "python",
        "import baton, time\ni = baton.input()\ntime.sleep(0.3)\nbaton.output({'item': i['item']})",
    )
    .await;
    let side = local_event(&app, "side", "bash", "sleep 0.5").await;
    let mut steps = vec![
        json!({"id": "root", "event_id": noop}),
        json!({"id": "fan", "event_id": work, "needs": ["root"], "for_each": "input.items", "max_parallel": 6}),
        json!({"id": "join", "event_id": noop, "needs": ["fan"], "input": {"n": "size(steps.fan.output)"}}),
    ];
    let sides: Vec<String> = (0..8).map(|i| format!("side{i}")).collect();
    for s in &sides {
        steps.push(json!({"id": s, "event_id": side, "needs": ["root"]}));
    }
    let mut last_needs = sides.clone();
    last_needs.push("join".into());
    steps.push(json!({"id": "last", "event_id": noop, "needs": last_needs}));
    let wf = create_workflow(&app, &json!({"name": "survivor", "steps": steps})).await;

    // Worker 1 prefers replica A (the one killed) and is killed too; worker 2 prefers B.
    let urls_a = format!("{},{}", a.grpc_address, b.grpc_address);
    let urls_b = format!("{},{}", b.grpc_address, a.grpc_address);
    let mut w1 =
        WorkerProcess::start_on(&app, &urls_a, 6, &["--allow-local", "--no-container"]).await;
    let _w2 = WorkerProcess::start_on(&app, &urls_b, 6, &["--allow-local", "--no-container"]).await;
    // Runs started through both replicas.
    let app_a = a.app(&db).await;
    let items: Vec<i32> = (0..30).collect();
    let mut runs = Vec::new();
    for i in 0..4 {
        let via = if i % 2 == 0 { &app_a } else { &app };
        runs.push(run_workflow(via, &wf, &json!({"items": items})).await);
    }
    // Kill both once the runs are well under way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE step_id = 'fan' AND status = 'succeeded'",
        )
        .fetch_one(&app.pool)
        .await
        .expect("progress");
        if done >= 20 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the runs never got going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w1.signal(Signal::SIGKILL);
    a.kill();
    assert!(!w1.wait().await, "killed");
    let in_flight: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE workflow_run_id IS NOT NULL AND status IN ('claimed', 'running')",
    )
    .fetch_one(&app.pool)
    .await
    .expect("in flight");
    println!("killed replica A and worker 1 with {in_flight} step jobs in flight");

    for run_id in &runs {
        let run = wait_run_ended(&app, run_id).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert!(
            statuses(&run).iter().all(|s| s.ends_with("=succeeded")),
            "{run}"
        );
        let outputs = step(&run, "fan")["output"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let expected: Vec<Value> = (0..30).map(|i| json!({"item": i})).collect();
        assert_eq!(outputs, expected, "every element once, in order");
        assert_eq!(step(&run, "join")["output"]["n"], 30);
        let counts = job_counts(&app.pool, run_id).await;
        // root, 30 elements, join, 8 sides, last: one job each.
        assert_eq!(counts.len(), 41, "{counts:?}");
        for (step_id, item, jobs, ok) in counts {
            assert_eq!((jobs, ok), (1, 1), "{step_id} item {item:?}");
        }
    }
    let requeued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE workflow_run_id IS NOT NULL AND lease_losses > 0",
    )
    .fetch_one(&app.pool)
    .await
    .expect("requeued");
    println!("{requeued} step jobs were taken back from the killed worker and ran again");
}
