//! `schedules`: how late schedules fire, that every slot fires exactly once, and what idle
//! schedules cost the database.
//!
//! **Fire phase.** Two api replicas (in this process, as `baton dev` runs one) share one
//! database, with `--workers` in-process workers running the jobs (`noop`). `--schedules`
//! schedules fire every second (`cron "* * * * * *"`) for `--seconds` seconds: each is
//! created through `POST /api/v1/events/{id}/schedules` with `start_at`/`end_at` bounding
//! exactly that many slots, starting a few seconds after the last one is created. Once the
//! last slot is due (plus a grace period), the jobs are counted: `duplicates` (more than one
//! job for a (schedule, slot); the unique index makes it impossible, and this checks it) and
//! `missed` (expected slots with no job). Lateness is the definition, `created_at -
//! scheduled_for` per job (`created_at` is the database's `now()` in the firing
//! transaction), as p50/p99/max.
//!
//! **Idle phase.** A fresh database with two replicas and `--idle-workers` connected idle
//! workers, first with no schedule, then with `--idle-schedules` schedules that will not fire
//! soon (half paused every-second schedules, half starting in a year), inserted in one
//! statement. For each, the database's transactions per second (`pg_stat_database`
//! `xact_commit + xact_rollback` of that database: every autocommitted query is one) over
//! `--idle-seconds`: `idle_tps_none` and `idle_tps_schedules`. The firing loop sleeps until
//! the earliest due time, so idle schedules should cost nothing.
//!
//! The PostgreSQL is the benchmarks' throwaway one (fsync and synchronous commit off).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use baton_devdb::Cluster;
use chrono::{DateTime, SubsecRound, Utc};
use serde_json::json;
use sqlx::PgPool;
use tokio::task::JoinSet;

use crate::support::{self, ApiHandle, Summary, WorkerHandle, quantile};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Schedules firing every second in the fire phase.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    schedules: u32,
    /// Slots (seconds) each schedule fires in the fire phase.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    seconds: u32,
    /// In-process workers running the fired jobs (`noop`) in the fire phase (0: the jobs stay
    /// queued).
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Slots per worker.
    #[arg(long, default_value_t = 64)]
    slots: u32,
    /// Schedules that will not fire soon, in the idle phase.
    #[arg(long, default_value_t = 10_000)]
    idle_schedules: u32,
    /// Connected idle workers in the idle phase.
    #[arg(long, default_value_t = 4)]
    idle_workers: u32,
    /// Seconds the idle load is measured over (each of its two parts).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    idle_seconds: u32,
    /// Skip the fire phase.
    #[arg(long)]
    no_fire: bool,
    /// Skip the idle phase.
    #[arg(long)]
    no_idle: bool,
}

/// Two api replicas on one fresh database.
struct Replicas {
    a: ApiHandle,
    b: ApiHandle,
}

impl Replicas {
    async fn start(cluster: &Cluster, name: &str) -> anyhow::Result<Self> {
        let a = support::start_api(cluster, name, 4, |_| {}).await?;
        let pool = support::connect(cluster, name, 2).await?;
        let b = support::start_replica(cluster, name, pool, |_| {}).await?;
        Ok(Self { a, b })
    }

    /// `count` workers, alternately on each replica.
    async fn workers(&self, count: u32, slots: u32) -> anyhow::Result<Vec<WorkerHandle>> {
        let mut workers = Vec::new();
        for i in 0..count {
            let api = if i % 2 == 0 { &self.a } else { &self.b };
            workers.push(api.start_worker(slots).await?);
        }
        self.a.wait_workers(count as usize).await?;
        Ok(workers)
    }

    async fn stop(self, workers: Vec<WorkerHandle>) -> anyhow::Result<()> {
        for w in workers {
            w.stop().await?;
        }
        self.a.stop().await?;
        self.b.stop().await
    }
}

pub async fn run(args: Args) -> anyhow::Result<Summary> {
    let cluster = support::cluster().await?;
    println!(
        "config: fire: {} schedules every second for {} s, 2 replicas, {} workers x {} slots; \
         idle: {} schedules, {} idle workers, {} s; {} CPUs, load average {}",
        args.schedules,
        args.seconds,
        args.workers,
        args.slots,
        args.idle_schedules,
        args.idle_workers,
        args.idle_seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        support::load_average()
    );
    let mut summary = Summary::new("schedules");
    if !args.no_fire {
        summary = fire_phase(&cluster, &args, summary).await?;
    }
    if !args.no_idle {
        summary = idle_phase(&cluster, &args, summary).await?;
    }
    Ok(summary)
}

async fn fire_phase(cluster: &Cluster, args: &Args, summary: Summary) -> anyhow::Result<Summary> {
    let replicas = Replicas::start(cluster, "bench_schedules_fire").await?;
    let workers = replicas.workers(args.workers, args.slots).await?;
    let event = replicas
        .a
        .create_event(&json!({"name": "bench-schedules", "runtime": "noop",
                              "executor": "local", "timeout_seconds": 600}))
        .await?;

    // Creating 1,000 schedules takes a few seconds: start the slots after that.
    let started = Instant::now();
    let creation_guess =
        Duration::from_millis(20 * u64::from(args.schedules)).max(Duration::from_secs(3));
    let first: DateTime<Utc> =
        (Utc::now() + creation_guess + Duration::from_secs(3)).trunc_subsecs(0);
    let last = first + chrono::Duration::seconds(i64::from(args.seconds) - 1);
    let mut creating = JoinSet::new();
    let per_client = args.schedules.div_ceil(8);
    for client in 0..8 {
        let rest = replicas.a.rest.clone();
        let path = format!("/api/v1/events/{event}/schedules");
        let count = per_client.min(args.schedules.saturating_sub(client * per_client));
        creating.spawn(async move {
            for _ in 0..count {
                rest.post(
                    &path,
                    &json!({"cron": "* * * * * *", "start_at": first, "end_at": last}),
                )
                .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = creating.join_next().await {
        done??;
    }
    println!(
        "created {} schedules in {:.1} s; slots {first} .. {last}",
        args.schedules,
        started.elapsed().as_secs_f64()
    );
    ensure!(
        Utc::now() < first,
        "creating the schedules took past the first slot: lower --schedules"
    );

    // Wait for the last slot, then until every expected job exists (or a grace period).
    let expected = i64::from(args.schedules) * i64::from(args.seconds);
    let pool = &replicas.a.pool;
    let due_end = last + chrono::Duration::seconds(2);
    let give_up = last + chrono::Duration::seconds(60);
    let mut reported = Instant::now();
    loop {
        let now = Utc::now();
        let fired = fired_jobs(pool).await?;
        if now >= due_end && (fired >= expected || now >= give_up) {
            break;
        }
        if reported.elapsed() >= Duration::from_secs(10) {
            println!("  {fired} of {expected} slots fired");
            reported = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let (jobs, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (schedule_id, scheduled_for))
         FROM jobs WHERE schedule_id IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    let lateness: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM created_at - scheduled_for)::float8
         FROM jobs WHERE schedule_id IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    let lateness_ms: Vec<f64> = lateness.iter().map(|s| s * 1000.0).collect();
    let early = lateness_ms.iter().filter(|ms| **ms < 0.0).count();
    let (p50, p99, max) = (
        quantile(&lateness_ms, 0.5),
        quantile(&lateness_ms, 0.99),
        lateness_ms.iter().copied().fold(f64::NAN, f64::max),
    );
    let duplicates = jobs - distinct;
    let missed = expected - distinct;
    println!(
        "fire: {jobs} jobs for {expected} slots ({distinct} distinct): duplicates={duplicates} \
         missed={missed} early={early}; lateness p50={p50:.1} ms p99={p99:.1} ms max={max:.1} ms"
    );
    replicas.stop(workers).await?;
    Ok(summary
        .field("schedules", args.schedules)
        .field("slots", expected)
        .field("duplicates", duplicates)
        .field("missed", missed)
        .field("lateness_p50_ms", format!("{p50:.1}"))
        .field("lateness_p99_ms", format!("{p99:.1}"))
        .field("lateness_max_ms", format!("{max:.1}")))
}

async fn fired_jobs(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE schedule_id IS NOT NULL")
            .fetch_one(pool)
            .await?,
    )
}

async fn idle_phase(cluster: &Cluster, args: &Args, summary: Summary) -> anyhow::Result<Summary> {
    let name = "bench_schedules_idle";
    let replicas = Replicas::start(cluster, name).await?;
    let workers = replicas.workers(args.idle_workers, 4).await?;
    let event = replicas
        .a
        .create_event(&json!({"name": "bench-schedules-idle", "runtime": "noop",
                              "executor": "local"}))
        .await?;
    let window = Duration::from_secs(u64::from(args.idle_seconds));
    // The measuring pool is the benchmark's own (one query per reading).
    let pool = &replicas.a.pool;
    // Let start-up work (connections, first heartbeats) settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let none = transactions_per_second(pool, name, window).await?;
    println!("idle, no schedules: {none:.1} transactions/s");

    let half = i64::from(args.idle_schedules / 2);
    let rest = i64::from(args.idle_schedules) - half;
    let event: uuid::Uuid = event.parse()?;
    sqlx::query(
        "INSERT INTO schedules (id, event_id, cron, interval_seconds, timezone, paused,
                                anchor_at, next_fire_at, next_due_at)
         SELECT gen_random_uuid(), $1, '* * * * * *', NULL, 'UTC', true, now(),
                date_trunc('second', now()) + interval '1 second',
                date_trunc('second', now()) + interval '1 second'
         FROM generate_series(1, $2)
         UNION ALL
         SELECT gen_random_uuid(), $1, NULL, 60, 'UTC', false, now() + interval '1 year',
                now() + interval '1 year', now() + interval '1 year'
         FROM generate_series(1, $3)",
    )
    .bind(event)
    .bind(half)
    .bind(rest)
    .execute(pool)
    .await
    .context("inserting the idle schedules")?;
    // Replicas learn of schedules from their NOTIFY (sent by the REST handlers; these rows
    // came by SQL): send one, as a create would.
    sqlx::query("SELECT pg_notify('baton_schedules', '')")
        .execute(pool)
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let with = transactions_per_second(pool, name, window).await?;
    println!(
        "idle, {} schedules ({half} paused, {rest} a year away): {with:.1} transactions/s",
        args.idle_schedules
    );
    replicas.stop(workers).await?;
    Ok(summary
        .field("idle_schedules", args.idle_schedules)
        .field("idle_workers", args.idle_workers)
        .field("idle_tps_none", format!("{none:.1}"))
        .field("idle_tps_schedules", format!("{with:.1}")))
}

/// The database's committed and rolled-back transactions per second over `window`, minus the
/// two readings' own.
async fn transactions_per_second(
    pool: &PgPool,
    database: &str,
    window: Duration,
) -> anyhow::Result<f64> {
    async fn reading(pool: &PgPool, database: &str) -> anyhow::Result<i64> {
        // Statistics reach pg_stat_database when backends flush them (at most ~1 s late while
        // busy, ~10 s when idle): take a fresh snapshot, not this transaction's cached one.
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(pool)
            .await?;
        Ok(sqlx::query_scalar(
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
        )
        .bind(database)
        .fetch_one(pool)
        .await?)
    }
    let before = reading(pool, database).await?;
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let after = reading(pool, database).await?;
    // Each reading is two autocommitted statements.
    Ok((after - before - 2) as f64 / start.elapsed().as_secs_f64())
}
