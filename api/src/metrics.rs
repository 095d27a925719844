//! Prometheus metrics at `GET /metrics`: queue depth by status (read from the database at
//! scrape time, so every replica reports the same truth), connected workers, dispatch latency
//! (due → handed to a worker), completions by status and errors by kind.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::AppState;

pub const DISPATCH_LATENCY: &str = "baton_dispatch_latency_seconds";
pub const JOBS_COMPLETED: &str = "baton_jobs_completed_total";
pub const JOB_ERRORS: &str = "baton_job_errors_total";
pub const LOG_BYTES: &str = "baton_log_bytes_stored_total";

/// The process-wide recorder (installed once, whatever the number of replicas in a process).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(DISPATCH_LATENCY.into()),
                &[
                    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ],
            )
            .map(PrometheusBuilder::build_recorder);
        match recorder {
            Ok(recorder) => {
                let handle = recorder.handle();
                // Another recorder may already be installed (an embedding program's): then ours
                // still renders what is recorded through it directly.
                let _ = metrics::set_global_recorder(recorder);
                handle
            }
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let depth: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM jobs WHERE status IN ('queued', 'claimed', 'running') GROUP BY status",
    )
    .fetch_all(&state.pool)
    .await
    .unwrap_or_default();
    for status in ["queued", "claimed", "running"] {
        let n = depth
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("baton_jobs", "status" => status).set(n as f64);
    }
    metrics::gauge!("baton_workers_connected").set(state.dispatcher.connected_workers() as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle().render(),
    )
}
