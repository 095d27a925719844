//! `baton-api`: one api replica.

use anyhow::Context;
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
    let cli = Cli::parse();
    let (listen, grpc_listen) = (cli.config.listen, cli.config.grpc_listen);
    let (api, generated) = baton_api::Api::start(cli.config).await?;
    if let Some(token) = generated {
        eprintln!("No admin token existed; generated one (shown only now):\n  {token}");
    }
    let http = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let grpc = tokio::net::TcpListener::bind(grpc_listen)
        .await
        .with_context(|| format!("cannot listen on {grpc_listen} (BATON_GRPC_LISTEN)"))?;
    api.serve(http, grpc, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("shutting down");
}
