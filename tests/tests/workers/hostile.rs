//! Hostile scripts in containers, through the whole stack (api, worker, container executor):
//! each is contained by the container's limits, ends with a reason in the job record, and
//! leaves the worker able to run the next job.

use serde_json::{Value, json};

use crate::chains::placed_event;
use crate::container::ensure_images;
use crate::support::{InProcessWorker, all_lines, wait_finished};

/// Runs `content` in a container and returns the finished job and its log's text.
async fn run_hostile(
    app: &baton_tests::TestApp,
    name: &str,
    runtime: &str,
    content: &str,
    extra: Value,
) -> (Value, Vec<String>) {
    let mut placement = json!({"executor": "container", "timeout_seconds": 60});
    if let (Some(p), Some(extra)) = (placement.as_object_mut(), extra.as_object()) {
        p.extend(extra.clone());
    }
    let ev = placed_event(app, name, runtime, content, &placement).await;
    let id = app.run_event(&ev, &json!({})).await;
    let job = wait_finished(app, &id).await;
    let lines = all_lines(app, &id)
        .await
        .iter()
        .filter_map(|l| l["text"].as_str().map(str::to_owned))
        .collect();
    (job, lines)
}

/// The worker still runs an ordinary job after a hostile one.
async fn assert_worker_healthy(app: &baton_tests::TestApp, after: &str) {
    let (job, lines) = run_hostile(
        app,
        &format!("healthy-after-{after}"),
        "sh",
        "echo fine",
        json!({}),
    )
    .await;
    assert_eq!(job["status"], "succeeded", "after {after}: {job}");
    assert!(
        lines.iter().any(|l| l == "fine"),
        "after {after}: {lines:?}"
    );
}

fn error_message(job: &Value) -> String {
    job["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn hostile_scripts_are_contained_reported_and_leave_the_worker_healthy() {
    ensure_images();
    let app = baton_tests::spawn_app().await;
    let worker = InProcessWorker::start_with(&app, 2, |c| c.allow_local = false).await;

    // A fork bomb: the pids limit stops it; the run ends (here at its timeout) with a reason.
    let (job, _) = run_hostile(
        &app,
        "fork-bomb",
        "bash",
        "bomb() { bomb | bomb; }; bomb",
        json!({"timeout_seconds": 10}),
    )
    .await;
    assert!(
        matches!(job["status"].as_str(), Some("failed" | "timed_out")),
        "{job}"
    );
    assert!(!error_message(&job).is_empty(), "{job}");
    assert_worker_healthy(&app, "fork-bomb").await;

    // A memory hog: killed by the memory limit, reported as such.
    let (job, _) = run_hostile(
        &app,
        "memory-hog",
        "python",
        "a = []\nwhile True:\n    a.append(bytearray(1 << 20))\n",
        json!({}),
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(error_message(&job).contains("out-of-memory"), "{job}");
    assert_worker_healthy(&app, "memory-hog").await;

    // Filling the work directory: it is a tmpfs of the default `work_mib` (256 MiB), so 1 GiB
    // does not fit; the write fails, the run fails with the script's own reason, the host's
    // disk is untouched.
    let (job, lines) = run_hostile(
        &app,
        "disk-fill",
        "sh",
        "dd if=/dev/zero of=\"$HOME/fill\" bs=1M count=1024 2>&1; echo \"dd exit $?\"; exit 1",
        json!({}),
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    eprintln!("disk fill: {lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("No space left on device")),
        "{lines:?}"
    );
    assert_worker_healthy(&app, "disk-fill").await;

    // Egress with network none: there is no interface but loopback, so no packet can leave.
    let (job, lines) = run_hostile(
        &app,
        "egress",
        "python",
        r#"
import os, socket
print("interfaces=" + ",".join(sorted(os.listdir("/sys/class/net"))))
try:
    socket.create_connection(("192.0.2.1", 80), timeout=3)
    print("egress=open")
except OSError as e:
    print("egress=blocked " + str(e))
"#,
        json!({}),
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(lines.iter().any(|l| l == "interfaces=lo"), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("egress=blocked")),
        "{lines:?}"
    );

    // Another job's files: a job holding a marker in its work and temp directories, and a
    // second job, at the same time on the same worker, looking for it everywhere it can read.
    let marker = format!("marker-{}", uuid::Uuid::now_v7());
    let holder = placed_event(
        &app,
        "holder",
        "sh",
        &format!(
            "echo {marker} > \"$HOME/{marker}\"; echo {marker} > /tmp/{marker}; echo holding; sleep 30"
        ),
        &json!({"executor": "container", "timeout_seconds": 60}),
    )
    .await;
    let holder_id = app.run_event(&holder, &json!({})).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let lines = all_lines(&app, &holder_id).await;
        if lines.iter().any(|l| l["text"] == "holding") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the holder never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (job, lines) = run_hostile(
        &app,
        "snoop",
        "sh",
        // The marker is put together at run time, so this script's own text does not hold it.
        &format!(
            "m=\"{head}\"\"{tail}\"; found=$(find / -xdev -name \"$m\" 2>/dev/null; find /tmp /baton -name \"$m\" 2>/dev/null); \
             echo \"found=[$found]\"; grep -rl \"$m\" /baton /tmp 2>/dev/null | head -1 | sed 's/^/grep=/'; echo searched",
            head = &marker[..10],
            tail = &marker[10..]
        ),
        json!({}),
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(lines.iter().any(|l| l == "searched"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "found=[]"), "{lines:?}");
    assert!(!lines.iter().any(|l| l.starts_with("grep=")), "{lines:?}");
    let (status, _) = app
        .post(&format!("/api/v1/jobs/{holder_id}/cancel"), &json!({}))
        .await;
    assert!(status.is_success());
    wait_finished(&app, &holder_id).await;
    assert_worker_healthy(&app, "snoop").await;
    worker.stop().await;
}
