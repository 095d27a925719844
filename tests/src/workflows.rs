//! Helpers for the workflow tests: create, run and wait on workflow runs through the API.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::TestApp;

/// Creates a workflow (admin) and returns its id; panics unless the API answers 201.
pub async fn create_workflow(app: &TestApp, definition: &Value) -> String {
    let (status, body) = app.post("/api/v1/workflows", definition).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

/// Runs a workflow with `input` and returns the run id.
pub async fn run_workflow(app: &TestApp, workflow_id: &str, input: &Value) -> String {
    let (status, body) = app
        .post(
            &format!("/api/v1/workflows/{workflow_id}/run"),
            &json!({"input": input}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["run_id"].as_str().expect("run_id").to_owned()
}

/// Polls `GET /workflow-runs/{id}` until `done(run)` holds (180 s at most).
pub async fn wait_run(app: &TestApp, run_id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let (status, run) = app.get(&format!("/api/v1/workflow-runs/{run_id}")).await;
        if status == StatusCode::OK && done(&run) {
            return run;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run never reached the expected state: {run}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the run has ended (succeeded, failed or cancelled).
pub async fn wait_run_ended(app: &TestApp, run_id: &str) -> Value {
    wait_run(app, run_id, |r| r["status"] != "running").await
}

/// One step of a run as the API shows it.
pub fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["id"] == id))
        .unwrap_or_else(|| panic!("no step {id} in {run}"))
}

/// The status of every step, as `id=status` in definition order (for readable assertions).
pub fn statuses(run: &Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| {
                    format!(
                        "{}={}",
                        s["id"].as_str().unwrap_or("?"),
                        s["status"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
