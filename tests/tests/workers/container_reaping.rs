//! Containers left by a worker killed mid-run (`kill -9`): the container outlives the worker,
//! the worker restarted with the same `--worker-id` removes it, a container of another worker
//! is left alone, and the queue recovers the job once its lease expires.
//!
//! The engine is queried through the `docker` CLI (the executor itself never uses it): the
//! test looks at containers from the outside, by the labels the executor puts on them.

use std::process::{Command, Output};
use std::time::Duration;

use baton_tests::spawn_app_with;
use nix::sys::signal::Signal;
use serde_json::json;
use uuid::Uuid;

use crate::chains::placed_event;
use crate::container::ensure_images;
use crate::support::{WorkerProcess, all_lines, wait_finished};

/// Label the container executor puts the worker id in (`baton_worker`'s `LABEL_WORKER`).
const LABEL_WORKER: &str = "baton.worker_id";
/// Label the container executor puts the job id in.
const LABEL_JOB: &str = "baton.job_id";

/// Generous: a debug worker on a loaded 2-core machine, and an engine on fuse-overlayfs.
const DEADLINE: Duration = Duration::from_secs(120);

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e}"))
}

/// Ids of the containers (any state) carrying label `key=value`.
fn containers(key: &str, value: &str) -> Vec<String> {
    let out = docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label={key}={value}"),
    ]);
    assert!(out.status.success(), "docker ps: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Polls until `done` holds for the containers labelled `key=value`; returns them.
async fn wait_containers(
    key: &str,
    value: &str,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let found = containers(key, value);
        if done(&found) {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: containers labelled {key}={value} are {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes every container carrying one of its worker-id labels when dropped, so that a failed
/// test leaves nothing running on the engine.
struct RemoveOnDrop(Vec<String>);

impl Drop for RemoveOnDrop {
    // Never panics (it may run while a failed test unwinds): failures are ignored.
    fn drop(&mut self) {
        for worker in &self.0 {
            let listed = Command::new("docker")
                .args(["ps", "-aq", "--filter"])
                .arg(format!("label={LABEL_WORKER}={worker}"))
                .output();
            let Ok(listed) = listed else { continue };
            for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-fv", id]).output();
            }
        }
    }
}

#[tokio::test]
async fn a_restarted_worker_removes_the_container_its_killed_run_left() {
    ensure_images();
    let app = spawn_app_with(|c| {
        // Short leases, so the killed worker's job is recovered quickly.
        c.lease = Duration::from_secs(2);
        c.reaper_interval = Duration::from_millis(200);
    })
    .await;
    let worker_id = Uuid::now_v7().to_string();
    let other_worker = Uuid::now_v7().to_string();
    let _cleanup = RemoveOnDrop(vec![worker_id.clone(), other_worker.clone()]);

    // Another worker's container on the same engine: never this worker's to remove.
    let foreign_job = Uuid::now_v7().to_string();
    let out = docker(&[
        "run",
        "-d",
        "--label",
        &format!("{LABEL_WORKER}={other_worker}"),
        "--label",
        &format!("{LABEL_JOB}={foreign_job}"),
        "--label",
        "baton.managed=true",
        "--network",
        "none",
        "baton/runtime:sh",
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "docker run: {out:?}");

    // The first attempt blocks; the retry (attempt 2, after the lease is lost) finishes.
    let ev = placed_event(
        &app,
        "outlives-its-worker",
        "sh",
        r#"if grep -Eq '"attempt": ?1[,}]' "$BATON_DIR/event.json"; then
  echo started
  sleep 300
fi
echo recovered"#,
        &json!({"executor": "container"}),
    )
    .await;
    // Spares off: this is about a run's job-labelled container (spares left by a crash are
    // reaped the same way; the executor's tests cover them).
    let worker_args = ["--worker-id", worker_id.as_str(), "--container-spares", "0"];
    let mut first = WorkerProcess::start_with_args(&app, 1, &worker_args).await;
    let id = app.run_event(&ev, &json!({})).await;
    // Running in its container once it printed its first line.
    let started = tokio::time::Instant::now() + DEADLINE;
    while !all_lines(&app, &id)
        .await
        .iter()
        .any(|l| l["text"] == "started")
    {
        assert!(
            tokio::time::Instant::now() < started,
            "the run never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let orphan = wait_containers(LABEL_JOB, &id, "the run's container", |c| c.len() == 1).await;
    assert_eq!(containers(LABEL_WORKER, &worker_id), orphan);

    first.signal(Signal::SIGKILL);
    assert!(!first.wait().await, "killed");
    assert_eq!(
        containers(LABEL_JOB, &id),
        orphan,
        "nothing removes the container of a killed worker until it restarts"
    );

    let second = WorkerProcess::start_with_args(&app, 1, &worker_args).await;
    wait_containers(LABEL_JOB, &id, "the orphan is reaped", |c| {
        !c.contains(&orphan[0])
    })
    .await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // Succeeding at all shows the retry took the short branch: attempt 1 would sleep 300 s.
    assert_eq!(job["attempt"], 2, "the lost lease was retried: {job}");
    // Both attempts' lines are kept, the retry's after the first's.
    let texts: Vec<String> = all_lines(&app, &id)
        .await
        .iter()
        .filter_map(|l| l["text"].as_str().map(str::to_owned))
        .collect();
    let started = texts.iter().position(|t| t == "started");
    let recovered = texts.iter().position(|t| t == "recovered");
    assert!(
        matches!((started, recovered), (Some(a), Some(b)) if a < b),
        "{texts:?}"
    );
    wait_containers(
        LABEL_WORKER,
        &worker_id,
        "no container of this worker left",
        |c| c.is_empty(),
    )
    .await;
    assert_eq!(
        containers(LABEL_WORKER, &other_worker).len(),
        1,
        "another worker's container is left alone"
    );
    drop(second);
    // Clean up the other worker's container ourselves (the guard would, too).
    for id in containers(LABEL_WORKER, &other_worker) {
        let out = docker(&["rm", "-fv", &id]);
        assert!(out.status.success(), "docker rm: {out:?}");
    }
    assert!(containers(LABEL_WORKER, &other_worker).is_empty());
}

#[tokio::test]
async fn a_killed_workers_spares_die_with_it_without_a_restart() {
    ensure_images();
    let app = spawn_app_with(|_| {}).await;
    let worker_id = Uuid::now_v7().to_string();
    let _cleanup = RemoveOnDrop(vec![worker_id.clone()]);
    // One spare for each of the five default images.
    let worker_args = ["--worker-id", worker_id.as_str(), "--container-spares", "1"];
    let mut worker = WorkerProcess::start_with_args(&app, 1, &worker_args).await;
    let running = |ids: &[String]| {
        ids.len() == 5
            && ids.iter().all(|id| {
                let out = docker(&["inspect", "-f", "{{.State.Running}}", id]);
                String::from_utf8_lossy(&out.stdout).trim() == "true"
            })
    };
    let spares = wait_containers(LABEL_WORKER, &worker_id, "five running spares", running).await;
    assert_eq!(spares.len(), 5);

    worker.signal(Signal::SIGKILL);
    assert!(!worker.wait().await, "killed");
    // Nobody restarts it and no other worker runs: the spares go by themselves.
    let killed_at = tokio::time::Instant::now();
    let deadline = killed_at + Duration::from_secs(30);
    loop {
        let left = containers(LABEL_WORKER, &worker_id);
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of the killed worker's spares are still there after {:?}: {left:?}",
            left.len(),
            killed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn another_worker_on_the_host_removes_a_killed_workers_job_container() {
    ensure_images();
    let app = spawn_app_with(|c| {
        c.lease = Duration::from_secs(2);
        c.reaper_interval = Duration::from_millis(200);
    })
    .await;
    let (first_id, second_id) = (Uuid::now_v7().to_string(), Uuid::now_v7().to_string());
    let _cleanup = RemoveOnDrop(vec![first_id.clone(), second_id.clone()]);
    let ev = placed_event(
        &app,
        "outlives-its-worker-for-good",
        "sh",
        r#"if grep -Eq '"attempt": ?1[,}]' "$BATON_DIR/event.json"; then
  echo started
  sleep 300
fi
echo recovered"#,
        &json!({"executor": "container"}),
    )
    .await;
    let mut first = WorkerProcess::start_with_args(
        &app,
        1,
        &["--worker-id", first_id.as_str(), "--container-spares", "0"],
    )
    .await;
    let id = app.run_event(&ev, &json!({})).await;
    let started = tokio::time::Instant::now() + DEADLINE;
    while !all_lines(&app, &id)
        .await
        .iter()
        .any(|l| l["text"] == "started")
    {
        assert!(
            tokio::time::Instant::now() < started,
            "the run never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let orphan = wait_containers(LABEL_JOB, &id, "the run's container", |c| c.len() == 1).await;
    first.signal(Signal::SIGKILL);
    assert!(!first.wait().await, "killed");
    assert_eq!(
        containers(LABEL_WORKER, &first_id),
        orphan,
        "it outlives its worker"
    );

    // A worker with another id (the killed one never comes back) removes it at its start.
    let second = WorkerProcess::start_with_args(
        &app,
        1,
        &["--worker-id", second_id.as_str(), "--container-spares", "0"],
    )
    .await;
    wait_containers(
        LABEL_WORKER,
        &first_id,
        "the dead worker's container is reaped",
        |c| c.is_empty(),
    )
    .await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    drop(second);
}
