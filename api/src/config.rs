//! The api's settings. The binary reads them from flags and `BATON_*` variables; tests and
//! `baton dev` build them directly.

use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct ApiConfig {
    /// PostgreSQL connection URL.
    #[arg(long, env = "BATON_DATABASE_URL")]
    pub database_url: String,
    /// Address of the REST API.
    #[arg(long, env = "BATON_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address of the worker gRPC service.
    #[arg(long, env = "BATON_GRPC_LISTEN", default_value = "127.0.0.1:8081")]
    pub grpc_listen: SocketAddr,
    /// The first admin token (≥ 16 characters). Without it, one is generated and printed once
    /// when no admin token exists.
    #[arg(long, env = "BATON_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// A worker token to accept (≥ 16 characters), registered at start like
    /// `BATON_ADMIN_TOKEN`: role `worker`, bound to no labels. A deployment (compose, a
    /// Kubernetes Secret, systemd) then hands one secret to the api and its workers, which read
    /// the same variable. A revoked token stays revoked; tokens made with `POST /tokens` are
    /// the finer-grained alternative.
    #[arg(long, env = "BATON_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// Key for secrets at rest (server credentials, secret variables); ≥ 32 characters, the
    /// same on every replica. Without it, secrets cannot be stored.
    #[arg(long, env = "BATON_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "BATON_BODY_LIMIT", default_value_t = 4 * 1024 * 1024)]
    pub body_limit_bytes: usize,
    /// How long a claim's lease lasts without a heartbeat.
    #[arg(long, env = "BATON_LEASE_SECONDS", default_value = "15", value_parser = parse_secs)]
    pub lease: Duration,
    /// How often this replica looks for expired leases.
    #[arg(long, env = "BATON_REAPER_INTERVAL_SECONDS", default_value = "2", value_parser = parse_secs)]
    pub reaper_interval: Duration,
    /// Log bytes kept per job; past it a marker is stored and further lines only counted.
    #[arg(long, env = "BATON_LOG_CAP_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub log_cap_bytes: i64,
    /// How deep a chain of run_event actions may go before it is stopped (cycles end there).
    #[arg(long, env = "BATON_CHAIN_DEPTH_LIMIT", default_value_t = 20)]
    pub chain_depth_limit: i32,
    /// SMTP server for email messages: `smtp://host:port` or `smtps://user:pass@host`.
    #[arg(long, env = "BATON_SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// Sender address of email messages.
    #[arg(long, env = "BATON_SMTP_FROM", default_value = "baton@localhost")]
    pub smtp_from: String,
    /// Database connections of this replica for the worker protocol and background loops
    /// (sessions, dispatcher, reaper, notifications).
    #[arg(long, env = "BATON_DB_POOL", default_value_t = 20)]
    pub db_pool_size: u32,
    /// Database connections of this replica for the REST API, a pool of its own so a flood of
    /// REST requests cannot starve the worker protocol.
    #[arg(long, env = "BATON_HTTP_DB_POOL", default_value_t = 20)]
    pub http_db_pool_size: u32,
    /// Requests per second allowed per token (a token bucket; 0: no limit). Past it: 429 with
    /// `Retry-After`.
    #[arg(long, env = "BATON_RATE_LIMIT_PER_SECOND", default_value_t = 10_000)]
    pub rate_limit_per_second: u32,
    /// Requests a token may make at once above the steady rate.
    #[arg(long, env = "BATON_RATE_LIMIT_BURST", default_value_t = 20_000)]
    pub rate_limit_burst: u32,
    /// Requests per second allowed per client IP without a token (probes, `/metrics`, the
    /// OpenAPI document; 0: no limit).
    #[arg(
        long,
        env = "BATON_ANONYMOUS_RATE_LIMIT_PER_SECOND",
        default_value_t = 100
    )]
    pub anonymous_rate_limit_per_second: u32,
    /// Failed authentications (401) per second allowed per client IP, with a burst of ten
    /// times as many; past it, requests with tokens not recently verified get 429 without a
    /// database lookup (0: no limit).
    #[arg(long, env = "BATON_AUTH_FAILURES_PER_SECOND", default_value_t = 2)]
    pub auth_failures_per_second: u32,
    /// Deliveries per second allowed per webhook key (`POST /hooks/{key}`, a token bucket; 0:
    /// no limit). Past it: 429 with `Retry-After`.
    #[arg(
        long,
        env = "BATON_WEBHOOK_RATE_LIMIT_PER_SECOND",
        default_value_t = 10
    )]
    pub webhook_rate_limit_per_second: u32,
    /// Deliveries a webhook key may make at once above the steady rate.
    #[arg(long, env = "BATON_WEBHOOK_RATE_LIMIT_BURST", default_value_t = 100)]
    pub webhook_rate_limit_burst: u32,
    /// Live log streams (SSE and WebSocket) one token may hold open at once; past it: 429.
    #[arg(long, env = "BATON_STREAMS_PER_TOKEN", default_value_t = 32)]
    pub streams_per_token: u32,
    /// How often a WebSocket log stream pings its client; a client that has not answered
    /// within two intervals is dropped.
    #[arg(long, env = "BATON_STREAM_PING_SECONDS", default_value = "20", value_parser = parse_secs)]
    pub stream_ping_interval: Duration,
    /// A live log stream with nothing new (no line, no status change) for this long ends with
    /// an `idle` event; clients reconnect with their last sequence number.
    #[arg(long, env = "BATON_STREAM_IDLE_SECONDS", default_value = "300", value_parser = parse_secs)]
    pub stream_idle_timeout: Duration,
    /// How often the queue-depth gauges of `/metrics` are refreshed from the database (a
    /// scrape never queries it).
    #[arg(long, env = "BATON_METRICS_REFRESH_SECONDS", default_value = "5", value_parser = parse_secs)]
    pub metrics_refresh_interval: Duration,
    /// Networks the outbox (webhook, Slack, Discord) may reach although they are internal,
    /// as comma-separated CIDRs (`10.0.0.0/8,fd00::/8`). By default loopback, private,
    /// link-local (cloud metadata), shared (CGNAT), unspecified, multicast and reserved
    /// addresses are refused, after DNS resolution and on every redirect. Workers read the
    /// same variable for `http` jobs.
    #[arg(long, env = "BATON_HTTP_ALLOW_CIDRS", default_value = "",
          value_parser = |s: &str| s.parse::<baton_egress::AddressPolicy>().map_err(|e| e.to_string()))]
    pub http_allow_cidrs: baton_egress::AddressPolicy,
    /// Mark the dashboard's session cookies `Secure` (set it when the api is served over
    /// TLS; a proxy's `X-Forwarded-Proto: https` does the same per request).
    #[arg(long, env = "BATON_SECURE_COOKIES", default_value_t = false)]
    pub secure_cookies: bool,
    /// Delete finished jobs (and their logs) that finished more than this many days ago, in
    /// small batches (unset: keep everything).
    #[arg(long, env = "BATON_RETENTION_DAYS", value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub retention_days: Option<u32>,
    /// PEM certificate chain: with `BATON_TLS_KEY`, the REST API and the worker gRPC service
    /// serve TLS (clients then use `https://`; workers trust it through the system's roots or
    /// `BATON_API_CA`).
    #[arg(long, env = "BATON_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `BATON_TLS_CERT` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "BATON_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.01..=86_400.0).contains(&secs) {
        return Err(format!("{s} is out of range (0.01 to 86400 seconds)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl ApiConfig {
    /// Defaults for everything but the database (for tests and `baton dev`).
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin_token: None,
            worker_token: None,
            master_key: None,
            body_limit_bytes: 4 * 1024 * 1024,
            lease: Duration::from_secs(15),
            reaper_interval: Duration::from_secs(2),
            db_pool_size: 20,
            http_db_pool_size: 20,
            rate_limit_per_second: 10_000,
            rate_limit_burst: 20_000,
            anonymous_rate_limit_per_second: 100,
            auth_failures_per_second: 2,
            webhook_rate_limit_per_second: 10,
            webhook_rate_limit_burst: 100,
            streams_per_token: 32,
            stream_ping_interval: Duration::from_secs(20),
            stream_idle_timeout: Duration::from_secs(300),
            metrics_refresh_interval: Duration::from_secs(5),
            log_cap_bytes: 16 * 1024 * 1024,
            chain_depth_limit: 20,
            smtp_url: None,
            smtp_from: "baton@localhost".into(),
            http_allow_cidrs: baton_egress::AddressPolicy::default(),
            secure_cookies: false,
            retention_days: None,
            tls_cert: None,
            tls_key: None,
        }
    }

    /// The TLS settings, read from `BATON_TLS_CERT` / `BATON_TLS_KEY` (`None`: plain TCP).
    pub fn tls(&self) -> anyhow::Result<Option<crate::tls::TlsSettings>> {
        crate::tls::files(self.tls_cert.as_deref(), self.tls_key.as_deref())?
            .map(|files| crate::tls::load(&files))
            .transpose()
    }

    /// Workers heartbeat three times per lease, so one lost heartbeat never costs a lease.
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease / 3
    }
}
