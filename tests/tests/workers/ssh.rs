//! Jobs on the ssh executor, through the api: a test sshd registered as a server (`strict`
//! host key), its credentials carried to the worker in the assignment.

use baton_testkit::sshd::{Sshd, login_user};
use baton_tests::{TestApp, spawn_app};
use reqwest::StatusCode;
use serde_json::json;

use crate::chains::{data_flows, placed_event};
use crate::support::{InProcessWorker, wait_finished};

/// Registers `sshd` as a server pinned to `host_key`; returns its id.
async fn register(app: &TestApp, sshd: &Sshd, name: &str, host_key: &str) -> String {
    let (status, server) = app
        .post(
            "/api/v1/servers",
            &json!({
                "name": name, "host": "127.0.0.1", "port": sshd.port, "username": login_user(),
                "private_key": sshd.user_key_pem(), "host_key_policy": "strict",
                "host_key": host_key, "max_concurrent": 2
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{server}");
    server["id"].as_str().expect("id").to_owned()
}

/// A worker offering `ssh` only.
async fn ssh_worker(app: &TestApp) -> InProcessWorker {
    InProcessWorker::start_with(app, 2, |c| {
        c.allow_local = false;
        c.no_container = true;
    })
    .await
}

#[tokio::test]
async fn the_chain_runs_with_every_step_over_ssh() {
    let sshd = Sshd::start();
    let app = spawn_app().await;
    let server_id = register(&app, &sshd, "test-sshd", &sshd.host_key_line()).await;
    let worker = ssh_worker(&app).await;
    data_flows(&app, &json!({"executor": "ssh", "server_id": server_id})).await;
    assert!(sshd.accepted_logins() >= 1, "{}", sshd.log());
    worker.stop().await;
}

#[tokio::test]
async fn a_wrong_host_key_fails_the_job_without_retries() {
    let sshd = Sshd::start();
    let app = spawn_app().await;
    let server_id = register(&app, &sshd, "impostor", &sshd.other_key_line()).await;
    let worker = ssh_worker(&app).await;
    let ev = placed_event(
        &app,
        "never-runs",
        "bash",
        "echo should not run",
        &json!({"server_id": server_id, "max_attempts": 3, "retry_backoff_seconds": 1}),
    )
    .await;
    let id = app.run_event(&ev, &json!({})).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(
        (job["status"].as_str(), job["error"]["kind"].as_str()),
        (Some("failed"), Some("infrastructure")),
        "{job}"
    );
    assert!(
        job["error"]["message"]
            .as_str()
            .expect("message")
            .contains("host key"),
        "{job}"
    );
    // Longer than the retry backoff: a retry would have shown by now.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (_, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_i64()),
        (Some("failed"), Some(1)),
        "not retried: {job}"
    );
    assert_eq!(sshd.accepted_logins(), 0, "no login with a wrong host key");
    worker.stop().await;
}

#[tokio::test]
async fn a_host_key_seen_on_first_use_is_pinned() {
    let sshd = Sshd::start();
    let app = spawn_app().await;
    let (status, server) = app
        .post(
            "/api/v1/servers",
            &json!({
                "name": "tofu", "host": "127.0.0.1", "port": sshd.port, "username": login_user(),
                "private_key": sshd.user_key_pem(), "host_key_policy": "accept_new"
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{server}");
    let server_id = server["id"].as_str().expect("id").to_owned();
    let worker = ssh_worker(&app).await;
    let ev = placed_event(
        &app,
        "first-contact",
        "bash",
        "echo hi",
        &json!({"server_id": server_id}),
    )
    .await;
    let id = app.run_event(&ev, &json!({})).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (_, server) = app.get(&format!("/api/v1/servers/{server_id}")).await;
    let pinned = server["host_key"].as_str().unwrap_or_default();
    assert_eq!(
        pinned.split_whitespace().take(2).collect::<Vec<_>>(),
        sshd.host_key_line().split_whitespace().collect::<Vec<_>>(),
        "{server}"
    );
    worker.stop().await;
}

/// The startup window's rule on the ssh executor (see `policies`).
#[tokio::test]
async fn the_startup_window_marks_early_exits_over_ssh() {
    let sshd = Sshd::start();
    let app = spawn_app().await;
    let server_id = register(&app, &sshd, "test-sshd", &sshd.host_key_line()).await;
    let worker = ssh_worker(&app).await;
    crate::policies::startup_window_cases(
        &app,
        &json!({"executor": "ssh", "server_id": server_id}),
    )
    .await;
    worker.stop().await;
}
