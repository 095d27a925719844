//! A run's page: status, attempts, timings, exit code or error, input and output, progress,
//! the worker, the chain drawn as a graph, and the log (ANSI rendered, followed live by
//! [`super::live::run`]). Cancel, force kill and rerun call the REST handlers.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;

use super::ansi;
use super::forms::Form;
use super::graph::{self, Edge, Node};
use super::render::{DashError, duration_text, fragment, show};
use super::runs::worker_names;
use super::session::Session;
use crate::AppState;
use crate::http::extract::parse_uuid;
use crate::http::jobs;
use crate::model::{Job, LogLine};
use crate::storage::{logs, queue};

/// Lines drawn with the page; the rest comes over the live stream (or the download).
pub const FIRST_LINES: usize = 10_000;
/// Jobs of a chain drawn at most.
const CHAIN_LIMIT: i64 = 200;

/// A log line as the page shows it.
pub fn line_view(line: &LogLine) -> Value {
    json!({"seq": line.seq, "stream": line.stream, "html": ansi::to_html(&line.text)})
}

/// The summary of a job (status, progress, timings…), rendered for the page and for the live
/// updates alike.
pub async fn summary(state: &AppState, job: &Job) -> Result<Value, DashError> {
    let names = worker_names(state).await?;
    let now = Utc::now();
    let ran = job
        .started_at
        .map(|s| duration_text((job.finished_at.unwrap_or(now) - s).num_seconds()));
    let waited = job
        .started_at
        .map(|s| duration_text((s - job.created_at).num_seconds()));
    Ok(json!({
        "job": job,
        "worker": job.worker_id.map(|w| names.get(&w).cloned().unwrap_or_else(|| w.to_string())),
        "ran": ran,
        "waited": waited,
        "finished": job.status.is_terminal(),
    }))
}

pub async fn page_view(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Response, DashError> {
    let axum::Json(job) =
        jobs::get_job(State(state.clone()), session.caller.clone(), Path(id)).await?;
    let lines = logs::lines_after(&state.pool, job.id, 0, FIRST_LINES).await?;
    let after = lines.last().map_or(0, |l| l.seq);
    let chain = chain(&state, &job).await?;
    let summary_ctx = summary(&state, &job).await?;
    let ctx = json!({
        "job": job,
        "summary_html": fragment("run_summary.html", &summary_ctx)?,
        "input": pretty(&job.input),
        "output": job.output.as_ref().map(pretty),
        "lines": lines.iter().map(line_view).collect::<Vec<_>>(),
        "truncated": lines.len() == FIRST_LINES,
        "live_url": (!job.status.is_terminal()).then(|| format!("/live/runs/{}?after={after}", job.id)),
        "graph": chain.0,
        "parent": job.parent_job_id,
        "children": chain.1,
        "chain_size": chain.2,
        "cancellable": !job.status.is_terminal(),
    });
    let title = format!("Run {} of {}", &job.id.to_string()[..8], job.event_name);
    show("run.html", &session, "runs", &title, ctx)
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The SVG of the chain `job` belongs to (from its root), its children, and the chain's size.
async fn chain(
    state: &AppState,
    job: &Job,
) -> Result<(Option<String>, Vec<Value>, usize), DashError> {
    let mut members = queue::list_jobs(
        &state.pool,
        &queue::JobFilter {
            root_job_id: Some(job.root_job_id),
            limit: CHAIN_LIMIT,
            ..Default::default()
        },
    )
    .await?;
    members.reverse(); // oldest first: parents before children
    let children: Vec<Value> = members
        .iter()
        .filter(|m| m.parent_job_id == Some(job.id))
        .map(|m| json!({"id": m.id, "event_name": m.event_name, "status": m.status}))
        .collect();
    if members.len() <= 1 {
        return Ok((None, children, members.len()));
    }
    let nodes: Vec<Node> = members
        .iter()
        .map(|m| Node {
            id: m.id.to_string(),
            label: m.event_name.clone(),
            sublabel: format!("{} · …{}", m.status, &m.id.to_string()[28..]),
            class: m.status.to_string(),
            href: Some(format!("/runs/{}", m.id)),
            current: m.id == job.id,
        })
        .collect();
    let edges: Vec<Edge> = members
        .iter()
        .filter_map(|m| {
            m.parent_job_id.map(|p| Edge {
                from: p.to_string(),
                to: m.id.to_string(),
            })
        })
        .collect();
    let svg = graph::svg(
        &format!(
            "Chain of {} runs from {}",
            members.len(),
            members[0].event_name
        ),
        &nodes,
        &edges,
    );
    Ok((Some(svg), children, members.len()))
}

/// `POST /runs/{id}/cancel` (`force=true`: kill at once).
pub async fn cancel(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, DashError> {
    session.check_csrf(&form)?;
    let force = form.get("force") == Some("true");
    let query = jobs::CancelQuery {
        force: Some(force.to_string()),
    };
    let (_, axum::Json(job)) = jobs::cancel_job(
        State(state),
        session.caller.clone(),
        Path(id),
        Ok(Query(query)),
    )
    .await?;
    Ok(Redirect::to(&format!("/runs/{}", job.id)).into_response())
}

/// `POST /runs/{id}/rerun`: to the new run's page.
pub async fn rerun(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, DashError> {
    session.check_csrf(&form)?;
    let (_, axum::Json(accepted)) = jobs::rerun_job(
        State(state),
        session.caller.clone(),
        Path(id),
        axum::http::HeaderMap::new(),
    )
    .await?;
    Ok(Redirect::to(&format!("/runs/{}", accepted.job_id)).into_response())
}

/// The id of a path, as the API parses it.
pub fn id_of(raw: &str) -> Result<Uuid, DashError> {
    Ok(parse_uuid("id", raw)?)
}
