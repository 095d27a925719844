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
    /// Database connections of this replica.
    #[arg(long, env = "BATON_DB_POOL", default_value_t = 20)]
    pub db_pool_size: u32,
    /// Networks the outbox (webhook, Slack, Discord) may reach although they are internal,
    /// as comma-separated CIDRs (`10.0.0.0/8,fd00::/8`). By default loopback, private,
    /// link-local (cloud metadata), shared (CGNAT), unspecified, multicast and reserved
    /// addresses are refused, after DNS resolution and on every redirect. Workers read the
    /// same variable for `http` jobs.
    #[arg(long, env = "BATON_HTTP_ALLOW_CIDRS", default_value = "",
          value_parser = |s: &str| s.parse::<baton_egress::AddressPolicy>().map_err(|e| e.to_string()))]
    pub http_allow_cidrs: baton_egress::AddressPolicy,
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
            master_key: None,
            body_limit_bytes: 4 * 1024 * 1024,
            lease: Duration::from_secs(15),
            reaper_interval: Duration::from_secs(2),
            db_pool_size: 20,
            log_cap_bytes: 16 * 1024 * 1024,
            chain_depth_limit: 20,
            smtp_url: None,
            smtp_from: "baton@localhost".into(),
            http_allow_cidrs: baton_egress::AddressPolicy::default(),
        }
    }

    /// Workers heartbeat three times per lease, so one lost heartbeat never costs a lease.
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease / 3
    }
}
