//! The container executor: one fresh, hardened container per run, through the Docker Engine API
//! ([bollard]; no `docker` CLI).
//!
//! See the [module documentation](super) for the behaviour shared by all executors, and
//! `docs/containers.md` for the operator's view (default images, own images, limits, reaping).
//! Specific to this one:
//!
//! * **Images.** Each runtime has a default image configured on the worker
//!   ([`ContainerConfig::default_images`]; `deploy/images/build` builds `baton/runtime:*`);
//!   [`RunSpec::image`] overrides it for one run (unless
//!   [`ContainerConfig::allow_image_override`] is off). [`PullPolicy`] says when the image is
//!   pulled. An image that is missing and cannot be pulled fails the run with
//!   [`ExecError::StartFailed`] naming the image.
//! * **Files, without a shared file system.** Each container gets an anonymous volume at
//!   [`MOUNT_DIR`] (`/baton`), filled *before* start through the archive API: the script
//!   (`/baton/script.*`, read-only), the runtime helpers (`/baton/helpers`, from
//!   [`RunSpec::helpers_dir`] or the copies embedded in the worker), a copy of
//!   [`RunSpec::run_dir`] at `/baton/run` (owned by the run's user, so the helpers can write
//!   `out/`) and the working directory `/baton/work`. After the run, `/baton/run/out` is
//!   downloaded through the archive API and unpacked into the local `run_dir/out/`, so the
//!   worker collects `output.json`, `condition` and `vars/` exactly as from a local run. The
//!   engine never needs to see the worker's file system: a worker in a container talking to a
//!   remote engine works. [`RunSpec::workdir`] (a worker path) is ignored.
//! * **Bounded files.** Everything a run writes outside `/tmp` lives in that volume, which is a
//!   tmpfs of `work_mib` ([`ResourceLimits::work_mib`], default 256 MiB) on the engine's
//!   `local` driver: a script filling `$HOME` or `$BATON_DIR` gets "No space left on device"
//!   and cannot fill the engine's disk. Its pages count against the memory limit. Such a
//!   volume exists only while its container runs (the engine mounts it at the start and drops
//!   it at the stop), so a cold run does not get its files before its start: its container is
//!   started with an idle process, like a spare, and the run is an exec in it (`exec.rs`,
//!   `run_in_idle`). An image that cannot idle (no `cat`) falls back to the path described
//!   below (files uploaded before the start, `out/` downloaded after the exit) with the
//!   volume on the engine's disk and a tmpfs of `work_mib` over the working directory only.
//! * **Environment.** `PATH` (a standard one, helpers first), `HOME=/baton/work`,
//!   `LANG=C.UTF-8`, `TMPDIR=/tmp`, `PYTHONUNBUFFERED=1`, then [`RunSpec::env`], then
//!   `BATON_JOB_ID`, `BATON_DIR=/baton/run` (when there is a run directory) and
//!   `BATON_HELPERS=/baton/helpers`, which is also prepended to `PATH`, `PYTHONPATH` and
//!   `NODE_PATH`. Nothing from the worker's own environment reaches the container.
//! * **Hardened by default.** Runs as [`ContainerConfig::user`] (`10001:10001`), with every
//!   capability dropped, `no-new-privileges`, a read-only root file system (the volume and a
//!   `/tmp` tmpfs are the only writable places), memory (swap disabled), CPU and pids limits
//!   ([`ResourceLimits`]: defaults 512 MiB, 1 CPU, 256 processes, 64 MiB `/tmp`, 256 MiB
//!   run volume), network
//!   mode `none` unless [`RunSpec::network`], no log driver (output is streamed through the
//!   attach connection only) and a small init process (`docker-init`) as PID 1, which forwards
//!   signals and reaps zombies. Per-run limits ([`RunSpec::limits`]) are checked against
//!   [`ContainerConfig::maximums`]; a run asking for more fails with
//!   [`ExecError::InvalidSpec`].
//! * **Streaming.** The executor attaches to the container *before* starting it, so no output
//!   is lost; stdout and stderr come multiplexed on one connection, so their interleaving is
//!   preserved. When the events channel is full the executor stops reading, and the engine
//!   blocks the container's writes (back-pressure as for a pipe).
//! * **Exit.** The exit code comes from the engine's wait endpoint. When the engine reports
//!   `OOMKilled` and the run did not exit 0, the outcome carries [`ExecError::OutOfMemory`]
//!   (a script error naming the limit) rather than a bare 137. Timeout and cancellation send
//!   `SIGTERM`, then `SIGKILL` after [`RunSpec::kill_grace`]; the outcome then reports the
//!   signal (`128 + n` exit codes of the init process are mapped back to the signal). A plain
//!   exit code above 128 of a run that was not stopped is reported as an exit code (the
//!   engine cannot tell `exit 137` from a `SIGKILL`).
//! * **Start failures.** Engine errors before the container runs (pull, create, upload,
//!   attach, start) are [`ExecError::StartFailed`]. An interpreter or program that does not
//!   exist in the image is detected from the init process's `exec … failed` message; a
//!   non-zero exit within the run's startup window is a start failure by the rule shared by
//!   every executor ([`startup`](super::startup)).
//! * **Pre-started containers.** With [`ContainerConfig::spares`] > 0 (the default: 1), a run
//!   whose image, network and limits match a *spare* — a container made the same way and
//!   started before the job arrived, running an idle process — takes it instead of creating
//!   and starting its own: the files are uploaded into the running container and the command
//!   runs as an exec (`exec.rs`; `spares.rs` keeps the pool, replaces a taken spare in the
//!   background and expires unused ones). The container still serves that run only and is
//!   removed after it; hardening, limits, streaming, timeout and cancellation (every process
//!   of the run), out-of-memory reporting and start failures behave as described here. A run
//!   without a matching ready spare runs the same way in an idle container made for it (see
//!   *Bounded files*), or, for an image that cannot idle, takes the cold path without an
//!   idle process (the rest of this list).
//!   [`ContainerExecutor::shutdown`] removes the spares.
//! * **Clean-up and orphans.** Every container is labelled [`LABEL_WORKER`] (the worker id),
//!   [`LABEL_JOB`] (the job id) and [`LABEL_MANAGED`], and is removed with its volume when the
//!   run ends, whatever the outcome (also when the run's future is dropped: the removal is then
//!   spawned). [`ContainerExecutor::reap_orphans`] removes this worker's containers that no
//!   live run owns (left by a crash); [`ContainerExecutor::spawn_reaper`] does it at once and
//!   then periodically. Containers of other workers are touched only when their worker
//!   process is certainly dead ([`LABEL_PROCESS`], [`ContainerExecutor::reap_dead_workers`]:
//!   same host, boot and PID namespace, process gone). Spares need no reaper: they end with
//!   their worker's attach connection (see `spares.rs`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use baton_worker::executor::{ContainerConfig, ContainerExecutor, RunSpec, Runtime, run_collect};
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let executor = Arc::new(ContainerExecutor::connect(ContainerConfig::new("worker-1")).await?);
//! let _reaper = executor.spawn_reaper(Duration::from_secs(300), CancellationToken::new());
//! let spec = RunSpec::script(Runtime::Python, "print('hello from a container')");
//! let (outcome, _events) = run_collect(executor.as_ref(), spec, CancellationToken::new()).await;
//! assert!(outcome.succeeded());
//! # Ok(())
//! # }
//! ```

mod exec;
mod files;
pub mod liveness;
mod spares;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{
    ContainerCreateBody, HealthConfig, HostConfig, HostConfigLogConfig, Mount, MountType,
    MountVolumeOptions, MountVolumeOptionsDriverConfig,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    DownloadFromContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, UploadToContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use super::spec::ResourceLimits;

use super::local::FALLBACK_PATH;
use super::output::{DEFAULT_MAX_LINE_BYTES, LineSink, LineSplitter, finish_chunk, push_chunk};
use super::{
    ExecError, ExecEvent, Executor, OutputStream, RunOutcome, RunSpec, Runtime, http,
    sleep_until_opt,
};
use files::Owner;
pub use spares::SpareStats;
use spares::{SpareKey, SparePool};

/// Label carrying the id of the worker that owns a container.
pub const LABEL_WORKER: &str = "baton.worker_id";
/// Label carrying the job id of the run a container belongs to.
pub const LABEL_JOB: &str = "baton.job_id";
/// Label `"true"` on every container made by this executor.
pub const LABEL_MANAGED: &str = "baton.managed";
/// Label `"1"` on a pre-started spare container (it has no [`LABEL_JOB`]: it is made before
/// its job is known).
pub const LABEL_SPARE: &str = "baton.spare";
/// Label naming the worker process that made a container (boot id, PID namespace, PID and
/// start time: see [`liveness`]), so that any worker on the same host can tell that it died.
pub const LABEL_PROCESS: &str = "baton.worker_process";

/// Where the run's volume is mounted in the container.
pub const MOUNT_DIR: &str = "/baton";
/// The working directory of a run (in the volume, writable by the run's user; also `HOME`).
pub const WORK_DIR: &str = "/baton/work";
/// `$BATON_DIR` in the container (a copy of [`RunSpec::run_dir`]).
pub const RUN_DIR: &str = "/baton/run";
/// `$BATON_HELPERS` in the container (`baton.sh`, `baton.py`, `baton.js`).
pub const HELPERS_DIR: &str = "/baton/helpers";

/// Image repository built by `deploy/images/build`; the default image of runtime `r` is
/// `baton/runtime:r`.
pub const DEFAULT_IMAGE_REPO: &str = "baton/runtime";
/// Default user of the runs (the `baton` user of the default image).
pub const DEFAULT_USER: &str = "10001:10001";

/// Number of stderr lines kept for start-failure messages.
const STDERR_TAIL_LINES: usize = 5;

/// When the image of a run is pulled from its registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull only when the engine does not have the image (the default).
    #[default]
    IfNotPresent,
    /// Pull before every run (a failed pull fails the run).
    Always,
    /// Never pull: a missing image fails the run.
    Never,
}

impl PullPolicy {
    /// `if-not-present`, `always` or `never`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        }
    }
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PullPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "if-not-present" | "ifnotpresent" | "missing" => Ok(PullPolicy::IfNotPresent),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            _ => Err(format!(
                "unknown pull policy `{s}` (expected if-not-present, always or never)"
            )),
        }
    }
}

/// Configuration of a [`ContainerExecutor`]. Start from [`ContainerConfig::new`].
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// Put on every container as [`LABEL_WORKER`]; reaping only ever touches containers with
    /// this id. It must be unique among the workers sharing an engine, and stable across
    /// restarts of the same worker (its configured name, or an id it persists) for the
    /// containers left by a crash to be reaped by its next start.
    pub worker_id: String,
    /// Engine address (`unix:///var/run/docker.sock`, `tcp://host:2375`, `http://…`); `None`:
    /// `DOCKER_HOST`, else the local socket.
    pub docker_host: Option<String>,
    /// Image of each runtime (`bash`, `sh`, `python`, `node`, `exec`). A runtime without an
    /// entry can still run with [`RunSpec::image`].
    pub default_images: BTreeMap<Runtime, String>,
    /// When images are pulled.
    pub pull_policy: PullPolicy,
    /// Limits of a run that asks for none; every field should be set (an unset field falls
    /// back to the built-in default: 512 MiB, 1 CPU, 256 processes, 64 MiB `/tmp`, 256 MiB
    /// of run files).
    pub defaults: ResourceLimits,
    /// Highest limits a run may ask for (unset field: no maximum). The defaults must be within.
    pub maximums: ResourceLimits,
    /// User the runs are started as: numeric `UID:GID` (or `UID`, meaning `UID:UID`).
    pub user: String,
    /// Whether a run may ask for a network ([`RunSpec::network`]).
    pub allow_network: bool,
    /// Which addresses `http` runs may reach (default: public addresses only). An `http` run
    /// also needs a network like any other run: its event's `"network": true` and
    /// [`ContainerConfig::allow_network`].
    pub http_policy: baton_egress::AddressPolicy,
    /// Network mode of a run that asks for one (`bridge`, or a user-defined network's name).
    pub network_mode: String,
    /// Whether a run may choose its image ([`RunSpec::image`]).
    pub allow_image_override: bool,
    /// Run `docker-init` as PID 1 (signal forwarding, zombie reaping). Turn off only for an
    /// engine without `docker-init`.
    pub init: bool,
    /// Interpreter for `bash` scripts, inside the image.
    pub bash: String,
    /// Interpreter for `sh` scripts.
    pub sh: String,
    /// Interpreter for `python` scripts.
    pub python: String,
    /// Interpreter for `node` scripts.
    pub node: String,
    /// The startup window of runs whose spec has none ([`RunSpec::startup_window`]): only the
    /// `exec` 126/127 heuristic applies with it (see [`startup`](super::startup)).
    pub startup_window: Duration,
    /// Longest emitted output line in bytes; longer lines are split.
    pub max_line_bytes: usize,
    /// After the container exited, stop reading output that stays silent this long.
    pub drain_idle: Duration,
    /// After the container exited, stop reading output after this long in any case.
    pub drain_max: Duration,
    /// Most bytes downloaded from the run's `out/` directory (tar). Keep it well above twice
    /// the worker's output limit: past it the download is cut, and what was cut is then also
    /// over the worker's limit and reported by it.
    pub max_collect_bytes: u64,
    /// Timeout of one Engine API request (not of a run).
    pub api_timeout: Duration,
    /// Longest time a pull may take.
    pub pull_timeout: Duration,
    /// Pre-started ("spare") containers kept for each recently used configuration (image,
    /// network, limits), so that a run skips creating and starting its container; 0 turns
    /// spares off. Every run still gets a container of its own, removed after it.
    pub spares: usize,
    /// Most configurations that keep spares at once (the least recently used is dropped).
    pub spare_configs_max: usize,
    /// A configuration's spares are removed after it was unused this long.
    pub spare_ttl: Duration,
}

impl ContainerConfig {
    /// The defaults, for a worker with id `worker_id`: images `baton/runtime:<runtime>`,
    /// `if-not-present`, user `10001:10001`, 512 MiB / 1 CPU / 256 pids / 64 MiB `/tmp` /
    /// 256 MiB of run files by default and at most 8 GiB / 4 CPUs / 4096 pids / 1 GiB `/tmp` /
    /// 4 GiB of run files, network allowed on request (bridge), image overrides allowed.
    pub fn new(worker_id: impl Into<String>) -> Self {
        ContainerConfig {
            worker_id: worker_id.into(),
            docker_host: None,
            default_images: Self::images_from_repo(DEFAULT_IMAGE_REPO),
            pull_policy: PullPolicy::IfNotPresent,
            defaults: ResourceLimits {
                memory_mib: Some(512),
                cpus: Some(1.0),
                pids: Some(256),
                tmp_mib: Some(64),
                work_mib: Some(256),
            },
            maximums: ResourceLimits {
                memory_mib: Some(8192),
                cpus: Some(4.0),
                pids: Some(4096),
                tmp_mib: Some(1024),
                work_mib: Some(4096),
            },
            user: DEFAULT_USER.to_owned(),
            allow_network: true,
            http_policy: baton_egress::AddressPolicy::default(),
            network_mode: "bridge".to_owned(),
            allow_image_override: true,
            init: true,
            bash: "bash".to_owned(),
            sh: "sh".to_owned(),
            python: "python3".to_owned(),
            node: "node".to_owned(),
            startup_window: Duration::from_millis(500),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            drain_idle: Duration::from_secs(2),
            drain_max: Duration::from_secs(10),
            max_collect_bytes: 64 * 1024 * 1024,
            api_timeout: Duration::from_secs(120),
            pull_timeout: Duration::from_secs(600),
            spares: 1,
            spare_configs_max: 8,
            spare_ttl: Duration::from_secs(600),
        }
    }

    /// `repo:bash`, `repo:sh`, `repo:python`, `repo:node` and `repo:exec` (the tags
    /// `deploy/images/build --repo repo` makes).
    pub fn images_from_repo(repo: &str) -> BTreeMap<Runtime, String> {
        Runtime::ALL
            .into_iter()
            .filter(|r| *r != Runtime::Http)
            .map(|r| (r, format!("{repo}:{r}")))
            .collect()
    }

    /// The checked numeric user.
    fn owner(&self) -> Result<Owner, String> {
        let parse = |s: &str| {
            s.trim()
                .parse::<u64>()
                .ok()
                .filter(|&n| n < u64::from(u32::MAX))
        };
        let (uid, gid) = match self.user.split_once(':') {
            Some((u, g)) => (parse(u), parse(g)),
            None => {
                let u = parse(&self.user);
                (u, u)
            }
        };
        match (uid, gid) {
            (Some(uid), Some(gid)) => Ok(Owner { uid, gid }),
            _ => Err(format!(
                "container user `{}` must be numeric, `UID:GID` or `UID`",
                self.user
            )),
        }
    }

    fn validate(&self) -> Result<Owner, String> {
        if self.worker_id.trim().is_empty() {
            return Err("the worker id must not be empty".to_owned());
        }
        let owner = self.owner()?;
        for (runtime, image) in &self.default_images {
            check_image_name(image).map_err(|e| format!("default image of {runtime}: {e}"))?;
        }
        let defaults = Effective::resolve(None, &self.defaults);
        defaults
            .check(&self.maximums)
            .map_err(|e| format!("the default limits are not within the maximums: {e}"))?;
        if self.network_mode.trim().is_empty() || self.network_mode == "none" {
            return Err(format!(
                "network mode `{}` cannot give a run a network",
                self.network_mode
            ));
        }
        Ok(owner)
    }
}

/// A container of this worker, as listed by [`ContainerExecutor::containers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Engine id.
    pub id: String,
    /// Name, without the leading `/`.
    pub name: String,
    /// The [`LABEL_JOB`] label, when it is a UUID.
    pub job_id: Option<Uuid>,
    /// Engine state (`created`, `running`, `exited`, …).
    pub state: String,
    /// A pre-started spare ([`LABEL_SPARE`]); `job_id` is then the job of the run using it, if
    /// one of this executor's runs does, else `None` (idle).
    pub spare: bool,
}

/// Runs jobs in containers. See the [module documentation](self).
pub struct ContainerExecutor {
    docker: Docker,
    config: ContainerConfig,
    owner: Owner,
    engine: String,
    /// Containers of runs in progress: name → job id. Never reaped.
    live: Arc<Mutex<HashMap<String, Uuid>>>,
    http: http::LazyHttp,
    /// Pre-started containers; `None` when [`ContainerConfig::spares`] is 0.
    spares: Option<SparePool>,
    /// This process's [`LABEL_PROCESS`] (none where `/proc` cannot tell).
    process_mark: Option<String>,
    /// Images that could not run an idle container lately (no `cat`, say), with when: their
    /// cold runs take the path without one until [`spares::RETRY_AFTER`] has passed.
    cannot_idle: Mutex<HashMap<String, Instant>>,
}

impl fmt::Debug for ContainerExecutor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerExecutor")
            .field("engine", &self.engine)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ContainerExecutor {
    /// Checks `config`, connects to the engine and negotiates the API version. Fails with
    /// [`ExecError::StartFailed`] when the configuration is invalid or no engine answers.
    pub async fn connect(config: ContainerConfig) -> Result<Self, ExecError> {
        let owner = config
            .validate()
            .map_err(|e| ExecError::start_failed(format!("container executor: {e}")))?;
        let host = config
            .docker_host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()));
        let engine = host
            .clone()
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned());
        let no_engine = |e: &dyn fmt::Display| {
            ExecError::start_failed(format!(
                "container executor: no Docker engine answers at {engine}: {e}"
            ))
        };
        let docker = match &host {
            Some(h) => Docker::connect_with_host(h),
            None => Docker::connect_with_local_defaults(),
        }
        .map_err(|e| no_engine(&e))?
        .with_timeout(config.api_timeout);
        let docker = tokio::time::timeout(
            config.api_timeout.min(Duration::from_secs(30)),
            docker.negotiate_version(),
        )
        .await
        .map_err(|_| no_engine(&"no answer to GET /version"))?
        .map_err(|e| no_engine(&e))?;
        tracing::debug!(%engine, api = ?docker.client_version(), "container executor connected");
        let live = Arc::new(Mutex::new(HashMap::new()));
        let spares = (config.spares > 0).then(|| {
            SparePool::new(
                docker.clone(),
                config.worker_id.clone(),
                Arc::clone(&live),
                config.spares,
                config.spare_configs_max,
                config.spare_ttl,
            )
        });
        Ok(ContainerExecutor {
            http: http::LazyHttp::new(config.http_policy.clone()),
            docker,
            config,
            owner,
            engine,
            live,
            spares,
            process_mark: liveness::own_mark(),
            cannot_idle: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ContainerConfig {
        &self.config
    }

    /// Makes sure the engine has `image`, pulling it as the pull policy says. The error names
    /// the image ([`ExecError::StartFailed`]). Workers may call it at start for their default
    /// images, to fail early.
    pub async fn ensure_image(&self, image: &str) -> Result<(), ExecError> {
        check_image_name(image).map_err(ExecError::invalid_spec)?;
        let present = match self.docker.inspect_image(image).await {
            Ok(_) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e) => {
                return Err(ExecError::start_failed(format!(
                    "cannot inspect image `{image}`: {}",
                    engine_message(&e)
                )));
            }
        };
        let pull = match self.config.pull_policy {
            PullPolicy::Never if !present => {
                return Err(ExecError::start_failed(format!(
                    "image `{image}` is not present on the engine and the pull policy is `never`"
                )));
            }
            PullPolicy::Never => false,
            PullPolicy::IfNotPresent => !present,
            PullPolicy::Always => true,
        };
        if pull {
            let pulled = tokio::time::timeout(self.config.pull_timeout, self.pull(image)).await;
            let reason = match pulled {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(reason)) => reason,
                Err(_) => format!("no result within {:?}", self.config.pull_timeout),
            };
            let what = if present {
                "could not be pulled (pull policy `always`)"
            } else {
                "is not present on the engine and could not be pulled"
            };
            return Err(ExecError::start_failed(format!(
                "image `{image}` {what}: {reason}"
            )));
        }
        Ok(())
    }

    async fn pull(&self, image: &str) -> Result<(), String> {
        let (from, tag) = split_image_ref(image);
        let mut options = CreateImageOptionsBuilder::new().from_image(&from);
        if let Some(tag) = &tag {
            options = options.tag(tag);
        }
        tracing::info!(image, "pulling image");
        let mut progress = self.docker.create_image(Some(options.build()), None, None);
        while let Some(item) = progress.next().await {
            item.map_err(|e| engine_message(&e))?;
        }
        // A pull that "succeeded" without the image would fail later at create: check now.
        self.docker
            .inspect_image(image)
            .await
            .map(|_| ())
            .map_err(|e| engine_message(&e))
    }

    /// This worker's containers (label [`LABEL_WORKER`] = the worker id), in any state.
    pub async fn containers(&self) -> Result<Vec<ContainerInfo>, ExecError> {
        let mut filters = HashMap::new();
        filters.insert(
            "label",
            vec![format!("{LABEL_WORKER}={}", self.config.worker_id)],
        );
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| engine_io("listing containers", &e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                // The engine filtered already; check again, so that a filter the engine
                // ignored can never make us touch another worker's container.
                if labels.get(LABEL_WORKER) != Some(&self.config.worker_id) {
                    return None;
                }
                Some(ContainerInfo {
                    id: c.id?,
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    job_id: labels.get(LABEL_JOB).and_then(|j| Uuid::parse_str(j).ok()),
                    state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                    spare: labels.get(LABEL_SPARE).is_some_and(|v| v == "1"),
                })
            })
            .map(|mut c: ContainerInfo| {
                if c.job_id.is_none()
                    && let Ok(live) = self.live.lock()
                {
                    c.job_id = live.get(&c.name).copied().filter(|j| !j.is_nil());
                }
                c
            })
            .collect())
    }

    /// Removes (with their volumes) this worker's containers that no live run owns: neither a
    /// run of this executor in progress nor a job in `live_job_ids`. Containers of other
    /// workers are never touched. Returns how many were removed.
    pub async fn reap_orphans(&self, live_job_ids: &HashSet<Uuid>) -> Result<usize, ExecError> {
        let containers = self.containers().await?;
        let mut removed = 0;
        for c in containers {
            let live = self
                .live
                .lock()
                .map(|live| live.contains_key(&c.name))
                .unwrap_or(true);
            if live || c.job_id.is_some_and(|j| live_job_ids.contains(&j)) {
                continue;
            }
            match self.remove(&c.id).await {
                Ok(()) => {
                    tracing::info!(container = %c.name, job.id = ?c.job_id, state = %c.state,
                        "removed an orphaned container");
                    removed += 1;
                }
                Err(e) => {
                    tracing::warn!(container = %c.name, error = %e, "cannot remove an orphaned container");
                }
            }
        }
        Ok(removed)
    }

    /// Removes the containers of other workers whose process is certainly dead: same host,
    /// boot and PID namespace, and no process with the PID and start time of their
    /// [`LABEL_PROCESS`] (see [`liveness`]). A worker killed with SIGKILL and never restarted
    /// under its id leaves its job containers running; the next worker on the host removes
    /// them. Containers whose worker cannot be judged from here are left alone. Returns how
    /// many were removed.
    pub async fn reap_dead_workers(&self) -> Result<usize, ExecError> {
        let mut filters = HashMap::new();
        filters.insert("label", vec![format!("{LABEL_MANAGED}=true")]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| engine_io("listing containers", &e))?;
        let mut removed = 0;
        for c in list {
            let labels = c.labels.unwrap_or_default();
            if labels.get(LABEL_WORKER) == Some(&self.config.worker_id) {
                continue; // ours: `reap_orphans` decides
            }
            let Some(mark) = labels.get(LABEL_PROCESS) else {
                continue;
            };
            if liveness::liveness(mark) != liveness::Liveness::Dead {
                continue;
            }
            let Some(id) = c.id else { continue };
            match self.remove(&id).await {
                Ok(()) => {
                    tracing::info!(container = %id, worker.id = ?labels.get(LABEL_WORKER),
                        job.id = ?labels.get(LABEL_JOB),
                        "removed a container whose worker process is gone");
                    removed += 1;
                }
                Err(e) => tracing::warn!(container = %id, error = %e,
                    "cannot remove a container of a dead worker"),
            }
        }
        Ok(removed)
    }

    /// Reaps orphans ([`reap_orphans`](Self::reap_orphans), with only this executor's runs as
    /// live, and [`reap_dead_workers`](Self::reap_dead_workers)) now and then every
    /// `interval`, until `cancel` fires.
    pub fn spawn_reaper(
        self: &Arc<Self>,
        interval: Duration,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.reap_orphans(&HashSet::new()).await {
                    tracing::warn!(error = %e, "reaping orphaned containers failed");
                }
                if let Err(e) = this.reap_dead_workers().await {
                    tracing::warn!(error = %e, "reaping containers of dead workers failed");
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        })
    }

    /// Starts (in the background) the spares of the default configurations: each default
    /// image with the default limits and no network. Workers call it at start. Nothing when
    /// spares are off or the pull policy is `always`.
    pub fn prewarm(&self) {
        let Some(pool) = self.spares_for_policy() else {
            return;
        };
        let limits = Effective::resolve(None, &self.config.defaults);
        for image in self.config.default_images.values() {
            let key = SpareKey::new(image, "none", limits);
            pool.warm(&key, || self.spare_body(&key));
        }
    }

    /// Counters of the spare containers (all zero when spares are off).
    pub fn spare_stats(&self) -> SpareStats {
        self.spares
            .as_ref()
            .map(SparePool::stats)
            .unwrap_or_default()
    }

    /// Stops making spares and removes them (waiting for those being started). Runs in
    /// progress are not touched. Call it before dropping the executor (a dropped executor
    /// removes its spares in the background only). Idempotent.
    pub async fn shutdown(&self) {
        if let Some(pool) = &self.spares {
            pool.shutdown().await;
        }
    }

    /// The pool, when spares may be used: not with the pull policy `always` (each run must pull,
    /// and a spare was made from the image as it was).
    fn spares_for_policy(&self) -> Option<&SparePool> {
        self.spares
            .as_ref()
            .filter(|_| self.config.pull_policy != PullPolicy::Always)
    }

    /// Takes a spare for `plan`, if it may have one and one is ready. A run with its own labels
    /// never takes one (labels cannot be added to an existing container).
    fn take_spare(&self, spec: &RunSpec, plan: &Plan) -> Option<(SpareKey, String)> {
        let pool = self.spares_for_policy()?;
        if !spec.labels.is_empty() {
            return None;
        }
        let key = SpareKey::new(&plan.image, &plan.network_mode, plan.limits);
        let name = pool.take(&key, || self.spare_body(&key))?;
        Some((key, name))
    }

    /// Whether a cold run of `image` tries an idle container first (see `run_in_idle`).
    fn may_idle(&self, image: &str) -> bool {
        let mut refused = self.cannot_idle.lock().unwrap_or_else(|p| p.into_inner());
        refused.retain(|_, at| at.elapsed() < spares::RETRY_AFTER);
        !refused.contains_key(image)
    }

    async fn remove(&self, container: &str) -> Result<(), String> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        let removed = match self.docker.remove_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) || is_being_removed(&e) => Ok(()),
            Err(e) => Err(engine_message(&e)),
        };
        // A spare's stdin is held until its container is gone (its run needed it running).
        if let Some(pool) = &self.spares {
            pool.removed(container);
        }
        removed
    }

    /// Whether an `http` run may use the network: its event must ask for one and this worker
    /// must give runs one.
    fn http_network(&self, spec: &RunSpec) -> Result<(), String> {
        if !spec.network {
            return Err(
                "the run has no network (its event has network none, the default of \
                        the container executor): set `\"network\": true` on the event"
                    .to_owned(),
            );
        }
        if !self.config.allow_network {
            return Err(
                "this worker does not give runs a network (the event asks for `\"network\": true`)"
                    .to_owned(),
            );
        }
        Ok(())
    }

    async fn run_spec(
        &self,
        spec: RunSpec,
        events: mpsc::Sender<ExecEvent>,
        cancel: CancellationToken,
    ) -> RunOutcome {
        if spec.runtime == Runtime::Http {
            // The request is made by the worker, but it is still this run's traffic: it gets
            // a network only as a container would.
            if let Err(reason) = self.http_network(&spec) {
                return RunOutcome::from_error(ExecError::HttpRefused { reason }, Duration::ZERO);
            }
            return self
                .http
                .run(&spec, &events, &cancel, self.config.max_line_bytes)
                .await;
        }
        let started = Instant::now();
        let plan = match self.plan(&spec) {
            Ok(plan) => plan,
            Err(e) => return RunOutcome::from_error(e, started.elapsed()),
        };
        if cancel.is_cancelled() {
            return RunOutcome::from_error(ExecError::Cancelled, started.elapsed());
        }
        if let Some((key, spare)) = self.take_spare(&spec, &plan) {
            // The image is there: the spare was made from it.
            match self
                .run_in_spare(&spec, &plan, &spare, &events, &cancel, started)
                .await
            {
                Ok(outcome) => return outcome,
                Err(unusable) => {
                    if let Some(pool) = &self.spares {
                        pool.failed(&key, &unusable.0);
                    }
                }
            }
        }
        let ready = tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(ExecError::Cancelled),
            r = self.ensure_image(&plan.image) => r,
        };
        if let Err(e) = ready {
            return RunOutcome::from_error(e, started.elapsed());
        }
        if self.may_idle(&plan.image) {
            match self
                .run_in_idle(&spec, &plan, &events, &cancel, started)
                .await
            {
                Ok(outcome) => return outcome,
                Err(unusable) => {
                    tracing::warn!(job.id = %spec.job_id, image = %plan.image, reason = %unusable.0,
                        "the image cannot run an idle container; its runs get their files before their start for a while");
                    self.cannot_idle
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(plan.image.clone(), Instant::now());
                }
            }
        }
        if cancel.is_cancelled() {
            return RunOutcome::from_error(ExecError::Cancelled, started.elapsed());
        }
        let archive = match files::upload_archive(&spec, plan.script(), self.owner) {
            Ok(a) => a,
            Err(e) => return RunOutcome::from_error(e, started.elapsed()),
        };
        let name = format!(
            "baton-{}-{:08x}",
            spec.job_id.simple(),
            rand::random::<u32>()
        );
        let mut guard = ContainerGuard::new(self, name.clone(), spec.job_id);
        let mut outcome = self
            .run_container(&spec, &plan, archive, &name, &events, &cancel, started)
            .await;
        if let Err(e) = self.remove(&name).await {
            tracing::warn!(container = %name, error = %e,
                "cannot remove the container of a finished run (the reaper will retry)");
        } else {
            guard.disarm();
        }
        outcome.duration = started.elapsed();
        tracing::debug!(job.id = %spec.job_id, container = %name, summary = %outcome.summary(),
            "container run ended");
        outcome
    }

    /// Create; upload and attach (overlapped); start, supervise; inspect and collect (overlapped).
    /// The caller removes the container.
    #[allow(clippy::too_many_arguments)]
    async fn run_container(
        &self,
        spec: &RunSpec,
        plan: &Plan,
        archive: Vec<u8>,
        name: &str,
        events: &mpsc::Sender<ExecEvent>,
        cancel: &CancellationToken,
        started: Instant,
    ) -> RunOutcome {
        let fail = |e: ExecError| RunOutcome::from_error(e, started.elapsed());
        let create = CreateContainerOptionsBuilder::new().name(name).build();
        if let Err(e) = self
            .docker
            .create_container(Some(create), self.container_body(plan))
            .await
        {
            return fail(ExecError::start_failed(format!(
                "cannot create a container from image `{}`: {}",
                plan.image,
                engine_message(&e)
            )));
        }
        let upload = UploadToContainerOptionsBuilder::new()
            .path(MOUNT_DIR)
            .build();
        let attach = AttachContainerOptionsBuilder::new()
            .stream(true)
            .stdout(true)
            .stderr(true)
            .logs(false)
            .build();
        // Independent requests, both needed before start: the upload is the slow one (the
        // engine mounts the container's file system to unpack into it), so attach meanwhile.
        let (uploaded, attached) = tokio::join!(
            self.docker
                .upload_to_container(name, Some(upload), bollard::body_full(archive.into())),
            self.docker.attach_container(name, Some(attach)),
        );
        if let Err(e) = uploaded {
            return fail(ExecError::start_failed(format!(
                "cannot upload the run's files into the container: {}",
                engine_message(&e)
            )));
        }
        let output = match attached {
            Ok(a) => a.output,
            Err(e) => {
                return fail(ExecError::start_failed(format!(
                    "cannot attach to the container: {}",
                    engine_message(&e)
                )));
            }
        };
        if cancel.is_cancelled() {
            return fail(ExecError::Cancelled);
        }
        if let Err(e) = self.docker.start_container(name, None).await {
            return fail(ExecError::start_failed(format!(
                "cannot start the container (image `{}`): {}",
                plan.image,
                engine_message(&e)
            )));
        }
        let run_started = Instant::now();
        tracing::debug!(job.id = %spec.job_id, container = %name, image = %plan.image,
            runtime = %spec.runtime, "container run started");
        // Receiver gone is fine: the run goes on, output is discarded.
        let _ = events.send(ExecEvent::Started { pid: None }).await;

        let (exit_tx, exit_rx) = watch::channel(None::<Instant>);
        let supervise = async {
            let wait = self.wait_exit(name);
            tokio::pin!(wait);
            let deadline = run_started.checked_add(spec.timeout);
            let first = tokio::select! {
                biased;
                r = &mut wait => Ok(r),
                _ = cancel.cancelled() => Err(Stop::Cancelled),
                _ = sleep_until_opt(deadline) => Err(Stop::TimedOut),
            };
            let (exit, stop) = match first {
                Ok(r) => (r, None),
                Err(stop) => {
                    tracing::debug!(job.id = %spec.job_id, container = %name, ?stop, "stopping container run");
                    self.signal(name, "SIGTERM").await;
                    let r = self
                        .kill_after_grace(
                            name,
                            spec.kill_grace,
                            &spec.kill_now,
                            &mut wait,
                            "the container did not stop after SIGKILL",
                        )
                        .await;
                    (r, Some(stop))
                }
            };
            let exited = Instant::now();
            let _ = exit_tx.send(Some(exited));
            (exit, stop, exited)
        };
        let ((exit, stop, exited), report) = tokio::join!(
            supervise,
            pump_attach(
                output,
                events,
                exit_rx,
                self.config.drain_idle,
                self.config.drain_max,
                self.config.max_line_bytes,
            )
        );

        // The engine's record of the exit (OOMKilled, and the code if the wait failed) and the
        // download of out/ are independent requests on the stopped container: overlap them.
        let (inspected, collected) =
            tokio::join!(self.docker.inspect_container(name, None), async {
                match &spec.run_dir {
                    Some(run_dir) => self.collect_out(name, &run_dir.join("out")).await,
                    None => Ok(()),
                }
            });
        let state = inspected.ok().and_then(|c| c.state);
        let oom = state.as_ref().and_then(|s| s.oom_killed).unwrap_or(false);
        let engine_code = state
            .as_ref()
            .filter(|s| s.running != Some(true))
            .and_then(|s| s.exit_code);
        self.finish(
            spec,
            plan,
            name,
            Ended {
                exit,
                engine_code,
                stop,
                oom,
                ran_for: exited - run_started,
                report,
                collected,
            },
        )
    }

    /// The outcome of a run that ended (either path).
    fn finish(&self, spec: &RunSpec, plan: &Plan, name: &str, ended: Ended) -> RunOutcome {
        let Ended {
            exit,
            engine_code,
            stop,
            oom,
            ran_for,
            report,
            collected,
        } = ended;
        let mut outcome = RunOutcome::default();
        let code = match exit {
            Ok(code) => Some(code),
            Err(e) => {
                if engine_code.is_none() {
                    outcome.error = Some(ExecError::io(
                        "waiting for the container",
                        std::io::Error::other(e),
                    ));
                }
                engine_code
            }
        };
        let code = code.map(|c| i32::try_from(c).unwrap_or(i32::MAX));
        match (stop, code) {
            (Some(_), Some(c)) if (129..=192).contains(&c) => outcome.signal = Some(c - 128),
            _ => outcome.exit_code = code,
        }
        match stop {
            Some(Stop::Cancelled) => {
                outcome.cancelled = true;
                outcome.error = Some(ExecError::Cancelled);
            }
            Some(Stop::TimedOut) => {
                outcome.timed_out = true;
                outcome.error = Some(ExecError::TimedOut {
                    after: spec.timeout,
                });
            }
            None => {
                if oom && code != Some(0) {
                    outcome.error = Some(ExecError::OutOfMemory {
                        limit_mib: Some(plan.limits.memory_mib),
                    });
                } else if let Some(error) = self.start_failure(spec, plan, code, ran_for, &report) {
                    outcome.error = Some(error);
                } else if oom {
                    tracing::warn!(job.id = %spec.job_id,
                        "a process of the run was killed by the out-of-memory killer, but the run exited 0");
                }
            }
        }
        if report.abandoned {
            tracing::warn!(job.id = %spec.job_id, container = %name,
                "stopped reading output: the output stream stayed open after the run exited");
        }
        if let Some(e) = report.error
            && outcome.error.is_none()
        {
            outcome.error = Some(ExecError::io(
                "reading the container's output",
                std::io::Error::other(e),
            ));
        }
        if let Err(e) = collected
            && outcome.error.is_none()
        {
            outcome.error = Some(e);
        }
        outcome
    }

    /// Downloads `/baton/run/out` and unpacks it into `dest`.
    async fn collect_out(&self, container: &str, dest: &std::path::Path) -> Result<(), ExecError> {
        let options = DownloadFromContainerOptionsBuilder::new()
            .path(&format!("{RUN_DIR}/out"))
            .build();
        let mut stream = self
            .docker
            .download_from_container(container, Some(options));
        let cap = usize::try_from(self.config.max_collect_bytes).unwrap_or(usize::MAX);
        let mut archive = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    let room = cap.saturating_sub(archive.len());
                    if bytes.len() > room {
                        archive.extend_from_slice(&bytes[..room]);
                        truncated = true;
                        break;
                    }
                    archive.extend_from_slice(&bytes);
                }
                // No out/ directory: the run wrote nothing.
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => {
                    return Err(engine_io(
                        format!("downloading {RUN_DIR}/out from the container"),
                        &e,
                    ));
                }
            }
        }
        drop(stream);
        if truncated {
            tracing::warn!(
                container,
                cap,
                "the run's out/ directory is larger than the collection cap; it was cut"
            );
        }
        let dest = dest.to_path_buf();
        let unpacked =
            tokio::task::spawn_blocking(move || files::unpack_out(&archive, &dest, truncated))
                .await
                .map_err(|e| {
                    ExecError::io(
                        "unpacking the run's out/ directory",
                        std::io::Error::other(e),
                    )
                })?
                .map_err(|e| ExecError::io("unpacking the run's out/ directory", e))?;
        if unpacked.skipped > 0 {
            tracing::debug!(
                container,
                skipped = unpacked.skipped,
                "entries of out/ skipped (links, special files)"
            );
        }
        Ok(())
    }

    async fn wait_exit(&self, container: &str) -> Result<i64, String> {
        let options = WaitContainerOptionsBuilder::new()
            .condition("not-running")
            .build();
        let mut wait = self.docker.wait_container(container, Some(options));
        match wait.next().await {
            Some(Ok(r)) => Ok(r.status_code),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(engine_message(&e)),
            None => Err("the engine ended the wait request without an exit status".to_owned()),
        }
    }

    /// After a stop was asked for: waits `grace` for `wait` to end, then SIGKILLs the
    /// container and waits once more (`stuck` is the error if even that does not end it).
    async fn kill_after_grace<T>(
        &self,
        container: &str,
        grace: Duration,
        kill_now: &CancellationToken,
        wait: &mut std::pin::Pin<&mut impl std::future::Future<Output = Result<T, String>>>,
        stuck: &str,
    ) -> Result<T, String> {
        // A forced cancel (now or during the grace) cuts the grace short.
        let ended = tokio::select! {
            biased;
            r = wait.as_mut() => Some(r),
            _ = kill_now.cancelled() => None,
            _ = tokio::time::sleep(grace) => None,
        };
        match ended {
            Some(r) => r,
            None => {
                self.signal(container, "SIGKILL").await;
                tokio::time::timeout(self.config.api_timeout, wait.as_mut())
                    .await
                    .unwrap_or_else(|_| Err(stuck.to_owned()))
            }
        }
    }

    async fn signal(&self, container: &str, signal: &str) {
        let options = KillContainerOptionsBuilder::new().signal(signal).build();
        match self.docker.kill_container(container, Some(options)).await {
            Ok(()) => {}
            // Not running any more (409) or gone (404): nothing to signal.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => {}
            Err(e) => {
                tracing::warn!(container, signal, error = %engine_message(&e), "cannot signal the container")
            }
        }
    }

    /// Start failures detected after the fact: the init process or the engine could not exec
    /// the interpreter or program (126/127 with its message), or the rule of the startup
    /// window ([`startup`](super::startup)).
    fn start_failure(
        &self,
        spec: &RunSpec,
        plan: &Plan,
        code: Option<i32>,
        ran_for: Duration,
        report: &AttachReport,
    ) -> Option<ExecError> {
        let code = code?;
        let program = plan.cmd.first().map(String::as_str).unwrap_or_default();
        // The init process's message (cold path, on stderr), or the engine's when an exec
        // cannot start its program (warm path, written on the exec's stdout).
        if (code == 126 || code == 127)
            && let Some(line) = report.tail.iter().chain(&report.out_tail).find(|l| {
                (l.contains("[FATAL tini") && l.contains("exec"))
                    || l.contains("OCI runtime exec failed")
            })
        {
            return Some(ExecError::start_failed(format!(
                "cannot run `{program}` in image `{}`: {}",
                plan.image,
                line.trim()
            )));
        }
        let (window, from_spec) = super::startup::window_of(spec, self.config.startup_window);
        super::startup::judge(&super::startup::EarlyEnd {
            runtime: spec.runtime,
            window,
            from_spec,
            ran_for,
            exit_code: Some(code),
            program,
            place: &format!(" in image `{}`", plan.image),
            stderr_tail: &report.tail,
        })
    }

    /// Checks the spec against the configuration and works out image, command, limits, env.
    fn plan(&self, spec: &RunSpec) -> Result<Plan, ExecError> {
        let interpreter = match spec.runtime {
            Runtime::Bash => Some(&self.config.bash),
            Runtime::Sh => Some(&self.config.sh),
            Runtime::Python => Some(&self.config.python),
            Runtime::Node => Some(&self.config.node),
            Runtime::Exec | Runtime::Http => None,
        };
        let (cmd, script) = match (interpreter, spec.runtime.script_file_name()) {
            (Some(interpreter), Some(file)) => {
                let Some(content) = &spec.content else {
                    return Err(ExecError::invalid_spec(format!(
                        "{} runtime needs script content",
                        spec.runtime
                    )));
                };
                (
                    vec![interpreter.clone(), format!("{MOUNT_DIR}/{file}")],
                    Some((file, content.clone())),
                )
            }
            _ => match spec.command.as_deref() {
                Some(argv) if argv.first().is_some_and(|p| !p.is_empty()) => {
                    if argv.iter().any(|a| a.contains('\0')) {
                        return Err(ExecError::invalid_spec("command contains a NUL byte"));
                    }
                    (argv.to_vec(), None)
                }
                _ => {
                    return Err(ExecError::invalid_spec(
                        "exec runtime needs a non-empty command",
                    ));
                }
            },
        };
        let image = match &spec.image {
            Some(image) if !self.config.allow_image_override => {
                return Err(ExecError::invalid_spec(format!(
                    "this worker does not allow runs to choose their image (asked for `{image}`)"
                )));
            }
            Some(image) => image.clone(),
            None => self
                .config
                .default_images
                .get(&spec.runtime)
                .cloned()
                .ok_or_else(|| {
                    ExecError::invalid_spec(format!(
                        "this worker has no default image for the {} runtime: the event must name an image",
                        spec.runtime
                    ))
                })?,
        };
        check_image_name(&image).map_err(ExecError::invalid_spec)?;
        if spec.network && !self.config.allow_network {
            return Err(ExecError::invalid_spec(
                "this worker does not give runs a network (the event asks for `\"network\": true`)",
            ));
        }
        let limits = Effective::resolve(spec.limits.as_ref(), &self.config.defaults);
        limits
            .check(&self.config.maximums)
            .map_err(ExecError::invalid_spec)?;
        let env = self.environment(spec)?;
        let mut labels: HashMap<String, String> = spec
            .labels
            .iter()
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_WORKER.to_owned(), self.config.worker_id.clone());
        labels.insert(LABEL_JOB.to_owned(), spec.job_id.to_string());
        labels.insert(LABEL_MANAGED.to_owned(), "true".to_owned());
        if let Some(mark) = &self.process_mark {
            labels.insert(LABEL_PROCESS.to_owned(), mark.clone());
        }
        Ok(Plan {
            image,
            cmd,
            script,
            limits,
            env,
            labels,
            network_mode: if spec.network {
                self.config.network_mode.clone()
            } else {
                "none".to_owned()
            },
        })
    }

    fn environment(&self, spec: &RunSpec) -> Result<Vec<String>, ExecError> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PATH".into(), FALLBACK_PATH.into());
        env.insert("HOME".into(), WORK_DIR.into());
        env.insert("LANG".into(), "C.UTF-8".into());
        env.insert("TMPDIR".into(), "/tmp".into());
        env.insert("PYTHONUNBUFFERED".into(), "1".into());
        for (key, value) in &spec.env {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                return Err(ExecError::invalid_spec(format!(
                    "invalid environment variable `{}`",
                    key.escape_debug()
                )));
            }
            env.insert(key.clone(), value.clone());
        }
        env.insert("BATON_JOB_ID".into(), spec.job_id.to_string());
        if spec.run_dir.is_some() {
            env.insert("BATON_DIR".into(), RUN_DIR.into());
        }
        env.insert("BATON_HELPERS".into(), HELPERS_DIR.into());
        for var in ["PATH", "PYTHONPATH", "NODE_PATH"] {
            let value = match env.get(var).filter(|v| !v.is_empty()) {
                Some(old) => format!("{HELPERS_DIR}:{old}"),
                None => HELPERS_DIR.to_owned(),
            };
            env.insert(var.into(), value);
        }
        Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
    }

    /// The hardening, limits and mounts of every container, cold or spare.
    fn host_config(&self, limits: Effective, network_mode: &str, volume: RunVolume) -> HostConfig {
        let memory =
            i64::try_from(limits.memory_mib.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
        let mut tmpfs = HashMap::from([(
            "/tmp".to_owned(),
            format!("rw,nosuid,nodev,size={}m,mode=1777", limits.tmp_mib),
        )]);
        let volume_options = match volume {
            // The volume is a tmpfs of `work_mib` (the engine's `local` driver mounts it when
            // the container starts and drops it, with its files, when the container stops).
            RunVolume::Sized => Some(MountVolumeOptions {
                driver_config: Some(MountVolumeOptionsDriverConfig {
                    name: Some("local".to_owned()),
                    options: Some(HashMap::from([
                        ("type".to_owned(), "tmpfs".to_owned()),
                        ("device".to_owned(), "tmpfs".to_owned()),
                        (
                            "o".to_owned(),
                            format!("size={}m,mode=0755,nosuid,nodev", limits.work_mib),
                        ),
                    ])),
                }),
                ..MountVolumeOptions::default()
            }),
            // A volume on the engine's disk (it keeps what was uploaded before the start and
            // what is downloaded after the exit); the working directory on it is covered by
            // a tmpfs of `work_mib`, which starts empty: the upload's empty `work/` lands
            // under the mount, unseen, and nothing is downloaded from it.
            RunVolume::Disk => {
                tmpfs.insert(
                    WORK_DIR.to_owned(),
                    format!(
                        "rw,nosuid,nodev,size={}m,uid={},gid={},mode=0700",
                        limits.work_mib, self.owner.uid, self.owner.gid
                    ),
                );
                None
            }
        };
        HostConfig {
            readonly_rootfs: Some(true),
            cap_drop: Some(vec!["ALL".to_owned()]),
            security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
            privileged: Some(false),
            pids_limit: Some(i64::try_from(limits.pids).unwrap_or(i64::MAX)),
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some((limits.cpus * 1e9).round() as i64),
            network_mode: Some(network_mode.to_owned()),
            tmpfs: Some(tmpfs),
            mounts: Some(vec![Mount {
                target: Some(MOUNT_DIR.to_owned()),
                typ: Some(MountType::VOLUME),
                read_only: Some(false),
                volume_options,
                ..Mount::default()
            }]),
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".to_owned()),
                config: None,
            }),
            init: Some(self.config.init),
            ipc_mode: Some("private".to_owned()),
            auto_remove: Some(false),
            ..HostConfig::default()
        }
    }

    fn container_body(&self, plan: &Plan) -> ContainerCreateBody {
        let host_config = self.host_config(plan.limits, &plan.network_mode, RunVolume::Disk);
        ContainerCreateBody {
            image: Some(plan.image.clone()),
            cmd: Some(plan.cmd.clone()),
            // An image's ENTRYPOINT would wrap our command: clear it.
            entrypoint: Some(Vec::new()),
            user: Some(format!("{}:{}", self.owner.uid, self.owner.gid)),
            working_dir: Some(WORK_DIR.to_owned()),
            env: Some(plan.env.clone()),
            labels: Some(plan.labels.clone()),
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(false),
            tty: Some(false),
            stop_signal: Some("SIGTERM".to_owned()),
            host_config: Some(host_config),
            healthcheck: Some(no_healthcheck()),
            ..ContainerCreateBody::default()
        }
    }
}

/// Turns off an image's `HEALTHCHECK` in a run's container: the worker watches its runs itself,
/// and a probe would be one more process in the run's pid and memory limits.
fn no_healthcheck() -> HealthConfig {
    HealthConfig {
        test: Some(vec!["NONE".to_owned()]),
        ..HealthConfig::default()
    }
}

impl ContainerExecutor {
    /// A spare of `key`: the run's container without the run (see `spares.rs`). The idle
    /// process runs as another user than the runs', no environment beyond the image's (each
    /// run's is given to its exec), no attach.
    fn spare_body(&self, key: &SpareKey) -> ContainerCreateBody {
        let limits = Effective {
            memory_mib: key.memory_mib,
            cpus: f64::from_bits(key.cpus_bits),
            pids: key.pids,
            tmp_mib: key.tmp_mib,
            work_mib: key.work_mib,
        };
        let idle = spares::idle_user(self.owner.uid);
        ContainerCreateBody {
            image: Some(key.image.clone()),
            cmd: Some(spares::IDLE_COMMAND.map(str::to_owned).to_vec()),
            entrypoint: Some(Vec::new()),
            user: Some(format!("{idle}:{idle}")),
            working_dir: Some(MOUNT_DIR.to_owned()),
            labels: Some(
                [
                    (LABEL_WORKER.to_owned(), self.config.worker_id.clone()),
                    (LABEL_MANAGED.to_owned(), "true".to_owned()),
                    (LABEL_SPARE.to_owned(), "1".to_owned()),
                ]
                .into_iter()
                .chain(
                    self.process_mark
                        .clone()
                        .map(|mark| (LABEL_PROCESS.to_owned(), mark)),
                )
                .collect(),
            ),
            // The idle process reads the worker's attached stdin, closed when the worker dies
            // (see `spares.rs`); the container then removes itself.
            attach_stdin: Some(true),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            open_stdin: Some(true),
            stdin_once: Some(true),
            tty: Some(false),
            stop_signal: Some("SIGTERM".to_owned()),
            host_config: Some(HostConfig {
                auto_remove: Some(true),
                ..self.host_config(limits, &key.network_mode, RunVolume::Sized)
            }),
            healthcheck: Some(no_healthcheck()),
            ..ContainerCreateBody::default()
        }
    }
}

impl SpareKey {
    fn new(image: &str, network_mode: &str, limits: Effective) -> Self {
        SpareKey {
            image: image.to_owned(),
            network_mode: network_mode.to_owned(),
            memory_mib: limits.memory_mib,
            cpus_bits: limits.cpus.to_bits(),
            pids: limits.pids,
            tmp_mib: limits.tmp_mib,
            work_mib: limits.work_mib,
        }
    }
}

impl Executor for ContainerExecutor {
    fn name(&self) -> &'static str {
        "container"
    }

    fn run(
        &self,
        spec: RunSpec,
        events: mpsc::Sender<ExecEvent>,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, RunOutcome> {
        Box::pin(self.run_spec(spec, events, cancel))
    }
}

/// Registers a run's container as live and removes it if the run's future is dropped before
/// the run removed it itself.
struct ContainerGuard {
    docker: Docker,
    live: Arc<Mutex<HashMap<String, Uuid>>>,
    name: String,
    armed: bool,
}

impl ContainerGuard {
    fn new(executor: &ContainerExecutor, name: String, job_id: Uuid) -> Self {
        if let Ok(mut live) = executor.live.lock() {
            live.insert(name.clone(), job_id);
        }
        ContainerGuard {
            docker: executor.docker.clone(),
            live: Arc::clone(&executor.live),
            name,
            armed: true,
        }
    }

    /// The container is gone: nothing to do on drop but forget it.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&self.name);
        }
        if !self.armed {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(container = %self.name, "cannot remove the container of an abandoned run (no runtime); the reaper will");
            return;
        };
        let docker = self.docker.clone();
        let name = std::mem::take(&mut self.name);
        handle.spawn(async move {
            let options = RemoveContainerOptionsBuilder::new()
                .force(true)
                .v(true)
                .build();
            match docker.remove_container(&name, Some(options)).await {
                Ok(()) => {
                    tracing::debug!(container = %name, "removed the container of an abandoned run")
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => tracing::warn!(container = %name, error = %engine_message(&e),
                    "cannot remove the container of an abandoned run; the reaper will"),
            }
        });
    }
}

/// How a run ended, as both paths observe it.
struct Ended {
    /// The exit code from the engine's wait (cold) or exec inspection (warm).
    exit: Result<i64, String>,
    /// The container's exit code from its inspection, used when `exit` failed.
    engine_code: Option<i64>,
    stop: Option<Stop>,
    oom: bool,
    /// From start to the observed exit.
    ran_for: Duration,
    report: AttachReport,
    collected: Result<(), ExecError>,
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    Cancelled,
    TimedOut,
}

/// Where a container's `/baton` lives; either way a run's files there are bounded by
/// `work_mib` (see [`ContainerExecutor::host_config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunVolume {
    /// A tmpfs volume of `work_mib`: for containers started before their files are uploaded
    /// (spares, and the idle container of a cold run), whose files live only while they run.
    Sized,
    /// A volume on the engine's disk with a tmpfs of `work_mib` over the working directory:
    /// for a container that gets its files before it starts and is read after it exited
    /// (the fallback of a cold run whose image cannot idle).
    Disk,
}

/// Everything worked out for one run before the container is created.
#[derive(Debug)]
struct Plan {
    image: String,
    cmd: Vec<String>,
    script: Option<(&'static str, String)>,
    limits: Effective,
    env: Vec<String>,
    labels: HashMap<String, String>,
    network_mode: String,
}

impl Plan {
    fn script(&self) -> Option<(&str, &str)> {
        self.script.as_ref().map(|(n, t)| (*n, t.as_str()))
    }
}

/// Limits with every value decided.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Effective {
    memory_mib: u64,
    cpus: f64,
    pids: u64,
    tmp_mib: u64,
    work_mib: u64,
}

impl Effective {
    const BUILT_IN: Effective = Effective {
        memory_mib: 512,
        cpus: 1.0,
        pids: 256,
        tmp_mib: 64,
        work_mib: 256,
    };

    fn resolve(asked: Option<&ResourceLimits>, defaults: &ResourceLimits) -> Self {
        let asked = asked.copied().unwrap_or_default();
        let b = Self::BUILT_IN;
        Effective {
            memory_mib: asked
                .memory_mib
                .or(defaults.memory_mib)
                .unwrap_or(b.memory_mib),
            cpus: asked.cpus.or(defaults.cpus).unwrap_or(b.cpus),
            pids: asked.pids.or(defaults.pids).unwrap_or(b.pids),
            tmp_mib: asked.tmp_mib.or(defaults.tmp_mib).unwrap_or(b.tmp_mib),
            work_mib: asked.work_mib.or(defaults.work_mib).unwrap_or(b.work_mib),
        }
    }

    fn check(&self, max: &ResourceLimits) -> Result<(), String> {
        // The engine refuses less than 6 MiB of memory.
        if self.memory_mib < 6 {
            return Err(format!(
                "memory limit {} MiB is below the minimum of 6 MiB",
                self.memory_mib
            ));
        }
        if !(self.cpus.is_finite() && self.cpus >= 0.01) {
            return Err(format!(
                "cpu limit {} is not a positive number of CPUs",
                self.cpus
            ));
        }
        if self.pids < 1 || self.tmp_mib < 1 || self.work_mib < 1 {
            return Err("pids, tmp_mib and work_mib limits must be at least 1".to_owned());
        }
        let over = |what: &str, value: String, max: String| {
            Err(format!(
                "{what} {value} is over this worker's maximum of {max}"
            ))
        };
        if let Some(m) = max.memory_mib
            && self.memory_mib > m
        {
            return over(
                "memory limit",
                format!("{} MiB", self.memory_mib),
                format!("{m} MiB"),
            );
        }
        if let Some(m) = max.cpus
            && self.cpus > m
        {
            return over("cpu limit", format!("{}", self.cpus), format!("{m}"));
        }
        if let Some(m) = max.pids
            && self.pids > m
        {
            return over("pids limit", self.pids.to_string(), m.to_string());
        }
        if let Some(m) = max.tmp_mib
            && self.tmp_mib > m
        {
            return over(
                "/tmp size",
                format!("{} MiB", self.tmp_mib),
                format!("{m} MiB"),
            );
        }
        if let Some(m) = max.work_mib
            && self.work_mib > m
        {
            return over(
                "run files size (work_mib)",
                format!("{} MiB", self.work_mib),
                format!("{m} MiB"),
            );
        }
        Ok(())
    }
}

/// What the attach reader saw.
#[derive(Debug, Default)]
struct AttachReport {
    tail: Vec<String>,
    /// The last stdout lines (where the engine writes why an exec could not start).
    out_tail: Vec<String>,
    abandoned: bool,
    error: Option<String>,
}

type OutputStreamBox =
    Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// Reads the multiplexed attach stream to its end, emitting lines. After the container exited
/// (`exited` carries the instant), reading stops at the drain limits (the engine normally
/// closes the stream at once). Time spent waiting for the events channel never counts.
async fn pump_attach(
    mut output: OutputStreamBox,
    events: &mpsc::Sender<ExecEvent>,
    mut exited: watch::Receiver<Option<Instant>>,
    drain_idle: Duration,
    drain_max: Duration,
    max_line_bytes: usize,
) -> AttachReport {
    let mut report = AttachReport::default();
    let mut out_split = LineSplitter::new(max_line_bytes);
    let mut err_split = LineSplitter::new(max_line_bytes);
    let mut out_sink = LineSink::new(events, OutputStream::Stdout, STDERR_TAIL_LINES);
    let mut err_sink = LineSink::new(events, OutputStream::Stderr, STDERR_TAIL_LINES);
    let mut exit_seen: Option<Instant> = None;
    loop {
        if exit_seen.is_none() {
            exit_seen = *exited.borrow();
        }
        let item = match exit_seen {
            None => {
                tokio::select! {
                    item = output.next() => item,
                    changed = exited.changed() => {
                        if changed.is_err() {
                            exit_seen = Some(exited.borrow().unwrap_or_else(Instant::now));
                        }
                        continue;
                    }
                }
            }
            Some(at) => {
                let hard = at + drain_max;
                let now = Instant::now();
                if now >= hard {
                    report.abandoned = true;
                    break;
                }
                match tokio::time::timeout_at((now + drain_idle).min(hard), output.next()).await {
                    Ok(item) => item,
                    Err(_) => {
                        report.abandoned = true;
                        break;
                    }
                }
            }
        };
        match item {
            None => break,
            Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                push_chunk(&mut out_split, &mut out_sink, &message).await;
            }
            Some(Ok(LogOutput::StdErr { message })) => {
                push_chunk(&mut err_split, &mut err_sink, &message).await;
            }
            Some(Ok(LogOutput::StdIn { .. })) => {}
            Some(Err(e)) => {
                report.error = Some(engine_message(&e));
                break;
            }
        }
    }
    finish_chunk(&mut out_split, &mut out_sink).await;
    finish_chunk(&mut err_split, &mut err_sink).await;
    report.tail = err_sink.into_tail();
    report.out_tail = out_sink.into_tail();
    report
}

/// A light check of an image reference (the engine does the real one).
fn check_image_name(image: &str) -> Result<(), String> {
    if image.is_empty() || image.len() > 512 {
        return Err(format!("invalid image name `{image}`"));
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("invalid image name `{}`", image.escape_debug()));
    }
    Ok(())
}

/// `registry:5000/repo:tag` → (`registry:5000/repo`, `Some("tag")`); no tag → `latest`; a
/// digest reference is passed whole.
fn split_image_ref(image: &str) -> (String, Option<String>) {
    if image.contains('@') {
        return (image.to_owned(), None);
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            (image[..at].to_owned(), Some(image[at + 1..].to_owned()))
        }
        None => (image.to_owned(), Some("latest".to_owned())),
    }
}

/// The engine is already removing the container (an `AutoRemove` container that stopped).
fn is_being_removed(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 409,
            message,
        } if message.contains("already in progress")
    )
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The engine's message for an error (without bollard's "Docker responded with status code"
/// preamble when there is a message).
fn engine_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } if !message.is_empty() => format!("{message} (HTTP {status_code})"),
        other => other.to_string(),
    }
}

fn engine_io(context: impl Into<String>, e: &bollard::errors::Error) -> ExecError {
    ExecError::io(context, std::io::Error::other(engine_message(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_refs() {
        assert_eq!(
            split_image_ref("baton/runtime:bash"),
            ("baton/runtime".to_owned(), Some("bash".to_owned()))
        );
        assert_eq!(
            split_image_ref("localhost:5000/x"),
            ("localhost:5000/x".to_owned(), Some("latest".to_owned()))
        );
        assert_eq!(
            split_image_ref("localhost:5000/x:1.2"),
            ("localhost:5000/x".to_owned(), Some("1.2".to_owned()))
        );
        assert_eq!(split_image_ref("x@sha256:ab").1, None);
    }

    #[test]
    fn pull_policy_parses() {
        assert_eq!("if-not-present".parse(), Ok(PullPolicy::IfNotPresent));
        assert_eq!("Always".parse(), Ok(PullPolicy::Always));
        assert_eq!("never".parse(), Ok(PullPolicy::Never));
        assert!("sometimes".parse::<PullPolicy>().is_err());
        assert_eq!(PullPolicy::IfNotPresent.to_string(), "if-not-present");
    }

    #[test]
    fn limits_resolve_and_check() {
        let config = ContainerConfig::new("w");
        let e = Effective::resolve(None, &config.defaults);
        assert_eq!(e, Effective::BUILT_IN);
        assert!(e.check(&config.maximums).is_ok());
        let asked = ResourceLimits {
            memory_mib: Some(100_000),
            ..ResourceLimits::default()
        };
        let e = Effective::resolve(Some(&asked), &config.defaults);
        assert_eq!(e.cpus, 1.0);
        let err = e.check(&config.maximums).expect_err("over the maximum");
        assert!(err.contains("memory limit 100000 MiB"), "{err}");
        let asked = ResourceLimits {
            work_mib: Some(5000),
            ..ResourceLimits::default()
        };
        let e = Effective::resolve(Some(&asked), &config.defaults);
        assert_eq!((e.work_mib, e.tmp_mib), (5000, 64));
        let err = e.check(&config.maximums).expect_err("over the maximum");
        assert!(err.contains("run files size (work_mib) 5000 MiB"), "{err}");
        let asked = ResourceLimits {
            work_mib: Some(0),
            ..ResourceLimits::default()
        };
        assert!(
            Effective::resolve(Some(&asked), &config.defaults)
                .check(&config.maximums)
                .is_err()
        );
        let asked = ResourceLimits {
            cpus: Some(0.0),
            ..ResourceLimits::default()
        };
        assert!(
            Effective::resolve(Some(&asked), &config.defaults)
                .check(&ResourceLimits::default())
                .is_err()
        );
    }

    #[test]
    fn users() {
        let mut config = ContainerConfig::new("w");
        assert_eq!(
            config.owner(),
            Ok(Owner {
                uid: 10001,
                gid: 10001
            })
        );
        config.user = "1000".into();
        assert_eq!(
            config.owner(),
            Ok(Owner {
                uid: 1000,
                gid: 1000
            })
        );
        config.user = "baton".into();
        assert!(config.owner().is_err());
    }
}
