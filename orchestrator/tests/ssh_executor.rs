//! Tests of the SSH executor against a real OpenSSH `sshd` started by the test (see
//! `baton_testkit::sshd`), on 127.0.0.1 with generated keys. No mocks; synchronisation waits on
//! conditions with generous deadlines.

#![allow(clippy::unwrap_used)] // a panic is how a test reports a failure

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton_testkit::sshd::{Sshd, SshdOptions, free_port, login_user, shared_dir};
use baton_worker::executor::ssh::{
    BreakerConfig, BreakerState, FileTransfer, HostKeyPolicy, SshAuth, SshConfig, SshError,
    SshExecutor, SshTarget,
};
use baton_worker::executor::{
    ErrorKind, ExecError, ExecEvent, Executor, OutputStream, RunOutcome, RunResult, RunSpec,
    Runtime, run_collect,
};
use baton_worker::rundir::{self, RunFiles, ScratchDir};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Upper bound for any single run in these tests (they normally take well under a second).
const RUN_DEADLINE: Duration = Duration::from_secs(60);

/// A test server, a private "remote" temporary directory (same machine) and an executor.
struct Env {
    sshd: Sshd,
    remote_tmp: tempfile::TempDir,
    executor: Arc<SshExecutor>,
    server_id: Uuid,
}

fn config_for(remote_tmp: &Path) -> SshConfig {
    SshConfig {
        remote_temp_dir: remote_tmp.to_str().expect("utf-8 path").to_owned(),
        connect_timeout: Duration::from_secs(20),
        breaker: BreakerConfig {
            failure_threshold: 3,
            cooldown: Duration::from_millis(500),
        },
        ..SshConfig::default()
    }
}

/// The servers' temporary directory (on this machine).
fn remote_tmp() -> tempfile::TempDir {
    shared_dir("baton-ssh-remote-")
}

impl Env {
    fn new() -> Env {
        Env::with(|_| {})
    }

    fn with(adjust: impl FnOnce(&mut SshConfig)) -> Env {
        Env::on(Sshd::start(), adjust)
    }

    fn on(sshd: Sshd, adjust: impl FnOnce(&mut SshConfig)) -> Env {
        let remote_tmp = remote_tmp();
        let mut config = config_for(remote_tmp.path());
        adjust(&mut config);
        Env {
            sshd,
            remote_tmp,
            executor: Arc::new(SshExecutor::new(config)),
            server_id: Uuid::now_v7(),
        }
    }

    fn target(&self) -> SshTarget {
        let mut t = SshTarget::new(
            self.server_id,
            "127.0.0.1",
            self.sshd.port,
            login_user(),
            SshAuth::PrivateKey {
                pem: self.sshd.user_key_pem(),
                passphrase: None,
            },
        );
        t.host_key = Some(self.sshd.host_key_line());
        t
    }

    fn spec(&self, runtime: Runtime, content: &str) -> RunSpec {
        let mut spec = RunSpec::script(runtime, content);
        spec.ssh = Some(self.target());
        spec
    }

    async fn run(&self, spec: RunSpec) -> Run {
        run_on(self.executor.as_ref(), spec).await
    }

    /// Waits until every run directory on the "server" is gone.
    async fn assert_remote_clean(&self) {
        let dir = self.remote_tmp.path().to_owned();
        wait_until(
            "the remote run directory to be removed",
            Duration::from_secs(20),
            || fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) == 0,
        )
        .await;
    }
}

struct Run {
    outcome: RunOutcome,
    events: Vec<ExecEvent>,
}

impl Run {
    fn lines(&self, which: OutputStream) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                ExecEvent::Line { stream, text } if *stream == which => Some(text.clone()),
                _ => None,
            })
            .collect()
    }
    fn stdout(&self) -> Vec<String> {
        self.lines(OutputStream::Stdout)
    }
    fn stderr(&self) -> Vec<String> {
        self.lines(OutputStream::Stderr)
    }
    fn started(&self) -> bool {
        matches!(self.events.first(), Some(ExecEvent::Started { pid: None }))
    }
    fn ssh_error(&self) -> &SshError {
        match &self.outcome.error {
            Some(ExecError::Ssh(e)) => e,
            other => panic!("expected an SSH error, got {other:?}"),
        }
    }
}

async fn run_on(executor: &dyn Executor, spec: RunSpec) -> Run {
    let (outcome, events) = tokio::time::timeout(
        RUN_DEADLINE,
        run_collect(executor, spec, CancellationToken::new()),
    )
    .await
    .expect("run did not finish within the test deadline");
    Run { outcome, events }
}

fn assert_succeeded(run: &Run) {
    assert!(
        run.outcome.succeeded(),
        "expected success, got {:?} ({}); stdout: {:?}; stderr: {:?}",
        run.outcome,
        run.outcome.summary(),
        run.stdout(),
        run.stderr()
    );
}

async fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `pid` is a live process (zombies count as dead).
fn alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

fn read_pids(path: &Path) -> Vec<i32> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect()
}

async fn assert_all_dead(pids: &[i32]) {
    assert!(!pids.is_empty(), "the script recorded no pids");
    for &pid in pids {
        wait_until(
            &format!("process {pid} to be gone"),
            Duration::from_secs(10),
            || !alive(pid),
        )
        .await;
    }
}

fn spawn_run(
    executor: Arc<SshExecutor>,
    spec: RunSpec,
    cancel: CancellationToken,
) -> (
    tokio::task::JoinHandle<RunOutcome>,
    mpsc::Receiver<ExecEvent>,
) {
    let (tx, rx) = mpsc::channel(64);
    let handle = tokio::spawn(async move { executor.run(spec, tx, cancel).await });
    (handle, rx)
}

/// Receives events until a stdout line equal to `line` arrives; returns everything seen.
async fn recv_until_line(rx: &mut mpsc::Receiver<ExecEvent>, line: &str) -> Vec<ExecEvent> {
    let mut seen = Vec::new();
    tokio::time::timeout(RUN_DEADLINE, async {
        while let Some(event) = rx.recv().await {
            let hit = matches!(&event, ExecEvent::Line { stream: OutputStream::Stdout, text } if text == line);
            seen.push(event);
            if hit {
                return;
            }
        }
        panic!("run ended before printing {line:?}; saw {seen:?}");
    })
    .await
    .expect("line did not arrive in time");
    seen
}

async fn drain(mut rx: mpsc::Receiver<ExecEvent>) -> Vec<ExecEvent> {
    let mut rest = Vec::new();
    while let Some(e) = rx.recv().await {
        rest.push(e);
    }
    rest
}

// ---------------------------------------------------------------------------------------------
// Runtimes, environment, input/output

#[tokio::test]
async fn runs_every_runtime() {
    let env = Env::new();
    let cases: Vec<(RunSpec, Vec<&str>)> = vec![
        (
            env.spec(
                Runtime::Bash,
                "arr=(one two)\necho \"bash ${arr[1]}\"\necho err >&2\n",
            ),
            vec!["bash two"],
        ),
        (
            env.spec(Runtime::Sh, "x=sh; echo \"hello $x\""),
            vec!["hello sh"],
        ),
        (
            env.spec(
                Runtime::Python,
                "import sys\nprint('py', sys.version_info[0])\n",
            ),
            vec!["py 3"],
        ),
        (
            env.spec(Runtime::Node, "console.log('node', typeof process.version)"),
            vec!["node string"],
        ),
        (
            {
                let mut spec = RunSpec::exec(["printf", "%s|%s\\n", "a b", "it's"]);
                spec.ssh = Some(env.target());
                spec
            },
            vec!["a b|it's"],
        ),
    ];
    for (spec, expected) in cases {
        let runtime = spec.runtime;
        let run = env.run(spec).await;
        assert_succeeded(&run);
        assert!(run.started(), "{runtime}: {:?}", run.events);
        assert_eq!(
            run.stdout(),
            expected,
            "{runtime}; stderr {:?}",
            run.stderr()
        );
        assert_eq!(run.outcome.exit_code, Some(0));
        if runtime == Runtime::Bash {
            assert_eq!(run.stderr(), vec!["err"]);
        }
    }
    env.assert_remote_clean().await;
    let stats = env.executor.server_stats(env.server_id).expect("stats");
    assert_eq!(stats.connections_opened, 1, "{stats:?}");
    assert_eq!(env.sshd.accepted_logins(), 1);
}

/// A prepared local run directory and helpers, as the worker makes them.
struct LocalRunDir {
    _scratch: ScratchDir,
    helpers: PathBuf,
    run_dir: PathBuf,
}

fn local_run_dir(input: &str, variables: &[(&str, &str)]) -> LocalRunDir {
    let scratch = ScratchDir::create(None).expect("scratch dir");
    let run_dir = scratch.runs_dir().join("run-1");
    rundir::prepare(
        &run_dir,
        &RunFiles {
            input_json: input.to_owned(),
            event: serde_json::json!({"job_id": "j", "attempt": 1, "executor": "ssh"}),
            variables: variables
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect::<BTreeMap<_, _>>(),
        },
    )
    .expect("prepare run dir");
    LocalRunDir {
        helpers: scratch.helpers_dir(),
        run_dir,
        _scratch: scratch,
    }
}

#[tokio::test]
async fn environment_input_output_and_helpers() {
    let env = Env::new();
    let local = local_run_dir(r#"{"count": 3}"#, &[("greeting", "hello")]);
    let tricky = "it's a \"test\" with $HOME and `x` and\nsecond line";
    let mut spec = env
        .spec(
            Runtime::Bash,
            r#"set -eu
source baton.sh
echo "input=$(baton_input)"
echo "greeting=$(baton_get_variable greeting)"
echo "meta=$(baton_event)"
printf 'tricky=%s|\n' "$TRICKY"
echo "plain=$PLAIN job=$BATON_JOB_ID"
echo "dirmode=$(stat -c %a "$(dirname "$BATON_DIR")")"
echo "cwd=$(basename "$PWD")"
echo PROGRESS: 40
baton_progress 90
baton_output '{"rows": 3}'
baton_set_variable last_id 42
baton_set_condition true
"#,
        )
        .with_env("TRICKY", tricky)
        .with_env("PLAIN", "p");
    spec.run_dir = Some(local.run_dir.clone());
    spec.helpers_dir = Some(local.helpers.clone());
    let job_id = spec.job_id;
    let run = env.run(spec).await;
    assert_succeeded(&run);
    let out = run.stdout();
    assert_eq!(out[0], r#"input={"count": 3}"#);
    assert_eq!(out[1], "greeting=hello");
    assert!(out[2].starts_with("meta={"), "{out:?}");
    assert_eq!(out[3], "tricky=it's a \"test\" with $HOME and `x` and");
    assert_eq!(out[4], "second line|");
    assert_eq!(out[5], format!("plain=p job={job_id}"));
    assert_eq!(out[6], "dirmode=700");
    assert_eq!(out[7], "cwd=work");
    let progress: Vec<u8> = run
        .events
        .iter()
        .filter_map(|e| match e {
            ExecEvent::Progress(p) => Some(*p),
            _ => None,
        })
        .collect();
    assert_eq!(progress, vec![40, 90]);

    // `out/` came back into the local run directory, as for a local run.
    let collected = rundir::collect(&local.run_dir, 1 << 20);
    assert!(collected.problems.is_empty(), "{:?}", collected.problems);
    assert_eq!(collected.output_json.as_deref(), Some(r#"{"rows": 3}"#));
    assert_eq!(collected.condition, Some(true));
    assert_eq!(
        collected.variables.get("last_id").map(String::as_str),
        Some("42")
    );
    env.assert_remote_clean().await;
}

/// A run that writes output, a variable and a condition, reads its input and a variable, and
/// uses the helpers: everything a transfer has to carry both ways.
async fn full_round_trip(env: &Env) -> Run {
    let local = local_run_dir(r#"{"count": 3}"#, &[("greeting", "hello")]);
    let mut spec = env.spec(
        Runtime::Bash,
        r#"set -eu
source baton.sh
echo "input=$(baton_input)"
echo "greeting=$(baton_get_variable greeting)"
echo "dirmode=$(stat -c %a "$(dirname "$BATON_DIR")")"
baton_output '{"rows": 3}'
baton_set_variable last_id 42
baton_set_condition true
"#,
    );
    spec.run_dir = Some(local.run_dir.clone());
    spec.helpers_dir = Some(local.helpers.clone());
    let run = env.run(spec).await;
    assert_succeeded(&run);
    assert_eq!(
        run.stdout(),
        vec![r#"input={"count": 3}"#, "greeting=hello", "dirmode=700"]
    );
    let collected = rundir::collect(&local.run_dir, 1 << 20);
    assert!(collected.problems.is_empty(), "{:?}", collected.problems);
    assert_eq!(collected.output_json.as_deref(), Some(r#"{"rows": 3}"#));
    assert_eq!(collected.condition, Some(true));
    assert_eq!(
        collected.variables.get("last_id").map(String::as_str),
        Some("42")
    );
    run
}

#[tokio::test]
async fn a_server_without_sftp_gets_its_files_over_exec() {
    let env = Env::on(Sshd::start_without_sftp(), |c| {
        // Long enough that a wait for an SFTP answer would show.
        c.operation_timeout = Duration::from_secs(30);
    });
    let started = Instant::now();
    full_round_trip(&env).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the fallback took {:?}: it waited for SFTP",
        started.elapsed()
    );
    let stats = env.executor.server_stats(env.server_id).expect("stats");
    assert_eq!(
        stats.transfer,
        FileTransfer::Shell,
        "remembered for the server"
    );
    // The next runs go straight to exec (one subsystem request was ever made).
    full_round_trip(&env).await;
    // A start failure's reason is read back from the server too.
    let mut missing = RunSpec::exec(["baton-no-such-command", "x"]);
    missing.ssh = Some(env.target());
    match &env.run(missing).await.outcome.error {
        Some(ExecError::StartFailed { reason }) => {
            assert!(reason.contains("not found"), "{reason}")
        }
        other => panic!("expected a start failure, got {other:?}"),
    }
    let refused = env.sshd.log().matches("subsystem request for sftp").count();
    assert_eq!(
        refused,
        1,
        "sftp was asked for {refused} times:\n{}",
        env.sshd.log()
    );
    env.assert_remote_clean().await;

    // A server with SFTP is remembered as such.
    let with_sftp = Env::new();
    full_round_trip(&with_sftp).await;
    let stats = with_sftp
        .executor
        .server_stats(with_sftp.server_id)
        .expect("stats");
    assert_eq!(stats.transfer, FileTransfer::Sftp);
}

#[tokio::test]
async fn a_server_with_neither_sftp_nor_a_usable_shell_fails_fast_and_clearly() {
    let sshd = Sshd::start_with(
        free_port(),
        SshdOptions {
            sftp: false,
            extra_config: vec!["ForceCommand /bin/false".to_owned()],
        },
    );
    let env = Env::on(sshd, |c| c.operation_timeout = Duration::from_secs(30));
    let started = Instant::now();
    let run = env.run(env.spec(Runtime::Sh, "echo never")).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    match &run.outcome.error {
        Some(ExecError::StartFailed { reason }) => {
            assert!(
                reason.contains("no sftp subsystem") && reason.contains("tar"),
                "{reason}"
            );
        }
        other => panic!("expected a start failure, got {other:?}"),
    }
    assert!(!run.started());
    assert_eq!(
        run.outcome.result(),
        RunResult::Failed(ErrorKind::Infrastructure)
    );
}

#[tokio::test]
async fn python_and_node_helpers_work_remotely() {
    let env = Env::new();
    for (runtime, script) in [
        (
            Runtime::Python,
            "import baton\nd = baton.input()\nbaton.output({'py': d['count'] * 2})\nprint('ok')\n",
        ),
        (
            Runtime::Node,
            "const baton = require('baton');\nconst d = baton.input();\nbaton.output({node: d.count + 1});\nconsole.log('ok');\n",
        ),
    ] {
        let local = local_run_dir(r#"{"count": 5}"#, &[]);
        let mut spec = env.spec(runtime, script);
        spec.run_dir = Some(local.run_dir.clone());
        spec.helpers_dir = Some(local.helpers.clone());
        let run = env.run(spec).await;
        assert_succeeded(&run);
        assert_eq!(run.stdout(), vec!["ok"]);
        let collected = rundir::collect(&local.run_dir, 1 << 20);
        let expected = match runtime {
            Runtime::Python => r#"{"py": 10}"#,
            _ => r#"{"node":6}"#,
        };
        assert_eq!(
            collected.output_json.as_deref(),
            Some(expected),
            "{runtime}"
        );
    }
    env.assert_remote_clean().await;
}

#[tokio::test]
async fn exit_codes_and_signals_are_reported() {
    let env = Env::new();
    let run = env.run(env.spec(Runtime::Sh, "echo before; exit 3")).await;
    assert_eq!(run.outcome.exit_code, Some(3));
    assert_eq!(run.outcome.signal, None);
    assert!(run.outcome.error.is_none(), "{:?}", run.outcome.error);
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
    assert_eq!(run.stdout(), vec!["before"]);

    let run = env.run(env.spec(Runtime::Bash, "kill -TERM $$")).await;
    assert_eq!(run.outcome.exit_code, None);
    assert_eq!(run.outcome.signal, Some(15), "{:?}", run.outcome);
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
    assert!(
        run.outcome.summary().contains("SIGTERM"),
        "{}",
        run.outcome.summary()
    );

    let run = env
        .run(env.spec(
            Runtime::Python,
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
        ))
        .await;
    assert_eq!(run.outcome.signal, Some(9), "{:?}", run.outcome);
    assert!(!run.outcome.timed_out && !run.outcome.cancelled);
    env.assert_remote_clean().await;
}

#[tokio::test]
async fn output_streams_live_and_stdin_is_closed() {
    let env = Env::new();
    let marker_dir = shared_dir("baton-ssh-test-");
    let marker = marker_dir.path().join("go");
    let script = format!(
        "cat; echo first; while [ ! -e '{}' ]; do sleep 0.02; done; echo second",
        marker.display()
    );
    let (handle, mut rx) = spawn_run(
        env.executor.clone(),
        env.spec(Runtime::Sh, &script),
        CancellationToken::new(),
    );
    // "first" arrives while the script is still waiting for the marker: output is live.
    let seen = recv_until_line(&mut rx, "first").await;
    assert!(matches!(seen[0], ExecEvent::Started { .. }));
    fs::write(&marker, "").unwrap();
    let rest = drain(rx).await;
    let outcome = handle.await.unwrap();
    assert!(outcome.succeeded(), "{outcome:?}");
    assert!(rest.contains(&ExecEvent::Line {
        stream: OutputStream::Stdout,
        text: "second".into()
    }));
    env.assert_remote_clean().await;
}

#[tokio::test]
async fn many_lines_with_a_slow_consumer_arrive_in_order() {
    let env = Env::new();
    let (tx, mut rx) = mpsc::channel(2);
    let executor = env.executor.clone();
    let spec = env.spec(
        Runtime::Sh,
        "i=0; while [ $i -lt 20000 ]; do echo \"line $i\"; i=$((i+1)); done",
    );
    let handle =
        tokio::spawn(async move { executor.run(spec, tx, CancellationToken::new()).await });
    let mut n = 0;
    while let Some(event) = rx.recv().await {
        if let ExecEvent::Line { text, .. } = event {
            assert_eq!(text, format!("line {n}"));
            n += 1;
            if n % 5000 == 0 {
                tokio::task::yield_now().await;
            }
        }
    }
    assert_eq!(n, 20000);
    assert!(handle.await.unwrap().succeeded());
}

// ---------------------------------------------------------------------------------------------
// Timeout, cancellation, process tree

fn tree_script(pids: &Path) -> String {
    format!(
        "sleep 1000 & echo $! >> '{p}'\n(sleep 1000; echo never) & echo $! >> '{p}'\necho $$ >> '{p}'\necho ready\nsleep 1000\n",
        p = pids.display()
    )
}

#[tokio::test]
async fn timeout_kills_the_remote_process_tree() {
    let env = Env::new();
    let tmp = shared_dir("baton-ssh-test-");
    let pids = tmp.path().join("pids");
    let spec = env
        .spec(Runtime::Bash, &tree_script(&pids))
        .with_timeout(Duration::from_secs(3))
        .with_kill_grace(Duration::from_secs(2));
    let started = Instant::now();
    let run = env.run(spec).await;
    assert!(run.outcome.timed_out, "{:?}", run.outcome);
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Timeout));
    assert!(matches!(
        run.outcome.error,
        Some(ExecError::TimedOut { .. })
    ));
    assert_eq!(run.outcome.signal, Some(15), "{:?}", run.outcome);
    assert!(run.stdout().contains(&"ready".to_owned()));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_all_dead(&read_pids(&pids)).await;
    env.assert_remote_clean().await;
}

#[tokio::test]
async fn cancel_kills_the_remote_process_tree() {
    let env = Env::new();
    let tmp = shared_dir("baton-ssh-test-");
    let pids = tmp.path().join("pids");
    let cancel = CancellationToken::new();
    let (handle, mut rx) = spawn_run(
        env.executor.clone(),
        env.spec(Runtime::Bash, &tree_script(&pids)),
        cancel.clone(),
    );
    recv_until_line(&mut rx, "ready").await;
    let cancelled_at = Instant::now();
    cancel.cancel();
    drain(rx).await;
    let outcome = handle.await.unwrap();
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(4),
        "{:?}",
        cancelled_at.elapsed()
    );
    assert!(outcome.cancelled, "{outcome:?}");
    assert_eq!(outcome.result(), RunResult::Failed(ErrorKind::Cancelled));
    assert_eq!(outcome.signal, Some(15));
    assert_all_dead(&read_pids(&pids)).await;
    env.assert_remote_clean().await;
    // A run that was stopped leaves a reusable connection.
    let run = env.run(env.spec(Runtime::Sh, "echo again")).await;
    assert_succeeded(&run);
    assert_eq!(env.sshd.accepted_logins(), 1);
}

#[tokio::test]
async fn term_ignoring_run_is_killed_after_the_grace() {
    let env = Env::new();
    let cancel = CancellationToken::new();
    let spec = env
        .spec(
            Runtime::Bash,
            "trap '' TERM\necho ready\nwhile true; do sleep 0.1; done\n",
        )
        .with_kill_grace(Duration::from_millis(500));
    let (handle, mut rx) = spawn_run(env.executor.clone(), spec, cancel.clone());
    recv_until_line(&mut rx, "ready").await;
    cancel.cancel();
    drain(rx).await;
    let outcome = handle.await.unwrap();
    assert!(outcome.cancelled);
    assert_eq!(outcome.signal, Some(9), "{outcome:?}");
    env.assert_remote_clean().await;
}

#[tokio::test]
async fn background_children_die_when_the_run_exits() {
    let env = Env::new();
    let tmp = shared_dir("baton-ssh-test-");
    let pids = tmp.path().join("pids");
    let run = env
        .run(env.spec(
            Runtime::Sh,
            &format!("sleep 1000 & echo $! > '{}'; echo done", pids.display()),
        ))
        .await;
    assert_succeeded(&run);
    assert_all_dead(&read_pids(&pids)).await;
    env.assert_remote_clean().await;
}

#[tokio::test]
async fn cancelled_before_start_does_not_connect() {
    let env = Env::new();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (outcome, _) = run_collect(
        env.executor.as_ref(),
        env.spec(Runtime::Sh, "echo hi"),
        cancel,
    )
    .await;
    assert!(outcome.cancelled);
    assert_eq!(env.sshd.accepted_logins(), 0);
}

#[tokio::test]
async fn start_failures_are_infrastructure_errors() {
    let env = Env::with(|c| c.python = "python-does-not-exist".into());
    let mut specs = Vec::new();
    let mut missing = RunSpec::exec(["baton-no-such-command", "x"]);
    missing.ssh = Some(env.target());
    specs.push((missing, "not found"));
    let mut absolute = RunSpec::exec(["/nonexistent/prog"]);
    absolute.ssh = Some(env.target());
    specs.push((absolute, "not an executable file"));
    specs.push((
        env.spec(Runtime::Python, "print(1)"),
        "interpreter `python-does-not-exist`",
    ));
    specs.push((
        env.spec(Runtime::Sh, "echo x")
            .with_workdir("/nonexistent/dir"),
        "working directory /nonexistent/dir does not exist",
    ));
    for (spec, reason) in specs {
        let run = env.run(spec).await;
        match &run.outcome.error {
            Some(ExecError::StartFailed { reason: r }) => {
                assert!(r.contains(reason), "{r:?} should mention {reason:?}")
            }
            other => panic!("expected a start failure ({reason}), got {other:?}"),
        }
        assert_eq!(
            run.outcome.result(),
            RunResult::Failed(ErrorKind::Infrastructure)
        );
    }
    let mut http = RunSpec::http(baton_worker::executor::HttpRequestSpec::new(
        "GET",
        "http://127.0.0.1:1/",
    ));
    http.ssh = Some(env.target());
    let run = env.run(http).await;
    assert!(matches!(
        run.outcome.error,
        Some(ExecError::InvalidSpec { .. })
    ));
    let run = env
        .run(RunSpec::script(Runtime::Sh, "echo no target"))
        .await;
    assert!(matches!(
        run.outcome.error,
        Some(ExecError::InvalidSpec { .. })
    ));
    env.assert_remote_clean().await;
}

// ---------------------------------------------------------------------------------------------
// Host keys and authentication

#[tokio::test]
async fn wrong_host_key_is_refused_and_nothing_runs() {
    let env = Env::new();
    let marker_dir = shared_dir("baton-ssh-test-");
    let marker = marker_dir.path().join("ran");
    let mut spec = env.spec(Runtime::Sh, &format!("touch '{}'", marker.display()));
    spec.ssh.as_mut().unwrap().host_key = Some(env.sshd.other_key_line());
    let run = env.run(spec).await;
    let err = run.ssh_error();
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("host key mismatch"), "{err}");
    assert_eq!(
        run.outcome.result(),
        RunResult::Failed(ErrorKind::Infrastructure)
    );
    assert!(!run.started());
    assert!(!marker.exists());
    assert_eq!(env.sshd.accepted_logins(), 0, "{}", env.sshd.log());
    // A mismatch is not an outage: the breaker stays closed.
    let stats = env.executor.server_stats(env.server_id).unwrap();
    assert_eq!(stats.breaker, BreakerState::Closed);
}

#[tokio::test]
async fn accept_new_records_the_key_and_refuses_a_changed_one() {
    let mut env = Env::new();
    let mut target = env.target();
    target.host_key = None;
    target.host_key_policy = HostKeyPolicy::AcceptNew;
    let spec = |t: &SshTarget| {
        let mut s = RunSpec::script(Runtime::Sh, "echo hi");
        s.ssh = Some(t.clone());
        s
    };
    let first = env.run(spec(&target)).await;
    assert_succeeded(&first);
    assert_eq!(
        first.outcome.observed_host_key.as_deref(),
        Some(env.sshd.host_key_line().as_str())
    );
    let second = env.run(spec(&target)).await;
    assert_succeeded(&second);
    assert_eq!(
        second.outcome.observed_host_key,
        first.outcome.observed_host_key
    );

    // Once the API has recorded it, nothing more is reported.
    let mut recorded = target.clone();
    recorded.host_key = first.outcome.observed_host_key.clone();
    let pinned = env.run(spec(&recorded)).await;
    assert_succeeded(&pinned);
    assert_eq!(pinned.outcome.observed_host_key, None);

    // The server's key changes: refused, with or without the recorded key in the target.
    env.sshd.change_host_key();
    env.executor.close_idle();
    for t in [&target, &recorded] {
        let run = env.run(spec(t)).await;
        let err = run.ssh_error();
        assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert!(!run.started());
    }
    // A strict target with the new key works.
    let mut strict = target.clone();
    strict.host_key_policy = HostKeyPolicy::Strict;
    strict.host_key = Some(env.sshd.host_key_line());
    assert_succeeded(&env.run(spec(&strict)).await);
}

#[tokio::test]
async fn strict_policy_without_a_pinned_key_is_an_invalid_definition() {
    let env = Env::new();
    let mut spec = env.spec(Runtime::Sh, "echo hi");
    spec.ssh.as_mut().unwrap().host_key = None;
    let run = env.run(spec).await;
    let err = run.ssh_error();
    assert!(matches!(err, SshError::InvalidTarget { .. }), "{err:?}");
    assert!(!err.is_retryable());
    let mut spec = env.spec(Runtime::Sh, "echo hi");
    spec.ssh.as_mut().unwrap().auth = SshAuth::PrivateKey {
        pem: "not a key".into(),
        passphrase: None,
    };
    let run = env.run(spec).await;
    assert!(matches!(run.ssh_error(), SshError::InvalidTarget { .. }));
    assert_eq!(env.sshd.accepted_logins(), 0);
}

#[tokio::test]
async fn wrong_credentials_are_refused() {
    let env = Env::new();
    let marker_dir = shared_dir("baton-ssh-test-");
    let marker = marker_dir.path().join("ran");
    let script = format!("touch '{}'", marker.display());
    for auth in [
        SshAuth::PrivateKey {
            pem: env.sshd.unauthorized_key_pem(),
            passphrase: None,
        },
        SshAuth::Password("not-the-password".into()),
    ] {
        let mut spec = env.spec(Runtime::Sh, &script);
        spec.ssh.as_mut().unwrap().auth = auth;
        let run = env.run(spec).await;
        let err = run.ssh_error();
        assert!(matches!(err, SshError::AuthFailed { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("authentication"), "{err}");
        assert!(!run.started());
    }
    assert!(!marker.exists());
    assert_eq!(env.sshd.accepted_logins(), 0);
}

// ---------------------------------------------------------------------------------------------
// Connection errors, circuit breaker

#[tokio::test]
async fn dns_failure_and_refused_connection_are_retryable() {
    let remote_tmp = remote_tmp();
    let executor = SshExecutor::new(config_for(remote_tmp.path()));
    let auth = SshAuth::Password("x".into());
    let mut target = SshTarget::new(
        Uuid::now_v7(),
        "baton-no-such-host.invalid",
        22,
        "u",
        auth.clone(),
    );
    target.host_key_policy = HostKeyPolicy::AcceptNew;
    let mut spec = RunSpec::script(Runtime::Sh, "true");
    spec.ssh = Some(target);
    let run = run_on(&executor, spec).await;
    let err = run.ssh_error();
    assert!(matches!(err, SshError::Dns { .. }), "{err:?}");
    assert!(err.is_retryable());

    let mut target = SshTarget::new(Uuid::now_v7(), "127.0.0.1", free_port(), "u", auth);
    target.host_key_policy = HostKeyPolicy::AcceptNew;
    let mut spec = RunSpec::script(Runtime::Sh, "true");
    spec.ssh = Some(target);
    let run = run_on(&executor, spec).await;
    let err = run.ssh_error();
    assert!(matches!(err, SshError::ConnectionRefused { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("refused"), "{err}");
}

#[tokio::test]
async fn circuit_breaker_fails_fast_then_probes_and_recovers() {
    let mut env = Env::with(|c| {
        c.breaker = BreakerConfig {
            failure_threshold: 3,
            cooldown: Duration::from_millis(800),
        }
    });
    env.sshd.stop();
    for _ in 0..3 {
        let run = env.run(env.spec(Runtime::Sh, "true")).await;
        assert!(
            matches!(run.ssh_error(), SshError::ConnectionRefused { .. }),
            "{:?}",
            run.outcome
        );
    }
    let stats = env.executor.server_stats(env.server_id).unwrap();
    assert_eq!(stats.breaker, BreakerState::Open);
    assert_eq!(stats.consecutive_failures, 3);
    let t = Instant::now();
    let run = env.run(env.spec(Runtime::Sh, "true")).await;
    let err = run.ssh_error();
    assert!(matches!(err, SshError::CircuitOpen { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );

    // The server comes back: once the cool-down is over, a probe succeeds and closes it.
    env.sshd.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let run = env.run(env.spec(Runtime::Sh, "echo back")).await;
        if run.outcome.succeeded() {
            assert_eq!(run.stdout(), vec!["back"]);
            break;
        }
        assert!(
            matches!(run.ssh_error(), SshError::CircuitOpen { .. }),
            "{:?}",
            run.outcome
        );
        assert!(Instant::now() < deadline, "the circuit never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = env.executor.server_stats(env.server_id).unwrap();
    assert_eq!(stats.breaker, BreakerState::Closed);
    assert_eq!(stats.consecutive_failures, 0);
}

// ---------------------------------------------------------------------------------------------
// Pool

#[tokio::test]
async fn pool_reuses_one_connection_for_sequential_runs() {
    let env = Env::new();
    for i in 0..5 {
        let run = env.run(env.spec(Runtime::Sh, &format!("echo {i}"))).await;
        assert_succeeded(&run);
    }
    let stats = env.executor.server_stats(env.server_id).unwrap();
    assert_eq!(stats.connections_opened, 1, "{stats:?}");
    assert_eq!(stats.connections_reused, 4, "{stats:?}");
    assert_eq!(stats.open_connections, 1);
    assert_eq!(stats.idle_connections, 1);
    assert_eq!(env.sshd.accepted_logins(), 1);
    assert_eq!(env.sshd.established_connections(), 1);
}

#[tokio::test]
async fn pool_reconnects_after_sshd_restart() {
    let mut env = Env::new();
    assert_succeeded(&env.run(env.spec(Runtime::Sh, "echo one")).await);
    // The run's directory is removed just after its outcome: a server killed within that
    // moment keeps it (as one killed during a run does), which is not what this test is about.
    env.assert_remote_clean().await;
    env.sshd.restart();
    let run = env.run(env.spec(Runtime::Sh, "echo two")).await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["two"]);
    let stats = env.executor.server_stats(env.server_id).unwrap();
    assert_eq!(stats.connections_opened, 2, "{stats:?}");
    assert_eq!(env.sshd.accepted_logins(), 2);
    env.assert_remote_clean().await;
}

#[tokio::test]
async fn connection_lost_during_a_run_is_a_retryable_session_error() {
    let mut env = Env::new();
    let (handle, mut rx) = spawn_run(
        env.executor.clone(),
        env.spec(Runtime::Sh, "echo ready; sleep 1000"),
        CancellationToken::new(),
    );
    recv_until_line(&mut rx, "ready").await;
    let lost_at = Instant::now();
    env.sshd.stop();
    drain(rx).await;
    let outcome = handle.await.unwrap();
    assert!(
        lost_at.elapsed() < Duration::from_secs(20),
        "{:?}",
        lost_at.elapsed()
    );
    match &outcome.error {
        Some(ExecError::Ssh(e @ SshError::Session { .. })) => assert!(e.is_retryable()),
        other => panic!("expected a session error, got {other:?}"),
    }
    assert_eq!(
        outcome.result(),
        RunResult::Failed(ErrorKind::Infrastructure)
    );
    // The server comes back: the pool does not hand out the dead connection.
    env.sshd.restart();
    assert_succeeded(&env.run(env.spec(Runtime::Sh, "echo back")).await);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let env = Env::with(|c| c.idle_timeout = Duration::from_millis(300));
    assert_succeeded(&env.run(env.spec(Runtime::Sh, "true")).await);
    let executor = env.executor.clone();
    let id = env.server_id;
    wait_until(
        "the idle connection to close",
        Duration::from_secs(10),
        || executor.server_stats(id).unwrap().open_connections == 0,
    )
    .await;
    wait_until("the TCP connection to go", Duration::from_secs(10), || {
        env.sshd.established_connections() == 0
    })
    .await;
    // And the next run simply connects again.
    assert_succeeded(&env.run(env.spec(Runtime::Sh, "true")).await);
    assert_eq!(env.sshd.accepted_logins(), 2);
}

#[tokio::test]
async fn fifty_runs_share_at_most_max_concurrent_connections() {
    const LIMIT: u32 = 3;
    let env = Env::new();
    let tmp = shared_dir("baton-ssh-test-");
    let running = tmp.path().join("running");
    fs::create_dir(&running).unwrap();
    fs::set_permissions(
        &running,
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    let counts = tmp.path().join("counts");
    // Each run registers itself, records how many runs are registered, works a little, leaves.
    let script = format!(
        "touch '{r}/'$$; ls '{r}' | wc -l >> '{c}'; sleep 0.1; rm '{r}/'$$",
        r = running.display(),
        c = counts.display()
    );
    let mut target = env.target();
    target.max_concurrent = LIMIT;

    // Sample the established TCP connections while the runs go.
    let done = Arc::new(AtomicBool::new(false));
    let max_tcp = Arc::new(AtomicUsize::new(0));
    let port = env.sshd.port;
    let sampler = {
        let done = done.clone();
        let max_tcp = max_tcp.clone();
        std::thread::spawn(move || {
            let probe = Sshd::established_for_port;
            while !done.load(Ordering::SeqCst) {
                max_tcp.fetch_max(probe(port), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let runs = (0..50).map(|_| {
        let executor = env.executor.clone();
        let mut spec = RunSpec::script(Runtime::Sh, script.clone());
        spec.ssh = Some(target.clone());
        async move { run_on(executor.as_ref(), spec).await }
    });
    let results = futures::future::join_all(runs).await;
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    for run in &results {
        assert_succeeded(run);
    }

    let stats = env.executor.server_stats(env.server_id).unwrap();
    assert!(stats.peak_connections <= LIMIT as usize, "{stats:?}");
    assert!(stats.connections_opened <= LIMIT as u64, "{stats:?}");
    assert_eq!(stats.peak_runs, LIMIT as usize, "{stats:?}");
    assert_eq!(
        stats.connections_reused + stats.connections_opened,
        50,
        "{stats:?}"
    );
    let logins = env.sshd.accepted_logins();
    assert!((1..=LIMIT as usize).contains(&logins), "{logins} logins");
    let tcp = max_tcp.load(Ordering::SeqCst);
    assert!(
        (1..=LIMIT as usize).contains(&tcp),
        "{tcp} TCP connections at once"
    );
    let observed = fs::read_to_string(&counts)
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse::<usize>().unwrap())
        .max()
        .unwrap();
    assert!(
        observed <= LIMIT as usize,
        "{observed} runs at once on the server"
    );
    env.assert_remote_clean().await;
}
