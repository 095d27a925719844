//! Running a replica: connect and migrate, bootstrap the admin token, serve HTTP and the worker
//! gRPC service, run the dispatcher, the listener, the reaper and the schedule firing loop, and stop cleanly when the
//! shutdown future resolves: worker streams are closed (workers reconnect elsewhere and keep
//! their jobs), in-flight HTTP requests finish, background loops end.
//!
//! Two pools: the worker protocol (gRPC sessions, dispatcher) and the background loops use
//! `BATON_DB_POOL` connections; the REST API has `BATON_HTTP_DB_POOL` of its own (its router
//! gets a copy of the state whose `pool` is that one), so a REST flood waits on its own pool
//! and never starves the workers' reports.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ApiConfig;
use crate::{AppState, dispatch, notify, reaper};

/// The schema migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Opens a pool and brings the schema up to date.
pub async fn connect(config: &ApiConfig) -> anyhow::Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(config.db_pool_size)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&config.database_url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {}",
                redact_url(&config.database_url)
            )
        })?;
    MIGRATOR
        .run(&pool)
        .await
        .context("running database migrations")?;
    Ok(pool)
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// A running api replica's parts.
pub struct Api {
    /// The state of the worker protocol and background loops (`pool`: `BATON_DB_POOL`).
    pub state: AppState,
    /// The REST API's own pool (`BATON_HTTP_DB_POOL`).
    pub http_pool: PgPool,
}

impl Api {
    /// Connects, migrates and makes sure an admin token exists. Returns the api and a token
    /// that was generated now (print it: it is never shown again).
    pub async fn start(config: ApiConfig) -> anyhow::Result<(Self, Option<String>)> {
        // Refuse a weak key or unusable TLS files before touching anything.
        crate::crypto::Vault::new(config.master_key.as_deref())?;
        config.tls()?;
        let pool = connect(&config).await?;
        let generated = crate::auth::bootstrap_admin(&pool, config.admin_token.as_deref()).await?;
        if let Some(token) = config.worker_token.as_deref() {
            crate::auth::bootstrap_worker(&pool, token).await?;
        }
        Ok((Self::with_pool(pool, config), generated))
    }

    /// A weak master key is ignored here (no secrets then): [`Api::start`] refuses it first.
    pub fn with_pool(pool: PgPool, config: ApiConfig) -> Self {
        crate::metrics::handle();
        let vault = crate::crypto::Vault::new(config.master_key.as_deref()).unwrap_or_else(|_| {
            crate::crypto::Vault::new(None).expect("a vault without a key always builds")
        });
        let dispatcher = dispatch::Dispatcher::new(
            pool.clone(),
            config.lease,
            config.chain_depth_limit,
            vault.clone(),
        );
        let http_pool = PgPoolOptions::new()
            .max_connections(config.http_db_pool_size.max(1))
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_lazy_with(pool.connect_options().as_ref().clone());
        let streams = crate::http::stream_slots::StreamSlots::new(config.streams_per_token);
        Self {
            http_pool,
            state: AppState {
                streams,
                queue_depth: Arc::default(),
                pool,
                config: Arc::new(config),
                dispatcher,
                hub: notify::LogHub::default(),
                outbox_wake: Arc::new(tokio::sync::Notify::new()),
                schedules_wake: Arc::new(tokio::sync::Notify::new()),
                clock: Arc::new(crate::schedule::SystemClock),
                tokens: Arc::default(),
                events: Arc::default(),
                announcer: Arc::default(),
                vault,
                api_id: uuid::Uuid::now_v7().to_string(),
                stop: CancellationToken::new(),
            },
        }
    }

    /// Serves the REST API on `http` and the worker service on `grpc` until `shutdown`
    /// resolves, then drains and stops everything.
    pub async fn serve(
        self,
        http: TcpListener,
        grpc: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state;
        let tls = state.config.tls()?;
        let mut grpc_builder = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            grpc_builder = grpc_builder
                .tls_config(tls.grpc.clone())
                .context("BATON_TLS_CERT / BATON_TLS_KEY for the worker service")?;
        }
        let http_state = AppState {
            pool: self.http_pool,
            ..state.clone()
        };
        let stop = state.stop.clone();
        // Stopped only once the HTTP server drained: runs queued until then are announced.
        let announcer_stop = CancellationToken::new();
        let background = [
            tokio::spawn(
                reaper::Reaper::from_state(&state).run(state.config.reaper_interval, stop.clone()),
            ),
            tokio::spawn(state.dispatcher.clone().run(stop.clone())),
            tokio::spawn({
                let (announcer, pool, stop) = (
                    state.announcer.clone(),
                    state.pool.clone(),
                    announcer_stop.clone(),
                );
                async move { announcer.run(pool, stop).await }
            }),
            tokio::spawn(notify::run(state.clone(), stop.clone())),
            tokio::spawn(
                crate::schedule::Scheduler::new(
                    state.pool.clone(),
                    state.clock.clone(),
                    state.schedules_wake.clone(),
                    crate::actions::Effects::from_state(&state),
                )
                .run(stop.clone()),
            ),
            tokio::spawn(crate::retention::run(
                state.pool.clone(),
                state.config.retention_days,
                stop.clone(),
            )),
            tokio::spawn(crate::metrics::refresh_loop(
                state.pool.clone(),
                state.queue_depth.clone(),
                state.config.metrics_refresh_interval,
                stop.clone(),
            )),
            tokio::spawn(
                crate::outbox::Deliverer::new(
                    state.pool.clone(),
                    state
                        .config
                        .smtp_url
                        .clone()
                        .map(|url| crate::outbox::SmtpSettings {
                            url,
                            from: state.config.smtp_from.clone(),
                        }),
                    state.outbox_wake.clone(),
                    state.config.http_allow_cidrs.clone(),
                )
                .with_vault(state.vault.clone())
                .run(stop.clone()),
            ),
        ];
        tracing::info!(http = ?http.local_addr().ok(), grpc = ?grpc.local_addr().ok(),
                       tls = tls.is_some(), "api listening");

        let trigger = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            trigger.cancel();
        });
        let grpc_stop = stop.clone();
        let grpc_server = grpc_builder
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            .add_service(crate::grpc::WorkerGrpc::server(state.clone()))
            .serve_with_incoming_shutdown(
                // Without TCP_NODELAY each pushed assignment waits ~40 ms for a delayed ACK.
                tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
                async move { grpc_stop.cancelled().await },
            );
        let http_stop = stop.clone();
        let http_pool = http_state.pool.clone();
        let router = crate::http::router(http_state);
        let http_shutdown = async move { http_stop.cancelled().await };
        let http_server = async move {
            use axum::serve::ListenerExt as _;
            match &tls {
                // `tap_io` lends the listener the connect-info support axum gives TcpListener.
                Some(tls) => {
                    let listener = crate::tls::TlsListener::new(http, tls.rest.clone())?;
                    axum::serve(
                        listener.tap_io(|_| {}),
                        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                    )
                    .with_graceful_shutdown(http_shutdown)
                    .await
                }
                None => {
                    axum::serve(
                        http,
                        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                    )
                    .with_graceful_shutdown(http_shutdown)
                    .await
                }
            }
        };
        let (grpc_result, http_result) = tokio::join!(grpc_server, http_server);
        stop.cancel();
        announcer_stop.cancel();
        for task in background {
            let _ = task.await;
        }
        http_pool.close().await;
        grpc_result.context("serving gRPC")?;
        http_result.context("serving HTTP")
    }
}
