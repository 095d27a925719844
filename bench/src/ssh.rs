//! `ssh`: a trivial run through the SSH executor over a pooled, warm connection, against a fresh
//! OpenSSH client connection doing the same trivial thing (issue 5).
//!
//! One private OpenSSH server (`baton_testkit::sshd`: `/usr/sbin/sshd` on 127.0.0.1, generated
//! ed25519 keys, `internal-sftp`; the login user is `baton-ssh-test` when running as root) and
//! one `SshExecutor` in this process, with its server's host key pinned.
//!
//! **What is measured**, alternately (`baton`, `fresh ssh`, `baton`, …), `--runs` times each
//! after `--warmup` unmeasured rounds:
//! - `baton`: one `exec ["true"]` run through `Executor::run`, from the call to the returned
//!   outcome. It is the code path of a worker's job: the run gets a per-run directory prepared
//!   with [`rundir::prepare`] and the worker's helpers directory (both prepared before the clock
//!   starts, as the worker does before it calls the executor), so the executor uploads them over
//!   SFTP with its generated scripts, starts the control channel and the run, waits for the
//!   exit, collects `out/` and tells the server to remove the run's directory (the executor
//!   awaits that confirmation in the background, before the connection's next run; the
//!   benchmark checks at the end that every directory is gone). The connection comes from the
//!   executor's pool (opened by the warm-up; the benchmark checks that no other was opened).
//! - `fresh_ssh`: the wall time of an OpenSSH client process `ssh -o ControlMaster=no -o
//!   BatchMode=yes … user@127.0.0.1 true` (no configuration file, the same user key, the host
//!   key pinned in a private known-hosts file): process start, TCP, key exchange,
//!   authentication, running `true`, exit.
//!
//! The summary is `p50_ms` (baton's median), `fresh_ssh_ms` (the client's median) and `ratio`
//! = `p50_ms / fresh_ssh_ms`; the target is a ratio ≤ 0.15 and p50 ≤ 10 ms.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use baton_testkit::sshd::{Sshd, login_user, shared_dir};
use baton_worker::executor::ssh::{SshAuth, SshConfig, SshExecutor, SshTarget};
use baton_worker::executor::{RunSpec, run_collect};
use baton_worker::rundir::{self, RunFiles, ScratchDir};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{self, Summary, quantile};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measured runs of each kind (alternating).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Unmeasured rounds (one of each kind) first; the first one opens the pooled connection.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    warmup: u64,
}

/// The server and what talks to it.
struct Bench {
    sshd: Sshd,
    /// The servers' temporary directory (`SshConfig::remote_temp_dir`), on this machine.
    remote_tmp: tempfile::TempDir,
    executor: SshExecutor,
    target: SshTarget,
    scratch: ScratchDir,
    /// `known_hosts` with the server's key, for the OpenSSH client.
    known_hosts: PathBuf,
}

pub async fn run(args: Args) -> anyhow::Result<Summary> {
    let bench = Bench::start()?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "config: exec [\"true\"] through SshExecutor (pooled connection, worker-style run and \
         helpers directories) vs `ssh -o ControlMaster=no … true`, alternating; sshd {} on \
         127.0.0.1:{} as {}; runs={} warmup={}; {cpus} CPUs, load average {}",
        openssh_version().await,
        bench.sshd.port,
        bench.target.username,
        args.runs,
        args.warmup,
        support::load_average()
    );

    for _ in 0..args.warmup {
        bench.baton().await?;
        bench.fresh_ssh().await?;
    }
    let mut baton = Vec::new();
    let mut fresh = Vec::new();
    for i in 0..args.runs {
        // Alternate which goes first, so neither always follows the other.
        if i % 2 == 0 {
            baton.push(bench.baton().await?);
            fresh.push(bench.fresh_ssh().await?);
        } else {
            fresh.push(bench.fresh_ssh().await?);
            baton.push(bench.baton().await?);
        }
    }

    let stats = bench
        .executor
        .server_stats(bench.target.server_id)
        .context("no pool statistics for the server")?;
    ensure!(
        stats.connections_opened == 1,
        "the executor opened {} connections, expected 1 pooled one: {stats:?}",
        stats.connections_opened
    );
    let line = |name: &str, values: &[f64]| {
        println!(
            "{name:>10}: p50={:.2} p90={:.2} p99={:.2} min={:.2} max={:.2} ms",
            quantile(values, 0.5),
            quantile(values, 0.9),
            quantile(values, 0.99),
            quantile(values, 0.0),
            quantile(values, 1.0)
        );
    };
    line("baton", &baton);
    line("fresh_ssh", &fresh);
    println!(
        "{} connection opened, {} reuses; {} sshd logins; load average {}",
        stats.connections_opened,
        stats.connections_reused,
        bench.sshd.accepted_logins(),
        support::load_average()
    );
    bench.check_remote_clean().await?;

    let p50 = quantile(&baton, 0.5);
    let fresh_p50 = quantile(&fresh, 0.5);
    Ok(Summary::new("ssh")
        .field("p50_ms", format!("{p50:.2}"))
        .field("fresh_ssh_ms", format!("{fresh_p50:.2}"))
        .field("ratio", format!("{:.3}", p50 / fresh_p50)))
}

impl Bench {
    fn start() -> anyhow::Result<Bench> {
        ensure!(
            Path::new("/usr/sbin/sshd").exists(),
            "/usr/sbin/sshd is missing: install the Debian package openssh-server"
        );
        let sshd = Sshd::start();
        let remote_tmp = shared_dir("baton-bench-ssh-");
        let remote_temp_dir = remote_tmp
            .path()
            .to_str()
            .context("the temporary directory's path is not UTF-8")?
            .to_owned();
        let executor = SshExecutor::new(SshConfig {
            remote_temp_dir,
            ..SshConfig::default()
        });
        let mut target = SshTarget::new(
            Uuid::now_v7(),
            "127.0.0.1",
            sshd.port,
            login_user(),
            SshAuth::PrivateKey {
                pem: sshd.user_key_pem(),
                passphrase: None,
            },
        );
        target.host_key = Some(sshd.host_key_line());
        let scratch = ScratchDir::create(None).context("creating the scratch directory")?;
        let known_hosts = sshd.dir().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("[127.0.0.1]:{} {}\n", sshd.port, sshd.host_key_line()),
        )
        .context("writing known_hosts")?;
        Ok(Bench {
            sshd,
            remote_tmp,
            executor,
            target,
            scratch,
            known_hosts,
        })
    }

    /// One run through the executor; milliseconds from the call to the outcome.
    async fn baton(&self) -> anyhow::Result<f64> {
        let run_dir = self
            .scratch
            .runs_dir()
            .join(format!("run-{}", Uuid::now_v7().simple()));
        let job_id = Uuid::now_v7();
        rundir::prepare(
            &run_dir,
            &RunFiles {
                input_json: String::new(),
                event: serde_json::json!({"job_id": job_id, "attempt": 1, "executor": "ssh"}),
                variables: Default::default(),
            },
        )
        .context("preparing the run directory")?;
        let mut spec = RunSpec::exec(["true"]).with_job_id(job_id);
        spec.ssh = Some(self.target.clone());
        spec.run_dir = Some(run_dir.clone());
        spec.helpers_dir = Some(self.scratch.helpers_dir());

        let started = Instant::now();
        let (outcome, _events) = run_collect(&self.executor, spec, CancellationToken::new()).await;
        let elapsed = started.elapsed();
        if !outcome.succeeded() {
            bail!("the ssh run failed: {}", outcome.summary());
        }
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("removing {}", run_dir.display()))?;
        Ok(ms(elapsed))
    }

    /// One fresh OpenSSH client process running `true`; its wall time in milliseconds.
    async fn fresh_ssh(&self) -> anyhow::Result<f64> {
        let key = self.sshd.dir().join("user_ed25519");
        let mut command = Command::new("ssh");
        command
            .args([
                "-F",
                "/dev/null",
                "-o",
                "ControlMaster=no",
                "-o",
                "BatchMode=yes",
            ])
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"])
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .arg("-i")
            .arg(&key)
            .args(["-p", &self.sshd.port.to_string()])
            .arg(format!("{}@127.0.0.1", self.target.username))
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let output = command
            .output()
            .await
            .context("running ssh (package openssh-client)")?;
        let elapsed = started.elapsed();
        if !output.status.success() {
            bail!(
                "ssh … true failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(ms(elapsed))
    }

    /// Every run's directory on the server was removed (the last cleanup may still be
    /// finishing: the executor confirms it in the background).
    async fn check_remote_clean(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<_> = std::fs::read_dir(self.remote_tmp.path())?
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "run directories left on the server: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `OpenSSH_9.2p1`-style version of the local OpenSSH, for the output.
async fn openssh_version() -> String {
    match Command::new("ssh").arg("-V").output().await {
        Ok(out) => String::from_utf8_lossy(&out.stderr)
            .split([',', ' '])
            .next()
            .unwrap_or("?")
            .to_owned(),
        Err(_) => "?".to_owned(),
    }
}
