//! The worker: its shared state (held jobs, slots, the current session's outbound queue) and
//! its lifecycle ([`Worker::run`]: sessions until shutdown, then the drain).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use baton_proto::v1::{
    Assignment, Drain, Finished, Heartbeat, HeldJob, Hello, HostKeySeen, LogBatch, Progress,
    ServerMessage, Started, Welcome, WorkerMessage,
};
use baton_proto::{ServerMsg, WorkerMsg};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{ClientTlsConfig, Endpoint};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::config::{WorkerConfig, parse_api_urls};
use crate::executor::ssh::{SshConfig, SshExecutor};
use crate::executor::{ContainerConfig, ContainerExecutor, Executor, LocalExecutor};
use crate::job::{self, Failure};
use crate::logbook::{Chunk, Unacked};
use crate::rundir::ScratchDir;
use crate::session;

/// How long the worker waits, at the end of a shutdown, for its last runs to end and their
/// completions to be acknowledged.
const FINAL_ACK_WAIT: Duration = Duration::from_secs(10);

/// How often the container executor looks for containers of this worker that no run owns.
const REAP_INTERVAL: Duration = Duration::from_secs(300);

/// How many times a job's reports are re-sent after the api could not store them (a transient
/// `ErrorNotice`) before its completion is reported as an infrastructure failure instead (and,
/// if that is refused as often, before the job is given up here).
const MAX_REPORT_RETRIES: u32 = 5;
/// The pause before the first re-send; it doubles with each refusal, up to
/// [`MAX_RESEND_DELAY`].
const FIRST_RESEND_DELAY: Duration = Duration::from_millis(250);
const MAX_RESEND_DELAY: Duration = Duration::from_secs(4);

/// The executors a worker with `config` and id `worker_id` offers, by name: `ssh` always,
/// `container` when a Docker engine answers (unless [`WorkerConfig::no_container`]; without an
/// engine a warning is logged and it is not offered), `local` with
/// [`WorkerConfig::allow_local`]. Adding an executor is a few lines here.
pub async fn executors_for(
    config: &WorkerConfig,
    worker_id: Uuid,
) -> HashMap<&'static str, Arc<dyn Executor>> {
    offered_executors(config, worker_id).await.executors
}

/// What [`offered_executors`] made: the executors by name, and the container and ssh
/// executors themselves (for the reaper and the worker's metrics).
struct Offered {
    executors: HashMap<&'static str, Arc<dyn Executor>>,
    container: Option<Arc<ContainerExecutor>>,
    ssh: Option<Arc<SshExecutor>>,
}

/// [`executors_for`], plus the container executor itself (for its reaper).
async fn offered_executors(config: &WorkerConfig, worker_id: Uuid) -> Offered {
    let mut executors: HashMap<&'static str, Arc<dyn Executor>> = HashMap::new();
    let mut offer = |executor: Arc<dyn Executor>| {
        executors.insert(executor.name(), executor);
    };
    if config.allow_local {
        offer(Arc::new(LocalExecutor::new(crate::executor::LocalConfig {
            temp_root: config.scratch_dir.clone(),
            http_policy: config.http_allow_cidrs.clone(),
            allow_network: !config.no_network,
            ..Default::default()
        })));
    }
    let ssh = Arc::new(SshExecutor::new(SshConfig::default()));
    offer(ssh.clone());
    let mut container = None;
    if config.no_container {
        tracing::info!("the container executor is disabled (--no-container)");
    } else {
        let mut container_config = ContainerConfig::new(worker_id.to_string());
        container_config.spares = usize::try_from(config.container_spares).unwrap_or(1);
        container_config.http_policy = config.http_allow_cidrs.clone();
        container_config.allow_network = !config.no_network;
        match ContainerExecutor::connect(container_config).await {
            Ok(executor) => {
                let executor = Arc::new(executor);
                offer(executor.clone());
                container = Some(executor);
            }
            Err(e) => tracing::warn!(
                error = %e,
                "the container executor is not offered (start the worker with --no-container \
                 to silence this)"
            ),
        }
    }
    Offered {
        executors,
        container,
        ssh: Some(ssh),
    }
}

/// A message for the api, as queued on a session's outbound queue. Log batches are shared with
/// the job's unacknowledged-log book, so queueing one does not copy its lines.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Msg(WorkerMsg),
    Logs(Arc<LogBatch>),
}

impl Outgoing {
    pub(crate) fn into_message(self) -> WorkerMessage {
        let msg = match self {
            Outgoing::Msg(msg) => msg,
            Outgoing::Logs(batch) => WorkerMsg::Logs(Arc::unwrap_or_clone(batch)),
        };
        WorkerMessage { msg: Some(msg) }
    }
}

/// Identifies one run of a job on this worker (a job re-assigned with a new lease is a new
/// run; the old run's task can no longer touch the new one's state).
#[derive(Debug, Clone)]
pub(crate) struct JobKey {
    pub job_id: String,
    pub lease_token: i64,
    run_id: u64,
}

/// What the worker remembers about a job it holds: from the assignment until the api
/// acknowledges its completion (or the lease is lost).
struct JobEntry {
    run_id: u64,
    lease_token: i64,
    cancel: CancellationToken,
    /// Fired by a forced cancel: the executor kills the run without the grace.
    kill_now: CancellationToken,
    /// Wakes the job's task when acknowledgements free log space or the job is dropped.
    wake: Arc<Notify>,
    log: Unacked,
    started: bool,
    progress: Option<u32>,
    finished: Option<Finished>,
    /// The api refused this job's reports this many times in a row (transiently).
    refusals: u32,
    /// A re-send of the reports is already on its way.
    resend_due: bool,
    /// The completion was replaced by an infrastructure failure after repeated refusals.
    completion_replaced: bool,
    span: tracing::Span,
    /// The run's trace context, sent back in `Finished.traceparent`.
    traceparent: Option<String>,
}

impl JobEntry {
    fn drop_run(&self) {
        self.cancel.cancel();
        self.wake.notify_one();
    }

    /// What the api has not acknowledged about this job, in order: `Started` (while the run
    /// goes on), the unacknowledged log lines, the last progress, the completion.
    fn unacknowledged(&self, job_id: &str) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let lease_token = self.lease_token;
        if self.started && self.finished.is_none() {
            out.push(Outgoing::Msg(WorkerMsg::Started(Started {
                job_id: job_id.to_owned(),
                lease_token,
            })));
        }
        out.extend(self.log.pending().cloned().map(Outgoing::Logs));
        if let (Some(percent), None) = (self.progress, &self.finished) {
            out.push(Outgoing::Msg(WorkerMsg::Progress(Progress {
                job_id: job_id.to_owned(),
                lease_token,
                percent,
            })));
        }
        if let Some(finished) = &self.finished {
            out.push(Outgoing::Msg(WorkerMsg::Finished(finished.clone())));
        }
        out
    }
}

/// The pause before re-sending after the `n`th refusal in a row (n ≥ 1).
fn resend_delay(n: u32) -> Duration {
    FIRST_RESEND_DELAY
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(MAX_RESEND_DELAY)
}

struct SessionLink {
    id: u64,
    tx: mpsc::UnboundedSender<Outgoing>,
}

#[derive(Default)]
pub(crate) struct State {
    jobs: HashMap<String, JobEntry>,
    /// Jobs whose process has not ended yet (they hold a slot).
    pub(crate) running: u32,
    /// The current session, once its `Welcome` was handled.
    session: Option<SessionLink>,
    draining: bool,
    next_id: u64,
}

impl State {
    /// Jobs held (running, or finished and not yet acknowledged).
    pub(crate) fn jobs_held(&self) -> usize {
        self.jobs.len()
    }

    /// Whether a session with an api replica is open.
    pub(crate) fn connected(&self) -> bool {
        self.session.is_some()
    }

    /// Queues `msg` on the current session; without one it is dropped (what must survive a
    /// disconnection is kept in the job entries and re-sent on resume).
    fn send(&mut self, msg: Outgoing) {
        if let Some(link) = &self.session
            && link.tx.send(msg).is_err()
        {
            // The stream is gone; the session task notices and reconnects.
            self.session = None;
        }
    }

    fn free_slots(&self, slots: u32) -> u32 {
        if self.draining {
            0
        } else {
            slots.saturating_sub(self.running)
        }
    }

    fn held(&self) -> Vec<HeldJob> {
        let mut held: Vec<HeldJob> = self
            .jobs
            .iter()
            .map(|(id, e)| HeldJob {
                job_id: id.clone(),
                lease_token: e.lease_token,
            })
            .collect();
        held.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        held
    }

    fn entry(&mut self, key: &JobKey) -> Option<&mut JobEntry> {
        self.jobs
            .get_mut(&key.job_id)
            .filter(|e| e.run_id == key.run_id)
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// Everything the worker's tasks share.
pub(crate) struct Shared {
    pub(crate) config: WorkerConfig,
    pub(crate) worker_id: Uuid,
    pub(crate) name: String,
    pub(crate) hostname: String,
    pub(crate) executors: HashMap<&'static str, Arc<dyn Executor>>,
    pub(crate) files: ScratchDir,
    /// The api replicas, in `--api-url` order (at least one); sessions go round robin.
    pub(crate) apis: Vec<ApiEndpoint>,
    pub(crate) authorization: MetadataValue<Ascii>,
    tasks: TaskTracker,
    state: Mutex<State>,
    /// Bumped whenever `running` or the set of held jobs changes (for the drain's waits).
    changes: watch::Sender<u64>,
    /// Runs reported, by result (for the worker's metrics).
    pub(crate) runs: crate::metrics::RunCounts,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    async fn wait_until(&self, condition: impl Fn(&State) -> bool) {
        let mut changes = self.changes.subscribe();
        loop {
            if condition(&self.lock()) {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    fn executor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.executors.keys().map(|n| (*n).to_owned()).collect();
        names.sort();
        names
    }

    // ------------------------------------------------------------------ session side

    /// The `Hello` opening a session.
    pub(crate) fn hello(&self) -> Hello {
        let st = self.lock();
        Hello {
            worker_id: self.worker_id.to_string(),
            name: self.name.clone(),
            labels: self.config.labels.0.clone().into_iter().collect(),
            executors: self.executor_names(),
            slots: self.config.slots,
            free_slots: st.free_slots(self.config.slots),
            running: st.held(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            hostname: self.hostname.clone(),
            protocol_version: self.config.protocol_version,
        }
    }

    /// Makes `tx` the current session after its `Welcome`: drops the jobs the api says are
    /// lost or done, re-sends what the api has not stored (log lines after `stored_seq`, a
    /// pending `Finished`), then lets new messages flow. Everything happens under the state
    /// lock, so re-sent lines always precede lines produced afterwards.
    pub(crate) fn attach(&self, tx: mpsc::UnboundedSender<Outgoing>, welcome: &Welcome) -> u64 {
        let mut st = self.lock();
        let id = st.next_id();
        let resumed: HashMap<&str, _> = welcome
            .resumed
            .iter()
            .map(|r| (r.job_id.as_str(), r))
            .collect();
        let mut out = Vec::new();
        let mut dropped = false;
        st.jobs.retain(|job_id, entry| {
            let _span = entry.span.enter();
            let resume = resumed.get(job_id.as_str());
            match resume {
                Some(r) if !r.held => {
                    tracing::warn!("the lease was lost while disconnected: stopping the run");
                    entry.drop_run();
                    dropped = true;
                    return false;
                }
                Some(r) if r.finished => {
                    tracing::info!("the api had already recorded the completion");
                    entry.drop_run();
                    dropped = true;
                    return false;
                }
                Some(r) => {
                    if entry.log.ack(r.stored_seq) > 0 {
                        entry.wake.notify_one();
                    }
                }
                None => {
                    tracing::warn!("the api did not mention this job on resume; re-sending it all");
                }
            }
            let resent = entry.log.lines();
            if resent > 0 {
                tracing::info!(
                    lines = resent,
                    after_seq = entry.log.stored_seq(),
                    "re-sending unacknowledged log lines"
                );
            }
            if entry.finished.is_some() {
                tracing::info!("re-sending the unacknowledged completion");
            }
            out.extend(entry.unacknowledged(job_id));
            true
        });
        st.session = Some(SessionLink { id, tx });
        for msg in out {
            st.send(msg);
        }
        if st.draining {
            st.send(Outgoing::Msg(WorkerMsg::Drain(Drain {})));
        }
        drop(st);
        if dropped {
            self.bump();
        }
        id
    }

    /// The session `id` ended: stop queueing messages on it.
    pub(crate) fn detach(&self, id: u64) {
        let mut st = self.lock();
        if st.session.as_ref().is_some_and(|s| s.id == id) {
            st.session = None;
        }
    }

    /// Sends a `Heartbeat` listing every held job.
    pub(crate) fn heartbeat(&self) {
        let mut st = self.lock();
        let heartbeat = Heartbeat {
            jobs: st.held(),
            free_slots: st.free_slots(self.config.slots),
        };
        st.send(Outgoing::Msg(WorkerMsg::Heartbeat(heartbeat)));
    }

    /// Handles one message from the api.
    pub(crate) fn handle(self: &Arc<Self>, message: ServerMessage) {
        let Some(msg) = message.msg else {
            tracing::debug!("empty message from the api");
            return;
        };
        match msg {
            ServerMsg::Assignment(a) => self.accept(a),
            ServerMsg::Cancel(c) => {
                let st = self.lock();
                match st.jobs.get(&c.job_id) {
                    Some(e) => {
                        tracing::info!(parent: &e.span, reason = %c.reason, force = c.force, "cancel requested");
                        // First: the executor, woken by `cancel`, then skips the grace.
                        if c.force {
                            e.kill_now.cancel();
                        }
                        e.cancel.cancel();
                    }
                    None => tracing::debug!(job.id = %c.job_id, "cancel for a job not held"),
                }
            }
            ServerMsg::LeaseLost(l) => {
                let removed = self.lock().jobs.remove(&l.job_id);
                if let Some(e) = removed {
                    tracing::warn!(parent: &e.span, reason = %l.reason, "lease lost: stopping the run");
                    e.drop_run();
                    self.bump();
                }
            }
            ServerMsg::LogAck(ack) => {
                let mut st = self.lock();
                if let Some(e) = st.jobs.get_mut(&ack.job_id) {
                    e.refusals = 0;
                    if e.log.ack(ack.stored_seq) > 0 {
                        e.wake.notify_one();
                    }
                }
            }
            ServerMsg::FinishedAck(ack) => {
                let mut st = self.lock();
                let done = st
                    .jobs
                    .get(&ack.job_id)
                    .is_some_and(|e| e.finished.is_some());
                if done {
                    if let Some(e) = st.jobs.remove(&ack.job_id) {
                        tracing::debug!(parent: &e.span, "completion acknowledged");
                    }
                    drop(st);
                    self.bump();
                } else {
                    tracing::warn!(job.id = %ack.job_id, "completion acknowledged for a job that has not finished here");
                }
            }
            ServerMsg::Error(notice) if notice.transient => {
                self.refused_for_now(&notice.job_id, &notice.message);
            }
            ServerMsg::Error(notice) => {
                tracing::warn!(job.id = %notice.job_id, message = %notice.message, "the api refused a message");
            }
            ServerMsg::Welcome(_) => {
                tracing::warn!("unexpected Welcome in an established session (ignored)");
            }
        }
    }

    /// The api could not store a report about `job_id` for now: re-send what it has not
    /// acknowledged after a pause (doubling with each refusal in a row). After
    /// [`MAX_REPORT_RETRIES`] refusals the completion is replaced by an infrastructure failure
    /// naming the refusal (without the run's output or variables, which may be what the api
    /// cannot store); if even that keeps being refused, the job is given up here (the api lets
    /// its lease expire).
    fn refused_for_now(self: &Arc<Self>, job_id: &str, message: &str) {
        let mut st = self.lock();
        let Some(entry) = st.jobs.get_mut(job_id) else {
            return;
        };
        if entry.resend_due {
            // One re-send answers every refusal of the reports sent before it.
            return;
        }
        entry.refusals += 1;
        let _span = entry.span.clone().entered();
        tracing::warn!(refusals = entry.refusals, %message, "the api could not store a report; re-sending it");
        if entry.refusals > MAX_REPORT_RETRIES {
            match &entry.finished {
                Some(f) if !entry.completion_replaced => {
                    tracing::error!(
                        "the completion keeps being refused: reporting an infrastructure failure instead"
                    );
                    entry.finished = Some(Finished {
                        job_id: f.job_id.clone(),
                        lease_token: f.lease_token,
                        last_seq: f.last_seq,
                        exit_code: f.exit_code,
                        signal: f.signal,
                        error_kind: baton_proto::v1::ErrorKind::Infrastructure as i32,
                        error_message: format!(
                            "the api refused this run's completion {} times; last: {message}",
                            entry.refusals
                        ),
                        retryable: false,
                        ..Finished::default()
                    });
                    entry.completion_replaced = true;
                    entry.refusals = 0;
                }
                Some(_) => {
                    tracing::error!(
                        "even the failure report keeps being refused: giving the job up"
                    );
                    if let Some(e) = st.jobs.remove(job_id) {
                        e.drop_run();
                    }
                    drop(st);
                    self.bump();
                    return;
                }
                // Only logs so far: keep trying at the longest pause (the api gives the job
                // up on its side if this lasts).
                None => {}
            }
        }
        entry.resend_due = true;
        let delay = resend_delay(entry.refusals.max(1));
        let (run_id, job_id) = (entry.run_id, job_id.to_owned());
        drop(st);
        let shared = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut st = shared.lock();
            let Some(entry) = st.jobs.get_mut(&job_id).filter(|e| e.run_id == run_id) else {
                return;
            };
            entry.resend_due = false;
            for msg in entry.unacknowledged(&job_id) {
                st.send(msg);
            }
        });
    }

    /// Takes an assignment: starts the run, or finishes it at once when it cannot run here.
    fn accept(self: &Arc<Self>, a: Assignment) {
        let span = tracing::info_span!("job", job.id = %a.job_id, event.id = %a.event_id,
                                       attempt = a.attempt, trace_id = tracing::field::Empty);
        let traceparent = baton_telemetry::link(
            &span,
            Some(a.traceparent.as_str()).filter(|t| !t.is_empty()),
        );
        let _entered = span.enter();
        let mut st = self.lock();
        if let Some(old_lease) = st.jobs.get(&a.job_id).map(|e| e.lease_token) {
            if old_lease == a.lease_token {
                tracing::warn!("duplicate assignment ignored");
                return;
            }
            tracing::warn!(
                old_lease,
                "job assigned again with a new lease: dropping the old run"
            );
            if let Some(old) = st.jobs.remove(&a.job_id) {
                old.drop_run();
            }
        }
        let plan = if st.draining {
            Err(Failure::infrastructure("worker draining", true))
        } else {
            job::plan(&a, &self.executors)
        };
        let run_id = st.next_id();
        let entry = JobEntry {
            run_id,
            lease_token: a.lease_token,
            cancel: CancellationToken::new(),
            kill_now: CancellationToken::new(),
            wake: Arc::new(Notify::new()),
            log: Unacked::default(),
            started: false,
            progress: None,
            finished: None,
            refusals: 0,
            resend_due: false,
            completion_replaced: false,
            span: span.clone(),
            traceparent: traceparent.clone(),
        };
        let done = |st: &mut State, mut entry: JobEntry, mut finished: Finished| {
            finished.traceparent = entry.traceparent.clone().unwrap_or_default();
            entry.finished = Some(finished.clone());
            st.jobs.insert(a.job_id.clone(), entry);
            st.send(Outgoing::Msg(WorkerMsg::Finished(finished)));
        };
        match plan {
            Err(failure) => {
                tracing::warn!(error = %failure.message, "job not run");
                done(
                    &mut st,
                    entry,
                    failure.finished(&a.job_id, a.lease_token, 0),
                );
            }
            Ok(job::Planned::Done(finished)) => {
                tracing::info!("noop job done");
                done(&mut st, entry, finished);
            }
            Ok(job::Planned::Run(mut plan)) => {
                if st.running >= self.config.slots {
                    tracing::warn!(
                        running = st.running,
                        slots = self.config.slots,
                        "assigned more jobs than free slots; running it anyway"
                    );
                }
                tracing::info!(executor = plan.executor.name(), runtime = %plan.spec.runtime, "job assigned");
                let key = JobKey {
                    job_id: a.job_id.clone(),
                    lease_token: a.lease_token,
                    run_id,
                };
                let (cancel, wake) = (entry.cancel.clone(), entry.wake.clone());
                plan.spec.kill_now = entry.kill_now.clone();
                plan.traceparent = traceparent;
                st.jobs.insert(a.job_id.clone(), entry);
                st.running += 1;
                let task = job::run(self.clone(), key, *plan, cancel, wake);
                self.tasks.spawn(task.instrument(span.clone()));
            }
        }
        drop(st);
        self.bump();
    }

    /// Starts draining: no more assignments.
    fn start_draining(&self) {
        let mut st = self.lock();
        st.draining = true;
        st.send(Outgoing::Msg(WorkerMsg::Drain(Drain {})));
    }

    fn cancel_all(&self) {
        for e in self.lock().jobs.values() {
            e.cancel.cancel();
        }
    }

    // ------------------------------------------------------------------ job side

    /// The run's process started. False when the job is no longer held.
    pub(crate) fn job_started(&self, key: &JobKey) -> bool {
        let mut st = self.lock();
        let Some(entry) = st.entry(key) else {
            return false;
        };
        entry.started = true;
        st.send(Outgoing::Msg(WorkerMsg::Started(Started {
            job_id: key.job_id.clone(),
            lease_token: key.lease_token,
        })));
        true
    }

    /// A closed batch: kept until acknowledged, sent now if connected. Returns the job's
    /// unacknowledged bytes, or `None` when the job is no longer held.
    pub(crate) fn job_logs(&self, key: &JobKey, chunk: Chunk) -> Option<usize> {
        let mut st = self.lock();
        let entry = st.entry(key)?;
        let batch = Arc::new(LogBatch {
            job_id: key.job_id.clone(),
            lease_token: key.lease_token,
            lines: Vec::new(),
            first_seq: chunk.first_seq,
            chunk: chunk.data,
        });
        entry.log.push(batch.clone(), chunk.lines);
        let unacked = entry.log.bytes();
        st.send(Outgoing::Logs(batch));
        Some(unacked)
    }

    /// The job's unacknowledged log bytes, or `None` when the job is no longer held.
    pub(crate) fn job_unacked_bytes(&self, key: &JobKey) -> Option<usize> {
        self.lock().entry(key).map(|e| e.log.bytes())
    }

    /// New progress. False when the job is no longer held.
    pub(crate) fn job_progress(&self, key: &JobKey, percent: u8) -> bool {
        let mut st = self.lock();
        let Some(entry) = st.entry(key) else {
            return false;
        };
        entry.progress = Some(percent.into());
        st.send(Outgoing::Msg(WorkerMsg::Progress(Progress {
            job_id: key.job_id.clone(),
            lease_token: key.lease_token,
            percent: percent.into(),
        })));
        true
    }

    /// The ssh executor accepted a server's host key on first use: the api records it. Sent
    /// only if connected (the executor reports the key again on the server's next run).
    pub(crate) fn job_host_key_seen(&self, key: &JobKey, server_id: Uuid, host_key: &str) {
        let mut st = self.lock();
        if st.entry(key).is_none() {
            return;
        }
        st.send(Outgoing::Msg(WorkerMsg::HostKeySeen(HostKeySeen {
            job_id: key.job_id.clone(),
            lease_token: key.lease_token,
            server_id: server_id.to_string(),
            host_key: host_key.to_owned(),
        })));
    }

    /// The run's completion: kept until acknowledged, sent now if connected.
    pub(crate) fn job_finished(&self, key: &JobKey, mut finished: Finished) {
        let mut st = self.lock();
        let Some(entry) = st.entry(key) else {
            return;
        };
        crate::metrics::run_finished(&self.runs, finished.error_kind);
        finished.traceparent = entry.traceparent.clone().unwrap_or_default();
        entry.finished = Some(finished.clone());
        st.send(Outgoing::Msg(WorkerMsg::Finished(finished)));
    }

    /// A run's process ended: its slot is free.
    pub(crate) fn release_slot(&self) {
        {
            let mut st = self.lock();
            st.running = st.running.saturating_sub(1);
        }
        self.bump();
    }
}

/// A worker process: connects to the api, runs the jobs pushed to it, drains on shutdown.
pub struct Worker {
    shared: Arc<Shared>,
    /// The container executor, when offered by [`Worker::new`]: its reaper runs with the worker.
    container: Option<Arc<ContainerExecutor>>,
    /// The ssh executor, when offered by [`Worker::new`] (for the metrics).
    ssh: Option<Arc<SshExecutor>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.shared.worker_id)
            .field("name", &self.shared.name)
            .field("executors", &self.shared.executor_names())
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker offering the executors that `config` enables ([`executors_for`]); while it
    /// runs, the container executor (when offered) removes this worker id's orphaned
    /// containers at start and then every 5 minutes.
    pub async fn new(config: WorkerConfig) -> anyhow::Result<Self> {
        let worker_id = config.worker_id.unwrap_or_else(Uuid::now_v7);
        let offered = offered_executors(&config, worker_id).await;
        let mut worker = Self::build(config, worker_id, offered.executors)?;
        worker.container = offered.container;
        worker.ssh = offered.ssh;
        Ok(worker)
    }

    /// A worker offering exactly `executors` (keyed by [`Executor::name`]).
    ///
    /// Fails when there is no executor, the api URL is not an `http(s)://` URL, or the token
    /// cannot be sent in a header.
    pub fn with_executors(
        config: WorkerConfig,
        executors: HashMap<&'static str, Arc<dyn Executor>>,
    ) -> anyhow::Result<Self> {
        let worker_id = config.worker_id.unwrap_or_else(Uuid::now_v7);
        Self::build(config, worker_id, executors)
    }

    fn build(
        config: WorkerConfig,
        worker_id: Uuid,
        executors: HashMap<&'static str, Arc<dyn Executor>>,
    ) -> anyhow::Result<Self> {
        if executors.is_empty() {
            bail!("this worker offers no executor, so it could never run a job");
        }
        let ca = config
            .api_ca
            .as_ref()
            .map(|path| {
                std::fs::read(path)
                    .map(tonic::transport::Certificate::from_pem)
                    .with_context(|| format!("BATON_API_CA: cannot read {}", path.display()))
            })
            .transpose()?;
        let apis = parse_api_urls(&config.api_url)
            .map_err(|e| anyhow::anyhow!(e))?
            .into_iter()
            .map(|url| {
                Ok(ApiEndpoint {
                    endpoint: endpoint(&url, ca.as_ref())?,
                    url,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let authorization =
            MetadataValue::try_from(format!("Bearer {}", config.token)).map_err(|_| {
                anyhow::anyhow!(
                    "the worker token contains characters that cannot be sent in a header"
                )
            })?;
        if config.token.trim().is_empty() {
            bail!("the worker token is empty (set --token or BATON_WORKER_TOKEN)");
        }
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".to_owned());
        let name = config
            .name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| hostname.clone());
        let files = ScratchDir::create(config.scratch_dir.as_deref())
            .context("cannot create the worker's private temporary directory")?;
        let (changes, _) = watch::channel(0);
        Ok(Worker {
            shared: Arc::new(Shared {
                config,
                worker_id,
                name,
                hostname,
                executors,
                files,
                apis,
                authorization,
                tasks: TaskTracker::new(),
                state: Mutex::new(State::default()),
                changes,
                runs: crate::metrics::RunCounts::default(),
            }),
            container: None,
            ssh: None,
        })
    }

    /// The worker id sent in `Hello` ([`WorkerConfig::worker_id`], else a UUIDv7 made once per
    /// worker).
    pub fn id(&self) -> Uuid {
        self.shared.worker_id
    }

    /// Runs until `shutdown` resolves, then drains: sends `Drain`, lets running jobs finish
    /// for up to [`WorkerConfig::drain_timeout`], cancels the rest, waits (bounded) for their
    /// completions to be acknowledged, and returns `Ok(())`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let shared = self.shared;
        let stop = CancellationToken::new();
        let container = self.container;
        let metrics =
            match shared.config.metrics_listen {
                Some(address) => {
                    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| {
                    format!("cannot listen for metrics on {address} (BATON_WORKER_METRICS_LISTEN)")
                })?;
                    tracing::info!(address = ?listener.local_addr().ok(), "serving metrics");
                    let sources = crate::metrics::Sources {
                        shared: shared.clone(),
                        container: container.clone(),
                        ssh: self.ssh.clone(),
                    };
                    Some(tokio::spawn(crate::metrics::serve(
                        listener,
                        sources,
                        stop.child_token(),
                    )))
                }
                None => None,
            };
        let reaper = container.as_ref().map(|c| {
            // Orphans first (a crashed predecessor's containers, spares included), then the
            // spares of the default images.
            let reaper = c.spawn_reaper(REAP_INTERVAL, stop.child_token());
            c.prewarm();
            reaper
        });
        tracing::info!(
            worker.id = %shared.worker_id,
            name = %shared.name,
            api = %shared.config.api_url,
            slots = shared.config.slots,
            executors = ?shared.executor_names(),
            "baton-worker starting"
        );
        let mut sessions = tokio::spawn(session::run(shared.clone(), stop.clone()));

        // The sessions end on their own only when the api refuses this worker for good.
        let refused = tokio::select! {
            _ = shutdown => None,
            ended = &mut sessions => Some(match ended {
                Ok(Err(e)) => e,
                Ok(Ok(())) => anyhow::anyhow!("the api sessions ended"),
                Err(e) => anyhow::anyhow!("the session task failed: {e}"),
            }),
        };
        if let Some(error) = refused {
            stop.cancel();
            shared.cancel_all();
            if let Some(reaper) = reaper {
                let _ = reaper.await;
            }
            if let Some(container) = &container {
                container.shutdown().await;
            }
            shared.tasks.close();
            let _ = tokio::time::timeout(FINAL_ACK_WAIT, shared.tasks.wait()).await;
            return Err(error);
        }
        let running = shared.lock().running;
        tracing::info!(
            running,
            drain_timeout = ?shared.config.drain_timeout,
            "shutting down: draining"
        );
        shared.start_draining();
        let drain = shared.config.drain_timeout;
        if tokio::time::timeout(drain, shared.wait_until(|s| s.running == 0))
            .await
            .is_err()
        {
            let running = shared.lock().running;
            tracing::warn!(
                running,
                "drain timeout reached: cancelling the remaining runs"
            );
            shared.cancel_all();
        }
        let settled = tokio::time::timeout(
            FINAL_ACK_WAIT,
            shared.wait_until(|s| s.running == 0 && s.jobs.is_empty()),
        )
        .await
        .is_ok();
        if !settled {
            let held = shared.lock().jobs.len();
            tracing::warn!(
                held,
                "exiting with completions not acknowledged; the api re-queues these jobs when their leases expire"
            );
            shared.cancel_all();
        }
        stop.cancel();
        match sessions.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the api sessions ended with an error"),
            Err(e) => tracing::warn!(error = %e, "session task failed"),
        }
        if let Some(reaper) = reaper
            && let Err(e) = reaper.await
        {
            tracing::warn!(error = %e, "container reaper task failed");
        }
        if let Some(container) = &container {
            container.shutdown().await;
        }
        shared.tasks.close();
        if tokio::time::timeout(FINAL_ACK_WAIT, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some job tasks did not end in time");
        }
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        tracing::info!("baton-worker stopped");
        Ok(())
    }
}

/// Runs a worker with `config` until `shutdown` resolves (see [`Worker::run`]).
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Worker::new(config).await?.run(shutdown).await
}

/// One api replica the worker may hold its session with.
pub(crate) struct ApiEndpoint {
    /// As given in `--api-url` (for logs).
    pub(crate) url: String,
    pub(crate) endpoint: Endpoint,
}

/// The endpoint of one api URL; `https://` verifies the api's certificate against `ca`
/// (`BATON_API_CA`) when given, else against the system's trusted roots.
fn endpoint(url: &str, ca: Option<&tonic::transport::Certificate>) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("invalid api URL `{url}`"))?;
    let endpoint = match endpoint.uri().scheme_str() {
        Some("http") => endpoint,
        Some("https") => endpoint
            .tls_config(match ca {
                Some(ca) => ClientTlsConfig::new().ca_certificate(ca.clone()),
                None => ClientTlsConfig::new().with_native_roots(),
            })
            .with_context(|| format!("cannot set up TLS for `{url}`"))?,
        _ => bail!("invalid api URL `{url}`: expected http://HOST:PORT or https://HOST:PORT"),
    };
    Ok(endpoint
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    #[test]
    fn re_sends_back_off_doubling_to_a_cap() {
        let delays: Vec<u64> = (1..=7)
            .map(|n| resend_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(delays, vec![250, 500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(resend_delay(u32::MAX), MAX_RESEND_DELAY);
    }

    #[test]
    fn refuses_to_start_without_executors() {
        let config = WorkerConfig::new("http://127.0.0.1:1", "t");
        let err = Worker::with_executors(config, HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("offers no executor"), "{err}");
    }

    #[tokio::test]
    async fn keeps_a_configured_id() {
        let mut config = WorkerConfig::new("http://127.0.0.1:1", "t");
        config.no_container = true;
        let id = Uuid::now_v7();
        config.worker_id = Some(id);
        let worker = Worker::new(config).await.unwrap();
        assert_eq!(worker.id(), id);
        assert!(worker.container.is_none());
        assert_eq!(worker.shared.hello().executors, vec!["ssh".to_owned()]);
    }

    #[tokio::test]
    async fn validates_url_and_token() {
        let mut config = WorkerConfig::new("ftp://x", "t");
        config.allow_local = true;
        config.no_container = true;
        let err = Worker::new(config.clone()).await.unwrap_err();
        assert!(
            err.to_string().contains("invalid api URL `ftp://x`"),
            "{err}"
        );
        config.api_url = "http://127.0.0.1:8081, ftp://y".into();
        let err = Worker::new(config.clone()).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid api URL `ftp://y` (entry 2)"),
            "{err}"
        );
        config.api_url = "http://127.0.0.1:8081,http://127.0.0.1:8082".into();
        let two = Worker::new(config.clone()).await.unwrap();
        let urls: Vec<&str> = two.shared.apis.iter().map(|a| a.url.as_str()).collect();
        assert_eq!(urls, ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]);
        config.api_url = "http://127.0.0.1:8081".into();
        config.token = "bad\ntoken".into();
        assert!(Worker::new(config.clone()).await.is_err());
        config.token = "ok".into();
        let worker = Worker::new(config).await.unwrap();
        assert_eq!(worker.id().get_version_num(), 7);
        let hello = worker.shared.hello();
        assert_eq!(hello.executors, vec!["local".to_owned(), "ssh".to_owned()]);
        assert_eq!((hello.slots, hello.free_slots), (4, 4));
        assert!(!hello.hostname.is_empty());
        assert_eq!(hello.name, hello.hostname);
    }
}
