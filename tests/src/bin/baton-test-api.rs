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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    baton_api::process::run(Cli::parse().config).await
}
