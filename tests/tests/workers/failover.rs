//! Failures: a worker killed with SIGKILL, an api restarted mid-run, a worker drained by SIGTERM.

use std::time::Duration;

use baton_tests::spawn_app_with;
use nix::sys::signal::Signal;
use serde_json::json;

use crate::support::{
    InProcessWorker, WorkerProcess, all_lines, local_event, wait_finished, wait_job,
};

fn short_leases(c: &mut baton_api::ApiConfig) {
    c.lease = Duration::from_secs(2);
    c.reaper_interval = Duration::from_millis(200);
}

#[tokio::test]
async fn a_job_of_a_killed_worker_finishes_on_another() {
    let app = spawn_app_with(short_leases).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let started = dir.path().join("started");
    let ev = local_event(
        &app,
        "survivor",
        "sh",
        &format!("echo run >> {}; sleep 2; echo finished", started.display()),
    )
    .await;
    let mut first = WorkerProcess::start(&app, 1).await;
    let id = app.run_event(&ev, &json!({})).await;
    wait_job(&app, &id, |j| j["status"] == "running").await;
    first.signal(Signal::SIGKILL);
    assert!(!first.wait().await, "killed");
    let second = InProcessWorker::start(&app, 1).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["attempt"], 2,
        "the lost lease cost an attempt number, not the retry budget"
    );
    let runs = std::fs::read_to_string(&started).expect("runs");
    assert_eq!(
        runs.lines().count(),
        2,
        "ran on the killed worker, then once more"
    );
    assert_eq!(
        all_lines(&app, &id).await.last().expect("line")["text"],
        "finished"
    );
    second.stop().await;
}

#[tokio::test]
async fn an_api_restart_mid_run_loses_no_line_and_stores_none_twice() {
    let app = spawn_app_with(|_| {}).await;
    let worker = InProcessWorker::start(&app, 1).await;
    let ev = local_event(
        &app,
        "long",
        "sh",
        "for i in $(seq 1 60); do echo \"line $i\"; sleep 0.05; done",
    )
    .await;
    let id = app.run_event(&ev, &json!({})).await;
    // Restart once some lines are stored.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while all_lines(&app, &id).await.len() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "no output");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let app = app.restart(|_| {}).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["attempt"], 1,
        "the worker kept its job across the restart"
    );
    let lines = all_lines(&app, &id).await;
    let texts: Vec<String> = lines
        .iter()
        .map(|l| l["text"].as_str().expect("text").to_owned())
        .collect();
    let expected: Vec<String> = (1..=60).map(|i| format!("line {i}")).collect();
    assert_eq!(texts, expected);
    let seqs: Vec<i64> = lines
        .iter()
        .map(|l| l["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>());
    worker.stop().await;
}

#[tokio::test]
async fn sigterm_drains_a_worker_letting_its_job_finish() {
    let app = spawn_app_with(|_| {}).await;
    let ev = local_event(&app, "drained", "sh", "sleep 1; echo done").await;
    let mut worker = WorkerProcess::start(&app, 2).await;
    let id = app.run_event(&ev, &json!({})).await;
    wait_job(&app, &id, |j| j["status"] == "running").await;
    worker.signal(Signal::SIGTERM);
    assert!(worker.wait().await, "exits 0 after draining");
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // No new work goes to a draining or gone worker: a new job waits for another.
    let waiting = app.run_event(&ev, &json!({})).await;
    let (_, j) = app.get(&format!("/api/v1/jobs/{waiting}")).await;
    assert_eq!(j["status"], "queued");
}
