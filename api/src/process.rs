//! A replica as an operating-system process: what `baton-api`'s `main` does once its settings
//! are parsed (start, bind, serve until SIGTERM or Ctrl-C). The test harness's api process
//! runs exactly this, so a test that kills a replica kills the real thing.

use anyhow::Context;

use crate::{Api, ApiConfig};

/// Starts a replica with `config` and serves until SIGTERM or Ctrl-C, then drains.
pub async fn run(config: ApiConfig) -> anyhow::Result<()> {
    let (listen, grpc_listen) = (config.listen, config.grpc_listen);
    let (api, generated) = Api::start(config).await?;
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

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("shutting down");
}
