//! `GET /api/v1/jobs/{id}/logs/stream`: a job's output live, as Server-Sent Events or (with an
//! `Upgrade: websocket` request) as WebSocket text messages. History first, then live lines as
//! they are stored, then the job's final status, then the stream ends.
//!
//! Readers are woken by the replica's log notifications (a pointer `job:seq`, sent by whichever
//! replica stored the lines), so a client on any replica sees the live tail; a slow timer (5 s,
//! backing off to 60 s while nothing changes) only covers notifications missed while the
//! listener reconnected.
//!
//! Streams are bounded: a token holds at most `BATON_STREAMS_PER_TOKEN` at once (429 past
//! it); a stream with nothing new for `BATON_STREAM_IDLE_SECONDS` ends with an `idle` event
//! (the client reconnects with its last sequence number), so a follower of a job due in a year
//! does not poll for a year; a WebSocket is read while it is written (a close is noticed at
//! once) and pinged every `BATON_STREAM_PING_SECONDS` (a client silent for two intervals, or
//! one that stops reading, is dropped); an SSE stream sends a keep-alive comment as often, so
//! a client gone away is found by the failed write.

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
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;
use uuid::Uuid;

use super::extract::{parse_param, parse_uuid, seq_cursor};
use super::stream_slots::StreamSlot;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::model::{Job, JobStatus, LogLine, Role};
use crate::storage::{logs, queue};

/// How often a reader re-checks without a notification at first, and at most.
const FALLBACK_CHECK: Duration = Duration::from_secs(5);
const FALLBACK_CHECK_MAX: Duration = Duration::from_secs(60);
const PAGE: usize = 2000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Start after this sequence number (default 0; SSE clients may send `Last-Event-ID`).
    after: Option<String>,
}

/// What a follower yields.
#[derive(Debug)]
pub(crate) enum Item {
    Line(LogLine),
    Finished(Box<Job>),
    /// Nothing new for the idle limit: the stream ends; `after` is where to resume.
    Idle {
        after: i64,
    },
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}/logs/stream", tag = "jobs", params(("id" = Uuid, Path), StreamQuery),
    responses((status = 200, content_type = "text/event-stream",
               description = "events `line` (a LogLine, id = seq) then one `status` (the Job), or `idle` ({after}: nothing new for BATON_STREAM_IDLE_SECONDS; reconnect with `after`); WebSocket: JSON messages {type: line|status|idle}"),
              (status = 404, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "the token holds BATON_STREAMS_PER_TOKEN streams already")))]
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
        Some(a) => seq_cursor("after", a)?,
        None => seq_cursor(
            "Last-Event-ID",
            parse_param::<i64>("Last-Event-ID", last_event_id)?.unwrap_or(0),
        )?,
    };
    // 404 before upgrading or starting a stream.
    queue::job_status(&state.pool, id).await?;
    let slot = state.streams.acquire(caller.token_id).ok_or_else(|| {
        ApiError::TooManyStreams(format!(
            "the token {:?} holds {} live log streams already (BATON_STREAMS_PER_TOKEN); close one first",
            caller.name,
            state.streams.limit()
        ))
    })?;
    let ping = state.config.stream_ping_interval;
    let items = follow(state, id, after, slot);
    Ok(match ws.ok() {
        Some(upgrade) => upgrade
            .on_upgrade(move |socket| websocket(socket, items, ping))
            .into_response(),
        None => {
            let events =
                ReceiverStream::new(items).map(|item| Ok::<_, Infallible>(sse_event(item)));
            // The keep-alive comment also finds a client gone away (its write fails).
            Sse::new(events)
                .keep_alive(KeepAlive::new().interval(ping))
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
        Item::Idle { after } => Event::default()
            .event("idle")
            .data(json!({"after": after}).to_string()),
    }
}

fn ws_message(item: Item) -> Message {
    let msg = match item {
        Item::Line(line) => {
            json!({"type": "line", "seq": line.seq, "stream": line.stream, "text": line.text, "ts": line.ts})
        }
        Item::Finished(job) => json!({"type": "status", "job": job}),
        Item::Idle { after } => json!({"type": "idle", "after": after}),
    };
    Message::Text(msg.to_string().into())
}

/// Writes the follower's items to the socket while reading it: a close (or a dead connection)
/// ends the stream at once, not at the next line. Pings every `ping`; a client that answers
/// nothing for two intervals, or stops reading so a write stalls that long, is dropped.
async fn websocket(mut socket: WebSocket, items: mpsc::Receiver<Item>, ping: Duration) {
    let mut items = ReceiverStream::new(items);
    let mut ticker = tokio::time::interval_at(Instant::now() + ping, ping);
    let mut last_heard = Instant::now();
    let patience = ping * 2;
    loop {
        tokio::select! {
            item = items.next() => {
                let Some(item) = item else { break };
                match tokio::time::timeout(patience, socket.send(ws_message(item))).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
            incoming = socket.recv() => match incoming {
                // Any frame (a pong, text) shows the client is there.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            _ = ticker.tick() => {
                if last_heard.elapsed() > patience {
                    tracing::debug!("live log client stopped answering pings; dropped");
                    return;
                }
                match tokio::time::timeout(patience, socket.send(Message::Ping(Default::default()))).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
        }
    }
    let _ = tokio::time::timeout(patience, socket.send(Message::Close(None))).await;
}

/// Reads a job's lines after `after` and keeps reading as new ones are stored, until the job
/// finished and every line was sent, nothing happened for the idle limit, or the receiver is
/// dropped. Holds the stream's slot until it ends.
pub(crate) fn follow(
    state: AppState,
    job_id: Uuid,
    mut after: i64,
    slot: StreamSlot,
) -> mpsc::Receiver<Item> {
    let (tx, rx) = mpsc::channel(256);
    // Subscribe before the first read so nothing stored in between is missed.
    let mut signals = state.hub.subscribe();
    let idle_limit = state.config.stream_idle_timeout;
    tokio::spawn(async move {
        let _slot = slot;
        let mut last_status: Option<JobStatus> = None;
        let mut last_activity = Instant::now();
        let mut fallback = FALLBACK_CHECK;
        loop {
            // Status first: if it is terminal, every line was stored before it was set.
            let status = match queue::job_status(&state.pool, job_id).await {
                Ok(s) => s,
                Err(e) => {
                    return tracing::warn!(error = %e, job.id = %job_id, "live log reader stopped");
                }
            };
            let mut changed = last_status != Some(status);
            last_status = Some(status);
            loop {
                let lines = match logs::lines_after(&state.pool, job_id, after, PAGE).await {
                    Ok(lines) => lines,
                    Err(e) => {
                        return tracing::warn!(error = %e, job.id = %job_id, "live log reader stopped");
                    }
                };
                let full = lines.len() == PAGE;
                changed |= !lines.is_empty();
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
            if changed {
                last_activity = Instant::now();
                fallback = FALLBACK_CHECK;
            } else {
                fallback = (fallback * 2).min(FALLBACK_CHECK_MAX);
            }
            let idle_deadline = last_activity + idle_limit;
            match wait_for_change(
                &mut signals,
                job_id,
                after,
                &state,
                &tx,
                fallback,
                idle_deadline,
            )
            .await
            {
                Wake::Check => {}
                Wake::Idle => {
                    let _ = tx.send(Item::Idle { after }).await;
                    return;
                }
                Wake::End => return,
            }
        }
    });
    rx
}

/// Why a follower woke up.
enum Wake {
    /// The job may have new lines or a new status.
    Check,
    /// Nothing happened before the idle deadline.
    Idle,
    /// The client left or the replica stops.
    End,
}

/// Waits until this job may have new lines or a new status, the fallback timer fires, or the
/// idle deadline passes.
async fn wait_for_change(
    signals: &mut broadcast::Receiver<crate::notify::LogSignal>,
    job_id: Uuid,
    after: i64,
    state: &AppState,
    tx: &mpsc::Sender<Item>,
    fallback: Duration,
    idle_deadline: Instant,
) -> Wake {
    use crate::notify::LogSignal;
    let check = tokio::time::sleep_until(idle_deadline.min(Instant::now() + fallback));
    tokio::pin!(check);
    loop {
        tokio::select! {
            _ = state.stop.cancelled() => return Wake::End,
            _ = tx.closed() => return Wake::End,
            _ = &mut check => {
                return if Instant::now() >= idle_deadline { Wake::Idle } else { Wake::Check };
            }
            signal = signals.recv() => match signal {
                Ok(LogSignal::Lines { job_id: j, seq }) if j == job_id && seq <= after => continue,
                Ok(s) if s.concerns(job_id) => return Wake::Check,
                Ok(_) => continue,
                // Missed some: re-read to be safe.
                Err(broadcast::error::RecvError::Lagged(_)) => return Wake::Check,
                Err(broadcast::error::RecvError::Closed) => return Wake::End,
            },
        }
    }
}
