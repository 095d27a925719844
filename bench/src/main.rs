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
//! PostgreSQL with a migrated template database, medians) are in [`support`].
#![forbid(unsafe_code)]

mod queue;
mod support;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary: Summary = runtime.block_on(async {
        match cli.bench {
            Bench::Queue(args) => queue::run(args).await,
        }
    })?;
    println!("{summary}");
    Ok(())
}
