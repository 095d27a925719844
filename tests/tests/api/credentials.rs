//! Credentials in definitions (defect 9): `env` values, http `request.headers` and message
//! targets may reference secret variables (`{{secret.NAME}}`); viewers and operators never
//! read inlined credentials; message targets are resolved only when delivered.

use std::time::Duration;

use baton_api::model::Role;
use baton_proto::v1::Finished;
use baton_proto::{ServerMsg, WorkerMsg};
use baton_tests::protocol::{ScriptedWorker, hello};
use baton_tests::receivers::HttpReceiver;
use baton_tests::{TestApp, bash_event, send, spawn_app, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

/// What every credential below contains, so one search finds any leak.
const LEAK: &str = "LEAKME";

async fn add_action(app: &TestApp, event: &str, body: Value) -> Value {
    let (status, action) = app
        .post(&format!("/api/v1/events/{event}/actions"), &body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{action}");
    action
}

async fn get_as(app: &TestApp, token: &str, path: &str) -> Value {
    let (status, body) = send(app.request_as(token, Method::GET, path)).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    body
}

#[tokio::test]
async fn viewers_and_operators_never_read_inlined_credentials() {
    let app = spawn_app().await;
    let mut script = bash_event("with-env");
    script["env"] = json!({
        "DB_URL": format!("postgres://app:{LEAK}@db/prod"),
        "API_KEY": "{{secret.API_KEY}}",
        "REGION": "eu-west-1",
    });
    let script = app.create_event(&script).await;
    let http = app
        .create_event(&json!({"name": "with-headers", "runtime": "http", "executor": "local",
            "request": {"method": "POST", "url": format!("https://user:{LEAK}@api.example.com/v1/{LEAK}?token={LEAK}"),
                        "headers": {"Authorization": format!("Bearer {LEAK}"), "X-Key": "{{ secret.K }}"}}}))
        .await;
    let ev = script["id"].as_str().expect("id");
    for (channel, target) in [
        (
            "slack",
            format!("https://hooks.slack.com/services/T0/B0/{LEAK}"),
        ),
        (
            "discord",
            format!("https://discord.com/api/webhooks/1/{LEAK}"),
        ),
        (
            "webhook",
            format!("https://u:{LEAK}@hooks.example.com/in?key={LEAK}"),
        ),
    ] {
        add_action(
            &app,
            ev,
            json!({"trigger": "always", "action": {"type": "send_message",
            "channel": channel, "target": target}}),
        )
        .await;
    }
    add_action(
        &app,
        ev,
        json!({"trigger": "always", "action": {"type": "send_message",
        "channel": "webhook", "target": "{{secret.HOOK}}"}}),
    )
    .await;
    let paths = [
        "/api/v1/events".to_owned(),
        format!("/api/v1/events/{ev}"),
        format!("/api/v1/events/{}", http["id"].as_str().expect("id")),
        format!("/api/v1/events/{ev}/actions"),
    ];

    for role in [Role::Viewer, Role::Operator] {
        let token = app.token(role).await;
        for path in &paths {
            let body = get_as(&app, &token, path).await;
            assert!(!body.to_string().contains(LEAK), "{role} {path}: {body}");
        }
        let event = get_as(&app, &token, &format!("/api/v1/events/{ev}")).await;
        assert_eq!(
            event["env"],
            json!({"DB_URL": "***", "API_KEY": "{{secret.API_KEY}}", "REGION": "***"})
        );
        let request = get_as(
            &app,
            &token,
            &format!("/api/v1/events/{}", http["id"].as_str().expect("id")),
        )
        .await["request"]
            .clone();
        assert_eq!(request["url"], "https://api.example.com/***");
        assert_eq!(
            request["headers"],
            json!({"Authorization": "***", "X-Key": "{{ secret.K }}"})
        );
        let actions = get_as(&app, &token, &format!("/api/v1/events/{ev}/actions")).await;
        let targets: Vec<&str> = actions
            .as_array()
            .expect("actions")
            .iter()
            .map(|a| a["action"]["target"].as_str().expect("target"))
            .collect();
        assert_eq!(
            targets,
            [
                "https://hooks.slack.com/***",
                "https://discord.com/***",
                "https://hooks.example.com/***",
                "{{secret.HOOK}}",
            ]
        );
    }
    // The admin, who wrote them, reads them whole.
    for path in &paths[1..] {
        let (_, body) = app.get(path).await;
        assert!(body.to_string().contains(LEAK), "admin {path}: {body}");
    }
}

#[tokio::test]
async fn malformed_secret_references_are_refused_naming_the_field() {
    let app = spawn_app().await;
    let mut env = bash_event("bad-ref");
    env["env"] = json!({"TOKEN": "Bearer {{secret.}}"});
    let (status, err) = app.post("/api/v1/events", &env).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["error"]["field"], "env.TOKEN", "{err}");
    let (status, err) = app
        .post(
            "/api/v1/events",
            &json!({"name": "bad-header", "runtime": "http",
            "request": {"url": "https://example.com", "headers": {"X-Key": "{{ secret.K"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["error"]["field"], "request.headers.X-Key", "{err}");

    let ev = app.create_event(&bash_event("targets")).await;
    let ev = ev["id"].as_str().expect("id");
    for (channel, target) in [
        ("slack", "{{secret.HOOK"),
        ("webhook", "ftp://{{secret.HOST}}/x"),
        ("email", "{{secret.ADDRESS}}"),
    ] {
        let (status, err) = app
            .post(
                &format!("/api/v1/events/{ev}/actions"),
                &json!({"trigger": "always",
                "action": {"type": "send_message", "channel": channel, "target": target}}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{target}: {err}");
        assert_eq!(err["error"]["field"], "action.target", "{err}");
    }
    for target in [
        "{{secret.HOOK}}",
        "https://hooks.slack.com/services/{{ secret.SLACK_PATH }}",
    ] {
        add_action(
            &app,
            ev,
            json!({"trigger": "always", "action": {"type": "send_message",
            "channel": "slack", "target": target}}),
        )
        .await;
    }
}

/// A target referencing a secret is stored as written and resolved when the message is sent;
/// one referencing a variable the event cannot read fails with a reason naming it.
#[tokio::test]
async fn message_targets_are_resolved_only_at_delivery() {
    // The receiver is on loopback, which the outbox refuses unless allowed.
    let app = spawn_app_with(|c| c.http_allow_cidrs = "127.0.0.0/8".parse().expect("cidr")).await;
    let receiver = HttpReceiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = receiver.serve(listener);
    let other = app.create_event(&bash_event("other")).await;
    let ev = app.create_event(&bash_event("notifying")).await;
    let ev = ev["id"].as_str().expect("id");
    for (key, value, scope) in [
        (
            "HOOK_URL",
            format!("http://{addr}/hook/{LEAK}"),
            "global".to_owned(),
        ),
        (
            "NOT_MINE",
            format!("http://{addr}/other"),
            format!("event:{}", other["id"].as_str().expect("id")),
        ),
    ] {
        let (status, body) = send(
            app.request(Method::PUT, &format!("/api/v1/variables/{key}"))
                .json(&json!({"value": value, "secret": true, "scope": scope})),
        )
        .await;
        assert!(status.is_success(), "{body}");
    }
    add_action(
        &app,
        ev,
        json!({"trigger": "on_success", "action": {"type": "send_message",
        "channel": "webhook", "target": "{{secret.HOOK_URL}}", "template": "done"}}),
    )
    .await;
    add_action(
        &app,
        ev,
        json!({"trigger": "on_success", "action": {"type": "send_message",
        "channel": "slack", "target": "{{secret.NOT_MINE}}", "template": "never"}}),
    )
    .await;

    let token = app.token(Role::Worker).await;
    let (mut worker, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let job = app.run_event(ev, &json!({})).await;
    let a = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert_eq!(a.job_id, job);
    worker
        .send(WorkerMsg::Finished(Finished {
            job_id: a.job_id.clone(),
            lease_token: a.lease_token,
            exit_code: Some(0),
            ..Default::default()
        }))
        .await;

    let got = receiver.wait_for(1).await;
    assert_eq!(got[0]["text"], "done");
    // Stored as written: the outbox never holds the resolved URL.
    let targets: Vec<String> =
        sqlx::query_scalar("SELECT target FROM message_outbox ORDER BY channel DESC")
            .fetch_all(&app.pool)
            .await
            .expect("targets");
    assert_eq!(targets, ["{{secret.HOOK_URL}}", "{{secret.NOT_MINE}}"]);
    // The other message fails, saying which reference, not sending anything.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let error: String = loop {
        let error: Option<String> = sqlx::query_scalar(
            "SELECT last_error FROM message_outbox WHERE channel = 'slack' AND attempts >= 1",
        )
        .fetch_optional(&app.pool)
        .await
        .expect("row")
        .flatten();
        if let Some(error) = error {
            break error;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the unresolvable message was not attempted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        error.contains("NOT_MINE") && !error.contains(LEAK),
        "{error}"
    );
    assert_eq!(receiver.received.lock().expect("lock").len(), 1);
    let (status, _) = app.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(status, StatusCode::OK);
    server.abort();
}
