//! Pre-started containers ("spares"), so that creating and starting a container — most of a
//! short run's cost on a slow engine — happens before a job arrives rather than on its critical
//! path.
//!
//! A spare is a container made exactly as a run's container would be for one *configuration*
//! ([`SpareKey`]: image, network mode and limits; the hardening is the executor's and the same
//! for all), except that its command is an idle process ([`IDLE_COMMAND`], `cat` under the init
//! process) running as a user other than the runs' ([`idle_user`]), and that it carries
//! [`LABEL_SPARE`](super::LABEL_SPARE) instead of a job id.
//!
//! A spare dies with its worker by construction: the idle process reads the container's
//! stdin, which the worker holds open through an attach connection made before the start
//! (`OpenStdin` + `StdinOnce`); the container is `AutoRemove`. When the worker process ends in
//! any way (SIGKILL, OOM, node loss) its connections close, the engine closes the container's
//! stdin, `cat` reads end-of-file and exits, and the engine removes the container. No other
//! process has to notice the crash or know the worker's id. A run whose configuration
//! matches takes one ([`SparePool::take`]), receives its files through the archive API and is
//! started as an exec in it (see `exec.rs`); the container is removed after that one run, never
//! reused. Taking a spare (or failing to find one) asks for a replacement, started in the
//! background.
//!
//! Bounds: at most `per_config` spares for each of at most `max_configs` configurations (the
//! least recently used configuration is dropped for a new one), and a configuration unused for
//! `ttl` loses its spares. A configuration whose spare cannot be created or started (an image
//! without `cat`, an engine error) is not retried for [`RETRY_AFTER`]; its runs take the cold
//! path meanwhile.
//!
//! Every spare is registered in the executor's live map (with the nil job id) from before it is
//! created until it is removed, so the executor's reaper never takes a spare of its own for an
//! orphan; the spares of a crashed worker are not in any live map and are reaped like its other
//! containers. [`SparePool::shutdown`] removes them all (the worker calls it on exit).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::{engine_message, is_being_removed, is_not_found};

/// The idle process of a spare (run by the init process, so it is PID 2 and ends on the
/// container's `SIGTERM`): it waits for the end of its stdin, the worker's attach connection
/// (see the module documentation). Every image has `cat`; an image without it cannot have
/// spares and its runs take the cold path (see [`RETRY_AFTER`]).
pub(crate) const IDLE_COMMAND: [&str; 1] = ["cat"];

/// The worker's end of a spare's stdin. Holding it keeps the spare's idle process waiting;
/// dropping it (or the worker process dying) ends the spare.
pub(crate) struct StdinHold {
    _attach: bollard::container::AttachContainerResults,
}

/// Creates an idle container (a spare's `body`), attaches to its stdin (before the start: a
/// worker dying at any point after the start leaves no container behind) and starts it. The
/// idle process runs as long as the returned hold is kept.
pub(crate) async fn start_idle(
    docker: &Docker,
    name: &str,
    body: ContainerCreateBody,
) -> Result<StdinHold, String> {
    let options = CreateContainerOptionsBuilder::new().name(name).build();
    docker
        .create_container(Some(options), body)
        .await
        .map_err(|e| format!("create: {}", engine_message(&e)))?;
    let attach = AttachContainerOptionsBuilder::new()
        .stream(true)
        .stdin(true)
        .stdout(false)
        .stderr(false)
        .logs(false)
        .build();
    let attached = docker
        .attach_container(name, Some(attach))
        .await
        .map_err(|e| format!("attach: {}", engine_message(&e)))?;
    let hold = StdinHold { _attach: attached };
    docker
        .start_container(name, None)
        .await
        .map_err(|e| format!("start: {}", engine_message(&e)))?;
    Ok(hold)
}

/// How long a configuration whose spare failed is left without spares.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(60);

/// The user of a spare's idle process: not the runs' user, so that the runs' user can signal
/// every process of a run at once (`kill -TERM -1`) without ending the idle process, which
/// would stop the container. `nobody` (65534), or 65533 when the runs run as 65534.
pub(crate) fn idle_user(run_uid: u64) -> u64 {
    if run_uid == 65534 { 65533 } else { 65534 }
}

/// What a spare must match for a run to use it. Everything else about a container (user,
/// capabilities, read-only root, init) is the executor's configuration, the same for all runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SpareKey {
    pub image: String,
    pub network_mode: String,
    pub memory_mib: u64,
    /// `f64::to_bits` of the CPU limit (exact match; no arithmetic on it).
    pub cpus_bits: u64,
    pub pids: u64,
    pub tmp_mib: u64,
    pub work_mib: u64,
}

/// Counters of the pool, for operators and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpareStats {
    /// Runs that used a spare.
    pub warm_runs: u64,
    /// Runs that found no usable spare and created their container (spares on, eligible run).
    pub cold_runs: u64,
    /// Spares started since the executor was made.
    pub started: u64,
    /// Spares ready now.
    pub idle: usize,
}

/// The spares of one configuration.
struct Entry {
    /// How a spare of this configuration is created.
    body: ContainerCreateBody,
    /// Started spares, by container name.
    ready: Vec<String>,
    /// Spares being created and started.
    starting: usize,
    last_used: Instant,
    /// No new spares before this instant (a spare of this configuration failed).
    paused_until: Option<Instant>,
}

#[derive(Default)]
struct State {
    entries: HashMap<SpareKey, Entry>,
    warm_runs: u64,
    cold_runs: u64,
    started: u64,
}

struct Inner {
    docker: Docker,
    worker_id: String,
    /// The executor's live map (container name → job id; the nil id for a spare).
    live: Arc<Mutex<HashMap<String, Uuid>>>,
    /// The stdin of every spare this pool started and that is not removed yet (taken ones
    /// included: a run in a spare needs it alive), by container name.
    holds: Mutex<HashMap<String, StdinHold>>,
    per_config: usize,
    max_configs: usize,
    state: Mutex<State>,
    tasks: TaskTracker,
    closed: CancellationToken,
}

/// The pool of spares of one executor. See the [module documentation](self).
pub(crate) struct SparePool {
    inner: Arc<Inner>,
}

impl SparePool {
    /// A pool keeping `per_config` (≥ 1) spares for each of at most `max_configs` (≥ 1)
    /// configurations, dropping those unused for `ttl`. Starts the expiry task (needs a runtime).
    pub(crate) fn new(
        docker: Docker,
        worker_id: String,
        live: Arc<Mutex<HashMap<String, Uuid>>>,
        per_config: usize,
        max_configs: usize,
        ttl: Duration,
    ) -> Self {
        let inner = Arc::new(Inner {
            docker,
            worker_id,
            live,
            holds: Mutex::new(HashMap::new()),
            per_config: per_config.max(1),
            max_configs: max_configs.max(1),
            state: Mutex::new(State::default()),
            tasks: TaskTracker::new(),
            closed: CancellationToken::new(),
        });
        // A weak reference: the expiry task must not keep a dropped pool alive.
        let weak = Arc::downgrade(&inner);
        let closed = inner.closed.clone();
        inner.tasks.spawn(expire_loop(weak, closed, ttl));
        SparePool { inner }
    }

    /// Takes a ready spare of `key`, if there is one, and asks for a replacement. `body` is how
    /// a spare of `key` is made (kept for later refills). The caller owns the returned
    /// container: it registers it as its run's and removes it.
    pub(crate) fn take(
        &self,
        key: &SpareKey,
        body: impl FnOnce() -> ContainerCreateBody,
    ) -> Option<String> {
        let taken = {
            let mut state = self.inner.lock();
            let taken = self.inner.entry(&mut state, key, body).ready.pop();
            if taken.is_some() {
                state.warm_runs += 1;
            } else {
                state.cold_runs += 1;
            }
            taken
        };
        self.inner.refill(key);
        taken
    }

    /// Makes sure `key` has its spares (started in the background), as if a run had just used
    /// it. For the default configurations at worker start.
    pub(crate) fn warm(&self, key: &SpareKey, body: impl FnOnce() -> ContainerCreateBody) {
        {
            let mut state = self.inner.lock();
            self.inner.entry(&mut state, key, body);
        }
        self.inner.refill(key);
    }

    /// The taken spare of `key` could not be used (its idle process is not running, say): no
    /// new spares of `key` for [`RETRY_AFTER`]. The caller removes the container.
    pub(crate) fn failed(&self, key: &SpareKey, reason: &str) {
        tracing::warn!(image = %key.image, reason,
            "a spare container could not be used; runs of this configuration take the cold path for a while");
        let mut state = self.inner.lock();
        if let Some(entry) = state.entries.get_mut(key) {
            entry.paused_until = Some(Instant::now() + RETRY_AFTER);
        }
    }

    /// The spare `name` (taken by a run) was removed: lets go of its stdin.
    pub(crate) fn removed(&self, name: &str) {
        self.inner.release(name);
    }

    pub(crate) fn stats(&self) -> SpareStats {
        let state = self.inner.lock();
        SpareStats {
            warm_runs: state.warm_runs,
            cold_runs: state.cold_runs,
            started: state.started,
            idle: state.entries.values().map(|e| e.ready.len()).sum(),
        }
    }

    /// Stops making spares, waits for those being started and removes every spare. Idempotent.
    pub(crate) async fn shutdown(&self) {
        self.inner.closed.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        let names: Vec<String> = {
            let mut state = self.inner.lock();
            state.entries.drain().flat_map(|(_, e)| e.ready).collect()
        };
        futures::future::join_all(names.iter().map(|n| self.inner.remove(n))).await;
    }
}

impl Drop for SparePool {
    /// Without [`SparePool::shutdown`]: removes the ready spares in the background when a
    /// runtime is there (else the next reaper of this worker id will).
    fn drop(&mut self) {
        self.inner.closed.cancel();
        let names: Vec<String> = {
            let mut state = self.inner.lock();
            state.entries.drain().flat_map(|(_, e)| e.ready).collect()
        };
        if names.is_empty() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                count = names.len(),
                "cannot remove the spare containers (no runtime); the reaper will"
            );
            return;
        };
        let inner = Arc::clone(&self.inner);
        handle.spawn(async move {
            futures::future::join_all(names.iter().map(|n| inner.remove(n))).await;
        });
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (plain inserts and pops).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry of `key`, made (dropping the least recently used one past the bound) if new;
    /// marked used now.
    fn entry<'s>(
        &self,
        state: &'s mut State,
        key: &SpareKey,
        body: impl FnOnce() -> ContainerCreateBody,
    ) -> &'s mut Entry {
        if !state.entries.contains_key(key) && state.entries.len() >= self.max_configs {
            let oldest = state
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest
                && let Some(entry) = state.entries.remove(&oldest)
            {
                self.discard(entry.ready);
            }
        }
        let entry = state.entries.entry(key.clone()).or_insert_with(|| Entry {
            body: body(),
            ready: Vec::new(),
            starting: 0,
            last_used: Instant::now(),
            paused_until: None,
        });
        entry.last_used = Instant::now();
        entry
    }

    /// Starts as many spares of `key` as it lacks.
    fn refill(self: &Arc<Self>, key: &SpareKey) {
        if self.closed.is_cancelled() {
            return;
        }
        let mut state = self.lock();
        let Some(entry) = state.entries.get_mut(key) else {
            return;
        };
        if entry.paused_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let missing = self
            .per_config
            .saturating_sub(entry.ready.len() + entry.starting);
        for _ in 0..missing {
            entry.starting += 1;
            let this = Arc::clone(self);
            let key = key.clone();
            let body = entry.body.clone();
            self.tasks
                .spawn(async move { this.start_one(key, body).await });
        }
    }

    async fn start_one(self: Arc<Self>, key: SpareKey, body: ContainerCreateBody) {
        let name = format!("baton-spare-{:016x}", rand::random::<u64>());
        // Live before it exists, so no reaper of this executor ever sees it as an orphan.
        if let Ok(mut live) = self.live.lock() {
            live.insert(name.clone(), Uuid::nil());
        }
        let made = self.create_and_start(&name, body).await;
        let keep = {
            let mut state = self.lock();
            if made.is_ok() {
                state.started += 1;
            }
            match state.entries.get_mut(&key) {
                Some(entry) => {
                    entry.starting = entry.starting.saturating_sub(1);
                    match &made {
                        Ok(()) if !self.closed.is_cancelled() => {
                            entry.ready.push(name.clone());
                            true
                        }
                        Ok(()) => false,
                        Err(_) => {
                            entry.paused_until = Some(Instant::now() + RETRY_AFTER);
                            false
                        }
                    }
                }
                // Expired or dropped for another configuration meanwhile.
                None => false,
            }
        };
        if let Err(reason) = &made {
            tracing::warn!(worker.id = %self.worker_id, image = %key.image, %reason,
                "cannot start a spare container; runs of this configuration take the cold path for a while");
        }
        if !keep {
            self.remove(&name).await;
        } else {
            tracing::debug!(container = %name, image = %key.image, "spare container ready");
        }
    }

    /// Creates and starts the spare (see [`start_idle`]) and keeps its stdin.
    async fn create_and_start(&self, name: &str, body: ContainerCreateBody) -> Result<(), String> {
        let hold = start_idle(&self.docker, name, body).await?;
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), hold);
        Ok(())
    }

    /// Lets go of the stdin of `name` (its idle process then ends, if it still runs).
    fn release(&self, name: &str) {
        let hold = self
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        drop(hold);
    }

    /// Removes a spare container (with its volume) and forgets it.
    async fn remove(&self, name: &str) {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(name, Some(options)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) || is_being_removed(&e) => {}
            Err(e) => tracing::warn!(container = %name, error = %engine_message(&e),
                "cannot remove a spare container (the reaper will)"),
        }
        self.release(name);
        if let Ok(mut live) = self.live.lock() {
            live.remove(name);
        }
    }

    /// Removes spares in the background (tracked, so [`SparePool::shutdown`] waits for it).
    fn discard(&self, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        let docker = self.docker.clone();
        let live = Arc::clone(&self.live);
        let holds: Vec<Option<StdinHold>> = {
            let mut held = self.holds.lock().unwrap_or_else(|p| p.into_inner());
            names.iter().map(|n| held.remove(n)).collect()
        };
        self.tasks.spawn(async move {
            for (name, hold) in names.into_iter().zip(holds) {
                let options = RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .v(true)
                    .build();
                if let Err(e) = docker.remove_container(&name, Some(options)).await
                    && !is_not_found(&e)
                    && !is_being_removed(&e)
                {
                    tracing::warn!(container = %name, error = %engine_message(&e),
                        "cannot remove a spare container (the reaper will)");
                }
                drop(hold);
                if let Ok(mut live) = live.lock() {
                    live.remove(&name);
                }
            }
        });
    }
}

/// Drops the configurations unused for `ttl`, checking a few times per `ttl`.
async fn expire_loop(pool: Weak<Inner>, closed: CancellationToken, ttl: Duration) {
    let every = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Some(inner) = pool.upgrade() else { return };
        let expired: Vec<String> = {
            let mut state = inner.lock();
            let now = Instant::now();
            let old: Vec<SpareKey> = state
                .entries
                .iter()
                .filter(|(_, e)| now.duration_since(e.last_used) >= ttl)
                .map(|(k, _)| k.clone())
                .collect();
            old.iter()
                .filter_map(|k| state.entries.remove(k))
                .flat_map(|e| e.ready)
                .collect()
        };
        if !expired.is_empty() {
            tracing::debug!(
                count = expired.len(),
                "removing idle spare containers (unused configuration)"
            );
            inner.discard(expired);
        }
    }
}
