//! The worker's own Prometheus metrics, served at `GET /metrics` on
//! `BATON_WORKER_METRICS_LISTEN` (off by default): its slots, the runs it reported, its
//! session with the api, its spare containers, its pooled ssh connections and their circuit
//! breakers. Every name is listed in docs/operations.md. A scrape reads memory only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use baton_proto::v1::ErrorKind;
use tokio_util::sync::CancellationToken;

use crate::executor::ContainerExecutor;
use crate::executor::ssh::BreakerState;
use crate::executor::ssh::SshExecutor;
use crate::worker::Shared;

/// What the metrics are read from.
pub(crate) struct Sources {
    pub shared: Arc<Shared>,
    pub container: Option<Arc<ContainerExecutor>>,
    pub ssh: Option<Arc<SshExecutor>>,
}

/// Runs reported to the api, by result (`succeeded`, or the error kind).
#[derive(Debug, Default)]
pub(crate) struct RunCounts(Mutex<BTreeMap<&'static str, u64>>);

/// Every result a run can have, each reported from zero.
const RESULTS: [&str; 6] = [
    "succeeded",
    "script",
    "infrastructure",
    "timeout",
    "cancelled",
    "output",
];

fn result_of(kind: i32) -> &'static str {
    match ErrorKind::try_from(kind).unwrap_or(ErrorKind::Unspecified) {
        ErrorKind::Unspecified => "succeeded",
        ErrorKind::Script => "script",
        ErrorKind::Infrastructure => "infrastructure",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Cancelled => "cancelled",
        ErrorKind::Output => "output",
    }
}

/// Counts a run's report (`Finished.error_kind`).
pub(crate) fn run_finished(counts: &RunCounts, error_kind: i32) {
    *counts
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(result_of(error_kind))
        .or_default() += 1;
}

/// The exposition text.
pub(crate) fn render(src: &Sources) -> String {
    let mut text = String::new();
    let (running, held, connected) = {
        let st = src.shared.lock();
        (st.running, st.jobs_held(), st.connected())
    };
    let slots = src.shared.config.slots;
    family(
        &mut text,
        "baton_worker_slots",
        "gauge",
        "Job slots of this worker, by state (busy: a run's process has not ended).",
        &[
            ("state=\"total\"", slots.into()),
            ("state=\"busy\"", running.into()),
            ("state=\"free\"", slots.saturating_sub(running).into()),
        ],
    );
    family(
        &mut text,
        "baton_worker_jobs_held",
        "gauge",
        "Jobs this worker holds a lease on (running, or finished and not yet acknowledged).",
        &[("", held as u64)],
    );
    family(
        &mut text,
        "baton_worker_connected",
        "gauge",
        "1 while a session with an api replica is open.",
        &[("", u64::from(connected))],
    );
    let counts = src
        .shared
        .runs
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let runs: Vec<(String, u64)> = RESULTS
        .iter()
        .map(|r| {
            (
                format!("result=\"{r}\""),
                counts.get(r).copied().unwrap_or(0),
            )
        })
        .collect();
    let runs: Vec<(&str, u64)> = runs.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    family(
        &mut text,
        "baton_worker_runs_total",
        "counter",
        "Runs this worker reported to the api, by result (succeeded or the error kind).",
        &runs,
    );
    let spares = src
        .container
        .as_ref()
        .map(|c| c.spare_stats())
        .unwrap_or_default();
    family(
        &mut text,
        "baton_worker_spare_containers",
        "gauge",
        "Pre-started containers ready for a run.",
        &[("", spares.idle as u64)],
    );
    family(
        &mut text,
        "baton_worker_container_starts_total",
        "counter",
        "Container runs by start: warm (took a spare) or cold (created its container).",
        &[
            ("start=\"warm\"", spares.warm_runs),
            ("start=\"cold\"", spares.cold_runs),
        ],
    );
    let servers = src
        .ssh
        .as_ref()
        .map(|s| s.all_server_stats())
        .unwrap_or_default();
    let sum = |f: fn(&crate::executor::ssh::ServerStats) -> usize| {
        servers.iter().map(f).sum::<usize>() as u64
    };
    family(
        &mut text,
        "baton_worker_ssh_connections",
        "gauge",
        "Pooled ssh connections over all servers: open (idle or in use) and idle.",
        &[
            ("state=\"open\"", sum(|s| s.open_connections)),
            ("state=\"idle\"", sum(|s| s.idle_connections)),
        ],
    );
    family(
        &mut text,
        "baton_worker_ssh_runs",
        "gauge",
        "ssh runs in progress over all servers.",
        &[("", sum(|s| s.runs_in_progress))],
    );
    let in_state =
        |state: BreakerState| servers.iter().filter(|s| s.breaker == state).count() as u64;
    family(
        &mut text,
        "baton_worker_ssh_breakers",
        "gauge",
        "ssh servers by circuit breaker state (open: runs fail fast).",
        &[
            ("state=\"closed\"", in_state(BreakerState::Closed)),
            ("state=\"open\"", in_state(BreakerState::Open)),
            ("state=\"half_open\"", in_state(BreakerState::HalfOpen)),
        ],
    );
    text
}

fn family(text: &mut String, name: &str, kind: &str, help: &str, series: &[(&str, u64)]) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in series {
        if labels.is_empty() {
            let _ = writeln!(text, "{name} {value}");
        } else {
            let _ = writeln!(text, "{name}{{{labels}}} {value}");
        }
    }
}

/// Serves `GET /metrics` until `stop`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    sources: Sources,
    stop: CancellationToken,
) {
    let sources = Arc::new(sources);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let sources = sources.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    render(&sources),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::warn!(error = %e, "the metrics server failed");
    }
}
