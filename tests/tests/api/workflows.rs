//! `/api/v1/workflows` and `/api/v1/workflow-runs` without workers: creation in JSON and YAML,
//! every validation error naming the step and field, roles, and runs as they start.

use baton_api::model::Role;
use baton_tests::workflows::{create_workflow, run_workflow, statuses};
use baton_tests::{TestApp, send, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn event(app: &TestApp, name: &str) -> String {
    let ev = app
        .create_event(&json!({"name": name, "runtime": "noop", "executor": "local"}))
        .await;
    ev["id"].as_str().expect("id").to_owned()
}

/// Posts a definition and expects 422 naming `field`; returns the message.
async fn refused(app: &TestApp, definition: &Value, field: &str) -> String {
    let (status, body) = app.post("/api/v1/workflows", definition).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], field, "{body}");
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn invalid_definitions_get_422_naming_step_and_field() {
    let app = spawn_app().await;
    let e = event(&app, "e").await;
    let step = |id: &str, needs: &[&str]| json!({"id": id, "event_id": e, "needs": needs});
    let wf = |steps: Vec<Value>| json!({"name": "w", "steps": steps});

    let msg = refused(&app, &wf(vec![step("a", &["ghost"])]), "steps[0].needs[0]").await;
    assert!(msg.contains("ghost"), "{msg}");
    let msg = refused(
        &app,
        &wf(vec![
            step("a", &["c"]),
            step("b", &["a"]),
            step("c", &["b"]),
        ]),
        "steps[0].needs",
    )
    .await;
    assert!(msg.contains("cycle") && msg.contains("a → b → c"), "{msg}");
    refused(
        &app,
        &wf(vec![step("a", &[]), step("a", &[])]),
        "steps[1].id",
    )
    .await;
    refused(&app, &wf(vec![step("has-dash", &[])]), "steps[0].id").await;
    refused(&app, &wf(vec![]), "steps").await;

    let mut bad_if = step("b", &["a"]);
    bad_if["if"] = json!("steps.a.output.ok &&");
    let msg = refused(&app, &wf(vec![step("a", &[]), bad_if]), "steps[1].if").await;
    assert!(msg.contains("\"b\"") && msg.contains("compile"), "{msg}");

    let mut not_ancestor = step("c", &["a"]);
    not_ancestor["input"] = json!({"x": "steps.b.output"});
    let msg = refused(
        &app,
        &wf(vec![step("a", &[]), step("b", &[]), not_ancestor]),
        "steps[2].input.x",
    )
    .await;
    assert!(msg.contains("steps.b") && msg.contains("ancestor"), "{msg}");

    let mut for_each = step("a", &[]);
    for_each["for_each"] = json!("steps.later.output");
    refused(
        &app,
        &wf(vec![for_each, step("later", &["a"])]),
        "steps[0].for_each",
    )
    .await;

    let mut parallel = step("a", &[]);
    parallel["max_parallel"] = json!(4);
    refused(&app, &wf(vec![parallel]), "steps[0].max_parallel").await;

    let ghost_event = json!({"name": "w", "steps": [
        {"id": "a", "event_id": e},
        {"id": "b", "event_id": "00000000-0000-7000-8000-000000000000"}
    ]});
    let msg = refused(&app, &ghost_event, "steps[1].event_id").await;
    assert!(msg.contains("does not exist"), "{msg}");
    let ghost_on_failure = json!({"name": "w", "steps": [{"id": "a", "event_id": e}],
        "on_failure": {"event_id": "00000000-0000-7000-8000-000000000000"}});
    refused(&app, &ghost_on_failure, "on_failure.event_id").await;

    let mut when = step("a", &[]);
    when["when"] = json!("sometimes");
    let (status, body) = app.post("/api/v1/workflows", &wf(vec![when])).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "steps[0].when", "{body}");

    // Nothing was stored.
    let (_, list) = app.get("/api/v1/workflows").await;
    assert_eq!(list["items"], json!([]));
}

#[tokio::test]
async fn a_yaml_definition_is_accepted_and_reads_back_as_json() {
    let app = spawn_app().await;
    let e = event(&app, "e").await;
    let yaml = format!(
        "name: nightly-backup\nsteps:\n  - id: hosts\n    event_id: {e}\n  - id: backup\n    event_id: {e}\n    needs: [hosts]\n    for_each: steps.hosts.output.hosts\n    max_parallel: 5\n    continue_on_error: true\n  - id: verify\n    event_id: {e}\n    needs: [backup]\n    if: \"steps.backup.output.all(r, r.size > 0)\"\n    input:\n      count: size(steps.backup.output)\n  - id: alert\n    event_id: {e}\n    needs: [backup, verify]\n    when: any_failed\non_failure:\n  event_id: {e}\n"
    );
    let (status, body) = send(
        app.request(Method::POST, "/api/v1/workflows")
            .header("Content-Type", "application/yaml")
            .body(yaml),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["steps"][1]["max_parallel"], 5);
    assert_eq!(
        body["steps"][2]["if"],
        "steps.backup.output.all(r, r.size > 0)"
    );
    assert_eq!(body["steps"][3]["when"], "any_failed");
    let (_, read) = app
        .get(&format!(
            "/api/v1/workflows/{}",
            body["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(read["name"], "nightly-backup");

    let (status, body) = send(
        app.request(Method::POST, "/api/v1/workflows")
            .header("Content-Type", "application/yaml")
            .body("name: [unclosed"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // A YAML definition is checked like a JSON one.
    let (status, body) = send(
        app.request(Method::POST, "/api/v1/workflows")
            .header("Content-Type", "application/yaml; charset=utf-8")
            .body(format!(
                "name: w\nsteps:\n  - id: a\n    event_id: {e}\n    needs: [zz]\n"
            )),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "steps[0].needs[0]");
}

#[tokio::test]
async fn runs_start_their_roots_and_roles_and_errors_are_enforced() {
    let app = spawn_app().await;
    let e = event(&app, "e").await;
    let wf = create_workflow(
        &app,
        &json!({"name": "two", "steps": [
            {"id": "a", "event_id": e}, {"id": "b", "event_id": e, "needs": ["a"]}
        ]}),
    )
    .await;
    let (status, body) = app
        .post(
            "/api/v1/workflows",
            &json!({"name": "two", "steps": [{"id": "a", "event_id": e}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    let run_id = run_workflow(&app, &wf, &json!({"x": 1})).await;
    let (status, run) = app.get(&format!("/api/v1/workflow-runs/{run_id}")).await;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["status"], "running");
    assert_eq!(statuses(&run), ["a=running", "b=pending"]);
    let a_job = run["steps"][0]["job_ids"][0].as_str().expect("a's job");
    let (_, job) = app.get(&format!("/api/v1/jobs/{a_job}")).await;
    assert_eq!(job["status"], "queued");
    assert_eq!(job["workflow_run_id"], run_id.as_str());
    assert_eq!(job["step_id"], "a");
    assert_eq!(job["input"], json!({"x": 1, "steps": {}}));

    // A body-less run takes `{}` as its input.
    let (status, body) =
        send(app.request(Method::POST, &format!("/api/v1/workflows/{wf}/run"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    // Deleting is refused while runs are running.
    let (status, _) = app.delete(&format!("/api/v1/workflows/{wf}")).await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Roles: a viewer reads, an operator runs, only an admin defines.
    let viewer = app.token(Role::Viewer).await;
    let operator = app.token(Role::Operator).await;
    let (status, _) = send(app.request_as(&viewer, Method::GET, "/api/v1/workflow-runs")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(
        app.request_as(
            &viewer,
            Method::POST,
            &format!("/api/v1/workflows/{wf}/run"),
        )
        .json(&json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = send(app.request_as(
        &operator,
        Method::POST,
        &format!("/api/v1/workflow-runs/{run_id}/cancel"),
    ))
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) = send(
        app.request_as(&operator, Method::POST, "/api/v1/workflows")
            .json(&json!({"name": "x", "steps": [{"id": "a", "event_id": e}]})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Unknown ids and bad parameters name what is wrong.
    let (status, _) = app
        .get("/api/v1/workflow-runs/00000000-0000-7000-8000-000000000000")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = app.get("/api/v1/workflow-runs?status=sleeping").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "status");
    let (status, body) = app
        .post(&format!("/api/v1/workflow-runs/{run_id}/retry"), &json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "a cancelled run can be retried: {body}"
    );
    let (status, body) = app
        .post(
            &format!("/api/v1/workflows/{wf}/run"),
            &json!({"inputs": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
}

#[tokio::test]
async fn a_schedule_of_a_workflow_starts_one_run_per_fire_time() {
    let app = spawn_app().await;
    let e = event(&app, "e").await;
    let wf = create_workflow(
        &app,
        &json!({"name": "every-second", "steps": [{"id": "a", "event_id": e}]}),
    )
    .await;
    let (status, schedule) = app
        .post(
            &format!("/api/v1/workflows/{wf}/schedules"),
            &json!({"interval_seconds": 1, "input": {"from": "schedule"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    assert_eq!(schedule["workflow_id"], wf.as_str());
    assert_eq!(schedule["event_id"], Value::Null);
    let schedule_id: uuid::Uuid = schedule["id"].as_str().expect("id").parse().expect("uuid");
    let slots = baton_tests::schedules::eventually(
        std::time::Duration::from_secs(60),
        "two fired runs",
        || async {
            let slots: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
                "SELECT scheduled_for FROM workflow_runs WHERE schedule_id = $1 ORDER BY scheduled_for",
            )
            .bind(schedule_id)
            .fetch_all(&app.pool)
            .await
            .expect("runs");
            (slots.len() >= 2).then_some(slots)
        },
    )
    .await;
    let mut distinct = slots.clone();
    distinct.dedup();
    assert_eq!(distinct, slots, "one run per fire time");
    let (_, runs) = app
        .get(&format!("/api/v1/workflow-runs?workflow_id={wf}"))
        .await;
    assert_eq!(runs["items"][0]["input"], json!({"from": "schedule"}));
    let (_, listed) = app
        .get(&format!("/api/v1/schedules?workflow_id={wf}"))
        .await;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let (status, _) = app
        .post(
            "/api/v1/workflows/00000000-0000-7000-8000-000000000000/schedules",
            &json!({"interval_seconds": 5}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_webhook_of_a_workflow_starts_runs_once_per_idempotency_key() {
    let app = spawn_app().await;
    let e = event(&app, "e").await;
    let wf = create_workflow(
        &app,
        &json!({"name": "hooked", "steps": [{"id": "a", "event_id": e}]}),
    )
    .await;
    let (status, created) = app
        .post(
            &format!("/api/v1/workflows/{wf}/webhooks"),
            &json!({"name": "ci", "headers": ["X-Source"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["workflow_id"], wf.as_str());
    let url = created["url"].as_str().expect("url").to_owned();
    let deliver = |key: &str| {
        app.anonymous(Method::POST, &url)
            .header("content-type", "application/json")
            .header("X-Source", "ci")
            .header("Idempotency-Key", key)
            .body(r#"{"ref": "main"}"#)
    };
    let (status, first) = send(deliver("k1")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    assert_eq!(first["created"], true);
    assert!(first.get("job_id").is_none(), "{first}");
    let run_id = first["run_id"].as_str().expect("run_id").to_owned();
    let (_, run) = app.get(&format!("/api/v1/workflow-runs/{run_id}")).await;
    assert_eq!(
        run["input"],
        json!({"ref": "main", "_headers": {"x-source": "ci"}})
    );
    let (status, again) = send(deliver("k1")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["run_id"], run_id.as_str());
    assert_eq!(again["created"], false);
    let (_, other) = send(deliver("k2")).await;
    assert_ne!(other["run_id"], run_id.as_str());

    let (_, hooks) = app.get(&format!("/api/v1/workflows/{wf}/webhooks")).await;
    let hook_id = hooks[0]["id"].as_str().expect("id").to_owned();
    let (status, _) = app
        .delete(&format!("/api/v1/workflows/{wf}/webhooks/{hook_id}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(deliver("k3")).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a revoked key starts nothing"
    );

    // A run request's own idempotency key.
    let body = json!({"input": {}, "idempotency_key": "once"});
    let (_, a) = app
        .post(&format!("/api/v1/workflows/{wf}/run"), &body)
        .await;
    let (_, b) = app
        .post(&format!("/api/v1/workflows/{wf}/run"), &body)
        .await;
    assert_eq!(a["run_id"], b["run_id"]);
    assert_eq!(
        (a["created"].clone(), b["created"].clone()),
        (json!(true), json!(false))
    );
}

#[tokio::test]
async fn openapi_documents_the_workflow_routes() {
    let app = spawn_app().await;
    let (status, doc) = app.get("/api/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for (path, method) in [
        ("/api/v1/workflows", "post"),
        ("/api/v1/workflows", "get"),
        ("/api/v1/workflows/{id}", "get"),
        ("/api/v1/workflows/{id}", "delete"),
        ("/api/v1/workflows/{id}/run", "post"),
        ("/api/v1/workflows/{id}/schedules", "post"),
        ("/api/v1/workflows/{id}/webhooks", "post"),
        ("/api/v1/workflows/{id}/webhooks", "get"),
        ("/api/v1/workflows/{id}/webhooks/{webhook_id}", "delete"),
        ("/api/v1/workflow-runs", "get"),
        ("/api/v1/workflow-runs/{id}", "get"),
        ("/api/v1/workflow-runs/{id}/cancel", "post"),
        ("/api/v1/workflow-runs/{id}/retry", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
    let create = &doc["paths"]["/api/v1/workflows"]["post"];
    assert!(create["requestBody"]["content"]["application/yaml"].is_object());
    assert!(create["responses"]["422"].is_object());
    let job = &doc["components"]["schemas"]["Job"]["properties"];
    for field in ["workflow_run_id", "step_id", "step_item"] {
        assert!(job[field].is_object(), "Job.{field}");
    }
    let action = &doc["components"]["schemas"]["NewAction"]["properties"];
    assert!(action["if"].is_object(), "NewAction.if");
}
