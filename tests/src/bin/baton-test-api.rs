//! The api as a separate process, for tests that kill a replica (`kill -9`) or its database:
//! the same `baton_api::process::run` the `baton-api` binary runs, with the same settings.

use clap::Parser;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    config: baton_api::ApiConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = baton_telemetry::init("baton-api", "warn")?;
    let result = baton_api::process::run(Cli::parse().config).await;
    drop(telemetry);
    result
}
