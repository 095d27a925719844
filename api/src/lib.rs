//! # baton-api
//!
//! The api service owns PostgreSQL. It serves the REST API, the worker gRPC service, live
//! logs, and runs the background loops (reaper; scheduler and action delivery as they land).
//! Replicas are symmetric: they coordinate only through the database, so any number can run
//! side by side and any one can die without losing state.
//!
//! ## Layout
//! - [`model`]: the API's request/response types and their validation.
//! - [`storage`]: every SQL statement, one module per table family; functions take
//!   `impl PgExecutor` so handlers compose them in one transaction.
//! - [`http`]: axum routes (thin: authenticate, validate, call storage, audit).
//! - [`auth`]: bearer tokens and roles; [`error`]: the one mapping from errors to statuses.
//! - [`grpc`]: the worker stream; [`dispatch`]: pushes claimed jobs to connected workers;
//!   [`notify`]: one LISTEN connection fanned out (queued jobs, cancels, live logs).
//! - [`dashboard`]: the web dashboard at `/` (server-rendered, live over SSE).
//! - [`server`]: start-up (migrations, admin bootstrap) and graceful shutdown; [`reaper`].
//!
//! ## Life of a job
//! `POST /events/{id}/run` inserts a `queued` row (a trigger NOTIFYs dispatchers). A dispatcher
//! claims due jobs in one statement (`FOR UPDATE SKIP LOCKED`, by priority, run_at, id), each
//! under a lease with a fresh fencing token, and hands them to a worker. The worker renews the
//! lease while it runs the job and reports the result with the token; a stale token is refused.
//! A failed attempt is requeued with backoff until `max_attempts`, then it stays `failed` with
//! `dead = true`. If the worker vanishes, the reaper requeues the job when its lease expires.
#![forbid(unsafe_code)]

pub mod actions;
pub mod admission;
pub mod announce;
pub mod auth;
pub mod config;
pub mod crypto;
pub mod dashboard;
pub mod dispatch;
pub mod error;
pub mod event_cache;
pub mod grpc;
pub mod http;
pub mod masking;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod outbox;
pub mod policy;
pub mod process;
pub mod reaper;
pub mod redact;
pub mod retention;
pub mod schedule;
pub mod secret_refs;
pub mod secrets;
pub mod server;
pub mod storage;
pub mod tls;
pub mod token_cache;
pub mod webhooks;
pub mod workflow;

use std::sync::Arc;

pub use config::ApiConfig;
pub use server::{Api, MIGRATOR};

/// What every request handler and worker session shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: sqlx::PgPool,
    pub config: Arc<ApiConfig>,
    pub dispatcher: Arc<dispatch::Dispatcher>,
    pub hub: notify::LogHub,
    /// Wakes this replica's outbox deliverer.
    pub outbox_wake: Arc<tokio::sync::Notify>,
    /// Wakes this replica's schedule firing loop (a schedule was created or changed).
    pub schedules_wake: Arc<tokio::sync::Notify>,
    /// The time schedules are computed and fired by.
    pub clock: Arc<dyn schedule::Clock>,
    /// Tokens verified recently.
    pub tokens: Arc<token_cache::TokenCache>,
    /// Tells the other replicas about runs queued here.
    pub announcer: Arc<announce::Announcer>,
    /// Events recently run here (checked against their revision on every enqueue).
    pub events: Arc<event_cache::EventCache>,
    /// Encrypts and decrypts secrets at rest.
    pub vault: crypto::Vault,
    /// This replica's id (in logs and the `workers` table).
    pub api_id: String,
    /// The last queue-depth reading, for `/metrics`.
    pub queue_depth: Arc<metrics::QueueDepth>,
    /// Live log streams open per token (bounded).
    pub streams: Arc<http::stream_slots::StreamSlots>,
    /// Cancelled when the replica shuts down: ends worker streams and live log streams.
    pub stop: tokio_util::sync::CancellationToken,
}
