//! The dispatcher: hands queued jobs to the workers connected to this replica.
//!
//! Each replica runs one. It sleeps until something can have changed — a `NOTIFY` that a job
//! became queued (on any replica), a worker slot freed, a worker connected, or the next delayed
//! job falling due — then claims, for each connected worker with free slots, up to that many
//! jobs in one statement and pushes them down the worker's stream. A slow fallback timer only
//! covers notifications lost while the listener reconnected. Workers are served round-robin so
//! one fast worker cannot starve the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_proto::ServerMsg;
use baton_proto::v1::{Assignment, Cancel, ServerMessage};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::storage::queue::{self, ClaimRequest, ClaimedJob};

/// How often the dispatcher looks for work even without a notification.
const FALLBACK_POLL: Duration = Duration::from_secs(5);
/// How soon to look again for a delayed job the database does not yet consider due although
/// this host's clock says it is.
const CLOCK_SKEW_RETRY: Duration = Duration::from_millis(20);

/// The sending half of a worker's stream.
pub type WorkerTx = mpsc::Sender<Result<ServerMessage, tonic::Status>>;

/// A worker connected to this replica.
#[derive(Debug)]
pub struct WorkerConn {
    pub conn_id: u64,
    pub worker_id: Uuid,
    pub executors: Vec<String>,
    pub labels: serde_json::Map<String, Value>,
    pub slots: u32,
    /// Jobs this worker holds through this connection: job id → fencing token.
    held: Mutex<HashMap<Uuid, i64>>,
    /// The secret values in the assignment of each job dispatched through this connection (what
    /// its script can print), so the session masks its reports without a query.
    secrets: Mutex<HashMap<Uuid, Arc<Vec<String>>>>,
    /// What the metrics need of each job dispatched through this connection.
    runs: Mutex<HashMap<Uuid, RunInfo>>,
    draining: AtomicBool,
    pub tx: WorkerTx,
}

impl WorkerConn {
    pub fn free_slots(&self) -> u32 {
        self.slots.saturating_sub(self.held_count())
    }

    pub fn held_count(&self) -> u32 {
        u32::try_from(self.lock_held().len()).unwrap_or(u32::MAX)
    }

    /// The token this connection holds the job under, if any.
    pub fn token_of(&self, job_id: Uuid) -> Option<i64> {
        self.lock_held().get(&job_id).copied()
    }

    pub fn hold(&self, job_id: Uuid, token: i64) {
        self.lock_held().insert(job_id, token);
    }

    /// Forgets a job (finished or lost); returns whether it was held.
    pub fn release(&self, job_id: Uuid) -> bool {
        self.lock_secrets().remove(&job_id);
        lock(&self.runs).remove(&job_id);
        self.lock_held().remove(&job_id).is_some()
    }

    /// The executor and assignment time of a job dispatched through this connection (none
    /// for a job resumed after a reconnect).
    pub fn run_of(&self, job_id: Uuid) -> Option<RunInfo> {
        lock(&self.runs).get(&job_id).cloned()
    }

    /// The secret values job `job_id` was dispatched with through this connection (none for a
    /// job resumed after a reconnect: the session then loads them).
    pub fn secrets_of(&self, job_id: Uuid) -> Option<Arc<Vec<String>>> {
        self.lock_secrets().get(&job_id).cloned()
    }

    fn lock_secrets(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Vec<String>>>> {
        self.secrets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn held_jobs(&self) -> Vec<(Uuid, i64)> {
        self.lock_held()
            .iter()
            .map(|(id, token)| (*id, *token))
            .collect()
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, i64>> {
        // A panic while holding this lock cannot leave the map inconsistent; keep serving.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A dispatched job, as the metrics see it.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub executor: String,
    pub assigned: std::time::Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Job slots of the workers connected to one replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slots {
    pub total: u64,
    pub busy: u64,
}

#[derive(Debug)]
pub struct Dispatcher {
    pool: PgPool,
    lease: Duration,
    chain_depth_limit: i32,
    vault: crate::crypto::Vault,
    conns: Mutex<Vec<Arc<WorkerConn>>>,
    wake: Notify,
    /// Set when a job that is not yet due may have been queued: the next pass asks the
    /// database when the earliest one is due instead of trusting what it learnt before.
    due_unknown: AtomicBool,
    next_conn_id: AtomicU64,
    round_robin: AtomicUsize,
}

impl Dispatcher {
    pub fn new(
        pool: PgPool,
        lease: Duration,
        chain_depth_limit: i32,
        vault: crate::crypto::Vault,
    ) -> Arc<Self> {
        Arc::new(Self {
            pool,
            lease,
            chain_depth_limit,
            vault,
            conns: Mutex::new(Vec::new()),
            wake: Notify::new(),
            due_unknown: AtomicBool::new(true),
            next_conn_id: AtomicU64::new(1),
            round_robin: AtomicUsize::new(0),
        })
    }

    /// Asks the dispatch loop to look for work (cheap; coalesces).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A job was queued to run later (or notifications may have been missed): the loop must
    /// find out again when the next delayed job is due.
    pub fn wake_for_later(&self) {
        self.due_unknown.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Registers a worker's connection; it gets work from the next dispatch pass.
    pub fn connect(
        &self,
        worker_id: Uuid,
        executors: Vec<String>,
        labels: serde_json::Map<String, Value>,
        slots: u32,
        held: HashMap<Uuid, i64>,
        tx: WorkerTx,
    ) -> Arc<WorkerConn> {
        let conn = Arc::new(WorkerConn {
            conn_id: self.next_conn_id.fetch_add(1, Ordering::Relaxed),
            worker_id,
            executors,
            labels,
            slots,
            held: Mutex::new(held),
            secrets: Mutex::new(HashMap::new()),
            runs: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            tx,
        });
        self.lock_conns().push(conn.clone());
        self.wake();
        conn
    }

    pub fn disconnect(&self, conn: &WorkerConn) {
        self.lock_conns().retain(|c| c.conn_id != conn.conn_id);
    }

    /// Passes a cancel request to the worker running `job_id`, if it is connected here;
    /// `force`: kill the run at once, without the grace.
    pub fn cancel(&self, job_id: Uuid, reason: &str, force: bool) -> bool {
        let conns = self.lock_conns().clone();
        for conn in conns {
            if conn.token_of(job_id).is_some() {
                let msg = ServerMessage {
                    msg: Some(ServerMsg::Cancel(Cancel {
                        job_id: job_id.to_string(),
                        reason: reason.to_owned(),
                        force,
                    })),
                };
                return conn.tx.try_send(Ok(msg)).is_ok();
            }
        }
        false
    }

    /// The slots of the workers connected to this replica: all, and those holding a job.
    pub fn slots(&self) -> Slots {
        self.lock_conns()
            .iter()
            .fold(Slots::default(), |acc, c| Slots {
                total: acc.total + u64::from(c.slots),
                busy: acc.busy + u64::from(c.held_count().min(c.slots)),
            })
    }

    pub fn connected_workers(&self) -> usize {
        self.lock_conns().len()
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, Vec<Arc<WorkerConn>>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The dispatch loop; returns when `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        // When the earliest delayed job is due, as last read (`None`: there was none).
        let mut next_due = None;
        loop {
            let sleep_for = match self.dispatch_pass(&mut next_due).await {
                Ok(sleep_for) => sleep_for,
                Err(e) => {
                    tracing::warn!(error = %e, "dispatch pass failed; retrying shortly");
                    Duration::from_millis(500)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                // A delayed job is due, or the fallback poll: either way, read again.
                _ = tokio::time::sleep(sleep_for) => self.due_unknown.store(true, Ordering::SeqCst),
            }
        }
    }

    /// Claims and pushes work until no worker with free slots gets a full batch; returns how
    /// long to sleep before the next pass if nothing wakes the loop.
    async fn dispatch_pass(
        &self,
        next_due: &mut Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Duration, crate::storage::StorageError> {
        loop {
            let conns = self.lock_conns().clone();
            if conns.is_empty() {
                return Ok(FALLBACK_POLL);
            }
            let start = self.round_robin.fetch_add(1, Ordering::Relaxed) % conns.len();
            // The variables of each event seen in this pass: many jobs of one event are
            // usually claimed together.
            let mut variables = HashMap::new();
            let mut any_full_batch = false;
            let mut any_free = false;
            // Offers (executors, labels) whose claim came back short: the queue holds nothing
            // more for a worker offering the same, so it is not asked again in this pass (with
            // many alike workers and a drained queue, one claim per wake instead of one per
            // worker).
            let mut drained: Vec<&WorkerConn> = Vec::new();
            for i in 0..conns.len() {
                let conn = &conns[(start + i) % conns.len()];
                let free = conn.free_slots();
                if free == 0 || conn.draining.load(Ordering::SeqCst) || conn.tx.is_closed() {
                    continue;
                }
                any_free = true;
                if drained
                    .iter()
                    .any(|d| d.executors == conn.executors && d.labels == conn.labels)
                {
                    continue;
                }
                let jobs = queue::claim_batch(
                    &self.pool,
                    &ClaimRequest {
                        worker_id: conn.worker_id,
                        executors: &conn.executors,
                        labels: &conn.labels,
                        limit: i64::from(free),
                        lease: self.lease,
                    },
                )
                .await?;
                if jobs.len() == free as usize {
                    any_full_batch = true;
                } else {
                    drained.push(conn);
                }
                // A job that cannot be handed over for a passing reason goes back to the queue;
                // the rest of the batch is still handed over.
                let mut failure = None;
                for job in jobs {
                    if let Err(e) = self.push(conn, &job, &mut variables).await {
                        tracing::warn!(job.id = %job.id, error = %e, "could not dispatch the job; giving it back");
                        self.give_back(&job);
                        failure.get_or_insert(e);
                    }
                }
                if let Some(e) = failure {
                    return Err(e);
                }
            }
            if !any_full_batch {
                if !any_free {
                    return Ok(FALLBACK_POLL);
                }
                // Sleep until the next delayed job is due (or the fallback, whichever is first).
                // The database is asked only when that may have changed: a delayed job was
                // queued, or the one known is due now.
                let now = chrono::Utc::now();
                if self.due_unknown.swap(false, Ordering::SeqCst)
                    || next_due.is_some_and(|at| at <= now)
                {
                    match queue::next_due_at(&self.pool).await {
                        Ok(at) => *next_due = at,
                        Err(e) => {
                            self.due_unknown.store(true, Ordering::SeqCst);
                            return Err(e);
                        }
                    }
                }
                // A time already past (this host's clock ahead of the database's): look again
                // shortly rather than at the fallback poll.
                let until_due = next_due
                    .map(|at| (at - now).to_std().unwrap_or(CLOCK_SKEW_RETRY))
                    .map_or(FALLBACK_POLL, |d| d.min(FALLBACK_POLL));
                return Ok(until_due + Duration::from_millis(1));
            }
        }
    }

    /// Hands a claimed job to its worker. An error is a passing one (the database): the
    /// caller gives the job back. A job that can never run is failed here, with its actions.
    async fn push(
        &self,
        conn: &WorkerConn,
        job: &ClaimedJob,
        variables: &mut HashMap<Uuid, (Value, Arc<Vec<String>>)>,
    ) -> Result<(), crate::storage::StorageError> {
        let (vars, secrets) = match variables.get(&job.event_id) {
            Some(v) => v,
            None => {
                let (values, secrets) =
                    crate::secrets::readable_variables(&self.pool, &self.vault, job.event_id)
                        .await?;
                variables
                    .entry(job.event_id)
                    .or_insert((json!(values), Arc::new(secrets)))
            }
        };
        let secrets = secrets.clone();
        let span = tracing::info_span!("job.dispatch", job.id = %job.id, event.id = %job.event_id,
                                       attempt = job.attempt, worker.id = %conn.worker_id,
                                       trace_id = tracing::field::Empty);
        let traceparent = baton_telemetry::link(&span, job.trace_context.as_deref());
        let mut assignment = assignment(job, vars);
        assignment.traceparent = traceparent.unwrap_or_default();
        match self.server_for(job).await {
            Ok(server) => {
                assignment.server_json = server.map(|s| s.to_string()).unwrap_or_default()
            }
            Err(ServerProblem::Passing(e)) => return Err(e),
            Err(ServerProblem::Permanent(reason)) => {
                return self.fail_unrunnable(job, reason).await;
            }
        }
        conn.lock_secrets().insert(job.id, secrets);
        lock(&conn.runs).insert(
            job.id,
            RunInfo {
                executor: job
                    .spec
                    .0
                    .get("executor")
                    .and_then(Value::as_str)
                    .unwrap_or("container")
                    .to_owned(),
                assigned: std::time::Instant::now(),
            },
        );
        conn.hold(job.id, job.lease_token);
        let msg = ServerMessage {
            msg: Some(ServerMsg::Assignment(assignment)),
        };
        if conn.tx.try_send(Ok(msg)).is_err() {
            // The stream is gone or hopelessly behind: give the job back untouched.
            conn.release(job.id);
            tracing::warn!(job.id = %job.id, worker.id = %conn.worker_id, "could not hand job to worker; requeued");
            self.give_back(job);
        } else {
            let waited = (chrono::Utc::now() - job.run_at)
                .to_std()
                .unwrap_or_default();
            metrics::histogram!(crate::metrics::DISPATCH_LATENCY).record(waited.as_secs_f64());
            tracing::debug!(job.id = %job.id, worker.id = %conn.worker_id, attempt = job.attempt, "assigned");
        }
        Ok(())
    }

    /// Puts a claimed job that was not handed over back in the queue as if it had never been
    /// claimed: no attempt and no lease loss used. The database may be what failed, so this
    /// keeps trying (in the background) until it works or the lease has expired anyway.
    fn give_back(&self, job: &ClaimedJob) {
        let pool = self.pool.clone();
        let (id, token, expires) = (job.id, job.lease_token, job.lease_expires_at);
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(50);
            loop {
                match queue::release(&pool, id, token).await {
                    Ok(_) => return,
                    Err(e) if chrono::Utc::now() < expires => {
                        tracing::warn!(job.id = %id, error = %e, "cannot give the job back yet; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        tracing::error!(job.id = %id, error = %e, "could not give the job back before its lease expired; the reaper takes it");
                        return;
                    }
                }
            }
        });
    }
}

/// Why an ssh job's server could not be put into its assignment.
#[derive(Debug)]
enum ServerProblem {
    /// The database failed (a timeout, a lost connection…): try again later.
    Passing(crate::storage::StorageError),
    /// The job can never run as it is (the server is gone, its credentials are unreadable).
    Permanent(String),
}

impl Dispatcher {
    /// For an ssh job: its server with decrypted credentials, as the worker's executor takes it.
    async fn server_for(&self, job: &ClaimedJob) -> Result<Option<Value>, ServerProblem> {
        use crate::storage::{StorageError, servers};
        let Some(server_id) = job.spec.0.get("server_id").and_then(Value::as_str) else {
            return Ok(None);
        };
        let id = Uuid::parse_str(server_id).map_err(|_| {
            ServerProblem::Permanent(format!("the job's server_id {server_id:?} is not a UUID"))
        })?;
        let loaded = |e: StorageError| match e {
            StorageError::ServerNotFound(_) => ServerProblem::Permanent(format!(
                "the job's server {id} no longer exists (deleted)"
            )),
            e => ServerProblem::Passing(e),
        };
        let server = servers::get_server(&self.pool, id).await.map_err(loaded)?;
        let sealed = servers::sealed_credentials(&self.pool, id)
            .await
            .map_err(loaded)?;
        let plain = self.vault.open(&sealed, id.as_bytes()).map_err(|e| {
            ServerProblem::Permanent(format!("the credentials of server {id}: {e}"))
        })?;
        let credentials: crate::model::server::Credentials = serde_json::from_slice(&plain)
            .map_err(|_| {
                ServerProblem::Permanent(format!(
                    "the stored credentials of server {id} are unreadable"
                ))
            })?;
        Ok(Some(json!({
            "server_id": server.id,
            "name": server.name,
            "host": server.host,
            "port": server.port,
            "username": server.username,
            "auth": credentials,
            "host_key_policy": server.host_key_policy,
            "host_key": server.host_key,
            "max_concurrent": server.max_concurrent,
        })))
    }

    /// A job that cannot be handed to any worker (its server was deleted, its credentials are
    /// unreadable): fail it now with the reason rather than let it bounce between workers. Its
    /// actions (`on_failure`, `always`) are evaluated in the same transaction.
    async fn fail_unrunnable(
        &self,
        job: &ClaimedJob,
        reason: String,
    ) -> Result<(), crate::storage::StorageError> {
        tracing::error!(job.id = %job.id, %reason, "job cannot be dispatched");
        let mut outcome = queue::Outcome::failure(
            crate::model::job::ErrorKind::Infrastructure,
            format!("cannot be dispatched: {reason}"),
        );
        outcome.retryable = false;
        let mut tx = self.pool.begin().await?;
        let done = queue::complete(&mut tx, job.id, job.lease_token, &outcome).await?;
        if let queue::Completion::Finished {
            has_actions: true, ..
        } = done
        {
            crate::actions::after_terminal(&mut tx, &self.vault, self.chain_depth_limit, job.id)
                .await?;
        }
        tx.commit().await?;
        crate::metrics::run_ended(None, done, &outcome);
        Ok(())
    }
}

/// The assignment for a claimed job, with the metadata the runtime helpers expose.
fn assignment(job: &ClaimedJob, variables: &Value) -> Assignment {
    let spec = &job.spec.0;
    let context = json!({
        "event": {
            "job_id": job.id,
            "event_id": job.event_id,
            "event_name": spec.get("name"),
            "attempt": job.attempt,
            "parent_job_id": job.parent_job_id,
            "root_job_id": job.root_job_id,
            "runtime": spec.get("runtime"),
            "executor": spec.get("executor"),
        },
        "variables": variables,
    });
    Assignment {
        job_id: job.id.to_string(),
        lease_token: job.lease_token,
        event_id: job.event_id.to_string(),
        attempt: job.attempt,
        spec_json: spec.to_string(),
        input_json: job.input.0.to_string(),
        parent_job_id: job.parent_job_id.map(|p| p.to_string()).unwrap_or_default(),
        root_job_id: job.root_job_id.to_string(),
        context_json: context.to_string(),
        lease_expires_at_ms: job.lease_expires_at.timestamp_millis(),
        server_json: String::new(),
        log_seq_base: job.last_log_seq,
        traceparent: String::new(),
    }
}
