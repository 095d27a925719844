//! Workers: connected ones first, their executors, labels, slots busy and free, and when each
//! was last heard from (`GET /api/v1/workers`'s handler).

use axum::extract::State;
use axum::response::Response;
use chrono::Utc;
use serde_json::json;

use super::render::{DashError, duration_text, show};
use super::session::Session;
use crate::AppState;
use crate::http::workers;

pub async fn page_view(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, DashError> {
    let axum::Json(list) = workers::list_workers(State(state), session.caller.clone()).await?;
    let now = Utc::now();
    let items: Vec<_> = list
        .iter()
        .map(|w| {
            json!({
                "w": w,
                "busy": w.running,
                "free": (w.slots - w.running).max(0),
                "seen_ago": duration_text((now - w.last_seen_at).num_seconds()),
            })
        })
        .collect();
    show(
        "workers.html",
        &session,
        "workers",
        "Workers",
        json!({"workers": items}),
    )
}
