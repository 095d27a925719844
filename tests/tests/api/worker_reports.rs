//! What a worker's reports can and cannot do, driven by scripted workers: only the stream that
//! holds a job may report on it (whatever token another sends), host keys only for the job's
//! own server, values PostgreSQL cannot store turned into a clear `output` error, secrets
//! masked across line cuts, in multi-line form, in output, errors and messages, and a batch
//! whose secrets cannot be loaded refused (and re-sent) rather than stored in clear.

use std::collections::HashMap;
use std::time::Duration;

use baton_api::model::Role;
use baton_proto::logchunk::ChunkWriter;
use baton_proto::v1::{
    Assignment, ErrorKind, Finished, HeldJob, HostKeySeen, LogBatch, Progress, Started, Stream,
    WorkerMessage,
};
use baton_proto::{ServerMsg, WorkerMsg};
use baton_tests::faults::refuse_successes;
use baton_tests::protocol::{ScriptedWorker, hello};
use baton_tests::{TestApp, bash_event, spawn_app, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

async fn event_id(app: &TestApp, spec: &Value) -> String {
    app.create_event(spec).await["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

async fn assignment(worker: &mut ScriptedWorker) -> Assignment {
    worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await
}

async fn job(app: &TestApp, id: &str) -> Value {
    let (status, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    job
}

async fn log_texts(app: &TestApp, id: &str) -> Vec<String> {
    let (status, page) = app
        .get(&format!("/api/v1/jobs/{id}/logs?limit=10000"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| l["text"].as_str().expect("text").to_owned())
        .collect()
}

fn batch(job_id: &str, token: i64, first_seq: i64, texts: &[&str]) -> WorkerMsg {
    let mut chunk = ChunkWriter::default();
    for t in texts {
        chunk.push(Stream::Stdout, 1_700_000_000_000, t);
    }
    WorkerMsg::Logs(LogBatch {
        job_id: job_id.to_owned(),
        lease_token: token,
        first_seq,
        chunk: chunk.into_bytes(),
        ..LogBatch::default()
    })
}

async fn put_secret(app: &TestApp, key: &str, value: &str) {
    let (status, body) = baton_tests::send(
        app.request(reqwest::Method::PUT, &format!("/api/v1/variables/{key}"))
            .json(&json!({"value": value, "secret": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn another_workers_stream_cannot_report_on_a_job_it_does_not_hold() {
    let app = spawn_app().await;
    let ev = event_id(&app, &bash_event("held")).await;
    let (mut owner, _) = ScriptedWorker::connect(
        &app.grpc_address,
        &app.token(Role::Worker).await,
        hello(Uuid::now_v7(), 2),
    )
    .await;
    let id = app.run_event(&ev, &json!({})).await;
    let other = app.run_event(&ev, &json!({})).await;
    let a = assignment(&mut owner).await;
    let b = assignment(&mut owner).await;
    assert_eq!(a.job_id, id);
    // Tokens are random, not a sequence: the next claim's token cannot be derived from one seen.
    assert!(
        (a.lease_token - b.lease_token).abs() > 1_000_000 && a.lease_token > 0,
        "tokens {} and {} look sequential",
        a.lease_token,
        b.lease_token
    );
    let _ = other;

    // A second worker, with its own worker token, knows the job id and even the right token.
    let (mut intruder, _) = ScriptedWorker::connect(
        &app.grpc_address,
        &app.token(Role::Worker).await,
        hello(Uuid::now_v7(), 1),
    )
    .await;
    let before = job(&app, &id).await;
    for token in [a.lease_token, a.lease_token ^ 1, 1] {
        intruder
            .send(WorkerMsg::Started(Started {
                job_id: id.clone(),
                lease_token: token,
            }))
            .await;
        intruder
            .send(WorkerMsg::Progress(Progress {
                job_id: id.clone(),
                lease_token: token,
                percent: 99,
            }))
            .await;
        intruder.send(batch(&id, token, 1, &["forged line"])).await;
        intruder
            .send(WorkerMsg::Finished(Finished {
                job_id: id.clone(),
                lease_token: token,
                exit_code: Some(0),
                output_json: r#"{"forged": true}"#.into(),
                ..Default::default()
            }))
            .await;
        intruder
            .send(WorkerMsg::Heartbeat(baton_proto::v1::Heartbeat {
                jobs: vec![HeldJob {
                    job_id: id.clone(),
                    lease_token: token,
                }],
                free_slots: 0,
            }))
            .await;
        for _ in 0..5 {
            let lost = intruder
                .next_matching(|m| match m {
                    ServerMsg::LeaseLost(l) => Some(l.clone()),
                    _ => None,
                })
                .await;
            assert_eq!(lost.job_id, id);
        }
    }
    let after = job(&app, &id).await;
    assert_eq!(after["status"], "claimed", "{after}");
    assert_eq!(after["progress"], before["progress"]);
    assert_eq!(after["output"], Value::Null);
    assert!(log_texts(&app, &id).await.is_empty());
    // The holder's lease is intact: its own reports go through.
    owner
        .send(batch(&id, a.lease_token, 1, &["real line"]))
        .await;
    owner
        .send(WorkerMsg::Finished(Finished {
            job_id: id.clone(),
            lease_token: a.lease_token,
            last_seq: 1,
            exit_code: Some(0),
            ..Default::default()
        }))
        .await;
    owner
        .next_matching(|m| match m {
            ServerMsg::FinishedAck(f) if f.job_id == id => Some(()),
            _ => None,
        })
        .await;
    assert_eq!(job(&app, &id).await["status"], "succeeded");
    assert_eq!(log_texts(&app, &id).await, vec!["real line"]);
}

#[tokio::test]
async fn a_host_key_is_pinned_only_for_the_jobs_own_server() {
    let app = spawn_app().await;
    let server = |name: &str| json!({"name": name, "host": "127.0.0.1", "username": "u", "password": "pw-123456", "host_key_policy": "accept_new"});
    let (_, own) = app.post("/api/v1/servers", &server("own")).await;
    let (_, victim) = app.post("/api/v1/servers", &server("victim")).await;
    let own = own["id"].as_str().expect("id").to_owned();
    let victim = victim["id"].as_str().expect("id").to_owned();
    let ev = event_id(
        &app,
        &json!({"name": "ssh-job", "runtime": "bash", "content": "true", "server_id": own}),
    )
    .await;
    let mut h = hello(Uuid::now_v7(), 1);
    h.executors = vec!["ssh".into()];
    let (mut w, _) =
        ScriptedWorker::connect(&app.grpc_address, &app.token(Role::Worker).await, h).await;
    let id = app.run_event(&ev, &json!({})).await;
    let a = assignment(&mut w).await;
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    let seen = |server_id: &str| {
        WorkerMsg::HostKeySeen(HostKeySeen {
            job_id: id.clone(),
            lease_token: a.lease_token,
            server_id: server_id.to_owned(),
            host_key: key.into(),
        })
    };
    w.send(seen(&victim)).await;
    let notice = w
        .next_matching(|m| match m {
            ServerMsg::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert!(
        notice.message.contains("does not run on server"),
        "{notice:?}"
    );
    let (_, v) = app.get(&format!("/api/v1/servers/{victim}")).await;
    assert_eq!(
        v["host_key"],
        Value::Null,
        "another server's key was pinned"
    );
    w.send(seen(&own)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, s) = app.get(&format!("/api/v1/servers/{own}")).await;
        if s["host_key"] == key {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "own key not pinned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn hello_may_not_list_more_running_jobs_than_the_worker_can_hold() {
    let app = spawn_app().await;
    let mut h = hello(Uuid::now_v7(), 2);
    h.running = (0..5)
        .map(|i| HeldJob {
            job_id: Uuid::now_v7().to_string(),
            lease_token: i,
        })
        .collect();
    let status = ScriptedWorker::open(
        &app.grpc_address,
        &app.token(Role::Worker).await,
        WorkerMessage {
            msg: Some(WorkerMsg::Hello(h)),
        },
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("Hello.running"), "{status:?}");
}

#[tokio::test]
async fn values_postgres_cannot_store_fail_the_run_as_an_output_error() {
    let app = spawn_app().await;
    let ev = event_id(&app, &bash_event("nul")).await;
    let (mut w, _) = ScriptedWorker::connect(
        &app.grpc_address,
        &app.token(Role::Worker).await,
        hello(Uuid::now_v7(), 1),
    )
    .await;
    let finish = |job_id: &str, token: i64, f: Finished| {
        WorkerMsg::Finished(Finished {
            job_id: job_id.to_owned(),
            lease_token: token,
            exit_code: Some(0),
            ..f
        })
    };
    // A NUL in a variable a script wrote.
    let id = app.run_event(&ev, &json!({})).await;
    let a = assignment(&mut w).await;
    let mut vars = HashMap::new();
    vars.insert("k".to_owned(), "a\0b".to_owned());
    vars.insert("fine".to_owned(), "ok".to_owned());
    w.send(finish(
        &id,
        a.lease_token,
        Finished {
            variables: vars,
            ..Default::default()
        },
    ))
    .await;
    w.next_matching(|m| matches!(m, ServerMsg::FinishedAck(_)).then_some(()))
        .await;
    let j = job(&app, &id).await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["error"]["kind"], "output");
    assert!(
        j["error"]["message"]
            .as_str()
            .expect("message")
            .contains("\"k\""),
        "{j}"
    );
    let (status, _) = app.get("/api/v1/variables/fine").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing of the run applied");

    // `\u0000` in the output JSON (jsonb refuses it too).
    let id = app.run_event(&ev, &json!({})).await;
    let a = assignment(&mut w).await;
    w.send(finish(
        &id,
        a.lease_token,
        Finished {
            output_json: r#"{"s": "x\u0000y"}"#.into(),
            ..Default::default()
        },
    ))
    .await;
    w.next_matching(|m| matches!(m, ServerMsg::FinishedAck(_)).then_some(()))
        .await;
    let j = job(&app, &id).await;
    assert_eq!(
        (j["status"].as_str(), j["error"]["kind"].as_str()),
        (Some("failed"), Some("output")),
        "{j}"
    );
    assert_eq!(j["output"], Value::Null);

    // A NUL in an error message (a start failure's stderr tail) is escaped and stored.
    let id = app.run_event(&ev, &json!({})).await;
    let a = assignment(&mut w).await;
    w.send(finish(
        &id,
        a.lease_token,
        Finished {
            exit_code: None,
            error_kind: ErrorKind::Infrastructure as i32,
            error_message: "cannot start: bad\0byte".into(),
            ..Default::default()
        },
    ))
    .await;
    w.next_matching(|m| matches!(m, ServerMsg::FinishedAck(_)).then_some(()))
        .await;
    let j = job(&app, &id).await;
    assert_eq!(j["error"]["kind"], "infrastructure", "{j}");
    assert_eq!(j["error"]["message"], "cannot start: bad\\0byte");
}

#[tokio::test]
async fn secrets_are_masked_across_cuts_lines_output_errors_and_messages() {
    let app = spawn_app().await;
    let token_secret = "tok-5ecr3t-0123456789abcdef";
    let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcw\nggSjAgEAAoIBAQC7VJTUt9Us8cKj\n-----END PRIVATE KEY-----";
    put_secret(&app, "api_token", token_secret).await;
    put_secret(&app, "tls_key", pem).await;
    let ev = event_id(&app, &bash_event("masked")).await;
    // A message whose template renders the run's input, which here carries the secret.
    app.post(
        &format!("/api/v1/events/{ev}/actions"),
        &json!({"trigger": "always", "action": {"type": "send_message", "channel": "webhook",
                "target": "http://127.0.0.1:9/hook", "subject": "about {{ job.input.t }}",
                "template": "input was {{ job.input.t }}"}}),
    )
    .await;
    let (mut w, _) = ScriptedWorker::connect(
        &app.grpc_address,
        &app.token(Role::Worker).await,
        hello(Uuid::now_v7(), 1),
    )
    .await;
    let id = app
        .run_event(&ev, &json!({"input": {"t": token_secret}}))
        .await;
    let a = assignment(&mut w).await;
    let tok = a.lease_token;
    // The worker cut a long line inside the secret; the two pieces come in two batches.
    let long = format!("{}{}", "x".repeat(65_530), &token_secret[..11]);
    let rest = format!("{} end", &token_secret[11..]);
    w.send(batch(&id, tok, 1, &[&long])).await;
    w.send(batch(&id, tok, 2, &[&rest])).await;
    // A multi-line secret printed as it is, one line at a time.
    let pem_lines: Vec<&str> = pem.lines().collect();
    w.send(batch(&id, tok, 3, &pem_lines)).await;
    let last = 2 + pem_lines.len() as i64;
    w.send(WorkerMsg::Finished(Finished {
        job_id: id.clone(),
        lease_token: tok,
        last_seq: last,
        exit_code: Some(1),
        error_kind: ErrorKind::Script as i32,
        error_message: format!("failed with {token_secret} and\n{pem}"),
        output_json: json!({"t": token_secret, "k": pem, token_secret: 1}).to_string(),
        ..Default::default()
    }))
    .await;
    w.next_matching(|m| matches!(m, ServerMsg::FinishedAck(_)).then_some(()))
        .await;

    let lines = log_texts(&app, &id).await;
    assert_eq!(lines.len() as i64, last);
    let stored = lines.join("\n");
    for fragment in [
        &token_secret[..11],
        &token_secret[11..],
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcw",
        "ggSjAgEAAoIBAQC7VJTUt9Us8cKj",
    ] {
        assert!(!stored.contains(fragment), "{fragment:?} stored in clear");
    }
    assert_eq!(lines[1], "*** end");
    assert!(lines[0].ends_with("***"));
    let mut j = job(&app, &id).await;
    // (The input is the caller's own, stored as given.)
    j["input"] = Value::Null;
    let text = j.to_string();
    assert!(!text.contains("5ecr3t") && !text.contains("MIIEvQ"), "{j}");
    assert_eq!(j["output"]["t"], "***");
    assert!(
        j["error"]["message"]
            .as_str()
            .expect("message")
            .starts_with("failed with *** and"),
        "{j}"
    );
    let (body, subject, payload): (String, String, Value) =
        sqlx::query_as("SELECT body, subject, payload FROM message_outbox WHERE job_id = $1")
            .bind(Uuid::parse_str(&id).expect("uuid"))
            .fetch_one(&app.pool)
            .await
            .expect("a message");
    assert_eq!(body, "input was ***");
    assert_eq!(subject, "about ***");
    assert!(!payload.to_string().contains("5ecr3t"), "{payload}");
}

#[tokio::test]
async fn a_batch_whose_secrets_cannot_be_loaded_is_refused_and_stored_masked_later() {
    let app = spawn_app().await;
    let secret = "hunter2-fail-open";
    put_secret(&app, "pw", secret).await;
    let ev = event_id(&app, &bash_event("fail-closed")).await;
    let token = app.token(Role::Worker).await;
    let worker_id = Uuid::now_v7();
    let (mut w, _) = ScriptedWorker::connect(&app.grpc_address, &token, hello(worker_id, 1)).await;
    let id = app.run_event(&ev, &json!({})).await;
    let a = assignment(&mut w).await;
    // The job's secrets travel with its dispatch: masking its reports on this stream needs
    // no query, even while the variables cannot be read.
    sqlx::query("ALTER TABLE variables RENAME TO variables_away")
        .execute(&app.pool)
        .await
        .expect("rename");
    w.send(batch(&id, a.lease_token, 1, &[&format!("pw={secret}")]))
        .await;
    w.next_matching(|m| matches!(m, ServerMsg::LogAck(_)).then_some(()))
        .await;
    assert_eq!(log_texts(&app, &id).await, vec!["pw=***"]);
    // After a reconnect the job is resumed, and its secrets must be loaded: they cannot be
    // read for a moment (a real failure of the database query).
    drop(w);
    let mut resumed = hello(worker_id, 1);
    resumed.running = vec![baton_proto::v1::HeldJob {
        job_id: id.clone(),
        lease_token: a.lease_token,
    }];
    let (mut w, _) = ScriptedWorker::connect(&app.grpc_address, &token, resumed).await;
    w.send(batch(&id, a.lease_token, 2, &[&format!("pw={secret}")]))
        .await;
    let notice = w
        .next_matching(|m| match m {
            ServerMsg::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert!(notice.transient, "{notice:?}");
    assert_eq!(
        log_texts(&app, &id).await,
        vec!["pw=***"],
        "stored unmasked"
    );
    sqlx::query("ALTER TABLE variables_away RENAME TO variables")
        .execute(&app.pool)
        .await
        .expect("rename back");
    // The worker re-sends; this time the secrets load and the line is stored masked.
    w.send(batch(&id, a.lease_token, 2, &[&format!("pw={secret}")]))
        .await;
    w.next_matching(|m| matches!(m, ServerMsg::LogAck(_)).then_some(()))
        .await;
    w.send(batch(&id, a.lease_token, 3, &[&format!("again {secret}")]))
        .await;
    let ack = w
        .next_matching(|m| match m {
            ServerMsg::LogAck(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert_eq!(ack.stored_seq, 3);
    assert_eq!(
        log_texts(&app, &id).await,
        vec!["pw=***", "pw=***", "again ***"]
    );
}

#[tokio::test]
async fn the_api_gives_up_on_a_job_whose_completion_it_keeps_refusing() {
    // Given up after 4 leases of refusals: 8 s here.
    let app = spawn_app_with(|c| c.lease = Duration::from_secs(2)).await;
    refuse_successes(&app.pool, i64::MAX).await;
    let ev = event_id(&app, &bash_event("refused")).await;
    // Giving up is a terminal transition like any other: its on_failure action runs.
    let alert = event_id(&app, &bash_event("alert")).await;
    let (status, body) = app
        .post(
            &format!("/api/v1/events/{ev}/actions"),
            &json!({"trigger": "on_failure", "action": {"type": "run_event", "event_id": alert}}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    // A worker that re-sends its completion whatever it is told (as an old worker would).
    let (mut w, _) = ScriptedWorker::connect(
        &app.grpc_address,
        &app.token(Role::Worker).await,
        hello(Uuid::now_v7(), 1),
    )
    .await;
    let id = app.run_event(&ev, &json!({})).await;
    let a = assignment(&mut w).await;
    let started = tokio::time::Instant::now();
    let lost = loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the api kept the job {}",
            job(&app, &id).await
        );
        w.send(WorkerMsg::Heartbeat(baton_proto::v1::Heartbeat {
            jobs: vec![HeldJob {
                job_id: id.clone(),
                lease_token: a.lease_token,
            }],
            free_slots: 0,
        }))
        .await;
        w.send(WorkerMsg::Finished(Finished {
            job_id: id.clone(),
            lease_token: a.lease_token,
            exit_code: Some(0),
            ..Default::default()
        }))
        .await;
        match w.try_next(Duration::from_millis(300)).await {
            Some(ServerMsg::LeaseLost(l)) => break l,
            Some(ServerMsg::Error(e)) => assert!(e.transient, "{e:?}"),
            _ => {}
        }
    };
    assert_eq!(lost.job_id, id);
    assert!(lost.reason.contains("could not store"), "{lost:?}");
    let j = job(&app, &id).await;
    assert_eq!(
        (j["status"].as_str(), j["error"]["kind"].as_str()),
        (Some("failed"), Some("infrastructure")),
        "{j}"
    );
    assert!(
        j["error"]["message"]
            .as_str()
            .expect("message")
            .contains("injected"),
        "{j}"
    );
    let children: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE parent_job_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .expect("children");
    assert_eq!(children, 1, "the on_failure action ran once");
}
