//! `dispatch`: latency from enqueueing a job to its process having started, one job at a time
//! on an idle worker (latency, not queueing).
//!
//! One api replica and one in-process worker (`local` executor, 1 slot) on a private
//! PostgreSQL. The event is `exec` `["true"]`. Each run is enqueued through
//! `POST /api/v1/events/{id}/run`, and the next one only once this one has finished (its row
//! is polled every millisecond on a pool of the benchmark's own, which the measurement does not
//! depend on: both ends are timestamps PostgreSQL writes).
//!
//! **What is measured**, per job, from the job's row (one clock, PostgreSQL's `now()`, which
//! is the start of the writing transaction):
//! - `latency` = `started_at − created_at`. `created_at` is the start of the api's enqueue
//!   transaction (`BEGIN` in the `POST …/run` handler, before the event is read and the row
//!   inserted); `started_at` is written when the api handles the worker's `Started` message,
//!   which the worker sends once the executor reports the process spawned. So it covers: the
//!   enqueue transaction and its commit, the queued notification reaching the dispatcher,
//!   the claim, the `Assignment` on the gRPC stream, the worker preparing the run directory and
//!   spawning the process, `Started` on the stream and the api's `UPDATE`.
//! - broken down as `claim` = `claimed_at − created_at` (api side: enqueue → claimed) and
//!   `start` = `started_at − claimed_at` (assignment → worker spawn → `Started` recorded).
//! - `post` is the client-side round trip of `POST …/run` (for reference).
//!
//! An unmeasured warm-up runs first.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::support::{self, Summary, quantile};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The worker's scratch directory (`--scratch-dir` of baton-worker: run directories and
    /// working directories) [default: the system temp dir].
    #[arg(long)]
    scratch_dir: Option<std::path::PathBuf>,
    /// Measured runs (sequential).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Unmeasured runs first.
    #[arg(long, default_value_t = 50)]
    warmup: u64,
}

/// A job's status, `created_at`, `claimed_at` and `started_at`.
type JobTimes = (
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// Timestamps of one finished job.
struct Sample {
    latency_ms: f64,
    claim_ms: f64,
    start_ms: f64,
    post_ms: f64,
}

pub async fn run(args: Args) -> anyhow::Result<Summary> {
    let cluster = support::cluster().await?;
    let api = support::start_api(&cluster, "bench_dispatch", 2, |_| {}).await?;
    let version = support::server_version(&api.pool).await?;
    let worker = api
        .start_worker_with(1, |c| c.scratch_dir = args.scratch_dir.clone())
        .await?;
    api.wait_workers(1).await?;
    let event = api
        .create_event(&json!({
            "name": "bench-dispatch", "runtime": "exec", "command": ["true"],
            "executor": "local", "timeout_seconds": 60
        }))
        .await?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "config: exec [\"true\"] on 1 in-process worker (local, 1 slot), api in-process, \
         enqueue via REST, one job at a time; runs={} warmup={}; {version} (throwaway, \
         fsync=off); {cpus} CPUs, load average {}",
        args.runs,
        args.warmup,
        support::load_average()
    );

    for _ in 0..args.warmup {
        one(&api, &event).await?;
    }
    let started = Instant::now();
    let mut samples = Vec::new();
    for i in 0..args.runs {
        samples.push(one(&api, &event).await?);
        if (i + 1) % 250 == 0 {
            println!(
                "  {} runs, p50 so far {:.2} ms",
                i + 1,
                quantile(
                    &samples.iter().map(|s| s.latency_ms).collect::<Vec<_>>(),
                    0.5
                )
            );
        }
    }
    let elapsed = started.elapsed();

    let pick = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let line = |name: &str, values: &[f64]| {
        println!(
            "{name:>8}: p50={:.2} p90={:.2} p99={:.2} max={:.2} ms",
            quantile(values, 0.5),
            quantile(values, 0.9),
            quantile(values, 0.99),
            quantile(values, 1.0)
        );
    };
    let latency = pick(|s| s.latency_ms);
    line("latency", &latency);
    line("claim", &pick(|s| s.claim_ms));
    line("start", &pick(|s| s.start_ms));
    line("post", &pick(|s| s.post_ms));
    println!(
        "{} runs in {:.1} s ({:.1} ms per run, enqueue to observed finish); load average {}",
        args.runs,
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / args.runs as f64,
        support::load_average()
    );

    worker.stop().await?;
    api.stop().await?;
    cluster.stop().context("stopping PostgreSQL")?;
    Ok(Summary::new("dispatch")
        .field("runs", args.runs)
        .field("p50_ms", format!("{:.2}", quantile(&latency, 0.5)))
        .field("p99_ms", format!("{:.2}", quantile(&latency, 0.99))))
}

/// Enqueues one job and waits until it has finished; returns its timestamps.
async fn one(api: &support::ApiHandle, event: &str) -> anyhow::Result<Sample> {
    let posted = Instant::now();
    let id = api.run_event(event).await?;
    let post_ms = posted.elapsed().as_secs_f64() * 1000.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row: JobTimes = sqlx::query_as(
            "SELECT status, created_at, claimed_at, started_at FROM jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&api.pool)
        .await?;
        match row {
            (status, created, Some(claimed), Some(started)) if status == "succeeded" => {
                let ms = |from: DateTime<Utc>, to: DateTime<Utc>| {
                    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
                };
                return Ok(Sample {
                    latency_ms: ms(created, started),
                    claim_ms: ms(created, claimed),
                    start_ms: ms(claimed, started),
                    post_ms,
                });
            }
            (status, ..) if matches!(status.as_str(), "failed" | "timed_out" | "cancelled") => {
                bail!("job {id} ended {status}: {}", error_of(api, id).await)
            }
            _ => {}
        }
        ensure!(
            Instant::now() < deadline,
            "job {id} did not finish within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The job's error message, for a failure report.
async fn error_of(api: &support::ApiHandle, id: Uuid) -> String {
    sqlx::query_scalar::<_, Option<String>>("SELECT error_message FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(&api.pool)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}
