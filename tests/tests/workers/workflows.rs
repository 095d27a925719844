//! Workflows on a real api and a real worker running real processes: a diamond passing data,
//! a `for_each` fan-out bounded by `max_parallel`, `if` skips, the `any_failed` path and
//! `on_failure`, cancel mid-run, and retry from the failed steps.

use baton_tests::workflows::{
    create_workflow, run_workflow, statuses, step, wait_run, wait_run_ended,
};
use baton_tests::{TestApp, spawn_app};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::support::{InProcessWorker, local_event, wait_finished, wait_job};

/// A local `noop` event (succeeds at once with its input as its output).
async fn noop_event(app: &TestApp, name: &str) -> String {
    let ev = app
        .create_event(&json!({"name": name, "runtime": "noop", "executor": "local"}))
        .await;
    ev["id"].as_str().expect("id").to_owned()
}

fn ids(step: &Value) -> Vec<String> {
    step["job_ids"]
        .as_array()
        .expect("job_ids")
        .iter()
        .map(|j| j.as_str().expect("id").to_owned())
        .collect()
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("a timestamp: {v}"))
}

#[tokio::test]
async fn a_diamond_passes_both_branches_outputs_to_the_fan_in() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 4).await;
    let a = local_event(
        &app,
        "a",
        "bash",
        "source baton.sh\nbaton_output '{\"n\": 2}'",
    )
    .await;
    let b = local_event(
        &app,
        "b",
        "python",
        "import baton\ni = baton.input()\nbaton.output({'b': i['steps']['a']['n'] + 1})",
    )
    .await;
    let c = local_event(
        &app,
        "c",
        "python",
        "import baton\ni = baton.input()\nbaton.output({'c': i['steps']['a']['n'] * 10, 'region': i['region']})",
    )
    .await;
    let d = local_event(
        &app,
        "d",
        "python",
        "import baton\ni = baton.input()\ns = i['steps']\nbaton.output({'sum': s['b']['b'] + s['c']['c'], 'seen': sorted(s)})",
    )
    .await;
    let wf = create_workflow(
        &app,
        &json!({"name": "diamond", "steps": [
            {"id": "a", "event_id": a},
            {"id": "b", "event_id": b, "needs": ["a"]},
            {"id": "c", "event_id": c, "needs": ["a"]},
            {"id": "d", "event_id": d, "needs": ["b", "c"]}
        ]}),
    )
    .await;
    let run_id = run_workflow(&app, &wf, &json!({"region": "eu"})).await;
    let run = wait_run_ended(&app, &run_id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        statuses(&run),
        ["a=succeeded", "b=succeeded", "c=succeeded", "d=succeeded"]
    );
    let d_step = step(&run, "d");
    assert_eq!(d_step["output"], json!({"sum": 23, "seen": ["b", "c"]}));
    assert_eq!(
        step(&run, "c")["output"]["region"],
        "eu",
        "the run's input reaches steps"
    );
    // One job per step, carrying the run and the step; d started after both parents ended.
    for id in ["a", "b", "c", "d"] {
        let jobs = ids(step(&run, id));
        assert_eq!(jobs.len(), 1, "{id}: {jobs:?}");
        let (_, job) = app.get(&format!("/api/v1/jobs/{}", jobs[0])).await;
        assert_eq!(job["workflow_run_id"], run_id.as_str());
        assert_eq!(job["step_id"], id);
    }
    let d_start = time(&d_step["started_at"]);
    for parent in ["b", "c"] {
        assert!(time(&step(&run, parent)["finished_at"]) <= d_start);
    }
    let (_, listed) = app
        .get(&format!("/api/v1/workflow-runs?workflow_id={wf}"))
        .await;
    assert_eq!(listed["items"][0]["id"], run_id.as_str(), "{listed}");
    let (_, jobs) = app
        .get(&format!("/api/v1/jobs?workflow_run_id={run_id}"))
        .await;
    assert_eq!(jobs["items"].as_array().map(Vec::len), Some(4), "{jobs}");
    worker.stop().await;
}

#[tokio::test]
async fn for_each_of_50_never_runs_more_than_max_parallel_and_feeds_the_next_step() {
    let app = spawn_app().await;
    // More slots than max_parallel: the limit must come from the workflow.
    let worker = InProcessWorker::start(&app, 12).await;
    let hosts = noop_event(&app, "hosts").await;
    let backup = local_event(
        &app,
        "backup",
        "python",
        "import baton, time\ni = baton.input()\ntime.sleep(0.2)\nbaton.output({'host': i['item'], 'size': i['index'] + 1})",
    )
    .await;
    let verify = noop_event(&app, "verify").await;
    let alert = noop_event(&app, "alert").await;
    let wf = create_workflow(
        &app,
        &json!({"name": "nightly-backup", "steps": [
            {"id": "hosts", "event_id": hosts},
            {"id": "backup", "event_id": backup, "needs": ["hosts"],
             "for_each": "steps.hosts.output.hosts", "max_parallel": 5, "continue_on_error": true},
            {"id": "verify", "event_id": verify, "needs": ["backup"],
             "if": "steps.backup.output.all(r, r.size > 0)",
             "input": {"count": "size(steps.backup.output)"}},
            {"id": "alert", "event_id": alert, "needs": ["backup", "verify"], "when": "any_failed"}
        ]}),
    )
    .await;
    let host_names: Vec<String> = (0..50).map(|i| format!("host-{i}")).collect();
    let run_id = run_workflow(&app, &wf, &json!({"hosts": host_names})).await;
    let run = wait_run_ended(&app, &run_id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        statuses(&run),
        [
            "hosts=succeeded",
            "backup=succeeded",
            "verify=succeeded",
            "alert=skipped"
        ]
    );
    let backup_step = step(&run, "backup");
    assert_eq!(backup_step["items"], 50);
    let outputs = backup_step["output"].as_array().expect("a list");
    assert_eq!(outputs.len(), 50);
    for (i, out) in outputs.iter().enumerate() {
        assert_eq!(out["host"], format!("host-{i}"), "outputs in item order");
    }
    assert_eq!(step(&run, "verify")["output"]["count"], 50);
    assert_eq!(step(&run, "alert")["skip_reason"], "when");
    // Never more than 5 running, from the jobs' own start and finish times.
    let mut edges = Vec::new();
    let jobs = ids(backup_step);
    assert_eq!(jobs.len(), 50);
    for id in &jobs {
        let job = wait_finished(&app, id).await;
        assert_eq!(job["status"], "succeeded");
        edges.push((time(&job["started_at"]), 1));
        edges.push((time(&job["finished_at"]), -1));
    }
    // At equal instants, count the end first (an item starts only after another ended).
    edges.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut running, mut most) = (0, 0);
    for (_, delta) in edges {
        running += delta;
        most = most.max(running);
    }
    assert!(most <= 5, "{most} items ran at once");
    assert!(
        most >= 3,
        "the items did run in parallel (at most {most} at once)"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_false_if_skips_its_branch_and_the_dependants() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 4).await;
    let noop = noop_event(&app, "noop").await;
    let wf = create_workflow(
        &app,
        &json!({"name": "branches", "steps": [
            {"id": "start", "event_id": noop},
            {"id": "deploy", "event_id": noop, "needs": ["start"], "if": "input.deploy == true"},
            {"id": "announce", "event_id": noop, "needs": ["deploy"]},
            {"id": "report", "event_id": noop, "needs": ["start"],
             "if": "steps.start.status == 'succeeded' && !input.deploy"},
            {"id": "tidy", "event_id": noop, "needs": ["announce", "report"], "when": "always"}
        ]}),
    )
    .await;
    let run_id = run_workflow(&app, &wf, &json!({"deploy": false})).await;
    let run = wait_run_ended(&app, &run_id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        statuses(&run),
        [
            "start=succeeded",
            "deploy=skipped",
            "announce=skipped",
            "report=succeeded",
            "tidy=succeeded"
        ]
    );
    assert_eq!(step(&run, "deploy")["skip_reason"], "condition");
    assert_eq!(step(&run, "announce")["skip_reason"], "upstream_skipped");
    assert!(
        ids(step(&run, "deploy")).is_empty(),
        "a skipped step queues no job"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_failure_takes_the_any_failed_path_and_fires_on_failure_once() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 4).await;
    let noop = noop_event(&app, "noop").await;
    let broken = local_event(&app, "broken", "bash", "echo failing; exit 3").await;
    let pager = noop_event(&app, "pager").await;
    let wf = create_workflow(
        &app,
        &json!({"name": "with-alert", "on_failure": {"event_id": pager}, "steps": [
            {"id": "work", "event_id": broken},
            {"id": "verify", "event_id": noop, "needs": ["work"]},
            {"id": "alert", "event_id": noop, "needs": ["work", "verify"], "when": "any_failed",
             "input": {"failed": "steps.work.status"}}
        ]}),
    )
    .await;
    let run_id = run_workflow(&app, &wf, &json!({})).await;
    let run = wait_run(&app, &run_id, |r| {
        r["status"] != "running" && r["on_failure_job_id"].is_string()
    })
    .await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(
        statuses(&run),
        ["work=failed", "verify=skipped", "alert=succeeded"]
    );
    assert_eq!(step(&run, "verify")["skip_reason"], "upstream_failed");
    assert!(
        step(&run, "work")["error"]
            .as_str()
            .is_some_and(|e| e.contains("script")),
        "{run}"
    );
    assert_eq!(step(&run, "alert")["output"]["failed"], "failed");
    let on_failure = run["on_failure_job_id"].as_str().expect("on_failure job");
    let job = wait_finished(&app, on_failure).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["output"]["failed_steps"], json!(["work"]));
    assert_eq!(job["output"]["workflow_run_id"], run_id.as_str());
    let (_, jobs) = app
        .get(&format!(
            "/api/v1/jobs?workflow_run_id={run_id}&event_id={pager}"
        ))
        .await;
    assert_eq!(jobs["items"].as_array().map(Vec::len), Some(1), "{jobs}");
    worker.stop().await;
}

#[tokio::test]
async fn cancelling_a_run_kills_its_running_step_and_starts_nothing_more() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 4).await;
    let slow = local_event(&app, "slow", "bash", "echo started; sleep 120").await;
    let noop = noop_event(&app, "noop").await;
    let wf = create_workflow(
        &app,
        &json!({"name": "long", "steps": [
            {"id": "slow", "event_id": slow},
            {"id": "after", "event_id": noop, "needs": ["slow"]}
        ]}),
    )
    .await;
    let run_id = run_workflow(&app, &wf, &json!({})).await;
    let run = wait_run(&app, &run_id, |r| step(r, "slow")["job_ids"][0].is_string()).await;
    let job_id = ids(step(&run, "slow"))[0].clone();
    wait_job(&app, &job_id, |j| j["status"] == "running").await;
    let started = std::time::Instant::now();
    let (status, cancelled) = app
        .post(
            &format!("/api/v1/workflow-runs/{run_id}/cancel"),
            &json!({}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(statuses(&cancelled), ["slow=cancelled", "after=cancelled"]);
    let job = wait_finished(&app, &job_id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the running step was killed promptly ({:?})",
        started.elapsed()
    );
    let run = wait_run_ended(&app, &run_id).await;
    assert_eq!(run["status"], "cancelled");
    assert!(
        ids(step(&run, "after")).is_empty(),
        "nothing started after the cancel"
    );
    let (status, again) = app
        .post(
            &format!("/api/v1/workflow-runs/{run_id}/cancel"),
            &json!({}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{again}");
    worker.stop().await;
}

#[tokio::test]
async fn retry_reruns_only_failed_and_failure_skipped_steps_keeping_outputs() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 4).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let flag = dir.path().join("fixed");
    let first = local_event(
        &app,
        "first",
        "bash",
        "source baton.sh\nbaton_output \"{\\\"nonce\\\": \\\"$RANDOM$RANDOM\\\"}\"",
    )
    .await;
    let flaky = local_event(
        &app,
        "flaky",
        "bash",
        &format!(
            "test -f {} || {{ echo not yet; exit 1; }}\nsource baton.sh\nbaton_output '{{\"ok\": true}}'",
            flag.display()
        ),
    )
    .await;
    let noop = noop_event(&app, "noop").await;
    let wf = create_workflow(
        &app,
        &json!({"name": "retryable", "steps": [
            {"id": "first", "event_id": first},
            {"id": "flaky", "event_id": flaky, "needs": ["first"]},
            {"id": "last", "event_id": noop, "needs": ["flaky"],
             "input": {"nonce": "steps.first.output.nonce"}}
        ]}),
    )
    .await;
    let run_id = run_workflow(&app, &wf, &json!({})).await;
    let failed = wait_run_ended(&app, &run_id).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(
        statuses(&failed),
        ["first=succeeded", "flaky=failed", "last=skipped"]
    );
    let first_jobs = ids(step(&failed, "first"));
    let nonce = step(&failed, "first")["output"]["nonce"].clone();
    let flaky_jobs = ids(step(&failed, "flaky"));

    std::fs::write(&flag, "").expect("flag");
    let (status, body) = app
        .post(&format!("/api/v1/workflow-runs/{run_id}/retry"), &json!({}))
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["attempt"], 2);
    let run = wait_run_ended(&app, &run_id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        statuses(&run),
        ["first=succeeded", "flaky=succeeded", "last=succeeded"]
    );
    assert_eq!(
        ids(step(&run, "first")),
        first_jobs,
        "succeeded steps are not rerun"
    );
    assert_eq!(step(&run, "first")["attempt"], 1);
    assert_ne!(
        ids(step(&run, "flaky")),
        flaky_jobs,
        "the failed step ran again"
    );
    assert_eq!(step(&run, "flaky")["attempt"], 2);
    assert_eq!(
        step(&run, "last")["output"]["nonce"],
        nonce,
        "kept outputs feed the rerun"
    );
    let (status, _) = app
        .post(&format!("/api/v1/workflow-runs/{run_id}/retry"), &json!({}))
        .await;
    assert_eq!(
        status,
        reqwest::StatusCode::CONFLICT,
        "a succeeded run is not retried"
    );
    worker.stop().await;
}

/// The jobs chained from `parent` (`parent_job_id`), as event ids.
async fn children(app: &TestApp, parent: &str) -> Vec<String> {
    let row: Vec<(String,)> = sqlx::query_as(
        "SELECT event_id::text FROM jobs WHERE parent_job_id = $1::uuid ORDER BY id",
    )
    .bind(parent)
    .fetch_all(&app.pool)
    .await
    .expect("children");
    row.into_iter().map(|(e,)| e).collect()
}

#[tokio::test]
async fn actions_fire_only_when_their_cel_if_holds() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 4).await;
    let src = local_event(
        &app,
        "count-rows",
        "python",
        "import baton\nbaton.output({'rows': baton.input()['rows']})",
    )
    .await;
    let big = noop_event(&app, "big").await;
    let small = noop_event(&app, "small").await;
    for (trigger, condition, target) in [
        (
            "on_success",
            "output.rows > 100 && status == 'succeeded'",
            &big,
        ),
        (
            "always",
            "status != 'succeeded' || output.rows <= 100",
            &small,
        ),
    ] {
        let (status, body) = app
            .post(
                &format!("/api/v1/events/{src}/actions"),
                &json!({"trigger": trigger, "if": condition,
                        "action": {"type": "run_event", "event_id": target}}),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
        assert_eq!(body["if"], condition);
    }
    for (rows, expected) in [(150, &big), (5, &small)] {
        let job = app.run_event(&src, &json!({"input": {"rows": rows}})).await;
        wait_finished(&app, &job).await;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let fired = children(&app, &job).await;
            if !fired.is_empty() {
                assert_eq!(fired, std::slice::from_ref(expected), "rows={rows}");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no action fired");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // An `if` that does not compile, or names an unknown variable, is refused naming `if`.
    for bad in ["output.rows >", "rows > 1"] {
        let (status, body) = app
            .post(
                &format!("/api/v1/events/{src}/actions"),
                &json!({"trigger": "always", "if": bad,
                        "action": {"type": "run_event", "event_id": big}}),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"]["field"], "if");
    }
    worker.stop().await;
}
