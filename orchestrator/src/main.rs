#![forbid(unsafe_code)]
//! `baton-worker`: connects to a baton-api replica and runs the jobs it is given.
//!
//! Settings come from flags or `BATON_*` variables (`baton-worker --help`). `SIGTERM` or
//! Ctrl-C drains the worker: no new jobs, running ones get `--drain-timeout` to finish.

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "baton-worker",
    version,
    about = "Baton worker: runs the jobs an api replica pushes to it"
)]
struct Cli {
    #[command(flatten)]
    config: baton_worker::WorkerConfig,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = match baton_telemetry::init("baton-worker", "info") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("baton-worker: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = baton_worker::run(cli.config, shutdown_signal()).await;
    drop(telemetry);
    baton_worker::exit_status("baton-worker", &result)
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
