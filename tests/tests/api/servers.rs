//! `/api/v1/servers`: registration, validation, secrets encrypted and never returned, ssh jobs
//! carrying their server's credentials to the worker, host keys pinned on first use.

use baton_api::model::Role;
use baton_proto::ServerMsg;
use baton_proto::WorkerMsg;
use baton_proto::v1::HostKeySeen;
use baton_tests::protocol::{ScriptedWorker, hello};
use baton_tests::{spawn_app, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----";
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
const OTHER_HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBo1TZ6a4j8ZSq4t0ekB3cYDUH8vKrn2vBbS6bdPmUNW";

fn server(name: &str) -> Value {
    json!({"name": name, "host": "127.0.0.1", "port": 2222, "username": "deploy", "private_key": KEY,
           "host_key_policy": "strict", "host_key": HOST_KEY, "max_concurrent": 2})
}

#[tokio::test]
async fn servers_are_stored_without_ever_returning_secrets() {
    let app = spawn_app().await;
    let (status, created) = app.post("/api/v1/servers", &server("db1")).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["auth_method"], "private_key");
    assert_eq!(created["host_key"], HOST_KEY);
    let id = created["id"].as_str().expect("id").to_owned();
    let (_, listed) = app.get("/api/v1/servers").await;
    let (_, got) = app.get(&format!("/api/v1/servers/{id}")).await;
    for body in [&created, &listed, &got] {
        let text = body.to_string();
        assert!(
            !text.contains("PRIVATE KEY") && !text.contains("b3BlbnNzaC1rZXkt"),
            "a secret leaked: {text}"
        );
    }
    let (status, pw) = app
        .post("/api/v1/servers", &json!({"name": "pw", "host": "db2.example", "username": "u", "password": "hunter2hunter2", "host_key_policy": "accept_new"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pw}");
    assert!(!pw.to_string().contains("hunter2"));
    // At rest, the column holds no plaintext.
    let sealed: Vec<Vec<u8>> = sqlx::query_scalar("SELECT credentials FROM servers")
        .fetch_all(&app.pool)
        .await
        .expect("rows");
    for blob in sealed {
        let text = String::from_utf8_lossy(&blob);
        assert!(!text.contains("hunter2") && !text.contains("PRIVATE KEY"));
    }
    let (status, _) = app.post("/api/v1/servers", &server("db1")).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn server_fields_are_validated_by_name() {
    let app = spawn_app().await;
    let base = server("v");
    let with = |k: &str, v: Value| {
        let mut s = base.clone();
        s[k] = v;
        s
    };
    let without = |k: &str| {
        let mut s = base.clone();
        s.as_object_mut().expect("obj").remove(k);
        s
    };
    for (body, field) in [
        (with("host", json!("bad host")), "host"),
        (with("port", json!(70000)), "port"),
        (with("username", json!("")), "username"),
        (with("private_key", json!("not a key")), "private_key"),
        (without("private_key"), "private_key"),
        (with("password", json!("x")), "password"),
        (without("host_key"), "host_key"),
        (with("host_key", json!("ssh-dsa AAAA")), "host_key"),
        (with("host_key", json!("ssh-ed25519 !!!")), "host_key"),
        (
            with("host_key_policy", json!("trust_me")),
            "host_key_policy",
        ),
        (with("max_concurrent", json!(0)), "max_concurrent"),
        (with("colour", json!(1)), "colour"),
    ] {
        let (status, err) = app.post("/api/v1/servers", &body).await;
        assert!(status.is_client_error(), "{body}: {status}");
        assert_eq!(err["error"]["field"], field, "{body}: {err}");
    }
    let viewer = app.token(Role::Viewer).await;
    let (status, _) = baton_tests::send(
        app.request_as(&viewer, reqwest::Method::POST, "/api/v1/servers")
            .json(&server("x")),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn without_a_master_key_secrets_are_refused_clearly() {
    let app = spawn_app_with(|c| c.master_key = None).await;
    let (status, err) = app.post("/api/v1/servers", &server("nokey")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(err["error"]["code"], "master_key_missing");
    assert!(
        err["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("BATON_MASTER_KEY")
    );
}

#[tokio::test]
async fn ssh_events_need_a_server_and_their_jobs_carry_its_credentials() {
    let app = spawn_app().await;
    let (_, srv) = app.post("/api/v1/servers", &server("web1")).await;
    let server_id = srv["id"].as_str().expect("id").to_owned();
    let (status, err) = app
        .post("/api/v1/events", &json!({"name": "remote", "runtime": "bash", "content": "uptime", "server_id": Uuid::now_v7()}))
        .await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("server_id"))
    );
    let ev = app.create_event(&json!({"name": "remote", "runtime": "bash", "content": "uptime", "server_id": server_id})).await;
    assert_eq!(ev["executor"], "ssh");
    let (status, err) = app.delete(&format!("/api/v1/servers/{server_id}")).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("server_in_use"))
    );

    // Only a worker offering ssh gets the job, with the decrypted credentials inside.
    let token = app.token(Role::Worker).await;
    let (mut local_only, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let mut h = hello(Uuid::now_v7(), 1);
    h.executors = vec!["ssh".into()];
    let (mut ssh_worker, _) = ScriptedWorker::connect(&app.grpc_address, &token, h).await;
    let job_id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let a = ssh_worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert_eq!(a.job_id, job_id);
    let target: Value = serde_json::from_str(&a.server_json).expect("server json");
    assert_eq!(target["host"], "127.0.0.1");
    assert_eq!(target["port"], 2222);
    assert_eq!(target["username"], "deploy");
    assert_eq!(
        target["auth"]["private_key"].as_str().expect("key").trim(),
        KEY
    );
    assert_eq!(target["host_key_policy"], "strict");
    assert_eq!(target["max_concurrent"], 2);
    assert!(
        local_only
            .try_next(std::time::Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn accept_new_pins_the_first_host_key_seen() {
    let app = spawn_app().await;
    let (_, srv) = app
        .post("/api/v1/servers", &json!({"name": "tofu", "host": "127.0.0.1", "username": "u", "password": "secret-password", "host_key_policy": "accept_new"}))
        .await;
    let server_id = srv["id"].as_str().expect("id").to_owned();
    assert_eq!(srv["host_key"], Value::Null);
    let ev = app.create_event(&json!({"name": "tofu-job", "runtime": "bash", "content": "true", "server_id": server_id})).await;
    let token = app.token(Role::Worker).await;
    let mut h = hello(Uuid::now_v7(), 1);
    h.executors = vec!["ssh".into()];
    let (mut worker, _) = ScriptedWorker::connect(&app.grpc_address, &token, h).await;
    let job_id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let a = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    let target: Value = serde_json::from_str(&a.server_json).expect("server json");
    assert_eq!(target["auth"]["password"], "secret-password");
    assert_eq!(target["host_key"], Value::Null);

    let seen = |key: &str| {
        WorkerMsg::HostKeySeen(HostKeySeen {
            job_id: job_id.clone(),
            lease_token: a.lease_token,
            server_id: server_id.clone(),
            host_key: key.into(),
        })
    };
    worker.send(seen(HOST_KEY)).await;
    // A later, different key is refused (the first stays pinned).
    worker.send(seen(OTHER_HOST_KEY)).await;
    let notice = worker
        .next_matching(|m| match m {
            ServerMsg::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert!(notice.message.contains("different host key"), "{notice:?}");
    let (_, srv) = app.get(&format!("/api/v1/servers/{server_id}")).await;
    assert_eq!(srv["host_key"], HOST_KEY);
    assert!(srv["host_key_recorded_at"].is_string());
    // A worker that does not hold the job cannot pin anything.
    let (mut stranger, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    stranger.send(seen(OTHER_HOST_KEY)).await;
    stranger
        .next_matching(|m| match m {
            ServerMsg::LeaseLost(_) => Some(()),
            _ => None,
        })
        .await;
}
