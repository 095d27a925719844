//! Tests of the container executor against the real Docker engine, with the default runtime
//! image built by `deploy/images/build` (run once, here, when the image is missing: about two
//! minutes the first time, well under a second after).
//!
//! Every test uses its own worker id, so tests running in parallel never see each other's
//! containers, checks at its end that no container of its worker id is left, and removes any
//! that are (in a drop guard, so a failing test cleans up too).
//!
//! Executors keep pre-started spare containers by default: each harness starts the spares of
//! the default images and waits for them, so that most runs here take the warm path (a run
//! in a spare, through an exec); a run with labels, or the first of a configuration, takes the
//! cold path. "No container left" is checked after the executor's `shutdown`, which removes
//! the spares.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use baton_worker::executor::container::{
    ContainerInfo, LABEL_JOB, LABEL_MANAGED, LABEL_SPARE, LABEL_WORKER,
};
use baton_worker::executor::{
    ContainerConfig, ContainerExecutor, ErrorKind, ExecError, ExecEvent, Executor, OutputStream,
    PullPolicy, ResourceLimits, RunOutcome, RunResult, RunSpec, Runtime, run_collect,
};
use baton_worker::rundir::{self, RunFiles};
use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder, StatsOptionsBuilder,
};
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The image every default runtime tag points at.
const BASE_IMAGE: &str = "baton/runtime:bookworm";

/// Upper bound for any single run in these tests.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds the default images once per test binary (quick when they exist).
fn ensure_images() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = repo_root().join("deploy/images/build");
        let started = Instant::now();
        let status = Command::new(&script)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(status.success(), "{} failed: {status}", script.display());
        eprintln!("deploy/images/build took {:?}", started.elapsed());
    });
}

async fn docker() -> Docker {
    Docker::connect_with_local_defaults()
        .expect("docker client")
        .negotiate_version()
        .await
        .expect("a Docker engine must be running for these tests")
}

/// One test's executor, with a worker id of its own.
struct Harness {
    executor: Arc<ContainerExecutor>,
    worker_id: String,
    docker: Docker,
}

impl Harness {
    async fn new() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(configure: impl FnOnce(&mut ContainerConfig)) -> Self {
        ensure_images();
        let worker_id = format!("test-{}", Uuid::now_v7());
        let mut config = ContainerConfig::new(worker_id.clone());
        config.pull_policy = PullPolicy::Never;
        configure(&mut config);
        let spares = config.spares * config.default_images.len();
        let executor = ContainerExecutor::connect(config)
            .await
            .expect("connect to the engine");
        executor.prewarm();
        let h = Harness {
            executor: Arc::new(executor),
            worker_id,
            docker: docker().await,
        };
        h.wait_idle(spares).await;
        h
    }

    /// Waits (bounded) until this executor has `n` spares ready.
    async fn wait_idle(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.executor.spare_stats().idle != n {
            assert!(
                Instant::now() < deadline,
                "expected {n} spares, have {:?}",
                self.executor.spare_stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// This worker's containers as the executor sees them, without the idle spares.
    async fn busy(&self) -> Vec<ContainerInfo> {
        self.executor
            .containers()
            .await
            .expect("list containers")
            .into_iter()
            .filter(|c| !(c.spare && c.job_id.is_none()))
            .collect()
    }

    /// The idle spares' ids.
    async fn idle(&self) -> HashSet<String> {
        self.executor
            .containers()
            .await
            .expect("list containers")
            .into_iter()
            .filter(|c| c.spare && c.job_id.is_none())
            .map(|c| c.id)
            .collect()
    }

    async fn run(&self, spec: RunSpec) -> Run {
        let (outcome, events) = tokio::time::timeout(
            RUN_DEADLINE,
            run_collect(self.executor.as_ref(), spec, CancellationToken::new()),
        )
        .await
        .expect("run did not finish within the test deadline");
        Run { outcome, events }
    }

    /// Containers with this harness's worker label, straight from the engine.
    async fn leftovers(&self) -> Vec<String> {
        let mut filters = HashMap::new();
        filters.insert("label", vec![format!("{LABEL_WORKER}={}", self.worker_id)]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        self.docker
            .list_containers(Some(options))
            .await
            .expect("list containers")
            .into_iter()
            .filter_map(|c| c.id)
            .collect()
    }

    /// Removes the spares (the executor's `shutdown`), then checks nothing is left.
    async fn assert_clean(&self) {
        self.executor.shutdown().await;
        let left = self.leftovers().await;
        assert!(left.is_empty(), "containers left behind: {left:?}");
    }

    /// Waits (bounded) until the container of this worker's only run is there, and returns
    /// its id.
    /// The running job's container as the engine describes it. A spare taken for the run may
    /// turn out unusable and be replaced by a fresh container (the cold path): a container
    /// gone by the time it is inspected is looked up again.
    async fn inspect_running(&self) -> bollard::models::ContainerInspectResponse {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let id = self.running_container().await;
            match self.docker.inspect_container(&id, None).await {
                Ok(info) => return info,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("inspect {id}: {e}"),
            }
        }
    }

    async fn running_container(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.busy().await.into_iter().find(|c| c.job_id.is_some()) {
                return c.id;
            }
            assert!(Instant::now() < deadline, "no container appeared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Runs even when the test failed: remove whatever this worker id left.
        let worker_id = self.worker_id.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let docker = docker().await;
                let mut filters = HashMap::new();
                filters.insert("label", vec![format!("{LABEL_WORKER}={worker_id}")]);
                let options = ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build();
                for c in docker
                    .list_containers(Some(options))
                    .await
                    .unwrap_or_default()
                {
                    if let Some(id) = c.id {
                        eprintln!("cleanup: removing leftover container {id}");
                        let rm = RemoveContainerOptionsBuilder::new()
                            .force(true)
                            .v(true)
                            .build();
                        let _ = docker.remove_container(&id, Some(rm)).await;
                    }
                }
            });
        })
        .join();
    }
}

struct Run {
    outcome: RunOutcome,
    events: Vec<ExecEvent>,
}

impl Run {
    fn lines(&self, which: OutputStream) -> Vec<String> {
        lines_of(&self.events, which)
    }
    fn stdout(&self) -> Vec<String> {
        self.lines(OutputStream::Stdout)
    }
    fn stderr(&self) -> Vec<String> {
        self.lines(OutputStream::Stderr)
    }
}

fn lines_of(events: &[ExecEvent], which: OutputStream) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            ExecEvent::Line { stream, text } if *stream == which => Some(text.clone()),
            _ => None,
        })
        .collect()
}

#[track_caller]
fn assert_succeeded(run: &Run) {
    assert!(
        run.outcome.succeeded(),
        "expected success, got {:?} ({}); stdout: {:?}; stderr: {:?}",
        run.outcome,
        run.outcome.summary(),
        run.stdout().iter().take(20).collect::<Vec<_>>(),
        run.stderr().iter().take(20).collect::<Vec<_>>()
    );
}

/// A prepared `$BATON_DIR` in a temp dir (removed on drop).
struct RunDir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

fn run_dir(files: &RunFiles) -> RunDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("run");
    rundir::prepare(&path, files).expect("prepare run dir");
    RunDir { _tmp: tmp, path }
}

fn event_json(runtime: Runtime) -> serde_json::Value {
    serde_json::json!({"job_id": null, "attempt": 1, "runtime": runtime.as_str(), "executor": "container"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runtime_runs_with_the_helpers() {
    let h = Harness::new().await;
    let cases: Vec<(Runtime, RunSpec)> = vec![
        (
            Runtime::Bash,
            RunSpec::script(
                Runtime::Bash,
                "source baton.sh\necho \"hello from bash ${BASH_VERSION%%.*}\"\nbaton_progress 40\nbaton_output '{\"from\": \"bash\"}'\n",
            ),
        ),
        (
            Runtime::Sh,
            RunSpec::script(
                Runtime::Sh,
                ". baton.sh\necho \"hello from sh\"\nbaton_output '{\"from\": \"sh\"}'\n",
            ),
        ),
        (
            Runtime::Python,
            RunSpec::script(
                Runtime::Python,
                "import sys, baton\nprint('hello from python', sys.version_info[0])\nbaton.progress(40)\nbaton.output({'from': 'python'})\n",
            ),
        ),
        (
            Runtime::Node,
            RunSpec::script(
                Runtime::Node,
                "const baton = require('baton');\nconsole.log('hello from node', process.version.split('.')[0]);\nbaton.output({from: 'node'});\n",
            ),
        ),
        (
            Runtime::Exec,
            RunSpec::exec([
                "python3",
                "-c",
                "import baton; print('hello from exec'); baton.output({'from': 'exec'})",
            ]),
        ),
    ];
    for (runtime, spec) in cases {
        let dir = run_dir(&RunFiles {
            event: event_json(runtime),
            ..RunFiles::default()
        });
        let spec = RunSpec {
            run_dir: Some(dir.path.clone()),
            ..spec
        };
        let run = h.run(spec).await;
        assert_succeeded(&run);
        assert!(
            matches!(run.events.first(), Some(ExecEvent::Started { .. })),
            "{runtime}: Started must come first"
        );
        let stdout = run.stdout();
        assert!(
            stdout.iter().any(|l| l.starts_with("hello from ")),
            "{runtime}: {stdout:?}"
        );
        if matches!(runtime, Runtime::Bash | Runtime::Python) {
            assert!(
                run.events.contains(&ExecEvent::Progress(40)),
                "{runtime}: no progress event"
            );
        }
        let collected = rundir::collect(&dir.path, 1 << 20);
        assert!(collected.problems.is_empty(), "{:?}", collected.problems);
        let output: serde_json::Value =
            serde_json::from_str(collected.output_json.as_deref().expect("output collected"))
                .expect("json");
        assert_eq!(output["from"], runtime.as_str(), "{runtime}");
    }
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_input_variables_and_outputs_round_trip() {
    let h = Harness::new().await;
    let job_id = Uuid::now_v7();
    let dir = run_dir(&RunFiles {
        input_json: r#"{"count": 21}"#.to_owned(),
        event: event_json(Runtime::Python),
        variables: BTreeMap::from([("greeting".to_owned(), b"hello".to_vec())]),
    });
    let script = r#"
import os, baton
print("FOO=" + os.environ["FOO"])
print("SPACED=" + os.environ["SPACED"])
print("BATON_DIR=" + os.environ["BATON_DIR"])
print("BATON_JOB_ID=" + os.environ["BATON_JOB_ID"])
print("PWD=" + os.getcwd())
print("HOME=" + os.environ["HOME"])
data = baton.input()
print("greeting=" + baton.get_variable("greeting"))
baton.set_variable("last", "x" * 3)
baton.output({"double": data["count"] * 2})
baton.set_condition(True)
open("scratch.txt", "w").write("work dir is writable")
"#;
    let spec = RunSpec {
        run_dir: Some(dir.path.clone()),
        ..RunSpec::script(Runtime::Python, script)
            .with_job_id(job_id)
            .with_env("FOO", "bar")
            .with_env("SPACED", "a b  c")
    };
    let run = h.run(spec).await;
    assert_succeeded(&run);
    let stdout = run.stdout();
    for expected in [
        "FOO=bar".to_owned(),
        "SPACED=a b  c".to_owned(),
        "BATON_DIR=/baton/run".to_owned(),
        format!("BATON_JOB_ID={job_id}"),
        "PWD=/baton/work".to_owned(),
        "HOME=/baton/work".to_owned(),
        "greeting=hello".to_owned(),
    ] {
        assert!(
            stdout.contains(&expected),
            "missing {expected:?} in {stdout:?}"
        );
    }
    let collected = rundir::collect(&dir.path, 1 << 20);
    assert!(collected.problems.is_empty(), "{:?}", collected.problems);
    assert_eq!(collected.output_json.as_deref(), Some(r#"{"double": 42}"#));
    assert_eq!(collected.condition, Some(true));
    assert_eq!(
        collected.variables.get("last").map(String::as_str),
        Some("xxx")
    );
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_stderr() {
    let h = Harness::new().await;
    let run = h
        .run(RunSpec::script(
            Runtime::Bash,
            "echo out; echo err >&2; exit 3",
        ))
        .await;
    assert_eq!(run.outcome.exit_code, Some(3));
    assert_eq!(run.outcome.signal, None);
    assert!(run.outcome.error.is_none(), "{:?}", run.outcome.error);
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
    assert_eq!(run.stdout(), vec!["out"]);
    assert_eq!(run.stderr(), vec!["err"]);

    let run = h.run(RunSpec::exec(["sh", "-c", "exit 0"])).await;
    assert_succeeded(&run);
    assert_eq!(run.outcome.exit_code, Some(0));

    // A last line without a newline is still emitted.
    let run = h
        .run(RunSpec::script(Runtime::Sh, "printf 'no newline'"))
        .await;
    assert_eq!(run.stdout(), vec!["no newline"]);

    // A run that writes no out/ directory: nothing to collect, and no error.
    let dir = run_dir(&RunFiles {
        event: event_json(Runtime::Sh),
        ..RunFiles::default()
    });
    let run = h
        .run(RunSpec {
            run_dir: Some(dir.path.clone()),
            ..RunSpec::script(Runtime::Sh, "ls \"$BATON_DIR\"")
        })
        .await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["event.json", "vars"]);
    assert!(!dir.path.join("out").exists());
    let collected = rundir::collect(&dir.path, 1 << 20);
    assert_eq!(collected, rundir::Collected::default());
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failures_and_invalid_specs() {
    let h = Harness::with(|c| c.node = "no-such-node".into()).await;
    let run = h.run(RunSpec::exec(["no-such-program", "x"])).await;
    match &run.outcome.error {
        Some(ExecError::StartFailed { reason }) => {
            assert!(reason.contains("no-such-program"), "{reason}")
        }
        other => panic!("expected a start failure, got {other:?}"),
    }
    assert_eq!(
        run.outcome.result(),
        RunResult::Failed(ErrorKind::Infrastructure)
    );

    // A missing interpreter in the image.
    let run = h
        .run(RunSpec::script(Runtime::Node, "console.log(1)"))
        .await;
    match &run.outcome.error {
        Some(ExecError::StartFailed { reason }) => {
            assert!(reason.contains("no-such-node"), "{reason}")
        }
        other => panic!("expected a start failure, got {other:?}"),
    }

    for spec in [
        RunSpec {
            content: None,
            ..RunSpec::script(Runtime::Bash, "")
        },
        RunSpec::exec(Vec::<String>::new()),
        RunSpec::script(Runtime::Sh, "true").with_env("BAD=KEY", "x"),
    ] {
        let run = h.run(spec).await;
        assert!(
            matches!(run.outcome.error, Some(ExecError::InvalidSpec { .. })),
            "{:?}",
            run.outcome
        );
        assert!(
            !run.events
                .iter()
                .any(|e| matches!(e, ExecEvent::Started { .. }))
        );
    }
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_megabytes_of_output_arrive_complete_and_in_order() {
    let h = Harness::new().await;
    // 100,000 lines of 50 bytes (with the newline) on stdout, and a few on stderr.
    let script = r#"
import sys
w = sys.stdout.write
for i in range(100000):
    w("%08d %s\n" % (i, "x" * 40))
    if i % 25000 == 0:
        print("marker %d" % i, file=sys.stderr)
"#;
    let started = Instant::now();
    let run = h.run(RunSpec::script(Runtime::Python, script)).await;
    assert_succeeded(&run);
    let stdout = run.stdout();
    assert_eq!(stdout.len(), 100_000);
    for (i, line) in stdout.iter().enumerate() {
        assert_eq!(line.len(), 49, "line {i}: {line:?}");
        assert_eq!(&line[..8], format!("{i:08}"), "out of order at {i}");
    }
    assert_eq!(
        run.stderr(),
        vec!["marker 0", "marker 25000", "marker 50000", "marker 75000"]
    );
    eprintln!("5 MB run took {:?}", started.elapsed());

    // Lines longer than the cap (64 KiB) come in pieces.
    let run = h
        .run(RunSpec::script(
            Runtime::Python,
            "print('y' * 200000)\nprint('after')",
        ))
        .await;
    assert_succeeded(&run);
    let lens: Vec<usize> = run.stdout().iter().map(String::len).collect();
    assert_eq!(lens, vec![65536, 65536, 65536, 200000 - 3 * 65536, 5]);
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_stops_then_kills() {
    let h = Harness::new().await;
    // Dies of the SIGTERM.
    let started = Instant::now();
    let run = h
        .run(
            RunSpec::script(Runtime::Bash, "echo ready; sleep 60")
                .with_timeout(Duration::from_secs(2))
                .with_kill_grace(Duration::from_secs(5)),
        )
        .await;
    let took = started.elapsed();
    assert!(run.outcome.timed_out);
    assert!(matches!(
        run.outcome.error,
        Some(ExecError::TimedOut { .. })
    ));
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Timeout));
    assert_eq!(run.outcome.signal, Some(15), "{:?}", run.outcome);
    assert_eq!(run.stdout(), vec!["ready"]);
    assert!(took < Duration::from_secs(6), "took {took:?}");

    // Ignores SIGTERM: killed after the grace.
    let started = Instant::now();
    let run = h
        .run(
            RunSpec::script(
                Runtime::Bash,
                "trap '' TERM; echo ready; while true; do sleep 1; done",
            )
            .with_timeout(Duration::from_secs(2))
            .with_kill_grace(Duration::from_secs(1)),
        )
        .await;
    let took = started.elapsed();
    assert!(run.outcome.timed_out);
    assert_eq!(run.outcome.signal, Some(9), "{:?}", run.outcome);
    assert!(took >= Duration::from_secs(3), "took {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_run_at_once() {
    let h = Harness::new().await;
    let (tx, mut rx) = mpsc::channel(64);
    let cancel = CancellationToken::new();
    let spec = RunSpec::script(Runtime::Sh, "echo ready; sleep 60; echo never")
        .with_kill_grace(Duration::from_secs(2));
    let executor = Arc::clone(&h.executor);
    let token = cancel.clone();
    let run = tokio::spawn(async move { executor.run(spec, tx, token).await });
    let mut events = Vec::new();
    let mut cancelled_at = None;
    while let Some(event) = tokio::time::timeout(RUN_DEADLINE, rx.recv())
        .await
        .expect("events")
    {
        for event in event.into_single_lines() {
            if matches!(&event, ExecEvent::Line { text, .. } if text == "ready") {
                cancelled_at = Some(Instant::now());
                cancel.cancel();
            }
            events.push(event);
        }
    }
    let outcome = run.await.expect("run task");
    let cancelled_at = cancelled_at.expect("saw ready");
    assert!(outcome.cancelled);
    assert!(matches!(outcome.error, Some(ExecError::Cancelled)));
    assert_eq!(outcome.result(), RunResult::Failed(ErrorKind::Cancelled));
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        cancelled_at.elapsed()
    );
    assert!(!lines_of(&events, OutputStream::Stdout).contains(&"never".to_owned()));

    // Cancelled before it starts: no container at all.
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (outcome, events) = run_collect(
        h.executor.as_ref(),
        RunSpec::script(Runtime::Sh, "echo hi"),
        cancel,
    )
    .await;
    assert!(outcome.cancelled, "{outcome:?}");
    assert!(events.is_empty());
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_contained_by_the_pids_limit() {
    let h = Harness::new().await;
    // Deterministic: fork until the kernel refuses, then fail.
    let script = r#"
import os, sys, time
n = 0
try:
    while True:
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError as e:
    print("fork refused after %d children: %s" % (n, e.strerror))
    sys.exit(1)
"#;
    let run = h.run(RunSpec::script(Runtime::Python, script)).await;
    assert_eq!(run.outcome.exit_code, Some(1), "{:?}", run.outcome);
    let line = run
        .stdout()
        .into_iter()
        .find(|l| l.starts_with("fork refused after"))
        .expect("the fork was refused");
    let n: u32 = line
        .split_whitespace()
        .nth(3)
        .expect("count")
        .parse()
        .expect("number");
    assert!(n < 256, "{line}");

    // The classic bomb, stopped by the timeout; meanwhile the container stays within its
    // pids limit and the host can still start processes.
    let executor = Arc::clone(&h.executor);
    let bomb = tokio::spawn(async move {
        run_collect(
            executor.as_ref(),
            RunSpec::script(Runtime::Bash, "bomb() { bomb | bomb & }; bomb; sleep 60")
                .with_timeout(Duration::from_secs(8))
                .with_kill_grace(Duration::from_secs(1)),
            CancellationToken::new(),
        )
        .await
    });
    let id = h.running_container().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = h
        .docker
        .stats(&id, Some(StatsOptionsBuilder::new().stream(false).build()))
        .next()
        .await
        .expect("stats")
        .expect("stats ok");
    let pids = stats
        .pids_stats
        .and_then(|p| p.current)
        .expect("pids count");
    assert!(pids <= 256, "{pids} processes in the container");
    let status = Command::new("true")
        .status()
        .expect("the host can still fork");
    assert!(status.success());
    let (outcome, _events) = tokio::time::timeout(RUN_DEADLINE, bomb)
        .await
        .expect("bomb run ends")
        .expect("task");
    assert!(outcome.timed_out, "{outcome:?}");
    assert!(!outcome.succeeded());
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_fails_for_memory() {
    let h = Harness::new().await;
    let script = "a = []\nwhile True:\n    a.append(bytearray(1 << 20))\n";
    let spec = RunSpec::script(Runtime::Python, script).with_limits(ResourceLimits {
        memory_mib: Some(64),
        ..ResourceLimits::default()
    });
    let spec_again = spec.clone();
    let run = h.run(spec).await;
    assert!(
        matches!(
            run.outcome.error,
            Some(ExecError::OutOfMemory {
                limit_mib: Some(64)
            })
        ),
        "{:?}",
        run.outcome
    );
    assert_eq!(run.outcome.result(), RunResult::Failed(ErrorKind::Script));
    let summary = run.outcome.summary();
    assert!(
        summary.contains("out-of-memory") && summary.contains("64 MiB"),
        "{summary}"
    );
    // That run's configuration was new (cold path); now it has a spare: the same in one.
    let idle = h.executor.config().default_images.len() + 1;
    h.wait_idle(idle).await;
    let warm = h.executor.spare_stats().warm_runs;
    let run = h.run(spec_again).await;
    assert_eq!(h.executor.spare_stats().warm_runs, warm + 1);
    assert!(
        matches!(
            run.outcome.error,
            Some(ExecError::OutOfMemory {
                limit_mib: Some(64)
            })
        ),
        "{:?}",
        run.outcome
    );
    h.assert_clean().await;
}

/// A script filling its run's files: `$HOME` and `$BATON_DIR` (the run's volume) with a
/// `work_mib` of 16. 8 MiB fit; 32 MiB do not, in either directory; an output written first
/// still arrives. The run fails with the script's own error (the last `dd`).
const FILL_SCRIPT: &str = r#"
df -m "$HOME" | tail -1 | awk '{print "work=" $2}'
stat -c 'owner=%u:%g mode=%a' "$HOME"
mkdir -p "$BATON_DIR/out"
printf '{"written": "before the fill"}' > "$BATON_DIR/out/output.json"
dd if=/dev/zero of="$HOME/small" bs=1M count=8 2>/dev/null && echo "below the limit: ok"
rm -f "$HOME/small"
dd if=/dev/zero of="$BATON_DIR/out/fill" bs=1M count=32 2>/dev/null || echo "run dir: full"
rm -f "$BATON_DIR/out/fill"
dd if=/dev/zero of="$HOME/big" bs=1M count=32
"#;

fn fill_spec(dir: &RunDir) -> RunSpec {
    RunSpec {
        run_dir: Some(dir.path.clone()),
        ..RunSpec::script(Runtime::Bash, FILL_SCRIPT).with_limits(ResourceLimits {
            work_mib: Some(16),
            ..ResourceLimits::default()
        })
    }
}

#[track_caller]
fn assert_filled_to_the_limit(run: &Run, dir: &RunDir, path: &str, run_dir_bounded: bool) {
    let stdout = run.stdout();
    let mut expected = vec![
        "work=16",
        "owner=10001:10001 mode=700",
        "below the limit: ok",
    ];
    if run_dir_bounded {
        expected.push("run dir: full");
    }
    for expected in expected {
        assert!(
            stdout.iter().any(|l| l == expected),
            "{path}: missing {expected:?} in {stdout:?}"
        );
    }
    assert_eq!(run.outcome.exit_code, Some(1), "{path}: {:?}", run.outcome);
    assert_eq!(
        run.outcome.result(),
        RunResult::Failed(ErrorKind::Script),
        "{path}"
    );
    let stderr = run.stderr();
    assert!(
        stderr.iter().any(|l| l.contains("No space left on device")),
        "{path}: {stderr:?}"
    );
    let collected = rundir::collect(&dir.path, 1 << 20);
    assert_eq!(
        collected.output_json.as_deref(),
        Some(r#"{"written": "before the fill"}"#),
        "{path}: {:?}",
        collected.problems
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_the_run_volume_stops_at_its_limit() {
    let h = Harness::new().await;
    let files = RunFiles {
        input_json: "{}".to_owned(),
        event: event_json(Runtime::Bash),
        variables: BTreeMap::new(),
    };
    let (cold_dir, warm_dir) = (run_dir(&files), run_dir(&files));
    let warm = h.executor.spare_stats().warm_runs;
    let run = h.run(fill_spec(&cold_dir)).await;
    // A configuration with its own limits is new: the cold path.
    assert_eq!(h.executor.spare_stats().warm_runs, warm);
    assert_filled_to_the_limit(&run, &cold_dir, "cold", true);
    // Now that configuration has a spare: the same in one.
    let idle = h.executor.config().default_images.len() + 1;
    h.wait_idle(idle).await;
    let run = h.run(fill_spec(&warm_dir)).await;
    assert_eq!(h.executor.spare_stats().warm_runs, warm + 1);
    assert_filled_to_the_limit(&run, &warm_dir, "spare", true);
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_without_cat_still_has_a_bounded_work_dir() {
    let h = Harness::with(|c| c.spares = 0).await;
    // An image that cannot idle (no `cat`): made locally by deleting it and committing.
    let tag = format!("nocat-{}", Uuid::now_v7().simple());
    let image = format!("baton-test/own:{tag}");
    let labels = HashMap::from([(LABEL_WORKER.to_owned(), h.worker_id.clone())]);
    let base = h
        .docker
        .create_container(
            Some(CreateContainerOptionsBuilder::new().build()),
            ContainerCreateBody {
                image: Some(BASE_IMAGE.to_owned()),
                user: Some("0:0".to_owned()),
                entrypoint: Some(Vec::new()),
                cmd: Some(vec!["rm".to_owned(), "/usr/bin/cat".to_owned()]),
                labels: Some(labels),
                ..ContainerCreateBody::default()
            },
        )
        .await
        .expect("create base container");
    h.docker
        .start_container(&base.id, None)
        .await
        .expect("start base container");
    let exit = h
        .docker
        .wait_container(&base.id, None)
        .next()
        .await
        .expect("wait")
        .expect("rm ran");
    assert_eq!(exit.status_code, 0);
    h.docker
        .commit_container(
            CommitContainerOptionsBuilder::new()
                .container(&base.id)
                .repo("baton-test/own")
                .tag(&tag)
                .build(),
            bollard::models::ContainerConfig::default(),
        )
        .await
        .expect("commit");
    h.docker
        .remove_container(
            &base.id,
            Some(RemoveContainerOptionsBuilder::new().v(true).build()),
        )
        .await
        .expect("remove base container");

    let files = RunFiles {
        input_json: "{}".to_owned(),
        event: event_json(Runtime::Bash),
        variables: BTreeMap::new(),
    };
    let dir = run_dir(&files);
    let run = h.run(fill_spec(&dir).with_image(image.clone())).await;
    // The next run of that image goes straight to that path (the image is remembered).
    let dir_again = run_dir(&files);
    let run_again = h.run(fill_spec(&dir_again).with_image(image.clone())).await;
    let _ = h
        .docker
        .remove_image(
            &image,
            Some(RemoveImageOptionsBuilder::new().force(true).build()),
            None,
        )
        .await;
    // Its files are uploaded before the start: the volume is on the engine's disk, the
    // working directory a tmpfs of `work_mib` over it.
    assert_filled_to_the_limit(&run, &dir, "no cat", false);
    assert_filled_to_the_limit(&run_again, &dir_again, "no cat, again", false);
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_runs_keep_to_the_network_settings_and_the_address_policy() {
    // A server the runs would reach if nothing stopped them.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(|| async { "reached" });
        axum::serve(listener, app).await.expect("serve");
    });
    let request = || {
        RunSpec::http(baton_worker::executor::HttpRequestSpec::new(
            "GET",
            format!("http://{addr}/"),
        ))
    };
    let refused = |run: &Run, needle: &str| match &run.outcome.error {
        Some(ExecError::HttpRefused { reason }) => {
            assert!(reason.contains(needle), "{reason:?} should say {needle:?}")
        }
        other => panic!("expected a refusal ({needle}), got {other:?}"),
    };
    let open = Harness::with(|c| {
        c.spares = 0;
        c.http_policy = "127.0.0.0/8".parse().expect("cidr");
    })
    .await;
    // Network none (the event's default): the worker does not make the request for it.
    refused(&open.run(request()).await, "no network");
    // Asked for and allowed: it runs.
    let run = open.run(request().with_network(true)).await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["reached"]);
    // A worker that gives runs no network refuses.
    let strict = Harness::with(|c| {
        c.spares = 0;
        c.allow_network = false;
        c.http_policy = "127.0.0.0/8".parse().expect("cidr");
    })
    .await;
    refused(
        &strict.run(request().with_network(true)).await,
        "does not give runs a network",
    );
    // The default address policy refuses loopback.
    let default = Harness::with(|c| c.spares = 0).await;
    refused(&default.run(request().with_network(true)).await, "loopback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_unless_asked() {
    let h = Harness::new().await;
    let probe = r#"
import os, socket
print("interfaces=" + ",".join(sorted(os.listdir("/sys/class/net"))))
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect(("1.1.1.1", 53))
    print("egress=open")
except OSError as e:
    print("egress=blocked " + str(e))
"#;
    let run = h.run(RunSpec::script(Runtime::Python, probe)).await;
    assert_succeeded(&run);
    let stdout = run.stdout();
    assert!(stdout.contains(&"interfaces=lo".to_owned()), "{stdout:?}");
    assert!(
        stdout.iter().any(|l| l.starts_with("egress=blocked")),
        "{stdout:?}"
    );

    // Asked for: the run gets an interface besides loopback.
    let run = h
        .run(RunSpec::script(Runtime::Python, probe).with_network(true))
        .await;
    assert_succeeded(&run);
    let interfaces = run
        .stdout()
        .into_iter()
        .find_map(|l| l.strip_prefix("interfaces=").map(str::to_owned))
        .expect("interfaces");
    assert_ne!(interfaces, "lo");

    // A worker that gives no network refuses the run.
    let strict = Harness::with(|c| c.allow_network = false).await;
    let run = strict
        .run(RunSpec::script(Runtime::Sh, "true").with_network(true))
        .await;
    assert!(
        matches!(run.outcome.error, Some(ExecError::InvalidSpec { .. })),
        "{:?}",
        run.outcome
    );
    h.assert_clean().await;
    strict.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardened_by_default() {
    let h = Harness::new().await;
    let script = r#"
echo "uid=$(id -u) gid=$(id -g)"
grep -E '^(CapEff|CapPrm|NoNewPrivs):' /proc/self/status | tr -s '\t ' ' '
touch /etc/baton-test 2>/dev/null && echo "rootfs=writable" || echo "rootfs=read-only"
touch /baton/escape 2>/dev/null && echo "mount=writable" || echo "mount=read-only"
touch /baton/script.bash 2>/dev/null && echo "script=writable" || echo "script=read-only"
echo x > /tmp/t && echo "tmp=writable"
echo x > "$HOME/t" && echo "work=writable"
if [ -f /sys/fs/cgroup/pids/pids.max ]; then
  echo "pids=$(cat /sys/fs/cgroup/pids/pids.max)"
  echo "memory=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
  echo "cpu=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)/$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
else
  echo "pids=$(cat /sys/fs/cgroup/pids.max)"
  echo "memory=$(cat /sys/fs/cgroup/memory.max)"
  echo "cpu=$(cut -d' ' -f1 /sys/fs/cgroup/cpu.max)/$(cut -d' ' -f2 /sys/fs/cgroup/cpu.max)"
fi
echo ready
# Long enough to be inspected even on a loaded machine.
sleep 10
"#;
    let job_id = Uuid::now_v7();
    let spec = RunSpec::script(Runtime::Bash, script)
        .with_job_id(job_id)
        .with_label("baton.event_id", "e-1");
    let executor = Arc::clone(&h.executor);
    let run = tokio::spawn(async move {
        run_collect(executor.as_ref(), spec, CancellationToken::new()).await
    });
    // While it runs: what the engine says about the container.
    let info = h.inspect_running().await;
    let labels = info
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default();
    assert_eq!(labels.get(LABEL_WORKER), Some(&h.worker_id));
    assert_eq!(labels.get(LABEL_JOB), Some(&job_id.to_string()));
    assert_eq!(labels.get(LABEL_MANAGED).map(String::as_str), Some("true"));
    assert_eq!(
        labels.get("baton.event_id").map(String::as_str),
        Some("e-1")
    );
    let hc = info.host_config.expect("host config");
    assert_eq!(hc.readonly_rootfs, Some(true));
    assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(hc.network_mode.as_deref(), Some("none"));
    assert_eq!(hc.pids_limit, Some(256));
    assert_eq!(hc.memory, Some(512 << 20));
    assert_eq!(hc.nano_cpus, Some(1_000_000_000));
    assert!(
        hc.security_opt
            .unwrap_or_default()
            .iter()
            .any(|o| o.starts_with("no-new-privileges")),
    );
    let volumes: Vec<String> = info
        .mounts
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.destination.as_deref() == Some("/baton"))
        .filter_map(|m| m.name)
        .collect();
    assert_eq!(volumes.len(), 1, "one volume at /baton");

    let (outcome, events) = tokio::time::timeout(RUN_DEADLINE, run)
        .await
        .expect("run ends")
        .expect("task");
    let run = Run { outcome, events };
    assert_succeeded(&run);
    let stdout = run.stdout();
    for expected in [
        "uid=10001 gid=10001",
        "CapPrm: 0000000000000000",
        "CapEff: 0000000000000000",
        "NoNewPrivs: 1",
        "rootfs=read-only",
        "mount=read-only",
        "script=read-only",
        "tmp=writable",
        "work=writable",
        "pids=256",
        "memory=536870912",
        "cpu=100000/100000",
    ] {
        assert!(
            stdout.iter().any(|l| l == expected),
            "missing {expected:?} in {stdout:?}"
        );
    }
    // The run's volume went with its container.
    assert!(
        h.docker.inspect_volume(&volumes[0]).await.is_err(),
        "volume {} left behind",
        volumes[0]
    );
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_per_run_and_bounded_by_the_maximums() {
    let h = Harness::with(|c| {
        c.maximums = ResourceLimits {
            memory_mib: Some(1024),
            cpus: Some(2.0),
            pids: Some(512),
            tmp_mib: Some(128),
            work_mib: Some(512),
        };
    })
    .await;
    let script = r#"
if [ -f /sys/fs/cgroup/pids/pids.max ]; then
  echo "pids=$(cat /sys/fs/cgroup/pids/pids.max) memory=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
else
  echo "pids=$(cat /sys/fs/cgroup/pids.max) memory=$(cat /sys/fs/cgroup/memory.max)"
fi
df -m /tmp | tail -1 | awk '{print "tmp=" $2}'
df -m "$HOME" | tail -1 | awk '{print "work=" $2}'
"#;
    let asked = ResourceLimits {
        memory_mib: Some(128),
        cpus: Some(0.5),
        pids: Some(100),
        tmp_mib: Some(16),
        work_mib: Some(24),
    };
    let run = h
        .run(RunSpec::script(Runtime::Sh, script).with_limits(asked))
        .await;
    assert_succeeded(&run);
    let stdout = run.stdout();
    assert!(
        stdout.contains(&format!("pids=100 memory={}", 128 << 20)),
        "{stdout:?}"
    );
    assert!(stdout.contains(&"tmp=16".to_owned()), "{stdout:?}");
    assert!(stdout.contains(&"work=24".to_owned()), "{stdout:?}");

    for too_much in [
        ResourceLimits {
            memory_mib: Some(2048),
            ..ResourceLimits::default()
        },
        ResourceLimits {
            cpus: Some(3.0),
            ..ResourceLimits::default()
        },
        ResourceLimits {
            pids: Some(1000),
            ..ResourceLimits::default()
        },
        ResourceLimits {
            tmp_mib: Some(512),
            ..ResourceLimits::default()
        },
        ResourceLimits {
            work_mib: Some(1024),
            ..ResourceLimits::default()
        },
    ] {
        let run = h
            .run(RunSpec::script(Runtime::Sh, "true").with_limits(too_much))
            .await;
        match &run.outcome.error {
            Some(ExecError::InvalidSpec { reason }) => {
                assert!(reason.contains("maximum"), "{reason}")
            }
            other => panic!("expected a refusal for {too_much:?}, got {other:?}"),
        }
    }

    // Defaults above the maximums are a configuration error.
    let mut config = ContainerConfig::new("test-bad-config");
    config.maximums.memory_mib = Some(100);
    let err = ContainerExecutor::connect(config)
        .await
        .expect_err("defaults over the maximums");
    assert!(err.to_string().contains("maximum"), "{err}");
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_naming_it() {
    // Pull policy never.
    let h = Harness::new().await;
    let run = h
        .run(RunSpec::script(Runtime::Sh, "true").with_image("baton/no-such-image:1"))
        .await;
    match &run.outcome.error {
        Some(ExecError::StartFailed { reason }) => {
            assert!(reason.contains("`baton/no-such-image:1`"), "{reason}");
            assert!(reason.contains("never"), "{reason}");
        }
        other => panic!("expected a start failure, got {other:?}"),
    }
    assert_eq!(
        run.outcome.result(),
        RunResult::Failed(ErrorKind::Infrastructure)
    );

    // If-not-present: the pull is tried and fails (nothing listens on that registry).
    let pulling = Harness::with(|c| c.pull_policy = PullPolicy::IfNotPresent).await;
    let started = Instant::now();
    let run = pulling
        .run(RunSpec::script(Runtime::Sh, "true").with_image("127.0.0.1:9/baton/missing:1"))
        .await;
    match &run.outcome.error {
        Some(ExecError::StartFailed { reason }) => {
            assert!(reason.contains("`127.0.0.1:9/baton/missing:1`"), "{reason}");
            assert!(reason.contains("could not be pulled"), "{reason}");
        }
        other => panic!("expected a start failure, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(60));

    // Image overrides can be turned off.
    let fixed = Harness::with(|c| c.allow_image_override = false).await;
    let run = fixed
        .run(RunSpec::script(Runtime::Sh, "true").with_image(BASE_IMAGE))
        .await;
    assert!(
        matches!(run.outcome.error, Some(ExecError::InvalidSpec { .. })),
        "{:?}",
        run.outcome
    );
    h.assert_clean().await;
    pulling.assert_clean().await;
    fixed.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_own_image_with_an_entrypoint_runs_the_script() {
    let h = Harness::new().await;
    // An image whose ENTRYPOINT would swallow the command, made locally with a commit.
    let tag = format!("entrypoint-{}", Uuid::now_v7().simple());
    let image = format!("baton-test/own:{tag}");
    let labels = HashMap::from([(LABEL_WORKER.to_owned(), h.worker_id.clone())]);
    let base = h
        .docker
        .create_container(
            Some(CreateContainerOptionsBuilder::new().build()),
            ContainerCreateBody {
                image: Some(BASE_IMAGE.to_owned()),
                labels: Some(labels),
                ..ContainerCreateBody::default()
            },
        )
        .await
        .expect("create base container");
    h.docker
        .commit_container(
            CommitContainerOptionsBuilder::new()
                .container(&base.id)
                .repo("baton-test/own")
                .tag(&tag)
                .changes("ENTRYPOINT [\"/bin/false\"]")
                .build(),
            bollard::models::ContainerConfig::default(),
        )
        .await
        .expect("commit");
    h.docker
        .remove_container(
            &base.id,
            Some(RemoveContainerOptionsBuilder::new().v(true).build()),
        )
        .await
        .expect("remove base container");

    let run = h
        .run(RunSpec::script(Runtime::Bash, "echo own image").with_image(image.clone()))
        .await;
    let _ = h
        .docker
        .remove_image(
            &image,
            Some(RemoveImageOptionsBuilder::new().force(true).build()),
            None,
        )
        .await;
    assert_succeeded(&run);
    assert_eq!(run.stdout(), vec!["own image"]);
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_removes_only_this_workers_orphans() {
    let h = Harness::new().await;
    let other = Harness::with(|c| c.spares = 0).await;
    let create = |worker: String, job: Uuid| {
        let docker = h.docker.clone();
        async move {
            docker
                .create_container(
                    Some(CreateContainerOptionsBuilder::new().build()),
                    ContainerCreateBody {
                        image: Some(BASE_IMAGE.to_owned()),
                        cmd: Some(vec!["true".to_owned()]),
                        labels: Some(HashMap::from([
                            (LABEL_WORKER.to_owned(), worker),
                            (LABEL_JOB.to_owned(), job.to_string()),
                        ])),
                        ..ContainerCreateBody::default()
                    },
                )
                .await
                .expect("create")
                .id
        }
    };
    let orphan_job = Uuid::now_v7();
    let live_job = Uuid::now_v7();
    let orphan = create(h.worker_id.clone(), orphan_job).await;
    let live = create(h.worker_id.clone(), live_job).await;
    let foreign = create(other.worker_id.clone(), orphan_job).await;

    // A run in progress is never reaped, even when the caller does not list it.
    let executor = Arc::clone(&h.executor);
    let running = tokio::spawn(async move {
        run_collect(
            executor.as_ref(),
            RunSpec::script(Runtime::Sh, "sleep 3; echo survived"),
            CancellationToken::new(),
        )
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.busy().await.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the run's container did not appear"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let removed = h
        .executor
        .reap_orphans(&HashSet::from([live_job]))
        .await
        .expect("reap");
    // The idle spares are this executor's: never orphans.
    assert_eq!(removed, 1);
    let mine: Vec<String> = h.leftovers().await;
    assert!(!mine.contains(&orphan));
    assert!(mine.contains(&live));
    assert_eq!(other.leftovers().await, vec![foreign.clone()]);

    let (outcome, events) = running.await.expect("task");
    assert!(outcome.succeeded(), "{outcome:?}");
    assert_eq!(lines_of(&events, OutputStream::Stdout), vec!["survived"]);

    // The periodic reaper: with no live jobs given, `live` is an orphan now.
    let cancel = CancellationToken::new();
    let reaper = h
        .executor
        .spawn_reaper(Duration::from_secs(3600), cancel.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !h.busy().await.is_empty() {
        assert!(Instant::now() < deadline, "the reaper did not run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    reaper.await.expect("reaper task");
    // The other worker's container was never touched.
    assert_eq!(other.leftovers().await, vec![foreign]);
    h.assert_clean().await;
    // `other`'s drop guard removes `foreign`.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_run_leaves_no_container() {
    let h = Harness::new().await;
    let (tx, mut rx) = mpsc::channel(16);
    let executor = Arc::clone(&h.executor);
    let run = tokio::spawn(async move {
        executor
            .run(
                RunSpec::script(Runtime::Sh, "echo ready; sleep 60"),
                tx,
                CancellationToken::new(),
            )
            .await
    });
    loop {
        match tokio::time::timeout(RUN_DEADLINE, rx.recv()).await {
            Ok(Some(event))
                if event
                    .clone()
                    .into_single_lines()
                    .iter()
                    .any(|e| matches!(e, ExecEvent::Line { text, .. } if text == "ready")) =>
            {
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no ready line: {other:?}"),
        }
    }
    let id = h.running_container().await;
    assert_eq!(h.busy().await.len(), 1);
    run.abort();
    let _ = run.await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.leftovers().await.contains(&id) {
        assert!(
            Instant::now() < deadline,
            "the abandoned run's container was not removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_fails_clearly_without_an_engine() {
    let mut config = ContainerConfig::new("test-no-engine");
    config.docker_host = Some("unix:///nonexistent/docker.sock".to_owned());
    let err = ContainerExecutor::connect(config)
        .await
        .expect_err("no engine there");
    let text = err.to_string();
    assert!(
        text.contains("no Docker engine answers at unix:///nonexistent/docker.sock"),
        "{text}"
    );
    assert!(matches!(err, ExecError::StartFailed { .. }));

    let mut config = ContainerConfig::new("test-bad-user");
    config.user = "nobody".to_owned();
    let err = ContainerExecutor::connect(config)
        .await
        .expect_err("user must be numeric");
    assert!(err.to_string().contains("numeric"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_uses_a_prestarted_spare_and_a_replacement_appears() {
    let h = Harness::new().await;
    let images = h.executor.config().default_images.len();
    let before = h.idle().await;
    assert_eq!(before.len(), images);
    let stats = h.executor.spare_stats();
    assert_eq!((stats.warm_runs, stats.cold_runs), (0, 0));
    // The spares are labelled as such, carry no job id, and are hardened like any run's
    // container.
    let spare = before.iter().next().expect("a spare");
    let info = h
        .docker
        .inspect_container(spare, None)
        .await
        .expect("inspect");
    let labels = info
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default();
    assert_eq!(labels.get(LABEL_WORKER), Some(&h.worker_id));
    assert_eq!(labels.get(LABEL_SPARE).map(String::as_str), Some("1"));
    assert_eq!(labels.get(LABEL_JOB), None);
    let hc = info.host_config.expect("host config");
    assert_eq!(hc.readonly_rootfs, Some(true));
    assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(hc.network_mode.as_deref(), Some("none"));

    // The run, in a spare: hardened, its limits, its files, its working directory.
    let script = r#"
echo "uid=$(id -u) gid=$(id -g)"
grep -E '^(CapEff|NoNewPrivs):' /proc/self/status | tr -s '\t ' ' '
touch /etc/baton-test 2>/dev/null && echo "rootfs=writable" || echo "rootfs=read-only"
touch /baton/script.bash 2>/dev/null && echo "script=writable" || echo "script=read-only"
echo x > /tmp/t && echo "tmp=writable"
echo x > "$HOME/t" && echo "work=writable"
echo "pwd=$(pwd)"
if [ -f /sys/fs/cgroup/pids/pids.max ]; then
  echo "pids=$(cat /sys/fs/cgroup/pids/pids.max)"
else
  echo "pids=$(cat /sys/fs/cgroup/pids.max)"
fi
"#;
    let run = h.run(RunSpec::script(Runtime::Bash, script)).await;
    assert_succeeded(&run);
    let stdout = run.stdout();
    for expected in [
        "uid=10001 gid=10001",
        "CapEff: 0000000000000000",
        "NoNewPrivs: 1",
        "rootfs=read-only",
        "script=read-only",
        "tmp=writable",
        "work=writable",
        "pwd=/baton/work",
        "pids=256",
    ] {
        assert!(
            stdout.iter().any(|l| l == expected),
            "missing {expected:?} in {stdout:?}"
        );
    }
    let stats = h.executor.spare_stats();
    assert_eq!((stats.warm_runs, stats.cold_runs), (1, 0), "{stats:?}");

    // The used spare is gone, never reused; a replacement took its place.
    h.wait_idle(images).await;
    let after = h.idle().await;
    assert_eq!(
        before.difference(&after).count(),
        1,
        "{before:?} → {after:?}"
    );
    assert_eq!(
        after.difference(&before).count(),
        1,
        "{before:?} → {after:?}"
    );
    assert_eq!(h.executor.spare_stats().started, images as u64 + 1);
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_serves_only_its_own_configuration() {
    let h = Harness::new().await;
    let images = h.executor.config().default_images.len();
    let probe = "import os\nprint(','.join(sorted(os.listdir('/sys/class/net'))))\n";
    let interfaces = |run: &Run| run.stdout().first().cloned().unwrap_or_default();

    // The spares have no network: a run asking for one does not take them.
    let run = h
        .run(RunSpec::script(Runtime::Python, probe).with_network(true))
        .await;
    assert_succeeded(&run);
    assert_ne!(interfaces(&run), "lo");
    let stats = h.executor.spare_stats();
    assert_eq!((stats.warm_runs, stats.cold_runs), (0, 1), "{stats:?}");

    // Now that configuration has a spare of its own, with a network.
    h.wait_idle(images + 1).await;
    let run = h
        .run(RunSpec::script(Runtime::Python, probe).with_network(true))
        .await;
    assert_succeeded(&run);
    assert_ne!(interfaces(&run), "lo");
    let stats = h.executor.spare_stats();
    assert_eq!((stats.warm_runs, stats.cold_runs), (1, 1), "{stats:?}");

    // And a run without network still gets none, from its own spare.
    let run = h.run(RunSpec::script(Runtime::Python, probe)).await;
    assert_succeeded(&run);
    assert_eq!(interfaces(&run), "lo");
    let stats = h.executor.spare_stats();
    assert_eq!((stats.warm_runs, stats.cold_runs), (2, 1), "{stats:?}");

    // Other limits: another configuration (cold), and labels: never a spare.
    let limits = ResourceLimits {
        pids: Some(100),
        ..ResourceLimits::default()
    };
    let run = h
        .run(RunSpec::script(Runtime::Python, probe).with_limits(limits))
        .await;
    assert_succeeded(&run);
    let run = h
        .run(RunSpec::script(Runtime::Python, probe).with_label("baton.event_id", "e"))
        .await;
    assert_succeeded(&run);
    let stats = h.executor.spare_stats();
    assert_eq!(stats.warm_runs, 2, "{stats:?}");
    h.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_workers_spares_are_reaped_on_restart() {
    let crashed = Harness::new().await;
    let images = crashed.executor.config().default_images.len();
    assert_eq!(crashed.leftovers().await.len(), images);
    // The same worker id, started again (its predecessor never removed its spares).
    let mut config = ContainerConfig::new(crashed.worker_id.clone());
    config.pull_policy = PullPolicy::Never;
    let restarted = ContainerExecutor::connect(config)
        .await
        .expect("connect to the engine");
    let removed = restarted.reap_orphans(&HashSet::new()).await.expect("reap");
    assert_eq!(removed, images);
    assert!(crashed.leftovers().await.is_empty());
    restarted.shutdown().await;
    crashed.assert_clean().await;
}
