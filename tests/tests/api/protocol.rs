//! The api's side of the worker protocol, driven by a scripted worker: push dispatch within
//! free slots, fencing, cancellation, resumption after a dropped stream, garbage.

use std::time::Duration;

use baton_api::model::Role;
use baton_proto::logchunk::ChunkWriter;
use baton_proto::v1::{
    Drain, ErrorKind, Finished, Heartbeat, HeldJob, LogBatch, LogLine, Progress, Started, Stream,
    WorkerMessage,
};
use baton_proto::{ServerMsg, WorkerMsg};
use baton_tests::protocol::{ScriptedWorker, hello};
use baton_tests::{TestApp, bash_event, spawn_app, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

async fn event_id(app: &TestApp, name: &str) -> String {
    app.create_event(&bash_event(name)).await["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

fn lines(from: i64, to: i64) -> Vec<LogLine> {
    (from..=to)
        .map(|seq| LogLine {
            seq,
            stream: Stream::Stdout as i32,
            text: format!("line {seq}"),
            ts_ms: 1_700_000_000_000 + seq,
        })
        .collect()
}

/// Lines `from..=to` as a worker of this version sends them: one encoded chunk.
fn chunk_batch(job_id: &str, token: i64, from: i64, to: i64) -> LogBatch {
    let mut chunk = ChunkWriter::default();
    for line in lines(from, to) {
        chunk.push(Stream::Stdout, line.ts_ms, &line.text);
    }
    LogBatch {
        job_id: job_id.to_owned(),
        lease_token: token,
        first_seq: from,
        chunk: chunk.into_bytes(),
        ..LogBatch::default()
    }
}

fn finished(job_id: &str, token: i64, last_seq: i64) -> WorkerMsg {
    WorkerMsg::Finished(Finished {
        job_id: job_id.to_owned(),
        lease_token: token,
        last_seq,
        exit_code: Some(0),
        output_json: r#"{"rows": 3}"#.into(),
        condition: Some(true),
        ..Default::default()
    })
}

async fn job(app: &TestApp, id: &str) -> Value {
    let (status, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    job
}

#[tokio::test]
async fn pushes_no_more_than_the_free_slots_and_records_a_full_run() {
    let app = spawn_app().await;
    let ev = event_id(&app, "pushed").await;
    let token = app.token(Role::Worker).await;
    let (mut worker, welcome) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 2)).await;
    assert_eq!(welcome.lease_ms, 15_000);
    assert!(welcome.heartbeat_interval_ms > 0 && welcome.heartbeat_interval_ms < welcome.lease_ms);

    let mut jobs = Vec::new();
    for _ in 0..3 {
        jobs.push(app.run_event(&ev, &json!({"input": {"n": 1}})).await);
    }
    let first = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    let second = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert!(
        worker.try_next(Duration::from_millis(500)).await.is_none(),
        "a third job must wait for a free slot"
    );
    assert!(jobs.contains(&first.job_id) && jobs.contains(&second.job_id));
    let spec: Value = serde_json::from_str(&first.spec_json).expect("spec");
    assert_eq!(spec["content"], "echo hello");
    assert_eq!(
        serde_json::from_str::<Value>(&first.input_json).expect("input"),
        json!({"n": 1})
    );
    let context: Value = serde_json::from_str(&first.context_json).expect("context");
    assert_eq!(context["event"]["job_id"], first.job_id.as_str());
    assert_eq!(context["event"]["event_name"], "pushed");

    let (id, tok) = (first.job_id.clone(), first.lease_token);
    worker
        .send(WorkerMsg::Started(Started {
            job_id: id.clone(),
            lease_token: tok,
        }))
        .await;
    worker
        .send(WorkerMsg::Progress(Progress {
            job_id: id.clone(),
            lease_token: tok,
            percent: 40,
        }))
        .await;
    worker
        .send(WorkerMsg::Logs(LogBatch {
            job_id: id.clone(),
            lease_token: tok,
            lines: lines(1, 3),
            ..LogBatch::default()
        }))
        .await;
    let ack = worker
        .next_matching(|m| match m {
            ServerMsg::LogAck(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert_eq!((ack.job_id.as_str(), ack.stored_seq), (id.as_str(), 3));
    let running = job(&app, &id).await;
    assert_eq!(running["status"], "running");
    assert_eq!(running["progress"], 40);
    worker.send(finished(&id, tok, 3)).await;
    worker
        .next_matching(|m| match m {
            ServerMsg::FinishedAck(a) if a.job_id == id => Some(()),
            _ => None,
        })
        .await;

    let done = job(&app, &id).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["output"], json!({"rows": 3}));
    assert_eq!(done["condition"], true);
    assert_eq!(done["exit_code"], 0);
    assert_eq!(done["worker_id"], worker.worker_id.to_string());
    let (_, logs) = app.get(&format!("/api/v1/jobs/{id}/logs")).await;
    assert_eq!(logs["lines"].as_array().expect("lines").len(), 3);
    assert_eq!(logs["done"], true);

    // The freed slot brings the third job.
    let third = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert!(
        jobs.contains(&third.job_id)
            && third.job_id != first.job_id
            && third.job_id != second.job_id
    );

    let (_, workers) = app.get("/api/v1/workers").await;
    assert_eq!(workers[0]["id"], worker.worker_id.to_string());
    assert_eq!(workers[0]["connected"], true);
}

#[tokio::test]
async fn failures_are_recorded_with_their_kind_and_retried() {
    let app = spawn_app().await;
    let ev = app
        .create_event(
            &json!({"name": "flaky", "runtime": "bash", "content": "exit 3", "executor": "local",
        "max_attempts": 2, "retry_backoff_seconds": 0}),
        )
        .await;
    let token = app.token(Role::Worker).await;
    let (mut worker, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    for attempt in 1..=2 {
        let a = worker
            .next_matching(|m| match m {
                ServerMsg::Assignment(a) => Some(a.clone()),
                _ => None,
            })
            .await;
        assert_eq!((a.job_id.as_str(), a.attempt), (id.as_str(), attempt));
        worker
            .send(WorkerMsg::Finished(Finished {
                job_id: id.clone(),
                lease_token: a.lease_token,
                exit_code: Some(3),
                error_kind: ErrorKind::Script as i32,
                error_message: "exit code 3".into(),
                retryable: true,
                ..Default::default()
            }))
            .await;
        worker
            .next_matching(|m| match m {
                ServerMsg::FinishedAck(_) => Some(()),
                _ => None,
            })
            .await;
    }
    let j = job(&app, &id).await;
    assert_eq!(
        (
            j["status"].as_str(),
            j["attempt"].as_i64(),
            j["dead"].as_bool()
        ),
        (Some("failed"), Some(2), Some(true))
    );
    assert_eq!(
        j["error"],
        json!({"kind": "script", "message": "exit code 3"})
    );
    assert_eq!(j["exit_code"], 3);
}

#[tokio::test]
async fn an_event_can_retry_only_infrastructure_failures() {
    let app = spawn_app().await;
    let ev = app
        .create_event(
            &json!({"name": "strict", "runtime": "bash", "content": "exit 3", "executor": "local",
        "max_attempts": 3, "retry_backoff_seconds": 0, "retry_on": "infrastructure"}),
        )
        .await;
    let token = app.token(Role::Worker).await;
    let (mut worker, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let report = |a: &baton_proto::v1::Assignment, kind: ErrorKind| {
        WorkerMsg::Finished(Finished {
            job_id: a.job_id.clone(),
            lease_token: a.lease_token,
            error_kind: kind as i32,
            error_message: "failed".into(),
            retryable: true,
            ..Default::default()
        })
    };
    // An infrastructure failure is retried...
    let id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let a = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    worker.send(report(&a, ErrorKind::Infrastructure)).await;
    worker
        .next_matching(|m| match m {
            ServerMsg::FinishedAck(f) if f.job_id == id => Some(()),
            _ => None,
        })
        .await;
    // ...a script failure is not.
    let b = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert_eq!((b.job_id.as_str(), b.attempt), (id.as_str(), 2));
    worker.send(report(&b, ErrorKind::Script)).await;
    worker
        .next_matching(|m| match m {
            ServerMsg::FinishedAck(f) if f.job_id == id => Some(()),
            _ => None,
        })
        .await;
    let j = job(&app, &id).await;
    assert_eq!(
        (
            j["status"].as_str(),
            j["attempt"].as_i64(),
            j["dead"].as_bool()
        ),
        (Some("failed"), Some(2), Some(true))
    );
}

#[tokio::test]
async fn stale_tokens_and_unknown_jobs_are_refused_without_harm() {
    let app = spawn_app().await;
    let ev = event_id(&app, "fenced").await;
    let token = app.token(Role::Worker).await;
    let (mut worker, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let id = app.run_event(&ev, &json!({})).await;
    let a = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;

    // A completion with a wrong token: refused, the job is untouched and the worker told.
    worker.send(finished(&id, a.lease_token + 1, 0)).await;
    let lost = worker
        .next_matching(|m| match m {
            ServerMsg::LeaseLost(l) => Some(l.clone()),
            _ => None,
        })
        .await;
    assert_eq!(lost.job_id, id);
    assert_eq!(job(&app, &id).await["status"], "claimed");

    // Unknown job ids and malformed ones get answers, not a broken stream.
    let unknown = Uuid::now_v7().to_string();
    worker
        .send(WorkerMsg::Started(Started {
            job_id: unknown.clone(),
            lease_token: 1,
        }))
        .await;
    let lost = worker
        .next_matching(|m| match m {
            ServerMsg::LeaseLost(l) => Some(l.clone()),
            _ => None,
        })
        .await;
    assert_eq!(lost.job_id, unknown);
    worker
        .send(WorkerMsg::Logs(LogBatch {
            job_id: "not-a-uuid".into(),
            lease_token: 1,
            lines: lines(1, 1),
            ..LogBatch::default()
        }))
        .await;
    let notice = worker
        .next_matching(|m| match m {
            ServerMsg::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert!(notice.message.contains("not a UUID"), "{notice:?}");
    worker
        .send(WorkerMsg::Hello(hello(Uuid::now_v7(), 1)))
        .await;
    worker
        .next_matching(|m| match m {
            ServerMsg::Error(_) => Some(()),
            _ => None,
        })
        .await;
    worker
        .send(WorkerMsg::Logs(LogBatch {
            job_id: id.clone(),
            lease_token: a.lease_token,
            lines: lines(5, 6),
            ..LogBatch::default()
        }))
        .await;
    let gap = worker
        .next_matching(|m| match m {
            ServerMsg::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert!(gap.message.contains("continue at 1"), "{gap:?}");
    // A malformed chunk (a line longer than the bytes left) is refused with a notice, and
    // nothing of it is stored.
    let mut bad = chunk_batch(&id, a.lease_token, 1, 2);
    bad.chunk.truncate(bad.chunk.len() - 1);
    worker.send(WorkerMsg::Logs(bad)).await;
    let malformed = worker
        .next_matching(|m| match m {
            ServerMsg::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert!(
        malformed.message.contains("malformed log batch"),
        "{malformed:?}"
    );
    let mut both = chunk_batch(&id, a.lease_token, 1, 2);
    both.lines = lines(1, 2);
    worker.send(WorkerMsg::Logs(both)).await;
    let both = worker
        .next_matching(|m| match m {
            ServerMsg::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert!(both.message.contains("not both"), "{both:?}");
    let (_, logs) = app.get(&format!("/api/v1/jobs/{id}/logs")).await;
    assert_eq!(logs["lines"], json!([]));

    // The stream still works: the real token completes the job.
    worker.send(finished(&id, a.lease_token, 0)).await;
    worker
        .next_matching(|m| match m {
            ServerMsg::FinishedAck(_) => Some(()),
            _ => None,
        })
        .await;
    assert_eq!(job(&app, &id).await["status"], "succeeded");
}

#[tokio::test]
async fn sessions_need_a_worker_token_and_a_valid_hello() {
    let app = spawn_app().await;
    let viewer = app.token(Role::Viewer).await;
    let worker_token = app.token(Role::Worker).await;
    let hello_msg = |h| WorkerMessage {
        msg: Some(WorkerMsg::Hello(h)),
    };
    let err = ScriptedWorker::open(
        &app.grpc_address,
        "baton_nope",
        hello_msg(hello(Uuid::now_v7(), 1)),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = ScriptedWorker::open(
        &app.grpc_address,
        &viewer,
        hello_msg(hello(Uuid::now_v7(), 1)),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let bad = [
        WorkerMessage {
            msg: Some(WorkerMsg::Drain(Drain {})),
        },
        WorkerMessage { msg: None },
        hello_msg(baton_proto::v1::Hello {
            worker_id: "x".into(),
            ..hello(Uuid::now_v7(), 1)
        }),
        hello_msg(hello(Uuid::now_v7(), 0)),
        hello_msg(baton_proto::v1::Hello {
            executors: vec!["mainframe".into()],
            ..hello(Uuid::now_v7(), 1)
        }),
        hello_msg(baton_proto::v1::Hello {
            executors: vec![],
            ..hello(Uuid::now_v7(), 1)
        }),
    ];
    for first in bad {
        let err = ScriptedWorker::open(&app.grpc_address, &worker_token, first.clone())
            .await
            .err()
            .expect("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{first:?}: {err}");
    }
    // Raw garbage on the port does not hurt the server.
    use tokio::io::AsyncWriteExt;
    let addr = app.grpc_address.trim_start_matches("http://").to_owned();
    let mut raw = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x05\x07\x00garbage-garbage-garbage")
        .await
        .expect("write");
    drop(raw);
    ScriptedWorker::connect(&app.grpc_address, &worker_token, hello(Uuid::now_v7(), 1)).await;
}

#[tokio::test]
async fn cancel_reaches_the_worker_holding_the_job() {
    let app = spawn_app().await;
    let ev = event_id(&app, "cancel-me").await;
    let token = app.token(Role::Worker).await;
    let (mut worker, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let id = app.run_event(&ev, &json!({})).await;
    let a = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    worker
        .send(WorkerMsg::Started(Started {
            job_id: id.clone(),
            lease_token: a.lease_token,
        }))
        .await;
    let (status, body) = app
        .post(&format!("/api/v1/jobs/{id}/cancel"), &Value::Null)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["cancel_requested"], true);
    let cancel = worker
        .next_matching(|m| match m {
            ServerMsg::Cancel(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    assert_eq!(cancel.job_id, id);
    worker
        .send(WorkerMsg::Finished(Finished {
            job_id: id.clone(),
            lease_token: a.lease_token,
            signal: Some(15),
            error_kind: ErrorKind::Cancelled as i32,
            error_message: "cancelled".into(),
            ..Default::default()
        }))
        .await;
    worker
        .next_matching(|m| match m {
            ServerMsg::FinishedAck(_) => Some(()),
            _ => None,
        })
        .await;
    let j = job(&app, &id).await;
    assert_eq!(
        (j["status"].as_str(), j["dead"].as_bool()),
        (Some("cancelled"), Some(false))
    );
}

#[tokio::test]
async fn a_reconnecting_worker_resumes_its_jobs_and_logs_are_stored_once() {
    let app = spawn_app().await;
    let ev = event_id(&app, "resumable").await;
    let token = app.token(Role::Worker).await;
    let worker_id = Uuid::now_v7();
    let (mut worker, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(worker_id, 1)).await;
    let id = app.run_event(&ev, &json!({})).await;
    let a = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    worker
        .send(WorkerMsg::Started(Started {
            job_id: id.clone(),
            lease_token: a.lease_token,
        }))
        .await;
    worker
        .send(WorkerMsg::Logs(LogBatch {
            job_id: id.clone(),
            lease_token: a.lease_token,
            lines: lines(1, 4),
            ..LogBatch::default()
        }))
        .await;
    worker
        .next_matching(|m| match m {
            ServerMsg::LogAck(_) => Some(()),
            _ => None,
        })
        .await;
    drop(worker);

    let mut h = hello(worker_id, 1);
    h.running = vec![HeldJob {
        job_id: id.clone(),
        lease_token: a.lease_token,
    }];
    h.free_slots = 0;
    let (mut worker, welcome) = ScriptedWorker::connect(&app.grpc_address, &token, h).await;
    assert_eq!(welcome.resumed.len(), 1);
    let r = &welcome.resumed[0];
    assert!(r.held && !r.finished);
    assert_eq!(r.stored_seq, 4);
    // The worker re-sends a batch that overlaps what is stored, then the rest (as a chunk,
    // after lines sent one message each: either format continues the other).
    worker
        .send(WorkerMsg::Logs(chunk_batch(&id, a.lease_token, 3, 7)))
        .await;
    let ack = worker
        .next_matching(|m| match m {
            ServerMsg::LogAck(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert_eq!(ack.stored_seq, 7);
    worker
        .send(WorkerMsg::Heartbeat(Heartbeat {
            jobs: vec![HeldJob {
                job_id: id.clone(),
                lease_token: a.lease_token,
            }],
            free_slots: 0,
        }))
        .await;
    worker.send(finished(&id, a.lease_token, 7)).await;
    worker
        .next_matching(|m| match m {
            ServerMsg::FinishedAck(_) => Some(()),
            _ => None,
        })
        .await;
    let (_, logs) = app.get(&format!("/api/v1/jobs/{id}/logs")).await;
    let seqs: Vec<i64> = logs["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| l["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (1..=7).collect::<Vec<_>>(),
        "every line once, in order"
    );
    drop(worker);

    // Reconnecting once more with the finished job: the api says it is recorded.
    let mut h = hello(worker_id, 1);
    h.running = vec![HeldJob {
        job_id: id.clone(),
        lease_token: a.lease_token,
    }];
    let (_worker, welcome) = ScriptedWorker::connect(&app.grpc_address, &token, h).await;
    assert!(welcome.resumed[0].finished && !welcome.resumed[0].held);
}

#[tokio::test]
async fn a_vanished_worker_loses_its_job_to_another() {
    let app = spawn_app_with(|c| {
        c.lease = Duration::from_millis(600);
        c.reaper_interval = Duration::from_millis(100);
    })
    .await;
    let ev = event_id(&app, "orphan").await;
    let token = app.token(Role::Worker).await;
    let (mut first, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let id = app.run_event(&ev, &json!({})).await;
    let a = first
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    first
        .send(WorkerMsg::Started(Started {
            job_id: id.clone(),
            lease_token: a.lease_token,
        }))
        .await;
    // The first worker goes silent (no heartbeats); a second one connects.
    let (mut second, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let b = second
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert_eq!((b.job_id.as_str(), b.attempt), (id.as_str(), 2));
    assert_ne!(b.lease_token, a.lease_token);
    // The first worker's late report is refused; the second's is recorded.
    first.send(finished(&id, a.lease_token, 0)).await;
    first
        .next_matching(|m| match m {
            ServerMsg::LeaseLost(l) if l.job_id == id => Some(()),
            _ => None,
        })
        .await;
    second.send(finished(&id, b.lease_token, 0)).await;
    second
        .next_matching(|m| match m {
            ServerMsg::FinishedAck(_) => Some(()),
            _ => None,
        })
        .await;
    let j = job(&app, &id).await;
    assert_eq!(j["status"], "succeeded");
    assert_eq!(j["worker_id"], second.worker_id.to_string());
}

#[tokio::test]
async fn output_past_the_log_cap_is_counted_not_kept() {
    let app = spawn_app_with(|c| c.log_cap_bytes = 100).await;
    let ev = event_id(&app, "chatty").await;
    let token = app.token(Role::Worker).await;
    let (mut worker, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let id = app.run_event(&ev, &json!({})).await;
    let a = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    // 30 lines of 6-7 bytes: ~14 fit in 100 bytes. The cap is reached inside the second
    // batch; the third is dropped whole, without a second marker.
    for (from, to) in [(1, 10), (11, 20), (21, 30)] {
        worker
            .send(WorkerMsg::Logs(chunk_batch(&id, a.lease_token, from, to)))
            .await;
        worker
            .next_matching(|m| match m {
                ServerMsg::LogAck(_) => Some(()),
                _ => None,
            })
            .await;
    }
    worker.send(finished(&id, a.lease_token, 30)).await;
    worker
        .next_matching(|m| match m {
            ServerMsg::FinishedAck(_) => Some(()),
            _ => None,
        })
        .await;
    let (_, logs) = app.get(&format!("/api/v1/jobs/{id}/logs")).await;
    let stored = logs["lines"].as_array().expect("lines");
    let last = stored.last().expect("a marker");
    assert_eq!(last["stream"], "system");
    assert!(last["text"].as_str().expect("text").contains("truncated"));
    let kept: usize = stored[..stored.len() - 1]
        .iter()
        .map(|l| l["text"].as_str().expect("t").len())
        .sum();
    assert!(kept <= 100 && kept > 80, "kept {kept} bytes");
    let (dropped, stored_seq): (i64, i64) =
        sqlx::query_as("SELECT log_lines_dropped, last_log_seq FROM jobs WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .expect("counts");
    let markers = stored.iter().filter(|l| l["stream"] == "system").count();
    assert_eq!(markers, 1, "one marker: {stored:?}");
    assert_eq!(stored_seq, 30);
    assert_eq!(dropped as usize, 30 - (stored.len() - 1));
}
