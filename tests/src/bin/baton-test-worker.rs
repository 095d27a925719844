//! The worker as a separate process, for tests that kill it (`kill -9`, SIGTERM): the same
//! `baton_worker::run` the `baton-worker` binary runs, with the same flags.

use clap::Parser;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    config: baton_worker::WorkerConfig,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let telemetry = match baton_telemetry::init("baton-worker", "warn") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("baton-test-worker: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse();
    let result = baton_worker::run(cli.config, async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    })
    .await;
    drop(telemetry);
    baton_worker::exit_status("baton-test-worker", &result)
}
