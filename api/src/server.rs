//! Running a replica: connect and migrate, bootstrap the admin token, serve HTTP, run the
//! reaper, and stop cleanly when the shutdown future resolves (in-flight requests finish).

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ApiConfig;
use crate::{AppState, reaper};

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
    pub state: AppState,
}

impl Api {
    /// Connects, migrates and makes sure an admin token exists. Returns the api and a token
    /// that was generated now (print it: it is never shown again).
    pub async fn start(config: ApiConfig) -> anyhow::Result<(Self, Option<String>)> {
        let pool = connect(&config).await?;
        let generated = crate::auth::bootstrap_admin(&pool, config.admin_token.as_deref()).await?;
        Ok((Self::with_pool(pool, config), generated))
    }

    pub fn with_pool(pool: PgPool, config: ApiConfig) -> Self {
        Self {
            state: AppState {
                pool,
                config: Arc::new(config),
            },
        }
    }

    /// Serves the REST API on `http` until `shutdown` resolves, then drains in-flight requests
    /// and stops the background tasks.
    pub async fn serve(
        self,
        http: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let reaper = tokio::spawn(reaper::run(
            self.state.pool.clone(),
            self.state.config.reaper_interval,
            stop.clone(),
        ));
        let app = crate::http::router(self.state.clone());
        let addr = http.local_addr().ok();
        tracing::info!(?addr, "REST API listening");
        let stop_on_shutdown = stop.clone();
        let served = axum::serve(http, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                stop_on_shutdown.cancel();
            })
            .await;
        stop.cancel();
        let _ = reaper.await;
        served.context("serving HTTP")
    }
}
