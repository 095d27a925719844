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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    baton_api::process::run(Cli::parse().config).await
}
