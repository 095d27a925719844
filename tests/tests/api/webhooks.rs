//! Webhook triggers: `POST /hooks/{key}` starts a run of the webhook's event, without a bearer
//! token; signatures, unknown and revoked keys, oversized bodies, idempotent re-delivery,
//! headers passed through, per-key rate limits, and the management API around them.

use baton_api::model::Role;
use baton_api::webhooks::sign;
use baton_tests::{TestApp, bash_event, send, spawn_app, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn event(app: &TestApp, name: &str) -> String {
    let ev = app.create_event(&bash_event(name)).await;
    ev["id"].as_str().expect("id").to_owned()
}

/// Creates a webhook; returns the answer (with `key` and `url`).
async fn webhook(app: &TestApp, event_id: &str, body: &Value) -> Value {
    let (status, created) = app
        .post(&format!("/api/v1/events/{event_id}/webhooks"), body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

fn deliver(app: &TestApp, url: &str, body: &str) -> reqwest::RequestBuilder {
    app.anonymous(Method::POST, url)
        .header("content-type", "application/json")
        .body(body.to_owned())
}

async fn job_of(app: &TestApp, answer: &Value) -> Value {
    let id = answer["job_id"].as_str().expect("job_id");
    let (status, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    job
}

#[tokio::test]
async fn a_delivery_starts_a_run_with_the_body_and_the_listed_headers() {
    let app = spawn_app().await;
    let event_id = event(&app, "hooked").await;
    let created = webhook(
        &app,
        &event_id,
        &json!({"name": "github", "headers": ["X-GitHub-Event", "X-Missing"]}),
    )
    .await;
    let key = created["key"].as_str().expect("key");
    let url = created["url"].as_str().expect("url");
    assert_eq!(url, format!("/hooks/{key}"));
    assert!(key.starts_with("bhk_") && key.len() > 40, "{key}");
    assert_eq!(created["headers"], json!(["x-github-event", "x-missing"]));
    assert_eq!(created["signed"], false);

    let (status, answer) = send(
        deliver(&app, url, r#"{"ref": "main", "n": 1}"#)
            .header("X-GitHub-Event", "push")
            .header("X-Other", "not passed"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["created"], true);
    let job = job_of(&app, &answer).await;
    assert_eq!(job["event_id"], event_id.as_str());
    assert_eq!(job["status"], "queued");
    assert_eq!(
        job["input"],
        json!({"ref": "main", "n": 1, "_headers": {"x-github-event": "push"}})
    );

    // Listing shows neither the key nor a secret.
    let (status, list) = app
        .get(&format!("/api/v1/events/{event_id}/webhooks"))
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    let text = list.to_string();
    assert!(!text.contains(key), "{text}");
    assert!(list[0].get("key").is_none() && list[0].get("url").is_none());
    assert_eq!(list[0]["key_prefix"], &key[..8]);

    // The delivery is audited, attributed to the webhook.
    let pool = sqlx::PgPool::connect(&app.database_url)
        .await
        .expect("connect");
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM audit_log WHERE action = 'webhook.deliver' AND target_id = $1",
    )
    .bind(answer["job_id"].as_str())
    .fetch_one(&pool)
    .await
    .expect("audit row");
    assert_eq!(actor, "webhook github");

    // Bodies a run cannot take get a 4xx naming the problem.
    for (body, expected, needle) in [
        ("", StatusCode::BAD_REQUEST, "a JSON body is required"),
        ("{\"a\": ", StatusCode::BAD_REQUEST, "EOF while parsing"),
        (
            "{\"a\": \"x\0y\"}",
            StatusCode::BAD_REQUEST,
            "control character",
        ),
        (
            "[1, 2]",
            StatusCode::UNPROCESSABLE_ENTITY,
            "must be a JSON object",
        ),
        (
            r#"{"a": {"b": "x\u0000"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "NUL",
        ),
    ] {
        let (status, err) = send(deliver(&app, url, body)).await;
        assert_eq!(status, expected, "{body:?}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body:?}: {err}");
    }
    let (_, err) = send(deliver(&app, url, r#"{"a": {"b": "x\u0000"}}"#)).await;
    assert_eq!(err["error"]["field"], "a.b");
    // A number PostgreSQL would store but not give back readable (found by the fuzzer: the
    // job then answered 500).
    let (status, err) = send(deliver(&app, url, r#"{"m": [1, 1.7976931348623157e+308]}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["error"]["field"], "m[1]");
    let (status, answer) = send(deliver(
        &app,
        url,
        r#"{"m": 1e200, "k": -12345678901234567}"#,
    ))
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let job = job_of(&app, &answer).await;
    assert_eq!(job["input"]["k"], -12345678901234567i64, "{job}");

    // Without headers to pass, any JSON value is the input.
    let plain = webhook(&app, &event_id, &json!({"name": "plain"})).await;
    let (status, answer) = send(deliver(&app, plain["url"].as_str().expect("url"), "[1, 2]")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(job_of(&app, &answer).await["input"], json!([1, 2]));
}

#[tokio::test]
async fn a_signed_webhook_takes_only_deliveries_with_a_matching_signature() {
    let app = spawn_app().await;
    let event_id = event(&app, "signed").await;
    let created = webhook(
        &app,
        &event_id,
        &json!({"name": "signed", "signing_secret": "s3cret-signing-key"}),
    )
    .await;
    assert_eq!(created["signed"], true);
    assert!(!created.to_string().contains("s3cret-signing-key"));
    let url = created["url"].as_str().expect("url");
    let body = r#"{"action": "opened"}"#;

    let good = sign(b"s3cret-signing-key", body.as_bytes());
    let (status, answer) =
        send(deliver(&app, url, body).header("X-Baton-Signature", good.as_str())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(
        job_of(&app, &answer).await["input"],
        json!({"action": "opened"})
    );

    let wrong_key = sign(b"another-secret", body.as_bytes());
    let other_body = sign(b"s3cret-signing-key", b"{}");
    let mut uppercase = good.clone();
    uppercase.replace_range(7.., &good[7..].to_uppercase());
    for (signature, needle) in [
        (None, "requires a signature"),
        (Some(wrong_key.as_str()), "does not match"),
        (Some(other_body.as_str()), "does not match"),
        (Some("sha256=abc"), "must be sha256="),
        (Some("sha1=0123"), "must be sha256="),
    ] {
        let mut request = deliver(&app, url, body);
        if let Some(signature) = signature {
            request = request.header("X-Baton-Signature", signature);
        }
        let (status, err) = send(request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{signature:?}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{signature:?}: {err}");
    }
    // Hex digits in either case are the same signature.
    let (status, answer) =
        send(deliver(&app, url, body).header("X-Baton-Signature", uppercase.as_str())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    // A signature is checked before the body: a bad one never says whether the body parses.
    let (status, _) =
        send(deliver(&app, url, "not json").header("X-Baton-Signature", good.as_str())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn unknown_and_revoked_keys_get_the_same_404() {
    let app = spawn_app().await;
    let event_id = event(&app, "revocable").await;
    let created = webhook(&app, &event_id, &json!({"name": "old"})).await;
    let url = created["url"].as_str().expect("url").to_owned();
    let (status, _) = send(deliver(&app, &url, "{}")).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let (status, unknown) = send(deliver(
        &app,
        "/hooks/bhk_0000000000000000000000000000000000000000",
        "{}",
    ))
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}");

    let webhook_id = created["id"].as_str().expect("id");
    let (status, revoked) = app
        .delete(&format!("/api/v1/events/{event_id}/webhooks/{webhook_id}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    let (status, after) = send(deliver(&app, &url, "{}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{after}");
    assert_eq!(after, unknown, "the same answer for both");
    // Still listed, as revoked; revoking again is fine; another event's path is 404.
    let (_, list) = app
        .get(&format!("/api/v1/events/{event_id}/webhooks"))
        .await;
    assert!(list[0]["revoked_at"].is_string(), "{list}");
    let (status, _) = app
        .delete(&format!("/api/v1/events/{event_id}/webhooks/{webhook_id}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let other = event(&app, "other").await;
    let (status, err) = app
        .delete(&format!("/api/v1/events/{other}/webhooks/{webhook_id}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert_eq!(err["error"]["code"], "webhook_not_found");
    // Deleting the event deletes its webhooks.
    let (status, _) = app.delete(&format!("/api/v1/events/{other}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413() {
    let app = spawn_app_with(|c| c.body_limit_bytes = 1024).await;
    let event_id = event(&app, "small").await;
    let created = webhook(&app, &event_id, &json!({"name": "small"})).await;
    let url = created["url"].as_str().expect("url");
    let big = json!({"pad": "x".repeat(4096)}).to_string();
    let (status, err) = send(deliver(&app, url, &big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    assert_eq!(err["error"]["code"], "body_too_large");
    let (status, _) = send(deliver(&app, url, r#"{"small": true}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_repeated_delivery_with_one_idempotency_key_starts_one_run_per_webhook() {
    let app = spawn_app().await;
    let event_id = event(&app, "once").await;
    let first = webhook(&app, &event_id, &json!({"name": "first"})).await;
    let second = webhook(&app, &event_id, &json!({"name": "second"})).await;
    let url = first["url"].as_str().expect("url");
    let delivery =
        |url: &str, body: &str| deliver(&app, url, body).header("Idempotency-Key", "delivery-7f3a");
    let (status, a) = send(delivery(url, r#"{"n": 1}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{a}");
    assert_eq!(a["created"], true);
    let (status, b) = send(delivery(url, r#"{"n": 1}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    assert_eq!(
        (b["job_id"].clone(), b["created"].clone()),
        (a["job_id"].clone(), json!(false))
    );
    // The key is scoped to the webhook: another webhook's delivery with it is its own run.
    let (status, c) = send(delivery(
        second["url"].as_str().expect("url"),
        r#"{"n": 1}"#,
    ))
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{c}");
    assert_eq!(c["created"], true);
    assert_ne!(c["job_id"], a["job_id"]);
    let (_, jobs) = app.get(&format!("/api/v1/jobs?event_id={event_id}")).await;
    assert_eq!(jobs["items"].as_array().map(Vec::len), Some(2), "{jobs}");
    // An unusable key is refused, naming the header.
    let (status, err) =
        send(deliver(&app, url, "{}").header("Idempotency-Key", "k".repeat(151))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["error"]["field"], "Idempotency-Key");
}

#[tokio::test]
async fn deliveries_past_a_keys_rate_get_429_with_retry_after_and_other_keys_do_not() {
    let app = spawn_app_with(|c| {
        c.webhook_rate_limit_per_second = 1;
        c.webhook_rate_limit_burst = 3;
    })
    .await;
    let event_id = event(&app, "busy").await;
    let busy = webhook(&app, &event_id, &json!({"name": "busy"})).await;
    let calm = webhook(&app, &event_id, &json!({"name": "calm"})).await;
    let url = busy["url"].as_str().expect("url");
    let mut limited = None;
    let mut accepted = 0;
    for _ in 0..20 {
        let response = deliver(&app, url, "{}").send().await.expect("sent");
        match response.status() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited = Some(response);
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    let limited = limited.expect("the key was limited");
    assert!((3..=5).contains(&accepted), "{accepted} accepted first");
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body: Value = limited.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limited");
    let (status, _) = send(deliver(&app, calm["url"].as_str().expect("url"), "{}")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "another key is not limited");
}

#[tokio::test]
async fn managing_webhooks_needs_the_right_role_and_valid_fields() {
    let app = spawn_app().await;
    let event_id = event(&app, "managed").await;
    let path = format!("/api/v1/events/{event_id}/webhooks");
    let operator = app.token(Role::Operator).await;
    let viewer = app.token(Role::Viewer).await;
    let (status, _) = send(
        app.request_as(&operator, Method::POST, &path)
            .json(&json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = send(app.request_as(&viewer, Method::GET, &path)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(app.anonymous(Method::GET, &path)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for (body, field) in [
        (json!({"name": ""}), "name"),
        (
            json!({"name": "x", "signing_secret": "short"}),
            "signing_secret",
        ),
        (
            json!({"name": "x", "headers": ["ok", "bad header"]}),
            "headers[1]",
        ),
        (json!({"name": "x", "extra": 1}), "extra"),
    ] {
        let (status, err) = app.post(&path, &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {err}");
        assert_eq!(err["error"]["field"], field, "{body}: {err}");
    }
    let (status, err) = app
        .post(
            &format!("/api/v1/events/{}/webhooks", uuid::Uuid::now_v7()),
            &json!({"name": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");

    // The OpenAPI document has the delivery route, without bearer authentication.
    let (_, spec) = send(app.anonymous(Method::GET, "/api/v1/openapi.json")).await;
    let hook = &spec["paths"]["/hooks/{key}"]["post"];
    assert_eq!(hook["security"], json!([{}]), "{hook}");
    for status in ["202", "400", "401", "404", "413", "422", "429"] {
        assert!(hook["responses"][status].is_object(), "{status} missing");
    }
    assert!(
        hook["responses"]["403"].is_null(),
        "no role applies to a delivery"
    );
    assert!(spec["paths"]["/api/v1/jobs/{id}/rerun"]["post"].is_object());
    assert!(spec["paths"]["/api/v1/events/{id}/webhooks/{webhook_id}"]["delete"].is_object());
}
