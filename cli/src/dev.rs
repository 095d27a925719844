//! `baton dev`: everything on one machine, in one command. PostgreSQL runs from the installed
//! binaries with its data under `BATON_DATA_DIR/pg` (durable: running again reuses it), the
//! api listens on `BATON_LISTEN`, and Ctrl-C stops all of it, PostgreSQL included.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use baton_devdb::{Cluster, ClusterOptions};
use sqlx::Connection;

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where the database and the generated secrets live.
    #[arg(long, env = "BATON_DATA_DIR", default_value = "./.baton")]
    data_dir: PathBuf,
    /// Address of the REST API.
    #[arg(long, env = "BATON_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address of the worker gRPC service.
    #[arg(long, env = "BATON_GRPC_LISTEN", default_value = "127.0.0.1:8081")]
    grpc_listen: SocketAddr,
    /// Admin token to use; otherwise one is generated on the first run and kept in the data dir.
    #[arg(long, env = "BATON_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,baton_api=info".into()),
        )
        .init();
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            args.data_dir.display()
        )
    })?;
    let data_dir = args.data_dir.canonicalize()?;
    // Bind first: a busy port should fail before anything is started.
    let http = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (set BATON_LISTEN to another address)",
                args.listen
            )
        })?;
    let grpc = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (set BATON_GRPC_LISTEN to another address)",
                args.grpc_listen
            )
        })?;

    eprintln!(
        "Starting PostgreSQL in {} ...",
        data_dir.join("pg").display()
    );
    let cluster = Cluster::start(ClusterOptions {
        data_dir: data_dir.join("pg"),
        port: None,
        durable: true,
    })
    .await?;
    let result = serve(&args, &data_dir, &cluster, http, grpc).await;
    eprintln!("Stopping PostgreSQL ...");
    cluster.stop()?;
    result
}

async fn serve(
    args: &DevArgs,
    data_dir: &std::path::Path,
    cluster: &Cluster,
    http: tokio::net::TcpListener,
    grpc: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    ensure_database(cluster, "baton").await?;
    let admin_token = match &args.admin_token {
        Some(token) => token.clone(),
        None => stored_secret(data_dir, "admin-token")?,
    };
    let mut config = baton_api::ApiConfig::new(cluster.url("baton"));
    config.listen = args.listen;
    config.grpc_listen = args.grpc_listen;
    config.admin_token = Some(admin_token.clone());
    config.master_key = Some(stored_secret(data_dir, "master-key")?);
    let (api, _) = baton_api::Api::start(config).await?;
    let worker_token = stored_secret(data_dir, "worker-token")?;
    baton_api::auth::register_token(
        &api.state.pool,
        "baton dev worker",
        baton_api::model::Role::Worker,
        &worker_token,
    )
    .await?;

    // One local worker. Ctrl-C drains it first (running jobs finish), then stops the api.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut worker_config =
        baton_worker::WorkerConfig::new(format!("http://{}", grpc.local_addr()?), worker_token);
    worker_config.allow_local = true;
    worker_config.name = Some("baton-dev-local".into());
    let worker_stop = stop.clone();
    let worker = tokio::spawn(baton_worker::run(worker_config, async move {
        worker_stop.cancelled().await
    }));
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal_stop.cancel();
    });

    let url = format!("http://{}", http.local_addr()?);
    println!("Baton is running.");
    println!("  Dashboard:   {url}/  (sign in with the admin token)");
    println!("  API:         {url}/api/v1  (OpenAPI: {url}/api/v1/openapi.json)");
    println!("  Admin token: {admin_token}");
    println!("  Data:        {}", data_dir.display());
    println!("Try it:");
    println!("  export BATON_URL={url} BATON_TOKEN={admin_token}");
    println!(
        "  curl -s -H \"Authorization: Bearer $BATON_TOKEN\" -d '{{\"name\":\"hello\",\"runtime\":\"bash\",\"executor\":\"local\",\"content\":\"for i in 1 2 3; do echo tick $i; sleep 1; done\"}}' $BATON_URL/api/v1/events"
    );
    println!("  baton run hello --wait        # queues it and follows its live log");
    println!("  A local worker (baton-dev-local, 4 slots) is connected.");
    println!("Press Ctrl-C to stop.");
    api.serve(http, grpc, async move {
        stop.cancelled().await;
        match worker.await {
            Ok(Err(e)) => eprintln!("worker: {e:#}"),
            Err(e) => eprintln!("worker task: {e}"),
            Ok(Ok(())) => {}
        }
    })
    .await
}

/// Creates `name` unless it exists (`baton dev` run again reuses the data).
async fn ensure_database(cluster: &Cluster, name: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(&cluster.url("postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
    conn.close().await?;
    if !exists {
        cluster.create_database(name, None).await?;
    }
    Ok(())
}

/// A token generated on the first run and kept (mode 0600) in the data dir, so later runs
/// reuse it (and can print it again).
fn stored_secret(data_dir: &std::path::Path, file: &str) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = baton_api::auth::generate_token();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{token}")?;
    Ok(token)
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    eprintln!("Shutting down ...");
}
