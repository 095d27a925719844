//! `GET /api/v1/jobs/{id}/logs/stream`: a job's output live, as Server-Sent Events or (with an
//! `Upgrade: websocket` request) as WebSocket text messages. History first, then live lines as
//! they are stored, then the job's final status, then the stream ends.
//!
//! Readers are woken by the replica's log notifications (a pointer `job:seq`, sent by whichever
//! replica stored the lines), so a client on any replica sees the live tail; a slow timer only
//! covers notifications missed while the listener reconnected.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;
use uuid::Uuid;

use super::extract::{parse_param, parse_uuid};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::model::{FieldError, Job, LogLine, Role};
use crate::storage::{logs, queue};

/// How often a reader re-checks without a notification.
const FALLBACK_CHECK: Duration = Duration::from_secs(5);
const PAGE: usize = 2000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Start after this sequence number (default 0; SSE clients may send `Last-Event-ID`).
    after: Option<String>,
}

/// What a follower yields.
#[derive(Debug)]
enum Item {
    Line(LogLine),
    Finished(Box<Job>),
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}/logs/stream", tag = "jobs", params(("id" = Uuid, Path), StreamQuery),
    responses((status = 200, content_type = "text/event-stream",
               description = "events `line` (a LogLine, id = seq) then one `status` (the Job); WebSocket: JSON messages {type: line|status}"),
              (status = 404, body = ErrorBody)))]
pub async fn stream_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let id = parse_uuid("id", &id)?;
    let Query(q) = query.map_err(super::jobs::query_error)?;
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let after = match parse_param::<i64>("after", q.after.as_deref())? {
        Some(a) => a,
        None => parse_param::<i64>("Last-Event-ID", last_event_id)?.unwrap_or(0),
    };
    if after < 0 {
        return Err(FieldError::new("after", "must not be negative").into());
    }
    // 404 before upgrading or starting a stream.
    queue::job_status(&state.pool, id).await?;
    let items = follow(state, id, after);
    Ok(match ws.ok() {
        Some(upgrade) => upgrade
            .on_upgrade(move |socket| websocket(socket, items))
            .into_response(),
        None => {
            let events =
                ReceiverStream::new(items).map(|item| Ok::<_, Infallible>(sse_event(item)));
            Sse::new(events)
                .keep_alive(KeepAlive::default())
                .into_response()
        }
    })
}

fn sse_event(item: Item) -> Event {
    match item {
        Item::Line(line) => Event::default()
            .event("line")
            .id(line.seq.to_string())
            .data(serde_json::to_string(&line).unwrap_or_default()),
        Item::Finished(job) => Event::default()
            .event("status")
            .data(serde_json::to_string(&job).unwrap_or_default()),
    }
}

async fn websocket(mut socket: WebSocket, items: mpsc::Receiver<Item>) {
    let mut items = ReceiverStream::new(items);
    while let Some(item) = items.next().await {
        let msg = match item {
            Item::Line(line) => {
                json!({"type": "line", "seq": line.seq, "stream": line.stream, "text": line.text, "ts": line.ts})
            }
            Item::Finished(job) => json!({"type": "status", "job": job}),
        };
        if socket
            .send(Message::Text(msg.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// Reads a job's lines after `after` and keeps reading as new ones are stored, until the job
/// finished and every line was sent. Ends early when the receiver is dropped.
fn follow(state: AppState, job_id: Uuid, mut after: i64) -> mpsc::Receiver<Item> {
    let (tx, rx) = mpsc::channel(256);
    // Subscribe before the first read so nothing stored in between is missed.
    let mut signals = state.hub.subscribe();
    tokio::spawn(async move {
        loop {
            // Status first: if it is terminal, every line was stored before it was set.
            let status = match queue::job_status(&state.pool, job_id).await {
                Ok(s) => s,
                Err(e) => {
                    return tracing::warn!(error = %e, job.id = %job_id, "live log reader stopped");
                }
            };
            loop {
                let lines = match logs::lines_after(&state.pool, job_id, after, PAGE).await {
                    Ok(lines) => lines,
                    Err(e) => {
                        return tracing::warn!(error = %e, job.id = %job_id, "live log reader stopped");
                    }
                };
                let full = lines.len() == PAGE;
                for line in lines {
                    after = line.seq;
                    if tx.send(Item::Line(line)).await.is_err() {
                        return;
                    }
                }
                if !full {
                    break;
                }
            }
            if status.is_terminal() {
                if let Ok(job) = queue::get_job(&state.pool, job_id).await {
                    let _ = tx.send(Item::Finished(Box::new(job))).await;
                }
                return;
            }
            if !wait_for_change(&mut signals, job_id, after, &state, &tx).await {
                return;
            }
        }
    });
    rx
}

/// Waits until this job may have new lines or a new status; false when the reader should end.
async fn wait_for_change(
    signals: &mut broadcast::Receiver<crate::notify::LogSignal>,
    job_id: Uuid,
    after: i64,
    state: &AppState,
    tx: &mpsc::Sender<Item>,
) -> bool {
    use crate::notify::LogSignal;
    let deadline = tokio::time::sleep(FALLBACK_CHECK);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = state.stop.cancelled() => return false,
            _ = tx.closed() => return false,
            _ = &mut deadline => return true,
            signal = signals.recv() => match signal {
                Ok(LogSignal::Lines { job_id: j, seq }) if j == job_id && seq <= after => continue,
                Ok(s) if s.concerns(job_id) => return true,
                Ok(_) => continue,
                // Missed some: re-read to be safe.
                Err(broadcast::error::RecvError::Lagged(_)) => return true,
                Err(broadcast::error::RecvError::Closed) => return false,
            },
        }
    }
}
