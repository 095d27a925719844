//! Secret references (`{{secret.NAME}}`) in `env` and http `request.headers`, resolved by a
//! real worker just before the run; a reference the event cannot read fails the job.

use std::sync::{Arc, Mutex};

use baton_tests::{TestApp, send, spawn_app};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{InProcessWorker, all_lines, wait_finished};

async fn put_secret(app: &TestApp, key: &str, value: &str, scope: &str) {
    let (status, body) = send(
        app.request(Method::PUT, &format!("/api/v1/variables/{key}"))
            .json(&json!({"value": value, "secret": true, "scope": scope})),
    )
    .await;
    assert!(status.is_success(), "{body}");
}

async fn event(app: &TestApp, spec: Value) -> String {
    app.create_event(&spec).await["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

#[tokio::test]
async fn env_references_resolve_on_the_worker_and_unreadable_ones_fail_the_job() {
    let app = spawn_app().await;
    let other = event(
        &app,
        json!({"name": "other", "runtime": "sh", "content": "true", "executor": "local"}),
    )
    .await;
    put_secret(&app, "API_KEY", "s3cr3t-value", "global").await;
    put_secret(&app, "OTHERS_KEY", "not-yours", &format!("event:{other}")).await;
    let uses = event(
        &app,
        json!({"name": "uses-secret", "runtime": "sh", "executor": "local",
            "env": {"TOKEN": "Bearer {{secret.API_KEY}}", "PLAIN": "p"},
            "content": "[ \"$TOKEN\" = 'Bearer s3cr3t-value' ] && [ \"$PLAIN\" = p ] && echo resolved-ok"}),
    )
    .await;
    let steals = event(
        &app,
        json!({"name": "steals-secret", "runtime": "sh", "executor": "local", "max_attempts": 3,
            "env": {"T": "{{secret.OTHERS_KEY}}"}, "content": "echo ran"}),
    )
    .await;
    let worker = InProcessWorker::start(&app, 2).await;
    let ok = app.run_event(&uses, &json!({})).await;
    let refused = app.run_event(&steals, &json!({})).await;

    let job = wait_finished(&app, &ok).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let lines = all_lines(&app, &ok).await;
    assert!(
        lines.iter().any(|l| l["text"] == "resolved-ok"),
        "{lines:?}"
    );
    // The definition keeps the reference; the value never appears in the job.
    let (_, stored) = app.get(&format!("/api/v1/events/{uses}")).await;
    assert_eq!(stored["env"]["TOKEN"], "Bearer {{secret.API_KEY}}");
    assert!(!job.to_string().contains("s3cr3t-value"));

    let job = wait_finished(&app, &refused).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["kind"], "infrastructure", "{job}");
    let message = job["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("env.T") && message.contains("OTHERS_KEY"),
        "{message}"
    );
    assert!(!message.contains("not-yours"), "{message}");
    assert_eq!(job["attempt"], 1, "not retried: it would fail again");
    assert_eq!(job["dead"], true);
    assert!(
        !all_lines(&app, &refused)
            .await
            .iter()
            .any(|l| l["text"] == "ran"),
        "the script never ran"
    );
    worker.stop().await;
}

#[tokio::test]
async fn header_references_resolve_on_the_worker() {
    let app = spawn_app().await;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let router = axum::Router::new().route(
        "/check",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let record = record.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                record.lock().expect("lock").push(auth);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    put_secret(&app, "API_TOKEN", "tok-123", "global").await;
    let ev = event(
        &app,
        json!({"name": "calls-api", "runtime": "http", "executor": "local",
            "request": {"method": "GET", "url": format!("http://{addr}/check"),
                        "headers": {"Authorization": "Bearer {{ secret.API_TOKEN }}"}}}),
    )
    .await;
    // The receiver is on loopback, which `http` jobs may reach only when allowed.
    let worker = InProcessWorker::start_with(&app, 1, |c| {
        c.http_allow_cidrs = "127.0.0.0/8".parse().expect("cidr")
    })
    .await;
    let id = app.run_event(&ev, &json!({})).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(*seen.lock().expect("lock"), ["Bearer tok-123"]);
    worker.stop().await;
    server.abort();
}
