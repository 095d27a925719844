//! The runs page (the dashboard's home): counts per status, the runs active now, and the
//! list of runs with filters and keyset pagination. The first page updates live (see
//! [`super::live::runs`]), from the same fragments this module renders.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use chrono::Utc;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::render::{DashError, duration_text, fragment, show, urlencode};
use super::session::Session;
use crate::AppState;
use crate::http::jobs::{ListJobsQuery, job_page};
use crate::model::{JobSummary, Role};
use crate::storage::{events, queue, workers};

/// Counts above this show as "10000+" (each count stops there: see
/// [`queue::count_by_status`]).
pub const COUNT_CAP: i64 = 10_000;
const PAGE_SIZE: i64 = 50;

/// A run as a row of the list.
#[derive(Debug, Serialize)]
pub struct RunView {
    pub id: Uuid,
    pub short: String,
    pub event_id: Uuid,
    pub event_name: String,
    pub status: String,
    pub progress: Option<i16>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub dead: bool,
    pub created_at: String,
    /// Running: time since it started; finished: how long it ran.
    pub elapsed: String,
    pub worker: Option<String>,
    pub worker_id: Option<Uuid>,
    pub error: Option<String>,
    pub cancel_requested: bool,
}

impl RunView {
    pub fn new(j: &JobSummary, worker_names: &HashMap<Uuid, String>) -> Self {
        let elapsed = match (j.started_at, j.finished_at) {
            (Some(s), Some(f)) => duration_text((f - s).num_seconds()),
            (Some(s), None) => duration_text((Utc::now() - s).num_seconds()),
            (None, Some(_)) => "–".into(),
            (None, None) => format!(
                "waiting {}",
                duration_text((Utc::now() - j.created_at).num_seconds())
            ),
        };
        Self {
            id: j.id,
            short: j.id.to_string()[..8].to_owned() + "…" + &j.id.to_string()[32..],
            event_id: j.event_id,
            event_name: j.event_name.clone(),
            status: j.status.to_string(),
            progress: j.progress,
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            dead: j.dead,
            created_at: j.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            elapsed,
            worker: j.worker_id.map(|w| {
                worker_names
                    .get(&w)
                    .cloned()
                    .unwrap_or_else(|| w.to_string()[..8].to_owned())
            }),
            worker_id: j.worker_id,
            error: j
                .error
                .as_ref()
                .map(|e| format!("{}: {}", e.kind, e.message)),
            cancel_requested: j.cancel_requested,
        }
    }
}

/// Worker ids to names.
pub async fn worker_names(state: &AppState) -> Result<HashMap<Uuid, String>, DashError> {
    Ok(workers::list(&state.pool, state.config.lease)
        .await?
        .into_iter()
        .map(|w| (w.id, w.name))
        .collect())
}

/// The live parts of the page: counts, active runs and the rows of `q`'s page.
pub async fn live_parts(state: &AppState, q: &ListJobsQuery) -> Result<Value, DashError> {
    let names = worker_names(state).await?;
    let filter = q.filter(PAGE_SIZE)?;
    let page = job_page(&state.pool, &filter).await?;
    let counts = queue::count_by_status(&state.pool, COUNT_CAP).await?;
    let dead = queue::count_dead(&state.pool, COUNT_CAP).await?;
    let active = queue::list_jobs(
        &state.pool,
        &queue::JobFilter {
            active: true,
            limit: 20,
            ..Default::default()
        },
    )
    .await?;
    let base = query_string(q, &["status", "dead", "stuck", "cursor"]);
    let count_view: Vec<Value> = counts
        .iter()
        .map(|(status, n)| {
            json!({
                "status": status.as_str(),
                "count": count_text(*n),
                "href": format!("/?{base}{}status={status}", amp(&base)),
                "selected": q.status.as_deref() == Some(status.as_str()),
            })
        })
        .collect();
    let next_href = page.next_cursor.as_ref().map(|c| {
        let keep = query_string(q, &["cursor"]);
        format!("/?{keep}{}cursor={c}", amp(&keep))
    });
    Ok(json!({
        "rows": page.items.iter().map(|j| RunView::new(j, &names)).collect::<Vec<_>>(),
        "active": active.iter().map(|j| RunView::new(j, &names)).collect::<Vec<_>>(),
        "counts": count_view,
        "dead_count": count_text(dead),
        "dead_href": format!("/?{base}{}dead=true", amp(&base)),
        "next_href": next_href,
    }))
}

fn amp(base: &str) -> &'static str {
    if base.is_empty() { "" } else { "&" }
}

fn count_text(n: i64) -> String {
    if n >= COUNT_CAP {
        format!("{COUNT_CAP}+")
    } else {
        n.to_string()
    }
}

/// `q` as a query string without the parameters in `skip`.
pub fn query_string(q: &ListJobsQuery, skip: &[&str]) -> String {
    let pairs = [
        ("status", &q.status),
        ("event_id", &q.event_id),
        ("root_job_id", &q.root_job_id),
        ("dead", &q.dead),
        ("schedule_id", &q.schedule_id),
        ("worker_id", &q.worker_id),
        ("stuck", &q.stuck),
        ("limit", &q.limit),
        ("cursor", &q.cursor),
    ];
    pairs
        .iter()
        .filter(|(k, _)| !skip.contains(k))
        .filter_map(|(k, v)| {
            v.as_deref()
                .filter(|v| !v.is_empty())
                .map(|v| format!("{k}={}", urlencode(v)))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Renders the three live fragments from [`live_parts`].
pub fn fragments(parts: &Value) -> Result<Value, DashError> {
    Ok(json!({
        "rows": fragment("runs_rows.html", parts)?,
        "counts": fragment("runs_counts.html", parts)?,
        "active": fragment("runs_active.html", parts)?,
    }))
}

/// `GET /`: the runs.
pub async fn page_handler(
    state: &AppState,
    session: &Session,
    q: ListJobsQuery,
) -> Result<Response, DashError> {
    session.caller.require(Role::Viewer)?;
    let mut ctx = live_parts(state, &q).await?;
    let all_events = events::list_events(&state.pool, None, 500).await?;
    let event_options: Vec<Value> = all_events
        .iter()
        .map(|e| json!({"id": e.id, "name": e.spec.name}))
        .collect();
    let worker_options: Vec<Value> = worker_names(state)
        .await?
        .into_iter()
        .map(|(id, name)| json!({"id": id, "name": name}))
        .collect();
    let live_query = query_string(&q, &["cursor"]);
    let obj = ctx.as_object_mut().expect("live parts are an object");
    obj.insert("q".into(), serde_json::to_value(&q).unwrap_or_default());
    obj.insert("events".into(), json!(event_options));
    obj.insert("workers".into(), json!(worker_options));
    obj.insert(
        "statuses".into(),
        json!(
            crate::model::JobStatus::ALL
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
        ),
    );
    // Only the first page follows new runs live; deeper pages are history.
    obj.insert(
        "live_url".into(),
        json!(
            q.cursor
                .is_none()
                .then(|| format!("/live/runs?{live_query}"))
        ),
    );
    show("runs.html", session, "runs", "Runs", ctx)
}

pub async fn page(
    State(state): State<AppState>,
    session: Session,
    query: Result<Query<ListJobsQuery>, QueryRejection>,
) -> Result<Response, DashError> {
    let Query(q) = query.map_err(crate::http::jobs::query_error)?;
    page_handler(&state, &session, q).await
}
