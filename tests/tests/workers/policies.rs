//! Run policies of events through the whole system: concurrency groups enforced by the
//! database across two api replicas and two workers, stuck detection, the startup window.

use std::time::Duration;

use baton_tests::{TestApp, spawn_app_with, spawn_replica};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::support::{InProcessWorker, wait_finished, wait_job};

/// Two api replicas on one database, a worker with `slots` on each.
struct Cluster {
    a: TestApp,
    b: TestApp,
    _workers: Vec<InProcessWorker>,
}

async fn cluster(slots: u32) -> Cluster {
    let fast = |c: &mut baton_api::ApiConfig| {
        c.reaper_interval = Duration::from_millis(300);
        c.metrics_refresh_interval = Duration::from_millis(300);
    };
    let a = spawn_app_with(fast).await;
    let b = spawn_replica(a.database_url.clone(), fast).await;
    let workers = vec![
        InProcessWorker::start(&a, slots).await,
        InProcessWorker::start(&b, slots).await,
    ];
    Cluster {
        a,
        b,
        _workers: workers,
    }
}

impl Cluster {
    /// Runs `event_id` once per input, all at once, alternating between the replicas.
    async fn run_all(&self, event_id: &str, inputs: Vec<Value>) -> Vec<String> {
        let runs = inputs.into_iter().enumerate().map(|(i, input)| {
            let app = if i % 2 == 0 { &self.a } else { &self.b };
            async move { app.run_event(event_id, &json!({"input": input})).await }
        });
        futures::future::join_all(runs).await
    }

    async fn finish_all(&self, ids: &[String]) -> Vec<Value> {
        let mut jobs = Vec::new();
        for id in ids {
            jobs.push(wait_finished(&self.a, id).await);
        }
        jobs
    }
}

fn at(job: &Value, field: &str) -> Option<DateTime<Utc>> {
    job[field].as_str().map(|s| s.parse().expect("timestamp"))
}

fn at_set(job: &Value, field: &str) -> DateTime<Utc> {
    at(job, field).unwrap_or_else(|| panic!("{field} is set: {job}"))
}

/// The most jobs whose [started_at, finished_at] intervals overlap at one instant.
fn max_overlap(jobs: &[&Value]) -> usize {
    let mut edges: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for job in jobs {
        if let (Some(start), Some(end)) = (at(job, "started_at"), at(job, "finished_at")) {
            edges.push((start, 1));
            edges.push((end, -1));
        }
    }
    // An end at the same instant as a start comes first (the slot was free).
    edges.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

async fn event(app: &TestApp, spec: Value) -> String {
    app.create_event(&spec).await["id"]
        .as_str()
        .expect("event id")
        .to_owned()
}

/// `queue`: ten runs at once through two replicas onto two workers with room for all of
/// them, and never more than `max` running at once; every run still runs.
#[tokio::test]
async fn queue_keeps_a_group_within_max_across_replicas_and_workers() {
    let c = cluster(6).await;
    let id = event(
        &c.a,
        json!({"name": "queued", "runtime": "sh", "executor": "local",
               "content": "sleep 0.4; echo done",
               "concurrency": {"max": 2, "strategy": "queue"}}),
    )
    .await;
    let ids = c.run_all(&id, vec![json!({}); 10]).await;
    let jobs = c.finish_all(&ids).await;
    for job in &jobs {
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["concurrency_key"], "", "the shared group: {job}");
    }
    let all: Vec<&Value> = jobs.iter().collect();
    let most = max_overlap(&all);
    assert!(most <= 2, "at most 2 at once, saw {most}");
    assert_eq!(most, 2, "the group's two slots were used");
    // Both workers took part.
    let workers: std::collections::HashSet<&str> = jobs
        .iter()
        .filter_map(|j| j["worker_id"].as_str())
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
}

/// Keys form separate groups: `max: 1` per host, and two hosts run side by side.
#[tokio::test]
async fn keys_give_separate_groups() {
    let c = cluster(4).await;
    let id = event(
        &c.a,
        json!({"name": "per-host", "runtime": "sh", "executor": "local",
               "content": "sleep 0.5",
               "concurrency": {"max": 1, "key": "{{ input.host }}"}}),
    )
    .await;
    let inputs = (0..8)
        .map(|i| json!({"host": if i % 2 == 0 { "db1" } else { "db2" }}))
        .collect();
    let ids = c.run_all(&id, inputs).await;
    let jobs = c.finish_all(&ids).await;
    for host in ["db1", "db2"] {
        let group: Vec<&Value> = jobs
            .iter()
            .filter(|j| j["concurrency_key"] == host)
            .collect();
        assert_eq!(group.len(), 4, "{host}: {jobs:?}");
        assert!(group.iter().all(|j| j["status"] == "succeeded"));
        assert_eq!(max_overlap(&group), 1, "{host} one at a time");
    }
    let all: Vec<&Value> = jobs.iter().collect();
    assert_eq!(max_overlap(&all), 2, "the two hosts ran side by side");
}

/// `skip`: with two slots taken by long runs, the other eight of ten end at once as
/// `cancelled` with kind `concurrency` and fire their actions.
#[tokio::test]
async fn skip_ends_the_runs_of_a_full_group_at_once_and_records_them() {
    let c = cluster(6).await;
    let alert = event(
        &c.a,
        json!({"name": "skip-alert", "runtime": "noop", "executor": "local"}),
    )
    .await;
    let id = event(
        &c.a,
        json!({"name": "skipper", "runtime": "sh", "executor": "local",
               "content": "sleep 3",
               "concurrency": {"max": 2, "strategy": "skip"}}),
    )
    .await;
    let (status, body) =
        c.a.post(
            &format!("/api/v1/events/{id}/actions"),
            &json!({"trigger": "always", "action": {"type": "run_event", "event_id": alert}}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let ids = c.run_all(&id, vec![json!({}); 10]).await;
    let jobs = c.finish_all(&ids).await;
    let skipped: Vec<&Value> = jobs.iter().filter(|j| j["status"] == "cancelled").collect();
    let ran: Vec<&Value> = jobs.iter().filter(|j| j["status"] == "succeeded").collect();
    assert_eq!((skipped.len(), ran.len()), (8, 2), "{jobs:?}");
    for job in &skipped {
        assert_eq!(job["error"]["kind"], "concurrency", "{job}");
        assert!(
            job["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("skipped")),
            "{job}"
        );
        assert!(job["started_at"].is_null(), "never ran: {job}");
    }
    // Every run fired its `always` action, the skipped ones included.
    let (_, chained) = c.a.get(&format!("/api/v1/jobs?event_id={alert}")).await;
    let parents: std::collections::HashSet<&str> = chained["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|j| j["parent_job_id"].as_str())
        .collect();
    assert_eq!(parents.len(), 10, "{chained}");
}

/// `cancel_previous`: a running run is cancelled (its process killed, long before its
/// sleep ends) when a newer one comes; of ten, only the last admitted runs to success, and
/// only once the others are gone.
#[tokio::test]
async fn cancel_previous_cancels_earlier_runs_and_the_last_runs() {
    let c = cluster(6).await;
    let id = event(
        &c.a,
        json!({"name": "latest-wins", "runtime": "sh", "executor": "local",
               "content": "echo started; sleep 2; echo done",
               "concurrency": {"max": 1, "strategy": "cancel_previous"}}),
    )
    .await;
    let first = c.a.run_event(&id, &json!({})).await;
    wait_job(&c.a, &first, |j| j["status"] == "running").await;
    let ids = c.run_all(&id, vec![json!({}); 9]).await;
    let first = wait_finished(&c.a, &first).await;
    assert_eq!(first["status"], "cancelled", "{first}");
    let ran_for = at_set(&first, "finished_at") - at_set(&first, "started_at");
    assert!(
        ran_for < chrono::Duration::milliseconds(1900),
        "its process was killed: {first}"
    );
    assert!(
        first["action_notes"].as_array().is_some_and(|n| n
            .iter()
            .any(|n| n.as_str().unwrap_or("").contains("cancel_previous"))),
        "{first}"
    );
    let jobs = c.finish_all(&ids).await;
    let winners: Vec<&Value> = jobs.iter().filter(|j| j["status"] == "succeeded").collect();
    assert_eq!(winners.len(), 1, "{jobs:?}");
    let last = winners[0];
    for job in jobs.iter().filter(|j| j["id"] != last["id"]) {
        assert_eq!(job["status"], "cancelled", "{job}");
        assert!(
            matches!(
                job["error"]["kind"].as_str(),
                Some("concurrency" | "cancelled")
            ),
            "{job}"
        );
        if let Some(end) = at(job, "finished_at") {
            assert!(
                end <= at(last, "started_at").expect("started"),
                "the last ran once the others were gone"
            );
        }
    }
    assert!(at_set(last, "started_at") >= at_set(&first, "finished_at"));
}

/// `stuck_after_seconds`: a run silent past its threshold is flagged (job, list filter,
/// gauge), its `on_stuck` action fires once, and a new line clears the flag.
#[tokio::test]
async fn a_silent_run_is_flagged_stuck_fires_on_stuck_once_and_is_cleared_by_output() {
    let c = cluster(2).await;
    let alert = event(
        &c.a,
        json!({"name": "stuck-alert", "runtime": "noop", "executor": "local"}),
    )
    .await;
    let id = event(
        &c.a,
        json!({"name": "sleepy", "runtime": "sh", "executor": "local",
               "content": "echo one; sleep 3; echo two; sleep 0.3",
               "stuck_after_seconds": 1}),
    )
    .await;
    let (status, body) =
        c.a.post(
            &format!("/api/v1/events/{id}/actions"),
            &json!({"trigger": "on_stuck", "action": {"type": "run_event", "event_id": alert}}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let job_id = c.a.run_event(&id, &json!({})).await;
    let stuck = wait_job(&c.a, &job_id, |j| j["stuck"] == true).await;
    assert_eq!(stuck["status"], "running", "{stuck}");
    let (_, listed) = c.b.get("/api/v1/jobs?stuck=true").await;
    assert!(
        listed["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|j| j["id"] == job_id.as_str())),
        "{listed}"
    );
    let (_, not_stuck) =
        c.a.get(&format!("/api/v1/jobs?stuck=false&event_id={id}"))
            .await;
    assert_eq!(not_stuck["items"].as_array().map(Vec::len), Some(0));
    // The gauge shows it (refreshed every 300 ms here).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text =
            c.a.anonymous(reqwest::Method::GET, "/metrics")
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text");
        if text.lines().any(|l| l == "baton_jobs_stuck 1") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = wait_finished(&c.a, &job_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["stuck"], false, "the second line cleared it: {done}");
    // Fired once, though both replicas' reapers looked every 300 ms.
    let (_, chained) = c.a.get(&format!("/api/v1/jobs?event_id={alert}")).await;
    let items = chained["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{chained}");
    assert_eq!(items[0]["parent_job_id"], job_id.as_str());
}

/// The startup window on the local executor.
#[tokio::test]
async fn the_startup_window_marks_early_exits_on_the_local_executor() {
    let c = cluster(4).await;
    startup_window_cases(&c.a, &json!({"executor": "local"})).await;
}

/// The startup window's rule, on the executor `placement` names (a worker offering it must
/// be connected): an early non-zero exit is a start failure (the script's own fault: kind
/// script, also for bash's 127 of a command missing inside the script), a missing program an
/// infrastructure one; a later exit, or a window of 0, is an ordinary failure.
pub(crate) async fn startup_window_cases(app: &TestApp, placement: &Value) {
    let run = |name: &str, spec: Value| {
        let mut spec = spec;
        spec["name"] = json!(name);
        spec["max_attempts"] = json!(1);
        for (k, v) in placement.as_object().expect("placement") {
            spec[k] = v.clone();
        }
        async move {
            let id = event(app, spec).await;
            let job = app.run_event(&id, &json!({})).await;
            wait_finished(app, &job).await
        }
    };
    let early = run(
        "early",
        json!({"runtime": "bash", "content": "echo bad config >&2; exit 3",
               "startup_window_seconds": 5}),
    )
    .await;
    assert_eq!(early["status"], "failed", "{early}");
    assert_eq!(early["exit_code"], 3);
    assert_eq!(early["error"]["kind"], "script", "{early}");
    assert_eq!(early["error"]["start_failure"], true, "{early}");
    let message = early["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("startup window of 5 s") && message.contains("bad config"),
        "{message}"
    );

    let missing = run(
        "missing-program",
        json!({"runtime": "exec", "command": ["/nonexistent/program", "x"]}),
    )
    .await;
    assert_eq!(missing["status"], "failed", "{missing}");
    assert_eq!(missing["error"]["kind"], "infrastructure", "{missing}");
    assert_eq!(missing["error"]["start_failure"], true, "{missing}");

    let not_found_inside = run(
        "missing-inside",
        json!({"runtime": "bash", "content": "no-such-command-xyz"}),
    )
    .await;
    assert_eq!(not_found_inside["exit_code"], 127, "{not_found_inside}");
    assert_eq!(
        not_found_inside["error"]["kind"], "script",
        "bash's own 127 is the script's fault: {not_found_inside}"
    );
    assert_eq!(not_found_inside["error"]["start_failure"], true);

    let late = run(
        "late",
        json!({"runtime": "sh", "content": "sleep 1.5; exit 3", "startup_window_seconds": 1}),
    )
    .await;
    assert_eq!(late["error"]["kind"], "script", "{late}");
    assert!(late["error"].get("start_failure").is_none(), "{late}");

    let off = run(
        "window-off",
        json!({"runtime": "sh", "content": "exit 4", "startup_window_seconds": 0}),
    )
    .await;
    assert_eq!(off["error"]["kind"], "script", "{off}");
    assert!(off["error"].get("start_failure").is_none(), "{off}");
}
