//! Chaos: real `baton-api` and `baton-worker` processes and a real PostgreSQL, each fault
//! injected for real (SIGKILL, SIGSTOP/SIGCONT, a crash-restart of the database), each test
//! bounded by deadlines and stopping by itself. What Baton promises under each fault is in
//! docs/architecture.md ("Faults and what Baton promises").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use baton_tests::test_database;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use sqlx::Row;
use uuid::Uuid;

use crate::support::{ApiProcess, WorkerProcess, all_lines, local_event, wait_job};

/// Lease and reaper settings that make a lost worker visible within seconds.
const SHORT_LEASE: [(&str, &str); 2] = [
    ("BATON_LEASE_SECONDS", "3"),
    ("BATON_REAPER_INTERVAL_SECONDS", "0.2"),
];

/// Every job of `event_id`, as `(id, status, attempt, worker_id)`.
async fn jobs_of(pool: &sqlx::PgPool, event_id: &str) -> Vec<(Uuid, String, i32, Option<Uuid>)> {
    sqlx::query(
        "SELECT id, status::text AS status, attempt, worker_id FROM jobs WHERE event_id = $1::uuid ORDER BY id",
    )
    .bind(event_id)
    .fetch_all(pool)
    .await
    .expect("jobs")
    .into_iter()
    .map(|r| {
        (
            r.get("id"),
            r.get("status"),
            r.get("attempt"),
            r.get("worker_id"),
        )
    })
    .collect()
}

/// Waits until `check(jobs)` holds for the event's jobs (180 s at most).
async fn wait_jobs(
    pool: &sqlx::PgPool,
    event_id: &str,
    what: &str,
    check: impl Fn(&[(Uuid, String, i32, Option<Uuid>)]) -> bool,
) -> Vec<(Uuid, String, i32, Option<Uuid>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let jobs = jobs_of(pool, event_id).await;
        if check(&jobs) {
            return jobs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: never happened; jobs: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn texts(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l["text"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_worker_killed_with_50_runs_in_flight_loses_none_and_records_each_once() {
    let db = test_database().await;
    let api = ApiProcess::start(&db, &SHORT_LEASE).await;
    let app = api.app(&db).await;
    // The first attempts wait for `go`, created only after their worker is dead.
    let dir = tempfile::tempdir().expect("tempdir");
    let go = dir.path().join("go");
    let ev = local_event(
        &app,
        "in-flight",
        "sh",
        &format!(
            "echo start; while [ ! -e {} ]; do sleep 0.1; done; echo done",
            go.display()
        ),
    )
    .await;
    let mut first = WorkerProcess::start(&app, 50).await;
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(app.run_event(&ev, &json!({})).await);
    }
    wait_jobs(&app.pool, &ev, "50 runs in flight", |jobs| {
        jobs.len() == 50 && jobs.iter().all(|j| j.1 == "running")
    })
    .await;
    first.signal(Signal::SIGKILL);
    assert!(!first.wait().await, "killed");
    let killed_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&app.pool)
        .await
        .expect("now");
    std::fs::write(&go, "").expect("go");
    let second = WorkerProcess::start(&app, 50).await;

    let jobs = wait_jobs(&app.pool, &ev, "every run finished", |jobs| {
        jobs.iter()
            .all(|j| !matches!(j.1.as_str(), "queued" | "claimed" | "running"))
    })
    .await;
    assert_eq!(jobs.len(), 50, "no run lost, none added");
    for (id, status, attempt, _) in &jobs {
        assert_eq!(status, "succeeded", "job {id}");
        assert_eq!(*attempt, 2, "job {id} ran once more after the kill");
    }
    // Reassigned within the lease + 5 s of the kill.
    let late: Vec<(Uuid, f64)> = sqlx::query_as(
        "SELECT id, extract(epoch FROM claimed_at - $2)::float8 FROM jobs
         WHERE event_id = $1::uuid AND claimed_at > $2 + interval '8 seconds'",
    )
    .bind(&ev)
    .bind(killed_at)
    .fetch_all(&app.pool)
    .await
    .expect("claims");
    assert!(late.is_empty(), "claimed later than lease + 5 s: {late:?}");
    // Each completion recorded once: one `done`, after the retry's marker.
    for id in &ids {
        let lines = texts(&all_lines(&app, id).await);
        assert_eq!(
            lines.iter().filter(|t| *t == "done").count(),
            1,
            "job {id}: {lines:?}"
        );
        assert!(
            lines.iter().any(|t| t.contains("attempt 2")),
            "job {id}: {lines:?}"
        );
    }
    drop(second);
}

#[tokio::test]
async fn a_worker_paused_past_its_lease_is_replaced_and_its_late_completion_refused() {
    let db = test_database().await;
    let api = ApiProcess::start(&db, &SHORT_LEASE).await;
    let app = api.app(&db).await;
    let (w1, w2) = (Uuid::now_v7(), Uuid::now_v7());
    let worker = |id: Uuid, label: &'static str| {
        let app = &app;
        async move {
            WorkerProcess::start_with_args(
                app,
                1,
                &[
                    "--allow-local",
                    "--no-container",
                    "--worker-id",
                    &id.to_string(),
                    "--labels",
                    label,
                ],
            )
            .await
        }
    };
    // Runs wait for `go`, then count themselves in `finished`.
    let dir = tempfile::tempdir().expect("tempdir");
    let (go, finished) = (dir.path().join("go"), dir.path().join("finished"));
    let ev = local_event(
        &app,
        "partitioned",
        "sh",
        &format!(
            "echo start; while [ ! -e {go} ]; do sleep 0.1; done; echo done; echo x >> {finished}",
            go = go.display(),
            finished = finished.display()
        ),
    )
    .await;
    let first = worker(w1, "box=one").await;
    let id = app.run_event(&ev, &json!({})).await;
    wait_job(&app, &id, |j| {
        j["status"] == "running" && j["worker_id"] == w1.to_string()
    })
    .await;

    // Cut off: the process stops answering (as behind a partition) past its lease.
    first.signal(Signal::SIGSTOP);
    wait_job(&app, &id, |j| j["attempt"] == 2).await;
    let second = worker(w2, "box=two").await;
    wait_job(&app, &id, |j| j["worker_id"] == w2.to_string()).await;
    // Both runs' scripts end, the first while its worker is still stopped; on waking, that
    // worker reports a completion under its old lease.
    std::fs::write(&go, "").expect("go");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&finished).map_or(0, |t| t.lines().count()) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the runs never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.signal(Signal::SIGCONT);

    let job = wait_job(&app, &id, |j| j["status"] == "succeeded").await;
    assert_eq!(job["worker_id"], w2.to_string(), "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    let lines = texts(&all_lines(&app, &id).await);
    assert_eq!(
        lines.iter().filter(|t| *t == "done").count(),
        1,
        "only the current lease's run is recorded: {lines:?}"
    );

    // The woken worker was told its lease was lost and freed its slot: it runs a job meant
    // for it alone.
    let probe = app
        .create_event(
            &json!({"name": "probe", "runtime": "sh", "content": "echo probe",
            "executor": "local", "labels": {"box": "one"}}),
        )
        .await;
    let probe_id = app
        .run_event(probe["id"].as_str().expect("id"), &json!({}))
        .await;
    let probe_job = wait_job(&app, &probe_id, |j| j["status"] == "succeeded").await;
    assert_eq!(probe_job["worker_id"], w1.to_string(), "{probe_job}");
    drop(second);
    drop(first);
}

#[tokio::test]
async fn a_database_crash_restart_under_load_loses_no_job_and_the_api_recovers_by_itself() {
    // A cluster of its own: the restart must not disturb the other tests' databases.
    let cluster = std::sync::Arc::new(
        baton_devdb::Cluster::throwaway()
            .await
            .expect("a private cluster"),
    );
    let db_name = cluster
        .create_unique_database("chaos", None)
        .await
        .expect("database");
    // The throwaway cluster commits asynchronously (synchronous_commit=off, for speed): a
    // crash then loses the last fraction of a second of commits, which no client could tell
    // from a lost job. This database commits durably, as a production one does.
    let admin = sqlx::PgPool::connect(&cluster.url("postgres"))
        .await
        .expect("admin connection");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{db_name}\" SET synchronous_commit = on"
    )))
    .execute(&admin)
    .await
    .expect("durable commits");
    admin.close().await;
    let db = cluster.url(&db_name);
    let api = ApiProcess::start(
        &db,
        &[
            ("BATON_LEASE_SECONDS", "5"),
            ("BATON_REAPER_INTERVAL_SECONDS", "0.5"),
        ],
    )
    .await;
    let app = api.app(&db).await;
    let ev = local_event(
        &app,
        "steady",
        "sh",
        "for i in 1 2 3 4 5; do echo line $i; sleep 0.1; done",
    )
    .await;
    let worker = WorkerProcess::start(&app, 4).await;

    // Load: a run every 100 ms; the database crashes and restarts after the tenth.
    let mut accepted = Vec::new();
    let mut outcomes = Vec::new();
    let mut restart = None;
    for i in 0..30 {
        if i == 10 {
            let cluster = cluster.clone();
            restart = Some(tokio::task::spawn_blocking(move || {
                cluster.restart_immediate()
            }));
        }
        let answer = app
            .request(reqwest::Method::POST, &format!("/api/v1/events/{ev}/run"))
            .json(&json!({}))
            .timeout(Duration::from_secs(20))
            .send()
            .await;
        match answer {
            Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => {
                let body: Value = r.json().await.expect("json");
                accepted.push(body["job_id"].as_str().expect("job_id").to_owned());
                outcomes.push(true);
            }
            Ok(r) => {
                assert!(
                    r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
                        || r.status() == reqwest::StatusCode::INTERNAL_SERVER_ERROR,
                    "unexpected answer while the database restarts: {}",
                    r.status()
                );
                outcomes.push(false);
            }
            Err(e) => panic!("the api stopped answering: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    restart
        .expect("restarted")
        .await
        .expect("restart task")
        .expect("pg_ctl restart");
    // Once the database is back, the api serves again with no help.
    for _ in 0..10 {
        accepted.push(app.run_event(&ev, &json!({})).await);
    }
    tracing::info!(
        ?outcomes,
        "runs accepted (true) or refused during the restart"
    );

    // Every job the database holds ends, and every accepted one succeeded with all its lines.
    let jobs = wait_jobs(&app.pool, &ev, "every job finished", |jobs| {
        jobs.iter()
            .all(|j| !matches!(j.1.as_str(), "queued" | "claimed" | "running"))
    })
    .await;
    for id in &accepted {
        let job = jobs
            .iter()
            .find(|j| j.0.to_string() == *id)
            .unwrap_or_else(|| panic!("accepted job {id} was lost"));
        assert_eq!(job.1, "succeeded", "job {id}");
        let lines = texts(&all_lines(&app, id).await);
        let wanted: Vec<String> = (1..=5).map(|i| format!("line {i}")).collect();
        let got: Vec<String> = lines
            .into_iter()
            .filter(|t| t.starts_with("line "))
            .collect();
        // A run interrupted by the crash ran again: its lines are those of both attempts.
        assert!(got.ends_with(&wanted), "job {id}: lines {got:?}");
    }
    // The notification listener came back: a LISTEN connection exists again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listening: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%'")
                .fetch_one(&app.pool)
                .await
                .expect("pg_stat_activity");
        if listening > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the api never listened again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(worker);
}

/// One run request of the load in [`an_api_replica_killed_under_load_loses_no_job_and_no_line`].
#[derive(Debug)]
struct Submission {
    replica: &'static str,
    after_kill: bool,
    /// The job id (202), or the transport error of a request to the killed replica.
    outcome: Result<String, String>,
}

/// The `api_id` of a replica, as its `Welcome` tells a (scripted) worker; the replica stores
/// the same id in `workers.api_id` for the workers it holds.
async fn api_id_of(app: &baton_tests::TestApp, grpc_address: &str) -> String {
    let token = app.token(baton_api::model::Role::Worker).await;
    // It offers only `ssh`: no job of these tests is ever assigned to it.
    let mut hello = baton_tests::protocol::hello(Uuid::now_v7(), 1);
    hello.executors = vec!["ssh".into()];
    let (probe, welcome) =
        baton_tests::protocol::ScriptedWorker::connect(grpc_address, &token, hello).await;
    drop(probe);
    assert!(!welcome.api_id.is_empty(), "{welcome:?}");
    welcome.api_id
}

/// How many of `workers` the database shows held by the replica `api_id`.
async fn held_by(pool: &sqlx::PgPool, workers: &[Uuid], api_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM workers WHERE id = ANY($1) AND api_id::text = $2")
        .bind(workers)
        .bind(api_id)
        .fetch_one(pool)
        .await
        .expect("workers")
}

#[tokio::test]
async fn an_api_replica_killed_under_load_loses_no_job_and_no_line() {
    let db = test_database().await;
    let settings = [
        ("BATON_LEASE_SECONDS", "5"),
        ("BATON_REAPER_INTERVAL_SECONDS", "0.2"),
    ];
    let mut a = ApiProcess::start(&db, &settings).await;
    let b = ApiProcess::start(&db, &settings).await;
    let app = b.app(&db).await;
    let (a_id, b_id) = (
        api_id_of(&app, &a.grpc_address).await,
        api_id_of(&app, &b.grpc_address).await,
    );
    assert_ne!(a_id, b_id);
    // 50 numbered lines over about a second.
    let ev = local_event(
        &app,
        "steady-lines",
        "sh",
        "i=1; while [ $i -le 50 ]; do echo \"line $i\"; i=$((i+1)); sleep 0.02; done",
    )
    .await;

    // Two workers, both told A first, then B.
    let urls = format!("{},{}", a.grpc_address, b.grpc_address);
    let ids = [Uuid::now_v7(), Uuid::now_v7()];
    let mut workers = Vec::new();
    for id in ids {
        let id = id.to_string();
        let args = ["--allow-local", "--no-container", "--worker-id", &id];
        workers.push(WorkerProcess::start_on(&app, &urls, 8, &args).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while held_by(&app.pool, &ids, &a_id).await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the workers never connected to the first URL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Load through both replicas, alternating, until 40 runs were asked for and 10 of them
    // after the kill.
    let killed = Arc::new(AtomicBool::new(false));
    let submitted = Arc::new(AtomicUsize::new(0));
    let load = {
        let (a_http, b_http, ev, killed, submitted) = (
            a.address.clone(),
            b.address.clone(),
            ev.clone(),
            killed.clone(),
            submitted.clone(),
        );
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut submissions: Vec<Submission> = Vec::new();
            let mut i = 0usize;
            while submissions.len() < 40 || submissions.iter().filter(|s| s.after_kill).count() < 10
            {
                let (replica, base) = if i.is_multiple_of(2) {
                    ("A", &a_http)
                } else {
                    ("B", &b_http)
                };
                i += 1;
                let after_kill = killed.load(Ordering::SeqCst);
                let answer = client
                    .post(format!("{base}/api/v1/events/{ev}/run"))
                    .bearer_auth(baton_tests::ADMIN_TOKEN)
                    .json(&json!({}))
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                let outcome = match answer {
                    Ok(r) => {
                        let status = r.status();
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        assert_eq!(
                            status,
                            reqwest::StatusCode::ACCEPTED,
                            "replica {replica} answered: {body}"
                        );
                        Ok(body["job_id"].as_str().expect("job_id").to_owned())
                    }
                    Err(e) => {
                        assert_eq!(replica, "A", "the surviving replica failed a run: {e}");
                        Err(e.to_string())
                    }
                };
                submissions.push(Submission {
                    replica,
                    after_kill,
                    outcome,
                });
                submitted.fetch_add(1, Ordering::SeqCst);
                // A steady pace, not a synchronisation.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            submissions
        })
    };

    // Kill A in the middle of the load: 16 runs asked for, several running with their lines
    // partly stored.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let in_flight = loop {
        let busy: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE event_id = $1::uuid AND status = 'running' AND last_log_seq >= 5",
        )
        .bind(&ev)
        .fetch_one(&app.pool)
        .await
        .expect("running jobs");
        if busy >= 4 && submitted.load(Ordering::SeqCst) >= 16 {
            break busy;
        }
        assert!(
            tokio::time::Instant::now() < deadline && !load.is_finished(),
            "the load never got going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let kill_started = tokio::time::Instant::now();
    a.kill();
    killed.store(true, Ordering::SeqCst);
    println!(
        "killed replica A with {in_flight} runs in flight, {} runs asked for",
        submitted.load(Ordering::SeqCst)
    );

    // Both workers are on B again: held by B in the database, and connected as the REST API
    // shows them.
    let deadline = kill_started + Duration::from_secs(60);
    let reconnected = loop {
        if held_by(&app.pool, &ids, &b_id).await == 2 {
            let (_, list) = app.get("/api/v1/workers").await;
            let connected = list
                .as_array()
                .or_else(|| list["workers"].as_array())
                .map_or(0, |ws| {
                    ws.iter()
                        .filter(|w| {
                            ids.iter().any(|id| w["id"] == id.to_string()) && w["connected"] == true
                        })
                        .count()
                });
            if connected == 2 {
                break kill_started.elapsed();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the workers never reconnected to the surviving replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("both workers reconnected to the surviving replica {reconnected:?} after the kill");
    assert!(
        reconnected <= Duration::from_secs(2),
        "the workers took {reconnected:?} to reconnect (at most 2 s)"
    );

    let submissions = load.await.expect("the load");
    let accepted: Vec<&String> = submissions
        .iter()
        .filter_map(|s| s.outcome.as_ref().ok())
        .collect();
    let refused = submissions.iter().filter(|s| s.outcome.is_err()).count();
    assert!(
        submissions
            .iter()
            .any(|s| s.after_kill && s.replica == "B" && s.outcome.is_ok()),
        "the load went on through the surviving replica: {submissions:?}"
    );

    // Every job the database holds (accepted ones, and any whose answer the kill cut off)
    // ends well, with each of its 50 lines stored once, in order.
    let jobs = wait_jobs(&app.pool, &ev, "every run finished", |jobs| {
        jobs.iter()
            .all(|j| !matches!(j.1.as_str(), "queued" | "claimed" | "running"))
    })
    .await;
    for id in &accepted {
        assert!(
            jobs.iter().any(|j| j.0.to_string() == **id),
            "accepted job {id} was lost"
        );
    }
    let wanted: Vec<String> = (1..=50).map(|i| format!("line {i}")).collect();
    for (id, status, _, _) in &jobs {
        assert_eq!(status, "succeeded", "job {id}");
        let lines: Vec<String> = texts(&all_lines(&app, &id.to_string()).await)
            .into_iter()
            .filter(|t| t.starts_with("line "))
            .collect();
        assert_eq!(lines, wanted, "job {id}: its lines, each once, in order");
    }
    let retried = jobs.iter().filter(|j| j.2 > 1).count();
    println!(
        "{} runs asked for, {} accepted, {refused} refused by the killed replica; {} jobs stored, {retried} ran again (assignments lost with the replica)",
        submissions.len(),
        accepted.len(),
        jobs.len()
    );
    drop(workers);
}

/// Whether `GET /api/v1/workers` shows the worker `id` connected (None: not listed).
async fn shown_connected(app: &baton_tests::TestApp, id: Uuid) -> Option<bool> {
    let (_, list) = app.get("/api/v1/workers").await;
    list.as_array()?
        .iter()
        .find(|w| w["id"] == id.to_string())
        .and_then(|w| w["connected"].as_bool())
}

#[tokio::test]
async fn a_worker_whose_replica_was_killed_is_shown_disconnected_within_a_lease() {
    let db = test_database().await;
    let mut a = ApiProcess::start(&db, &SHORT_LEASE).await;
    let b = ApiProcess::start(&db, &SHORT_LEASE).await;
    let app = b.app(&db).await;
    // The worker knows only A: once A is gone, it holds no stream anywhere.
    let id = Uuid::now_v7();
    let worker = WorkerProcess::start_on(
        &app,
        &a.grpc_address,
        1,
        &[
            "--allow-local",
            "--no-container",
            "--worker-id",
            &id.to_string(),
        ],
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while shown_connected(&app, id).await != Some(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Killed, A cannot record that the worker's stream ended.
    let killed = tokio::time::Instant::now();
    a.kill();
    let deadline = killed + Duration::from_secs(30);
    while shown_connected(&app, id).await != Some(false) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker of the killed replica is still shown connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let shown = killed.elapsed();
    println!("shown disconnected {shown:?} after its replica was killed");
    // A lease (3 s) after its last heartbeat, which came at most a third of a lease before the
    // kill; 2 s of slack for a loaded machine.
    assert!(shown <= Duration::from_secs(5), "took {shown:?}");
    drop(worker);
}
