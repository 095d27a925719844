//! The warm path: a run in a pre-started spare container (see `spares.rs`), started as an
//! Engine API *exec* instead of as the container's command.
//!
//! The container was created and started before the job arrived, so the critical path is: the
//! upload of the run's files into the running container's volume (overlapped with creating the
//! exec), the exec's start (attached: stdout and stderr stream live, multiplexed on one
//! connection, as with the cold path's attach), the exit (from the exec's inspection), the
//! `out/` download and the container's removal — a spare serves one run only.
//!
//! What the cold path gets from the container ending with its command, this one does
//! explicitly:
//!
//! * **Exit.** The engine has no wait endpoint for an exec: its inspection is polled, slowly
//!   while the run's output is open and quickly (backing off from 1 ms) once it closed, which
//!   is normally the moment the run's process exits.
//! * **Timeout and cancellation.** `SIGTERM` goes to every process of the run through a second
//!   exec, `sh -c 'kill -TERM -1'` as the run's user: `kill(-1)` reaches all of that user's
//!   processes in the container, and neither the init process nor the idle process (which
//!   runs as another user), so the container lives on through the grace. Without `sh` in the
//!   image, the container itself gets the `SIGTERM` (its init then ends and the kernel kills
//!   the run's processes at once). After the grace the container gets `SIGKILL`, which ends
//!   every process in it.
//! * **Leftovers.** Processes the run started and left behind end with it, as in a cold
//!   container whose init exits with the command: when the run's process exited while its
//!   output is still held open, the container is killed.
//! * **Out of memory.** The engine records `OOMKilled` on the container when its init exits,
//!   not when a process of an exec is killed: after a failed exit the container is killed and
//!   its record read (only on that path, so a successful run never pays for it).
//! * **A spare that cannot be used** (its idle process is not running, the engine refuses the
//!   exec) is reported as [`Unusable`] before anything was emitted; the caller removes it and
//!   takes the cold path.

use std::time::Duration;

use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, ExecConfig, HostConfig};
use bollard::query_parameters::UploadToContainerOptionsBuilder;
use futures::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::spares::{self, SpareKey};
use super::{
    ContainerExecutor, ContainerGuard, Ended, MOUNT_DIR, OutputStreamBox, Plan, Stop, WORK_DIR,
    engine_message, files, pump_attach,
};
use crate::executor::{ExecError, ExecEvent, RunOutcome, RunSpec, sleep_until_opt};

/// How often the exec is inspected while its output is open (its exit normally closes the
/// output first, which switches to quick polling).
const EXEC_POLL: Duration = Duration::from_millis(100);

/// Longest pause between inspections once the output closed.
const EXEC_POLL_CLOSED_MAX: Duration = Duration::from_millis(100);

/// Read buffer of the exec's output connection.
const OUTPUT_CAPACITY: usize = 64 * 1024;

/// A spare that could not be used, with why; nothing of the run happened yet.
#[derive(Debug)]
pub(super) struct Unusable(pub String);

impl ContainerExecutor {
    /// Runs `spec` in the spare `name` (taken from the pool for this run) and removes it.
    pub(super) async fn run_in_spare(
        &self,
        spec: &RunSpec,
        plan: &Plan,
        name: &str,
        events: &mpsc::Sender<ExecEvent>,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Result<RunOutcome, Unusable> {
        let mut guard = ContainerGuard::new(self, name.to_owned(), spec.job_id);
        let result = match files::upload_archive(spec, plan.script(), self.owner) {
            Ok(archive) => {
                self.exec_run(spec, plan, archive, name, events, cancel, started)
                    .await
            }
            Err(e) => Ok(RunOutcome::from_error(e, started.elapsed())),
        };
        if let Err(e) = self.remove(name).await {
            tracing::warn!(container = %name, error = %e,
                "cannot remove the container of a finished run (the reaper will retry)");
        } else {
            guard.disarm();
        }
        let mut outcome = result?;
        outcome.duration = started.elapsed();
        tracing::debug!(job.id = %spec.job_id, container = %name, summary = %outcome.summary(),
            "container run (pre-started container) ended");
        Ok(outcome)
    }

    /// Runs `spec` as the warm path does, in an idle container made for it now (a cold run):
    /// the container's `/baton` is then a tmpfs volume of `work_mib` like a spare's, which a
    /// container that gets its files before its start cannot have (the engine mounts such a
    /// volume only while the container runs). The container carries the run's labels, not
    /// the spare label, and is not auto-removed. [`Unusable`] when the image cannot idle (no `cat`) or the engine
    /// refuses: nothing of the run happened, the caller takes the path without an idle
    /// process.
    pub(super) async fn run_in_idle(
        &self,
        spec: &RunSpec,
        plan: &Plan,
        events: &mpsc::Sender<ExecEvent>,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Result<RunOutcome, Unusable> {
        let key = SpareKey::new(&plan.image, &plan.network_mode, plan.limits);
        let spare = self.spare_body(&key);
        let body = ContainerCreateBody {
            labels: Some(plan.labels.clone()),
            // Not removed by the engine when it stops: its record must outlive the SIGKILL
            // that reads whether the out-of-memory killer struck (`oom_killed`), and the
            // container of a crashed worker is reaped like any run's (its idle process ends
            // with the worker's stdin, so it stops at once).
            host_config: spare.host_config.clone().map(|hc| HostConfig {
                auto_remove: Some(false),
                ..hc
            }),
            ..spare
        };
        let name = format!(
            "baton-{}-{:08x}",
            spec.job_id.simple(),
            rand::random::<u32>()
        );
        let mut guard = ContainerGuard::new(self, name.clone(), spec.job_id);
        // Kept until the run's container is removed: dropping it (this future dropped, the
        // worker dead) ends the idle process, and the container stops (removed by its guard,
        // or by a reaper when the worker died).
        let hold = match spares::start_idle(&self.docker, &name, body).await {
            Ok(hold) => hold,
            Err(reason) => {
                if self.remove(&name).await.is_ok() {
                    guard.disarm();
                }
                return Err(Unusable(reason));
            }
        };
        let result = self
            .run_in_spare(spec, plan, &name, events, cancel, started)
            .await;
        // `run_in_spare` removed the container (or left it to its guard and the reaper).
        guard.disarm();
        drop(hold);
        result
    }

    /// Upload and create the exec (overlapped); start it attached; supervise; collect.
    #[allow(clippy::too_many_arguments)]
    async fn exec_run(
        &self,
        spec: &RunSpec,
        plan: &Plan,
        archive: Vec<u8>,
        name: &str,
        events: &mpsc::Sender<ExecEvent>,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Result<RunOutcome, Unusable> {
        let upload = UploadToContainerOptionsBuilder::new()
            .path(MOUNT_DIR)
            .build();
        let exec = ExecConfig {
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            env: Some(plan.env.clone()),
            cmd: Some(plan.cmd.clone()),
            privileged: Some(false),
            user: Some(self.run_user()),
            working_dir: Some(WORK_DIR.to_owned()),
            ..ExecConfig::default()
        };
        // Independent requests: the exec only refers to the files once started.
        let (uploaded, created) = tokio::join!(
            self.docker
                .upload_to_container(name, Some(upload), bollard::body_full(archive.into())),
            self.docker.create_exec(name, exec),
        );
        let exec_id = match created {
            Ok(c) => c.id,
            Err(e) => {
                return Err(Unusable(format!(
                    "cannot create an exec in it: {}",
                    engine_message(&e)
                )));
            }
        };
        if let Err(e) = uploaded {
            return Err(Unusable(format!(
                "cannot upload the run's files into it: {}",
                engine_message(&e)
            )));
        }
        if cancel.is_cancelled() {
            return Ok(RunOutcome::from_error(
                ExecError::Cancelled,
                started.elapsed(),
            ));
        }
        let start = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: Some(OUTPUT_CAPACITY),
        };
        // The input half is kept open for the run: closing it could end the exec's session.
        let (output, _input) = match self.docker.start_exec(&exec_id, Some(start)).await {
            Ok(StartExecResults::Attached { output, input }) => (output, input),
            Ok(StartExecResults::Detached) => {
                return Err(Unusable("the engine did not attach to the exec".to_owned()));
            }
            Err(e) => {
                return Err(Unusable(format!(
                    "cannot start the exec: {}",
                    engine_message(&e)
                )));
            }
        };
        let run_started = Instant::now();
        tracing::debug!(job.id = %spec.job_id, container = %name, image = %plan.image,
            runtime = %spec.runtime, "container run started (pre-started container)");
        let _ = events.send(ExecEvent::Started { pid: None }).await;

        let (closed_tx, closed_rx) = watch::channel(false);
        let output = notify_end(output, closed_tx);
        let (exit_tx, exit_rx) = watch::channel(None::<Instant>);
        let supervise = async {
            let wait = self.wait_exec(&exec_id, closed_rx.clone());
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
                    self.terminate_run(name).await;
                    let r = self
                        .kill_after_grace(
                            name,
                            spec.kill_grace,
                            &spec.kill_now,
                            &mut wait,
                            "the run's process did not end after SIGKILL",
                        )
                        .await;
                    (r, Some(stop))
                }
            };
            let exited = Instant::now();
            if !*closed_rx.borrow() {
                // Left-behind processes hold the output open: end them with the run.
                self.signal(name, "SIGKILL").await;
            }
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
        let check_oom = stop.is_none() && !matches!(exit, Ok(0));
        let (oom, collected) = tokio::join!(
            async {
                if check_oom {
                    self.oom_killed(name).await
                } else {
                    false
                }
            },
            async {
                match &spec.run_dir {
                    Some(run_dir) => self.collect_out(name, &run_dir.join("out")).await,
                    None => Ok(()),
                }
            }
        );
        Ok(self.finish(
            spec,
            plan,
            name,
            Ended {
                exit,
                engine_code: None,
                stop,
                oom,
                ran_for: exited - run_started,
                report,
                collected,
            },
        ))
    }

    /// `UID:GID` of the runs.
    fn run_user(&self) -> String {
        format!("{}:{}", self.owner.uid, self.owner.gid)
    }

    /// Polls the exec until it is no longer running; its exit code.
    async fn wait_exec(
        &self,
        exec_id: &str,
        mut closed: watch::Receiver<bool>,
    ) -> Result<i64, String> {
        let mut gone = false;
        let mut pause = Duration::from_millis(1);
        loop {
            let inspected = self
                .docker
                .inspect_exec(exec_id)
                .await
                .map_err(|e| format!("inspecting the run's exec: {}", engine_message(&e)))?;
            if inspected.running == Some(false)
                && let Some(code) = inspected.exit_code
            {
                return Ok(code);
            }
            if gone || *closed.borrow() {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(EXEC_POLL_CLOSED_MAX);
            } else {
                tokio::select! {
                    changed = closed.changed() => gone = changed.is_err(),
                    _ = tokio::time::sleep(EXEC_POLL) => {}
                }
            }
        }
    }

    /// `SIGTERM` to every process of the run (see the module documentation), else to the
    /// container.
    async fn terminate_run(&self, name: &str) {
        let exec = ExecConfig {
            attach_stdin: Some(false),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            tty: Some(false),
            cmd: Some(["sh", "-c", "kill -TERM -1"].map(str::to_owned).to_vec()),
            privileged: Some(false),
            user: Some(self.run_user()),
            ..ExecConfig::default()
        };
        let detached = StartExecOptions {
            detach: true,
            tty: false,
            output_capacity: None,
        };
        let sent = match self.docker.create_exec(name, exec).await {
            Ok(c) => self.docker.start_exec(&c.id, Some(detached)).await.is_ok(),
            Err(_) => false,
        };
        if !sent {
            tracing::debug!(container = %name, "cannot signal the run's processes through an exec; signalling the container");
            self.signal(name, "SIGTERM").await;
        }
    }

    /// Whether the out-of-memory killer struck in the container. Read first from the
    /// container's own memory cgroup (`oom_kill` in `memory.events` on cgroup v2,
    /// `memory.oom_control` on v1) through an exec, while the idle process keeps the container
    /// up: that neither stops the container nor races the download of the run's outputs, and
    /// works for spares, which the engine removes as soon as they stop. Only when that cannot
    /// be read, the container is killed so that the engine records its exit, which carries the
    /// flag.
    async fn oom_killed(&self, name: &str) -> bool {
        if let Some(kills) = self.cgroup_oom_kills(name).await {
            return kills > 0;
        }
        self.signal(name, "SIGKILL").await;
        let _ = tokio::time::timeout(self.config.api_timeout, self.wait_exit(name)).await;
        self.docker
            .inspect_container(name, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false)
    }

    /// The container's count of processes killed for memory, if an exec can read it.
    async fn cgroup_oom_kills(&self, name: &str) -> Option<u64> {
        let exec = ExecConfig {
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(false),
            tty: Some(false),
            cmd: Some(
                [
                    "cat",
                    "/sys/fs/cgroup/memory.events",
                    "/sys/fs/cgroup/memory/memory.oom_control",
                ]
                .map(str::to_owned)
                .to_vec(),
            ),
            privileged: Some(false),
            user: Some(self.run_user()),
            ..ExecConfig::default()
        };
        let read = async {
            let created = self.docker.create_exec(name, exec).await.ok()?;
            let StartExecResults::Attached { mut output, .. } =
                self.docker.start_exec(&created.id, None).await.ok()?
            else {
                return None;
            };
            let mut text = Vec::new();
            while let Some(Ok(chunk)) = output.next().await {
                text.extend_from_slice(&chunk.into_bytes());
                if text.len() > 64 * 1024 {
                    break;
                }
            }
            oom_kill_count(&String::from_utf8_lossy(&text))
        };
        tokio::time::timeout(self.config.api_timeout, read)
            .await
            .ok()
            .flatten()
    }
}

/// `output`, which sets `closed` when it ends.
fn notify_end(output: OutputStreamBox, closed: watch::Sender<bool>) -> OutputStreamBox {
    Box::pin(futures::stream::unfold(
        (output, closed),
        |(mut output, closed)| async move {
            match output.next().await {
                Some(item) => Some((item, (output, closed))),
                None => {
                    let _ = closed.send(true);
                    None
                }
            }
        },
    ))
}

/// The `oom_kill N` count of a cgroup's `memory.events` (v2) or `memory.oom_control` (v1).
fn oom_kill_count(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|line| line.strip_prefix("oom_kill "))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .max()
}

#[cfg(test)]
mod tests {
    use super::oom_kill_count;

    #[test]
    fn oom_kills_are_read_from_either_cgroup_version() {
        assert_eq!(
            oom_kill_count("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"),
            Some(2)
        );
        assert_eq!(
            oom_kill_count("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n"),
            Some(1)
        );
        assert_eq!(
            oom_kill_count("cat: /sys/fs/cgroup/memory.events: No such file\n"),
            None
        );
    }
}
