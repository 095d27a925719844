//! One remote run, from the upload to the cleanup.

use std::collections::VecDeque;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use russh::client::Msg;
use russh::{Channel, ChannelMsg, Sig};
use russh_sftp::client::SftpSession;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pool::{AcquireError, FileTransfer, Lease, SshHandle};
use super::remote::{self, RemoteDir, RunFiles, START_FAILED_CODE};
use super::shell_transfer;
use super::transfer::{self, Entry, RequestError};
use super::{SshConfig, SshError, SshExecutor, SshTarget};
use crate::executor::output::{LineSplitter, parse_progress};
use crate::executor::{ExecError, ExecEvent, OutputStream, RunOutcome, RunSpec, sleep_until_opt};

/// Events kept ready for a slow consumer before reading the run's output stops (back-pressure).
const MAX_PENDING_EVENTS: usize = 256;
/// Lines of stderr kept for start-failure messages.
const STDERR_TAIL_LINES: usize = 5;
/// Delay before signalling again a run that has not recorded its process group yet.
const SIGNAL_RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    TimedOut,
}

/// Why a phase of the run ended early.
#[derive(Debug)]
enum Fail {
    Ssh(SshError),
    Exec(ExecError),
    Stop(Stop),
}

impl From<SshError> for Fail {
    fn from(e: SshError) -> Self {
        Fail::Ssh(e)
    }
}

impl From<AcquireError> for Fail {
    fn from(e: AcquireError) -> Self {
        match e {
            AcquireError::Ssh(e) => Fail::Ssh(e),
            AcquireError::Cancelled => Fail::Stop(Stop::Cancelled),
            AcquireError::TimedOut => Fail::Stop(Stop::TimedOut),
        }
    }
}

fn fail_error(fail: Fail, spec: &RunSpec) -> ExecError {
    match fail {
        Fail::Ssh(e) => ExecError::Ssh(e),
        Fail::Exec(e) => e,
        Fail::Stop(Stop::Cancelled) => ExecError::Cancelled,
        Fail::Stop(Stop::TimedOut) => ExecError::TimedOut {
            after: spec.timeout,
        },
    }
}

pub(super) async fn run(
    executor: &SshExecutor,
    spec: RunSpec,
    events: mpsc::Sender<ExecEvent>,
    cancel: CancellationToken,
) -> RunOutcome {
    let started = Instant::now();
    let mut outcome = run_inner(executor, &spec, &events, &cancel, started).await;
    outcome.duration = started.elapsed();
    tracing::debug!(
        job.id = %spec.job_id,
        server.id = ?spec.ssh.as_ref().map(|t| t.server_id),
        summary = %outcome.summary(),
        "ssh run ended"
    );
    outcome
}

async fn run_inner(
    executor: &SshExecutor,
    spec: &RunSpec,
    events: &mpsc::Sender<ExecEvent>,
    cancel: &CancellationToken,
    started: Instant,
) -> RunOutcome {
    let config = &executor.config;
    let prepared = (|| {
        let target = spec.ssh.as_ref().ok_or_else(|| {
            ExecError::invalid_spec("the ssh executor needs a server (RunSpec::ssh is not set)")
        })?;
        let dir = RemoteDir::new(config, spec)?;
        let files = remote::build(spec, config, &dir)?;
        let uploads = uploads(spec, &files)?;
        Ok::<_, ExecError>((target, dir, files, uploads))
    })();
    let (target, dir, files, uploads) = match prepared {
        Ok(p) => p,
        Err(e) => return RunOutcome::from_error(e, started.elapsed()),
    };
    if cancel.is_cancelled() {
        return RunOutcome::from_error(ExecError::Cancelled, started.elapsed());
    }
    let deadline = started.checked_add(spec.timeout);
    let mut lease = match executor
        .pool
        .acquire(target, config, cancel, deadline)
        .await
    {
        Ok(lease) => lease,
        Err(e) => {
            return RunOutcome::from_error(fail_error(e.into(), spec), started.elapsed());
        }
    };
    let run = RemoteRun {
        executor,
        config,
        target,
        spec,
        dir: &dir,
        events,
        cancel,
        deadline,
    };
    let (mut outcome, healthy) = run.execute(&mut lease, &files, &uploads).await;
    outcome.observed_host_key = lease.observed_host_key.clone();
    if healthy {
        lease.release();
    }
    // Otherwise dropping the lease closes the connection: the server then cleans up (see
    // `remote`).
    outcome
}

/// Everything uploaded after `control.sh`, relative to the run's directory.
fn uploads(spec: &RunSpec, files: &RunFiles) -> Result<Vec<Entry>, ExecError> {
    let mut entries = vec![
        Entry::File("start.sh".into(), files.start_sh.clone().into_bytes()),
        Entry::File("env.sh".into(), files.env_sh.clone().into_bytes()),
    ];
    if let Some((name, content)) = &files.script {
        entries.push(Entry::File((*name).into(), content.clone().into_bytes()));
    }
    if files.make_workdir {
        entries.push(Entry::Dir("work".into()));
    }
    for (local, remote) in [(&spec.helpers_dir, "helpers"), (&spec.run_dir, "run")] {
        let Some(local) = local else { continue };
        let tree = transfer::local_tree(local)
            .map_err(|e| ExecError::io(format!("reading {}", local.display()), e))?;
        entries.push(Entry::Dir(remote.into()));
        for entry in tree {
            entries.push(match entry {
                Entry::Dir(rel) => Entry::Dir(format!("{remote}/{rel}")),
                Entry::File(rel, data) => Entry::File(format!("{remote}/{rel}"), data),
            });
        }
    }
    // `local_tree` ordering, again for the combined list: directories first, parents first.
    entries.sort_by_key(|e| match e {
        Entry::Dir(d) => (0, d.matches('/').count()),
        Entry::File(..) => (1, 0),
    });
    Ok(entries)
}

/// How the exec'd process ended.
#[derive(Debug, Clone)]
enum Exit {
    Code(u32),
    Signal(Sig),
}

/// How a run moves its files: its SFTP session, or exec channels when the server has no SFTP
/// subsystem (`shell_transfer`).
enum Files {
    Sftp(SftpSession),
    Shell,
}

/// What `setup` got running.
struct Running {
    files: Files,
    control: Channel<Msg>,
    main: Channel<Msg>,
    early: Vec<ChannelMsg>,
}

/// How far `setup` got, for cleaning up after a failure.
const SETUP_NOTHING: u8 = 0;
const SETUP_DIR_CREATED: u8 = 1;
const SETUP_CONTROL_STARTED: u8 = 2;

struct RemoteRun<'a> {
    executor: &'a SshExecutor,
    config: &'a SshConfig,
    target: &'a SshTarget,
    spec: &'a RunSpec,
    dir: &'a RemoteDir,
    events: &'a mpsc::Sender<ExecEvent>,
    cancel: &'a CancellationToken,
    deadline: Option<Instant>,
}

impl RemoteRun<'_> {
    fn address(&self) -> String {
        self.target.address()
    }

    fn session_error(&self, message: impl Into<String>) -> Fail {
        Fail::Ssh(SshError::session(&self.address(), message))
    }

    /// Runs everything on the leased connection. Returns the outcome (without duration and
    /// observed key) and whether the connection may be pooled again.
    async fn execute(
        &self,
        lease: &mut Lease,
        files: &RunFiles,
        uploads: &[Entry],
    ) -> (RunOutcome, bool) {
        let progress = AtomicU8::new(SETUP_NOTHING);
        let setup = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(Fail::Stop(Stop::Cancelled)),
            r = self.setup(lease, files, uploads, &progress) => r,
            _ = sleep_until_opt(self.deadline) => Err(Fail::Stop(Stop::TimedOut)),
        };
        let running = match setup {
            Ok(running) => running,
            Err(fail) => {
                if progress.load(Ordering::SeqCst) == SETUP_DIR_CREATED
                    && let Some(handle) = lease.handle()
                {
                    // `control.sh` is not there to clean up: remove the directory directly.
                    let _ = tokio::time::timeout(
                        self.config.operation_timeout.min(Duration::from_secs(5)),
                        exec_to_end(handle, &self.dir.remove_command()),
                    )
                    .await;
                }
                return (
                    RunOutcome::from_error(fail_error(fail, self.spec), Duration::ZERO),
                    false,
                );
            }
        };
        let (outcome, healthy, files, cleanup) = self.supervise(running, lease.handle()).await;
        if healthy {
            if let Files::Sftp(sftp) = files {
                lease.keep_sftp(sftp);
            }
            if let Some(cleanup) = cleanup {
                lease.set_cleanup(cleanup);
            }
        }
        (outcome, healthy)
    }

    /// Uploads the files and starts the control channel and the run.
    async fn setup(
        &self,
        lease: &mut Lease,
        files: &RunFiles,
        uploads: &[Entry],
        progress: &AtomicU8,
    ) -> Result<Running, Fail> {
        let timeout_secs = self.config.operation_timeout.as_secs().max(1);
        // The previous run on this connection finished its cleanup in the background. Only a
        // connection on which it was confirmed is used further (as when it was awaited there).
        if let Some(cleanup) = lease.take_cleanup()
            && !cleanup.await.unwrap_or(false)
        {
            tracing::debug!(
                server.id = %self.target.server_id,
                "the previous run's cleanup was not confirmed, reconnecting"
            );
            self.executor
                .pool
                .reconnect(lease, self.target, self.config, self.cancel, self.deadline)
                .await?;
        }
        if lease.transfer() == FileTransfer::Shell {
            return self.setup_shell(lease, files, uploads, progress).await;
        }
        // A reused connection may have died while idle: its first request tells, and it is
        // then replaced once.
        let root = match self.make_root(lease, timeout_secs).await {
            Err(RequestError::Session(e)) if lease.reused => {
                tracing::debug!(
                    server.id = %self.target.server_id, error = %e,
                    "pooled ssh connection is dead, reconnecting"
                );
                self.executor
                    .pool
                    .reconnect(lease, self.target, self.config, self.cancel, self.deadline)
                    .await?;
                self.make_root(lease, timeout_secs).await
            }
            other => other,
        };
        let sftp = match root {
            Ok(sftp) => sftp,
            Err(RequestError::Unavailable(reason)) => {
                tracing::info!(
                    server.id = %self.target.server_id, %reason,
                    "no sftp on this ssh server: files go over exec channels from now on"
                );
                lease.learn_transfer(FileTransfer::Shell);
                return self.setup_shell(lease, files, uploads, progress).await;
            }
            Err(e) => return Err(self.session_error(e.to_string())),
        };
        lease.learn_transfer(FileTransfer::Sftp);
        progress.store(SETUP_DIR_CREATED, Ordering::SeqCst);
        let handle = lease
            .handle()
            .ok_or_else(|| self.session_error("no connection"))?;
        // Channels open while files are written (a round trip each, spent in parallel); the
        // control channel runs `control.sh` as soon as it is written, during the rest of the
        // upload; the run starts once everything is there.
        let control_path = self.dir.path("control.sh");
        let (control_sh, control) = tokio::join!(
            transfer::put_file(&sftp, &control_path, files.control_sh.as_bytes(), 0o600),
            open_channel(handle)
        );
        control_sh.map_err(|e| self.session_error(e))?;
        let control_error =
            |e: StartError| self.session_error(format!("cannot start the control channel: {e}"));
        let control = control.map_err(control_error)?;
        let start_control = async {
            let started = exec_on(control, &self.dir.sh_command("control.sh")).await;
            if started.is_ok() {
                progress.store(SETUP_CONTROL_STARTED, Ordering::SeqCst);
            }
            started
        };
        let (control, main, uploaded) = tokio::join!(
            start_control,
            open_channel(handle),
            transfer::upload(&sftp, self.dir.root(), uploads, 0o600)
        );
        let (control, _) = control.map_err(control_error)?;
        uploaded.map_err(|e| self.session_error(e))?;
        let start_error = |e| match e {
            StartError::Refused => Fail::Exec(ExecError::start_failed(format!(
                "the SSH server {} refused to run a command",
                self.address()
            ))),
            StartError::Channel(e) => self.session_error(e),
        };
        let (main, early) = exec_on(main.map_err(start_error)?, &self.dir.sh_command("start.sh"))
            .await
            .map_err(start_error)?;
        main.eof()
            .await
            .map_err(|e| self.session_error(format!("cannot close the run's stdin: {e}")))?;
        Ok(Running {
            files: Files::Sftp(sftp),
            control,
            main,
            early,
        })
    }

    /// [`RemoteRun::setup`] for a server without SFTP: the directory and every file in one
    /// `mkdir` + `tar -x` over an exec channel, then the control channel and the run. When
    /// that fails too the run fails at once, saying that neither transfer works.
    async fn setup_shell(
        &self,
        lease: &mut Lease,
        files: &RunFiles,
        uploads: &[Entry],
        progress: &AtomicU8,
    ) -> Result<Running, Fail> {
        let timeout = self.config.operation_timeout;
        let mut all = Vec::with_capacity(uploads.len() + 1);
        all.push(Entry::File(
            "control.sh".into(),
            files.control_sh.clone().into_bytes(),
        ));
        all.extend(uploads.iter().cloned());
        let upload = async |lease: &Lease| {
            let handle = lease
                .handle()
                .ok_or_else(|| RequestError::Session("no connection".to_owned()))?;
            shell_transfer::upload(handle, self.dir.root(), &all, 0o600, timeout).await
        };
        let uploaded = match upload(lease).await {
            Err(RequestError::Session(e)) if lease.reused => {
                tracing::debug!(
                    server.id = %self.target.server_id, error = %e,
                    "pooled ssh connection is dead, reconnecting"
                );
                self.executor
                    .pool
                    .reconnect(lease, self.target, self.config, self.cancel, self.deadline)
                    .await?;
                upload(lease).await
            }
            other => other,
        };
        match uploaded {
            Ok(()) => progress.store(SETUP_DIR_CREATED, Ordering::SeqCst),
            Err(RequestError::Session(e)) => return Err(self.session_error(e)),
            Err(e) => {
                // The command ran: the directory may be there, half filled.
                progress.store(SETUP_DIR_CREATED, Ordering::SeqCst);
                return Err(Fail::Exec(ExecError::start_failed(format!(
                    "cannot transfer the run's files to the SSH server {}: it has no sftp \
                     subsystem, and the transfer over exec (`mkdir` and `tar -x` with \
                     /bin/sh) failed too: {e}",
                    self.address()
                ))));
            }
        }
        let handle = lease
            .handle()
            .ok_or_else(|| self.session_error("no connection"))?;
        let (control, main) = tokio::join!(open_channel(handle), open_channel(handle));
        let control_error =
            |e: StartError| self.session_error(format!("cannot start the control channel: {e}"));
        let (control, _) = exec_on(
            control.map_err(control_error)?,
            &self.dir.sh_command("control.sh"),
        )
        .await
        .map_err(control_error)?;
        progress.store(SETUP_CONTROL_STARTED, Ordering::SeqCst);
        let start_error = |e| match e {
            StartError::Refused => Fail::Exec(ExecError::start_failed(format!(
                "the SSH server {} refused to run a command",
                self.address()
            ))),
            StartError::Channel(e) => self.session_error(e),
        };
        let (main, early) = exec_on(main.map_err(start_error)?, &self.dir.sh_command("start.sh"))
            .await
            .map_err(start_error)?;
        main.eof()
            .await
            .map_err(|e| self.session_error(format!("cannot close the run's stdin: {e}")))?;
        Ok(Running {
            files: Files::Shell,
            control,
            main,
            early,
        })
    }

    /// The connection's SFTP session (the one a previous run left, or a new one) with the run's
    /// directory created in it (mode 0700, failing if the name exists).
    async fn make_root(
        &self,
        lease: &mut Lease,
        timeout_secs: u64,
    ) -> Result<SftpSession, RequestError> {
        let sftp = match lease.take_sftp() {
            Some(sftp) => sftp,
            None => {
                let handle = lease
                    .handle()
                    .ok_or_else(|| RequestError::Session("no connection".to_owned()))?;
                transfer::open(handle, timeout_secs).await?
            }
        };
        transfer::make_dir(&sftp, self.dir.root(), 0o700).await?;
        Ok(sftp)
    }

    /// Streams the run's output until it ends, stops it on timeout or cancellation, then
    /// collects `out/` and starts the cleanup. Returns the outcome, whether the connection may
    /// be pooled again, the SFTP session (worth keeping only then) and the cleanup's
    /// confirmation (true when the server removed the directory).
    async fn supervise(
        &self,
        running: Running,
        handle: Option<&SshHandle>,
    ) -> (RunOutcome, bool, Files, Option<JoinHandle<bool>>) {
        let Running {
            files,
            mut control,
            mut main,
            early,
        } = running;
        let spec = self.spec;
        let config = self.config;
        let events = self.events;
        let _ = events.send(ExecEvent::Started { pid: None }).await;
        let spawned = Instant::now();
        tracing::debug!(job.id = %spec.job_id, dir = self.dir.root(), "ssh run started");

        let mut pump = Pump::new(config.max_line_bytes);
        let mut control_lines = LineSplitter::new(256);
        let mut early: VecDeque<ChannelMsg> = early.into();
        let mut exit: Option<Exit> = None;
        let mut exit_at: Option<Instant> = None;
        let mut stop: Option<Stop> = None;
        let mut term_at: Option<Instant> = None;
        let mut kill_requested = false;
        let mut kill_at: Option<Instant> = None;
        let mut stuck = false;
        let mut retry: Option<(Instant, &'static str)> = None;
        let mut outstanding = 0usize;
        let mut main_open = true;
        let mut control_open = true;
        let mut abandoned = false;
        let mut last_output = Instant::now();

        while main_open {
            let drain_deadline = exit_at
                .map(|at| (last_output.max(at) + config.drain_idle).min(at + config.drain_max));
            let grace_deadline = match (term_at, &exit, kill_requested) {
                // A forced cancel skips (or cuts short) the grace.
                (Some(t), None, false) if spec.kill_now.is_cancelled() => Some(t),
                (Some(t), None, false) => Some(t + spec.kill_grace),
                _ => None,
            };
            let run_deadline = match (&stop, &exit) {
                (None, None) => self.deadline,
                _ => None,
            };
            // A run that cannot be signalled (control channel gone) or does not die: give up on
            // it and on the connection (the server's side then kills it).
            let stuck_deadline = match (&exit, control_open, term_at, kill_at) {
                (Some(_), _, _, _) => None,
                (None, false, Some(t), _) => Some(t + spec.kill_grace),
                (None, true, _, Some(k)) => Some(k + config.operation_timeout),
                _ => None,
            };
            let read_main = !pump.backlogged() || stop.is_some() || exit.is_some();
            let mut command: Option<&'static str> = None;
            let msg = if let Some(msg) = early.pop_front() {
                Some(Some(msg))
            } else {
                tokio::select! {
                    biased;
                    permit = events.reserve(), if pump.wants_sending() => {
                        match permit {
                            Ok(permit) => pump.send(permit),
                            Err(_) => pump.close(),
                        }
                        None
                    }
                    msg = main.wait(), if read_main => Some(msg),
                    _ = self.cancel.cancelled(), if stop.is_none() && exit.is_none() => {
                        stop = Some(Stop::Cancelled);
                        term_at = Some(Instant::now());
                        command = Some("TERM");
                        None
                    }
                    _ = sleep_until_opt(run_deadline) => {
                        stop = Some(Stop::TimedOut);
                        term_at = Some(Instant::now());
                        command = Some("TERM");
                        None
                    }
                    _ = sleep_until_opt(grace_deadline) => {
                        kill_requested = true;
                        kill_at = Some(Instant::now());
                        command = Some("KILL");
                        None
                    }
                    // Wakes the loop to recompute the grace when a forced cancel comes.
                    _ = spec.kill_now.cancelled(), if grace_deadline.is_some() && !spec.kill_now.is_cancelled() => None,
                    _ = sleep_until_opt(stuck_deadline) => {
                        stuck = true;
                        break;
                    }
                    _ = sleep_until_opt(retry.map(|(at, _)| at)) => {
                        if let Some((_, signal)) = retry.take()
                            && exit.is_none()
                        {
                            command = Some(signal);
                        }
                        None
                    }
                    msg = control.wait(), if control_open => {
                        match msg {
                            Some(ChannelMsg::Data { data }) => {
                                let mut lines = Vec::new();
                                control_lines.push(&data, |l| {
                                    lines.push(String::from_utf8_lossy(l).into_owned())
                                });
                                for line in lines {
                                    if let Some(signal) = line.strip_prefix("nogroup ") {
                                        outstanding = outstanding.saturating_sub(1);
                                        if exit.is_none() {
                                            retry = Some((Instant::now() + SIGNAL_RETRY, static_signal(signal)));
                                        }
                                    } else if line.starts_with("signalled ") {
                                        outstanding = outstanding.saturating_sub(1);
                                    }
                                }
                            }
                            Some(ChannelMsg::Close) | None => {
                                control_open = false;
                                outstanding = 0;
                            }
                            Some(_) => {}
                        }
                        None
                    }
                    _ = sleep_until_opt(drain_deadline) => {
                        abandoned = true;
                        break;
                    }
                }
            };
            if let Some(msg) = msg {
                match msg {
                    Some(ChannelMsg::Data { data }) => {
                        pump.feed(OutputStream::Stdout, &data);
                        last_output = Instant::now();
                    }
                    Some(ChannelMsg::ExtendedData { data, ext }) => {
                        if ext == 1 {
                            pump.feed(OutputStream::Stderr, &data);
                        }
                        last_output = Instant::now();
                    }
                    Some(ChannelMsg::ExitStatus { exit_status }) if exit.is_none() => {
                        exit = Some(Exit::Code(exit_status));
                    }
                    Some(ChannelMsg::ExitSignal { signal_name, .. }) if exit.is_none() => {
                        exit = Some(Exit::Signal(signal_name));
                    }
                    Some(ChannelMsg::Close) | None => main_open = false,
                    Some(_) => {}
                }
                if exit.is_some() && exit_at.is_none() {
                    // The run's process is gone: whatever is left of its group goes now.
                    exit_at = Some(Instant::now());
                    retry = None;
                    command = Some("KILL");
                }
            }
            if let Some(cmd) = command {
                if control_open {
                    tracing::debug!(job.id = %spec.job_id, signal = cmd, "signalling the remote process group");
                    if send_command(&control, cmd).await {
                        outstanding += 1;
                    } else {
                        control_open = false;
                    }
                } else if exit.is_none() {
                    tracing::warn!(
                        job.id = %spec.job_id,
                        "cannot signal the remote run: its control channel is gone"
                    );
                }
            }
        }
        if abandoned {
            tracing::warn!(
                job.id = %spec.job_id,
                "stopped reading output: a process outside the run's process group holds the channel open"
            );
        }
        if stuck {
            tracing::warn!(
                job.id = %spec.job_id,
                "the remote run could not be stopped; dropping its connection"
            );
        }
        if abandoned || stuck {
            let _ = main.close().await;
        }
        let ran_for = exit_at.unwrap_or_else(Instant::now) - spawned;

        // Wait until the control channel confirmed the last signals (the group is dead before
        // `out/` is collected).
        // Without an ended run or a working connection, collecting and cleaning up here is
        // pointless: dropping the connection makes `control.sh` do it on the server.
        let give_up = stuck || (exit.is_none() && stop.is_none());
        if give_up {
            control_open = false;
        }
        if control_open && outstanding > 0 {
            let wait = async {
                while outstanding > 0 {
                    match control.wait().await {
                        Some(ChannelMsg::Data { data }) => {
                            let mut done = 0;
                            control_lines.push(&data, |l| {
                                if l.starts_with(b"signalled ") || l.starts_with(b"nogroup ") {
                                    done += 1;
                                }
                            });
                            outstanding = outstanding.saturating_sub(done);
                        }
                        Some(ChannelMsg::Close) | None => {
                            control_open = false;
                            break;
                        }
                        Some(_) => {}
                    }
                }
            };
            if tokio::time::timeout(config.operation_timeout, wait)
                .await
                .is_err()
            {
                tracing::warn!(job.id = %spec.job_id, "the control channel did not confirm the final kill");
            }
        }
        pump.finish();
        pump.flush(events).await;

        let mut outcome = RunOutcome::default();
        let mut healthy = !abandoned && !stuck;
        match &exit {
            Some(Exit::Code(code)) => outcome.exit_code = i32::try_from(*code).ok(),
            Some(Exit::Signal(sig)) => match signal_number(sig) {
                Some(n) => outcome.signal = Some(n),
                None => {
                    outcome.error = Some(ExecError::Ssh(SshError::session(
                        &self.address(),
                        format!("the run was killed by an unknown signal {sig:?}"),
                    )));
                }
            },
            None => {}
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
            None if exit.is_none() => {
                healthy = false;
                outcome.error = Some(ExecError::Ssh(SshError::session(
                    &self.address(),
                    "the connection was lost during the run (the server kills the run when it notices)",
                )));
            }
            None => {
                if let Some(error) = self
                    .start_failure(&files, handle, &exit, ran_for, &pump.tail)
                    .await
                {
                    outcome.error = Some(error);
                }
            }
        }

        // Collect `out/` into the local run directory.
        if let Some(run_dir) = spec.run_dir.as_ref().filter(|_| !give_up) {
            let remote_out = self.dir.path("run/out");
            let local_out = run_dir.join("out");
            let limit = config.max_download_bytes;
            let download = match (&files, handle) {
                (Files::Sftp(sftp), _) => {
                    transfer::download_out(sftp, &remote_out, &local_out, limit).await
                }
                (Files::Shell, Some(handle)) => {
                    shell_transfer::download_out(
                        handle,
                        &remote_out,
                        &local_out,
                        limit,
                        config.operation_timeout,
                    )
                    .await
                }
                (Files::Shell, None) => Err("no connection".to_owned()),
            };
            if let Err(e) = download {
                healthy = false;
                tracing::warn!(job.id = %spec.job_id, error = %e, "cannot download the run's output");
                if outcome.error.is_none() {
                    outcome.error = Some(ExecError::Ssh(SshError::session(
                        &self.address(),
                        format!("cannot download the run's output: {e}"),
                    )));
                }
            }
        }

        // End of input: `control.sh` kills what is left and removes the directory. Its
        // confirmation (the channel closing) is awaited in the background: the outcome does
        // not depend on it. The connection's next run waits for it, and reconnects if it did
        // not come (a connection dropping makes the server clean up all the same).
        let mut cleanup = None;
        if control_open && control.eof().await.is_ok() {
            let timeout = config.operation_timeout;
            let job_id = spec.job_id;
            let dir = self.dir.root().to_owned();
            cleanup = Some(tokio::spawn(async move {
                // The channel closes once `control.sh` has removed the directory and exited (no
                // more messages: the connection is gone, and with it the server's side of the
                // run, which `control.sh` cleans up on its own).
                let closed = async {
                    loop {
                        match control.wait().await {
                            Some(ChannelMsg::Close) | None => return true,
                            Some(_) => {}
                        }
                    }
                };
                let confirmed = matches!(tokio::time::timeout(timeout, closed).await, Ok(true));
                if !confirmed {
                    tracing::warn!(
                        job.id = %job_id, dir,
                        "could not confirm the cleanup of the remote run directory"
                    );
                }
                confirmed
            }));
        } else {
            healthy = false;
            tracing::warn!(
                job.id = %spec.job_id, dir = self.dir.root(),
                "could not start the cleanup of the remote run directory"
            );
        }
        (outcome, healthy, files, cleanup)
    }

    /// A start failure: `start.sh` gave up (exit 127 with `start-error`: the interpreter or
    /// program could not be run), or the rule of the startup window
    /// ([`startup`](crate::executor::startup)).
    async fn start_failure(
        &self,
        files: &Files,
        handle: Option<&SshHandle>,
        exit: &Option<Exit>,
        ran_for: Duration,
        stderr_tail: &VecDeque<String>,
    ) -> Option<ExecError> {
        let Some(Exit::Code(code)) = exit else {
            return None;
        };
        let read_reason = async {
            let path = self.dir.path("start-error");
            match (files, handle) {
                (Files::Sftp(sftp), _) => transfer::read_file(sftp, &path, 4096).await,
                (Files::Shell, Some(handle)) => {
                    shell_transfer::read_file(handle, &path, 4096, self.config.operation_timeout)
                        .await
                }
                (Files::Shell, None) => Err("no connection".to_owned()),
            }
        };
        if *code == START_FAILED_CODE
            && let Ok(Some(reason)) = read_reason.await
        {
            let reason = String::from_utf8_lossy(&reason).trim().to_owned();
            return Some(ExecError::start_failed(format!(
                "{reason} ({})",
                self.address()
            )));
        }
        let program = self
            .spec
            .command
            .as_ref()
            .and_then(|c| c.first())
            .map(String::as_str)
            .unwrap_or_default();
        let (window, from_spec) =
            crate::executor::startup::window_of(self.spec, self.config.startup_window);
        let tail: Vec<String> = stderr_tail.iter().cloned().collect();
        crate::executor::startup::judge(&crate::executor::startup::EarlyEnd {
            runtime: self.spec.runtime,
            window,
            from_spec,
            ran_for,
            exit_code: i32::try_from(*code).ok(),
            program,
            place: &format!(" on {}", self.address()),
            stderr_tail: &tail,
        })
    }
}

#[derive(Debug)]
enum StartError {
    /// The server answered the exec request with a failure.
    Refused,
    /// The channel could not be opened or broke.
    Channel(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Refused => f.write_str("the server refused to run the command"),
            StartError::Channel(e) => f.write_str(e),
        }
    }
}

/// Opens a session channel and runs `command` in it, waiting for the server's confirmation.
/// Messages that arrive before it are returned.
async fn start_exec(
    handle: &SshHandle,
    command: &str,
) -> Result<(Channel<Msg>, Vec<ChannelMsg>), StartError> {
    exec_on(open_channel(handle).await?, command).await
}

/// Opens a session channel.
async fn open_channel(handle: &SshHandle) -> Result<Channel<Msg>, StartError> {
    handle
        .channel_open_session()
        .await
        .map_err(|e| StartError::Channel(format!("cannot open a channel: {e}")))
}

/// Runs `command` in the open session `channel`, waiting for the server's confirmation.
/// Messages that arrive before it are returned.
async fn exec_on(
    mut channel: Channel<Msg>,
    command: &str,
) -> Result<(Channel<Msg>, Vec<ChannelMsg>), StartError> {
    channel
        .exec(true, command)
        .await
        .map_err(|e| StartError::Channel(format!("cannot send the command: {e}")))?;
    let mut early = Vec::new();
    loop {
        match channel.wait().await {
            Some(ChannelMsg::Success) => return Ok((channel, early)),
            Some(ChannelMsg::Failure) => return Err(StartError::Refused),
            Some(ChannelMsg::WindowAdjusted { .. }) => {}
            Some(ChannelMsg::Close) | None => {
                return Err(StartError::Channel(
                    "the channel closed before the command started".to_owned(),
                ));
            }
            Some(other) => early.push(other),
        }
    }
}

/// Runs `command` and waits for its channel to close (stdin closed, output discarded).
async fn exec_to_end(handle: &SshHandle, command: &str) -> Result<(), StartError> {
    let (mut channel, _) = start_exec(handle, command).await?;
    let _ = channel.eof().await;
    while let Some(msg) = channel.wait().await {
        if matches!(msg, ChannelMsg::Close) {
            break;
        }
    }
    Ok(())
}

/// Sends one command line to `control.sh`. False when the channel is gone.
async fn send_command(control: &Channel<Msg>, command: &'static str) -> bool {
    let line: &'static str = match command {
        "TERM" => "TERM\n",
        _ => "KILL\n",
    };
    control.data_bytes(line).await.is_ok()
}

fn static_signal(name: &str) -> &'static str {
    if name.trim() == "TERM" {
        "TERM"
    } else {
        "KILL"
    }
}

/// The number of a signal reported by name in an SSH `exit-signal`.
fn signal_number(sig: &Sig) -> Option<i32> {
    let name = match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name.as_str(),
    };
    let name = name.strip_prefix("SIG").unwrap_or(name);
    nix::sys::signal::Signal::from_str(&format!("SIG{name}"))
        .ok()
        .map(|s| s as i32)
}

/// Output lines waiting for the events channel.
struct Pump {
    pending: VecDeque<ExecEvent>,
    closed: bool,
    stdout: LineSplitter,
    stderr: LineSplitter,
    tail: VecDeque<String>,
}

impl Pump {
    fn new(max_line_bytes: usize) -> Self {
        Pump {
            pending: VecDeque::new(),
            closed: false,
            stdout: LineSplitter::new(max_line_bytes),
            stderr: LineSplitter::new(max_line_bytes),
            tail: VecDeque::new(),
        }
    }

    fn feed(&mut self, stream: OutputStream, data: &[u8]) {
        let mut lines: Vec<Vec<u8>> = Vec::new();
        let splitter = match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        };
        splitter.push(data, |l| lines.push(l.to_vec()));
        for line in lines {
            self.line(stream, &line);
        }
    }

    fn finish(&mut self) {
        for stream in [OutputStream::Stdout, OutputStream::Stderr] {
            let mut lines: Vec<Vec<u8>> = Vec::new();
            let splitter = match stream {
                OutputStream::Stdout => &mut self.stdout,
                OutputStream::Stderr => &mut self.stderr,
            };
            splitter.finish(|l| lines.push(l.to_vec()));
            for line in lines {
                self.line(stream, &line);
            }
        }
    }

    fn line(&mut self, stream: OutputStream, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let progress = match stream {
            OutputStream::Stdout => parse_progress(&text),
            OutputStream::Stderr => {
                if self.tail.len() == STDERR_TAIL_LINES {
                    self.tail.pop_front();
                }
                self.tail.push_back(text.chars().take(512).collect());
                None
            }
        };
        if self.closed {
            return;
        }
        self.pending.push_back(ExecEvent::Line { stream, text });
        if let Some(p) = progress {
            self.pending.push_back(ExecEvent::Progress(p));
        }
    }

    fn wants_sending(&self) -> bool {
        !self.closed && !self.pending.is_empty()
    }

    fn backlogged(&self) -> bool {
        self.pending.len() >= MAX_PENDING_EVENTS
    }

    fn send(&mut self, permit: mpsc::Permit<'_, ExecEvent>) {
        if let Some(event) = self.pending.pop_front() {
            permit.send(event);
        }
    }

    /// The receiver is gone: output is discarded from now on.
    fn close(&mut self) {
        self.closed = true;
        self.pending.clear();
    }

    async fn flush(&mut self, events: &mpsc::Sender<ExecEvent>) {
        while let Some(event) = self.pending.pop_front() {
            if self.closed {
                break;
            }
            if events.send(event).await.is_err() {
                self.close();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(signal_number(&Sig::TERM), Some(15));
        assert_eq!(signal_number(&Sig::KILL), Some(9));
        assert_eq!(signal_number(&Sig::Custom("USR2".into())), Some(12));
        assert_eq!(signal_number(&Sig::Custom("SIGUSR2".into())), Some(12));
        assert_eq!(signal_number(&Sig::Custom("NOPE".into())), None);
    }
}
