//! Variables: the API, what scripts receive, what they write back, secrets masked in logs.

use std::collections::HashMap;

use baton_api::model::Role;
use baton_proto::v1::{ErrorKind, Finished, LogBatch, Stream};
use baton_proto::{ServerMsg, WorkerMsg};
use baton_tests::protocol::{ScriptedWorker, hello};
use baton_tests::{bash_event, spawn_app};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

#[tokio::test]
async fn put_get_list_delete_with_scopes_and_secrets() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("scoped")).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let put = |key: &str, body: Value| {
        let app = &app;
        let key = key.to_owned();
        async move {
            baton_tests::send(
                app.request(reqwest::Method::PUT, &format!("/api/v1/variables/{key}"))
                    .json(&body),
            )
            .await
        }
    };
    let (status, v) = put("region", json!({"value": "eu-west-1"})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (
            v["scope"].as_str(),
            v["value"].as_str(),
            v["secret"].as_bool()
        ),
        (Some("global"), Some("eu-west-1"), Some(false))
    );
    let (_, v) = put(
        "region",
        json!({"value": "us-east-2", "scope": format!("event:{ev}")}),
    )
    .await;
    assert_eq!(v["scope"], format!("event:{ev}"));
    let (status, s) = put(
        "db_password",
        json!({"value": "hunter2-secret", "secret": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s["value"], Value::Null, "a secret is never returned");
    let (_, got) = app.get("/api/v1/variables/db_password").await;
    assert_eq!(got["value"], Value::Null);
    assert!(!got.to_string().contains("hunter2"));
    let (_, all) = app.get("/api/v1/variables").await;
    assert_eq!(all.as_array().expect("list").len(), 3);
    assert!(!all.to_string().contains("hunter2"));
    let (_, scoped) = app
        .get(&format!("/api/v1/variables?scope=event:{ev}"))
        .await;
    assert_eq!(scoped.as_array().expect("list").len(), 1);
    let stored: Option<String> =
        sqlx::query_scalar("SELECT value FROM variables WHERE key = 'db_password'")
            .fetch_one(&app.pool)
            .await
            .expect("row");
    assert_eq!(stored, None, "no plaintext at rest");

    let long_key = "k".repeat(129);
    for (key, body, field) in [
        ("bad%20key", json!({"value": "x"}), "key"),
        (long_key.as_str(), json!({"value": "x"}), "key"),
        ("ok", json!({"value": "x", "scope": "team:a"}), "scope"),
        ("ok", json!({"value": 5}), "value"),
        ("ok", json!({"value": "x".repeat(70_000)}), "value"),
    ] {
        let (status, err) = put(key, body.clone()).await;
        assert!(status.is_client_error(), "{key} {body}");
        assert_eq!(err["error"]["field"], field, "{key}: {err}");
    }
    let (status, _) = put(
        "ghost",
        json!({"value": "x", "scope": format!("event:{}", Uuid::now_v7())}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.delete("/api/v1/variables/region").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.get("/api/v1/variables/region").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let viewer = app.token(Role::Viewer).await;
    let (status, _) = baton_tests::send(
        app.request_as(&viewer, reqwest::Method::PUT, "/api/v1/variables/x")
            .json(&json!({"value": "1"})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn scripts_receive_variables_write_them_back_and_secrets_are_masked_in_logs() {
    let app = spawn_app().await;
    // This event may write global variables too.
    let mut spec = bash_event("uses-vars");
    spec["variables_write"] = json!("global");
    let ev = app.create_event(&spec).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    for (key, body) in [
        ("region", json!({"value": "eu-west-1"})),
        (
            "region",
            json!({"value": "us-east-2", "scope": format!("event:{ev}")}),
        ),
        ("token", json!({"value": "s3cr3t-value", "secret": true})),
    ] {
        let (status, _) = baton_tests::send(
            app.request(reqwest::Method::PUT, &format!("/api/v1/variables/{key}"))
                .json(&body),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let token = app.token(Role::Worker).await;
    let (mut w, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let job = app.run_event(&ev, &json!({})).await;
    let a = w
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    let context: Value = serde_json::from_str(&a.context_json).expect("context");
    assert_eq!(
        context["variables"]["region"], "us-east-2",
        "the event's own variable wins"
    );
    assert_eq!(
        context["variables"]["token"], "s3cr3t-value",
        "scripts can read secrets"
    );

    // As a worker sends lines: one encoded chunk.
    let mut chunk = baton_proto::logchunk::ChunkWriter::default();
    chunk.push(Stream::Stdout, 0, "using s3cr3t-value twice: s3cr3t-value");
    w.send(WorkerMsg::Logs(LogBatch {
        job_id: job.clone(),
        lease_token: a.lease_token,
        first_seq: 1,
        chunk: chunk.into_bytes(),
        ..LogBatch::default()
    }))
    .await;
    w.next_matching(|m| match m {
        ServerMsg::LogAck(_) => Some(()),
        _ => None,
    })
    .await;
    let mut writes = HashMap::new();
    writes.insert("region".to_owned(), "ap-south-1".to_owned());
    writes.insert("token".to_owned(), "rotated-secret".to_owned());
    writes.insert("counter".to_owned(), "1".to_owned());
    w.send(WorkerMsg::Finished(Finished {
        job_id: job.clone(),
        lease_token: a.lease_token,
        last_seq: 1,
        exit_code: Some(0),
        variables: writes,
        ..Default::default()
    }))
    .await;
    w.next_matching(|m| match m {
        ServerMsg::FinishedAck(_) => Some(()),
        _ => None,
    })
    .await;

    let (_, logs) = app.get(&format!("/api/v1/jobs/{job}/logs")).await;
    assert_eq!(logs["lines"][0]["text"], "using *** twice: ***");
    // The live stream serves the masked text too.
    let streamed = app
        .request(
            reqwest::Method::GET,
            &format!("/api/v1/jobs/{job}/logs/stream"),
        )
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .expect("body");
    assert!(streamed.contains("using *** twice: ***"), "{streamed}");
    assert!(!streamed.contains("s3cr3t-value"), "{streamed}");
    let (_, scoped) = app
        .get(&format!("/api/v1/variables/region?scope=event:{ev}"))
        .await;
    assert_eq!(
        scoped["value"], "ap-south-1",
        "the write updated the event's own variable"
    );
    let (_, global) = app.get("/api/v1/variables/region").await;
    assert_eq!(global["value"], "eu-west-1", "the global one is untouched");
    let (_, counter) = app.get("/api/v1/variables/counter").await;
    assert_eq!(
        (
            counter["value"].as_str(),
            counter["updated_by_job"].as_str()
        ),
        (Some("1"), Some(job.as_str()))
    );
    let (_, secret) = app.get("/api/v1/variables/token").await;
    assert_eq!(
        secret["secret"], true,
        "a secret stays secret when a script writes it"
    );
    let stored: Option<String> =
        sqlx::query_scalar("SELECT value FROM variables WHERE key = 'token'")
            .fetch_one(&app.pool)
            .await
            .expect("row");
    assert_eq!(stored, None);

    // The next run reads the rotated secret.
    app.run_event(&ev, &json!({})).await;
    let next = w
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    let context: Value = serde_json::from_str(&next.context_json).expect("context");
    assert_eq!(context["variables"]["token"], "rotated-secret");
}

#[tokio::test]
async fn a_run_whose_output_is_invalid_applies_nothing() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("bad-output")).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let target = app.create_event(&bash_event("never")).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    app.post(
        &format!("/api/v1/events/{ev}/actions"),
        &json!({"trigger": "always", "action": {"type": "run_event", "event_id": target}}),
    )
    .await;
    let token = app.token(Role::Worker).await;
    let (mut w, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let job = app.run_event(&ev, &json!({})).await;
    let a = w
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    let mut writes = HashMap::new();
    writes.insert("leak".to_owned(), "x".to_owned());
    w.send(WorkerMsg::Finished(Finished {
        job_id: job.clone(),
        lease_token: a.lease_token,
        exit_code: Some(0),
        error_kind: ErrorKind::Output as i32,
        error_message: "output.json is not valid JSON: expected value at line 1 column 1".into(),
        variables: writes,
        ..Default::default()
    }))
    .await;
    w.next_matching(|m| match m {
        ServerMsg::FinishedAck(_) => Some(()),
        _ => None,
    })
    .await;
    let (_, j) = app.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(
        (j["status"].as_str(), j["error"]["kind"].as_str()),
        (Some("failed"), Some("output"))
    );
    assert_eq!(j["output"], Value::Null);
    let (status, _) = app.get("/api/v1/variables/leak").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no variable write applied");
    // Actions still run on failure triggers (always): the chain sees a failed run.
    let (_, chain) = app.get(&format!("/api/v1/jobs?root_job_id={job}")).await;
    assert_eq!(chain["items"].as_array().expect("items").len(), 2);
}

/// Runs `event` on the scripted worker `w`, reports success with `writes`, and returns the
/// job id and the variables its assignment carried.
async fn run_writing(
    app: &baton_tests::TestApp,
    w: &mut ScriptedWorker,
    event: &str,
    writes: &[(&str, &str)],
) -> (String, Value) {
    let job = app.run_event(event, &json!({})).await;
    let a = w
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert_eq!(a.job_id, job);
    let context: Value = serde_json::from_str(&a.context_json).expect("context");
    w.send(WorkerMsg::Finished(Finished {
        job_id: job.clone(),
        lease_token: a.lease_token,
        exit_code: Some(0),
        variables: writes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }))
    .await;
    w.next_matching(|m| match m {
        ServerMsg::FinishedAck(_) => Some(()),
        _ => None,
    })
    .await;
    (job, context["variables"].clone())
}

async fn put_variable(app: &baton_tests::TestApp, key: &str, body: Value) {
    let (status, answer) = baton_tests::send(
        app.request(reqwest::Method::PUT, &format!("/api/v1/variables/{key}"))
            .json(&body),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

#[tokio::test]
async fn scripts_write_only_their_event_s_variables_unless_granted_global_write() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("confined")).await;
    assert_eq!(ev["variables_write"], "event", "the default");
    let ev = ev["id"].as_str().expect("id").to_owned();
    put_variable(
        &app,
        "deploy_key",
        json!({"value": "global-secret", "secret": true}),
    )
    .await;
    put_variable(&app, "region", json!({"value": "eu-west-1"})).await;
    put_variable(
        &app,
        "own",
        json!({"value": "before", "scope": format!("event:{ev}")}),
    )
    .await;
    let token = app.token(Role::Worker).await;
    let (mut w, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let (job, _) = run_writing(
        &app,
        &mut w,
        &ev,
        &[
            ("deploy_key", "attacker-value"),
            ("region", "xx"),
            ("own", "after"),
            ("fresh", "1"),
        ],
    )
    .await;
    // The global ones are untouched, and the refusals are on the job.
    let (_, j) = app.get(&format!("/api/v1/jobs/{job}")).await;
    let notes: Vec<&str> = j["action_notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(notes.len(), 2, "{notes:?}");
    for key in ["deploy_key", "region"] {
        assert!(
            notes
                .iter()
                .any(|n| n.contains(&format!("{key:?} not written"))
                    && n.contains("variables_write")),
            "{notes:?}"
        );
    }
    let (_, region) = app.get("/api/v1/variables/region").await;
    assert_eq!(region["value"], "eu-west-1");
    let (_, own) = app
        .get(&format!("/api/v1/variables/own?scope=event:{ev}"))
        .await;
    assert_eq!(own["value"], "after", "the event's own variable is written");
    let (_, fresh) = app
        .get(&format!("/api/v1/variables/fresh?scope=event:{ev}"))
        .await;
    assert_eq!(
        fresh["value"], "1",
        "a new key is created in the event's scope"
    );
    let (status, _) = app.get("/api/v1/variables/fresh").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not globally");
    // Every run still reads the global secret as set by the admin.
    let other = app.create_event(&bash_event("reader")).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (_, vars) = run_writing(&app, &mut w, &other, &[]).await;
    assert_eq!(vars["deploy_key"], "global-secret");

    // Granted global write, the event updates global variables (a secret stays secret).
    let (status, body) = app
        .patch(
            &format!("/api/v1/events/{ev}"),
            &json!({"variables_write": "global"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    run_writing(
        &app,
        &mut w,
        &ev,
        &[("deploy_key", "rotated"), ("made", "g")],
    )
    .await;
    let (_, vars) = run_writing(&app, &mut w, &other, &[]).await;
    assert_eq!(vars["deploy_key"], "rotated");
    assert_eq!(vars["made"], "g", "a new key is created global");
    let (_, key) = app.get("/api/v1/variables/deploy_key").await;
    assert_eq!(key["secret"], true);

    // The setting is validated by name.
    let mut bad = bash_event("bad-scope");
    bad["variables_write"] = json!("everything");
    let (status, err) = app.post("/api/v1/events", &bad).await;
    assert!(status.is_client_error(), "{status}");
    assert_eq!(err["error"]["field"], "variables_write", "{err}");
}

#[tokio::test]
async fn concurrent_first_writes_of_a_secret_leave_it_readable() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("reads-secrets")).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    const KEYS: usize = 5;
    const WRITERS: usize = 8;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(KEYS * WRITERS));
    let mut tasks = Vec::new();
    for k in 0..KEYS {
        for n in 0..WRITERS {
            let barrier = barrier.clone();
            let request = app
                .request(reqwest::Method::PUT, &format!("/api/v1/variables/race_{k}"))
                .json(&json!({"value": format!("secret-{k}-{n}"), "secret": true}));
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                baton_tests::send(request).await.0
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    let token = app.token(Role::Worker).await;
    let (mut w, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let (_, vars) = run_writing(&app, &mut w, &ev, &[]).await;
    for k in 0..KEYS {
        let value = vars[format!("race_{k}")]
            .as_str()
            .unwrap_or_else(|| panic!("race_{k} could not be decrypted for the run: {vars}"));
        assert!(
            value.starts_with(&format!("secret-{k}-")),
            "race_{k} = {value}"
        );
    }
}

#[tokio::test]
async fn secrets_sealed_before_migration_0012_still_open() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("old-secret")).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // A row as the previous version stored it: sealed to its id.
    let vault = baton_api::crypto::Vault::new(Some(baton_tests::MASTER_KEY)).expect("vault");
    let id = Uuid::now_v7();
    let sealed = vault.seal(b"legacy-value", id.as_bytes()).expect("seal");
    sqlx::query(
        "INSERT INTO variables (id, key, secret, sealed, sealed_to_identity)
         VALUES ($1, 'legacy', true, $2, false)",
    )
    .bind(id)
    .bind(sealed)
    .execute(&app.pool)
    .await
    .expect("insert");
    let token = app.token(Role::Worker).await;
    let (mut w, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let (_, vars) = run_writing(&app, &mut w, &ev, &[]).await;
    assert_eq!(vars["legacy"], "legacy-value");
    // Written again, it is sealed to its identity and still opens.
    put_variable(
        &app,
        "legacy",
        json!({"value": "new-value", "secret": true}),
    )
    .await;
    let (_, vars) = run_writing(&app, &mut w, &ev, &[]).await;
    assert_eq!(vars["legacy"], "new-value");
}
