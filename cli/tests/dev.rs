//! `baton dev` as a new user runs it: it starts PostgreSQL and the api, prints the URL and an
//! admin token, serves the API, stops PostgreSQL on Ctrl-C, and reuses its data next time.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

struct Dev {
    child: Child,
    url: String,
    token: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn start(data_dir: &Path, port: u16) -> Dev {
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("dev")
        .env("BATON_DATA_DIR", data_dir)
        .env("BATON_LISTEN", format!("127.0.0.1:{port}"))
        .env("BATON_GRPC_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env_remove("BATON_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn baton dev");
    let stdout = child.stdout.take().expect("stdout");
    let (mut url, mut token) = (None, None);
    // Reading blocks until baton dev prints; it exits (closing stdout) if it fails to start.
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("line");
        if let Some(rest) = line.trim().strip_prefix("API:") {
            url = rest
                .split_whitespace()
                .next()
                .map(|u| u.trim_end_matches("/api/v1").to_owned());
        }
        if let Some(rest) = line.trim().strip_prefix("Admin token:") {
            token = Some(rest.trim().to_owned());
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    // Keep reading what it logs afterwards (a closed pipe would fail its log writes).
    std::thread::spawn(move || lines.for_each(drop));
    Dev {
        child,
        url: url.expect("baton dev printed the API URL"),
        token: token.expect("baton dev printed the admin token"),
    }
}

/// A test that fails midway must not leave `baton dev` (and its PostgreSQL) running: it would
/// hold the test's output open and its ports.
impl Drop for Dev {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn stop(mut dev: Dev) {
    kill(Pid::from_raw(dev.child.id() as i32), Signal::SIGINT).expect("send SIGINT");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = dev.child.try_wait().expect("wait") {
            assert!(status.success(), "baton dev exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "baton dev did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn call(
    client: &reqwest::blocking::Client,
    dev: &Dev,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = client
        .request(method, format!("{}{path}", dev.url))
        .bearer_auth(&dev.token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(serde_json::Value::Null))
}

#[test]
fn baton_dev_serves_the_api_stops_postgres_and_reuses_its_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    // PostgreSQL runs as the postgres user when we are root: let it reach the data dir.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data_dir = dir.path().join("baton-data");
    let port = free_port();
    let client = reqwest::blocking::Client::new();

    let dev = start(&data_dir, port);
    assert_eq!(dev.url, format!("http://127.0.0.1:{port}"));
    let (status, _) = call(&client, &dev, reqwest::Method::GET, "/readyz", None);
    assert_eq!(status, 200);
    let (status, event) = call(
        &client,
        &dev,
        reqwest::Method::POST,
        "/api/v1/events",
        Some(
            serde_json::json!({"name": "hello", "runtime": "bash", "content": "echo hello", "executor": "local"}),
        ),
    );
    assert_eq!(status, 201, "{event}");
    let (status, run) = call(
        &client,
        &dev,
        reqwest::Method::POST,
        &format!("/api/v1/events/{}/run", event["id"].as_str().expect("id")),
        None,
    );
    assert_eq!(status, 202, "{run}");
    let first_token = dev.token.clone();
    let pid_file = data_dir.join("pg").join("postmaster.pid");
    assert!(pid_file.exists(), "PostgreSQL runs from the data dir");
    stop(dev);
    assert!(!pid_file.exists(), "Ctrl-C stopped PostgreSQL");

    let dev = start(&data_dir, port);
    assert_eq!(dev.token, first_token, "the admin token is kept");
    let (status, job) = call(
        &client,
        &dev,
        reqwest::Method::GET,
        &format!("/api/v1/jobs/{}", run["job_id"].as_str().expect("job")),
        None,
    );
    assert_eq!(status, 200, "the data survived the restart: {job}");
    assert_eq!(job["event_name"], "hello");
    stop(dev);
}

/// Runs the `baton` CLI against `dev`; returns its stdout, failing the test if it fails.
fn cli(dev: &Dev, args: &[&str]) -> String {
    let (ok, out, err) = baton(dev, args);
    assert!(ok, "baton {args:?} failed: {err}");
    out
}

/// Waits (60 s at most) until the job is in a terminal state and returns it.
fn wait_finished(client: &reqwest::blocking::Client, dev: &Dev, job_id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, job) = call(
            client,
            dev,
            reqwest::Method::GET,
            &format!("/api/v1/jobs/{job_id}"),
            None,
        );
        assert_eq!(status, 200, "{job}");
        if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or("")) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {job_id} did not finish: {job}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_cli_manages_schedules_webhooks_and_reruns() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dev = start(&dir.path().join("baton-data"), free_port());
    let client = reqwest::blocking::Client::new();
    let (status, event) = call(
        &client,
        &dev,
        reqwest::Method::POST,
        "/api/v1/events",
        Some(serde_json::json!({"name": "deploy", "runtime": "bash",
            "content": "echo deploying", "executor": "local"})),
    );
    assert_eq!(status, 201, "{event}");

    // Schedules: create paused, list, resume, pause, delete.
    let created: serde_json::Value = serde_json::from_str(&cli(
        &dev,
        &[
            "schedules",
            "create",
            "deploy",
            "--cron",
            "0 3 * * *",
            "--timezone",
            "Europe/Paris",
            "--paused",
        ],
    ))
    .expect("schedules create prints JSON");
    let schedule = created["id"].as_str().expect("schedule id").to_owned();
    assert_eq!(created["paused"], true);
    let listed = cli(&dev, &["schedules", "list", "--event", "deploy"]);
    assert!(
        listed.contains(&schedule) && listed.contains("paused"),
        "{listed}"
    );
    let resumed: serde_json::Value =
        serde_json::from_str(&cli(&dev, &["schedules", "resume", &schedule])).expect("JSON");
    assert_eq!(resumed["paused"], false);
    assert!(
        resumed["next_runs"][0]
            .as_str()
            .expect("next run")
            .contains("T03:00:00+0")
    );
    let paused: serde_json::Value =
        serde_json::from_str(&cli(&dev, &["schedules", "pause", &schedule])).expect("JSON");
    assert_eq!(paused["paused"], true);
    assert!(cli(&dev, &["schedules", "delete", &schedule]).contains("deleted"));
    assert!(!cli(&dev, &["schedules", "list"]).contains(&schedule));

    // Webhooks: a signed one refuses an unsigned delivery; an unsigned one starts a run.
    let signed = cli(
        &dev,
        &[
            "webhooks",
            "create",
            "deploy",
            "--name",
            "ci",
            "--signing-secret",
            "s3cret-for-ci",
        ],
    );
    let signed_url = signed
        .lines()
        .find_map(|l| l.strip_prefix("url: "))
        .expect("webhooks create prints the url")
        .to_owned();
    let refused = client
        .post(&signed_url)
        .json(&serde_json::json!({"ref": "main"}))
        .send()
        .expect("deliver");
    assert_eq!(
        refused.status().as_u16(),
        401,
        "an unsigned delivery to a signed hook"
    );
    let open = cli(&dev, &["webhooks", "create", "deploy", "--name", "chat"]);
    let url = open
        .lines()
        .find_map(|l| l.strip_prefix("url: "))
        .expect("url")
        .to_owned();
    assert!(open.lines().any(|l| l.starts_with("key: ")), "{open}");
    let accepted: serde_json::Value = client
        .post(&url)
        .json(&serde_json::json!({"ref": "main"}))
        .send()
        .expect("deliver")
        .json()
        .expect("JSON answer");
    let job_id = accepted["job_id"].as_str().expect("job_id").to_owned();
    let job = wait_finished(&client, &dev, &job_id);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["input"]["ref"], "main");

    // Rerun: a new job of the same snapshot and input.
    let rerun = cli(&dev, &["jobs", "rerun", &job_id]).trim().to_owned();
    let again = wait_finished(&client, &dev, &rerun);
    assert_eq!(again["rerun_of"], job_id.as_str(), "{again}");
    assert_eq!(again["input"]["ref"], "main");
    assert_eq!(again["status"], "succeeded");

    let hooks = cli(&dev, &["webhooks", "list", "deploy"]);
    let chat = hooks
        .lines()
        .find(|l| l.contains(" chat "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the chat webhook is listed")
        .to_owned();
    assert!(
        hooks.contains("signed") && hooks.contains("active"),
        "{hooks}"
    );
    assert!(cli(&dev, &["webhooks", "revoke", "deploy", &chat]).contains("revoked"));
    assert!(cli(&dev, &["webhooks", "list", "deploy"]).contains("revoked "));
    let gone = client
        .post(&url)
        .json(&serde_json::json!({}))
        .send()
        .expect("deliver");
    assert_eq!(gone.status().as_u16(), 404, "a revoked key starts nothing");
    stop(dev);
}

/// Runs the `baton` CLI against `dev`; returns (success, stdout, stderr).
fn baton(dev: &Dev, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .env("BATON_URL", &dev.url)
        .env("BATON_TOKEN", &dev.token)
        .output()
        .expect("run baton");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn baton_workflows_create_run_wait_list_and_refuse_a_bad_retry() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dev = start(&dir.path().join("baton-data"), free_port());
    let client = reqwest::blocking::Client::new();
    let (status, event) = call(
        &client,
        &dev,
        reqwest::Method::POST,
        "/api/v1/events",
        Some(serde_json::json!({"name": "pass", "runtime": "noop", "executor": "local"})),
    );
    assert_eq!(status, 201, "{event}");
    let id = event["id"].as_str().expect("id");
    let file = dir.path().join("diamond.yaml");
    std::fs::write(
        &file,
        format!(
            "name: cli-diamond\nsteps:\n  - {{id: a, event_id: {id}}}\n  - {{id: b, event_id: {id}, needs: [a]}}\n  - {{id: c, event_id: {id}, needs: [a], if: \"input.c == true\"}}\n  - {{id: d, event_id: {id}, needs: [b, c], when: always}}\n"
        ),
    )
    .expect("write");
    let (ok, out, err) = baton(&dev, &["workflows", "create", file.to_str().expect("path")]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("\"cli-diamond\""), "{out}");
    let (ok, out, err) = baton(&dev, &["workflows", "list"]);
    assert!(
        ok && out.contains("cli-diamond") && out.contains("4 steps"),
        "{out}{err}"
    );
    let (ok, out, err) = baton(
        &dev,
        &[
            "workflows",
            "run",
            "cli-diamond",
            "--input",
            "{\"c\": false}",
            "--wait",
        ],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("succeeded"), "{out}");
    assert!(
        out.contains("(condition)"),
        "c was skipped by its if: {out}"
    );
    let run_id = out.split_whitespace().next().expect("run id").to_owned();
    let (ok, out, err) = baton(&dev, &["workflows", "runs", "--workflow", "cli-diamond"]);
    assert!(ok && out.contains(&run_id), "{out}{err}");
    let (ok, out, err) = baton(&dev, &["workflows", "show", &run_id]);
    assert!(
        ok && out.contains("d ") && out.contains("succeeded"),
        "{out}{err}"
    );
    let (ok, _, err) = baton(&dev, &["workflows", "retry", &run_id]);
    assert!(!ok, "a succeeded run is not retried");
    assert!(err.contains("409"), "{err}");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        format!("name: bad\nsteps:\n  - {{id: a, event_id: {id}, needs: [zz]}}\n"),
    )
    .expect("write");
    let (ok, _, err) = baton(&dev, &["workflows", "create", bad.to_str().expect("path")]);
    assert!(!ok && err.contains("zz"), "{err}");
    stop(dev);
}
