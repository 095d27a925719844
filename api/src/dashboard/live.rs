//! The dashboard's live updates, as Server-Sent Events of HTML fragments rendered by the same
//! templates as the pages (so the browser's script only swaps markup the server escaped).
//!
//! - `/live/runs?FILTERS`: the runs page's counts, active runs and first page of rows, sent
//!   again whenever they change. Woken by the replica's notifications (log lines, finished
//!   runs: [`crate::notify::LogHub`]) and by a one-second look for what sends no
//!   notification (new runs, claims, progress; the queue's notifications stay with the
//!   dispatcher, which they wake under load thousands of times a second), at most every 300 ms.
//! - `/live/runs/{id}?after=SEQ`: a run's new log lines (ANSI rendered), read by the same
//!   follower as `GET /api/v1/jobs/{id}/logs/stream`, and its summary when it changes.
//!
//! Both count against the token's live stream limit (`BATON_STREAMS_PER_TOKEN`), end when the
//! replica stops or the session ends, and send keep-alive comments so a closed tab is noticed.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::render::{DashError, fragment};
use super::run::{line_view, summary};
use super::runs::{fragments, live_parts};
use super::session::Session;
use crate::AppState;
use crate::error::ApiError;
use crate::http::extract::{parse_param, seq_cursor};
use crate::http::jobs::ListJobsQuery;
use crate::http::stream::{Item, follow};
use crate::http::stream_slots::StreamSlot;
use crate::model::Role;
use crate::storage::queue;

const LOOK: Duration = Duration::from_secs(1);
const MIN_GAP: Duration = Duration::from_millis(300);

fn slot(state: &AppState, session: &Session) -> Result<StreamSlot, DashError> {
    state
        .streams
        .acquire(session.caller.token_id)
        .ok_or_else(|| {
            ApiError::TooManyStreams(format!(
                "the token {:?} holds {} live streams already (BATON_STREAMS_PER_TOKEN); close a tab",
                session.caller.name,
                state.streams.limit()
            ))
            .into()
        })
}

fn sse(rx: mpsc::Receiver<Event>, state: &AppState) -> Response {
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::new().interval(state.config.stream_ping_interval))
        .into_response()
}

/// Waits for a notification, the periodic look, the end of the client or the replica.
/// Returns false when the stream should end.
async fn wait(
    state: &AppState,
    signals: &mut broadcast::Receiver<crate::notify::LogSignal>,
    tx: &mpsc::Sender<Event>,
) -> bool {
    tokio::select! {
        _ = state.stop.cancelled() => false,
        _ = tx.closed() => false,
        _ = tokio::time::sleep(LOOK) => true,
        signal = signals.recv() => !matches!(signal, Err(broadcast::error::RecvError::Closed)),
    }
}

pub async fn runs(
    State(state): State<AppState>,
    session: Session,
    query: Result<Query<ListJobsQuery>, QueryRejection>,
) -> Result<Response, DashError> {
    session.caller.require(Role::Viewer)?;
    let Query(mut q) = query.map_err(crate::http::jobs::query_error)?;
    q.cursor = None;
    q.filter(50)?;
    let slot = slot(&state, &session)?;
    let (tx, rx) = mpsc::channel(4);
    let mut signals = state.hub.subscribe();
    let task_state = state.clone();
    tokio::spawn(async move {
        let state = task_state;
        let _slot = slot;
        let mut last = String::new();
        loop {
            if !session.still_valid(&state).await {
                let _ = tx
                    .send(Event::default().event("signed_out").data("{}"))
                    .await;
                return;
            }
            let parts = match live_parts(&state, &q).await.and_then(|p| fragments(&p)) {
                Ok(parts) => parts.to_string(),
                Err(e) => {
                    tracing::warn!(error = ?e, "live runs stopped");
                    return;
                }
            };
            if parts != last {
                if tx
                    .send(Event::default().event("runs").data(&parts))
                    .await
                    .is_err()
                {
                    return;
                }
                last = parts;
            }
            if !wait(&state, &mut signals, &tx).await {
                return;
            }
            // Coalesce a burst of notifications into one refresh.
            tokio::time::sleep(MIN_GAP).await;
            while signals.try_recv().is_ok() {}
        }
    });
    Ok(sse(rx, &state))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunQuery {
    after: Option<String>,
}

pub async fn run(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<RunQuery>, QueryRejection>,
) -> Result<Response, DashError> {
    session.caller.require(Role::Viewer)?;
    let id = super::run::id_of(&id)?;
    let Query(q) = query.map_err(crate::http::jobs::query_error)?;
    // EventSource reconnects with Last-Event-ID (the last line's seq): it wins over `after`.
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let after = match parse_param::<i64>("Last-Event-ID", last_event_id)? {
        Some(a) => a,
        None => parse_param::<i64>("after", q.after.as_deref())?.unwrap_or(0),
    };
    let after = seq_cursor("after", after)?;
    let first = queue::get_job(&state.pool, id).await?;
    let slot = slot(&state, &session)?;
    let mut items = follow(state.clone(), id, after, slot);
    let (tx, rx) = mpsc::channel(64);
    let task_state = state.clone();
    tokio::spawn(async move {
        let state = task_state;
        let mut last_summary = summary_html(&state, &first).await.unwrap_or_default();
        let mut look = tokio::time::interval(LOOK);
        loop {
            tokio::select! {
                item = items.recv() => match item {
                    Some(Item::Line(line)) => {
                        let event = Event::default()
                            .event("line")
                            .id(line.seq.to_string())
                            .data(line_view(&line).to_string());
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                    Some(Item::Finished(job)) => {
                        let html = summary_html(&state, &job).await.unwrap_or_default();
                        let _ = tx.send(Event::default().event("summary").data(json!({"html": html}).to_string())).await;
                        let _ = tx.send(Event::default().event("done").data(json!({"status": job.status}).to_string())).await;
                        return;
                    }
                    Some(Item::Idle { after }) => {
                        let _ = tx.send(Event::default().event("idle").data(json!({"after": after}).to_string())).await;
                        return;
                    }
                    None => return,
                },
                _ = look.tick() => {
                    if !session.still_valid(&state).await {
                        let _ = tx.send(Event::default().event("signed_out").data("{}")).await;
                        return;
                    }
                    let Ok(job) = queue::get_job(&state.pool, id).await else { return };
                    let html = summary_html(&state, &job).await.unwrap_or_default();
                    if html != last_summary {
                        let event = Event::default().event("summary").data(json!({"html": html}).to_string());
                        if tx.send(event).await.is_err() {
                            return;
                        }
                        last_summary = html;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    Ok(sse(rx, &state))
}

async fn summary_html(state: &AppState, job: &crate::model::Job) -> Result<String, DashError> {
    fragment("run_summary.html", &summary(state, job).await?)
}
