//! The SSH executor: runs on registered servers over pooled, pinned connections (`russh`).
//!
//! See the [module documentation](super) for the contract shared by all executors. A run goes
//! to the server described by [`RunSpec::ssh`] (an [`SshTarget`]).
//!
//! ```no_run
//! use baton_worker::executor::ssh::{SshAuth, SshConfig, SshExecutor, SshTarget};
//! use baton_worker::executor::{RunSpec, Runtime, run_collect};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() {
//! let executor = SshExecutor::new(SshConfig::default());
//! let mut target = SshTarget::new(
//!     uuid::Uuid::now_v7(), "10.0.0.5", 22, "deploy",
//!     SshAuth::PrivateKey { pem: "-----BEGIN OPENSSH PRIVATE KEY-----…".into(), passphrase: None },
//! );
//! target.host_key = Some("ssh-ed25519 AAAA…".into());
//! let mut spec = RunSpec::script(Runtime::Bash, "hostname");
//! spec.ssh = Some(target);
//! let (outcome, events) = run_collect(&executor, spec, CancellationToken::new()).await;
//! # }
//! ```
//!
//! # How a run goes
//!
//! 1. **Slot and connection.** The run takes one of the server's
//!    [`SshTarget::max_concurrent`] slots (counted across everything this executor runs), then
//!    an idle pooled connection or a new one (DNS, TCP, handshake with the host key check,
//!    authentication; at most [`SshConfig::connect_timeout`]). Waiting for a slot counts
//!    against the run's timeout and stops on cancellation. A pooled connection found dead is
//!    replaced once, transparently.
//! 2. **Upload.** Over SFTP (one session per connection, kept open between runs), a fresh
//!    directory `{remote_temp_dir}/baton-{job}-{random}` is created with mode 0700 (an `mkdir`
//!    that fails if the name exists), and receives the generated `control.sh`, `start.sh` and
//!    `env.sh`, the script (`script.bash`, …, mode 0600), the helpers from
//!    [`RunSpec::helpers_dir`] into `helpers/` and the per-run directory [`RunSpec::run_dir`]
//!    into `run/` (`$BATON_DIR`), plus `work/`, the working directory unless
//!    [`RunSpec::workdir`] names one (a path on the server, relative to the login directory
//!    unless absolute). Requests that do not depend on each other are in flight together
//!    (files several at a time, each as soon as its directory exists; the channels open
//!    meanwhile), so a run costs a few round trips rather than one per request.
//! 3. **Start.** A control channel runs `control.sh` (as soon as it is written, while the rest
//!    uploads); the run's channel runs `start.sh`, which
//!    leads its own process group, records its id, loads the environment and `exec`s the
//!    interpreter (`bash`, `sh`, `python3`, `node` from the login `PATH` unless configured) or
//!    the `exec` argv, with stdin from `/dev/null`. Everything runs under `/bin/sh` whatever
//!    the login shell. The environment is the login environment plus `PYTHONUNBUFFERED=1`,
//!    [`RunSpec::env`] (names must be shell identifiers), `BATON_JOB_ID`, `BATON_DIR`,
//!    `BATON_HELPERS`, and the helpers directory prepended to `PATH`, `PYTHONPATH` and
//!    `NODE_PATH`. It travels in the private file `env.sh`, not on a command line (visible in
//!    `ps`) nor as SSH `env` requests (dropped by sshd unless listed in `AcceptEnv`).
//! 4. **Output** streams live from the channel's stdout and stderr (same line splitting and
//!    `PROGRESS: N` handling as local runs). The exit status or, for a run killed by a signal,
//!    the exit signal, is reported.
//! 5. **Stop.** On timeout or cancellation the control channel sends `SIGTERM` to the remote
//!    process group, then `SIGKILL` after [`RunSpec::kill_grace`]. When the run's process exits
//!    by itself, the group is sent `SIGKILL`, so background children do not outlive it.
//! 6. **Collect and clean up.** `$BATON_DIR/out/` is downloaded into the local
//!    `run_dir/out/`, so the worker collects the output exactly as for a local run. Closing the
//!    control channel's input then makes it kill anything left and `rm -rf` the directory. The
//!    same happens on the server if the connection drops (worker crash, network loss, run
//!    future dropped): `control.sh` sees end of input. The outcome is returned once the input
//!    is closed; the removal's confirmation (the control channel closing) is awaited in the
//!    background, and the connection's next run waits for it and reconnects if it did not
//!    come. The connection goes back to the pool only after a clean run.
//!
//! # Errors
//!
//! Transport failures are [`ExecError::Ssh`] ([`SshError`]), an infrastructure error.
//! [`SshError::is_retryable`]: DNS failures, refused and failed connections, an open circuit
//! and lost sessions are retryable; authentication failures, host key mismatches and invalid
//! server definitions are not. A run the server could not start (interpreter or program
//! missing, working directory missing) is [`ExecError::StartFailed`], as for local runs.
//! `http` runs are refused ([`ExecError::InvalidSpec`]): they do not involve a server.
//!
//! # Host keys
//!
//! [`HostKeyPolicy::Strict`] requires [`SshTarget::host_key`] and refuses any other key.
//! [`HostKeyPolicy::AcceptNew`] without a key accepts the first key seen, reports it in
//! [`RunOutcome::observed_host_key`] on every run until the target carries a key (the worker
//! sends it to the API, which records it), and refuses any other key from then on. The
//! executor remembers per server id the key it accepted or last saw pinned (forgotten only
//! when the server's host or port changes), so clearing the key in the API does not re-open
//! trust on first use in a running worker: to accept a server's new key, register it. A key
//! that differs from the pinned or remembered one is always refused, before authentication
//! (no credentials are sent and nothing runs). Only the server's key is trusted: a host
//! certificate is judged by the key it certifies.
//!
//! # Pool and circuit breaker
//!
//! Connections are pooled per server id inside one executor (keep one executor per worker:
//! `max_concurrent` is counted per executor). A run holds its connection exclusively, so a
//! server never has more than `max_concurrent` connections from this executor; reused
//! connections are checked and replaced once if found dead; unused ones close after
//! [`SshConfig::idle_timeout`]; keepalives every [`SshConfig::keepalive_interval`]
//! (`keepalive_max` unanswered ones close the connection). A server definition that changes
//! (credentials, host key, address) drops the idle connections made with the old one. The
//! [`breaker`](BreakerConfig) opens after `failure_threshold` consecutive connection failures
//! (DNS, refused, timeout, handshake) and fails runs fast with [`SshError::CircuitOpen`]
//! until `cooldown` has passed and one probe connection succeeds. [`SshExecutor::server_stats`]
//! exposes the counters.
//!
//! # Limits
//!
//! A process that leaves the run's process group (`setsid`, daemons) is out of reach, as for
//! local runs. If the connection is lost during a run, the outcome is a retryable
//! [`SshError::Session`]; the server kills the run when it notices the disconnection. A server
//! that dies during a run, or in the few milliseconds after its outcome while the directory is
//! being removed, keeps the directory (until its temporary directory is cleaned).

mod breaker;
mod error;
mod host_key;
mod pool;
mod remote;
mod run;
mod shell_transfer;
mod target;
mod transfer;

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use breaker::{BreakerConfig, BreakerState};
pub use error::SshError;
pub use host_key::{fingerprint, key_line};
pub use pool::{FileTransfer, ServerStats};
pub use target::{HostKeyPolicy, SshAuth, SshTarget};

#[allow(unused_imports)] // for documentation links
use super::ExecError;
use super::output::DEFAULT_MAX_LINE_BYTES;
use super::{ExecEvent, Executor, RunOutcome, RunSpec, Runtime};

/// Configuration of an [`SshExecutor`].
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Longest time to establish a connection: DNS, TCP, handshake and authentication.
    pub connect_timeout: Duration,
    /// Send a keepalive when nothing was received from the server for this long.
    pub keepalive_interval: Duration,
    /// Close a connection after this many unanswered keepalives.
    pub keepalive_max: usize,
    /// Close a pooled connection unused for this long.
    pub idle_timeout: Duration,
    /// The per-server circuit breaker.
    pub breaker: BreakerConfig,
    /// Where runs' temporary directories are created on servers (an absolute path of letters,
    /// digits, `/`, `_`, `.` and `-`).
    pub remote_temp_dir: String,
    /// Interpreter for `bash` scripts on servers (a bare name is looked up on the login `PATH`).
    pub bash: String,
    /// Interpreter for `sh` scripts.
    pub sh: String,
    /// Interpreter for `python` scripts.
    pub python: String,
    /// Interpreter for `node` scripts.
    pub node: String,
    /// The startup window of runs whose spec has none ([`RunSpec::startup_window`](crate::executor::RunSpec::startup_window)):
    /// only the `exec` 126/127 heuristic applies with it (see [`startup`](crate::executor::startup)).
    pub startup_window: Duration,
    /// Longest emitted output line in bytes; longer lines are split.
    pub max_line_bytes: usize,
    /// After the run's process exited, stop reading output that stays silent this long (a
    /// process outside the group may hold the channel open).
    pub drain_idle: Duration,
    /// After the run's process exited, stop reading output after this long in any case.
    pub drain_max: Duration,
    /// Longest wait for one SFTP request, and for each cleanup step.
    pub operation_timeout: Duration,
    /// Largest file downloaded from `$BATON_DIR/out/` (larger ones are cut, and then reported
    /// as oversized by the worker's output checks).
    pub max_download_bytes: u64,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            connect_timeout: Duration::from_secs(15),
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 3,
            idle_timeout: Duration::from_secs(60),
            breaker: BreakerConfig::default(),
            remote_temp_dir: "/tmp".into(),
            bash: "bash".into(),
            sh: "sh".into(),
            python: "python3".into(),
            node: "node".into(),
            startup_window: Duration::from_millis(500),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            drain_idle: Duration::from_millis(500),
            drain_max: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
            max_download_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Runs jobs on SSH servers. See the [module documentation](self).
///
/// Holds the connection pool: keep one executor per worker (share it as `Arc<dyn Executor>`).
#[derive(Debug, Default)]
pub struct SshExecutor {
    config: SshConfig,
    pool: pool::Pool,
}

impl SshExecutor {
    /// An executor with an empty pool.
    pub fn new(config: SshConfig) -> Self {
        SshExecutor {
            config,
            pool: pool::Pool::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SshConfig {
        &self.config
    }

    /// Connection counters and breaker state of one server (`None` before its first run).
    pub fn server_stats(&self, server_id: Uuid) -> Option<ServerStats> {
        self.pool.stats(server_id)
    }

    /// [`SshExecutor::server_stats`] of every server this executor has run on.
    pub fn all_server_stats(&self) -> Vec<ServerStats> {
        self.pool.all_stats()
    }

    /// Closes every idle pooled connection now (running ones are not affected).
    pub fn close_idle(&self) {
        self.pool.close_idle();
    }
}

impl Executor for SshExecutor {
    fn name(&self) -> &'static str {
        "ssh"
    }

    fn supports(&self, runtime: Runtime) -> bool {
        runtime != Runtime::Http
    }

    fn run(
        &self,
        spec: RunSpec,
        events: mpsc::Sender<ExecEvent>,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, RunOutcome> {
        Box::pin(run::run(self, spec, events, cancel))
    }
}
