//! `throughput`: end-to-end jobs per second of trivial jobs through the api, the gRPC worker
//! stream and PostgreSQL, with 1 and with 4 in-process workers, beside the raw SQL loop of
//! `bench/run queue` on the same PostgreSQL in the same run.
//!
//! There is no job kind that starts no process, so every job is `exec` `["true"]` on the
//! `local` executor: each one costs a run directory and a fork/exec on top of the
//! orchestration.
//!
//! Per phase (one per worker count, each on a fresh database with a fresh api replica): W
//! in-process workers of S slots connect; an unmeasured warm-up runs; then the clock starts
//! and C concurrent clients enqueue N jobs, through `POST /api/v1/events/{id}/run` (default,
//! the realistic path) or with `--enqueue sql` straight through `queue::enqueue` on the
//! benchmark's own connections, while the workers run them. The clock stops when all N are
//! `succeeded` (polled every 20 ms); any other final status fails the benchmark. Reported:
//! jobs/s over that wall time, the enqueue-only time, and CPU per job of this process (api,
//! workers, clients, not the `true` processes) and of the database's PostgreSQL backends.
//!
//! `raw_jobs_per_s` is the queue benchmark's raw path (1 INSERT, 1/B of a claim, and one
//! completion transaction per job, on C' clients) on its own database of the same cluster;
//! `ratio` = 4-worker jobs/s ÷ raw jobs/s.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use baton_api::storage::{events, queue as jobs_queue};
use serde_json::json;
use tokio::task::JoinSet;

use crate::queue;
use crate::support::{self, ApiHandle, Summary, median};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Enqueue {
    /// `POST /api/v1/events/{id}/run`.
    Rest,
    /// `queue::enqueue` on the benchmark's own connections.
    Sql,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Jobs per measured phase.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    jobs: u64,
    /// Worker counts, one phase each.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    workers: Vec<u32>,
    /// Slots per worker.
    #[arg(long, default_value_t = 16)]
    slots: u32,
    /// Concurrent enqueueing clients.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=256))]
    clients: u32,
    /// How jobs are enqueued.
    #[arg(long, value_enum, default_value_t = Enqueue::Rest)]
    enqueue: Enqueue,
    /// The api replica's database connections.
    #[arg(long, default_value_t = 20)]
    api_pool: u32,
    /// Measured rounds of every phase; medians are reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Unmeasured jobs per phase before the clock starts.
    #[arg(long, default_value_t = 500)]
    warmup_jobs: u64,
    /// Clients of the raw SQL baseline (as `bench/run queue --clients`).
    #[arg(long, default_value_t = 4)]
    raw_clients: u32,
    /// Batch of the raw SQL baseline (as `bench/run queue --batch`).
    #[arg(long, default_value_t = 32)]
    raw_batch: u64,
    /// Jobs of the raw SQL baseline.
    #[arg(long, default_value_t = 20_000)]
    raw_jobs: u64,
}

struct PhaseResult {
    rate: f64,
}

pub async fn run(args: Args) -> anyhow::Result<Summary> {
    ensure!(!args.workers.is_empty(), "--workers: at least one count");
    let cluster = support::cluster().await?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "config: exec [\"true\"] (local executor; no no-op job kind exists), jobs={} workers={:?} \
         slots={} enqueue={:?} clients={} api_pool={} rounds={} warmup_jobs={}; raw baseline \
         clients={} batch={} jobs={}; {cpus} CPUs, load average {}",
        args.jobs,
        args.workers,
        args.slots,
        args.enqueue,
        args.clients,
        args.api_pool,
        args.rounds,
        args.warmup_jobs,
        args.raw_clients,
        args.raw_batch,
        args.raw_jobs,
        support::load_average()
    );

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); args.workers.len()];
    let mut raw = Vec::new();
    for round in 0..args.rounds {
        for (i, &workers) in args.workers.iter().enumerate() {
            let result = phase(&cluster, &args, workers, round).await?;
            rates[i].push(result.rate);
        }
        let rate = queue::raw_rate(
            &cluster,
            &format!("bench_throughput_raw_{round}"),
            args.raw_jobs,
            args.raw_clients,
            args.raw_batch,
            2_000,
        )
        .await?;
        println!(
            "round {}/{}: raw SQL loop {rate:.0} jobs/s",
            round + 1,
            args.rounds
        );
        raw.push(rate);
    }
    cluster.stop().context("stopping PostgreSQL")?;

    let raw_rate = median(&raw);
    let mut summary = Summary::new("throughput");
    for (i, &workers) in args.workers.iter().enumerate() {
        let key: &'static str = match workers {
            1 => "jobs_per_s_1w",
            4 => "jobs_per_s_4w",
            _ => continue,
        };
        summary = summary.field(key, format!("{:.0}", median(&rates[i])));
    }
    // The headline figure: the largest worker count's.
    let last = median(&rates[args.workers.len() - 1]);
    Ok(summary
        .field("jobs_per_s", format!("{last:.0}"))
        .field("raw_jobs_per_s", format!("{raw_rate:.0}"))
        .field("ratio", format!("{:.2}", last / raw_rate))
        .field("job", "exec_true"))
}

/// One measured phase with `workers` workers on a fresh database and api.
async fn phase(
    cluster: &baton_devdb::Cluster,
    args: &Args,
    workers: u32,
    round: u32,
) -> anyhow::Result<PhaseResult> {
    let name = format!("bench_throughput_{workers}w_{round}");
    let api_pool = args.api_pool;
    let api = support::start_api(cluster, &name, args.clients + 2, |config| {
        config.db_pool_size = api_pool;
    })
    .await?;
    let mut handles = Vec::new();
    for _ in 0..workers {
        handles.push(api.start_worker(args.slots).await?);
    }
    api.wait_workers(usize::try_from(workers)?).await?;
    let event = api
        .create_event(&json!({
            "name": "bench-throughput", "runtime": "exec", "command": ["true"],
            "executor": "local", "timeout_seconds": 600
        }))
        .await?;

    if args.warmup_jobs > 0 {
        enqueue_all(&api, &event, args.warmup_jobs, args.clients, args.enqueue).await?;
        wait_succeeded(&api, args.warmup_jobs).await?;
    }

    let cpu_before = (
        support::cpu_time("self"),
        support::backends_cpu(&api.pool, &api.database).await?,
    );
    let stats_before = db_stats(&api).await?;
    let started = Instant::now();
    let enqueue_elapsed = enqueue_all(&api, &event, args.jobs, args.clients, args.enqueue).await?;
    wait_succeeded(&api, args.warmup_jobs + args.jobs).await?;
    let elapsed = started.elapsed();
    let cpu_after = (
        support::cpu_time("self"),
        support::backends_cpu(&api.pool, &api.database).await?,
    );
    let per_job = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
        (Some(b), Some(a)) => format!(
            "{:.0}",
            a.saturating_sub(b).as_secs_f64() * 1e6 / args.jobs as f64
        ),
        _ => "?".to_owned(),
    };
    let rate = args.jobs as f64 / elapsed.as_secs_f64();
    let stats_after = db_stats(&api).await?;
    let per = |i: usize| (stats_after[i].1 - stats_before[i].1) as f64 / args.jobs as f64;
    let breakdown: Vec<String> = (0..stats_after.len())
        .filter(|&i| per(i) >= 0.05)
        .map(|i| format!("{}={:.2}", stats_after[i].0, per(i)))
        .collect();
    println!(
        "  per job (database counters, incl. the benchmark's polling): {}",
        breakdown.join(" ")
    );
    println!(
        "round {} workers={workers}: {} jobs in {:.2} s = {rate:.0} jobs/s (enqueue alone took \
         {:.2} s = {:.0}/s); CPU µs/job: this process={} postgres={}; load average {}",
        round + 1,
        args.jobs,
        elapsed.as_secs_f64(),
        enqueue_elapsed.as_secs_f64(),
        args.jobs as f64 / enqueue_elapsed.as_secs_f64(),
        per_job(cpu_before.0, cpu_after.0),
        per_job(cpu_before.1, cpu_after.1),
        support::load_average()
    );

    for handle in handles {
        handle.stop().await?;
    }
    api.stop().await?;
    Ok(PhaseResult { rate })
}

/// Database counters: commits, and rows inserted / updated / deleted per table.
async fn db_stats(api: &ApiHandle) -> anyhow::Result<Vec<(String, i64)>> {
    // pg_stat_* are snapshots per transaction; a fresh one each call.
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&api.pool)
        .await?;
    let mut out: Vec<(String, i64)> = sqlx::query_as(
        "SELECT 'commits', xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_all(&api.pool)
    .await?;
    let tables: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables ORDER BY relname",
    )
    .fetch_all(&api.pool)
    .await?;
    for (table, ins, upd, del) in tables {
        out.push((format!("{table}.ins"), ins));
        out.push((format!("{table}.upd"), upd));
        out.push((format!("{table}.del"), del));
    }
    Ok(out)
}

/// Enqueues `jobs` jobs of `event` on `clients` concurrent clients; returns how long it took.
async fn enqueue_all(
    api: &ApiHandle,
    event: &str,
    jobs: u64,
    clients: u32,
    how: Enqueue,
) -> anyhow::Result<Duration> {
    let budget = Arc::new(AtomicU64::new(jobs));
    let take = |budget: &AtomicU64| {
        budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            })
            .is_ok()
    };
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    match how {
        Enqueue::Rest => {
            for _ in 0..clients {
                let rest = api.rest.clone();
                let budget = Arc::clone(&budget);
                let path = format!("/api/v1/events/{event}/run");
                tasks.spawn(async move {
                    while take(&budget) {
                        rest.post(&path, &json!({})).await?;
                    }
                    anyhow::Ok(())
                });
            }
        }
        Enqueue::Sql => {
            let event = Arc::new(events::get_event(&api.pool, event.parse()?).await?);
            for _ in 0..clients {
                let pool = api.pool.clone();
                let budget = Arc::clone(&budget);
                let event = Arc::clone(&event);
                tasks.spawn(async move {
                    let mut conn = pool.acquire().await?;
                    let job = jobs_queue::NewJob {
                        event: &event,
                        input: json!({}),
                        priority: event.spec.priority,
                        run_at: None,
                        idempotency_key: None,
                        parent: None,
                        created_by: None,
                    };
                    while take(&budget) {
                        jobs_queue::enqueue(&mut *conn, &job).await?;
                    }
                    anyhow::Ok(())
                });
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.context("an enqueueing task panicked")??;
    }
    Ok(started.elapsed())
}

/// Waits until `total` jobs are `succeeded` (polling every 20 ms: the count scans the table,
/// and PostgreSQL time spent on it would count against the api); fails on any other final
/// status or after 10 minutes.
async fn wait_succeeded(api: &ApiHandle, total: u64) -> anyhow::Result<()> {
    let total = i64::try_from(total)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (succeeded, bad): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'),
                    count(*) FILTER (WHERE status IN ('failed', 'timed_out', 'cancelled'))
             FROM jobs",
        )
        .fetch_one(&api.pool)
        .await?;
        if bad > 0 {
            let why: Option<String> = sqlx::query_scalar(
                "SELECT error_message FROM jobs WHERE status <> 'succeeded' AND finished_at IS NOT NULL LIMIT 1",
            )
            .fetch_one(&api.pool)
            .await?;
            bail!("{bad} jobs did not succeed, e.g.: {why:?}");
        }
        if succeeded >= total {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {succeeded} of {total} jobs succeeded after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
