//! Prometheus metrics at `GET /metrics` (every name is listed, with its labels and meaning, in
//! docs/operations.md).
//!
//! Three kinds, each read the cheapest way:
//! - **counters and histograms** of what this replica did (jobs enqueued, finished, retried,
//!   executor errors, dispatch latency, run durations, log bytes), recorded in memory as it
//!   happens. They are per replica, as Prometheus expects: `sum(rate(...))` over the replicas
//!   gives the cluster's figure.
//! - **gauges read from the database** (queue depth by status and by priority, running jobs,
//!   pending outbox messages) by a background task every `BATON_METRICS_REFRESH_SECONDS`, so a
//!   scrape never queries the database. Every replica reports the same truth: aggregate them
//!   with `max`, not `sum`.
//! - **gauges of this replica's memory** (connected workers, their slots, open live log
//!   streams), read at scrape time: `sum` them over the replicas.
//!
//! `/metrics` needs no token, so any Prometheus can scrape it: it shows counts only (no names,
//! ids or payloads), costs no query, and falls under the per-address limit for requests
//! without a token.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::AppState;
use crate::dispatch::RunInfo;
use crate::storage::gauges::QueueGauges;
use crate::storage::queue::{Completion, Outcome};

pub const JOBS_ENQUEUED: &str = "baton_jobs_enqueued_total";
pub const JOBS_FINISHED: &str = "baton_jobs_finished_total";
pub const JOBS_RETRIED: &str = "baton_jobs_retried_total";
pub const EXECUTOR_ERRORS: &str = "baton_executor_errors_total";
pub const DISPATCH_LATENCY: &str = "baton_dispatch_latency_seconds";
pub const JOB_DURATION: &str = "baton_job_duration_seconds";
pub const LOG_BYTES: &str = "baton_log_bytes_stored_total";
/// Seconds from a schedule slot's due time (nominal fire time plus jitter) to its firing.
pub const SCHEDULE_LAG: &str = "baton_schedule_lag_seconds";

/// The terminal statuses, each counted from zero.
const FINAL_STATUSES: [&str; 4] = ["succeeded", "failed", "timed_out", "cancelled"];

/// The process-wide recorder (installed once, whatever the number of replicas in a process).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(DISPATCH_LATENCY.into()),
                &[
                    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(JOB_DURATION.into()),
                    &[
                        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                    ],
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(SCHEDULE_LAG.into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0,
                    ],
                )
            })
            .map(PrometheusBuilder::build_recorder);
        let handle = match recorder {
            Ok(recorder) => {
                let handle = recorder.handle();
                // Another recorder may already be installed (an embedding program's): then ours
                // still renders what is recorded through it directly.
                let _ = metrics::set_global_recorder(recorder);
                handle
            }
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        };
        describe();
        handle
    })
}

/// HELP texts, and the counters that start at zero so a dashboard has a series from the
/// first scrape (a counter that appears at its first increment loses that increment in `rate`).
fn describe() {
    metrics::describe_counter!(JOBS_ENQUEUED, "Jobs queued by this replica (all sources).");
    metrics::describe_counter!(
        JOBS_FINISHED,
        "Jobs that reached a terminal status on this replica, by status."
    );
    metrics::describe_counter!(
        JOBS_RETRIED,
        "Failed attempts put back in the queue for another attempt."
    );
    metrics::describe_counter!(
        EXECUTOR_ERRORS,
        "Runs that ended with an error, by executor and error kind."
    );
    metrics::describe_histogram!(
        DISPATCH_LATENCY,
        metrics::Unit::Seconds,
        "From a job being due (queued, or its run_at) to its assignment to a worker."
    );
    metrics::describe_histogram!(
        JOB_DURATION,
        metrics::Unit::Seconds,
        "From assignment to the worker's completion report, by executor."
    );
    metrics::describe_counter!(LOG_BYTES, "Log text bytes stored.");
    metrics::describe_histogram!(
        SCHEDULE_LAG,
        metrics::Unit::Seconds,
        "From a schedule slot's due time (nominal time plus jitter) to its firing by this replica."
    );
    metrics::counter!(JOBS_ENQUEUED).absolute(0);
    metrics::counter!(JOBS_RETRIED).absolute(0);
    for status in FINAL_STATUSES {
        metrics::counter!(JOBS_FINISHED, "status" => status).absolute(0);
    }
}

/// A job was queued (REST, webhook, schedule, chain, rerun).
pub fn job_enqueued() {
    metrics::counter!(JOBS_ENQUEUED).increment(1);
}

/// A job reached a terminal status outside a worker's report (reaped, cancelled while queued,
/// undispatchable).
pub fn job_finished(status: &str) {
    metrics::counter!(JOBS_FINISHED, "status" => status.to_owned()).increment(1);
}

/// A worker's completion was recorded: its status (or retry), its error, its duration.
pub fn run_ended(run: Option<&RunInfo>, done: Completion, outcome: &Outcome) {
    match done {
        Completion::Finished { status, .. } => job_finished(status.as_str()),
        Completion::Retrying { .. } => metrics::counter!(JOBS_RETRIED).increment(1),
    }
    let executor = run.map_or("unknown", |r| r.executor.as_str()).to_owned();
    if let Some(err) = &outcome.error {
        metrics::counter!(EXECUTOR_ERRORS, "executor" => executor.clone(), "kind" => err.kind.as_str())
            .increment(1);
    }
    if let Some(run) = run {
        metrics::histogram!(JOB_DURATION, "executor" => executor)
            .record(run.assigned.elapsed().as_secs_f64());
    }
}

/// This replica's last reading of the database gauges, set by [`refresh_loop`] and rendered
/// by a scrape.
#[derive(Debug, Default)]
pub struct QueueDepth(std::sync::Mutex<Option<QueueGauges>>);

impl QueueDepth {
    fn set(&self, gauges: QueueGauges) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(gauges);
    }

    fn get(&self) -> Option<QueueGauges> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Reads the database gauges every `interval` until `stop`; a failed read keeps the last
/// values (and is logged).
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
        match crate::storage::gauges::read(&pool).await {
            Ok(gauges) => depth.set(gauges),
            Err(e) => tracing::warn!(error = %e, "cannot refresh the queue-depth metrics"),
        }
    }
}

/// `GET /metrics`: what is recorded process-wide, then the database gauges as last read and
/// this replica's own gauges. Reads nothing from the database.
pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let mut text = handle().render();
    if let Some(gauges) = state.queue_depth.get() {
        render_queue(&mut text, &gauges);
    }
    let slots = state.dispatcher.slots();
    gauge(
        &mut text,
        "baton_workers_connected",
        "Workers holding a session with this replica.",
        &[("", state.dispatcher.connected_workers() as i64)],
    );
    gauge(
        &mut text,
        "baton_worker_slots",
        "Job slots of the workers connected to this replica, by state (total = busy + free).",
        &[
            ("state=\"total\"", slots.total as i64),
            ("state=\"busy\"", slots.busy as i64),
            (
                "state=\"free\"",
                slots.total.saturating_sub(slots.busy) as i64,
            ),
        ],
    );
    gauge(
        &mut text,
        "baton_live_log_streams",
        "Live log streams (SSE and WebSocket) open on this replica.",
        &[("", state.streams.total() as i64)],
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

fn render_queue(text: &mut String, g: &QueueGauges) {
    gauge(
        text,
        "baton_jobs",
        "Jobs by status, from the database (the same on every replica).",
        &[
            ("status=\"queued\"", g.queued),
            ("status=\"claimed\"", g.claimed),
            ("status=\"running\"", g.running),
        ],
    );
    let by_priority: Vec<(String, i64)> = g
        .queued_by_priority
        .iter()
        .map(|(p, n)| (format!("priority=\"{p}\""), *n))
        .collect();
    let by_priority: Vec<(&str, i64)> = by_priority.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    gauge(
        text,
        "baton_jobs_queued",
        "Queued jobs (due or delayed) by priority, from the database.",
        &by_priority,
    );
    gauge(
        text,
        "baton_jobs_running",
        "Jobs claimed by or running on a worker, from the database.",
        &[("", g.claimed + g.running)],
    );
    gauge(
        text,
        "baton_jobs_stuck",
        "Running jobs flagged stuck (no log, progress or start for their event's stuck_after_seconds), from the database.",
        &[("", g.stuck)],
    );
    gauge(
        text,
        "baton_outbox_pending",
        "Messages (webhook, Slack, Discord, email) waiting for delivery, from the database.",
        &[("", g.outbox_pending)],
    );
}

/// Appends one gauge family: `(labels, value)` per series (`""`: no labels).
fn gauge(text: &mut String, name: &str, help: &str, series: &[(&str, i64)]) {
    use std::fmt::Write;
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, value) in series {
        if labels.is_empty() {
            let _ = writeln!(text, "{name} {value}");
        } else {
            let _ = writeln!(text, "{name}{{{labels}}} {value}");
        }
    }
}
