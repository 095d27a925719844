//! Worker tokens: a revoked token's streams end on every replica (and no more work reaches
//! them), a missed revocation notice is caught on the next heartbeat, and a token bound by an
//! admin to labels and executors refuses a worker declaring more.

use std::collections::HashMap;
use std::time::Duration;

use baton_proto::v1::{Heartbeat, Hello, WorkerMessage};
use baton_proto::{ServerMsg, WorkerMsg};
use baton_tests::protocol::{ScriptedWorker, hello};
use baton_tests::{TestApp, bash_event, spawn_app, spawn_replica};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

/// Creates a worker token with `extra` fields; returns (id, secret).
async fn worker_token(app: &TestApp, extra: Value) -> (String, String) {
    let mut body = json!({"name": format!("w-{}", Uuid::now_v7()), "role": "worker"});
    body.as_object_mut()
        .expect("object")
        .extend(extra.as_object().cloned().unwrap_or_default());
    let (status, answer) = app.post("/api/v1/tokens", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    (
        answer["id"].as_str().expect("id").to_owned(),
        answer["token"].as_str().expect("token").to_owned(),
    )
}

async fn assignment(worker: &mut ScriptedWorker) -> baton_proto::v1::Assignment {
    worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await
}

async fn job_status(app: &TestApp, id: &str) -> Value {
    let (status, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    job
}

async fn refused_with(app: &TestApp, token: &str, h: Hello) -> tonic::Status {
    let first = WorkerMessage {
        msg: Some(WorkerMsg::Hello(h)),
    };
    match ScriptedWorker::open(&app.grpc_address, token, first).await {
        Ok((_, answer)) => panic!("the session opened: {answer:?}"),
        Err(status) => status,
    }
}

/// Defect 2: a worker connected to replica 2 whose token is revoked through replica 1 has its
/// stream ended with `Unauthenticated`, gets no further assignment, and the job it had been
/// given but not started goes back to the queue at once (not after its lease).
#[tokio::test]
async fn a_token_revoked_on_one_replica_ends_its_worker_stream_on_another() {
    let app = spawn_app().await;
    let other = spawn_replica(app.database_url.clone(), |_| {}).await;
    let ev = app.create_event(&bash_event("revoked-worker")).await;
    let ev = ev["id"].as_str().expect("id").to_owned();
    let (token_id, token) = worker_token(&app, json!({})).await;
    let (mut worker, _) =
        ScriptedWorker::connect(&other.grpc_address, &token, hello(Uuid::now_v7(), 2)).await;
    let first = app.run_event(&ev, &json!({})).await;
    let given = assignment(&mut worker).await;
    assert_eq!(given.job_id, first, "the worker on replica 2 gets work");

    let (status, body) = app.delete(&format!("/api/v1/tokens/{token_id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (seen, ended) = worker.until_closed(Duration::from_secs(10)).await;
    let ended = ended.expect("ended with a status");
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended}");
    assert!(ended.message().contains("revoked"), "{ended}");
    assert!(
        !seen.iter().any(|m| matches!(m, ServerMsg::Assignment(_))),
        "no assignment after the revocation: {seen:?}"
    );

    // The job it never started is queued again well within its 15 s lease.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        let job = job_status(&app, &first).await;
        if job["status"] == "queued" {
            assert!(job["worker_id"].is_null(), "{job}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revoked worker's job was not given back: {job}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The token opens no new stream on either replica.
    for replica in [&app, &other] {
        let refused = refused_with(replica, &token, hello(Uuid::now_v7(), 1)).await;
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    }
    // A trusted worker now gets both the given-back job and a new one.
    let second = app.run_event(&ev, &json!({})).await;
    let (_, fresh) = worker_token(&app, json!({})).await;
    let (mut trusted, _) =
        ScriptedWorker::connect(&app.grpc_address, &fresh, hello(Uuid::now_v7(), 2)).await;
    let mut got = vec![
        assignment(&mut trusted).await.job_id,
        assignment(&mut trusted).await.job_id,
    ];
    got.sort();
    let mut want = vec![first, second];
    want.sort();
    assert_eq!(got, want);
}

/// Defect 2: a revocation whose notification a replica never heard (written straight to the
/// database here, as if the LISTEN connection had been down) ends the stream at the worker's
/// next heartbeat.
#[tokio::test]
async fn a_missed_revocation_is_caught_on_the_next_heartbeat() {
    let app = spawn_app().await;
    let (token_id, token) = worker_token(&app, json!({})).await;
    let (mut worker, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let heartbeat = WorkerMsg::Heartbeat(Heartbeat {
        jobs: vec![],
        free_slots: 1,
    });
    worker.send(heartbeat.clone()).await;
    assert!(
        worker.try_next(Duration::from_millis(300)).await.is_none(),
        "a live token's heartbeat is answered with nothing"
    );
    sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE id = $1::uuid")
        .bind(&token_id)
        .execute(&app.pool)
        .await
        .expect("revoke without NOTIFY");
    worker.send(heartbeat).await;
    let (_, ended) = worker.until_closed(Duration::from_secs(10)).await;
    let ended = ended.expect("ended with a status");
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended}");
}

fn labelled(labels: &[(&str, &str)], executors: &[&str]) -> Hello {
    Hello {
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
        executors: executors.iter().map(|e| (*e).to_owned()).collect(),
        ..hello(Uuid::now_v7(), 1)
    }
}

/// Defect 13: a token bound to `env=prod` and the local executor refuses a worker declaring
/// another label, or offering none of its executors (PermissionDenied naming it); a worker
/// within the binding has its other executors clipped and gets the `prod` jobs it may run;
/// unbound tokens declare what they like, as before.
#[tokio::test]
async fn a_bound_worker_token_refuses_other_labels_and_clips_executors() {
    let app = spawn_app().await;
    let (_, bound) = worker_token(
        &app,
        json!({"worker_labels": {"env": "prod"}, "executors": ["local"]}),
    )
    .await;
    let (_, tokens) = app.get("/api/v1/tokens").await;
    let listed = tokens
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["worker_labels"] == json!({"env": "prod"}))
        .expect("the binding is listed");
    assert_eq!(listed["executors"], json!(["local"]));

    for (h, names) in [
        (labelled(&[("env", "staging")], &["local"]), "env=staging"),
        (
            labelled(&[("env", "prod"), ("gpu", "yes")], &["local"]),
            "gpu=yes",
        ),
        (labelled(&[("env", "prod")], &["ssh"]), "none of them (ssh)"),
    ] {
        let refused = refused_with(&app, &bound, h).await;
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
        assert!(refused.message().contains(names), "{refused}");
    }

    // Within the binding: accepted, its executors clipped to the binding, and given the prod
    // job it may run — not the container one, though it offers the container executor too.
    let mut in_container = bash_event("prod-container");
    in_container["executor"] = json!("container");
    in_container["labels"] = json!({"env": "prod"});
    let ev = app.create_event(&in_container).await;
    let container_job = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let mut prod = bash_event("prod-only");
    prod["labels"] = json!({"env": "prod"});
    let ev = app.create_event(&prod).await;
    let job = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let worker_id = Uuid::now_v7();
    let (mut worker, _) = ScriptedWorker::connect(
        &app.grpc_address,
        &bound,
        Hello {
            worker_id: worker_id.to_string(),
            slots: 2,
            ..labelled(&[("env", "prod")], &["local", "container"])
        },
    )
    .await;
    assert_eq!(assignment(&mut worker).await.job_id, job);
    assert!(
        worker.try_next(Duration::from_secs(1)).await.is_none(),
        "a job of an executor outside the binding was assigned"
    );
    assert_eq!(job_status(&app, &container_job).await["status"], "queued");
    let (_, workers) = app.get("/api/v1/workers").await;
    let listed = workers
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["id"] == worker_id.to_string())
        .expect("listed");
    assert_eq!(listed["executors"], json!(["local"]));

    // Unbound tokens keep today's behaviour.
    let (_, unbound) = worker_token(&app, json!({})).await;
    ScriptedWorker::connect(
        &app.grpc_address,
        &unbound,
        labelled(&[("env", "prod")], &["local", "container", "ssh"]),
    )
    .await;
    // Bound to no labels at all.
    let (_, bare) = worker_token(&app, json!({"worker_labels": {}})).await;
    let refused = refused_with(&app, &bare, labelled(&[("env", "prod")], &["local"])).await;
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("no labels"), "{refused}");
}

#[tokio::test]
async fn token_bindings_are_validated() {
    let app = spawn_app().await;
    for (body, field) in [
        (
            json!({"name": "v", "role": "viewer", "worker_labels": {"env": "prod"}}),
            "worker_labels",
        ),
        (
            json!({"name": "o", "role": "operator", "executors": ["ssh"]}),
            "executors",
        ),
        (
            json!({"name": "w", "role": "worker", "worker_labels": {"env": "pr od"}}),
            "worker_labels.env",
        ),
        (
            json!({"name": "w", "role": "worker", "executors": []}),
            "executors",
        ),
        (
            json!({"name": "w", "role": "worker", "executors": ["ssh", "ssh"]}),
            "executors",
        ),
        (
            json!({"name": "w", "role": "worker", "executors": ["mainframe"]}),
            "executors",
        ),
    ] {
        let (status, err) = app.post("/api/v1/tokens", &body).await;
        assert!(status.is_client_error(), "{body}: {status} {err}");
        assert!(
            err["error"]["field"]
                .as_str()
                .is_some_and(|f| f.starts_with(field)),
            "{body}: {err}"
        );
    }
}

/// `BATON_WORKER_TOKEN` on the api (the deployments' shared worker secret): registered at
/// start by every replica (two starting on one database agree), accepted on the worker stream,
/// useless on the REST API, and once revoked it stays revoked across a restart.
#[tokio::test]
async fn the_configured_worker_token_is_registered_once_and_a_revocation_survives_restarts() {
    let secret = format!("wkr-{}", Uuid::now_v7().simple());
    let configured = secret.clone();
    let app = baton_tests::spawn_app_with(move |c| c.worker_token = Some(configured)).await;
    let configured = secret.clone();
    let replica = spawn_replica(app.database_url.clone(), move |c| {
        c.worker_token = Some(configured)
    })
    .await;

    let (worker, _) =
        ScriptedWorker::connect(&replica.grpc_address, &secret, hello(Uuid::now_v7(), 1)).await;
    drop(worker);
    let (status, _) =
        baton_tests::send(app.request_as(&secret, reqwest::Method::GET, "/api/v1/jobs")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, tokens) = app.get("/api/v1/tokens").await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let registered: Vec<&Value> = tokens
        .as_array()
        .expect("a list")
        .iter()
        .filter(|t| t["name"] == "worker (BATON_WORKER_TOKEN)")
        .collect();
    assert_eq!(registered.len(), 1, "{tokens}");
    assert_eq!(registered[0]["role"], "worker", "{tokens}");
    let id = registered[0]["id"].as_str().expect("id").to_owned();
    let (status, body) = app.delete(&format!("/api/v1/tokens/{id}")).await;
    assert!(status.is_success(), "{status} {body}");

    let configured = secret.clone();
    let restarted = replica
        .restart(move |c| c.worker_token = Some(configured))
        .await;
    let refused = refused_with(&restarted, &secret, hello(Uuid::now_v7(), 1)).await;
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
}

/// A configured worker token shorter than 16 characters stops the start with a clear message.
#[tokio::test]
async fn a_short_configured_worker_token_stops_the_start() {
    let app = spawn_app().await;
    let mut config = baton_api::ApiConfig::new(app.database_url.clone());
    config.worker_token = Some("short".into());
    let err = match baton_api::Api::start(config).await {
        Ok(_) => panic!("the api started with a 5-character worker token"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("BATON_WORKER_TOKEN"), "{err}");
}
