//! Tests of the local executor with real processes (bash, sh, python3, node) and a real HTTP
//! server. No mocks; synchronisation waits on conditions with generous deadlines.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_egress::AddressPolicy;
use baton_worker::executor::{
    ErrorKind, ExecError, ExecEvent, Executor, HttpRequestSpec, LocalConfig, LocalExecutor,
    OutputStream, RunOutcome, RunResult, RunSpec, Runtime, run_collect,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Upper bound for any single run in these tests (they normally take milliseconds).
const RUN_DEADLINE: Duration = Duration::from_secs(60);

/// A local executor whose `http` runs may reach loopback (the test servers listen there).
fn executor() -> Arc<dyn Executor> {
    Arc::new(LocalExecutor::new(LocalConfig {
        http_policy: allowing("127.0.0.0/8"),
        ..LocalConfig::default()
    }))
}

fn allowing(cidrs: &str) -> AddressPolicy {
    cidrs.parse().expect("cidrs")
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
    fn progress(&self) -> Vec<u8> {
        self.events
            .iter()
            .filter_map(|e| match e {
                ExecEvent::Progress(p) => Some(*p),
                _ => None,
            })
            .collect()
    }
    fn started(&self) -> bool {
        matches!(self.events.first(), Some(ExecEvent::Started { .. }))
    }
}

async fn run_with(executor: &dyn Executor, spec: RunSpec) -> Run {
    let (outcome, events) = tokio::time::timeout(
        RUN_DEADLINE,
        run_collect(executor, spec, CancellationToken::new()),
    )
    .await
    .expect("run did not finish within the test deadline");
    Run { outcome, events }
}

async fn run_local(spec: RunSpec) -> Run {
    run_with(executor().as_ref(), spec).await
}

fn script(runtime: Runtime, content: &str) -> RunSpec {
    RunSpec::script(runtime, content)
}

fn assert_succeeded(run: &Run) {
    assert!(
        run.outcome.succeeded(),
        "expected success, got {:?} ({}); stderr: {:?}",
        run.outcome,
        run.outcome.summary(),
        run.stderr()
    );
}

/// Whether `pid` is a live process (zombies count as dead: nothing may reap them here).
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

async fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// Drives a run in the background, returning its handle and the event receiver.
fn spawn_run(
    executor: Arc<dyn Executor>,
    spec: RunSpec,
    capacity: usize,
    cancel: CancellationToken,
) -> (
    tokio::task::JoinHandle<RunOutcome>,
    mpsc::Receiver<ExecEvent>,
) {
    let (tx, rx) = mpsc::channel(capacity);
    let handle = tokio::spawn(async move { executor.run(spec, tx, cancel).await });
    (handle, rx)
}

/// Receives events until a stdout line equal to `line` arrives; returns everything seen.
async fn recv_until_line(rx: &mut mpsc::Receiver<ExecEvent>, line: &str) -> Vec<ExecEvent> {
    let mut seen = Vec::new();
    tokio::time::timeout(RUN_DEADLINE, async {
        while let Some(event) = rx.recv().await {
            for event in event.into_single_lines() {
                let hit = matches!(&event, ExecEvent::Line { stream: OutputStream::Stdout, text } if text == line);
                seen.push(event);
                if hit {
                    return;
                }
            }
        }
        panic!("run ended before printing {line:?}; saw {seen:?}");
    })
    .await
    .expect("line did not arrive in time");
    seen
}

// ---------------------------------------------------------------------------------------------
// Runtimes

#[tokio::test]
async fn bash_runs_a_script() {
    let run = run_local(script(
        Runtime::Bash,
        "arr=(one two three)\nif [[ ${#arr[@]} -eq 3 ]]; then echo \"bash ${arr[1]}\"; fi\necho err >&2\n",
    ))
    .await;
    assert_succeeded(&run);
    assert!(run.started());
    assert_eq!(run.stdout(), vec!["bash two"]);
    assert_eq!(run.stderr(), vec!["err"]);
    assert_eq!(run.outcome.exit_code, Some(0));
    assert_eq!(run.outcome.signal, None);
    assert!(run.outcome.pid.is_some());
}

#[tokio::test]
async fn sh_runs_a_script() {
    let run = run_local(script(Runtime::Sh, "x=sh; echo \"hello $x\"; exit 0")).await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["hello sh"]);
}

#[tokio::test]
async fn python_runs_a_script() {
    let run = run_local(script(
        Runtime::Python,
        "import sys\nprint('py', sys.version_info[0])\nprint('oops', file=sys.stderr)\nsys.exit(4)\n",
    ))
    .await;
    assert_eq!(run.stdout(), vec!["py 3"], "stderr: {:?}", run.stderr());
    assert_eq!(run.stderr(), vec!["oops"]);
    assert_eq!(run.outcome.exit_code, Some(4));
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
    assert!(run.outcome.error.is_none());
}

#[tokio::test]
async fn node_runs_a_script() {
    let run = run_local(script(
        Runtime::Node,
        "console.log('node', typeof require);\nconsole.error('nerr');\nprocess.exitCode = 5;\n",
    ))
    .await;
    assert_eq!(
        run.stdout(),
        vec!["node function"],
        "stderr: {:?}",
        run.stderr()
    );
    assert_eq!(run.stderr(), vec!["nerr"]);
    assert_eq!(run.outcome.exit_code, Some(5));
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
}

#[tokio::test]
async fn exec_runs_argv_without_a_shell() {
    let run = run_local(RunSpec::exec(["printf", "%s|", "a b", "$HOME", "*"])).await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["a b|$HOME|*|"]);
}

#[tokio::test]
async fn exec_non_zero_exit_is_a_script_failure() {
    let run = run_local(RunSpec::exec(["false"])).await;
    assert_eq!(run.outcome.exit_code, Some(1));
    assert!(run.outcome.error.is_none());
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
    assert_eq!(run.outcome.result().job_status(), "failed");
}

#[tokio::test]
async fn invalid_specs_are_rejected_without_running() {
    for spec in [
        RunSpec::exec(Vec::<String>::new()),
        RunSpec {
            content: None,
            ..RunSpec::script(Runtime::Bash, "")
        },
        RunSpec::script(Runtime::Sh, "true").with_env("BAD=KEY", "x"),
        RunSpec::http(HttpRequestSpec::new("GET", "not a url")),
        RunSpec::http(HttpRequestSpec::new("GET", "ftp://example.com/")),
    ] {
        let run = run_local(spec).await;
        assert!(
            matches!(run.outcome.error, Some(ExecError::InvalidSpec { .. })),
            "{:?}",
            run.outcome
        );
        assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
        assert!(run.events.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Environment and working directory

#[tokio::test]
async fn env_is_minimal_plus_spec_and_baton_variables() {
    let run_dir = tempfile::tempdir().expect("tempdir");
    let spec = RunSpec {
        run_dir: Some(run_dir.path().to_path_buf()),
        ..script(
            Runtime::Bash,
            r#"echo "FOO=$FOO"
echo "SPACED=$SPACED"
echo "BATON_DIR=$BATON_DIR"
echo "BATON_JOB_ID=$BATON_JOB_ID"
echo "PATH_SET=${PATH:+yes}"
echo "MANIFEST=${CARGO_MANIFEST_DIR:-unset}"
echo "HELPERS=${BATON_HELPERS:-unset}"
"#,
        )
        .with_env("FOO", "bar")
        .with_env("SPACED", "a b  c")
    };
    let job_id = spec.job_id;
    let run = run_local(spec).await;
    assert_succeeded(&run);
    // cargo sets CARGO_MANIFEST_DIR for the test process: it must not leak into the run.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    assert_eq!(
        run.stdout(),
        vec![
            "FOO=bar".to_owned(),
            "SPACED=a b  c".to_owned(),
            format!("BATON_DIR={}", run_dir.path().display()),
            format!("BATON_JOB_ID={job_id}"),
            "PATH_SET=yes".to_owned(),
            "MANIFEST=unset".to_owned(),
            "HELPERS=unset".to_owned(),
        ]
    );
}

#[tokio::test]
async fn helpers_are_importable_from_every_language() {
    let helpers = tempfile::tempdir().expect("tempdir");
    let h = helpers.path();
    fs::write(
        h.join("baton.sh"),
        "baton_hello() { echo \"sh-helper $1\"; }\n",
    )
    .expect("write");
    fs::write(
        h.join("baton.py"),
        "def hello(x):\n    print('py-helper', x)\n",
    )
    .expect("write");
    fs::write(
        h.join("baton.js"),
        "exports.hello = (x) => console.log('js-helper', x);\n",
    )
    .expect("write");
    let with_helpers = |spec: RunSpec| RunSpec {
        helpers_dir: Some(h.to_path_buf()),
        ..spec
    };

    let bash = run_local(with_helpers(script(
        Runtime::Bash,
        "source baton.sh\nbaton_hello 1\necho \"$BATON_HELPERS\"\n",
    )))
    .await;
    assert_succeeded(&bash);
    assert_eq!(
        bash.stdout(),
        vec!["sh-helper 1".to_owned(), h.display().to_string()]
    );

    let py = run_local(with_helpers(script(
        Runtime::Python,
        "import baton\nbaton.hello(2)\n",
    )))
    .await;
    assert_succeeded(&py);
    assert_eq!(py.stdout(), vec!["py-helper 2"]);

    let js = run_local(with_helpers(script(
        Runtime::Node,
        "require('baton').hello(3);\n",
    )))
    .await;
    assert_succeeded(&js);
    assert_eq!(js.stdout(), vec!["js-helper 3"]);
}

#[tokio::test]
async fn runs_in_the_given_workdir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let canonical = dir.path().canonicalize().expect("canonicalize");
    let run =
        run_local(script(Runtime::Sh, "pwd -P; echo data > out.txt").with_workdir(dir.path()))
            .await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec![canonical.display().to_string()]);
    assert_eq!(
        fs::read_to_string(dir.path().join("out.txt")).expect("out.txt"),
        "data\n"
    );
}

#[tokio::test]
async fn default_workdir_is_fresh_private_and_removed() {
    let probe = "pwd -P; ls -A | wc -l; stat -c %a ..";
    let first = run_local(script(Runtime::Sh, probe)).await;
    let second = run_local(script(Runtime::Sh, probe)).await;
    assert_succeeded(&first);
    assert_succeeded(&second);
    let (a, b) = (first.stdout(), second.stdout());
    assert_ne!(a[0], b[0], "each run gets its own directory");
    assert_eq!(a[1].trim(), "0", "the working directory starts empty");
    assert_eq!(a[2], "700", "the run directory is private");
    for out in [&a, &b] {
        assert!(
            !PathBuf::from(&out[0]).exists(),
            "{} should be removed",
            out[0]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Exit status

#[tokio::test]
async fn exit_codes_are_reported() {
    for code in [0, 1, 42, 255] {
        let run = run_local(script(Runtime::Bash, &format!("exit {code}"))).await;
        assert_eq!(run.outcome.exit_code, Some(code));
        assert_eq!(run.outcome.signal, None);
        assert_eq!(run.outcome.succeeded(), code == 0);
        if code != 0 {
            assert_eq!(run.outcome.summary(), format!("exit code {code}"));
        }
    }
}

#[tokio::test]
async fn death_by_signal_is_reported() {
    let run = run_local(script(
        Runtime::Bash,
        "echo before\nkill -9 $$\necho after\n",
    ))
    .await;
    assert_eq!(run.outcome.signal, Some(9));
    assert_eq!(run.outcome.exit_code, None);
    assert!(!run.outcome.timed_out && !run.outcome.cancelled);
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
    assert_eq!(run.stdout(), vec!["before"]);
    assert!(
        run.outcome.summary().contains("SIGKILL"),
        "{}",
        run.outcome.summary()
    );
}

// ---------------------------------------------------------------------------------------------
// Output

#[tokio::test]
async fn stdout_and_stderr_are_separate_and_ordered() {
    let run = run_local(script(
        Runtime::Python,
        "import sys\nfor i in range(2000):\n    print(f'out {i}')\n    print(f'err {i}', file=sys.stderr)\n",
    ))
    .await;
    assert_succeeded(&run);
    let expect = |p: &str| (0..2000).map(|i| format!("{p} {i}")).collect::<Vec<_>>();
    assert_eq!(run.stdout(), expect("out"));
    assert_eq!(run.stderr(), expect("err"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_of_output_arrive_complete_and_in_order() {
    const LINES: usize = 100_000; // 100 bytes each, newline included
    let spec = script(
        Runtime::Python,
        &format!(
            "import sys\nw = sys.stdout.write\nfor i in range({LINES}):\n    w(f'{{i:08d}} ' + 'x' * 90 + '\\n')\n"
        ),
    );
    // A small channel: the producer must be slowed down, never dropped.
    let (handle, mut rx) = spawn_run(executor(), spec, 8, CancellationToken::new());
    let mut count = 0usize;
    let mut bytes = 0usize;
    let collect = async {
        while let Some(event) = rx.recv().await {
            for event in event.into_single_lines() {
                let ExecEvent::Line { stream, text } = event else {
                    continue;
                };
                assert_eq!(stream, OutputStream::Stdout, "unexpected stderr: {text}");
                let expected = format!("{count:08} {}", "x".repeat(90));
                assert_eq!(text, expected, "line {count}");
                count += 1;
                bytes += text.len() + 1;
            }
        }
    };
    tokio::time::timeout(RUN_DEADLINE, collect)
        .await
        .expect("output did not finish in time");
    let outcome = handle.await.expect("join");
    assert!(outcome.succeeded(), "{outcome:?}");
    assert_eq!(count, LINES);
    assert_eq!(bytes, 10_000_000);
}

#[tokio::test]
async fn last_line_without_newline_and_long_lines() {
    let run = run_local(script(
        Runtime::Python,
        "import sys\nsys.stdout.write('a\\r\\n\\nlast')\nsys.stderr.write('x' * 200000)\n",
    ))
    .await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["a", "", "last"]);
    let err = run.stderr();
    assert_eq!(
        err.iter().map(String::len).collect::<Vec<_>>(),
        vec![65536, 65536, 65536, 200000 - 3 * 65536]
    );
    assert!(err.iter().all(|l| l.bytes().all(|b| b == b'x')));
}

#[tokio::test]
async fn invalid_utf8_is_replaced() {
    let run = run_local(script(Runtime::Bash, "printf 'ok \\377\\376 end\\n'")).await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["ok \u{FFFD}\u{FFFD} end"]);
}

#[tokio::test]
async fn progress_lines_emit_progress_events() {
    let run = run_local(script(
        Runtime::Bash,
        "echo 'PROGRESS: 10'\necho 'PROGRESS:55'\necho '  PROGRESS :  100 '\necho 'PROGRESS: 150'\necho 'PROGRESS: 20' >&2\necho 'not PROGRESS: 30'\n",
    ))
    .await;
    assert_succeeded(&run);
    assert_eq!(run.progress(), vec![10, 55, 100]);
    assert_eq!(run.stdout().len(), 5, "progress lines stay in the log");
    // The progress event follows its line.
    let pos_line = run
        .events
        .iter()
        .position(|e| matches!(e, ExecEvent::Line { text, .. } if text == "PROGRESS:55"))
        .expect("line");
    assert_eq!(run.events[pos_line + 1], ExecEvent::Progress(55));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_streamed_while_the_process_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = dir.path().join("gate");
    // The script only finishes after the test has seen its first line and opened the gate.
    let spec = script(
        Runtime::Bash,
        "echo first\nwhile [ ! -e gate ]; do sleep 0.02; done\necho second\n",
    )
    .with_workdir(dir.path());
    let (handle, mut rx) = spawn_run(executor(), spec, 16, CancellationToken::new());
    let seen = recv_until_line(&mut rx, "first").await;
    assert!(matches!(seen[0], ExecEvent::Started { pid: Some(_) }));
    assert!(!handle.is_finished());
    fs::write(&gate, "").expect("gate");
    let rest = recv_until_line(&mut rx, "second").await;
    assert_eq!(rest.len(), 1);
    let outcome = tokio::time::timeout(RUN_DEADLINE, handle)
        .await
        .expect("finish")
        .expect("join");
    assert!(outcome.succeeded(), "{outcome:?}");
}

#[tokio::test]
async fn a_dropped_receiver_does_not_stop_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let spec = script(
        Runtime::Bash,
        "for i in $(seq 1 20000); do echo line $i; done; echo done > marker",
    )
    .with_workdir(dir.path());
    let outcome = tokio::time::timeout(
        RUN_DEADLINE,
        executor().run(spec, tx, CancellationToken::new()),
    )
    .await
    .expect("finish");
    assert!(outcome.succeeded(), "{outcome:?}");
    assert!(dir.path().join("marker").exists());
}

// ---------------------------------------------------------------------------------------------
// Process tree: timeout, cancel, background children

const TREE_SCRIPT: &str = r#"sleep 1000 & echo $! >> pids
sleep 1000 & echo $! >> pids
( sleep 1000 & echo $! >> pids; wait ) &
echo $! >> pids
while [ "$(wc -l < pids)" -lt 4 ]; do sleep 0.01; done
echo ready
sleep 1000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = script(Runtime::Bash, TREE_SCRIPT)
        .with_workdir(dir.path())
        .with_timeout(Duration::from_secs(1));
    let start = Instant::now();
    let run = run_local(spec).await;
    let elapsed = start.elapsed();
    assert!(run.outcome.timed_out, "{:?}", run.outcome);
    assert!(!run.outcome.cancelled);
    assert!(matches!(
        run.outcome.error,
        Some(ExecError::TimedOut { .. })
    ));
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Timeout));
    assert_eq!(run.outcome.result().job_status(), "timed_out");
    assert_eq!(run.outcome.signal, Some(15), "bash dies of SIGTERM");
    assert_eq!(run.stdout(), vec!["ready"]);
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let pids = read_pids(&dir.path().join("pids"));
    assert_eq!(pids.len(), 4);
    assert_all_dead(&pids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_escalates_to_sigkill_after_the_grace() {
    let dir = tempfile::tempdir().expect("tempdir");
    // SIGTERM is ignored by the script and (inherited) by its children.
    let spec = script(Runtime::Bash, &format!("trap '' TERM\n{TREE_SCRIPT}"))
        .with_workdir(dir.path())
        .with_timeout(Duration::from_millis(500))
        .with_kill_grace(Duration::from_millis(300));
    let start = Instant::now();
    let run = run_local(spec).await;
    let elapsed = start.elapsed();
    assert!(run.outcome.timed_out);
    assert_eq!(run.outcome.signal, Some(9), "{:?}", run.outcome);
    assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_all_dead(&read_pids(&dir.path().join("pids"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_process_within_a_second_and_kills_the_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = script(Runtime::Bash, TREE_SCRIPT).with_workdir(dir.path());
    let cancel = CancellationToken::new();
    let (handle, mut rx) = spawn_run(executor(), spec, 16, cancel.clone());
    recv_until_line(&mut rx, "ready").await;
    let pids = read_pids(&dir.path().join("pids"));
    assert_eq!(pids.len(), 4);
    assert!(pids.iter().all(|&p| alive(p)));

    let cancelled_at = Instant::now();
    cancel.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("run did not stop after cancel")
        .expect("join");
    let took = cancelled_at.elapsed();
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    assert!(outcome.cancelled, "{outcome:?}");
    assert!(!outcome.timed_out);
    assert!(matches!(outcome.error, Some(ExecError::Cancelled)));
    assert_eq!(outcome.result(), RunResult::Failed(ErrorKind::Cancelled));
    assert_eq!(outcome.result().job_status(), "cancelled");
    assert_all_dead(&pids).await;
}

/// `kill_now` (a forced cancel) skips the SIGTERM grace: a tree that ignores SIGTERM dies at
/// once by SIGKILL; fired during the grace of a plain cancel, it cuts the grace short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_now_skips_or_cuts_short_the_grace() {
    for escalate in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = script(Runtime::Bash, &format!("trap '' TERM\n{TREE_SCRIPT}"))
            .with_workdir(dir.path())
            .with_kill_grace(Duration::from_secs(30));
        let kill_now = spec.kill_now.clone();
        let cancel = CancellationToken::new();
        let (handle, mut rx) = spawn_run(executor(), spec, 16, cancel.clone());
        recv_until_line(&mut rx, "ready").await;
        let pids = read_pids(&dir.path().join("pids"));
        let asked = Instant::now();
        if escalate {
            cancel.cancel();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                !handle.is_finished(),
                "SIGTERM is ignored: still in its grace"
            );
            kill_now.cancel();
        } else {
            kill_now.cancel();
            cancel.cancel();
        }
        let outcome = tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("run did not stop")
            .expect("join");
        let took = asked.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "escalate={escalate}: took {took:?}"
        );
        assert!(outcome.cancelled, "{outcome:?}");
        assert_eq!(outcome.signal, Some(9), "{outcome:?}");
        assert_all_dead(&pids).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_signal_is_visible_to_the_script() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = script(
        Runtime::Bash,
        "trap 'echo got-term > term; exit 0' TERM\necho ready\nwhile :; do sleep 0.05; done\n",
    )
    .with_workdir(dir.path());
    let cancel = CancellationToken::new();
    let (handle, mut rx) = spawn_run(executor(), spec, 16, cancel.clone());
    recv_until_line(&mut rx, "ready").await;
    let cancelled_at = Instant::now();
    cancel.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("stop")
        .expect("join");
    assert!(cancelled_at.elapsed() < Duration::from_secs(1));
    assert!(outcome.cancelled);
    // The script handled SIGTERM itself and exited 0: still a cancelled run.
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.result(), RunResult::Failed(ErrorKind::Cancelled));
    assert_eq!(
        fs::read_to_string(dir.path().join("term")).expect("term file"),
        "got-term\n"
    );
}

#[tokio::test]
async fn a_pre_cancelled_run_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (outcome, events) = run_collect(
        executor().as_ref(),
        script(Runtime::Sh, "touch started").with_workdir(dir.path()),
        cancel,
    )
    .await;
    assert!(outcome.cancelled);
    assert!(events.is_empty());
    assert!(!dir.path().join("started").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_children_do_not_survive_a_normal_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = script(
        Runtime::Bash,
        "sleep 1000 & echo $! >> pids\n(sleep 1000; echo never) & echo $! >> pids\necho bye\n",
    )
    .with_workdir(dir.path());
    let start = Instant::now();
    let run = run_local(spec).await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["bye"]);
    // The children kept stdout open: the run must still end promptly.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_all_dead(&read_pids(&dir.path().join("pids"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_holding_the_pipe_does_not_block_the_end_of_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    // setsid puts the child in its own session: out of the run's process group, out of reach.
    let spec = script(
        Runtime::Bash,
        "setsid sleep 1000 & echo $! > daemon\nwhile [ ! -s daemon ]; do sleep 0.01; done\necho bye\n",
    )
    .with_workdir(dir.path());
    let start = Instant::now();
    let run = run_local(spec).await;
    let elapsed = start.elapsed();
    let daemon = read_pids(&dir.path().join("daemon"));
    // Clean up the process this test created, whatever happens next.
    for &pid in &daemon {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["bye"]);
    let limit = LocalConfig::default().drain_max + Duration::from_secs(3);
    assert!(elapsed < limit, "{elapsed:?}");
}

// ---------------------------------------------------------------------------------------------
// Start failures

fn assert_start_failed(run: &Run, needle: &str) {
    match &run.outcome.error {
        Some(ExecError::StartFailed { reason }) => {
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            )
        }
        other => panic!("expected StartFailed, got {other:?} ({:?})", run.outcome),
    }
    assert_eq!(
        run.outcome.result(),
        RunResult::Failed(ErrorKind::Infrastructure)
    );
    assert_eq!(run.outcome.result().job_status(), "failed");
}

#[tokio::test]
async fn missing_interpreter_is_a_start_failure() {
    let executor = LocalExecutor::new(LocalConfig {
        bash: "/nonexistent/bin/bash".into(),
        python: "no-such-python-interpreter".into(),
        ..LocalConfig::default()
    });
    let run = run_with(&executor, script(Runtime::Bash, "echo hi")).await;
    assert_start_failed(&run, "/nonexistent/bin/bash");
    assert!(run.events.is_empty(), "no Started event: {:?}", run.events);
    let run = run_with(&executor, script(Runtime::Python, "print(1)")).await;
    assert_start_failed(&run, "no-such-python-interpreter");
}

#[tokio::test]
async fn bad_workdir_is_a_start_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("does-not-exist");
    let run = run_local(script(Runtime::Sh, "echo hi").with_workdir(&missing)).await;
    assert_start_failed(&run, "does-not-exist");

    let file = dir.path().join("a-file");
    fs::write(&file, "").expect("write");
    let run = run_local(script(Runtime::Sh, "echo hi").with_workdir(&file)).await;
    assert_start_failed(&run, "not a directory");
}

#[tokio::test]
async fn exec_of_a_missing_program_is_a_start_failure() {
    let run = run_local(RunSpec::exec(["baton-no-such-program-xyz", "arg"])).await;
    assert_start_failed(&run, "baton-no-such-program-xyz");
    let run = run_local(RunSpec::exec(["/nonexistent/program"])).await;
    assert_start_failed(&run, "/nonexistent/program");
}

#[tokio::test]
async fn exec_not_executable_is_a_start_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plain.txt");
    fs::write(&file, "echo hi\n").expect("write");
    let run = run_local(RunSpec::exec([file.display().to_string()])).await;
    assert_start_failed(&run, "plain.txt");
}

#[tokio::test]
async fn exec_127_in_the_startup_window_is_a_start_failure() {
    // `env` itself starts, then cannot find the program and exits 127.
    let run = run_local(RunSpec::exec(["env", "baton-no-such-program-xyz"])).await;
    assert_start_failed(&run, "command not found");
    assert!(run.started(), "the wrapper did start");
    assert_eq!(run.outcome.exit_code, Some(127));
    // For scripts, 127 is the script's own exit code.
    let run = run_local(script(Runtime::Sh, "exit 127")).await;
    assert!(run.outcome.error.is_none());
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
}

#[tokio::test]
async fn the_runs_own_startup_window_applies_the_whole_rule() {
    let with_window = |content: &str, window: Duration| RunSpec {
        startup_window: Some(window),
        ..script(Runtime::Sh, content)
    };
    // An early non-zero exit of a script: a start failure, the script's own fault.
    let run = run_local(with_window("echo nope >&2; exit 3", Duration::from_secs(5))).await;
    match &run.outcome.error {
        Some(ExecError::EarlyExit { code: 3, reason }) => {
            assert!(reason.contains("startup window of 5 s"), "{reason}");
            assert!(reason.contains("nope"), "the stderr tail: {reason}");
        }
        other => panic!("expected EarlyExit, got {other:?}"),
    }
    assert!(run.outcome.start_failure());
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
    // Exit 0, a window of zero, an exit after the window: not start failures.
    for spec in [
        with_window("exit 0", Duration::from_secs(5)),
        with_window("exit 3", Duration::ZERO),
        with_window("sleep 0.3; exit 3", Duration::from_millis(100)),
    ] {
        let run = run_local(spec).await;
        assert!(!run.outcome.start_failure(), "{:?}", run.outcome);
    }
    // A missing program stays an infrastructure start failure.
    let run = run_local(RunSpec {
        startup_window: Some(Duration::from_secs(5)),
        ..RunSpec::exec(["env", "baton-no-such-program-xyz"])
    })
    .await;
    assert_start_failed(&run, "command not found");
    assert!(run.outcome.start_failure());
}

// ---------------------------------------------------------------------------------------------
// HTTP

async fn http_server() -> SocketAddr {
    use axum::Router;
    use axum::http::{HeaderMap, Method, StatusCode};
    use axum::routing::{any, get};

    async fn echo(method: Method, headers: HeaderMap, body: String) -> String {
        let h = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        format!(
            "method={method}\ncontent-type={}\nx-token={}\nbody={body}\n",
            h("content-type"),
            h("x-token")
        )
    }

    let app = Router::new()
        .route(
            "/ok",
            get(|| async { "hello\nworld\nPROGRESS: 40\nno newline" }),
        )
        .route(
            "/fail",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom\n") }),
        )
        .route("/echo", any(echo))
        .route(
            "/slow",
            get(|| async { std::future::pending::<&'static str>().await }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    addr
}

#[tokio::test]
async fn http_200_streams_the_body() {
    let addr = http_server().await;
    let run = run_local(RunSpec::http(HttpRequestSpec::new(
        "get",
        format!("http://{addr}/ok"),
    )))
    .await;
    assert_succeeded(&run);
    assert_eq!(run.outcome.http_status, Some(200));
    assert_eq!(run.outcome.exit_code, Some(0));
    assert!(matches!(run.events[0], ExecEvent::Started { pid: None }));
    assert_eq!(
        run.stdout(),
        vec!["hello", "world", "PROGRESS: 40", "no newline"]
    );
    assert_eq!(run.progress(), vec![40]);
}

#[tokio::test]
async fn http_500_is_a_script_failure_with_the_status() {
    let addr = http_server().await;
    let run = run_local(RunSpec::http(HttpRequestSpec::new(
        "GET",
        format!("http://{addr}/fail"),
    )))
    .await;
    assert_eq!(run.outcome.http_status, Some(500));
    assert!(matches!(
        run.outcome.error,
        Some(ExecError::HttpStatus { status: 500 })
    ));
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
    assert!(run.outcome.summary().contains("500"));
    assert_eq!(run.stdout(), vec!["boom"], "the error body is still logged");
}

#[tokio::test]
async fn http_bodies_and_headers_are_sent() {
    let addr = http_server().await;
    let url = format!("http://{addr}/echo");

    let mut json = HttpRequestSpec::new("POST", &url);
    json.body = Some(serde_json::json!({"a": 1}));
    json.headers.insert("X-Token".into(), "secret".into());
    let run = run_local(RunSpec::http(json)).await;
    assert_succeeded(&run);
    assert_eq!(
        run.stdout(),
        vec![
            "method=POST",
            "content-type=application/json",
            "x-token=secret",
            r#"body={"a":1}"#
        ]
    );

    let mut raw = HttpRequestSpec::new("PUT", &url);
    raw.body = Some(serde_json::Value::String("plain text, not \"json\"".into()));
    raw.headers
        .insert("content-type".into(), "text/plain".into());
    let run = run_local(RunSpec::http(raw)).await;
    assert_succeeded(&run);
    assert_eq!(
        run.stdout(),
        vec![
            "method=PUT",
            "content-type=text/plain",
            "x-token=-",
            "body=plain text, not \"json\""
        ]
    );
}

#[tokio::test]
async fn http_connection_refused_is_an_infrastructure_error() {
    // A port that was just free and is now closed.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let run = run_local(RunSpec::http(HttpRequestSpec::new(
        "GET",
        format!("http://{addr}/"),
    )))
    .await;
    assert!(
        matches!(run.outcome.error, Some(ExecError::HttpTransport { .. })),
        "{:?}",
        run.outcome
    );
    assert_eq!(
        run.outcome.result(),
        RunResult::Failed(ErrorKind::Infrastructure)
    );
    assert_eq!(run.outcome.http_status, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_timeout_and_cancel() {
    let addr = http_server().await;
    let slow = || RunSpec::http(HttpRequestSpec::new("GET", format!("http://{addr}/slow")));

    let run = run_local(slow().with_timeout(Duration::from_millis(300))).await;
    assert!(run.outcome.timed_out);
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Timeout));

    let cancel = CancellationToken::new();
    let (handle, mut rx) = spawn_run(executor(), slow(), 16, cancel.clone());
    let first = tokio::time::timeout(RUN_DEADLINE, rx.recv())
        .await
        .expect("started");
    assert_eq!(first, Some(ExecEvent::Started { pid: None }));
    let at = Instant::now();
    cancel.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("stop")
        .expect("join");
    assert!(at.elapsed() < Duration::from_secs(1));
    assert!(outcome.cancelled);
    assert_eq!(outcome.result(), RunResult::Failed(ErrorKind::Cancelled));
}

/// A server on `ip` that counts the requests it gets and answers each `/go?to=URL` with a
/// redirect to URL (and anything else with `hit`).
async fn counting_server(ip: &str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::extract::Query;
    use axum::response::{IntoResponse, Redirect, Response};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(
        move |query: Query<std::collections::HashMap<String, String>>| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                match query.get("to") {
                    Some(to) => Redirect::temporary(to).into_response(),
                    None => Response::new("hit".into()),
                }
            }
        },
    );
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (addr, hits)
}

fn refusal(run: &Run) -> String {
    match &run.outcome.error {
        Some(ExecError::HttpRefused { reason }) => {
            assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
            assert_eq!(run.outcome.http_status, None);
            reason.clone()
        }
        other => panic!("expected a refusal, got {other:?} ({:?})", run.outcome),
    }
}

#[tokio::test]
async fn http_to_internal_addresses_is_refused_by_default() {
    use std::sync::atomic::Ordering;
    let (addr, hits) = counting_server("127.0.0.1").await;
    let port = addr.port();
    let default = LocalExecutor::default();
    let get = |url: String| RunSpec::http(HttpRequestSpec::new("GET", url));

    // An IP literal (never resolved) and a name resolving to loopback.
    let run = run_with(&default, get(format!("http://{addr}/"))).await;
    let reason = refusal(&run);
    assert!(
        reason.contains("127.0.0.1") && reason.contains("loopback"),
        "{reason}"
    );
    assert!(reason.contains("BATON_HTTP_ALLOW_CIDRS"), "{reason}");
    let run = run_with(&default, get(format!("http://localhost:{port}/"))).await;
    let reason = refusal(&run);
    assert!(reason.contains("`localhost` resolves to"), "{reason}");
    // IPv6 loopback, IPv4-mapped loopback, cloud metadata, private: refused before connecting.
    for url in [
        format!("http://[::1]:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
        "http://0.0.0.0/".to_owned(),
    ] {
        let run = run_with(&default, get(url.clone())).await;
        refusal(&run);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing reached the server");

    // The allow-list opens exactly what it lists.
    let allowed = LocalExecutor::new(LocalConfig {
        http_policy: allowing("127.0.0.1/32"),
        ..LocalConfig::default()
    });
    let run = run_with(&allowed, get(format!("http://localhost:{port}/"))).await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["hit"]);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let run = run_with(&allowed, get("http://169.254.169.254/".to_owned())).await;
    refusal(&run);

    // A worker that gives runs no network makes no request at all.
    let closed = LocalExecutor::new(LocalConfig {
        http_policy: allowing("127.0.0.0/8"),
        allow_network: false,
        ..LocalConfig::default()
    });
    let run = run_with(&closed, get(format!("http://{addr}/"))).await;
    assert!(refusal(&run).contains("does not give runs a network"));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "nothing more reached the server"
    );
}

#[tokio::test]
async fn http_redirects_to_internal_addresses_are_refused() {
    use std::sync::atomic::Ordering;
    // The job's target (127.0.0.2) is allowed; the address it redirects to (127.0.0.1) is not.
    let (front, front_hits) = counting_server("127.0.0.2").await;
    let (inner, inner_hits) = counting_server("127.0.0.1").await;
    let executor = LocalExecutor::new(LocalConfig {
        http_policy: allowing("127.0.0.2/32"),
        ..LocalConfig::default()
    });
    for to in [
        format!("http://{inner}/secret"),
        format!("http://localhost:{}/secret", inner.port()),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
    ] {
        let url = format!("http://{front}/go?to={to}");
        let run = run_with(&executor, RunSpec::http(HttpRequestSpec::new("GET", url))).await;
        let reason = refusal(&run);
        assert!(reason.contains("refused"), "{reason}");
    }
    assert_eq!(
        front_hits.load(Ordering::SeqCst),
        3,
        "the allowed host was asked"
    );
    assert_eq!(
        inner_hits.load(Ordering::SeqCst),
        0,
        "no redirect was followed"
    );

    // With the inner address allowed too, the same redirect is followed.
    let open = LocalExecutor::new(LocalConfig {
        http_policy: allowing("127.0.0.0/8"),
        ..LocalConfig::default()
    });
    let url = format!("http://{front}/go?to=http://{inner}/secret");
    let run = run_with(&open, RunSpec::http(HttpRequestSpec::new("GET", url))).await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["hit"]);
    assert_eq!(inner_hits.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Types

#[test]
fn runtime_names_round_trip() {
    for runtime in Runtime::ALL {
        let json = serde_json::to_string(&runtime).expect("serialize");
        assert_eq!(json, format!("\"{}\"", runtime.as_str()));
        let back: Runtime = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, runtime);
        assert_eq!(runtime.as_str().parse::<Runtime>().expect("parse"), runtime);
    }
    assert!("perl".parse::<Runtime>().is_err());
    let req: HttpRequestSpec =
        serde_json::from_str(r#"{"url": "http://x/", "body": {"k": true}}"#).expect("request");
    assert_eq!(req.method, "GET");
    assert!(req.headers.is_empty());
}

#[test]
fn debug_output_hides_secrets() {
    let mut request = HttpRequestSpec::new("POST", "http://x/");
    request
        .headers
        .insert("Authorization".into(), "Bearer hunter2".into());
    request.body = Some(serde_json::json!({"password": "hunter2"}));
    let spec = RunSpec::http(request).with_env("TOKEN", "hunter2");
    let debug = format!("{spec:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("TOKEN") && debug.contains("Authorization"));
}

#[test]
fn executor_is_object_safe_and_named() {
    let executor: Arc<dyn Executor> = Arc::new(LocalExecutor::default());
    assert_eq!(executor.name(), "local");
    assert!(Runtime::ALL.into_iter().all(|r| executor.supports(r)));
}
