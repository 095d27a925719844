//! One worker's stream: `Hello` → `Welcome`, then every message about its jobs, in order.
//!
//! Messages of one stream are handled one after another, so a job's log batches are stored
//! before its `Finished` is: the completion can require that every line is stored. Every write
//! is fenced by the job's lease token, and accepted only from the stream the job was assigned
//! (or resumed) to under that token: a report about a job this stream does not hold is refused
//! before it reaches the database, whatever token it names. A refused one answers `LeaseLost`
//! and the worker stops that run.
//!
//! A report the database could not take (an error other than a refusal) is answered with a
//! transient `ErrorNotice`: the worker re-sends it after a pause. A job whose reports keep being
//! refused is given up ([`GIVE_UP_AFTER_LEASES`]): failed with the reason if the database lets us,
//! and in any case no longer held by this stream, so its lease is not renewed again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_proto::v1::{
    ErrorKind as PbErrorKind, ErrorNotice, FinishedAck, Hello, LeaseLost, LogAck, ResumedJob,
    ServerMessage, Welcome, WorkerMessage,
};
use baton_proto::{ServerMsg, WorkerMsg};
use futures::FutureExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use uuid::Uuid;

use super::SessionStream;
use super::writes::{self, Applied, JobWrite};
use crate::AppState;
use crate::dispatch::WorkerConn;
use crate::masking::{Secrets, StreamMasker};
use crate::model::JobError;
use crate::model::job::ErrorKind;
use crate::storage::queue::{self, Outcome};
use crate::storage::{StorageError, workers};
use crate::token_cache::Verified;

/// At most this many waiting messages are handled together.
const MAX_GROUP: usize = 256;
/// How long a new stream may take to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const KNOWN_EXECUTORS: [&str; 3] = ["container", "ssh", "local"];
/// A job whose reports the database has refused for this many lease periods in a row (and
/// at least [`GIVE_UP_MIN_REFUSALS`] times) is given up (1 minute with the default lease).
const GIVE_UP_AFTER_LEASES: u32 = 4;
const GIVE_UP_MIN_REFUSALS: u32 = 5;

/// What a worker whose token was revoked is told as its stream ends.
const REVOKED: &str = "the worker token was revoked";

pub(super) async fn open(
    state: AppState,
    token: Verified,
    mut inbound: Streaming<WorkerMessage>,
) -> Result<SessionStream, Status> {
    let token_id = token.id;
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??;
    let Some(WorkerMessage {
        msg: Some(WorkerMsg::Hello(hello)),
    }) = first
    else {
        return Err(Status::invalid_argument("the first message must be Hello"));
    };
    // Before anything else: a worker this api cannot talk to is told which side to upgrade.
    if let Err(refusal) = baton_proto::check_worker_protocol(hello.protocol_version) {
        tracing::warn!(worker.name = %hello.name, worker.version = %hello.version,
                       protocol_version = hello.protocol_version, "{refusal}");
        return Err(Status::failed_precondition(refusal));
    }
    let mut hello = ValidHello::parse(hello)?;
    // A token bound by an admin limits what its workers may declare (and so which jobs they
    // get): labels beyond it are refused, executors clipped to it.
    hello.executors = token
        .binding
        .admit(
            hello
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or_default())),
            &hello.executors,
        )
        .map_err(Status::permission_denied)?;
    // Cancelled when the token is revoked (on any replica): the stream ends.
    let revoked = state.tokens.watch_stream(token_id);
    if revoked.is_cancelled() {
        return Err(Status::unauthenticated(REVOKED));
    }
    let lease = state.config.lease;

    // Jobs the worker kept running while it was away: still ours?
    let mut resumed = Vec::new();
    let mut held = HashMap::new();
    for (job_id, token) in &hello.running {
        let r = match queue::resume(&state.pool, hello.worker_id, *job_id, *token, lease).await {
            Ok(r) => r,
            Err(StorageError::JobNotFound(_)) => queue::ResumeState {
                held: false,
                finished: false,
                stored_seq: 0,
            },
            Err(e) => return Err(crate::error::grpc_status(&e)),
        };
        if r.held {
            held.insert(*job_id, *token);
        }
        resumed.push(ResumedJob {
            job_id: job_id.to_string(),
            held: r.held,
            stored_seq: r.stored_seq,
            finished: r.finished,
        });
    }
    workers::connected(
        &state.pool,
        &workers::WorkerHello {
            id: hello.worker_id,
            name: &hello.name,
            token_id,
            labels: &hello.labels,
            executors: &hello.executors,
            slots: hello.slots as i32,
            running: held.len() as i32,
            version: &hello.version,
            hostname: &hello.hostname,
            api_id: &state.api_id,
        },
    )
    .await
    .map_err(|e| crate::error::grpc_status(&e))?;

    let (tx, rx) = mpsc::channel(4096);
    let welcome = ServerMessage {
        msg: Some(ServerMsg::Welcome(Welcome {
            heartbeat_interval_ms: duration_ms(state.config.heartbeat_interval()),
            lease_ms: duration_ms(lease),
            resumed,
            api_id: state.api_id.clone(),
        })),
    };
    tx.send(Ok(welcome))
        .await
        .map_err(|_| Status::cancelled("stream closed"))?;
    let conn = state.dispatcher.connect(
        hello.worker_id,
        hello.executors.clone(),
        hello.labels.clone(),
        hello.slots,
        held,
        tx.clone(),
    );
    tracing::info!(worker.id = %hello.worker_id, worker.name = %hello.name, slots = hello.slots, "worker connected");

    let stop = state.stop.clone();
    let outbound = outbound(rx, state.stop.clone(), revoked.clone());
    tokio::spawn(async move {
        let session = Session {
            state: state.clone(),
            conn: conn.clone(),
            tx,
            maskers: tokio::sync::Mutex::new(HashMap::new()),
            refusals: std::sync::Mutex::new(HashMap::new()),
            token_id,
            revoked,
        };
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break,
                _ = session.revoked.cancelled() => break,
                next = inbound.message() => next,
            };
            // Whatever else has already arrived is handled with it (its writes in one
            // transaction); the stream's order is kept.
            let mut batch = Vec::new();
            let mut ended = match next {
                Ok(Some(msg)) => {
                    batch.push(msg);
                    false
                }
                Ok(None) => true,
                Err(status) => {
                    tracing::info!(worker.id = %conn.worker_id, %status, "worker stream ended");
                    true
                }
            };
            while !ended && batch.len() < MAX_GROUP {
                // `message` is cancel safe: a message not yet complete stays buffered.
                match inbound.message().now_or_never() {
                    None => break,
                    Some(Ok(Some(msg))) => batch.push(msg),
                    Some(Ok(None)) => ended = true,
                    Some(Err(status)) => {
                        tracing::info!(worker.id = %conn.worker_id, %status, "worker stream ended");
                        ended = true;
                    }
                }
            }
            session.handle_all(batch).await;
            if ended {
                break;
            }
        }
        state.dispatcher.disconnect(&conn);
        if session.revoked.is_cancelled() {
            session.give_back_unstarted().await;
        }
        if let Err(e) = workers::disconnected(&state.pool, conn.worker_id, &state.api_id).await {
            tracing::warn!(error = %e, "could not record the worker's disconnection");
        }
        tracing::info!(worker.id = %conn.worker_id, "worker disconnected");
    });

    Ok(outbound)
}

/// The messages to the worker. The stream ends when the replica shuts down (so graceful
/// shutdown completes), and with `Unauthenticated` when the token is revoked: what is still
/// queued is dropped and the channel closed, so the dispatcher's next push to this worker
/// fails and gives its job back.
fn outbound(
    rx: mpsc::Receiver<Result<ServerMessage, Status>>,
    stop: CancellationToken,
    revoked: CancellationToken,
) -> SessionStream {
    Box::pin(futures::stream::unfold(Some(rx), move |rx| {
        let (stop, revoked) = (stop.clone(), revoked.clone());
        async move {
            let mut rx = rx?;
            tokio::select! {
                biased;
                _ = revoked.cancelled() => {
                    rx.close();
                    Some((Err(Status::unauthenticated(REVOKED)), None))
                }
                _ = stop.cancelled() => None,
                msg = rx.recv() => msg.map(|m| (m, Some(rx))),
            }
        }
    }))
}

/// A `Hello`, checked.
struct ValidHello {
    worker_id: Uuid,
    name: String,
    labels: serde_json::Map<String, serde_json::Value>,
    executors: Vec<String>,
    slots: u32,
    running: Vec<(Uuid, i64)>,
    version: String,
    hostname: String,
}

impl ValidHello {
    fn parse(h: Hello) -> Result<Self, Status> {
        let worker_id = Uuid::parse_str(&h.worker_id)
            .map_err(|_| Status::invalid_argument("Hello.worker_id must be a UUID"))?;
        if h.name.trim().is_empty() || h.name.len() > 200 {
            return Err(Status::invalid_argument(
                "Hello.name must be 1 to 200 characters",
            ));
        }
        if h.executors.is_empty() {
            return Err(Status::invalid_argument(
                "Hello.executors must name at least one executor",
            ));
        }
        if let Some(bad) = h
            .executors
            .iter()
            .find(|e| !KNOWN_EXECUTORS.contains(&e.as_str()))
        {
            return Err(Status::invalid_argument(format!(
                "Hello.executors: unknown executor {bad:?} (known: container, ssh, local)"
            )));
        }
        if !(1..=1024).contains(&h.slots) {
            return Err(Status::invalid_argument(
                "Hello.slots must be between 1 and 1024",
            ));
        }
        let mut labels = serde_json::Map::new();
        for (k, v) in h.labels {
            crate::model::event::check_label(&k, &v)
                .map_err(|e| Status::invalid_argument(format!("Hello.{e}")))?;
            labels.insert(k, serde_json::Value::String(v));
        }
        // A worker holds at most its slots' jobs (and their completions until acknowledged).
        let max_running = h.slots as usize * 2;
        if h.running.len() > max_running {
            return Err(Status::invalid_argument(format!(
                "Hello.running lists {} jobs; a worker with {} slots holds at most {max_running}",
                h.running.len(),
                h.slots
            )));
        }
        let mut running: Vec<(Uuid, i64)> = Vec::new();
        for job in h.running {
            let id = Uuid::parse_str(&job.job_id)
                .map_err(|_| Status::invalid_argument("Hello.running: job_id must be a UUID"))?;
            if running.iter().any(|(seen, _)| *seen == id) {
                return Err(Status::invalid_argument(format!(
                    "Hello.running lists job {id} twice"
                )));
            }
            running.push((id, job.lease_token));
        }
        Ok(Self {
            worker_id,
            name: h.name,
            labels,
            executors: h.executors,
            slots: h.slots,
            running,
            version: h.version,
            hostname: h.hostname,
        })
    }
}

struct Session {
    state: AppState,
    conn: Arc<WorkerConn>,
    tx: crate::dispatch::WorkerTx,
    /// Each held job's masking of its logs (its secrets, and what it carries from line to
    /// line), loaded on its first report; dropped when the job is finished or lost, and never
    /// a failure to load (a batch that cannot be masked is refused and re-sent).
    maskers: tokio::sync::Mutex<HashMap<Uuid, StreamMasker>>,
    /// Jobs whose reports the database refused: since when, and how many times.
    refusals: std::sync::Mutex<HashMap<Uuid, (Instant, u32)>>,
    /// The worker token the stream was opened with, and what fires when it is revoked.
    token_id: Uuid,
    revoked: CancellationToken,
}

impl Session {
    async fn send(&self, msg: ServerMsg) {
        // A closed stream ends the session loop on the next read; nothing to do here.
        let _ = self.tx.send(Ok(ServerMessage { msg: Some(msg) })).await;
    }

    async fn notice(&self, job_id: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::warn!(worker.id = %self.conn.worker_id, job.id = job_id, %message, "refused a worker message");
        self.send(ServerMsg::Error(ErrorNotice {
            job_id: job_id.to_owned(),
            message,
            transient: false,
        }))
        .await;
    }

    /// Nothing of a report about `job_id` was stored, for a reason that may pass: the worker
    /// re-sends it. A job refused for too long is given up.
    async fn refused_for_now(&self, job_id: Uuid, message: String) {
        let give_up = {
            let mut refusals = lock(&self.refusals);
            let (since, count) = refusals.entry(job_id).or_insert((Instant::now(), 0));
            *count += 1;
            since.elapsed() >= self.give_up_after() && *count >= GIVE_UP_MIN_REFUSALS
        };
        if give_up {
            return self.give_up(job_id, &message).await;
        }
        tracing::warn!(worker.id = %self.conn.worker_id, job.id = %job_id, %message, "could not store a report; the worker will re-send it");
        self.send(ServerMsg::Error(ErrorNotice {
            job_id: job_id.to_string(),
            message,
            transient: true,
        }))
        .await;
    }

    fn give_up_after(&self) -> Duration {
        self.state.config.lease * GIVE_UP_AFTER_LEASES
    }

    /// The job's reports have been refused for a while: fail it with the reason if
    /// the database takes that, and stop holding it either way (its lease is not renewed
    /// again; the reaper takes it back when it expires).
    async fn give_up(&self, job_id: Uuid, last_error: &str) {
        let reason = format!(
            "the api could not store this job's reports for {} s; last error: {last_error}",
            self.give_up_after().as_secs()
        );
        tracing::error!(worker.id = %self.conn.worker_id, job.id = %job_id, %reason, "giving up on a job");
        if let Some(token) = self.conn.token_of(job_id) {
            let mut outcome = Outcome::failure(ErrorKind::Infrastructure, reason.clone());
            outcome.retryable = false;
            // A terminal transition like any other: its actions run in its transaction.
            let failed = async {
                let mut tx = self.state.pool.begin().await?;
                if let queue::Completion::Finished {
                    has_actions: true, ..
                } = queue::complete(&mut tx, job_id, token, &outcome).await?
                {
                    crate::actions::after_terminal(
                        &mut tx,
                        &self.state.vault,
                        self.state.config.chain_depth_limit,
                        job_id,
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok::<_, StorageError>(())
            };
            if let Err(e) = failed.await {
                tracing::warn!(job.id = %job_id, error = %e, "could not fail the job; its lease will expire");
            }
        }
        self.lease_lost(job_id, &reason).await;
    }

    /// The worker lost this job: tell it, and free the slot.
    async fn lease_lost(&self, job_id: Uuid, reason: &str) {
        self.conn.release(job_id);
        self.forget(job_id).await;
        self.state.dispatcher.wake();
        self.send(ServerMsg::LeaseLost(LeaseLost {
            job_id: job_id.to_string(),
            reason: reason.to_owned(),
        }))
        .await;
    }

    /// What this session keeps about a job it no longer holds.
    async fn forget(&self, job_id: Uuid) {
        self.maskers.lock().await.remove(&job_id);
        lock(&self.refusals).remove(&job_id);
    }

    /// Reacts to a storage error about one job.
    async fn refused(&self, job_id: Uuid, err: StorageError) {
        match err {
            StorageError::LeaseLost { .. } | StorageError::JobNotFound(_) => {
                self.lease_lost(job_id, &err.to_string()).await;
            }
            // A batch was refused before this one: the worker's re-send fills the gap.
            other @ StorageError::LogGap { .. } => {
                self.refused_for_now(job_id, other.to_string()).await
            }
            other => {
                self.refused_for_now(job_id, format!("could not store the report: {other}"))
                    .await
            }
        }
    }

    /// The job `raw` names, if this stream holds it under `token`; otherwise the report is
    /// refused (`LeaseLost`) before it reaches the database. A worker can only report on the
    /// jobs it was assigned (or resumed) through this stream.
    async fn held(&self, raw: &str, token: i64) -> Option<Uuid> {
        let job_id = self.job_id(raw).await?;
        match self.conn.token_of(job_id) {
            Some(held) if held == token => return Some(job_id),
            // A stale token (an earlier run's): refused, but the stream keeps the lease it
            // holds under its current token.
            Some(_) => {
                self.send(ServerMsg::LeaseLost(LeaseLost {
                    job_id: job_id.to_string(),
                    reason: "stale lease token: the job runs under a newer lease".to_owned(),
                }))
                .await
            }
            None => {
                self.lease_lost(
                    job_id,
                    "this stream does not hold the job under this lease token",
                )
                .await
            }
        }
        None
    }

    /// Handles messages in order; runs of job writes go to the database together.
    async fn handle_all(&self, msgs: Vec<WorkerMessage>) {
        let mut pending = Vec::new();
        for msg in msgs {
            let Some(msg) = msg.msg else {
                self.notice("", "empty message").await;
                continue;
            };
            match self.job_write(msg).await {
                Ok(Some(write)) => pending.push(write),
                Ok(None) => {}
                Err(other) => {
                    self.flush(std::mem::take(&mut pending)).await;
                    self.handle(other).await;
                }
            }
        }
        self.flush(pending).await;
    }

    /// The write a job message asks for (`Ok(None)` when it was refused with a notice), or
    /// the message back when it is not a job write.
    async fn job_write(&self, msg: WorkerMsg) -> Result<Option<JobWrite>, WorkerMsg> {
        Ok(match msg {
            WorkerMsg::Started(m) => {
                self.held(&m.job_id, m.lease_token)
                    .await
                    .map(|job_id| JobWrite::Started {
                        job_id,
                        token: m.lease_token,
                    })
            }
            WorkerMsg::Progress(m) => {
                self.held(&m.job_id, m.lease_token)
                    .await
                    .map(|job_id| JobWrite::Progress {
                        job_id,
                        token: m.lease_token,
                        percent: i16::try_from(m.percent.min(100)).unwrap_or(100),
                    })
            }
            WorkerMsg::Logs(batch) => self.log_write(batch).await,
            WorkerMsg::Finished(f) => self.finished_write(f).await,
            other => return Err(other),
        })
    }

    async fn handle(&self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Hello(_) => {
                self.notice("", "Hello may only be sent once per stream")
                    .await
            }
            WorkerMsg::Heartbeat(hb) => self.heartbeat(hb).await,
            WorkerMsg::HostKeySeen(seen) => self.host_key_seen(seen).await,
            WorkerMsg::Drain(_) => {
                tracing::info!(worker.id = %self.conn.worker_id, "worker is draining");
                self.conn.set_draining();
            }
            job_write => {
                // Not reached: job writes are grouped by `handle_all`.
                if let Ok(Some(write)) = self.job_write(job_write).await {
                    self.flush(vec![write]).await;
                }
            }
        }
    }

    /// Applies job writes and answers each once they are committed.
    async fn flush(&self, pending: Vec<JobWrite>) {
        if pending.is_empty() {
            return;
        }
        let mut freed = false;
        for applied in writes::apply(&self.state, pending).await {
            match applied {
                Applied::Started | Applied::Progress => {}
                Applied::Logs {
                    job_id,
                    stored_seq,
                    bytes,
                } => {
                    lock(&self.refusals).remove(&job_id);
                    metrics::counter!(crate::metrics::LOG_BYTES).increment(bytes as u64);
                    self.send(ServerMsg::LogAck(LogAck {
                        job_id: job_id.to_string(),
                        stored_seq,
                    }))
                    .await;
                }
                Applied::Finished {
                    job_id,
                    done,
                    outcome,
                } => {
                    self.finished(job_id, done, &outcome).await;
                    freed = true;
                }
                // Lines went missing on the way: the run cannot be recorded as complete.
                // Dropping the lease lets the reaper run the job again rather than store it
                // without its logs.
                Applied::Refused {
                    job_id,
                    error: e @ StorageError::LogsIncomplete { .. },
                } => {
                    self.notice(&job_id.to_string(), e.to_string()).await;
                    self.lease_lost(job_id, "log lines were lost; the job will run again")
                        .await;
                }
                Applied::Refused { job_id, error } => self.refused(job_id, error).await,
            }
        }
        if freed {
            self.state.dispatcher.wake();
        }
    }

    /// Pins the host key an `accept_new` server showed on first use. Only a worker running a
    /// job on that server (under a live lease) may do this.
    /// Only for the server the job itself runs on.
    async fn host_key_seen(&self, seen: baton_proto::v1::HostKeySeen) {
        let Some(job_id) = self.held(&seen.job_id, seen.lease_token).await else {
            return;
        };
        let Ok(server_id) = Uuid::parse_str(&seen.server_id) else {
            return self.notice(&seen.job_id, "server_id is not a UUID").await;
        };
        match queue::server_of_leased_job(&self.state.pool, job_id, seen.lease_token).await {
            Ok(Some(own)) if own == server_id => {}
            Ok(_) => {
                return self
                    .notice(
                        &seen.job_id,
                        format!("host key report refused: job {job_id} does not run on server {server_id}"),
                    )
                    .await;
            }
            Err(e) => return self.refused(job_id, e).await,
        }
        if let Err(e) = crate::model::server::check_host_key(&seen.host_key) {
            return self.notice(&seen.job_id, e.to_string()).await;
        }
        match crate::storage::servers::record_host_key(&self.state.pool, server_id, &seen.host_key)
            .await
        {
            Ok(crate::storage::servers::HostKeyRecord::Recorded) => {
                tracing::info!(server.id = %server_id, "host key recorded on first use");
            }
            Ok(crate::storage::servers::HostKeyRecord::Unchanged) => {}
            Ok(crate::storage::servers::HostKeyRecord::Mismatch { .. }) => {
                self.notice(
                    &seen.job_id,
                    "a different host key is pinned for this server; refused",
                )
                .await;
            }
            Err(e) => self.notice(&seen.job_id, e.to_string()).await,
        }
    }

    async fn job_id(&self, raw: &str) -> Option<Uuid> {
        match Uuid::parse_str(raw) {
            Ok(id) => Some(id),
            Err(_) => {
                self.notice(raw, format!("job_id {raw:?} is not a UUID"))
                    .await;
                None
            }
        }
    }

    /// The masking of job `job_id`'s reports, loaded once per job. A failure to load is not
    /// kept: the caller refuses the report (the worker re-sends it) rather than store it
    /// unmasked.
    async fn with_masker<T>(
        &self,
        job_id: Uuid,
        f: impl FnOnce(&mut StreamMasker) -> T,
    ) -> Result<T, StorageError> {
        let mut maskers = self.maskers.lock().await;
        if !maskers.contains_key(&job_id) {
            // The values its assignment carried, when this connection dispatched it; loaded
            // for a job resumed after a reconnect.
            let secrets = match self.conn.secrets_of(job_id) {
                Some(values) => crate::masking::Secrets::new(values.iter().cloned()),
                None => {
                    crate::secrets::job_secrets(&self.state.pool, &self.state.vault, job_id).await?
                }
            };
            // Only held jobs get here, and they are forgotten when finished or lost; a bound
            // all the same.
            if maskers.len() >= self.conn.slots as usize * 2 {
                maskers.retain(|id, _| self.conn.token_of(*id).is_some());
            }
            maskers.insert(job_id, StreamMasker::new(secrets));
        }
        let masker = maskers.entry(job_id).or_default();
        Ok(f(masker))
    }

    async fn log_write(&self, batch: baton_proto::v1::LogBatch) -> Option<JobWrite> {
        let job_id = self.held(&batch.job_id, batch.lease_token).await?;
        let token = batch.lease_token;
        let checked = self
            .with_masker(job_id, |masker| {
                super::log_batch::checked_chunk(batch, masker)
            })
            .await;
        match checked {
            Ok(Ok(chunk)) => Some(JobWrite::Logs {
                job_id,
                token,
                chunk,
            }),
            Ok(Err(e)) => {
                self.notice(&job_id.to_string(), e.to_string()).await;
                None
            }
            Err(e) => {
                let message = format!("cannot load the job's secrets to mask its lines: {e}");
                self.refused_for_now(job_id, message).await;
                None
            }
        }
    }

    /// A completion, checked: what PostgreSQL cannot store becomes an `output` error (or is
    /// escaped, in an error message), and the job's secrets are masked in its output and error.
    async fn finished_write(&self, f: baton_proto::v1::Finished) -> Option<JobWrite> {
        let job_id = self.held(&f.job_id, f.lease_token).await?;
        let mut outcome = outcome_of(&f);
        let mut variables = f.variables;
        let traceparent = Some(f.traceparent).filter(|t| !t.is_empty());
        make_storable(&mut outcome, &mut variables);
        if outcome.output.is_none() && outcome.error.is_none() {
            // Nothing a secret could be in: no need to load them.
            return Some(JobWrite::Finished {
                job_id,
                token: f.lease_token,
                outcome,
                variables,
                traceparent,
            });
        }
        let secrets = self
            .with_masker(job_id, |masker| masker.secrets().clone())
            .await;
        match secrets {
            Ok(secrets) => mask_outcome(&secrets, &mut outcome),
            Err(e) => {
                let message = format!("cannot load the job's secrets to mask its output: {e}");
                self.refused_for_now(job_id, message).await;
                return None;
            }
        }
        Some(JobWrite::Finished {
            job_id,
            token: f.lease_token,
            outcome,
            variables,
            traceparent,
        })
    }

    async fn heartbeat(&self, hb: baton_proto::v1::Heartbeat) {
        // A revocation whose notification this replica missed is caught here.
        match crate::storage::tokens::is_live(&self.state.pool, self.token_id).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(worker.id = %self.conn.worker_id, token.id = %self.token_id, "worker token revoked; ending the stream");
                self.state.tokens.forget(self.token_id);
                self.revoked.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not re-check the worker token"),
        }
        let mut claimed = Vec::with_capacity(hb.jobs.len());
        for job in &hb.jobs {
            // Only the leases this stream holds are renewed (a job given up, or another
            // worker's, is not).
            if let Some(id) = self.held(&job.job_id, job.lease_token).await {
                claimed.push((id, job.lease_token));
            }
        }
        let held = match queue::renew_leases(
            &self.state.pool,
            self.conn.worker_id,
            &claimed,
            self.state.config.lease,
        )
        .await
        {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "could not renew leases");
                return;
            }
        };
        for (job_id, _) in &claimed {
            match held.iter().find(|h| h.id == *job_id) {
                None => {
                    self.lease_lost(*job_id, "the lease expired or another worker holds the job")
                        .await
                }
                Some(h) if h.cancel_requested => {
                    self.state.dispatcher.cancel(
                        *job_id,
                        "cancelled through the API",
                        h.cancel_force,
                    );
                }
                Some(_) => {}
            }
        }
        let _ = workers::seen(&self.state.pool, self.conn.worker_id, held.len() as i32).await;
    }

    /// After a revocation: jobs pushed to this worker but not started go back to the queue at
    /// once (running ones are left to their lease: the worker may still be running them).
    async fn give_back_unstarted(&self) {
        for (job_id, token) in self.conn.held_jobs() {
            match queue::release(&self.state.pool, job_id, token).await {
                Ok(true) => tracing::info!(job.id = %job_id, "job of a revoked worker requeued"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(job.id = %job_id, error = %e, "could not requeue a job of a revoked worker")
                }
            }
            self.conn.release(job_id);
        }
        self.state.dispatcher.wake();
    }

    /// A completion is recorded: count it, free the slot, acknowledge it.
    async fn finished(&self, job_id: Uuid, done: queue::Completion, outcome: &Outcome) {
        tracing::debug!(job.id = %job_id, ?done, "job completion recorded");
        crate::metrics::run_ended(self.conn.run_of(job_id).as_ref(), done, outcome);
        self.conn.release(job_id);
        self.forget(job_id).await;
        self.send(ServerMsg::FinishedAck(FinishedAck {
            job_id: job_id.to_string(),
        }))
        .await;
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Makes a completion storable by PostgreSQL, which cannot hold a NUL character in `text` or
/// `jsonb` (JSON's `\u0000` included): in an error message it is escaped (`\0`); in the
/// output or a variable it fails the run as an `output` error, applying none of its output
/// (the error message names what was refused).
fn make_storable(outcome: &mut Outcome, variables: &mut HashMap<String, String>) {
    if let Some(err) = outcome.error.as_mut()
        && err.message.contains('\0')
    {
        err.message = err.message.replace('\0', "\\0");
    }
    let mut refused = None;
    if outcome.output.as_ref().is_some_and(json_has_nul) {
        outcome.output = None;
        refused = Some(
            "the output contains a NUL character (\\u0000), which cannot be stored".to_owned(),
        );
    }
    let mut keys: Vec<&String> = variables
        .iter()
        .filter(|(k, v)| k.contains('\0') || v.contains('\0'))
        .map(|(k, _)| k)
        .collect();
    if !keys.is_empty() {
        keys.sort();
        let names = keys
            .iter()
            .map(|k| format!("{:?}", k.replace('\0', "\\0")))
            .collect::<Vec<_>>()
            .join(", ");
        refused = Some(format!(
            "variable {names} contains a NUL character, which cannot be stored; no variable was written"
        ));
        variables.clear();
    }
    if let Some(message) = refused {
        outcome.output = None;
        variables.clear();
        match outcome.error.as_mut() {
            None => {
                outcome.error = Some(JobError::new(ErrorKind::Output, message));
                outcome.retryable = false;
            }
            // The run failed anyway: keep its own error, note this one.
            Some(err) => err.message = format!("{}; {message}", err.message),
        }
    }
}

fn json_has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(json_has_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v))
        }
        _ => false,
    }
}

/// The job's secrets masked in what its completion stores.
fn mask_outcome(secrets: &Secrets, outcome: &mut Outcome) {
    if secrets.is_empty() {
        return;
    }
    if let Some(err) = outcome.error.as_mut() {
        err.message = secrets.mask(&err.message).into_owned();
    }
    if let Some(output) = outcome.output.as_mut() {
        secrets.mask_json(output);
    }
}

/// The outcome a `Finished` message reports.
fn outcome_of(f: &baton_proto::v1::Finished) -> Outcome {
    let kind = match PbErrorKind::try_from(f.error_kind) {
        Ok(PbErrorKind::Unspecified) => None,
        Ok(PbErrorKind::Script) => Some(ErrorKind::Script),
        Ok(PbErrorKind::Infrastructure) => Some(ErrorKind::Infrastructure),
        Ok(PbErrorKind::Timeout) => Some(ErrorKind::Timeout),
        Ok(PbErrorKind::Cancelled) => Some(ErrorKind::Cancelled),
        Ok(PbErrorKind::Output) => Some(ErrorKind::Output),
        Err(_) => Some(ErrorKind::Infrastructure),
    };
    let mut error = kind.map(|kind| JobError {
        kind,
        message: if f.error_message.is_empty() {
            format!("{} error", kind.as_str())
        } else {
            f.error_message.clone()
        },
        start_failure: f.start_failure,
    });
    let output = if f.output_json.is_empty() {
        None
    } else {
        match serde_json::from_str(&f.output_json) {
            Ok(v) => Some(v),
            Err(e) => {
                error.get_or_insert(JobError::new(
                    ErrorKind::Output,
                    format!("the worker sent output that is not JSON: {e}"),
                ));
                None
            }
        }
    };
    let retryable = error
        .as_ref()
        .is_some_and(|e| f.retryable && e.kind != ErrorKind::Output);
    Outcome {
        exit_code: f.exit_code,
        exit_signal: f.signal,
        error,
        retryable,
        output,
        condition: f.condition,
        last_log_seq: Some(f.last_seq),
    }
}

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
