//! # baton-bench
//!
//! Baton's benchmarks, one subcommand (and one module) each. Run them through `bench/run NAME
//! [ARGS]`, which builds this binary in release mode first.
//!
//! Every benchmark prints whatever detail it likes (per-round lines and so on) and returns a
//! [`Summary`]; `main` prints that as the last line, `NAME: key=value key=value ...`, so
//! scripts can `tail -n1` any benchmark the same way.
//!
//! ## Adding a benchmark
//! Write `src/NAME.rs` with a `clap::Args` struct and `pub async fn run(args) ->
//! anyhow::Result<Summary>`, and add a variant to [`Bench`]. Shared pieces (a private
//! PostgreSQL with a migrated template database, medians) are in [`support`]; fixtures shared
//! with the tests (a private sshd) in `baton-testkit`.
#![forbid(unsafe_code)]

mod container;
mod dashboard;
mod dispatch;
mod logs;
mod queue;
mod schedules;
mod ssh;
mod support;
mod throughput;
mod workflow;

use clap::{Parser, Subcommand};

use crate::support::Summary;

#[derive(Debug, Parser)]
#[command(
    name = "baton-bench",
    about = "Baton's benchmarks (run them with bench/run NAME [ARGS])"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// No-op jobs through enqueue → claim → complete: the queue module against the same SQL
    /// issued by hand, on one private PostgreSQL.
    Queue(queue::Args),
    /// Enqueue → process start latency of `exec true`, one job at a time on an idle worker
    /// (api, worker and PostgreSQL timestamps): p50/p99.
    Dispatch(dispatch::Args),
    /// End-to-end jobs/s of `exec true` through api + gRPC + PostgreSQL with 1 and 4
    /// in-process workers, beside the raw SQL loop of `queue`.
    Throughput(throughput::Args),
    /// `true` in a fresh container through the container executor (and, with `--api`, the
    /// whole api + worker path) vs `docker run --rm IMAGE true`: medians and their ratio.
    Container(container::Args),
    /// The dashboard's runs page with 1,000,000 finished jobs: p50/p95 of the first page and
    /// of deep filtered pages (target: p95 ≤ 100 ms).
    Dashboard(dashboard::Args),
    /// One job printing 200 MB: MiB/s persisted and lines lost.
    Logs(logs::Args),
    /// 1,000 schedules firing every second on 2 replicas: lateness p50/p99, duplicates and
    /// missed slots; and the idle database load of 10,000 schedules that are not due.
    Schedules(schedules::Args),
    /// A trivial run through the SSH executor over a pooled connection vs a fresh
    /// `ssh -o ControlMaster=no host true`, alternating: medians and their ratio.
    Ssh(ssh::Args),
    /// A 100-step fan-out/fan-in workflow of `noop` steps (and a `for_each` of 99) end to end,
    /// against 100 independent `noop` runs: the DAG's orchestration overhead as a ratio.
    Workflow(workflow::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Off unless asked for (RUST_LOG=...): logging would weigh on what is measured.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary: Summary = runtime.block_on(async {
        match cli.bench {
            Bench::Queue(args) => queue::run(args).await,
            Bench::Dispatch(args) => dispatch::run(args).await,
            Bench::Throughput(args) => throughput::run(args).await,
            Bench::Logs(args) => logs::run(args).await,
            Bench::Container(args) => container::run(args).await,
            Bench::Ssh(args) => ssh::run(args).await,
            Bench::Schedules(args) => schedules::run(args).await,
            Bench::Dashboard(args) => dashboard::run(args).await,
            Bench::Workflow(args) => workflow::run(args).await,
        }
    })?;
    println!("{summary}");
    Ok(())
}
