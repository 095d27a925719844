//! What several benchmarks share: a private PostgreSQL with a migrated template database, an
//! api replica and workers in this process, a REST client with the admin token, the summary
//! line, medians and quantiles.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use baton_devdb::Cluster;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The migrated template every benchmark database is cloned from.
pub const TEMPLATE: &str = "baton_template";

/// A throwaway PostgreSQL (non-durable: fsync and synchronous commit off) holding the
/// migrated [`TEMPLATE`]. Stopped and deleted on drop, or when the process exits.
pub async fn cluster() -> anyhow::Result<Cluster> {
    let cluster = Cluster::throwaway()
        .await
        .context("starting a throwaway PostgreSQL")?;
    cluster
        .create_template(TEMPLATE, |url| async move {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await?;
            baton_api::MIGRATOR.run(&pool).await?;
            pool.close().await;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .await
        .context("migrating the template database")?;
    Ok(cluster)
}

/// A fresh database cloned from [`TEMPLATE`], and a pool of up to `connections` on it.
pub async fn database(cluster: &Cluster, name: &str, connections: u32) -> anyhow::Result<PgPool> {
    cluster
        .create_database(name, Some(TEMPLATE))
        .await
        .with_context(|| format!("creating database {name}"))?;
    connect(cluster, name, connections).await
}

/// A pool of `connections` on the existing database `name`.
pub async fn connect(cluster: &Cluster, name: &str, connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(connections)
        .min_connections(connections)
        .connect(&cluster.url(name))
        .await
        .with_context(|| format!("connecting to database {name}"))
}

/// `SELECT version()`, shortened to "PostgreSQL 17.2".
pub async fn server_version(pool: &PgPool) -> anyhow::Result<String> {
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(pool)
        .await?;
    Ok(version
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

/// CPU time (user + system, all threads) a process used so far, from `/proc/PID/stat`; `pid`
/// may be `"self"`. `None` where that is unavailable.
pub fn cpu_time(pid: &str) -> Option<Duration> {
    /// USER_HZ, the unit of utime and stime: 100 on every Linux architecture Baton runs on.
    const TICKS_PER_SECOND: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": utime and stime are fields 14 and 15, counted from pid.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1000 / TICKS_PER_SECOND,
    ))
}

/// The 1-minute load average, to tell a quiet machine from a busy one in the output.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A benchmark's result, printed last as `NAME: key=value key=value ...`.
#[derive(Debug)]
pub struct Summary {
    name: &'static str,
    fields: Vec<(String, String)>,
}

impl Summary {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            fields: Vec::new(),
        }
    }

    /// Adds `key=value`; values must not contain whitespace.
    pub fn field(mut self, key: impl Into<String>, value: impl fmt::Display) -> Self {
        self.fields.push((key.into(), value.to_string()));
        self
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.name)?;
        for (key, value) in &self.fields {
            write!(f, " {key}={value}")?;
        }
        Ok(())
    }
}

/// The admin token every benchmark api replica is started with.
pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";
/// The master key of every benchmark replica (secrets are not used, but the api wants a
/// valid one to store any).
const MASTER_KEY: &str = "bench-master-key-0123456789abcdef-0123456789";

/// An api replica running in this process on 127.0.0.1:0, on its own database.
pub struct ApiHandle {
    /// The worker gRPC endpoint, `http://127.0.0.1:PORT`.
    pub grpc_address: String,
    /// A REST client with the admin token.
    pub rest: Rest,
    /// The benchmark's own pool on the replica's database (for measurements; not the api's).
    pub pool: PgPool,
    /// The database's name (for [`backends_cpu`]).
    pub database: String,
    /// The replica's live-log signals (job finished, lines stored), as its own `LISTEN`
    /// connection receives them.
    pub hub: baton_api::notify::LogHub,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Creates database `name` from the template and starts an api replica on it (HTTP and
/// gRPC on 127.0.0.1:0, [`ADMIN_TOKEN`] bootstrapped); `adjust` may change the config
/// first. The benchmark's own pool holds `connections` connections.
///
/// The listeners are bound as `baton-api` binds them (plain `TcpListener::bind`), unless
/// `BENCH_LISTENER_NODELAY=1`: then they carry `TCP_NODELAY`, which Linux copies to every
/// accepted socket — a diagnostic for what Nagle's algorithm on the api's sockets costs.
pub async fn start_api(
    cluster: &Cluster,
    name: &str,
    connections: u32,
    adjust: impl FnOnce(&mut baton_api::ApiConfig),
) -> anyhow::Result<ApiHandle> {
    let pool = database(cluster, name, connections).await?;
    start_replica(cluster, name, pool, adjust).await
}

/// Starts one more api replica on the existing database `name` (as [`start_api`] does;
/// `pool` becomes the handle's own pool).
pub async fn start_replica(
    cluster: &Cluster,
    name: &str,
    pool: PgPool,
    adjust: impl FnOnce(&mut baton_api::ApiConfig),
) -> anyhow::Result<ApiHandle> {
    let mut config = baton_api::ApiConfig::new(cluster.url(name));
    config.admin_token = Some(ADMIN_TOKEN.to_owned());
    config.master_key = Some(MASTER_KEY.to_owned());
    adjust(&mut config);
    let (api, _) = baton_api::Api::start(config)
        .await
        .context("starting the api")?;
    let http = listen()?;
    let grpc = listen()?;
    let http_address = format!("http://{}", http.local_addr()?);
    let grpc_address = format!("http://{}", grpc.local_addr()?);
    let hub = api.state.hub.clone();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(api.serve(http, grpc, async move {
        let _ = rx.await;
    }));
    Ok(ApiHandle {
        grpc_address,
        rest: Rest::new(http_address, ADMIN_TOKEN)?,
        pool,
        database: name.to_owned(),
        hub,
        shutdown: Some(tx),
        server: Some(server),
    })
}

/// Whether `BENCH_LISTENER_NODELAY=1` is set (see [`start_api`]).
pub fn listener_nodelay() -> bool {
    std::env::var("BENCH_LISTENER_NODELAY").is_ok_and(|v| v == "1")
}

/// A listener on 127.0.0.1:0 (with `TCP_NODELAY` if [`listener_nodelay`]).
fn listen() -> anyhow::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if listener_nodelay() {
        socket.set_nodelay(true)?;
    }
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
    Ok(socket.listen(1024)?)
}

impl ApiHandle {
    /// Stops the replica (waiting for in-flight requests) and closes the benchmark's pool.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.context("the api task panicked")??;
        }
        self.pool.close().await;
        Ok(())
    }

    /// Creates an event from its JSON definition and returns its id.
    pub async fn create_event(&self, spec: &Value) -> anyhow::Result<String> {
        let event = self.rest.post("/api/v1/events", spec).await?;
        event["id"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no id in the created event: {event}"))
    }

    /// Runs an event through `POST /api/v1/events/{id}/run`; returns the job's id.
    pub async fn run_event(&self, event_id: &str) -> anyhow::Result<Uuid> {
        let answer = self
            .rest
            .post(&format!("/api/v1/events/{event_id}/run"), &json!({}))
            .await?;
        let id = answer["job_id"]
            .as_str()
            .with_context(|| format!("no job_id in the answer: {answer}"))?;
        Ok(id.parse()?)
    }

    /// Starts an in-process worker offering `local` with `slots` slots, under a fresh worker
    /// token.
    pub async fn start_worker(&self, slots: u32) -> anyhow::Result<WorkerHandle> {
        self.start_worker_with(slots, |_| {}).await
    }

    /// [`ApiHandle::start_worker`], with the worker's config adjusted first.
    pub async fn start_worker_with(
        &self,
        slots: u32,
        adjust: impl FnOnce(&mut baton_worker::WorkerConfig),
    ) -> anyhow::Result<WorkerHandle> {
        let answer = self
            .rest
            .post(
                "/api/v1/tokens",
                &json!({"name": format!("bench worker {}", Uuid::now_v7()), "role": "worker"}),
            )
            .await?;
        let token = answer["token"]
            .as_str()
            .with_context(|| format!("no token in the answer: {answer}"))?;
        let mut config = baton_worker::WorkerConfig::new(self.grpc_address.clone(), token);
        config.allow_local = true;
        config.slots = slots;
        config.drain_timeout = Duration::from_secs(5);
        adjust(&mut config);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(baton_worker::run(config, async move {
            let _ = rx.await;
        }));
        Ok(WorkerHandle {
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// Waits until `count` workers are connected to the api (`GET /api/v1/workers`).
    pub async fn wait_workers(&self, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM workers WHERE disconnected_at IS NULL")
                    .fetch_one(&self.pool)
                    .await?;
            if usize::try_from(n)? >= count {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "only {n} of {count} workers connected after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// An in-process worker (`baton_worker::run`); [`WorkerHandle::stop`] drains it.
pub struct WorkerHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl WorkerHandle {
    /// Stops the worker and waits (60 s at most) for it to drain.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .context("the worker did not stop within 60 s")?
                .context("the worker task panicked")??;
        }
        Ok(())
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A REST client for one replica, sending a bearer token.
#[derive(Clone)]
pub struct Rest {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Rest {
    pub fn new(base: String, token: &str) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            base,
            token: token.to_owned(),
        })
    }

    /// `http://127.0.0.1:PORT` of the replica.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST path` with a JSON body; the JSON answer, or an error unless the status is 2xx.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body);
        Self::answer(request, path).await
    }

    async fn answer(request: reqwest::RequestBuilder, path: &str) -> anyhow::Result<Value> {
        let response = request
            .send()
            .await
            .with_context(|| format!("sending {path}"))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            bail!("{path}: {status}: {}", String::from_utf8_lossy(&bytes));
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// CPU time used so far by the PostgreSQL backends connected to `database` (the api's, the
/// benchmark's); `None` where `/proc` is unavailable. Backends that exit take their time with
/// them, so compare two readings taken while the same pools are open.
pub async fn backends_cpu(pool: &PgPool, database: &str) -> anyhow::Result<Option<Duration>> {
    let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
        .bind(database)
        .fetch_all(pool)
        .await?;
    Ok(pids.iter().map(|pid| cpu_time(&pid.to_string())).sum())
}

/// The `q`-quantile (0..=1, nearest rank) of `values`; NaN for none.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn quantiles() {
        assert!(quantile(&[], 0.5).is_nan());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn own_cpu_time() {
        assert!(cpu_time("self").is_some());
        assert!(cpu_time("0").is_none());
    }

    #[test]
    fn summary_line() {
        let s = Summary::new("queue").field("a", 1).field("b", "2.50");
        assert_eq!(s.to_string(), "queue: a=1 b=2.50");
    }
}
