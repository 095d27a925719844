//! Runs on the local executor through the whole system.

use std::collections::HashSet;
use std::time::Duration;

use baton_tests::spawn_app;
use serde_json::{Value, json};

use crate::support::{InProcessWorker, alive, all_lines, local_event, wait_finished, wait_job};

#[tokio::test]
async fn two_workers_share_a_thousand_jobs_each_run_exactly_once() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("runs");
    let ev = local_event(
        &app,
        "count",
        "sh",
        &format!("echo \"$BATON_JOB_ID\" >> {}", record.display()),
    )
    .await;
    let w1 = InProcessWorker::start(&app, 8).await;
    let w2 = InProcessWorker::start(&app, 8).await;
    let mut ids = HashSet::new();
    for _ in 0..1000 {
        ids.insert(app.run_event(&ev, &json!({})).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
        if done == 1000 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} of 1000 jobs finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = std::fs::read_to_string(&record).expect("runs file");
    let runs: Vec<&str> = text.lines().collect();
    let distinct: HashSet<String> = runs.iter().map(|s| s.to_string()).collect();
    assert_eq!(runs.len(), 1000, "every job ran exactly once");
    assert_eq!(distinct, ids);
    let per_worker: Vec<(i64,)> = sqlx::query_as("SELECT count(*) FROM jobs GROUP BY worker_id")
        .fetch_all(&app.pool)
        .await
        .expect("per worker");
    assert_eq!(
        per_worker.len(),
        2,
        "both workers took part: {per_worker:?}"
    );
    let attempts: i32 = sqlx::query_scalar("SELECT max(attempt) FROM jobs")
        .fetch_one(&app.pool)
        .await
        .expect("max");
    assert_eq!(attempts, 1);
    w1.stop().await;
    w2.stop().await;
}

#[tokio::test]
async fn every_runtime_runs_with_env_input_and_exit_codes() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 4).await;
    let cases = [
        ("bash", "echo \"bash $GREETING\"; exit 3", 3, "bash hi"),
        ("sh", "echo \"sh $GREETING\"", 0, "sh hi"),
        (
            "python",
            "import os; print('python', os.environ['GREETING'])",
            0,
            "python hi",
        ),
        (
            "node",
            "console.log('node', process.env.GREETING)",
            0,
            "node hi",
        ),
    ];
    for (runtime, content, code, line) in cases {
        let ev = app
            .create_event(&json!({"name": runtime, "runtime": runtime, "content": content, "executor": "local", "env": {"GREETING": "hi"}}))
            .await;
        let id = app
            .run_event(ev["id"].as_str().expect("id"), &json!({}))
            .await;
        let job = wait_finished(&app, &id).await;
        assert_eq!(job["exit_code"], code, "{runtime}: {job}");
        assert_eq!(
            job["status"],
            if code == 0 { "succeeded" } else { "failed" },
            "{runtime}"
        );
        if code != 0 {
            assert_eq!(job["error"]["kind"], "script");
        }
        let lines = all_lines(&app, &id).await;
        assert_eq!(lines[0]["text"], line, "{runtime}");
    }
    let ev = app
        .create_event(&json!({"name": "exec", "runtime": "exec", "command": ["printf", "%s|%s\n", "a b", "$HOME"], "executor": "local"}))
        .await;
    let id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    wait_finished(&app, &id).await;
    assert_eq!(
        all_lines(&app, &id).await[0]["text"],
        "a b|$HOME",
        "no shell expansion"
    );
    // A start failure is an infrastructure error.
    let ev = app
        .create_event(&json!({"name": "missing", "runtime": "exec", "command": ["/nonexistent/program"], "executor": "local"}))
        .await;
    let id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["error"]["kind"], "infrastructure", "{job}");
    worker.stop().await;
}

#[tokio::test]
async fn ten_megabytes_of_output_arrive_complete_and_in_order() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 1).await;
    // 1,400,001 lines of 7 digits: ~11 MB.
    let ev = local_event(&app, "chatty", "sh", "seq 1000000 2400000").await;
    let id = app.run_event(&ev, &json!({})).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let lines = all_lines(&app, &id).await;
    assert_eq!(lines.len(), 1_400_001);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["seq"], i as i64 + 1);
        assert_eq!(
            line["text"].as_str().expect("text"),
            (1_000_000 + i).to_string()
        );
    }
    worker.stop().await;
}

/// A script that starts background children, records their pids, and waits.
fn tree_script(pids: &std::path::Path) -> String {
    format!(
        "sleep 1000 & echo $! >> {p}; sleep 1000 & echo $! >> {p}; (sleep 1000 & echo $! >> {p}; wait) & echo started; wait",
        p = pids.display()
    )
}

async fn wait_pids(pids: &std::path::Path, n: usize) -> Vec<i32> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got: Vec<i32> = std::fs::read_to_string(pids)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "children did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_dead(pids: &[i32]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a child survived: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn cancel_kills_the_whole_tree_within_a_second() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pids = dir.path().join("pids");
    let ev = local_event(&app, "tree", "bash", &tree_script(&pids)).await;
    let id = app.run_event(&ev, &json!({})).await;
    let children = wait_pids(&pids, 3).await;
    wait_job(&app, &id, |j| j["status"] == "running").await;
    let asked = std::time::Instant::now();
    let (status, _) = app
        .post(&format!("/api/v1/jobs/{id}/cancel"), &Value::Null)
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED);
    wait_dead(&children).await;
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    let job = wait_finished(&app, &id).await;
    assert_eq!(
        (job["status"].as_str(), job["error"]["kind"].as_str()),
        (Some("cancelled"), Some("cancelled"))
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_timeout_kills_the_whole_tree() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pids = dir.path().join("pids");
    let ev = app
        .create_event(&json!({"name": "slow", "runtime": "bash", "content": tree_script(&pids), "executor": "local", "timeout_seconds": 1}))
        .await;
    let id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let children = wait_pids(&pids, 3).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(
        (job["status"].as_str(), job["error"]["kind"].as_str()),
        (Some("timed_out"), Some("timeout")),
        "{job}"
    );
    assert_eq!(job["dead"], true);
    wait_dead(&children).await;
    worker.stop().await;
}

#[tokio::test]
async fn progress_lines_and_retries_with_dead_letter() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 1).await;
    let ev = local_event(
        &app,
        "progress",
        "sh",
        "echo 'PROGRESS: 40'; echo 'PROGRESS: 75'",
    )
    .await;
    let id = app.run_event(&ev, &json!({})).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["progress"], 100, "succeeded jobs end at 100");
    let lines = all_lines(&app, &id).await;
    assert_eq!(lines.len(), 2);

    let ev = app
        .create_event(
            &json!({"name": "flaky", "runtime": "sh", "content": "echo \"try $$\"; exit 7",
            "executor": "local", "max_attempts": 3, "retry_backoff_seconds": 0}),
        )
        .await;
    let id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let job = wait_job(&app, &id, |j| j["dead"] == true).await;
    assert_eq!(
        (
            job["status"].as_str(),
            job["attempt"].as_i64(),
            job["exit_code"].as_i64()
        ),
        (Some("failed"), Some(3), Some(7))
    );
    // Every attempt's lines are kept, in order, each retry marked: none is taken for a
    // re-send of an earlier attempt's line.
    let lines = all_lines(&app, &id).await;
    let texts: Vec<&str> = lines.iter().filter_map(|l| l["text"].as_str()).collect();
    assert_eq!(texts.len(), 5, "{texts:?}");
    assert!(texts[0].starts_with("try "), "{texts:?}");
    assert_eq!(texts[1], "baton: attempt 2 starts");
    assert!(
        texts[2].starts_with("try ") && texts[2] != texts[0],
        "{texts:?}"
    );
    assert_eq!(texts[3], "baton: attempt 3 starts");
    assert!(texts[4].starts_with("try "), "{texts:?}");
    let seqs: Vec<i64> = lines.iter().filter_map(|l| l["seq"].as_i64()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    let (_, dead) = app.get("/api/v1/jobs?dead=true").await;
    assert_eq!(dead["items"][0]["id"], id.as_str());
    worker.stop().await;
}

/// `noop` starts nothing: the job succeeds with its input as its output, on any executor the
/// worker offers, and a payload given to it is refused when the event is created.
#[tokio::test]
async fn a_noop_job_succeeds_at_once_passing_its_input_on() {
    let app = spawn_app().await;
    let (status, err) = app
        .post(
            "/api/v1/events",
            &json!({"name": "bad-noop", "runtime": "noop", "content": "echo", "executor": "local"}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(err.to_string().contains("content"), "{err}");
    let ev = app
        .create_event(&json!({"name": "join", "runtime": "noop", "executor": "local"}))
        .await;
    let ev = ev["id"].as_str().expect("id").to_owned();
    let worker = InProcessWorker::start(&app, 2).await;
    let id = app
        .run_event(&ev, &json!({"input": {"from": "upstream", "n": 3}}))
        .await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"], json!({"from": "upstream", "n": 3}), "{job}");
    assert!(
        job["started_at"].is_string(),
        "a start time is recorded: {job}"
    );
    assert!(all_lines(&app, &id).await.is_empty(), "no output lines");
    worker.stop().await;
}
