//! `baton-api`: one api replica.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "baton-api",
    version,
    about = "Baton's API service (REST + worker gRPC)"
)]
struct Cli {
    #[command(flatten)]
    config: baton_api::ApiConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = baton_telemetry::init("baton-api", "info,sqlx=warn")?;
    let result = baton_api::process::run(Cli::parse().config).await;
    drop(telemetry);
    result
}
