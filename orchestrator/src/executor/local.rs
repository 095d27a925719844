//! The local executor: a process on this host, in its own process group.
//!
//! See the [module documentation](super) for the behaviour shared by all executors. Specific to
//! this one:
//!
//! * **Not a sandbox.** The process runs as the worker's user with the worker's privileges;
//!   Baton only enables it on workers started with `--allow-local`.
//! * **Files.** Each run gets a private temporary directory (mode `0700`) holding the script
//!   (`script.bash`, `script.sh`, `script.py` or `script.js`, mode `0600`) and, unless
//!   [`RunSpec::workdir`] is set, the working directory `work/`. The directory is removed when
//!   the run ends. The interpreter is started as `INTERPRETER SCRIPT_PATH`.
//! * **Environment.** Cleared, then: the variables named in [`LocalConfig::inherit_env`] copied
//!   from the worker (by default `PATH`, `HOME`, `LANG`; `PATH` falls back to a standard value),
//!   `PYTHONUNBUFFERED=1` (so Python output streams), then [`RunSpec::env`], then
//!   `BATON_JOB_ID`, `BATON_DIR` (from [`RunSpec::run_dir`]) and `BATON_HELPERS` (from
//!   [`RunSpec::helpers_dir`]); the helpers directory is also prepended to `PATH`, `PYTHONPATH`
//!   and `NODE_PATH` (whatever their values were), so `source baton.sh`, `import baton` and
//!   `require("baton")` work with no set-up.
//! * **Process.** stdin is `/dev/null`, stdout and stderr are pipes, and the process is the
//!   leader of a new process group (`process_group(0)`): timeout and cancel send `SIGTERM` to
//!   the group, then `SIGKILL` after [`RunSpec::kill_grace`]; when the main process exits by
//!   itself, the group is sent `SIGKILL` so background children (`sleep 1000 &`) do not outlive
//!   the run. Processes that leave the group (`setsid`, double-fork daemons) are out of reach;
//!   if one of them keeps the output pipe open, reading stops after
//!   [`LocalConfig::drain_idle`] without data (at most [`LocalConfig::drain_max`]) after the
//!   main process exited.
//! * **Start failures.** Spawn errors (missing interpreter or program, permission denied) and a
//!   working directory that does not exist are [`ExecError::StartFailed`]. A non-zero exit
//!   within the run's startup window is a start failure too, by the rule shared by every
//!   executor ([`startup`](super::startup)), with the last lines of stderr in the reason.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::Signal;
use tokio::io::AsyncRead;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::output::{DEFAULT_MAX_LINE_BYTES, DrainLimits, PumpReport, pump};
use super::process::ProcessGroup;
use super::startup;
use super::{
    ExecError, ExecEvent, Executor, OutputStream, RunOutcome, RunSpec, Runtime, http,
    sleep_until_opt,
};

/// `PATH` given to runs when the worker itself has none.
pub const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Number of stderr lines kept for start-failure messages.
const STDERR_TAIL_LINES: usize = 5;

/// Configuration of a [`LocalExecutor`].
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Interpreter for `bash` scripts (a bare name is looked up on the run's `PATH`).
    pub bash: PathBuf,
    /// Interpreter for `sh` scripts.
    pub sh: PathBuf,
    /// Interpreter for `python` scripts.
    pub python: PathBuf,
    /// Interpreter for `node` scripts.
    pub node: PathBuf,
    /// The startup window of runs whose spec has none ([`RunSpec::startup_window`]): only the
    /// `exec` 126/127 heuristic applies with it (see [`startup`](super::startup)).
    /// `Duration::ZERO` disables the check.
    pub startup_window: Duration,
    /// Worker environment variables passed through to runs.
    pub inherit_env: Vec<String>,
    /// Where per-run temporary directories are created (default: the system temp dir).
    pub temp_root: Option<PathBuf>,
    /// Longest emitted output line in bytes; longer lines are split.
    pub max_line_bytes: usize,
    /// After the main process exited (and its group was killed), stop reading a pipe that
    /// stays silent this long.
    pub drain_idle: Duration,
    /// After the main process exited, stop reading output after this long in any case.
    pub drain_max: Duration,
    /// Which addresses `http` runs may reach (default: public addresses only).
    pub http_policy: baton_egress::AddressPolicy,
    /// Whether `http` runs may make their request at all (a worker started with
    /// `--no-network` refuses them). Local scripts are not sandboxed: this does not cut
    /// their own network.
    pub allow_network: bool,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            bash: "bash".into(),
            sh: "sh".into(),
            python: "python3".into(),
            node: "node".into(),
            startup_window: Duration::from_millis(500),
            inherit_env: vec!["PATH".into(), "HOME".into(), "LANG".into()],
            temp_root: None,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            drain_idle: Duration::from_millis(500),
            drain_max: Duration::from_secs(5),
            http_policy: baton_egress::AddressPolicy::default(),
            allow_network: true,
        }
    }
}

/// Runs jobs as processes on this host. See the [module documentation](self).
#[derive(Debug, Default)]
pub struct LocalExecutor {
    config: LocalConfig,
    http: http::LazyHttp,
}

impl LocalExecutor {
    /// An executor with the given configuration.
    pub fn new(config: LocalConfig) -> Self {
        LocalExecutor {
            http: http::LazyHttp::new(config.http_policy.clone()),
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LocalConfig {
        &self.config
    }

    async fn run_spec(
        &self,
        spec: RunSpec,
        events: mpsc::Sender<ExecEvent>,
        cancel: CancellationToken,
    ) -> RunOutcome {
        if spec.runtime == Runtime::Http {
            if !self.config.allow_network {
                return RunOutcome::from_error(
                    ExecError::HttpRefused {
                        reason: "this worker does not give runs a network (--no-network)"
                            .to_owned(),
                    },
                    Duration::ZERO,
                );
            }
            return self
                .http
                .run(&spec, &events, &cancel, self.config.max_line_bytes)
                .await;
        }
        self.run_process(spec, events, cancel).await
    }

    async fn run_process(
        &self,
        spec: RunSpec,
        events: mpsc::Sender<ExecEvent>,
        cancel: CancellationToken,
    ) -> RunOutcome {
        let started = Instant::now();
        // `_files` (the temp dir) lives until the end of the run.
        let (mut command, program, _files) = match self.prepare(&spec) {
            Ok(p) => p,
            Err(e) => return RunOutcome::from_error(e, started.elapsed()),
        };
        if cancel.is_cancelled() {
            return RunOutcome::from_error(ExecError::Cancelled, started.elapsed());
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                return RunOutcome::from_error(
                    ExecError::start_failed(format!("cannot run `{program}`: {e}")),
                    started.elapsed(),
                );
            }
        };
        let spawned = Instant::now();
        let pid = child.id();
        let mut group = ProcessGroup::new(pid);
        tracing::debug!(job.id = %spec.job_id, runtime = %spec.runtime, pid, "local run started");
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        // Receiver gone is fine: the run goes on, output is discarded.
        let _ = events.send(ExecEvent::Started { pid }).await;

        let (exit_tx, exit_rx) = watch::channel(None::<Instant>);
        let limits = DrainLimits {
            idle: self.config.drain_idle,
            max: self.config.drain_max,
        };
        let max_line = self.config.max_line_bytes;

        let supervise = async {
            let deadline = started.checked_add(spec.timeout);
            let first = tokio::select! {
                biased;
                status = child.wait() => Ok(status),
                _ = cancel.cancelled() => Err(Stop::Cancelled),
                _ = sleep_until_opt(deadline) => Err(Stop::TimedOut),
            };
            let (status, stop) = match first {
                Ok(status) => (status, None),
                Err(stop) => {
                    tracing::debug!(job.id = %spec.job_id, pid, ?stop, "stopping local run");
                    if !spec.kill_now.is_cancelled() {
                        group.signal(Signal::SIGTERM);
                    }
                    // The grace ends early when a forced cancel comes (or came already).
                    let grace = async {
                        tokio::select! {
                            _ = tokio::time::sleep(spec.kill_grace) => {}
                            _ = spec.kill_now.cancelled() => {}
                        }
                    };
                    let exited = {
                        let wait = child.wait();
                        tokio::pin!(wait);
                        tokio::select! {
                            biased;
                            status = &mut wait => Some(status),
                            _ = grace => None,
                        }
                    };
                    let status = match exited {
                        Some(status) => status,
                        None => {
                            group.signal(Signal::SIGKILL);
                            child.wait().await
                        }
                    };
                    (status, Some(stop))
                }
            };
            let exited = Instant::now();
            // Whatever is left of the tree goes now.
            group.kill_and_disarm();
            let _ = exit_tx.send(Some(exited));
            (status, stop, exited)
        };
        let ((status, stop, exited), out, err) = tokio::join!(
            supervise,
            pump_opt(
                stdout,
                OutputStream::Stdout,
                &events,
                exit_rx.clone(),
                limits,
                max_line,
                0
            ),
            pump_opt(
                stderr,
                OutputStream::Stderr,
                &events,
                exit_rx,
                limits,
                max_line,
                STDERR_TAIL_LINES
            ),
        );

        let mut outcome = RunOutcome {
            pid,
            ..RunOutcome::default()
        };
        let status = match status {
            Ok(status) => {
                outcome.exit_code = status.code();
                outcome.signal = status.signal();
                Some(status)
            }
            Err(e) => {
                outcome.error = Some(ExecError::io("waiting for the process", e));
                None
            }
        };
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
                let (window, from_spec) = startup::window_of(&spec, self.config.startup_window);
                if let Some(error) = status.and_then(|status| {
                    startup::judge(&startup::EarlyEnd {
                        runtime: spec.runtime,
                        window,
                        from_spec,
                        ran_for: exited - spawned,
                        exit_code: status.code(),
                        program: &program,
                        place: "",
                        stderr_tail: &err.tail,
                    })
                }) {
                    outcome.error = Some(error);
                }
            }
        }
        for (report, name) in [(out, "stdout"), (err, "stderr")] {
            if report.abandoned {
                tracing::warn!(
                    job.id = %spec.job_id, stream = name,
                    "stopped reading output: a process outside the run's process group holds the pipe"
                );
            }
            if let Some(e) = report.error
                && outcome.error.is_none()
            {
                outcome.error = Some(ExecError::io(format!("reading {name}"), e));
            }
        }
        outcome.duration = started.elapsed();
        tracing::debug!(job.id = %spec.job_id, pid, summary = %outcome.summary(), "local run ended");
        outcome
    }

    /// Writes the script, resolves the working directory and builds the command.
    fn prepare(&self, spec: &RunSpec) -> Result<(Command, String, tempfile::TempDir), ExecError> {
        let argv_exec: Vec<String>;
        let program: PathBuf;
        let interpreter = match spec.runtime {
            Runtime::Bash => Some(&self.config.bash),
            Runtime::Sh => Some(&self.config.sh),
            Runtime::Python => Some(&self.config.python),
            Runtime::Node => Some(&self.config.node),
            Runtime::Exec | Runtime::Http => None,
        };
        if let Some(interpreter) = interpreter {
            if spec.content.is_none() {
                return Err(ExecError::invalid_spec(format!(
                    "{} runtime needs script content",
                    spec.runtime
                )));
            }
            program = interpreter.clone();
            argv_exec = Vec::new();
        } else if spec.runtime == Runtime::Exec {
            let argv = spec.command.as_deref().unwrap_or_default();
            match argv.first() {
                Some(first) if !first.is_empty() => {
                    program = PathBuf::from(first);
                    argv_exec = argv[1..].to_vec();
                }
                _ => {
                    return Err(ExecError::invalid_spec(
                        "exec runtime needs a non-empty command",
                    ));
                }
            }
        } else {
            return Err(ExecError::invalid_spec(format!(
                "the local process runner cannot run the {} runtime",
                spec.runtime
            )));
        }
        let env = self.environment(spec)?;

        let root = self
            .config
            .temp_root
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let files = tempfile::Builder::new()
            .prefix("baton-run-")
            .tempdir_in(&root)
            .map_err(|e| {
                ExecError::io(format!("creating a run directory in {}", root.display()), e)
            })?;
        fs::set_permissions(files.path(), fs::Permissions::from_mode(0o700))
            .map_err(|e| ExecError::io("restricting the run directory", e))?;

        let workdir = match &spec.workdir {
            Some(dir) => {
                check_workdir(dir)?;
                dir.clone()
            }
            None => {
                let dir = files.path().join("work");
                fs::create_dir(&dir)
                    .map_err(|e| ExecError::io("creating the working directory", e))?;
                dir
            }
        };

        let mut command = Command::new(&program);
        if let (Some(content), Some(name)) = (&spec.content, spec.runtime.script_file_name())
            && interpreter.is_some()
        {
            let path = files.path().join(name);
            write_private(&path, content.as_bytes())
                .map_err(|e| ExecError::io(format!("writing {}", path.display()), e))?;
            command.arg(&path);
        }
        command
            .args(&argv_exec)
            .env_clear()
            .envs(&env)
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        Ok((command, program.display().to_string(), files))
    }

    fn environment(&self, spec: &RunSpec) -> Result<BTreeMap<OsString, OsString>, ExecError> {
        let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
        for name in &self.config.inherit_env {
            if let Some(value) = std::env::var_os(name) {
                env.insert(name.into(), value);
            }
        }
        env.entry("PATH".into())
            .or_insert_with(|| FALLBACK_PATH.into());
        env.insert("PYTHONUNBUFFERED".into(), "1".into());
        for (key, value) in &spec.env {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                return Err(ExecError::invalid_spec(format!(
                    "invalid environment variable `{}`",
                    key.escape_debug()
                )));
            }
            env.insert(key.into(), value.into());
        }
        env.insert("BATON_JOB_ID".into(), spec.job_id.to_string().into());
        if let Some(dir) = &spec.run_dir {
            env.insert("BATON_DIR".into(), dir.into());
        }
        if let Some(dir) = &spec.helpers_dir {
            env.insert("BATON_HELPERS".into(), dir.into());
            for var in ["PATH", "PYTHONPATH", "NODE_PATH"] {
                let key = OsString::from(var);
                let mut value = OsString::from(dir);
                if let Some(old) = env.get(&key).filter(|v| !v.is_empty()) {
                    value.push(":");
                    value.push(old);
                }
                env.insert(key, value);
            }
        }
        Ok(env)
    }
}

impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
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

#[derive(Debug, Clone, Copy)]
enum Stop {
    Cancelled,
    TimedOut,
}

fn check_workdir(dir: &Path) -> Result<(), ExecError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(ExecError::start_failed(format!(
            "working directory {} is not a directory",
            dir.display()
        ))),
        Err(e) => Err(ExecError::start_failed(format!(
            "working directory {}: {e}",
            dir.display()
        ))),
    }
}

fn write_private(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(content)
}

async fn pump_opt<R: AsyncRead + Unpin>(
    reader: Option<R>,
    stream: OutputStream,
    events: &mpsc::Sender<ExecEvent>,
    exited: watch::Receiver<Option<Instant>>,
    limits: DrainLimits,
    max_line_bytes: usize,
    tail_keep: usize,
) -> PumpReport {
    match reader {
        Some(r) => pump(r, stream, events, exited, limits, max_line_bytes, tail_keep).await,
        None => PumpReport::default(),
    }
}
