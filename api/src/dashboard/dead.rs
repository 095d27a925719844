//! The dead letter: runs that failed and used up their attempts, newest first, each with a
//! rerun button, and a rerun of the selected ones (each through `POST /jobs/{id}/rerun`'s
//! handler, so each is checked and audited on its own).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::json;

use super::forms::Form;
use super::render::{DashError, show};
use super::runs::{RunView, query_string, worker_names};
use super::session::Session;
use crate::AppState;
use crate::http::jobs::{self, ListJobsQuery, job_page};
use crate::model::Role;

/// Runs one page shows.
const PAGE_SIZE: i64 = 50;

pub async fn page_view(
    State(state): State<AppState>,
    session: Session,
    query: Result<Query<ListJobsQuery>, QueryRejection>,
) -> Result<Response, DashError> {
    session.caller.require(Role::Viewer)?;
    let Query(mut q) = query.map_err(jobs::query_error)?;
    q.dead = Some("true".into());
    let filter = q.filter(PAGE_SIZE)?;
    let found = job_page(&state.pool, &filter).await?;
    let names = worker_names(&state).await?;
    let next_href = found.next_cursor.as_ref().map(|c| {
        let keep = query_string(&q, &["cursor", "dead"]);
        format!(
            "/dead?{keep}{}cursor={c}",
            if keep.is_empty() { "" } else { "&" }
        )
    });
    show(
        "dead.html",
        &session,
        "dead",
        "Dead letter",
        json!({
            "rows": found.items.iter().map(|j| RunView::new(j, &names)).collect::<Vec<_>>(),
            "next_href": next_href,
        }),
    )
}

/// `POST /dead/rerun`: `id` once per selected run, or `only` (a row's own button) for one.
pub async fn rerun(
    State(state): State<AppState>,
    session: Session,
    form: Form,
) -> Result<Response, DashError> {
    session.check_csrf(&form)?;
    let ids = match form.get("only") {
        Some(one) => vec![one],
        None => form.all("id"),
    };
    if ids.is_empty() {
        return Err(crate::model::FieldError::new("id", "select at least one run to rerun").into());
    }
    let mut last = None;
    for id in &ids {
        let (_, axum::Json(accepted)) = jobs::rerun_job(
            State(state.clone()),
            session.caller.clone(),
            Path((*id).to_owned()),
            axum::http::HeaderMap::new(),
        )
        .await?;
        last = Some(accepted.job_id);
    }
    // One run: its page; several: the runs list.
    Ok(match (ids.len(), last) {
        (1, Some(id)) => Redirect::to(&format!("/runs/{id}")),
        _ => Redirect::to("/?status=queued"),
    }
    .into_response())
}
