//! Every way a job ends fires its actions, in the transaction of its end (the reaper, the
//! dispatcher failing an unrunnable job, a cancel while queued); and a passing database error
//! while handing jobs over gives them back to the queue instead of failing or stranding them.

use std::time::{Duration, Instant};

use baton_api::model::Role;
use baton_proto::ServerMsg;
use baton_proto::v1::Assignment;
use baton_tests::protocol::{ScriptedWorker, hello};
use baton_tests::{TestApp, bash_event, spawn_app, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

async fn event(app: &TestApp, name: &str) -> String {
    app.create_event(&bash_event(name)).await["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

async fn add_action(app: &TestApp, event: &str, body: Value) {
    let (status, action) = app
        .post(&format!("/api/v1/events/{event}/actions"), &body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{action}");
}

/// Adds to `source` an `on_failure` and an `always` run of new events, and an `always`
/// message; returns the events (on_failure, always).
async fn failure_actions(app: &TestApp, source: &str, tag: &str) -> (String, String) {
    let on_failure = event(app, &format!("{tag}-after-failure")).await;
    let always = event(app, &format!("{tag}-always")).await;
    add_action(
        app,
        source,
        json!({"trigger": "on_failure", "action": {"type": "run_event", "event_id": on_failure}}),
    )
    .await;
    add_action(
        app,
        source,
        json!({"trigger": "always", "action": {"type": "run_event", "event_id": always}}),
    )
    .await;
    add_action(app, source, json!({"trigger": "always", "action": {"type": "send_message", "channel": "webhook",
        "target": "http://127.0.0.1:9/hook", "template": "{{ job.status }}: {{ job.error.message }}"}})).await;
    (on_failure, always)
}

/// The events of the jobs started by `parent`'s actions, sorted.
async fn children(pool: &PgPool, parent: &str) -> Vec<String> {
    let mut events: Vec<String> =
        sqlx::query_scalar("SELECT event_id::text FROM jobs WHERE parent_job_id = $1::uuid")
            .bind(parent)
            .fetch_all(pool)
            .await
            .expect("children");
    events.sort();
    events
}

async fn messages(pool: &PgPool, job: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT body FROM message_outbox WHERE job_id = $1::uuid")
        .bind(job)
        .fetch_all(pool)
        .await
        .expect("messages")
}

async fn status(pool: &PgPool, job: &str) -> String {
    sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1::uuid")
        .bind(job)
        .fetch_one(pool)
        .await
        .expect("status")
}

async fn wait_for_status(pool: &PgPool, job: &str, wanted: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = status(pool, job).await;
        if now == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job {job} is {now}, not {wanted}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

async fn assignment(w: &mut ScriptedWorker) -> Assignment {
    w.next_matching(|m| match m {
        ServerMsg::Assignment(a) => Some(a.clone()),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn jobs_the_reaper_ends_fire_their_actions() {
    let app = spawn_app_with(|c| {
        c.lease = Duration::from_secs(1);
        c.reaper_interval = Duration::from_millis(100);
    })
    .await;
    let source = event(&app, "lossy").await;
    let (on_failure, always) = failure_actions(&app, &source, "lossy").await;
    let token = app.token(Role::Worker).await;
    // A worker that takes jobs and then never heartbeats: its leases expire.
    // (Slots for both jobs and the runs their actions start, which it never finishes.)
    let (mut w, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 8)).await;

    // The job is handed to the silent worker again and again: requeued after each of
    // MAX_LEASE_LOSSES lost leases, it is ended by the reaper at the next one.
    let lost = app.run_event(&source, &json!({})).await;
    assert_eq!(assignment(&mut w).await.job_id, lost);
    wait_for_status(&app.pool, &lost, "failed").await;
    let (losses, dead): (i32, bool) =
        sqlx::query_as("SELECT lease_losses, dead FROM jobs WHERE id = $1::uuid")
            .bind(&lost)
            .fetch_one(&app.pool)
            .await
            .expect("job");
    assert_eq!(
        (losses, dead),
        (baton_api::storage::queue::MAX_LEASE_LOSSES + 1, true)
    );
    assert_eq!(
        children(&app.pool, &lost).await,
        sorted(vec![on_failure.clone(), always.clone()]),
        "on_failure and always fire for a job failed by the reaper"
    );
    let sent = messages(&app.pool, &lost).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        sent[0],
        format!(
            "failed: the worker running it stopped renewing its lease {} times; giving up",
            baton_api::storage::queue::MAX_LEASE_LOSSES + 1
        )
    );

    // Another is being cancelled when its worker goes silent: the reaper cancels it.
    let cancelled = app.run_event(&source, &json!({})).await;
    let a = w
        .next_matching(|m| match m {
            ServerMsg::Assignment(a) if a.job_id == cancelled => Some(a.clone()),
            _ => None,
        })
        .await;
    assert_eq!(a.job_id, cancelled);
    let (code, _) = app
        .post(&format!("/api/v1/jobs/{cancelled}/cancel"), &json!({}))
        .await;
    assert_eq!(code, StatusCode::ACCEPTED);
    wait_for_status(&app.pool, &cancelled, "cancelled").await;
    assert_eq!(
        children(&app.pool, &cancelled).await,
        vec![always.clone()],
        "always fires for a job cancelled by the reaper, on_failure does not"
    );
    assert_eq!(messages(&app.pool, &cancelled).await.len(), 1);
}

#[tokio::test]
async fn a_job_cancelled_while_queued_fires_its_actions() {
    let app = spawn_app().await;
    let source = event(&app, "waiting").await;
    let (_, always) = failure_actions(&app, &source, "waiting").await;
    // No worker is connected: the job stays queued until cancelled.
    let job = app.run_event(&source, &json!({})).await;
    let (code, body) = app
        .post(&format!("/api/v1/jobs/{job}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (code, body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("cancelled"))
    );
    assert_eq!(children(&app.pool, &job).await, vec![always]);
    assert_eq!(
        messages(&app.pool, &job).await,
        vec!["cancelled: cancelled before it started".to_owned()]
    );
}

const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----";

async fn server(app: &TestApp, name: &str) -> String {
    let (status, srv) = app
        .post(
            "/api/v1/servers",
            &json!({"name": name, "host": "127.0.0.1", "port": 2222, "username": "deploy",
            "private_key": KEY, "host_key_policy": "accept_new"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{srv}");
    srv["id"].as_str().expect("id").to_owned()
}

async fn ssh_event(app: &TestApp, name: &str, server_id: &str) -> String {
    app.create_event(
        &json!({"name": name, "runtime": "bash", "content": "uptime", "server_id": server_id}),
    )
    .await["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

async fn ssh_worker(app: &TestApp, slots: u32) -> ScriptedWorker {
    let token = app.token(Role::Worker).await;
    let mut h = hello(Uuid::now_v7(), slots);
    h.executors = vec!["ssh".into()];
    ScriptedWorker::connect(&app.grpc_address, &token, h)
        .await
        .0
}

#[tokio::test]
async fn a_job_whose_server_was_deleted_fails_with_the_reason_and_fires_its_actions() {
    let app = spawn_app().await;
    let (gone, other) = (server(&app, "gone").await, server(&app, "other").await);
    let source = ssh_event(&app, "remote", &gone).await;
    let (on_failure, always) = failure_actions(&app, &source, "remote").await;
    // Queued while the event still pointed at `gone`; then the event moves and `gone` goes.
    let job = app.run_event(&source, &json!({})).await;
    let (code, body) = app
        .patch(
            &format!("/api/v1/events/{source}"),
            &json!({"server_id": other}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (code, body) = app.delete(&format!("/api/v1/servers/{gone}")).await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{body}");

    let mut w = ssh_worker(&app, 1).await;
    wait_for_status(&app.pool, &job, "failed").await;
    let (_, view) = app.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(view["dead"], true);
    let message = view["error"]["message"].as_str().expect("message");
    assert!(
        message.contains(&format!("server {gone} no longer exists")),
        "{message}"
    );
    assert_eq!(
        children(&app.pool, &job).await,
        sorted(vec![on_failure, always]),
        "on_failure and always fire for a job the dispatcher could not run"
    );
    assert_eq!(messages(&app.pool, &job).await.len(), 1);
    // The worker never saw it (the chained bash jobs are for other workers).
    assert!(w.try_next(Duration::from_millis(300)).await.is_none());
}

/// Adds `lock_timeout` to the api's connections, so a statement waiting on a lock the test
/// holds fails (as a passing database error) instead of waiting.
fn with_lock_timeout(c: &mut baton_api::ApiConfig) {
    let sep = if c.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    c.database_url
        .push_str(&format!("{sep}options[lock_timeout]=300ms"));
    // A lease far longer than the test: a job left claimed would stay so.
    c.lease = Duration::from_secs(120);
}

/// Holds an ACCESS EXCLUSIVE lock on `table` from its own connection until dropped (rolled
/// back), and watches the api's statements wait on it.
struct TableLock {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    watcher: PgPool,
    table: &'static str,
}

impl TableLock {
    async fn take(database_url: &str, table: &'static str) -> Self {
        let holder = PgPool::connect(database_url).await.expect("connect");
        let mut tx = holder.begin().await.expect("begin");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        )))
        .execute(&mut *tx)
        .await
        .expect("lock");
        let watcher = PgPool::connect(database_url).await.expect("connect");
        Self { tx, watcher, table }
    }

    async fn waiters(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass AND NOT granted",
        )
        .bind(self.table)
        .fetch_one(&self.watcher)
        .await
        .expect("pg_locks")
    }

    /// Waits until a statement of the api waited on the lock and gave up, `times` times.
    async fn wait_for_timeouts(&self, times: usize) {
        let deadline = Instant::now() + DEADLINE;
        for _ in 0..times {
            while self.waiters().await == 0 {
                assert!(
                    Instant::now() < deadline,
                    "nothing waited on {}",
                    self.table
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            while self.waiters().await > 0 {
                assert!(
                    Instant::now() < deadline,
                    "the wait on {} never ended",
                    self.table
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    async fn release(self) {
        self.tx.rollback().await.expect("unlock");
    }
}

async fn attempts_and_losses(pool: &PgPool, job: &str) -> (i32, i32) {
    sqlx::query_as("SELECT attempt, lease_losses FROM jobs WHERE id = $1::uuid")
        .bind(job)
        .fetch_one(pool)
        .await
        .expect("job")
}

#[tokio::test]
async fn a_passing_error_loading_the_server_gives_the_job_back_instead_of_failing_it() {
    let app = spawn_app_with(with_lock_timeout).await;
    let srv = server(&app, "flaky-db").await;
    let source = ssh_event(&app, "remote", &srv).await;
    let mut w = ssh_worker(&app, 1).await;
    let lock = TableLock::take(&app.database_url, "servers").await;
    let job = app.run_event(&source, &json!({})).await;
    // The dispatcher claims the job, cannot read the server, gives the job back, and tries
    // again: twice at least.
    lock.wait_for_timeouts(2).await;
    assert_ne!(status(&app.pool, &job).await, "failed");
    lock.release().await;
    let a = assignment(&mut w).await;
    assert_eq!(a.job_id, job);
    assert_eq!(a.attempt, 1, "no attempt was used");
    assert_eq!(
        attempts_and_losses(&app.pool, &job).await,
        (1, 0),
        "neither an attempt nor a lease loss was used"
    );
    let target: Value = serde_json::from_str(&a.server_json).expect("server json");
    assert_eq!(target["server_id"], srv.as_str());
}

#[tokio::test]
async fn a_passing_error_in_a_batch_hands_over_the_rest_and_strands_nothing() {
    let app = spawn_app_with(with_lock_timeout).await;
    let source = event(&app, "batch").await;
    let jobs = [
        app.run_event(&source, &json!({})).await,
        app.run_event(&source, &json!({})).await,
        app.run_event(&source, &json!({})).await,
    ];
    // The variables of the event cannot be read while the lock is held.
    let lock = TableLock::take(&app.database_url, "variables").await;
    let token = app.token(Role::Worker).await;
    let (mut w, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 3)).await;
    lock.wait_for_timeouts(2).await;
    lock.release().await;
    // All three reach the worker well before the (2-minute) lease of a stranded claim would
    // have expired.
    let started = Instant::now();
    let mut got = Vec::new();
    for _ in 0..3 {
        let a = tokio::time::timeout(DEADLINE, assignment(&mut w))
            .await
            .expect("all jobs handed over promptly");
        assert_eq!(a.attempt, 1);
        got.push(a.job_id);
    }
    assert!(started.elapsed() < DEADLINE);
    assert_eq!(sorted(got), sorted(jobs.to_vec()));
    for job in &jobs {
        assert_eq!(attempts_and_losses(&app.pool, job).await, (1, 0));
    }
}

/// A message template that would run for ages (or render megabytes) inside the completion's
/// transaction is cut off at its fuel / size limit: the completion is recorded promptly, the
/// message says what went wrong, and the job carries a note.
#[tokio::test]
async fn a_runaway_message_template_does_not_hold_up_the_completion() {
    let app = spawn_app().await;
    let source = event(&app, "chatty").await;
    let endless =
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let huge = "{% for i in range(1000) %}{{ 'y' * 1000 }}{% endfor %}";
    for (template, subject) in [(endless, "fine"), ("fine", huge)] {
        add_action(&app, &source, json!({"trigger": "always", "action": {"type": "send_message",
            "channel": "webhook", "target": "http://127.0.0.1:9/hook", "template": template, "subject": subject}}))
        .await;
    }
    let token = app.token(Role::Worker).await;
    let (mut w, _) =
        ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 1)).await;
    let job = app.run_event(&source, &json!({})).await;
    let a = assignment(&mut w).await;
    let started = Instant::now();
    w.send(baton_proto::WorkerMsg::Finished(
        baton_proto::v1::Finished {
            job_id: job.clone(),
            lease_token: a.lease_token,
            exit_code: Some(0),
            ..Default::default()
        },
    ))
    .await;
    w.next_matching(|m| match m {
        ServerMsg::FinishedAck(f) if f.job_id == job => Some(()),
        _ => None,
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status(&app.pool, &job).await, "succeeded");
    let sent: Vec<(String, String)> = sqlx::query_as(
        "SELECT subject, body FROM message_outbox WHERE job_id = $1::uuid ORDER BY body",
    )
    .bind(&job)
    .fetch_all(&app.pool)
    .await
    .expect("messages");
    assert_eq!(sent.len(), 2, "both messages still go out");
    let failed = "[baton: the message template failed: ";
    assert!(
        sent.iter()
            .any(|(s, b)| s == "fine" && b.starts_with(failed) && b.contains("steps")),
        "{sent:?}"
    );
    assert!(
        sent.iter()
            .any(|(s, b)| b == "fine" && s.starts_with(failed) && s.contains("exceeds")),
        "{sent:?}"
    );
    let (_, view) = app.get(&format!("/api/v1/jobs/{job}")).await;
    let notes = view["action_notes"].to_string();
    assert!(notes.contains("the body template failed"), "{notes}");
    assert!(notes.contains("the subject template failed"), "{notes}");
}
