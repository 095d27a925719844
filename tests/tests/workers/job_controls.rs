//! Operator controls on jobs through the whole system: reruns (dead-letter replay) and
//! forced cancels, with a real worker running real processes.

use std::time::{Duration, Instant};

use baton_tests::spawn_app;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{InProcessWorker, all_lines, wait_finished, wait_job};

/// A dead job is rerun with the event snapshot it was queued with (not the event as edited
/// since) and its input; the rerun points back at it; a job not finished cannot be rerun.
#[tokio::test]
async fn a_dead_job_is_rerun_with_its_snapshot_and_input_and_an_unfinished_one_is_refused() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let fixed = dir.path().join("fixed");
    // Fails until `fixed` exists (the outside cause of a dead letter, since repaired).
    let script = format!(
        "echo snapshot-one; cat \"$BATON_DIR/input.json\"; echo; test -f {} || exit 3",
        fixed.display()
    );
    let ev = app
        .create_event(
            &json!({"name": "replay", "runtime": "sh", "content": script,
            "executor": "local", "max_attempts": 1}),
        )
        .await;
    let event_id = ev["id"].as_str().expect("id");
    let id = app.run_event(event_id, &json!({"input": {"n": 41}})).await;
    let dead = wait_job(&app, &id, |j| j["dead"] == true).await;
    assert_eq!(
        (dead["status"].as_str(), dead["exit_code"].as_i64()),
        (Some("failed"), Some(3)),
        "{dead}"
    );

    // The event changes after the run was queued; the rerun still runs the snapshot.
    let (status, body) = app
        .patch(
            &format!("/api/v1/events/{event_id}"),
            &json!({"content": "echo snapshot-two"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    std::fs::write(&fixed, b"").expect("repair");

    let (status, answer) = app
        .post(&format!("/api/v1/jobs/{id}/rerun"), &Value::Null)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let rerun = answer["job_id"].as_str().expect("job_id").to_owned();
    assert_ne!(rerun, id);
    let job = wait_finished(&app, &rerun).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["rerun_of"], id.as_str());
    assert_eq!(job["input"], json!({"n": 41}));
    assert_eq!(job["attempt"], 1);
    let texts: Vec<String> = all_lines(&app, &rerun)
        .await
        .iter()
        .filter_map(|l| l["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(texts[0], "snapshot-one", "{texts:?}");
    assert!(texts[1].contains("41"), "{texts:?}");
    // The dead job stays as it was.
    let (_, original) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(
        (original["dead"].as_bool(), original["rerun_of"].as_str()),
        (Some(true), None)
    );
    // The rerun is audited.
    let pool = sqlx::PgPool::connect(&app.database_url)
        .await
        .expect("connect");
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'job.rerun' AND target_id = $1",
    )
    .bind(&rerun)
    .fetch_one(&pool)
    .await
    .expect("audit");
    assert_eq!(audited, 1);

    // A running job cannot be rerun (409), an unknown one is 404, a viewer may not.
    let slow = app
        .create_event(
            &json!({"name": "slow", "runtime": "sh", "content": "echo up; sleep 60",
            "executor": "local"}),
        )
        .await;
    let running = app
        .run_event(slow["id"].as_str().expect("id"), &json!({}))
        .await;
    wait_job(&app, &running, |j| j["status"] == "running").await;
    let (status, err) = app
        .post(&format!("/api/v1/jobs/{running}/rerun"), &Value::Null)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert_eq!(err["error"]["code"], "job_not_finished");
    let (status, err) = app
        .post(
            &format!("/api/v1/jobs/{}/rerun", uuid::Uuid::now_v7()),
            &Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    let viewer = app.token(baton_api::model::Role::Viewer).await;
    let (status, _) = baton_tests::send(app.request_as(
        &viewer,
        reqwest::Method::POST,
        &format!("/api/v1/jobs/{id}/rerun"),
    ))
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app
        .post(
            &format!("/api/v1/jobs/{running}/cancel?force=true"),
            &Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_finished(&app, &running).await;
    worker.stop().await;
}

/// A script that ignores SIGTERM (its whole tree does: an ignored signal is inherited):
/// a plain cancel waits out the worker's 5 s grace before SIGKILL; a forced cancel kills it
/// at once, and a forced cancel after a plain one cuts the grace short.
#[tokio::test]
async fn a_forced_cancel_kills_a_script_that_ignores_sigterm_at_once() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 3).await;
    let ev = app
        .create_event(&json!({"name": "stubborn", "runtime": "bash",
            "content": "trap '' TERM; echo started; while true; do sleep 0.1; done",
            "executor": "local"}))
        .await;
    let event_id = ev["id"].as_str().expect("id");
    let plain = app.run_event(event_id, &json!({})).await;
    let forced = app.run_event(event_id, &json!({})).await;
    let escalated = app.run_event(event_id, &json!({})).await;
    for id in [&plain, &forced, &escalated] {
        wait_job(&app, id, |j| j["status"] == "running").await;
        // Its trap is set once it printed.
        let deadline = Instant::now() + Duration::from_secs(30);
        while all_lines(&app, id).await.is_empty() {
            assert!(Instant::now() < deadline, "job {id} never printed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let cancel = |id: &str, force: bool| {
        let path = if force {
            format!("/api/v1/jobs/{id}/cancel?force=true")
        } else {
            format!("/api/v1/jobs/{id}/cancel")
        };
        let app = &app;
        async move {
            let (status, body) = app.post(&path, &Value::Null).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
            body
        }
    };
    let asked = Instant::now();
    cancel(&plain, false).await;
    cancel(&escalated, false).await;
    let job = cancel(&forced, true).await;
    assert_eq!(job["cancel_requested"], true);
    let job = wait_finished(&app, &forced).await;
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "a forced cancel took {took:?}"
    );
    assert_eq!(
        (job["status"].as_str(), job["error"]["kind"].as_str()),
        (Some("cancelled"), Some("cancelled")),
        "{job}"
    );
    // The plain cancels are still in their grace: the script ignored SIGTERM.
    for id in [&plain, &escalated] {
        let (_, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
        assert_eq!(job["status"], "running", "{job}");
    }
    // Forcing the second one now ends it at once, well within the grace left.
    let forced_at = Instant::now();
    cancel(&escalated, true).await;
    wait_finished(&app, &escalated).await;
    let took = forced_at.elapsed();
    assert!(took < Duration::from_secs(2), "escalation took {took:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "ended before the grace"
    );
    // The plain one ends only after the grace (5 s), with SIGKILL.
    let job = wait_finished(&app, &plain).await;
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(4500),
        "a plain cancel of a SIGTERM-ignoring script ended after {took:?}: the grace was skipped"
    );
    assert_eq!(job["status"], "cancelled", "{job}");
    worker.stop().await;
}
