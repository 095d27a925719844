//! Starting workers for tests, and waiting on jobs.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use baton_api::model::Role;
use baton_tests::TestApp;
use serde_json::Value;

pub use baton_tests::worker::{InProcessWorker, wait_finished, wait_job};

/// A worker in its own process (so it can be killed for real).
pub struct WorkerProcess {
    pub child: Child,
}

impl WorkerProcess {
    pub async fn start(app: &TestApp, slots: u32) -> Self {
        // No container executor: a process killed with SIGKILL would leave its pre-started
        // containers behind (a restart with the same --worker-id reaps them; these tests'
        // workers get a new id each time).
        Self::start_with_args(app, slots, &["--allow-local", "--no-container"]).await
    }

    /// A worker process with `extra` command-line flags (after `--api-url` and `--slots`).
    pub async fn start_with_args(app: &TestApp, slots: u32, extra: &[&str]) -> Self {
        Self::start_on(app, &app.grpc_address, slots, extra).await
    }

    /// A worker process connecting to `api_url` (one gRPC URL, or several comma-separated),
    /// with a worker token made through `app`, and `extra` flags.
    pub async fn start_on(app: &TestApp, api_url: &str, slots: u32, extra: &[&str]) -> Self {
        Self::start_with_env(app, api_url, slots, extra, &[], Stdio::inherit()).await
    }

    /// [`WorkerProcess::start_on`] with `env` set for the process and its stderr (the log)
    /// going to `stderr`.
    pub async fn start_with_env(
        app: &TestApp,
        api_url: &str,
        slots: u32,
        extra: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Self {
        let token = app.token(Role::Worker).await;
        let child = Command::new(env!("CARGO_BIN_EXE_baton-test-worker"))
            .args(["--api-url", api_url, "--slots", &slots.to_string()])
            .args(extra)
            .env("BATON_WORKER_TOKEN", token)
            .env("BATON_WORKER_DRAIN_TIMEOUT", "20s")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the worker process");
        Self { child }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .expect("signal");
    }

    /// Waits for the process to exit; returns whether it exited successfully.
    pub async fn wait(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.success();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker process did not exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every stored log line's text, in order.
pub async fn all_lines(app: &TestApp, id: &str) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut after = 0;
    loop {
        let (_, page) = app
            .get(&format!("/api/v1/jobs/{id}/logs?after={after}&limit=10000"))
            .await;
        let batch = page["lines"].as_array().cloned().unwrap_or_default();
        let n = batch.len();
        lines.extend(batch);
        after = page["next"].as_i64().expect("next");
        if n < 10_000 {
            return lines;
        }
    }
}

/// An event running a local script.
pub async fn local_event(app: &TestApp, name: &str, runtime: &str, content: &str) -> String {
    let ev = app
        .create_event(&serde_json::json!({"name": name, "runtime": runtime, "content": content, "executor": "local"}))
        .await;
    ev["id"].as_str().expect("id").to_owned()
}

/// Whether a process with this pid exists.
pub fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// An api replica in its own process (so it can be killed for real), on an existing database,
/// with the harness's admin token and master key.
pub struct ApiProcess {
    pub child: Child,
    pub address: String,
    pub grpc_address: String,
}

impl ApiProcess {
    /// Starts `baton-test-api` on free loopback ports with `env` (e.g. `BATON_LEASE_SECONDS`)
    /// and waits until it answers `/healthz`.
    pub async fn start(database_url: &str, env: &[(&str, &str)]) -> Self {
        // A port found free may be taken before the process binds it: then it exits, and we
        // try other ports.
        for _ in 0..5 {
            let (http, grpc) = (free_port(), free_port());
            let mut child = Command::new(env!("CARGO_BIN_EXE_baton-test-api"))
                .env("BATON_DATABASE_URL", database_url)
                .env("BATON_LISTEN", format!("127.0.0.1:{http}"))
                .env("BATON_GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
                .env("BATON_ADMIN_TOKEN", baton_tests::ADMIN_TOKEN)
                .env("BATON_MASTER_KEY", baton_tests::MASTER_KEY)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .spawn()
                .expect("start the api process");
            let address = format!("http://127.0.0.1:{http}");
            let client = reqwest::Client::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                if child.try_wait().expect("wait").is_some() {
                    break; // exited: try other ports
                }
                let up = client
                    .get(format!("{address}/healthz"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if up {
                    return Self {
                        child,
                        address,
                        grpc_address: format!("http://127.0.0.1:{grpc}"),
                    };
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the api process did not come up"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("the api process kept exiting at start");
    }

    /// A request handle on this replica.
    pub async fn app(&self, database_url: &str) -> TestApp {
        baton_tests::attach(
            self.address.clone(),
            self.grpc_address.clone(),
            database_url.to_owned(),
        )
        .await
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The lines a child process writes to a pipe, read by a thread as they come.
pub struct LogLines(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl LogLines {
    /// Reads `pipe` (a child's stderr or stdout) until it closes.
    pub fn read(pipe: impl std::io::Read + Send + 'static) -> Self {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Self(lines)
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits (up to 120 s) for a line matching `wanted`; returns it.
    pub async fn wait_for(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| wanted(l)) {
                return line;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no line with {what} in: {:#?}",
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
