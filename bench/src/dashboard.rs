//! `dashboard`: how fast the runs page renders server-side with a large history. Seeds N
//! finished jobs (default 1,000,000) across 10 events and 5 workers with one `INSERT … SELECT
//! generate_series`, vacuums and analyzes, signs in through the dashboard's form, then times
//! `GET /` pages (the whole request over loopback: session, queries, templates):
//!
//! - `first`: the home page (counts, active runs, the newest 50 runs);
//! - `status_deep`: `?status=failed` with a cursor 90% of the way down that status;
//! - `event_deep`: `?event_id=…` with a cursor 90% of the way down that event;
//! - `worker_deep`: `?worker_id=…` likewise;
//! - `dead_deep`: `?dead=true` likewise.
//!
//! Reports p50/p95 (ms) per page; the target is p95 ≤ 100 ms.

use std::time::Instant;

use anyhow::{Context, bail, ensure};
use serde_json::json;
use uuid::Uuid;

use crate::support::{self, ADMIN_TOKEN, Summary, quantile};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Finished jobs to seed.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: i64,
    /// Timed requests per page (after 5 untimed).
    #[arg(long, default_value_t = 100)]
    requests: usize,
}

/// One statement: `n` finished jobs, one every 5 s back from now (ids are UUIDv7 of their
/// creation time), 80% succeeded, 15% failed (a third of those dead), 5% cancelled.
const SEED: &str = "
INSERT INTO jobs (id, event_id, status, priority, run_at, attempt, max_attempts, dead, executor, spec,
                  input, output, progress, exit_code, error_kind, error_message, worker_id,
                  root_job_id, created_at, claimed_at, started_at, finished_at)
SELECT id, $2[1 + i % 10], status, 0, created, 1, 1, status = 'failed' AND i % 3 = 0, 'local', '{}',
       '{}', CASE WHEN status = 'succeeded' THEN '{\"rows\": 3}'::jsonb END, 100,
       CASE status WHEN 'succeeded' THEN 0 WHEN 'failed' THEN 1 END,
       CASE status WHEN 'failed' THEN 'script' WHEN 'cancelled' THEN 'cancelled' END,
       CASE status WHEN 'failed' THEN 'exit code 1' WHEN 'cancelled' THEN 'cancelled through the API' END,
       $3[1 + i % 5], id, created, created, created, created + interval '2 seconds'
FROM (
    SELECT i, created,
           (lpad(to_hex((extract(epoch FROM created) * 1000)::bigint), 12, '0') || '7'
            || lpad(to_hex(i % 4096), 3, '0') || '8' || lpad(to_hex(i), 15, '0'))::uuid AS id,
           CASE WHEN i % 20 = 0 THEN 'cancelled' WHEN i % 20 < 4 THEN 'failed' ELSE 'succeeded' END AS status
    FROM (SELECT i, now() - ($1 - i) * interval '5 seconds' - interval '1 hour' AS created
          FROM generate_series(1, $1) AS i) g
) s";

pub async fn run(args: Args) -> anyhow::Result<Summary> {
    let cluster = support::cluster().await?;
    let api = support::start_api(&cluster, "bench_dashboard", 4, |_| {}).await?;
    let mut events = Vec::new();
    for n in 0..10 {
        let id = api
            .create_event(&json!({"name": format!("report-{n}"), "runtime": "bash", "content": "echo hi", "executor": "local"}))
            .await?;
        events.push(Uuid::parse_str(&id)?);
    }
    let workers: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    for (n, id) in workers.iter().enumerate() {
        sqlx::query(
            "INSERT INTO workers (id, name, executors, slots) VALUES ($1, $2, '{local}', 8)",
        )
        .bind(id)
        .bind(format!("worker-{n}"))
        .execute(&api.pool)
        .await?;
    }
    let started = Instant::now();
    let seeded = sqlx::query(SEED)
        .bind(args.jobs)
        .bind(&events)
        .bind(&workers)
        .execute(&api.pool)
        .await
        .context("seeding jobs")?
        .rows_affected();
    println!(
        "seeded {seeded} jobs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    sqlx::query("VACUUM ANALYZE jobs")
        .execute(&api.pool)
        .await?;

    let base = api.rest.base().to_owned();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let cookie = sign_in(&client, &base).await?;

    // A cursor 90% of the way down each filter.
    let deep = |filter: String| {
        let pool = api.pool.clone();
        async move {
            let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM jobs WHERE {filter}"
            )))
            .fetch_one(&pool)
            .await?;
            let id: Uuid = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT id FROM jobs WHERE {filter} ORDER BY id DESC OFFSET $1 LIMIT 1"
            )))
            .bind(count * 9 / 10)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(id)
        }
    };
    let pages = vec![
        ("first", "/".to_owned()),
        (
            "status_deep",
            format!(
                "/?status=failed&cursor={}",
                deep("status = 'failed'".into()).await?
            ),
        ),
        (
            "event_deep",
            format!(
                "/?event_id={}&cursor={}",
                events[3],
                deep(format!("event_id = '{}'", events[3])).await?
            ),
        ),
        (
            "worker_deep",
            format!(
                "/?worker_id={}&cursor={}",
                workers[2],
                deep(format!("worker_id = '{}'", workers[2])).await?
            ),
        ),
        (
            "dead_deep",
            format!("/?dead=true&cursor={}", deep("dead".into()).await?),
        ),
    ];
    let mut summary = Summary::new("dashboard").field("jobs", seeded);
    let mut worst_p95: f64 = 0.0;
    for (name, path) in &pages {
        let mut times = Vec::with_capacity(args.requests);
        for i in 0..args.requests + 5 {
            let t = Instant::now();
            let response = client
                .get(format!("{base}{path}"))
                .header("cookie", &cookie)
                .send()
                .await?;
            let status = response.status();
            let body = response.text().await?;
            let elapsed = t.elapsed().as_secs_f64() * 1000.0;
            ensure!(status.is_success(), "{path}: {status}: {body}");
            ensure!(
                body.matches("<tr class=\"run\"").count() == 50,
                "{path}: not a full page of runs"
            );
            if i >= 5 {
                times.push(elapsed);
            }
        }
        let (p50, p95) = (quantile(&times, 0.5), quantile(&times, 0.95));
        println!("{name:12} {path}: p50 {p50:.1} ms, p95 {p95:.1} ms");
        worst_p95 = worst_p95.max(p95);
        summary = summary
            .field(format!("{name}_p50_ms"), format!("{p50:.1}"))
            .field(format!("{name}_p95_ms"), format!("{p95:.1}"));
    }
    api.stop().await?;
    Ok(summary.field("worst_p95_ms", format!("{worst_p95:.1}")))
}

/// Signs in through the form (the double-submitted nonce, then the token); returns the
/// `Cookie` header of the session.
async fn sign_in(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let form = client.get(format!("{base}/login")).send().await?;
    let nonce = cookie_value(&form, "baton_login").context("no sign-in nonce cookie")?;
    let answer = client
        .post(format!("{base}/login"))
        .header("cookie", format!("baton_login={nonce}"))
        .header("content-type", "application/x-www-form-urlencoded")
        // Both are alphanumeric (and `-`): nothing to encode.
        .body(format!("_csrf={nonce}&token={ADMIN_TOKEN}&next=%2F"))
        .send()
        .await?;
    match cookie_value(&answer, "baton_session") {
        Some(session) => Ok(format!("baton_session={session}")),
        None => bail!("sign-in refused: {}", answer.status()),
    }
}

fn cookie_value(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v.to_owned())
}
