//! Prometheus metrics at `GET /metrics`: queue depth by status (read from the database by a
//! background task every `BATON_METRICS_REFRESH_SECONDS`, so every replica reports the same
//! truth and a scrape never queries the database), connected workers, open live log streams,
//! dispatch latency (due → handed to a worker), completions by status and errors by kind,
//! schedule lag (a slot's due time → its firing), running jobs flagged stuck
//! (`baton_jobs_stuck`, read with the queue depth).
//!
//! `/metrics` needs no token, so any Prometheus can scrape it: it shows counts only (no names,
//! ids or payloads), costs no query, and falls under the per-address limit for requests
//! without a token.

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
/// Seconds from a schedule slot's due time (nominal fire time plus jitter) to its firing.
pub const SCHEDULE_LAG: &str = "baton_schedule_lag_seconds";

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
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(SCHEDULE_LAG.into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0,
                    ],
                )
            })
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

/// This replica's last reading of the queue depth (queued, claimed, running), set by
/// [`refresh_loop`] and rendered by a scrape.
/// Also the number of running jobs flagged stuck (`baton_jobs_stuck`).
#[derive(Debug, Default)]
pub struct QueueDepth(std::sync::Mutex<(Option<[i64; 3]>, Option<i64>)>);

const DEPTH_STATUSES: [&str; 3] = ["queued", "claimed", "running"];

impl QueueDepth {
    fn set(&self, depth: [i64; 3]) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0 = Some(depth);
    }

    fn set_stuck(&self, stuck: i64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(stuck);
    }

    fn get(&self) -> Option<[i64; 3]> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn stuck(&self) -> Option<i64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

/// Reads the queue depth every `interval` until `stop`; a failed read keeps the last values
/// (and is logged).
pub async fn refresh_loop(
    pool: sqlx::PgPool,
    depth: std::sync::Arc<QueueDepth>,
    interval: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match crate::storage::queue::depth_by_status(&pool).await {
            Ok(rows) => depth.set(DEPTH_STATUSES.map(|status| {
                rows.iter()
                    .find(|(s, _)| s == status)
                    .map_or(0, |(_, n)| *n)
            })),
            Err(e) => tracing::warn!(error = %e, "cannot refresh the queue-depth metrics"),
        }
        match crate::storage::stuck::count(&pool).await {
            Ok(n) => depth.set_stuck(n),
            Err(e) => tracing::warn!(error = %e, "cannot refresh the stuck-jobs metric"),
        }
    }
}

/// `GET /metrics`: what is recorded process-wide, then this replica's own gauges (queue depth
/// as last read, connected workers, open live log streams). Reads nothing from the database.
pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    use std::fmt::Write;
    let mut text = handle().render();
    if let Some(depth) = state.queue_depth.get() {
        text.push_str("# TYPE baton_jobs gauge\n");
        for (status, n) in DEPTH_STATUSES.iter().zip(depth) {
            let _ = writeln!(text, "baton_jobs{{status=\"{status}\"}} {n}");
        }
    }
    if let Some(stuck) = state.queue_depth.stuck() {
        let _ = writeln!(
            text,
            "# TYPE baton_jobs_stuck gauge\nbaton_jobs_stuck {stuck}"
        );
    }
    let _ = write!(
        text,
        "# TYPE baton_workers_connected gauge\nbaton_workers_connected {}\n\
         # TYPE baton_live_log_streams gauge\nbaton_live_log_streams {}\n",
        state.dispatcher.connected_workers(),
        state.streams.total()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
