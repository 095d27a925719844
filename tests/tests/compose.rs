//! The compose stack (`docker-compose.yml`) end to end, across its containers: the multi-host
//! tests of the worker protocol. From a clean state it builds the images (`deploy/docker/build`
//! with the binaries of this build), brings up PostgreSQL, two api replicas, two workers and an
//! sshd (`tests/compose/docker-compose.test.yml`), then:
//!
//! - runs a container job (its container has the image's HEALTHCHECK turned off), an ssh job
//!   on the sshd container and a chain container → ssh;
//! - kills a worker container mid-run: the job finishes on the other worker; the killed one,
//!   started again, is the same worker and removes the job container it left;
//! - disconnects a worker from the network past its lease and reconnects it once its run has
//!   ended: the job re-ran elsewhere and the late completion is refused;
//! - restarts the PostgreSQL container under load: every job succeeds, none is lost;
//! - `down -v` leaves no container, volume or network behind, nor any job container.
//!
//! It needs Docker and docker-compose (or `docker compose`), and runs when
//! `BATON_COMPOSE_TEST=1` (`scripts/test` sets it after building the binaries); otherwise it
//! says it was skipped. `BATON_COMPOSE_BIN_DIR` names the binaries' directory (default: this
//! test's target directory).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;

const TAG: &str = "compose-test";
/// Short leases so that the failure scenarios take seconds.
const LEASE_SECONDS: u64 = 5;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn docker(args: &[&str]) -> String {
    stdout(&run(Command::new("docker").args(args)))
}

/// `docker compose` when the plugin is there, else `docker-compose`.
fn compose_command() -> Vec<String> {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if plugin {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

/// A compose project of the stack; `down -v` when dropped (a failing test cleans up too).
struct Stack {
    project: String,
    compose: Vec<String>,
    env_file: PathBuf,
    _dir: tempfile::TempDir,
    down: bool,
}

impl Stack {
    fn command(&self, args: &[&str]) -> Command {
        let root = repo_root();
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .current_dir(&root)
            .arg("--project-name")
            .arg(&self.project)
            .arg("--env-file")
            .arg(&self.env_file)
            .arg("-f")
            .arg(root.join("docker-compose.yml"))
            .arg("-f")
            .arg(root.join("tests/compose/docker-compose.test.yml"))
            .args(args);
        cmd
    }

    fn compose(&self, args: &[&str]) -> String {
        stdout(&run(&mut self.command(args)))
    }

    /// Container ids of a service.
    fn containers(&self, service: &str) -> Vec<String> {
        self.compose(&["ps", "-q", service])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn network(&self) -> String {
        format!("{}_default", self.project)
    }

    fn logs(&self) -> String {
        let out = self
            .command(&["logs", "--no-color", "--tail", "80"])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn down(&mut self) {
        self.down = true;
        run(&mut self.command(&["down", "-v", "--remove-orphans", "-t", "40"]));
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if !self.down {
            if std::thread::panicking() {
                eprintln!("compose logs:\n{}", self.logs());
            }
            let _ = self
                .command(&["down", "-v", "--remove-orphans", "-t", "5"])
                .output();
        }
    }
}

/// A REST client of one api replica.
struct Api {
    url: String,
    token: String,
    client: reqwest::Client,
}

impl Api {
    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(body);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Value::String(e.to_string()),
            ),
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> Value {
        let (status, answer) = self.call(Method::POST, path, Some(body)).await;
        assert!(status.is_success(), "POST {path}: {status} {answer}");
        answer
    }

    async fn event(&self, spec: Value) -> String {
        let ev = self.post("/api/v1/events", &spec).await;
        ev["id"].as_str().expect("event id").to_owned()
    }

    async fn run(&self, event: &str) -> String {
        let job = self
            .post(&format!("/api/v1/events/{event}/run"), &json!({}))
            .await;
        job["job_id"].as_str().expect("job id").to_owned()
    }

    async fn job(&self, id: &str) -> Value {
        let (status, job) = self.get(&format!("/api/v1/jobs/{id}")).await;
        if status == StatusCode::OK {
            job
        } else {
            json!({"unavailable": job})
        }
    }

    /// Waits (generously) until the job satisfies `done`; returns it.
    async fn wait_job(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id}: never {what}: {job}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_succeeded(&self, id: &str) -> Value {
        let job = self
            .wait_job(id, "finished", |j| {
                matches!(
                    j["status"].as_str(),
                    Some("succeeded" | "failed" | "timed_out" | "cancelled")
                )
            })
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
        job
    }

    async fn log_text(&self, id: &str) -> String {
        let (_, logs) = self.get(&format!("/api/v1/jobs/{id}/logs")).await;
        logs["lines"]
            .as_array()
            .map(|lines| {
                lines
                    .iter()
                    .filter_map(|l| l["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }

    /// Connected workers: id → name.
    async fn connected_workers(&self) -> Vec<(String, String)> {
        let (status, workers) = self.get("/api/v1/workers").await;
        if status != StatusCode::OK {
            return Vec::new();
        }
        let items = workers
            .as_array()
            .or_else(|| workers["items"].as_array())
            .cloned()
            .unwrap_or_default();
        items
            .iter()
            .filter(|w| w["connected"] == true)
            .map(|w| {
                (
                    w["id"].as_str().unwrap_or_default().to_owned(),
                    w["name"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    async fn wait_workers(&self, n: usize) -> Vec<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let workers = self.connected_workers().await;
            if workers.len() == n {
                return workers;
            }
            assert!(
                Instant::now() < deadline,
                "never {n} connected workers: {workers:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::now_v7().simple(),
        uuid::Uuid::now_v7().simple()
    )
}

fn keygen(path: &Path, comment: &str) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path));
}

/// Waits until `f` returns something, polling every 250 ms for up to `secs`.
async fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The worker container whose worker has this id (the worker's name is its host name, the
/// container's short id).
fn container_of(stack: &Stack, workers: &[(String, String)], worker_id: &str) -> String {
    let name = &workers
        .iter()
        .find(|(id, _)| id == worker_id)
        .unwrap_or_else(|| panic!("worker {worker_id} not in {workers:?}"))
        .1;
    stack
        .containers("worker")
        .into_iter()
        .find(|c| c.starts_with(name.as_str()))
        .unwrap_or_else(|| panic!("no worker container named {name}"))
}

/// The command lines running in a container ("" once it is gone).
fn processes(container: &str) -> String {
    Command::new("docker")
        .args(["top", container])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The containers a worker made (spares and runs), running only or all.
fn worker_containers(worker_id: &str, all: bool) -> Vec<String> {
    let label = format!("label=baton.worker_id={worker_id}");
    let args = if all {
        vec!["ps", "-aq", "--filter", &label]
    } else {
        vec!["ps", "-q", "--filter", &label]
    };
    docker(&args).lines().map(str::to_owned).collect()
}

fn setup() -> Option<Stack> {
    if std::env::var("BATON_COMPOSE_TEST").ok().as_deref() != Some("1") {
        eprintln!(
            "compose test skipped: set BATON_COMPOSE_TEST=1 (scripts/test does) to run it; \
             it needs Docker, docker-compose and the built binaries"
        );
        return None;
    }
    let root = repo_root();
    let bin_dir = std::env::var_os("BATON_COMPOSE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // target/debug/deps/compose-HASH → target/debug
            let exe = std::env::current_exe().expect("current exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_path_buf()
        });
    run(Command::new(root.join("deploy/docker/build"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(["--tag", TAG]));
    run(Command::new("docker")
        .args(["build", "-q", "-t", "baton-test/sshd:latest"])
        .arg(root.join("tests/compose/sshd")));

    let dir = tempfile::Builder::new()
        .prefix("baton-compose-")
        .tempdir()
        .expect("tempdir");
    let sshd_dir = dir.path().join("sshd");
    std::fs::create_dir(&sshd_dir).expect("mkdir");
    keygen(&sshd_dir.join("host_ed25519"), "compose-sshd");
    keygen(&sshd_dir.join("user_ed25519"), "compose-user");
    std::fs::copy(
        sshd_dir.join("user_ed25519.pub"),
        sshd_dir.join("authorized_keys"),
    )
    .expect("authorized_keys");
    std::fs::write(
        sshd_dir.join("sshd_config"),
        "Port 22\nHostKey /etc/baton-sshd/host_ed25519\n\
         AuthorizedKeysFile /etc/baton-sshd/authorized_keys\nPidFile /run/sshd.pid\n\
         UsePAM no\nStrictModes no\nAllowUsers baton\nPubkeyAuthentication yes\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         Subsystem sftp internal-sftp\nMaxStartups 100\n",
    )
    .expect("sshd_config");
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["authorized_keys", "sshd_config", "user_ed25519.pub"] {
            std::fs::set_permissions(sshd_dir.join(f), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        std::fs::set_permissions(&sshd_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    let docker_gid = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/var/run/docker.sock")
            .map(|m| m.gid())
            .unwrap_or(0)
    };
    let env_file = dir.path().join("compose.env");
    std::fs::write(
        &env_file,
        format!(
            "BATON_MASTER_KEY={}\nBATON_ADMIN_TOKEN={}\nBATON_WORKER_TOKEN={}\n\
             POSTGRES_PASSWORD={}\nBATON_DOCKER_GID={docker_gid}\nBATON_IMAGE_TAG={TAG}\n\
             BATON_BIND=127.0.0.1\nBATON_HTTP_PORT=\nBATON_HTTP_PORT_2=\n\
             BATON_LEASE_SECONDS={LEASE_SECONDS}\nBATON_WORKER_DRAIN_TIMEOUT=10s\n\
             BATON_TEST_SSHD_DIR={}\n",
            random_secret(),
            random_secret(),
            random_secret(),
            random_secret(),
            sshd_dir.display()
        ),
    )
    .expect("env file");
    Some(Stack {
        project: format!(
            "batontest{}",
            &uuid::Uuid::now_v7().simple().to_string()[22..]
        ),
        compose: compose_command(),
        env_file,
        _dir: dir,
        down: false,
    })
}

fn env_value(stack: &Stack, key: &str) -> String {
    std::fs::read_to_string(&stack.env_file)
        .expect("env file")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
        .expect("key in the env file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_runs_jobs_and_survives_worker_network_and_database_failures() {
    let Some(mut stack) = setup() else { return };
    let started = Instant::now();
    let api = up(&stack).await;
    eprintln!("stack up with 2 workers in {:?}", Instant::now() - started);
    images_are_healthy_and_not_root(&stack).await;
    container_ssh_and_chained_jobs(&stack, &api).await;
    workers_scale(&stack, &api).await;
    let victim = a_killed_worker_containers_job_finishes_on_the_other(&stack, &api).await;
    let cut = a_worker_cut_off_past_its_lease_has_its_late_completion_refused(&stack, &api).await;
    a_database_restart_loses_no_job(&stack, &api).await;
    let mut workers: Vec<String> = api
        .wait_workers(2)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    workers.extend([victim, cut]);
    down_leaves_nothing(&mut stack, &workers);
    eprintln!("compose test done in {:?}", Instant::now() - started);
}

/// `up -d` from a clean state; a client of api-1 once both workers are connected.
async fn up(stack: &Stack) -> Api {
    stack.compose(&["up", "-d"]);
    // The api replicas publish their REST port on a free port of 127.0.0.1.
    let port = stack.compose(&["port", "api-1", "8080"]);
    let port = port.rsplit(':').next().expect("port").to_owned();
    let api = Api {
        url: format!("http://127.0.0.1:{port}"),
        token: env_value(stack, "BATON_ADMIN_TOKEN"),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
    };
    api.wait_workers(2).await;
    api
}

/// Every service's container is healthy by its image's HEALTHCHECK and runs as non-root.
async fn images_are_healthy_and_not_root(stack: &Stack) {
    for service in ["api-1", "api-2", "worker", "postgres"] {
        for c in stack.containers(service) {
            let health = eventually(120, &format!("{service} healthy"), || {
                let h = docker(&["inspect", "--format", "{{.State.Health.Status}}", &c]);
                (h == "healthy").then_some(h)
            })
            .await;
            assert_eq!(health, "healthy");
            let user = docker(&["inspect", "--format", "{{.Config.User}}", &c]);
            assert!(
                !user.is_empty() && !user.starts_with("0") && user != "root",
                "{service} runs as {user:?}"
            );
        }
    }
}

/// A container job, an ssh job on the sshd container, and a chain container → ssh.
async fn container_ssh_and_chained_jobs(stack: &Stack, api: &Api) {
    let hello = api
        .event(
            json!({"name": "hello", "runtime": "bash", "executor": "container",
                      "content": "echo hello from a container; id -u"}),
        )
        .await;
    let job = api.run(&hello).await;
    api.wait_succeeded(&job).await;
    let log = api.log_text(&job).await;
    assert!(
        log.contains("hello from a container") && log.contains("10001"),
        "{log}"
    );

    // An ssh job on the sshd container, and a chain container → ssh.
    let sshd_dir = PathBuf::from(env_value(stack, "BATON_TEST_SSHD_DIR"));
    let host_key = std::fs::read_to_string(sshd_dir.join("host_ed25519.pub")).expect("host key");
    let host_key = host_key
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let server = api
        .post(
            "/api/v1/servers",
            &json!({"name": "compose-sshd", "host": "sshd", "port": 22, "username": "baton",
                    "private_key": std::fs::read_to_string(sshd_dir.join("user_ed25519")).expect("key"),
                    "host_key_policy": "strict", "host_key": host_key, "max_concurrent": 4}),
        )
        .await;
    let server_id = server["id"].as_str().expect("server id");
    let over_ssh = api
        .event(
            json!({"name": "over-ssh", "runtime": "bash", "server_id": server_id,
            "content": "source baton.sh\ninput=$(baton_input)\necho \"on $(hostname): $input\"\n\
                        case \"$input\" in *'\"n\": 1'*|*'\"n\":1'*) baton_output '{\"n\": 2}';; \
                        *) baton_output '{\"n\": 0}';; esac"}),
        )
        .await;
    let job = api.run(&over_ssh).await;
    api.wait_succeeded(&job).await;
    let log = api.log_text(&job).await;
    assert!(log.contains("on baton-sshd"), "{log}");
    let first = api
        .event(
            json!({"name": "first", "runtime": "bash", "executor": "container",
            "content": "source baton.sh; baton_output '{\"n\": 1}'"}),
        )
        .await;
    api.post(
        &format!("/api/v1/events/{first}/actions"),
        &json!({"trigger": "on_success", "action": {"type": "run_event", "event_id": over_ssh}}),
    )
    .await;
    let root = api.run(&first).await;
    api.wait_succeeded(&root).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let child = loop {
        let (_, list) = api.get(&format!("/api/v1/jobs?root_job_id={root}")).await;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        if let Some(c) = items.iter().find(|j| j["id"] != root.as_str()) {
            break c["id"].as_str().expect("id").to_owned();
        }
        assert!(Instant::now() < deadline, "no chained job: {list}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let child = api.wait_succeeded(&child).await;
    assert_eq!(child["output"], json!({"n": 2}), "{child}");
    assert_eq!(child["parent_job_id"], root.as_str(), "{child}");
}

/// `--scale worker=N`: a third worker joins; scaled back, it drains and leaves.
async fn workers_scale(stack: &Stack, api: &Api) {
    stack.compose(&["up", "-d", "--scale", "worker=3"]);
    api.wait_workers(3).await;
    stack.compose(&["up", "-d", "--scale", "worker=2"]);
    api.wait_workers(2).await;
}

/// A worker container killed mid-run: the job finishes on the other worker. Returns the
/// killed worker's id.
async fn a_killed_worker_containers_job_finishes_on_the_other(stack: &Stack, api: &Api) -> String {
    let workers = api.wait_workers(2).await;
    let slow = api
        .event(
            json!({"name": "slow", "runtime": "bash", "executor": "container",
            "max_attempts": 1, "content": "echo started; sleep 10; echo finished"}),
        )
        .await;
    let job = api.run(&slow).await;
    let running = api
        .wait_job(&job, "running", |j| {
            j["status"] == "running" && has_started(j)
        })
        .await;
    let victim = running["worker_id"].as_str().expect("worker").to_owned();
    let victim_container = container_of(stack, &workers, &victim);
    // The worker's containers (spares and the run's): the image's HEALTHCHECK is off there
    // (the worker watches its runs itself).
    let victims_containers = eventually(30, "the run's container", || {
        let running = worker_containers(&victim, false);
        running
            .iter()
            .any(|c| processes(c).contains("sleep 10"))
            .then_some(running)
    })
    .await;
    for c in &victims_containers {
        assert_eq!(
            docker(&[
                "inspect",
                "--format",
                "{{json .Config.Healthcheck.Test}}",
                c
            ]),
            r#"["NONE"]"#
        );
    }
    docker(&["kill", &victim_container]);
    let done = api.wait_succeeded(&job).await;
    assert_ne!(done["worker_id"], victim.as_str(), "{done}");
    assert!(api.log_text(&job).await.contains("finished"));
    // Started again (what its restart policy does after a crash), it is the same worker and
    // removes the job container its killed run left.
    docker(&["start", &victim_container]);
    let workers = api.wait_workers(2).await;
    assert!(workers.iter().any(|(id, _)| *id == victim), "{workers:?}");
    eventually(60, "the killed run's container removed", || {
        let left = worker_containers(&victim, true);
        (!victims_containers.iter().any(|c| left.contains(c))).then_some(())
    })
    .await;
    victim
}

/// A worker cut off from the network past its lease, reconnected after its run ended: the
/// job re-ran elsewhere, the late completion is refused. Returns that worker's id.
async fn a_worker_cut_off_past_its_lease_has_its_late_completion_refused(
    stack: &Stack,
    api: &Api,
) -> String {
    let workers = api.wait_workers(2).await;
    let short = api
        .event(
            json!({"name": "short", "runtime": "bash", "executor": "container",
            "max_attempts": 1, "content": "echo started; sleep 6; echo finished"}),
        )
        .await;
    let job = api.run(&short).await;
    let running = api
        .wait_job(&job, "running", |j| {
            j["status"] == "running" && has_started(j)
        })
        .await;
    let cut = running["worker_id"].as_str().expect("worker").to_owned();
    let cut_container = container_of(stack, &workers, &cut);
    let network = stack.network();
    docker(&["network", "disconnect", &network, &cut_container]);
    let moved = api
        .wait_job(&job, "re-run on the other worker", |j| {
            j["worker_id"].as_str().is_some_and(|w| w != cut)
                && matches!(j["status"].as_str(), Some("running" | "succeeded"))
        })
        .await;
    eprintln!("re-run elsewhere: {moved}");
    // The cut-off worker's run ends while it is disconnected.
    eventually(60, "the cut-off run's end", || {
        (!worker_containers(&cut, false)
            .iter()
            .any(|c| processes(c).contains("sleep 6")))
        .then_some(())
    })
    .await;
    docker(&["network", "connect", &network, &cut_container]);
    let done = api.wait_succeeded(&job).await;
    assert_ne!(done["worker_id"], cut.as_str(), "{done}");
    let workers = api.wait_workers(2).await;
    assert!(workers.iter().any(|(id, _)| *id == cut), "{workers:?}");
    let refused = eventually(60, "the late completion refused", || {
        let out = Command::new("docker")
            .args(["logs", &cut_container])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        // Refused either on the session that survived the cut (TCP retransmits: `LeaseLost`)
        // or at the new session's `Welcome` (`held = false`).
        text.lines()
            .find(|l| {
                l.contains(job.as_str())
                    && (l.contains("lease lost: stopping the run")
                        || l.contains("the lease was lost while disconnected"))
            })
            .map(str::to_owned)
    })
    .await;
    eprintln!("late completion refused: {refused}");
    let after = api.job(&job).await;
    assert_eq!(after["status"], "succeeded");
    assert_eq!(after["worker_id"], done["worker_id"]);
    // Both runs started; only the second one's lines after that were stored.
    let log = api.log_text(&job).await;
    assert_eq!(
        (
            log.matches("started").count(),
            log.matches("finished").count()
        ),
        (2, 1),
        "{log}"
    );
    cut
}

/// PostgreSQL restarted under load: every job succeeds, none is lost, both replicas recover.
async fn a_database_restart_loses_no_job(stack: &Stack, api: &Api) {
    let quick = api
        .event(
            json!({"name": "quick", "runtime": "bash", "executor": "container",
            "max_attempts": 1, "content": "echo quick; sleep 1"}),
        )
        .await;
    let mut jobs = Vec::new();
    for _ in 0..12 {
        jobs.push(api.run(&quick).await);
    }
    stack.compose(&["restart", "-t", "10", "postgres"]);
    // The api answers again once its pools reconnect; jobs queued after the restart too.
    let deadline = Instant::now() + Duration::from_secs(120);
    while jobs.len() < 20 {
        let (status, job) = api
            .call(
                Method::POST,
                &format!("/api/v1/events/{quick}/run"),
                Some(&json!({})),
            )
            .await;
        if status == StatusCode::ACCEPTED {
            jobs.push(job["job_id"].as_str().expect("job id").to_owned());
        } else {
            assert!(
                Instant::now() < deadline,
                "the api never recovered: {status} {job}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    for id in &jobs {
        api.wait_succeeded(id).await;
    }
    let distinct: BTreeSet<&String> = jobs.iter().collect();
    assert_eq!(distinct.len(), 20);
    api.wait_workers(2).await;
    // The other replica is ready again too.
    let port_2 = stack.compose(&["port", "api-2", "8080"]);
    let api_2 = Api {
        url: format!(
            "http://127.0.0.1:{}",
            port_2.rsplit(':').next().expect("port")
        ),
        token: api.token.clone(),
        client: api.client.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = api_2.get("/readyz").await;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "api-2 never ready: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, list) = api_2
        .get(&format!("/api/v1/jobs?event_id={quick}&limit=100"))
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(20), "{list}");
}

/// `down -v` leaves no container, volume or network behind, nor any container or volume of
/// the workers (`workers`: every worker id the test saw).
fn down_leaves_nothing(stack: &mut Stack, workers: &[String]) {
    let project = stack.project.clone();
    stack.down();
    let label = format!("label=com.docker.compose.project={project}");
    assert_eq!(docker(&["ps", "-aq", "--filter", &label]), "");
    assert_eq!(docker(&["volume", "ls", "-q", "--filter", &label]), "");
    assert_eq!(docker(&["network", "ls", "-q", "--filter", &label]), "");
    for id in workers {
        assert_eq!(
            docker(&[
                "ps",
                "-aq",
                "--filter",
                &format!("label=baton.worker_id={id}")
            ]),
            "",
            "containers of worker {id} left"
        );
        assert_eq!(
            docker(&[
                "volume",
                "ls",
                "-q",
                "--filter",
                &format!("label=baton.worker_id={id}")
            ]),
            "",
            "volumes of worker {id} left"
        );
    }
}

/// The run has started (its `started_at` is set).
fn has_started(job: &Value) -> bool {
    !job["started_at"].is_null()
}
