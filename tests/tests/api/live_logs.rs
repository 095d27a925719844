//! Live logs over SSE and WebSocket: history first, then live lines, then the final status —
//! also for a client on another api replica than the one storing the lines.

use std::time::Duration;

use baton_api::model::Role;
use baton_proto::v1::{Finished, LogBatch, Stream};
use baton_proto::{ServerMsg, WorkerMsg};
use baton_tests::protocol::{ScriptedWorker, hello};
use baton_tests::{TestApp, bash_event, spawn_app, spawn_replica};
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

fn batch(job_id: &str, token: i64, from: i64, to: i64) -> WorkerMsg {
    // As a worker sends lines: one encoded chunk.
    let mut chunk = baton_proto::logchunk::ChunkWriter::default();
    for seq in from..=to {
        chunk.push(Stream::Stdout, 0, &format!("line {seq}"));
    }
    WorkerMsg::Logs(LogBatch {
        job_id: job_id.to_owned(),
        lease_token: token,
        first_seq: from,
        chunk: chunk.into_bytes(),
        ..LogBatch::default()
    })
}

/// Reads SSE events until `n` are collected or the stream ends.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(app: &TestApp, path: &str) -> Self {
        let response = app
            .request(reqwest::Method::GET, path)
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("stream opens");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .expect("ct")
                .starts_with("text/event-stream")
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next (event, data) pair; None when the stream ended.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = e.trim().to_owned();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Some((event, serde_json::from_str(&data).expect("JSON data")));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.response.chunk())
                .await
                .expect("SSE data in time")
                .expect("chunk")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

async fn running_job(app: &TestApp) -> (ScriptedWorker, String, i64) {
    let ev = app.create_event(&bash_event("live")).await;
    let token = app.token(Role::Worker).await;
    let (mut worker, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let a = worker
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    (worker, id, a.lease_token)
}

async fn finish(worker: &mut ScriptedWorker, id: &str, token: i64, last_seq: i64) {
    worker
        .send(WorkerMsg::Finished(Finished {
            job_id: id.to_owned(),
            lease_token: token,
            last_seq,
            exit_code: Some(0),
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

#[tokio::test]
async fn sse_sends_history_then_live_lines_then_the_status() {
    let app = spawn_app().await;
    let (mut worker, id, token) = running_job(&app).await;
    worker.send(batch(&id, token, 1, 3)).await;
    worker
        .next_matching(|m| match m {
            ServerMsg::LogAck(_) => Some(()),
            _ => None,
        })
        .await;

    let mut sse = SseReader::open(&app, &format!("/api/v1/jobs/{id}/logs/stream")).await;
    for seq in 1..=3 {
        let (event, line) = sse.next().await.expect("history line");
        assert_eq!((event.as_str(), line["seq"].as_i64()), ("line", Some(seq)));
    }
    // Live: lines stored after the client connected arrive without polling.
    worker.send(batch(&id, token, 4, 5)).await;
    for seq in 4..=5 {
        let (_, line) = sse.next().await.expect("live line");
        assert_eq!(line["seq"], seq);
        assert_eq!(line["text"], format!("line {seq}"));
    }
    finish(&mut worker, &id, token, 5).await;
    let (event, job) = sse.next().await.expect("status");
    assert_eq!(event, "status");
    assert_eq!(job["status"], "succeeded");
    assert!(
        sse.next().await.is_none(),
        "the stream ends after the status"
    );

    // A client resuming with Last-Event-ID gets only what follows.
    let resumed = app
        .request(
            reqwest::Method::GET,
            &format!("/api/v1/jobs/{id}/logs/stream"),
        )
        .header("last-event-id", "4")
        .send()
        .await
        .expect("stream");
    let mut sse = SseReader {
        response: resumed,
        buffer: String::new(),
    };
    assert_eq!(sse.next().await.expect("line").1["seq"], 5);
    assert_eq!(sse.next().await.expect("status").0, "status");
}

#[tokio::test]
async fn a_client_on_another_replica_sees_the_live_tail() {
    let app = spawn_app().await;
    let other = spawn_replica(app.database_url.clone(), |_| {}).await;
    let (mut worker, id, token) = running_job(&app).await;
    let mut sse = SseReader::open(&other, &format!("/api/v1/jobs/{id}/logs/stream")).await;
    worker.send(batch(&id, token, 1, 2)).await;
    assert_eq!(sse.next().await.expect("line").1["seq"], 1);
    assert_eq!(sse.next().await.expect("line").1["seq"], 2);
    finish(&mut worker, &id, token, 2).await;
    assert_eq!(sse.next().await.expect("status").1["status"], "succeeded");
}

#[tokio::test]
async fn websocket_variant_at_the_same_path() {
    let app = spawn_app().await;
    let (mut worker, id, token) = running_job(&app).await;
    worker.send(batch(&id, token, 1, 2)).await;
    worker
        .next_matching(|m| match m {
            ServerMsg::LogAck(_) => Some(()),
            _ => None,
        })
        .await;

    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!(
        "{}/api/v1/jobs/{id}/logs/stream",
        app.address.replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", app.admin_token)
            .parse()
            .expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket");
    assert_eq!(next_ws(&mut ws).await.expect("line")["seq"], 1);
    assert_eq!(next_ws(&mut ws).await.expect("line")["seq"], 2);
    worker.send(batch(&id, token, 3, 3)).await;
    let live = next_ws(&mut ws).await.expect("live line");
    assert_eq!(
        (live["type"].as_str(), live["seq"].as_i64()),
        (Some("line"), Some(3))
    );
    finish(&mut worker, &id, token, 3).await;
    let status = next_ws(&mut ws).await.expect("status");
    assert_eq!(status["type"], "status");
    assert_eq!(status["job"]["status"], "succeeded");
    let _ = ws.close(None).await;
}

#[tokio::test]
async fn streams_refuse_unknown_jobs_and_bad_cursors() {
    let app = spawn_app().await;
    let (status, _) = app
        .get(&format!("/api/v1/jobs/{}/logs/stream", Uuid::now_v7()))
        .await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    let (status, err) = app
        .get(&format!(
            "/api/v1/jobs/{}/logs/stream?after=x",
            Uuid::now_v7()
        ))
        .await;
    assert_eq!(status, reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["error"]["field"], "after");
    let (status, _) = baton_tests::send(app.anonymous(
        reqwest::Method::GET,
        &format!("/api/v1/jobs/{}/logs/stream", Uuid::now_v7()),
    ))
    .await;
    assert_eq!(status, reqwest::StatusCode::UNAUTHORIZED);
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON text message, or None when the server closed.
async fn next_ws(ws: &mut Ws) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("in time");
        match msg {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                return Some(serde_json::from_str::<Value>(&t).expect("json"));
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | None => return None,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("websocket error {e}"),
        }
    }
}

/// A job nobody will run for a year: a stream on it has nothing to say.
async fn far_future_job(app: &TestApp) -> String {
    let ev = app.create_event(&bash_event("later")).await;
    let run_at = chrono::Utc::now() + chrono::Duration::days(360);
    app.run_event(
        ev["id"].as_str().expect("id"),
        &json!({"run_at": run_at.to_rfc3339()}),
    )
    .await
}

async fn open_ws(app: &TestApp, job_id: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!(
        "{}/api/v1/jobs/{job_id}/logs/stream",
        app.address.replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", app.admin_token)
            .parse()
            .expect("header"),
    );
    tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket")
        .0
}

/// The status of opening an SSE stream with `token` (the stream itself is dropped).
async fn sse_status(app: &TestApp, token: &str, job_id: &str) -> reqwest::StatusCode {
    let response = app
        .request_as(
            token,
            reqwest::Method::GET,
            &format!("/api/v1/jobs/{job_id}/logs/stream"),
        )
        .send()
        .await
        .expect("sent");
    response.status()
}

/// Opens SSE streams until one is accepted (a slot was freed), within `within`.
async fn slot_freed_within(app: &TestApp, job_id: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let status = sse_status(app, &app.admin_token, job_id).await;
        if status == reqwest::StatusCode::OK {
            return;
        }
        assert_eq!(status, reqwest::StatusCode::TOO_MANY_REQUESTS);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream's slot was not freed within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn live_streams_are_bounded_per_token() {
    let app = baton_tests::spawn_app_with(|c| c.streams_per_token = 2).await;
    let id = far_future_job(&app).await;
    let _sse = SseReader::open(&app, &format!("/api/v1/jobs/{id}/logs/stream")).await;
    let _ws = open_ws(&app, &id).await;
    let (status, err) = baton_tests::send(app.request(
        reqwest::Method::GET,
        &format!("/api/v1/jobs/{id}/logs/stream"),
    ))
    .await;
    assert_eq!(status, reqwest::StatusCode::TOO_MANY_REQUESTS, "{err}");
    assert_eq!(err["error"]["code"], "too_many_streams");
    assert!(
        err["error"]["message"]
            .as_str()
            .expect("message")
            .contains("BATON_STREAMS_PER_TOKEN"),
        "{err}"
    );
    // Other tokens have their own slots.
    let viewer = app.token(Role::Viewer).await;
    assert_eq!(
        sse_status(&app, &viewer, &id).await,
        reqwest::StatusCode::OK
    );
}

/// A WebSocket closed by its client frees its slot at once, not at the next line (which for
/// this job would come in a year). Pings every 20 s and the 300 s idle limit are far off.
#[tokio::test]
async fn a_closed_websocket_is_noticed_at_once() {
    let app = baton_tests::spawn_app_with(|c| c.streams_per_token = 1).await;
    let id = far_future_job(&app).await;
    let mut ws = open_ws(&app, &id).await;
    assert_eq!(
        sse_status(&app, &app.admin_token, &id).await,
        reqwest::StatusCode::TOO_MANY_REQUESTS,
        "the WebSocket holds the only slot"
    );
    ws.close(None).await.expect("close sent");
    slot_freed_within(&app, &id, Duration::from_secs(5)).await;
}

/// A WebSocket client that stops answering (never reads, so never pongs) is dropped after two
/// ping intervals.
#[tokio::test]
async fn a_websocket_client_that_stops_answering_pings_is_dropped() {
    let app = baton_tests::spawn_app_with(|c| {
        c.streams_per_token = 1;
        c.stream_ping_interval = Duration::from_millis(200);
    })
    .await;
    let id = far_future_job(&app).await;
    let silent = open_ws(&app, &id).await;
    assert_eq!(
        sse_status(&app, &app.admin_token, &id).await,
        reqwest::StatusCode::TOO_MANY_REQUESTS
    );
    slot_freed_within(&app, &id, Duration::from_secs(10)).await;
    drop(silent);
}

/// A reader for a job that stays queued for a year does not poll for a year: with nothing new
/// for the idle limit the stream ends with an `idle` event saying where to resume.
#[tokio::test]
async fn a_stream_with_nothing_new_ends_when_idle() {
    let app = baton_tests::spawn_app_with(|c| {
        c.stream_idle_timeout = Duration::from_millis(500);
    })
    .await;
    let id = far_future_job(&app).await;
    let mut sse = SseReader::open(&app, &format!("/api/v1/jobs/{id}/logs/stream")).await;
    let (event, data) = sse.next().await.expect("an idle event");
    assert_eq!((event.as_str(), &data), ("idle", &json!({"after": 0})));
    assert!(sse.next().await.is_none(), "the stream ends after it");
    let mut ws = open_ws(&app, &id).await;
    let idle = next_ws(&mut ws).await.expect("idle message");
    assert_eq!(idle, json!({"type": "idle", "after": 0}));
    assert!(next_ws(&mut ws).await.is_none(), "then the socket closes");
}

/// An SSE client that went away frees its slot by the next keep-alive (sent every ping
/// interval), not at the next line.
#[tokio::test]
async fn a_departed_sse_client_frees_its_slot() {
    let app = baton_tests::spawn_app_with(|c| {
        c.streams_per_token = 1;
        c.stream_ping_interval = Duration::from_millis(200);
    })
    .await;
    let id = far_future_job(&app).await;
    let sse = SseReader::open(&app, &format!("/api/v1/jobs/{id}/logs/stream")).await;
    assert_eq!(
        sse_status(&app, &app.admin_token, &id).await,
        reqwest::StatusCode::TOO_MANY_REQUESTS
    );
    drop(sse);
    slot_freed_within(&app, &id, Duration::from_secs(10)).await;
}
