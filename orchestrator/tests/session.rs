//! The worker against a small in-test api: a real `WorkerService` (tonic, on 127.0.0.1:0) whose
//! every session is driven by the test, and a real worker running local bash jobs.
//!
//! No bare sleeps: every wait is for a message or a condition, with a generous deadline.
#![allow(clippy::unwrap_used)] // a panic is how a test reports a failure

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use baton_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use baton_proto::v1::{
    Assignment, Cancel, ErrorKind, Finished, FinishedAck, Heartbeat, Hello, LeaseLost, LogAck,
    LogBatch, LogLine, ResumedJob, ServerMessage, Stream as WireStream, Welcome, WorkerMessage,
};
use baton_proto::{ServerMsg, WorkerMsg};
use baton_worker::{Labels, WorkerConfig};
use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

/// Upper bound for anything the tests wait for (normally milliseconds).
const DEADLINE: Duration = Duration::from_secs(30);
const TOKEN: &str = "test-worker-token";
const SLOTS: u32 = 3;

// ------------------------------------------------------------------ the fake api

type ServerStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

/// One session opened by the worker, driven by the test.
struct Conn {
    authorization: Option<String>,
    from_worker: mpsc::UnboundedReceiver<WorkerMessage>,
    to_worker: mpsc::UnboundedSender<Result<ServerMessage, Status>>,
    /// Heartbeats received on this session, in order.
    heartbeats: Vec<Heartbeat>,
}

struct FakeApi {
    conns: mpsc::UnboundedSender<Conn>,
}

#[tonic::async_trait]
impl WorkerService for FakeApi {
    type SessionStream = ServerStream;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut inbound = request.into_inner();
        let (in_tx, from_worker) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                if in_tx.send(msg).is_err() {
                    break; // the test dropped this session
                }
            }
        });
        let (to_worker, out_rx) = mpsc::unbounded_channel();
        let _ = self.conns.send(Conn {
            authorization,
            from_worker,
            to_worker,
            heartbeats: Vec::new(),
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            out_rx,
        ))))
    }
}

impl Conn {
    fn send(&self, msg: ServerMsg) {
        let _ = self.to_worker.send(Ok(ServerMessage { msg: Some(msg) }));
    }

    /// The next message that is not a heartbeat (heartbeats are recorded).
    async fn recv(&mut self) -> WorkerMsg {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.from_worker.recv())
                .await
                .expect("timed out waiting for a message from the worker")
                .expect("the worker closed the session");
            match msg.msg.expect("empty WorkerMessage") {
                WorkerMsg::Heartbeat(hb) => self.heartbeats.push(hb),
                other => return other,
            }
        }
    }

    /// Waits for a heartbeat satisfying `pred`; returns every other message seen meanwhile.
    async fn until_heartbeat(&mut self, pred: impl Fn(&Heartbeat) -> bool) -> Vec<WorkerMsg> {
        let mut others = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.from_worker.recv())
                .await
                .expect("timed out waiting for a heartbeat")
                .expect("the worker closed the session");
            match msg.msg.expect("empty WorkerMessage") {
                WorkerMsg::Heartbeat(hb) => {
                    let ok = pred(&hb);
                    self.heartbeats.push(hb);
                    if ok {
                        return others;
                    }
                }
                other => others.push(other),
            }
        }
    }

    /// Reads `Hello`, answers `Welcome` with `resumed`.
    async fn handshake(&mut self, heartbeat_ms: u32, resumed: Vec<ResumedJob>) -> Hello {
        assert_eq!(
            self.authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        let hello = match self.recv().await {
            WorkerMsg::Hello(hello) => hello,
            other => panic!("expected Hello first, got {other:?}"),
        };
        self.send(ServerMsg::Welcome(Welcome {
            heartbeat_interval_ms: heartbeat_ms,
            lease_ms: 30_000,
            resumed,
            api_id: "fake-api".into(),
        }));
        hello
    }
}

struct Harness {
    conns: mpsc::UnboundedReceiver<Conn>,
    shutdown: Option<oneshot::Sender<()>>,
    worker: JoinHandle<anyhow::Result<()>>,
    server: JoinHandle<()>,
}

impl Harness {
    async fn start(configure: impl FnOnce(&mut WorkerConfig)) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conns_tx, conns) = mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(WorkerServiceServer::new(FakeApi { conns: conns_tx }))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        let mut config = WorkerConfig::new(format!("http://{addr}"), TOKEN);
        config.name = Some("test-worker".into());
        config.slots = SLOTS;
        config.allow_local = true;
        config.no_container = true;
        config.labels = Labels::from_pairs([("zone", "a")]);
        configure(&mut config);
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let worker = tokio::spawn(baton_worker::run(config, async {
            let _ = shutdown_rx.await;
        }));
        Harness {
            conns,
            shutdown: Some(shutdown_tx),
            worker,
            server,
        }
    }

    async fn conn(&mut self) -> Conn {
        tokio::time::timeout(DEADLINE, self.conns.recv())
            .await
            .expect("timed out waiting for the worker to connect")
            .expect("server gone")
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    async fn join(mut self) {
        self.shutdown();
        tokio::time::timeout(DEADLINE, &mut self.worker)
            .await
            .expect("the worker did not stop")
            .expect("worker task panicked")
            .expect("the worker failed");
        self.server.abort();
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.worker.abort();
        self.server.abort();
    }
}

// ------------------------------------------------------------------ jobs

fn assignment(job_id: Uuid, lease: i64, script: &str, env: &[(&str, &str)]) -> Assignment {
    let env: HashMap<&str, &str> = env.iter().copied().collect();
    Assignment {
        job_id: job_id.to_string(),
        lease_token: lease,
        event_id: Uuid::now_v7().to_string(),
        attempt: 1,
        spec_json: serde_json::json!({
            "name": "test event",
            "runtime": "bash",
            "content": script,
            "executor": "local",
            "env": env,
            "timeout_seconds": 120,
        })
        .to_string(),
        input_json: r#"{"n":1}"#.into(),
        root_job_id: job_id.to_string(),
        context_json: serde_json::json!({
            "event": {"job_id": job_id, "event_name": "test event", "attempt": 1},
            "variables": {"greeting": "hello"},
        })
        .to_string(),
        ..Assignment::default()
    }
}

/// `batch` with its chunk decoded into `lines` (one `LogLine` each, numbered from
/// `first_seq`), so tests look at lines whatever format the worker sent them in.
fn decoded(batch: LogBatch) -> LogBatch {
    let mut lines = batch.lines;
    for (seq, line) in (batch.first_seq..).zip(baton_proto::logchunk::lines(&batch.chunk)) {
        let line = line.expect("the worker sent a malformed chunk");
        lines.push(LogLine {
            seq,
            stream: line.stream as i32,
            text: line.text.to_owned(),
            ts_ms: line.ts_ms,
        });
    }
    LogBatch {
        lines,
        chunk: Vec::new(),
        ..batch
    }
}

/// Log lines and the `Finished` of one job, as received.
#[derive(Default)]
struct Received {
    started: usize,
    batches: Vec<LogBatch>,
    progress: Vec<u32>,
    finished: Option<Finished>,
}

impl Received {
    fn lines(&self) -> Vec<&LogLine> {
        self.batches.iter().flat_map(|b| b.lines.iter()).collect()
    }
    fn texts(&self) -> Vec<&str> {
        self.lines().iter().map(|l| l.text.as_str()).collect()
    }
    fn last_seq(&self) -> i64 {
        self.lines().last().map_or(0, |l| l.seq)
    }
}

/// Reads messages about `job` until `stop` says so; acknowledges batches when `ack` is true.
async fn receive(
    conn: &mut Conn,
    job: Uuid,
    got: &mut Received,
    ack: bool,
    stop: impl Fn(&Received) -> bool,
) {
    let id = job.to_string();
    while !stop(got) {
        match conn.recv().await {
            WorkerMsg::Started(s) => {
                assert_eq!(s.job_id, id);
                got.started += 1;
            }
            WorkerMsg::Logs(batch) => {
                let batch = decoded(batch);
                assert_eq!(batch.job_id, id);
                assert!(!batch.lines.is_empty(), "empty batch");
                if ack {
                    conn.send(ServerMsg::LogAck(LogAck {
                        job_id: id.clone(),
                        stored_seq: batch.lines.last().unwrap().seq,
                    }));
                }
                got.batches.push(batch);
            }
            WorkerMsg::Progress(p) => {
                assert_eq!(p.job_id, id);
                got.progress.push(p.percent);
            }
            WorkerMsg::Finished(f) => {
                assert_eq!(f.job_id, id);
                got.finished = Some(f);
            }
            other => panic!("unexpected message {other:?}"),
        }
    }
}

fn ack_finished(conn: &Conn, job: Uuid) {
    conn.send(ServerMsg::FinishedAck(FinishedAck {
        job_id: job.to_string(),
    }));
}

fn assert_contiguous(lines: &[&LogLine], first: i64) {
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            line.seq,
            first + i as i64,
            "sequence numbers must be contiguous"
        );
    }
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn process_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn runs_a_job_and_reports_everything() {
    let mut h = Harness::start(|_| {}).await;
    let mut conn = h.conn().await;
    let hello = conn.handshake(50, vec![]).await;
    assert_eq!(
        Uuid::parse_str(&hello.worker_id).unwrap().get_version_num(),
        7
    );
    assert_eq!(hello.name, "test-worker");
    assert_eq!(hello.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(hello.executors, vec!["local".to_owned(), "ssh".to_owned()]);
    assert_eq!((hello.slots, hello.free_slots), (SLOTS, SLOTS));
    assert!(hello.running.is_empty());
    assert!(!hello.version.is_empty() && !hello.hostname.is_empty());

    let job = Uuid::now_v7();
    let script = r#"
source baton.sh
echo "dir: $BATON_DIR"
echo "input: $(baton_input)"
echo "greeting: $(baton_get_variable greeting)"
baton_event | grep -q '"event_name":"test event"' && echo "event ok"
for i in $(seq 1 25000); do echo "line $i"; done
echo "to stderr" >&2
baton_progress 50
baton_progress 50
baton_output '{"rows": 3}'
baton_set_variable last_id 42
baton_set_condition true
"#;
    conn.send(ServerMsg::Assignment(assignment(job, 11, script, &[])));
    let mut got = Received::default();
    receive(&mut conn, job, &mut got, true, |g| g.finished.is_some()).await;

    assert_eq!(got.started, 1);
    let lines = got.lines();
    assert_contiguous(&lines, 1);
    assert!(
        got.batches.len() >= 3,
        "25 000 lines come in several batches"
    );
    assert!(got.batches.iter().all(|b| b.lease_token == 11));
    let texts = got.texts();
    assert_eq!(texts[1], r#"input: {"n":1}"#);
    assert_eq!(texts[2], "greeting: hello");
    assert_eq!(texts[3], "event ok");
    let numbered: Vec<&str> = texts
        .iter()
        .copied()
        .filter(|t| t.starts_with("line "))
        .collect();
    assert_eq!(numbered.len(), 25_000);
    assert!(
        numbered
            .iter()
            .enumerate()
            .all(|(i, t)| *t == format!("line {}", i + 1))
    );
    let stderr: Vec<&&LogLine> = lines
        .iter()
        .filter(|l| l.stream == WireStream::Stderr as i32)
        .collect();
    assert_eq!(stderr.len(), 1);
    assert_eq!(stderr[0].text, "to stderr");
    assert!(lines.iter().all(|l| l.ts_ms > 0));
    assert_eq!(got.progress, vec![50], "progress is sent once per change");

    let f = got.finished.as_ref().unwrap();
    assert_eq!(f.error_kind, ErrorKind::Unspecified as i32, "{f:?}");
    assert_eq!(f.lease_token, 11);
    assert_eq!(f.last_seq, got.last_seq());
    assert_eq!(f.exit_code, Some(0));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&f.output_json).unwrap(),
        serde_json::json!({"rows": 3})
    );
    assert_eq!(f.condition, Some(true));
    assert_eq!(f.variables.get("last_id").map(String::as_str), Some("42"));
    assert_eq!(f.variables.len(), 1);

    // the run directory is removed after the run
    let dir = PathBuf::from(texts[0].strip_prefix("dir: ").unwrap());
    wait_for("the run directory to be removed", || !dir.exists()).await;

    // until FinishedAck the job is held; then it is forgotten and the slot is free
    let jid = job.to_string();
    conn.until_heartbeat(|hb| hb.jobs.iter().any(|j| j.job_id == jid) && hb.free_slots == SLOTS)
        .await;
    conn.send(ServerMsg::FinishedAck(FinishedAck {
        job_id: job.to_string(),
    }));
    let others = conn.until_heartbeat(|hb| hb.jobs.is_empty()).await;
    assert!(others.is_empty(), "{others:?}");

    h.shutdown();
    assert!(matches!(conn.recv().await, WorkerMsg::Drain(_)));
    h.join().await;
}

#[tokio::test]
async fn failures_and_bad_outputs() {
    let mut h = Harness::start(|c| c.max_output_bytes = 1000).await;
    let mut conn = h.conn().await;
    conn.handshake(60_000, vec![]).await;

    // not offered here: finished at once, without Started
    let job = Uuid::now_v7();
    let mut a = assignment(job, 1, "echo hi", &[]);
    a.spec_json =
        serde_json::json!({"runtime": "bash", "content": "echo hi", "executor": "container"})
            .to_string();
    conn.send(ServerMsg::Assignment(a));
    let mut got = Received::default();
    receive(&mut conn, job, &mut got, true, |g| g.finished.is_some()).await;
    let f = got.finished.clone().unwrap();
    assert_eq!(got.started, 0);
    assert_eq!(f.error_kind, ErrorKind::Infrastructure as i32);
    assert!(f.retryable);
    assert!(
        f.error_message.contains("`container`"),
        "{}",
        f.error_message
    );
    assert_eq!(f.last_seq, 0);
    ack_finished(&conn, job);

    // a script error keeps its reason even with a bad output; the output problem is logged
    let job = Uuid::now_v7();
    let script = "source baton.sh; baton_output 'nope'; exit 3";
    conn.send(ServerMsg::Assignment(assignment(job, 2, script, &[])));
    let mut got = Received::default();
    receive(&mut conn, job, &mut got, true, |g| g.finished.is_some()).await;
    let f = got.finished.clone().unwrap();
    assert_eq!(f.error_kind, ErrorKind::Script as i32);
    // It exits at once: within the event's startup window (5 s by default), a start failure.
    assert_eq!(
        f.error_message,
        "failed to start: the run ended with exit code 3 within its startup window of 5 s"
    );
    assert!(f.start_failure);
    assert_eq!(f.exit_code, Some(3));
    assert!(f.retryable);
    assert!(f.output_json.is_empty());
    let system: Vec<&LogLine> = got
        .lines()
        .into_iter()
        .filter(|l| l.stream == WireStream::System as i32)
        .collect();
    assert_eq!(system.len(), 1);
    assert!(system[0].text.contains("output.json is not valid JSON"));
    assert_eq!(f.last_seq, system[0].seq);
    ack_finished(&conn, job);

    // a successful run with an invalid or oversized output fails with kind OUTPUT
    for (script, message) in [
        (
            "source baton.sh; baton_output 'x'",
            "output.json is not valid JSON: expected value at line 1 column 1",
        ),
        (
            r#"source baton.sh; baton_output "\"$(head -c 2000 /dev/zero | tr '\0' x)\"""#,
            "output is 2002 bytes, over the 1000-byte limit",
        ),
        (
            r#"mkdir -p "$BATON_DIR/out"; printf maybe > "$BATON_DIR/out/condition""#,
            "condition must be `true` or `false`, not `maybe`",
        ),
    ] {
        let job = Uuid::now_v7();
        conn.send(ServerMsg::Assignment(assignment(job, 3, script, &[])));
        let mut got = Received::default();
        receive(&mut conn, job, &mut got, true, |g| g.finished.is_some()).await;
        let f = got.finished.clone().unwrap();
        assert_eq!(f.error_kind, ErrorKind::Output as i32, "{f:?}");
        assert_eq!(f.error_message, message);
        assert!(!f.retryable);
        assert_eq!(f.exit_code, Some(0));
        ack_finished(&conn, job);
    }
    h.join().await;
}

#[tokio::test]
async fn reconnects_and_resends_what_was_not_stored() {
    let dir = scratch();
    let go = dir.path().join("go");
    let done = dir.path().join("done");
    let mut h = Harness::start(|_| {}).await;
    let mut conn = h.conn().await;
    conn.handshake(60_000, vec![]).await;

    let job = Uuid::now_v7();
    let script = r#"
for i in 1 2 3 4 5; do echo "a$i"; done
while [ ! -e "$GO" ]; do sleep 0.01; done
for i in 1 2 3; do echo "b$i"; done
source baton.sh; baton_output '{"ok": true}'
touch "$DONE"
"#;
    conn.send(ServerMsg::Assignment(assignment(
        job,
        7,
        script,
        &[
            ("GO", go.to_str().unwrap()),
            ("DONE", done.to_str().unwrap()),
        ],
    )));
    let mut got = Received::default();
    receive(&mut conn, job, &mut got, false, |g| g.last_seq() >= 5).await;
    assert_eq!(got.texts(), vec!["a1", "a2", "a3", "a4", "a5"]);
    // the api stores only lines 1 and 2, then the stream breaks
    conn.send(ServerMsg::LogAck(LogAck {
        job_id: job.to_string(),
        stored_seq: 2,
    }));
    drop(conn);

    // the worker reconnects and lists the job it still runs
    let mut conn = h.conn().await;
    let hello = match conn.recv().await {
        WorkerMsg::Hello(hello) => hello,
        other => panic!("expected Hello, got {other:?}"),
    };
    assert_eq!(hello.running.len(), 1);
    assert_eq!(hello.running[0].job_id, job.to_string());
    assert_eq!(hello.running[0].lease_token, 7);
    assert_eq!(hello.free_slots, SLOTS - 1);

    // while the worker waits for Welcome, the job goes on, ends, and is buffered
    std::fs::write(&go, "").unwrap();
    wait_for("the script to end", || done.exists()).await;
    conn.send(ServerMsg::Welcome(Welcome {
        heartbeat_interval_ms: 60_000,
        lease_ms: 30_000,
        resumed: vec![ResumedJob {
            job_id: job.to_string(),
            held: true,
            stored_seq: 2,
            finished: false,
        }],
        api_id: "fake-api-2".into(),
    }));
    let mut again = Received::default();
    receive(&mut conn, job, &mut again, true, |g| g.finished.is_some()).await;
    let lines = again.lines();
    assert_contiguous(&lines, 3);
    assert_eq!(again.texts(), vec!["a3", "a4", "a5", "b1", "b2", "b3"]);
    let f = again.finished.clone().unwrap();
    assert_eq!(f.last_seq, 8);
    assert_eq!(f.error_kind, ErrorKind::Unspecified as i32);
    assert_eq!(f.output_json, r#"{"ok": true}"#);

    // the FinishedAck is lost with the stream: Finished is sent again after the next Welcome
    drop(conn);
    let mut conn = h.conn().await;
    let hello = conn
        .handshake(
            50,
            vec![ResumedJob {
                job_id: job.to_string(),
                held: true,
                stored_seq: 8,
                finished: false,
            }],
        )
        .await;
    assert_eq!(hello.running.len(), 1);
    assert_eq!(hello.free_slots, SLOTS, "a finished job holds no slot");
    let mut third = Received::default();
    receive(&mut conn, job, &mut third, true, |g| g.finished.is_some()).await;
    assert!(third.batches.is_empty(), "every line was stored");
    assert_eq!(third.finished.unwrap(), f);
    conn.send(ServerMsg::FinishedAck(FinishedAck {
        job_id: job.to_string(),
    }));
    let others = conn.until_heartbeat(|hb| hb.jobs.is_empty()).await;
    assert!(others.is_empty(), "{others:?}");

    // a reconnect after that has nothing to resume
    drop(conn);
    let mut conn = h.conn().await;
    let hello = conn.handshake(60_000, vec![]).await;
    assert!(hello.running.is_empty());
    h.join().await;
}

#[tokio::test]
async fn a_completion_already_recorded_is_forgotten_on_resume() {
    let mut h = Harness::start(|_| {}).await;
    let mut conn = h.conn().await;
    conn.handshake(60_000, vec![]).await;
    let job = Uuid::now_v7();
    conn.send(ServerMsg::Assignment(assignment(job, 5, "echo one", &[])));
    let mut got = Received::default();
    receive(&mut conn, job, &mut got, false, |g| g.finished.is_some()).await;
    drop(conn);

    let mut conn = h.conn().await;
    conn.handshake(
        50,
        vec![ResumedJob {
            job_id: job.to_string(),
            held: true,
            stored_seq: 1,
            finished: true,
        }],
    )
    .await;
    let others = conn.until_heartbeat(|hb| hb.jobs.is_empty()).await;
    assert!(others.is_empty(), "nothing is re-sent: {others:?}");
    h.join().await;
}

#[tokio::test]
async fn cancel_reports_cancelled_within_a_second() {
    let mut h = Harness::start(|_| {}).await;
    let mut conn = h.conn().await;
    conn.handshake(60_000, vec![]).await;
    let job = Uuid::now_v7();
    conn.send(ServerMsg::Assignment(assignment(
        job,
        3,
        "echo started; sleep 60; echo never",
        &[],
    )));
    let mut got = Received::default();
    receive(&mut conn, job, &mut got, true, |g| g.last_seq() >= 1).await;
    let asked = Instant::now();
    conn.send(ServerMsg::Cancel(Cancel {
        job_id: job.to_string(),
        reason: "user asked".into(),
        force: false,
    }));
    receive(&mut conn, job, &mut got, true, |g| g.finished.is_some()).await;
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    let f = got.finished.clone().unwrap();
    assert_eq!(f.error_kind, ErrorKind::Cancelled as i32, "{f:?}");
    assert!(!f.retryable);
    assert_eq!(got.texts(), vec!["started"]);
    assert_eq!(f.last_seq, 1);
    ack_finished(&conn, job);
    h.join().await;
}

#[tokio::test]
async fn lease_lost_stops_the_run_and_says_nothing_more() {
    let dir = scratch();
    let pid_file = dir.path().join("pid");
    let mut h = Harness::start(|_| {}).await;
    let mut conn = h.conn().await;
    conn.handshake(50, vec![]).await;
    let job = Uuid::now_v7();
    let script = r#"echo $$ > "$PID_FILE"; while true; do echo tick; sleep 0.01; done"#;
    conn.send(ServerMsg::Assignment(assignment(
        job,
        9,
        script,
        &[("PID_FILE", pid_file.to_str().unwrap())],
    )));
    let mut got = Received::default();
    receive(&mut conn, job, &mut got, true, |g| g.last_seq() >= 3).await;
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(process_alive(pid));

    conn.send(ServerMsg::LeaseLost(LeaseLost {
        job_id: job.to_string(),
        reason: "another worker holds it".into(),
    }));
    // Messages queued before the worker handled LeaseLost may still arrive; once a heartbeat
    // no longer lists the job, nothing about it may follow.
    let jid = job.to_string();
    let before = conn
        .until_heartbeat(|hb| !hb.jobs.iter().any(|j| j.job_id == jid))
        .await;
    assert!(
        before.iter().all(|m| matches!(m, WorkerMsg::Logs(_))),
        "{before:?}"
    );
    // the process is killed and its slot freed; a few more heartbeats bring nothing about it
    let after = conn.until_heartbeat(|hb| hb.free_slots == SLOTS).await;
    assert!(after.is_empty(), "{after:?}");
    for _ in 0..3 {
        let after = conn.until_heartbeat(|_| true).await;
        assert!(after.is_empty(), "{after:?}");
    }
    wait_for("the process to be killed", || !process_alive(pid)).await;

    // a job the api reports lost while the worker was away is stopped and forgotten too
    let job2 = Uuid::now_v7();
    let pid_file2 = dir.path().join("pid2");
    conn.send(ServerMsg::Assignment(assignment(
        job2,
        10,
        script,
        &[("PID_FILE", pid_file2.to_str().unwrap())],
    )));
    let mut got2 = Received::default();
    receive(&mut conn, job2, &mut got2, true, |g| g.last_seq() >= 1).await;
    let pid2: i32 = std::fs::read_to_string(&pid_file2)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    drop(conn);
    let mut conn = h.conn().await;
    let hello = conn
        .handshake(
            50,
            vec![ResumedJob {
                job_id: job2.to_string(),
                held: false,
                stored_seq: 0,
                finished: false,
            }],
        )
        .await;
    assert_eq!(hello.running.len(), 1);
    let after = conn
        .until_heartbeat(|hb| hb.jobs.is_empty() && hb.free_slots == SLOTS)
        .await;
    assert!(after.is_empty(), "{after:?}");
    wait_for("the second process to be killed", || !process_alive(pid2)).await;
    h.join().await;
}

#[tokio::test]
async fn unacknowledged_logs_hold_the_process_back() {
    let dir = scratch();
    let done = dir.path().join("done");
    let limit = 64 * 1024;
    let mut h = Harness::start(|c| c.max_unacked_log_bytes = limit).await;
    let mut conn = h.conn().await;
    conn.handshake(50, vec![]).await;
    let job = Uuid::now_v7();
    // 20 000 lines of 100 bytes: far more than the limit, the channel and the pipe together
    let script = r#"
line=$(printf '%0100d' 0)
for i in $(seq 1 20000); do echo "$line"; done
touch "$DONE"
"#;
    conn.send(ServerMsg::Assignment(assignment(
        job,
        4,
        script,
        &[("DONE", done.to_str().unwrap())],
    )));
    // acknowledge nothing: the worker must stop sending after about `limit` bytes
    let mut got = Received::default();
    // What the worker counts against the limit: encoded bytes plus an overhead per line.
    let mut sent = 0usize;
    let deadline = Instant::now() + DEADLINE;
    let mut quiet_heartbeats = 0;
    while quiet_heartbeats < 10 {
        assert!(
            Instant::now() < deadline,
            "the worker never went quiet ({sent} bytes sent)"
        );
        let before = got.batches.len();
        for msg in conn.until_heartbeat(|_| true).await {
            match msg {
                WorkerMsg::Logs(b) => {
                    sent += b.chunk.len();
                    let b = decoded(b);
                    sent += b.lines.len() * baton_worker::logbook::LINE_OVERHEAD_BYTES;
                    got.batches.push(b);
                }
                WorkerMsg::Started(_) => got.started += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        if got.batches.len() == before && sent > limit {
            quiet_heartbeats += 1;
        } else {
            quiet_heartbeats = 0;
        }
    }
    assert!(sent > limit, "sends up to the limit ({sent})");
    assert!(
        sent <= limit + 256 * 1024,
        "stops soon after the limit ({sent})"
    );
    assert!(got.last_seq() < 20_000);
    assert!(!done.exists(), "the process is held back by its pipe");

    // acknowledgements let the rest through
    conn.send(ServerMsg::LogAck(LogAck {
        job_id: job.to_string(),
        stored_seq: got.last_seq(),
    }));
    receive(&mut conn, job, &mut got, true, |g| g.finished.is_some()).await;
    let lines = got.lines();
    assert_eq!(lines.len(), 20_000);
    assert_contiguous(&lines, 1);
    let f = got.finished.clone().unwrap();
    assert_eq!(f.error_kind, ErrorKind::Unspecified as i32);
    assert_eq!(f.last_seq, 20_000);
    ack_finished(&conn, job);
    h.join().await;
}

#[tokio::test]
async fn shutdown_drains_running_jobs() {
    let dir = scratch();
    let go = dir.path().join("go");
    let mut h = Harness::start(|c| c.drain_timeout = Duration::from_secs(60)).await;
    let mut conn = h.conn().await;
    conn.handshake(60_000, vec![]).await;
    let job = Uuid::now_v7();
    let script = r#"echo waiting; while [ ! -e "$GO" ]; do sleep 0.01; done; echo done"#;
    conn.send(ServerMsg::Assignment(assignment(
        job,
        1,
        script,
        &[("GO", go.to_str().unwrap())],
    )));
    let mut got = Received::default();
    receive(&mut conn, job, &mut got, true, |g| g.last_seq() >= 1).await;

    h.shutdown();
    assert!(matches!(conn.recv().await, WorkerMsg::Drain(_)));

    // an assignment that arrives anyway is not run
    let late = Uuid::now_v7();
    conn.send(ServerMsg::Assignment(assignment(late, 2, "echo no", &[])));
    let mut refused = Received::default();
    receive(&mut conn, late, &mut refused, true, |g| {
        g.finished.is_some()
    })
    .await;
    let f = refused.finished.unwrap();
    assert_eq!(refused.started, 0);
    assert_eq!(f.error_kind, ErrorKind::Infrastructure as i32);
    assert_eq!(f.error_message, "worker draining");
    assert!(f.retryable);
    conn.send(ServerMsg::FinishedAck(FinishedAck {
        job_id: late.to_string(),
    }));

    // the running job finishes normally; the worker exits once its completion is acknowledged
    std::fs::write(&go, "").unwrap();
    receive(&mut conn, job, &mut got, true, |g| g.finished.is_some()).await;
    assert_eq!(
        got.finished.as_ref().unwrap().error_kind,
        ErrorKind::Unspecified as i32
    );
    assert!(!h.worker.is_finished());
    conn.send(ServerMsg::FinishedAck(FinishedAck {
        job_id: job.to_string(),
    }));
    h.join().await;
}

#[tokio::test]
async fn drain_timeout_cancels_what_is_still_running() {
    let mut h = Harness::start(|c| c.drain_timeout = Duration::from_millis(200)).await;
    let mut conn = h.conn().await;
    conn.handshake(60_000, vec![]).await;
    let job = Uuid::now_v7();
    conn.send(ServerMsg::Assignment(assignment(
        job,
        1,
        "echo up; sleep 60",
        &[],
    )));
    let mut got = Received::default();
    receive(&mut conn, job, &mut got, true, |g| g.last_seq() >= 1).await;
    h.shutdown();
    assert!(matches!(conn.recv().await, WorkerMsg::Drain(_)));
    receive(&mut conn, job, &mut got, true, |g| g.finished.is_some()).await;
    assert_eq!(
        got.finished.as_ref().unwrap().error_kind,
        ErrorKind::Cancelled as i32
    );
    conn.send(ServerMsg::FinishedAck(FinishedAck {
        job_id: job.to_string(),
    }));
    h.join().await;
}

#[tokio::test]
async fn keeps_trying_to_connect() {
    // The first connections are dropped at once: the worker retries until a session opens.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = WorkerConfig::new(format!("http://{addr}"), TOKEN);
    config.allow_local = true;
    config.no_container = true;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let worker = tokio::spawn(baton_worker::run(config, async {
        let _ = shutdown_rx.await;
    }));
    for _ in 0..3 {
        let (socket, _) = tokio::time::timeout(DEADLINE, listener.accept())
            .await
            .expect("the worker did not try again")
            .unwrap();
        drop(socket);
    }
    let (conns_tx, mut conns) = mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(FakeApi { conns: conns_tx }))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let mut conn = tokio::time::timeout(DEADLINE, conns.recv())
        .await
        .expect("the worker did not reconnect")
        .unwrap();
    conn.handshake(50, vec![]).await;
    // a heartbeat shows the session is established
    conn.until_heartbeat(|_| true).await;
    let _ = shutdown_tx.send(());
    assert!(matches!(conn.recv().await, WorkerMsg::Drain(_)));
    tokio::time::timeout(DEADLINE, worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    server.abort();
}

#[tokio::test]
async fn large_output_streams_in_large_batches() {
    let mut h = Harness::start(|_| {}).await;
    let mut conn = h.conn().await;
    conn.handshake(60_000, vec![]).await;
    let job = Uuid::now_v7();
    let mb: usize = std::env::var("BATON_TEST_OUTPUT_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    // `mb` MiB of 1 KiB lines (1023 characters + newline)
    let script = format!("head -c {} /dev/zero | tr '\\0' x | fold -w 1023", mb << 20);
    let started = Instant::now();
    conn.send(ServerMsg::Assignment(assignment(job, 1, &script, &[])));
    let id = job.to_string();
    let (mut lines, mut batches, mut bytes, mut next_seq) = (0usize, 0usize, 0usize, 1i64);
    let finished = loop {
        match conn.recv().await {
            WorkerMsg::Started(_) | WorkerMsg::Progress(_) => {}
            WorkerMsg::Logs(batch) => {
                let batch = decoded(batch);
                for line in &batch.lines {
                    assert_eq!(line.seq, next_seq);
                    next_seq += 1;
                    bytes += line.text.len();
                }
                lines += batch.lines.len();
                batches += 1;
                conn.send(ServerMsg::LogAck(LogAck {
                    job_id: id.clone(),
                    stored_seq: next_seq - 1,
                }));
            }
            WorkerMsg::Finished(f) => break f,
            other => panic!("unexpected {other:?}"),
        }
    };
    let took = started.elapsed();
    println!(
        "{mb} MiB in {lines} lines, {batches} batches, {:.2} s, {:.0} MiB/s",
        took.as_secs_f64(),
        mb as f64 / took.as_secs_f64()
    );
    assert_eq!(finished.error_kind, ErrorKind::Unspecified as i32);
    assert_eq!(bytes, mb << 20);
    assert_eq!(finished.last_seq, lines as i64);
    // 1 KiB lines: a full batch (256 KiB) has about 250 of them. A slow producer (a loaded
    // machine) also closes batches at the 20 ms deadline, so only demand clearly large ones.
    assert!(lines / batches >= 25, "{lines} lines in {batches} batches");
    ack_finished(&conn, job);
    h.join().await;
}

/// A fake api on `listener`; its sessions arrive on the returned channel.
fn serve_fake_api(listener: TcpListener) -> (JoinHandle<()>, mpsc::UnboundedReceiver<Conn>) {
    let (conns_tx, conns) = mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(FakeApi { conns: conns_tx }))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (server, conns)
}

async fn next_conn(conns: &mut mpsc::UnboundedReceiver<Conn>, what: &str) -> Conn {
    tokio::time::timeout(DEADLINE, conns.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("server gone")
}

#[tokio::test]
async fn moves_on_to_the_next_api_url_keeping_its_job() {
    let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let urls = format!(
        "http://{}, http://{}",
        first.local_addr().unwrap(),
        second.local_addr().unwrap()
    );
    let (first_server, mut first_conns) = serve_fake_api(first);
    let (second_server, mut second_conns) = serve_fake_api(second);
    let mut config = WorkerConfig::new(urls, TOKEN);
    config.allow_local = true;
    config.no_container = true;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let worker = tokio::spawn(baton_worker::run(config, async {
        let _ = shutdown_rx.await;
    }));

    // The first URL first; a job runs through it.
    let mut conn = next_conn(&mut first_conns, "a session with the first URL").await;
    conn.handshake(60_000, vec![]).await;
    let dir = scratch();
    let go = dir.path().join("go");
    let job = Uuid::now_v7();
    conn.send(ServerMsg::Assignment(assignment(
        job,
        11,
        "echo one; while [ ! -e \"$GO\" ]; do sleep 0.01; done; echo two",
        &[("GO", go.to_str().unwrap())],
    )));
    let mut got = Received::default();
    receive(&mut conn, job, &mut got, true, |g| g.last_seq() >= 1).await;

    // That replica dies: its session ends and its port refuses connections from now on.
    first_server.abort();
    drop(conn);
    let died = Instant::now();
    let mut conn = next_conn(&mut second_conns, "a session with the second URL").await;
    let hello = conn
        .handshake(
            60_000,
            vec![ResumedJob {
                job_id: job.to_string(),
                held: true,
                stored_seq: 1,
                finished: false,
            }],
        )
        .await;
    let moved = died.elapsed();
    assert!(
        moved < Duration::from_secs(2),
        "moving to the second URL took {moved:?}"
    );
    assert_eq!(hello.running.len(), 1, "the worker kept its job");
    assert_eq!(hello.running[0].job_id, job.to_string());

    // The second ends its session too: the worker tries the first (refused) and comes back.
    drop(conn);
    let mut conn = next_conn(&mut second_conns, "a session with the second URL again").await;
    let hello = conn
        .handshake(
            60_000,
            vec![ResumedJob {
                job_id: job.to_string(),
                held: true,
                stored_seq: 1,
                finished: false,
            }],
        )
        .await;
    assert_eq!(hello.running.len(), 1, "the worker still holds its job");
    std::fs::write(&go, "").unwrap();
    let mut rest = Received::default();
    receive(&mut conn, job, &mut rest, true, |g| g.finished.is_some()).await;
    assert_eq!(
        rest.texts(),
        vec!["two"],
        "line 1 was stored: not sent again"
    );
    assert!(
        first_conns.try_recv().is_err(),
        "the dead replica got nothing"
    );
    ack_finished(&conn, job);
    let _ = shutdown_tx.send(());
    tokio::time::timeout(DEADLINE, worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    second_server.abort();
}
