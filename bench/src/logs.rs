//! `logs`: how fast one job's output is persisted, and that none of it is lost.
//!
//! One api replica (log cap raised to 1 GiB so nothing is dropped by design) and one
//! in-process worker (1 slot). The job is `exec`
//! `["sh", "-c", "yes LINE | head -c BYTES"]`: `BYTES` (default 200 MB = 200,000,000) of
//! identical `LINE`s of `--line-bytes` bytes, newline included (default 100: 2,000,000
//! lines). The producer alone takes a fraction of a second; see `producer` in the output.
//!
//! **Measured:** `started_at → finished_at` of the job's row (PostgreSQL's clock): from the
//! api recording `Started` to it recording the completion, which the worker sends after the
//! last log batch on the same stream. `mib_per_s` = printed bytes ÷ that time. Then checked:
//! the stored lines (`job_logs`: Σ `last_seq − first_seq + 1`, less `system` lines) and
//! `log_bytes` against what was printed; `lost_lines` = printed − stored stdout lines, and
//! `log_lines_dropped` must be 0.
//!
//! Where time goes: the number and size of the stored batches, the gap between consecutive
//! batches' `created_at` (the api's time per batch once it is the bottleneck), CPU of this
//! process (api + worker) and of the database's PostgreSQL backends.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::support::{self, Summary, median, quantile};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bytes the job prints.
    #[arg(long, default_value_t = 200_000_000)]
    bytes: u64,
    /// Bytes per line, newline included; must divide `--bytes`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(2..=65_536))]
    line_bytes: u64,
    /// Measured runs (one job each); the median is reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
}

struct RunResult {
    mib_per_s: f64,
    lost_lines: i64,
}

pub async fn run(args: Args) -> anyhow::Result<Summary> {
    ensure!(
        args.bytes.is_multiple_of(args.line_bytes),
        "--line-bytes must divide --bytes"
    );
    let lines = args.bytes / args.line_bytes;
    // Printable, varied enough to look like text; the newline makes up the rest.
    let text: String = (0..args.line_bytes - 1)
        .map(|i| char::from(b'0' + u8::try_from(i % 10).unwrap_or(0)))
        .collect();
    let script = format!("yes {text} | head -c {}", args.bytes);

    let producer = {
        let started = Instant::now();
        let status = tokio::process::Command::new("sh")
            .args(["-c", &format!("{script} > /dev/null")])
            .status()
            .await?;
        ensure!(status.success(), "the producer alone failed: {status}");
        started.elapsed()
    };

    let cluster = support::cluster().await?;
    let api = support::start_api(&cluster, "bench_logs", 2, |config| {
        config.log_cap_bytes = 1 << 30;
    })
    .await?;
    let version = support::server_version(&api.pool).await?;
    let worker = api.start_worker(1).await?;
    api.wait_workers(1).await?;
    let event = api
        .create_event(&json!({
            "name": "bench-logs", "runtime": "exec", "command": ["sh", "-c", script],
            "executor": "local", "timeout_seconds": 3600
        }))
        .await?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "config: exec sh -c 'yes <{} chars> | head -c {}' = {lines} lines, 1 in-process worker, \
         log_cap_bytes=1GiB, runs={}; producer alone {:.2} s ({:.0} MiB/s); {version} \
         (throwaway, fsync=off); {cpus} CPUs, load average {}",
        args.line_bytes - 1,
        args.bytes,
        args.runs,
        producer.as_secs_f64(),
        args.bytes as f64 / (1 << 20) as f64 / producer.as_secs_f64(),
        support::load_average()
    );

    let mut results = Vec::new();
    for i in 0..args.runs {
        let result = one(&api, &event, &args, lines).await?;
        println!(
            "run {}/{}: {:.1} MiB/s, lost_lines={}",
            i + 1,
            args.runs,
            result.mib_per_s,
            result.lost_lines
        );
        results.push(result);
    }

    worker.stop().await?;
    api.stop().await?;
    cluster.stop().context("stopping PostgreSQL")?;
    let lost: i64 = results.iter().map(|r| r.lost_lines).max().unwrap_or(0);
    Ok(Summary::new("logs")
        .field("bytes", args.bytes)
        .field("lines", lines)
        .field(
            "mib_per_s",
            format!(
                "{:.1}",
                median(&results.iter().map(|r| r.mib_per_s).collect::<Vec<_>>())
            ),
        )
        .field("lost_lines", lost))
}

/// One job: run it, wait for it, check and report its logs.
async fn one(
    api: &support::ApiHandle,
    event: &str,
    args: &Args,
    lines: u64,
) -> anyhow::Result<RunResult> {
    let cpu_before = (
        support::cpu_time("self"),
        support::backends_cpu(&api.pool, &api.database).await?,
    );
    let posted = Instant::now();
    let id = api.run_event(event).await?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let status: String = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&api.pool)
            .await?;
        match status.as_str() {
            "succeeded" => break,
            "failed" | "timed_out" | "cancelled" => {
                let why: Option<String> =
                    sqlx::query_scalar("SELECT error_message FROM jobs WHERE id = $1")
                        .bind(id)
                        .fetch_one(&api.pool)
                        .await?;
                bail!("the job ended {status}: {why:?}");
            }
            _ => {}
        }
        ensure!(
            Instant::now() < deadline,
            "the job did not finish in an hour"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = posted.elapsed();
    let cpu_after = (
        support::cpu_time("self"),
        support::backends_cpu(&api.pool, &api.database).await?,
    );

    let (started, finished, last_seq, log_bytes, dropped): (
        DateTime<Utc>,
        DateTime<Utc>,
        i64,
        i64,
        i64,
    ) = sqlx::query_as(
        "SELECT started_at, finished_at, last_log_seq, log_bytes, log_lines_dropped
         FROM jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&api.pool)
    .await?;
    let (batches, stored, stored_bytes, min_batch, max_batch): (
        i64,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
    ) = sqlx::query_as(
        "SELECT count(*), sum(last_seq - first_seq + 1)::bigint, sum(bytes)::bigint,
                min(last_seq - first_seq + 1), max(last_seq - first_seq + 1)
         FROM job_logs WHERE job_id = $1",
    )
    .bind(id)
    .fetch_one(&api.pool)
    .await?;
    let system_lines = non_stdout_lines(&api.pool, id).await?;
    let at: Vec<DateTime<Utc>> =
        sqlx::query_scalar("SELECT created_at FROM job_logs WHERE job_id = $1 ORDER BY first_seq")
            .bind(id)
            .fetch_all(&api.pool)
            .await?;
    let gaps_ms: Vec<f64> = at
        .windows(2)
        .map(|w| (w[1] - w[0]).num_microseconds().unwrap_or(0) as f64 / 1000.0)
        .collect();

    let seconds = (finished - started).num_microseconds().unwrap_or(0) as f64 / 1e6;
    let mib_per_s = args.bytes as f64 / (1 << 20) as f64 / seconds;
    let stdout_lines = stored.unwrap_or(0) - system_lines;
    let lost_lines = i64::try_from(lines)? - stdout_lines;
    let expected_bytes = i64::try_from(args.bytes - lines)?; // newlines are not stored
    let cpu = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
        (Some(b), Some(a)) => format!("{:.1} s", a.saturating_sub(b).as_secs_f64()),
        _ => "?".to_owned(),
    };
    let first_batch_ms = at.first().map_or(f64::NAN, |t| {
        (*t - started).num_microseconds().unwrap_or(0) as f64 / 1000.0
    });
    println!(
        "  started→finished {seconds:.2} s (enqueue→observed succeeded {:.2} s); stored {} \
         stdout + {system_lines} system lines (last_log_seq={last_seq}), log_bytes={log_bytes} \
         (expected {expected_bytes}; batches hold {}), log_lines_dropped={dropped}",
        wall.as_secs_f64(),
        stdout_lines,
        stored_bytes.unwrap_or(0),
    );
    println!(
        "  {batches} batches of {}..{} lines (mean {:.0} lines, {:.0} KiB); first stored {:.1} ms \
         after start; gap between batches p50={:.2} p90={:.2} p99={:.2} max={:.2} ms \
         ({:.0} µs per line at p50)",
        min_batch.unwrap_or(0),
        max_batch.unwrap_or(0),
        stored.unwrap_or(0) as f64 / batches.max(1) as f64,
        stored_bytes.unwrap_or(0) as f64 / batches.max(1) as f64 / 1024.0,
        first_batch_ms,
        quantile(&gaps_ms, 0.5),
        quantile(&gaps_ms, 0.9),
        quantile(&gaps_ms, 0.99),
        quantile(&gaps_ms, 1.0),
        quantile(&gaps_ms, 0.5) * 1000.0 * batches.max(1) as f64 / stored.unwrap_or(1) as f64,
    );
    println!(
        "  CPU: this process (api + worker + client) {}, PostgreSQL backends {}, over {seconds:.1} s",
        cpu(cpu_before.0, cpu_after.0),
        cpu(cpu_before.1, cpu_after.1),
    );
    ensure!(
        dropped == 0,
        "log_lines_dropped={dropped}: the cap dropped lines"
    );
    if log_bytes != expected_bytes {
        println!("  MISMATCH: log_bytes={log_bytes}, expected {expected_bytes}");
    }
    Ok(RunResult {
        mib_per_s,
        lost_lines,
    })
}

/// Stored lines that are not stdout (Baton's notes, stderr), decoding every chunk.
async fn non_stdout_lines(pool: &sqlx::PgPool, job_id: uuid::Uuid) -> anyhow::Result<i64> {
    use baton_proto::{logchunk, v1::Stream};
    use futures::TryStreamExt;

    let mut rows = sqlx::query_scalar::<_, Vec<u8>>(
        "SELECT chunk FROM job_logs WHERE job_id = $1 AND chunk IS NOT NULL",
    )
    .bind(job_id)
    .fetch(pool);
    let mut count = 0;
    while let Some(chunk) = rows.try_next().await? {
        for line in logchunk::lines(&chunk) {
            if line?.stream != Stream::Stdout {
                count += 1;
            }
        }
    }
    Ok(count)
}
