//! A scripted worker for protocol tests: it speaks the worker gRPC protocol message by message,
//! so a test decides exactly what the api sees (stale tokens, dropped streams, garbage).

use std::collections::HashMap;
use std::time::Duration;

use baton_proto::v1::worker_service_client::WorkerServiceClient;
use baton_proto::v1::{Hello, ServerMessage, Welcome, WorkerMessage};
use baton_proto::{ServerMsg, WorkerMsg};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::metadata::MetadataValue;
use uuid::Uuid;

pub struct ScriptedWorker {
    pub worker_id: Uuid,
    tx: mpsc::Sender<WorkerMessage>,
    rx: Streaming<ServerMessage>,
    /// Messages `next_matching` skipped, kept in order for later reads.
    skipped: std::collections::VecDeque<ServerMsg>,
}

/// A `Hello` for a worker offering `local` with `slots` slots.
pub fn hello(worker_id: Uuid, slots: u32) -> Hello {
    Hello {
        worker_id: worker_id.to_string(),
        name: format!("scripted-{worker_id}"),
        labels: HashMap::new(),
        executors: vec!["local".into()],
        slots,
        free_slots: slots,
        running: vec![],
        version: "test".into(),
        hostname: "localhost".into(),
        protocol_version: baton_proto::PROTOCOL_VERSION,
    }
}

impl ScriptedWorker {
    /// Opens a session and sends `first` (normally a Hello); returns the worker and the
    /// api's first answer, or the status the api refused the stream with.
    pub async fn open(
        grpc: &str,
        token: &str,
        first: WorkerMessage,
    ) -> Result<(Self, ServerMessage), tonic::Status> {
        let channel = tonic::transport::Endpoint::from_shared(grpc.to_owned())
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let bearer: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| tonic::Status::internal("bad token"))?;
        let mut client =
            WorkerServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", bearer.clone());
                Ok(req)
            });
        let (tx, rx) = mpsc::channel(1024);
        let worker_id = match &first.msg {
            Some(WorkerMsg::Hello(h)) => h.worker_id.parse().unwrap_or_else(|_| Uuid::nil()),
            _ => Uuid::nil(),
        };
        tx.send(first)
            .await
            .map_err(|_| tonic::Status::internal("send"))?;
        let mut rx = client.session(ReceiverStream::new(rx)).await?.into_inner();
        let welcome = tokio::time::timeout(Duration::from_secs(30), rx.message())
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no answer"))??
            .ok_or_else(|| tonic::Status::aborted("stream ended"))?;
        Ok((
            Self {
                worker_id,
                tx,
                rx,
                skipped: Default::default(),
            },
            welcome,
        ))
    }

    /// Connects with a plain Hello and returns the Welcome.
    pub async fn connect(grpc: &str, token: &str, hello: Hello) -> (Self, Welcome) {
        let first = WorkerMessage {
            msg: Some(WorkerMsg::Hello(hello)),
        };
        let (worker, answer) = Self::open(grpc, token, first).await.expect("session opens");
        match answer.msg {
            Some(ServerMsg::Welcome(w)) => (worker, w),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn send(&self, msg: WorkerMsg) {
        self.tx
            .send(WorkerMessage { msg: Some(msg) })
            .await
            .expect("stream open");
    }

    /// The next message from the api (within 30 s).
    pub async fn next(&mut self) -> ServerMsg {
        self.try_next(Duration::from_secs(30))
            .await
            .expect("a message from the api in time")
    }

    /// The next message within `wait`, or None if none came (or the stream ended).
    pub async fn try_next(&mut self, wait: Duration) -> Option<ServerMsg> {
        if let Some(msg) = self.skipped.pop_front() {
            return Some(msg);
        }
        self.receive(wait).await
    }

    async fn receive(&mut self, wait: Duration) -> Option<ServerMsg> {
        match tokio::time::timeout(wait, self.rx.message()).await {
            Ok(Ok(Some(m))) => m.msg,
            _ => None,
        }
    }

    /// Reads until the api ends the stream (within `wait`, else panics): the messages that
    /// came meanwhile (buffered ones first) and the status it ended with (`None`: a clean end).
    pub async fn until_closed(
        &mut self,
        wait: Duration,
    ) -> (Vec<ServerMsg>, Option<tonic::Status>) {
        let mut seen: Vec<ServerMsg> = self.skipped.drain(..).collect();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Err(_) => panic!("the api did not end the stream within {wait:?}; got {seen:?}"),
                Ok(Ok(Some(m))) => seen.extend(m.msg),
                Ok(Ok(None)) => return (seen, None),
                Ok(Err(status)) => return (seen, Some(status)),
            }
        }
    }

    /// The first message (buffered or new) that `pick` accepts; the others stay buffered,
    /// in order, for later reads.
    pub async fn next_matching<T>(&mut self, pick: impl Fn(&ServerMsg) -> Option<T>) -> T {
        if let Some(pos) = self.skipped.iter().position(|m| pick(m).is_some()) {
            let msg = self.skipped.remove(pos).expect("position is in range");
            return pick(&msg).expect("it matched");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = self
                .receive(left)
                .await
                .expect("the expected message in time");
            match pick(&msg) {
                Some(found) => return found,
                None => self.skipped.push_back(msg),
            }
        }
    }
}
