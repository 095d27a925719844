//! `/api/v1/events`: CRUD, validation that names the field, and running.

use baton_tests::{bash_event, send, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn create_get_list_patch_delete() {
    let app = spawn_app().await;
    let spec = json!({
        "name": "nightly-report", "runtime": "bash", "content": "echo hello", "executor": "local",
        "env": {"REGION": "eu-west-1"}, "timeout_seconds": 60, "max_attempts": 3, "priority": 5,
        "labels": {"zone": "a"}
    });
    let created = app.create_event(&spec).await;
    let id = created["id"].as_str().expect("id").to_owned();
    for (key, value) in spec.as_object().expect("object") {
        assert_eq!(&created[key], value, "field {key} stored as sent");
    }
    assert_eq!(created["image"], Value::Null);
    assert_eq!(created["server_id"], Value::Null);

    let (status, got) = app.get(&format!("/api/v1/events/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, created);

    app.create_event(&bash_event("another")).await;
    let (status, list) = app.get("/api/v1/events").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, vec!["another", "nightly-report"]);
    assert_eq!(list["next_cursor"], Value::Null);
    // Paging.
    let (_, page) = app.get("/api/v1/events?limit=1").await;
    assert_eq!(page["items"].as_array().expect("items").len(), 1);
    let cursor = page["next_cursor"].as_str().expect("cursor").to_owned();
    let (_, page2) = app
        .get(&format!("/api/v1/events?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(page2["items"][0]["name"], "nightly-report");

    // PATCH merges; null resets to the default.
    let (status, patched) = app
        .patch(
            &format!("/api/v1/events/{id}"),
            &json!({"content": "echo bye", "priority": null}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["content"], "echo bye");
    assert_eq!(patched["priority"], 0);
    assert_eq!(patched["env"], json!({"REGION": "eu-west-1"}));
    // A patch is validated like a new event.
    let (status, err) = app
        .patch(&format!("/api/v1/events/{id}"), &json!({"runtime": "exec"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["error"]["field"], "content");

    let (status, _) = app.delete(&format!("/api/v1/events/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, err) = app.get(&format!("/api/v1/events/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["error"]["code"], "event_not_found");
    let (status, _) = app.delete(&format!("/api/v1/events/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn every_runtime_shape_is_accepted() {
    let app = spawn_app().await;
    for (i, spec) in [
        json!({"runtime": "sh", "content": "echo $0"}),
        json!({"runtime": "python", "content": "print(1)"}),
        json!({"runtime": "node", "content": "console.log(1)"}),
        json!({"runtime": "exec", "command": ["echo", "a b"]}),
        json!({"runtime": "http", "request": {"method": "POST", "url": "https://example.invalid/hook",
                "headers": {"X-Token": "t"}, "body": {"a": 1}}}),
        json!({"runtime": "bash", "content": "true", "image": "debian:bookworm"}),
        json!({"runtime": "bash", "content": "true", "network": true, "retry_on": "infrastructure",
               "limits": {"memory_mib": 1024, "cpus": 2.0, "pids": 512}}),
        json!({"runtime": "bash", "content": "true", "limits": {"tmp_mib": 128, "work_mib": 4096}}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut spec = spec;
        spec["name"] = json!(format!("ev{i}"));
        let created = app.create_event(&spec).await;
        let expected_executor = "container";
        assert_eq!(created["executor"], expected_executor, "default executor for {spec}");
    }
}

/// Each case: a body and the field the 4xx must name.
#[tokio::test]
async fn bad_fields_get_a_4xx_naming_the_field() {
    let app = spawn_app().await;
    let base = bash_event("x");
    let with = |key: &str, value: Value| {
        let mut spec = base.clone();
        spec[key] = value;
        spec
    };
    let without = |key: &str| {
        let mut spec = base.clone();
        spec.as_object_mut().expect("object").remove(key);
        spec
    };
    let cases: Vec<(Value, &str)> = vec![
        (without("name"), "name"),
        (with("name", json!("")), "name"),
        (with("name", json!(42)), "name"),
        (with("name", json!("a".repeat(201))), "name"),
        (without("runtime"), "runtime"),
        (with("runtime", json!("cobol")), "runtime"),
        (without("content"), "content"),
        (with("content", json!("   ")), "content"),
        (with("command", json!(["ls"])), "command"),
        (
            json!({"name": "e", "runtime": "exec", "command": []}),
            "command",
        ),
        (
            json!({"name": "e", "runtime": "exec", "command": "ls -l"}),
            "command",
        ),
        (json!({"name": "h", "runtime": "http"}), "request"),
        (
            json!({"name": "h", "runtime": "http", "request": {"url": "ftp://x"}}),
            "request.url",
        ),
        (
            json!({"name": "h", "runtime": "http", "request": {"url": "http://x", "method": "BREW"}}),
            "request.method",
        ),
        (
            json!({"name": "h", "runtime": "http", "request": {"url": "http://x", "headers": {"bad header": "v"}}}),
            "request.headers.bad header",
        ),
        (with("executor", json!("mainframe")), "executor"),
        (with("executor", json!("ssh")), "server_id"),
        (with("server_id", json!("not-a-uuid")), "server_id"),
        (
            with("server_id", json!("0190a0a0-0000-7000-8000-000000000000")),
            "server_id",
        ),
        (with("image", json!("has space")), "image"),
        (with("env", json!({"1BAD": "x"})), "env.1BAD"),
        (with("env", json!({"BATON_DIR": "x"})), "env.BATON_DIR"),
        (with("env", json!({"A": 1})), "env.A"),
        (with("timeout_seconds", json!(0)), "timeout_seconds"),
        (with("timeout_seconds", json!("soon")), "timeout_seconds"),
        (with("timeout_seconds", json!(1e12)), "timeout_seconds"),
        (with("max_attempts", json!(0)), "max_attempts"),
        (with("max_attempts", json!(101)), "max_attempts"),
        (with("priority", json!(5000)), "priority"),
        (with("labels", json!({"a b": "c"})), "labels.a b"),
        (with("labels", json!({"zone": 3})), "labels.zone"),
        (with("colour", json!("blue")), "colour"),
        (with("retry_on", json!("sometimes")), "retry_on"),
        (with("network", json!(true)), "network"),
        (
            json!({"name": "c", "runtime": "bash", "content": "x", "limits": {"memory_mib": 100000}}),
            "limits.memory_mib",
        ),
        (
            json!({"name": "c", "runtime": "bash", "content": "x", "limits": {"cpus": 64.0}}),
            "limits.cpus",
        ),
        (
            json!({"name": "c", "runtime": "bash", "content": "x", "limits": {"disk": 1}}),
            "limits.disk",
        ),
        (
            json!({"name": "c", "runtime": "bash", "content": "x", "limits": {"work_mib": 4097}}),
            "limits.work_mib",
        ),
        (
            json!({"name": "c", "runtime": "bash", "content": "x", "limits": {"work_mib": 0}}),
            "limits.work_mib",
        ),
    ];
    for (body, field) in cases {
        let (status, err) = app.post("/api/v1/events", &body).await;
        assert!(status.is_client_error(), "{body} gave {status}");
        let named = err["error"]["field"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let message = err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            named == field || message.contains(field),
            "{body}: expected field {field}, got {err}"
        );
    }
    let (status, _) = app.get("/api/v1/events").await;
    assert_eq!(status, StatusCode::OK);
    let (_, list) = app.get("/api/v1/events").await;
    assert_eq!(list["items"], json!([]), "nothing was stored");
}

#[tokio::test]
async fn malformed_and_oversized_bodies_are_clean_4xx() {
    let app = spawn_app_small_limit().await;
    let raw = |body: &'static str| {
        app.request(Method::POST, "/api/v1/events")
            .header("content-type", "application/json")
            .body(body)
    };
    let (status, err) = send(raw("{not json")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["error"]["code"], "invalid_body");
    let (status, _) = send(raw("")).await;
    assert!(status.is_client_error());
    let (status, _) = send(raw("[1,2,3]")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = send(raw(
        "{\"name\": \"a\", \"runtime\": \"bash\", \"content\": \"x\"} trailing",
    ))
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let huge = json!({"name": "big", "runtime": "bash", "content": "x".repeat(200_000)});
    let (status, err) = app.post("/api/v1/events", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    assert_eq!(err["error"]["code"], "body_too_large");
}

async fn spawn_app_small_limit() -> baton_tests::TestApp {
    baton_tests::spawn_app_with(|c| c.body_limit_bytes = 64 * 1024).await
}

#[tokio::test]
async fn unknown_ids_routes_and_methods() {
    let app = spawn_app().await;
    let missing = "0190a0a0-0000-7000-8000-000000000000";
    let (status, err) = app.get(&format!("/api/v1/events/{missing}")).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("event_not_found"))
    );
    let (status, err) = app.get("/api/v1/events/not-a-uuid").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["error"]["field"], "id");
    let (status, _) = app
        .post(&format!("/api/v1/events/{missing}/run"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, err) = app.get("/api/v1/nothing-here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["error"]["code"], "not_found");
    let (status, err) = send(app.request(Method::PUT, "/api/v1/events")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(err["error"]["code"], "method_not_allowed");
    let (status, err) = app.get("/api/v1/events?limit=0").await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("limit"))
    );
    let (status, err) = app.get("/api/v1/events?bogus=1").await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("bogus"))
    );
}

#[tokio::test]
async fn duplicate_names_conflict_and_busy_events_cannot_be_deleted() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("dup")).await;
    let (status, err) = app.post("/api/v1/events", &bash_event("dup")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["error"]["field"], "name");
    let id = ev["id"].as_str().expect("id");
    app.run_event(id, &json!({})).await;
    let (status, err) = app.delete(&format!("/api/v1/events/{id}")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["error"]["code"], "event_busy");
}

#[tokio::test]
async fn run_takes_input_priority_run_at_and_idempotency_keys() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("runner")).await;
    let id = ev["id"].as_str().expect("id");
    // No body at all is fine.
    let (status, answer) =
        send(app.request(Method::POST, &format!("/api/v1/events/{id}/run"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");

    let run_at = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    let body = json!({"input": {"rows": [1, 2]}, "priority": 7, "run_at": run_at, "idempotency_key": "k1"});
    let (status, first) = app.post(&format!("/api/v1/events/{id}/run"), &body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(first["created"], true);
    let (_, second) = app.post(&format!("/api/v1/events/{id}/run"), &body).await;
    assert_eq!(second["job_id"], first["job_id"]);
    assert_eq!(second["created"], false);

    let (status, job) = app
        .get(&format!(
            "/api/v1/jobs/{}",
            first["job_id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["input"], json!({"rows": [1, 2]}));
    assert_eq!(job["priority"], 7);
    assert_eq!(job["status"], "queued");
    assert_eq!(job["idempotency_key"], "k1");
    assert_eq!(job["root_job_id"], job["id"]);
    let stored: chrono::DateTime<chrono::Utc> = job["run_at"]
        .as_str()
        .expect("run_at")
        .parse()
        .expect("time");
    assert_eq!(
        stored.timestamp(),
        run_at
            .parse::<chrono::DateTime<chrono::Utc>>()
            .expect("t")
            .timestamp()
    );

    for (body, field) in [
        (json!({"priority": 10_000}), "priority"),
        (json!({"run_at": "tomorrow"}), "run_at"),
        (json!({"idempotency_key": ""}), "idempotency_key"),
        (json!({"inptu": {}}), "inptu"),
    ] {
        let (status, err) = app.post(&format!("/api/v1/events/{id}/run"), &body).await;
        assert!(status.is_client_error(), "{body}");
        assert_eq!(err["error"]["field"], field, "{body}: {err}");
    }
}

/// A replica remembers the events it ran; a change made through another replica must still
/// reach the next run there (the enqueue checks the event's revision).
#[tokio::test]
async fn a_run_uses_the_definition_changed_or_deleted_on_another_replica() {
    let app = spawn_app().await;
    let other = baton_tests::spawn_replica(app.database_url.clone(), |_| {}).await;
    let ev = app.create_event(&bash_event("cached")).await;
    let id = ev["id"].as_str().expect("id").to_owned();
    assert_eq!(ev["revision"], 1);

    // The definition a job was queued with (its snapshot, as the worker receives it).
    let snapshot = async |job_id: &str| -> Value {
        let id = uuid::Uuid::parse_str(job_id).expect("job id");
        sqlx::query_scalar("SELECT spec FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .expect("job row")
    };
    let first = app.run_event(&id, &json!({})).await;
    let spec = snapshot(&first).await;
    assert_eq!(spec["content"], ev["content"]);
    assert_eq!(spec["revision"], 1);

    let (status, patched) = other
        .patch(
            &format!("/api/v1/events/{id}"),
            &json!({"content": "echo second"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["revision"], 2);

    // Straight after the change, on the replica that ran the old definition.
    let second = app.run_event(&id, &json!({})).await;
    let spec = snapshot(&second).await;
    assert_eq!(spec["content"], "echo second");
    assert_eq!(spec["revision"], 2);

    // Deleted elsewhere: a clean 404, not a job of a deleted event.
    for job_id in [&first, &second] {
        let (status, _) = app
            .post(&format!("/api/v1/jobs/{job_id}/cancel"), &json!({}))
            .await;
        assert!(status.is_success(), "cancel {job_id}: {status}");
    }
    let (status, body) = other.delete(&format!("/api/v1/events/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = app
        .post(&format!("/api/v1/events/{id}/run"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "event_not_found");
}

/// A run queued through the REST API is announced by its replica, not by the row trigger:
/// listeners get the replica's `any` (once per burst), never the trigger's per-job `local`.
#[tokio::test]
async fn a_run_is_announced_by_its_replica_not_by_the_row_trigger() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("announced")).await;
    let id = ev["id"].as_str().expect("id").to_owned();
    let mut listener = sqlx::postgres::PgListener::connect_with(&app.pool)
        .await
        .expect("listener");
    listener
        .listen(baton_api::storage::queue::QUEUED_CHANNEL)
        .await
        .expect("listen");
    app.run_event(&id, &json!({})).await;
    let wait = std::time::Duration::from_secs(30);
    let note = tokio::time::timeout(wait, listener.recv())
        .await
        .expect("in time")
        .expect("notification");
    assert_eq!(note.payload(), "any");
    // A delayed run says so.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    app.run_event(&id, &json!({"run_at": later})).await;
    let note = tokio::time::timeout(wait, listener.recv())
        .await
        .expect("in time")
        .expect("notification");
    assert_eq!(note.payload(), "any:later");
    // Nothing else arrived: the trigger stayed quiet for both inserts.
    let extra = tokio::time::timeout(std::time::Duration::from_millis(300), listener.recv()).await;
    assert!(extra.is_err(), "unexpected notification: {extra:?}");
}

/// Every client string that reaches a PostgreSQL `text` or `jsonb` column: a NUL in it is a
/// 422 naming the field, never a 500 (PostgreSQL stores neither `\0` nor `\u0000`).
#[tokio::test]
async fn nul_characters_are_refused_naming_the_field() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("nul")).await;
    let ev = ev["id"].as_str().expect("id").to_owned();
    let nul = "a\u{0}b";
    let cases: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::POST,
            "/api/v1/events".into(),
            json!({"name": "n2", "runtime": "bash", "content": "echo", "executor": "local", "description": nul}),
            "description",
        ),
        (
            Method::POST,
            "/api/v1/events".into(),
            json!({"name": "n3", "runtime": "bash", "content": nul, "executor": "local"}),
            "content",
        ),
        (
            Method::POST,
            "/api/v1/events".into(),
            json!({"name": "n4", "runtime": "bash", "content": "echo", "executor": "local", "env": {"K": nul}}),
            "env.K",
        ),
        (
            Method::PATCH,
            format!("/api/v1/events/{ev}"),
            json!({"description": nul}),
            "description",
        ),
        (
            Method::POST,
            format!("/api/v1/events/{ev}/run"),
            json!({"input": {"rows": ["ok", nul]}}),
            "input.rows[1]",
        ),
        (
            Method::POST,
            format!("/api/v1/events/{ev}/run"),
            json!({"input": {"k\u{0}": 1}}),
            "input.k\\u0000",
        ),
        (
            Method::POST,
            format!("/api/v1/events/{ev}/actions"),
            json!({"trigger": "always", "action": {"type": "send_message", "channel": "webhook",
                "target": "http://example.test/", "template": nul}}),
            "action.template",
        ),
        (
            Method::PUT,
            "/api/v1/variables/v".into(),
            json!({"value": nul}),
            "value",
        ),
        (
            Method::POST,
            "/api/v1/servers".into(),
            json!({"name": nul, "host": "db.example", "username": "u", "password": "hunter2hunter2", "host_key_policy": "accept_new"}),
            "name",
        ),
        (
            Method::POST,
            "/api/v1/tokens".into(),
            json!({"name": nul, "role": "viewer"}),
            "name",
        ),
    ];
    for (method, path, body, field) in cases {
        let (status, err) = send(app.request(method.clone(), &path).json(&body)).await;
        assert_eq!(
            (status, err["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{method} {path}: {err}"
        );
        assert!(
            err["error"]["message"]
                .as_str()
                .expect("message")
                .contains("NUL"),
            "{err}"
        );
    }
    // In the query string or the path.
    for (path, field) in [
        ("/api/v1/events?cursor=a%00b", "cursor"),
        ("/api/v1/variables?scope=%00", "scope"),
        ("/api/v1/variables/a%00b", "path"),
    ] {
        let (status, err) = app.get(path).await;
        assert_eq!(
            (status, err["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{path}: {err}"
        );
    }
    // An escaped backslash before `u0000` is text, not a NUL: stored as sent.
    let (status, job) = app
        .post(
            &format!("/api/v1/events/{ev}/run"),
            &json!({"input": {"k": "\\u0000"}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    // Times PostgreSQL cannot store are refused too.
    let (status, err) = app
        .post(
            &format!("/api/v1/events/{ev}/run"),
            &json!({"run_at": "-100000-01-01T00:00:00Z"}),
        )
        .await;
    assert!(status.is_client_error(), "{status} {err}");
}
