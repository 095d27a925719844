//! `throughput`: end-to-end jobs per second of trivial jobs through the api, the gRPC worker
//! stream and PostgreSQL, with 1 and with 4 in-process workers, beside the raw SQL loop of
//! `bench/run queue` on the same PostgreSQL in the same run.
//!
//! Two kinds of trivial job, each measured: `noop` (the runtime that starts nothing: the
//! orchestration alone, the headline figure) and `exec` `["true"]` on the `local` executor
//! (a run directory and a fork/exec on top).
//!
//! Per phase (one per worker count, each on a fresh database with a fresh api replica): W
//! in-process workers of S slots connect; an unmeasured warm-up runs; then the clock starts
//! and C concurrent clients enqueue N jobs, through `POST /api/v1/events/{id}/run` (default,
//! the realistic path) or with `--enqueue sql` straight through `queue::enqueue` on the
//! benchmark's own connections, while the workers run them. The clock stops when all N are
//! finished (counted from the completion NOTIFYs, so no polling loads the database), and
//! then all must be `succeeded`; any other final status fails the benchmark. Reported:
//! jobs/s over that wall time, the enqueue-only time, and CPU per job of this process (api,
//! workers, clients, not the `true` processes) and of the database's PostgreSQL backends.
//!
//! `raw_jobs_per_s` is the queue benchmark's raw path (1 INSERT, 1/B of a claim, and one
//! completion transaction per job, on C' clients) on its own database of the same cluster;
//! `ratio` = jobs/s at the largest worker count ÷ raw jobs/s; `ratio_Nw` for each count.

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    /// `runtime: noop`: no process.
    Noop,
    /// `exec ["true"]` on the local executor.
    Exec,
}

impl Kind {
    fn event(self) -> serde_json::Value {
        match self {
            Kind::Noop => json!({
                "name": "bench-throughput-noop", "runtime": "noop", "executor": "local",
                "timeout_seconds": 600
            }),
            Kind::Exec => json!({
                "name": "bench-throughput-exec", "runtime": "exec", "command": ["true"],
                "executor": "local", "timeout_seconds": 600
            }),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The worker's scratch directory (`--scratch-dir` of baton-worker: run directories and
    /// working directories) [default: the system temp dir].
    #[arg(long)]
    scratch_dir: Option<std::path::PathBuf>,
    /// Job kinds, one phase per kind and worker count.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "noop,exec")]
    kinds: Vec<Kind>,
    /// Jobs per measured phase (as many as the raw loop's, so both are steady-state figures:
    /// a shorter phase is dominated by a fresh replica's first seconds).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
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
        "config: kinds={:?} (local executor), jobs={} workers={:?} \
         slots={} enqueue={:?} clients={} api_pool={} rounds={} warmup_jobs={}; raw baseline \
         clients={} batch={} jobs={}; {cpus} CPUs, load average {}",
        args.kinds,
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

    ensure!(!args.kinds.is_empty(), "--kinds: at least one kind");
    // rates[kind][workers]: one figure per round.
    let mut rates = vec![vec![Vec::new(); args.workers.len()]; args.kinds.len()];
    let mut raw = Vec::new();
    for round in 0..args.rounds {
        for (k, &kind) in args.kinds.iter().enumerate() {
            for (i, &workers) in args.workers.iter().enumerate() {
                let result = phase(&cluster, &args, kind, workers, round).await?;
                rates[k][i].push(result.rate);
            }
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
    for (k, &kind) in args.kinds.iter().enumerate() {
        let prefix = match kind {
            Kind::Noop => "jobs_per_s",
            Kind::Exec => "exec_true_jobs_per_s",
        };
        for (i, &workers) in args.workers.iter().enumerate() {
            summary = summary.field(
                format!("{prefix}_{workers}w"),
                format!("{:.0}", median(&rates[k][i])),
            );
        }
    }
    // Every worker count's ratio for the headline kind, so none hides behind another.
    for (i, &workers) in args.workers.iter().enumerate() {
        summary = summary.field(
            format!("ratio_{workers}w"),
            format!("{:.2}", median(&rates[0][i]) / raw_rate),
        );
    }
    // The headline figures: the first kind's, at the largest worker count.
    let last = median(&rates[0][args.workers.len() - 1]);
    let kind = match args.kinds[0] {
        Kind::Noop => "noop",
        Kind::Exec => "exec_true",
    };
    Ok(summary
        .field("jobs_per_s", format!("{last:.0}"))
        .field("raw_jobs_per_s", format!("{raw_rate:.0}"))
        .field("ratio", format!("{:.2}", last / raw_rate))
        .field("job", kind))
}

/// One measured phase with `workers` workers on a fresh database and api.
async fn phase(
    cluster: &baton_devdb::Cluster,
    args: &Args,
    kind: Kind,
    workers: u32,
    round: u32,
) -> anyhow::Result<PhaseResult> {
    let name = format!("bench_throughput_{kind:?}_{workers}w_{round}").to_lowercase();
    let api_pool = args.api_pool;
    let api = support::start_api(cluster, &name, args.clients + 2, |config| {
        config.db_pool_size = api_pool;
    })
    .await?;
    let mut handles = Vec::new();
    for _ in 0..workers {
        let scratch = args.scratch_dir.clone();
        handles.push(
            api.start_worker_with(args.slots, |c| c.scratch_dir = scratch)
                .await?,
        );
    }
    api.wait_workers(usize::try_from(workers)?).await?;
    let event = api.create_event(&kind.event()).await?;

    if args.warmup_jobs > 0 {
        enqueue_all(&api, &event, args.warmup_jobs, args.clients, args.enqueue).await?;
        wait_succeeded(&api, args.warmup_jobs).await?;
    }

    let cpu_before = (
        support::cpu_time("self"),
        support::backends_cpu(&api.pool, &api.database).await?,
    );
    let stats_before = db_stats(&api).await?;
    // Finished jobs are counted from the NOTIFY every completion sends (for live log tails),
    // as the replica's own listener passes it on, rather than by polling the table or with a
    // second `LISTEN` connection: either would load PostgreSQL during the measurement (every
    // notifying commit signals each listening backend).
    let mut finished = api.hub.subscribe();
    let started = Instant::now();
    let enqueue_elapsed = enqueue_all(&api, &event, args.jobs, args.clients, args.enqueue).await?;
    wait_finished(&mut finished, &api, args.warmup_jobs + args.jobs).await?;
    let elapsed = started.elapsed();
    wait_succeeded(&api, args.warmup_jobs + args.jobs).await?;
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
        "round {} {kind:?} workers={workers}: {} jobs in {:.2} s = {rate:.0} jobs/s (enqueue alone took \
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
                        trace_context: None,
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

/// Waits until `total` jobs have finished: counts the replica's finish signals, and every
/// second (or when signals were missed) the finished rows.
async fn wait_finished(
    signals: &mut tokio::sync::broadcast::Receiver<baton_api::notify::LogSignal>,
    api: &ApiHandle,
    total: u64,
) -> anyhow::Result<()> {
    let total = i64::try_from(total)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    // Jobs finished before the listener started (the warm-up) count from the table.
    let mut done = finished_count(api).await?;
    let mut next_count = Instant::now() + Duration::from_secs(1);
    while done < total {
        ensure!(
            Instant::now() < deadline,
            "only {done} of {total} jobs finished after 10 minutes"
        );
        match tokio::time::timeout_at(next_count.into(), signals.recv()).await {
            Ok(Ok(baton_api::notify::LogSignal::Finished { .. })) => done += 1,
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => {
                done = finished_count(api).await?;
                next_count = Instant::now() + Duration::from_secs(1);
            }
        }
    }
    Ok(())
}

async fn finished_count(api: &ApiHandle) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE finished_at IS NOT NULL")
            .fetch_one(&api.pool)
            .await?,
    )
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
