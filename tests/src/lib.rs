//! # baton-tests
//!
//! Support for Baton's end-to-end tests: a throwaway PostgreSQL cluster started once per test
//! process from the installed binaries (it stops by itself when the process exits), a template
//! database migrated once, one database cloned from it per test, and [`spawn_app`], which runs
//! a real api replica on port 0 and returns a handle with request helpers.
#![forbid(unsafe_code)]

pub mod faults;
pub mod otlp;
pub mod pki;
pub mod protocol;
pub mod receivers;
pub mod schedules;
pub mod worker;
pub mod workflows;

use std::sync::OnceLock;
use std::time::Duration;

use baton_api::model::Role;
use baton_devdb::Cluster;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::oneshot;

const TEMPLATE: &str = "baton_template";

/// The process-wide cluster, with the migrated template in place.
fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        // Tests run on many runtimes; set up on a private one so no pool outlives its runtime.
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
            runtime.block_on(async {
                let cluster = Cluster::throwaway()
                    .await
                    .expect("start the test PostgreSQL cluster");
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
                    .expect("migrate the template database");
                cluster
            })
        })
        .join()
        .expect("cluster set-up thread")
    })
}

/// A fresh, migrated database of its own for one test.
pub async fn test_database() -> String {
    let cluster = cluster();
    let name = cluster
        .create_unique_database("test", Some(TEMPLATE))
        .await
        .expect("clone the template database");
    cluster.url(&name)
}

/// A pool on a fresh, migrated database (for tests of the storage layer).
pub async fn test_pool() -> PgPool {
    PgPoolOptions::new()
        .max_connections(20)
        .connect(&test_database().await)
        .await
        .expect("connect to the test database")
}

pub const ADMIN_TOKEN: &str = "baton_test_admin_token_0123456789";
pub const MASTER_KEY: &str = "test-master-key-0123456789abcdef-0123456789";

/// A running api replica on its own database.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`
    pub address: String,
    /// The worker gRPC endpoint, `http://127.0.0.1:PORT`.
    pub grpc_address: String,
    pub admin_token: String,
    /// The pool of the worker protocol and background loops.
    pub pool: PgPool,
    /// The REST API's own pool.
    pub http_pool: PgPool,
    pub database_url: String,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Starts an api replica on 127.0.0.1:0 with a fresh database and a known admin token.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Like [`spawn_app`], with the config adjusted first.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut baton_api::ApiConfig)) -> TestApp {
    spawn_replica(test_database().await, adjust).await
}

/// An api replica on an existing database (a second replica of another `TestApp`, say).
pub async fn spawn_replica(
    database_url: String,
    adjust: impl FnOnce(&mut baton_api::ApiConfig),
) -> TestApp {
    spawn_replica_on(database_url, 0, 0, adjust).await
}

/// An api replica on an existing database and given ports (0: any free port).
pub async fn spawn_replica_on(
    database_url: String,
    http_port: u16,
    grpc_port: u16,
    adjust: impl FnOnce(&mut baton_api::ApiConfig),
) -> TestApp {
    init_tracing();
    let mut config = baton_api::ApiConfig::new(database_url.clone());
    config.admin_token = Some(ADMIN_TOKEN.to_owned());
    config.master_key = Some(MASTER_KEY.to_owned());
    config.db_pool_size = 10;
    config.http_db_pool_size = 10;
    adjust(&mut config);
    // With a certificate both services serve TLS (the caller brings a client trusting it).
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let (api, _) = baton_api::Api::start(config).await.expect("start the api");
    let pool = api.state.pool.clone();
    let http_pool = api.http_pool.clone();
    let listener = bind_retrying(http_port).await;
    let address = format!("{scheme}://{}", listener.local_addr().expect("local addr"));
    let grpc = bind_retrying(grpc_port).await;
    let grpc_address = format!("{scheme}://{}", grpc.local_addr().expect("local addr"));
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(api.serve(listener, grpc, async move {
        let _ = rx.await;
    }));
    TestApp {
        address,
        grpc_address,
        admin_token: ADMIN_TOKEN.to_owned(),
        pool,
        http_pool,
        database_url,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client"),
        shutdown: Some(tx),
        server: Some(server),
    }
}

/// A handle on a replica that runs elsewhere (another process): the same request helpers as
/// [`spawn_app`]'s, a pool on its database, and nothing to stop.
pub async fn attach(address: String, grpc_address: String, database_url: String) -> TestApp {
    init_tracing();
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .connect(&database_url)
        .await
        .expect("connect to the replica's database");
    TestApp {
        address,
        grpc_address,
        admin_token: ADMIN_TOKEN.to_owned(),
        http_pool: pool.clone(),
        pool,
        database_url,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client"),
        shutdown: None,
        server: None,
    }
}

/// Binds 127.0.0.1:`port`, retrying for a while: a port just released by a stopped replica
/// may take a moment to be free again.
async fn bind_retrying(port: u16) -> tokio::net::TcpListener {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => return l,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(port, error = %e, "port busy; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot bind 127.0.0.1:{port}: {e}"),
        }
    }
}

impl TestApp {
    /// Stops this replica and starts a new one on the same database and ports (an api
    /// restart, as workers see it).
    pub async fn restart(self, adjust: impl FnOnce(&mut baton_api::ApiConfig)) -> TestApp {
        let port = |addr: &str| {
            addr.rsplit(':')
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .expect("port")
        };
        let (http, grpc) = (port(&self.address), port(&self.grpc_address));
        let database_url = self.database_url.clone();
        self.stop().await;
        spawn_replica_on(database_url, http, grpc, adjust).await
    }

    /// A request with the admin token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.request_as(&self.admin_token, method, path)
    }

    /// A request with the given token.
    pub fn request_as(&self, token: &str, method: Method, path: &str) -> RequestBuilder {
        self.anonymous(method, path).bearer_auth(token)
    }

    /// A request without credentials.
    pub fn anonymous(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.address))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        send(self.request(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        send(self.request(Method::POST, path).json(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        send(self.request(Method::PATCH, path).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        send(self.request(Method::DELETE, path)).await
    }

    /// Creates a token with `role` through the API and returns its secret.
    pub async fn token(&self, role: Role) -> String {
        let (status, body) = self
            .post(
                "/api/v1/tokens",
                &serde_json::json!({"name": format!("test {role}"), "role": role}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["token"].as_str().expect("token in answer").to_owned()
    }

    /// Creates an event (admin) and returns it; panics unless the API answers 201.
    pub async fn create_event(&self, spec: &Value) -> Value {
        let (status, body) = self.post("/api/v1/events", spec).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// Runs an event and returns the job id.
    pub async fn run_event(&self, event_id: &str, body: &Value) -> String {
        let (status, answer) = self
            .post(&format!("/api/v1/events/{event_id}/run"), body)
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        answer["job_id"].as_str().expect("job_id").to_owned()
    }

    /// Stops the server, waiting for in-flight requests.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server result");
        }
    }
}

/// Sends a request and returns the status and the JSON body (`Value::Null` when empty).
pub async fn send(request: RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.expect("request sent");
    let status = response.status();
    let bytes = response.bytes().await.expect("response body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    (status, body)
}

/// A plain event definition for tests.
pub fn bash_event(name: &str) -> Value {
    serde_json::json!({"name": name, "runtime": "bash", "content": "echo hello", "executor": "local"})
}

fn init_tracing() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,sqlx=error".into()),
            )
            .with_test_writer()
            .try_init();
    });
}
