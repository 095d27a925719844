//! Schedules: every schedule with its fire times over the next 24 hours on a timeline, the
//! paused ones, and the slots of the last 24 hours that did not run (skipped while paused,
//! missed while no replica ran, or passed over by `missed: none|last`).

use std::collections::HashSet;

use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};

use super::render::{DashError, show};
use super::session::Session;
use crate::AppState;
use crate::model::Role;
use crate::schedule::ScheduleSpec;
use crate::storage::{events, queue, schedules};

/// Fire times drawn per schedule and window at most (an every-second schedule is a band).
const MAX_MARKS: usize = 288;

pub async fn page_view(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, DashError> {
    session.caller.require(Role::Viewer)?;
    let now = Utc::now();
    let window = Duration::hours(24);
    let rows = schedules::list_schedules(&state.pool, None, None, None, 500).await?;
    let names: std::collections::HashMap<_, _> = events::list_events(&state.pool, None, 1000)
        .await?
        .into_iter()
        .map(|e| (e.id, e.spec.name))
        .collect();
    let mut items = Vec::new();
    for row in rows {
        let spec = row.fields();
        let compiled = ScheduleSpec::compile(&spec, row.id, row.anchor_at).ok();
        let pos = |t: DateTime<Utc>, from: DateTime<Utc>| {
            ((t - from).num_seconds() as f64 / window.num_seconds() as f64 * 100.0)
                .clamp(0.0, 100.0)
        };
        let mut upcoming: Vec<Value> = Vec::new();
        let mut missed: Vec<Value> = Vec::new();
        if let Some(c) = &compiled {
            if !row.paused {
                let start = row.next_fire_at.map(|t| t - Duration::milliseconds(1));
                if let Some(start) = start {
                    for t in c.upcoming(start, MAX_MARKS) {
                        if t > now + window {
                            break;
                        }
                        upcoming.push(json!({"at": t.to_rfc3339(), "left": format!("{:.2}", pos(t.max(now), now))}));
                    }
                }
            }
            // Past slots without a run (the jobs table has one per fired slot).
            let from = (now - window).max(row.created_at);
            let fired: HashSet<DateTime<Utc>> = queue::list_jobs(
                &state.pool,
                &queue::JobFilter {
                    schedule_id: Some(row.id),
                    limit: 500,
                    ..Default::default()
                },
            )
            .await?
            .into_iter()
            .filter_map(|j| j.scheduled_for)
            .collect();
            for t in c.upcoming(from, MAX_MARKS) {
                if t >= now || row.next_fire_at.is_some_and(|n| t >= n) {
                    break;
                }
                if !fired.contains(&t) {
                    missed.push(json!({"at": t.to_rfc3339(), "left": format!("{:.2}", pos(t, now - window))}));
                }
            }
        }
        items.push(json!({
            "id": row.id,
            "event_id": row.event_id,
            "event_name": row.event_id.and_then(|id| names.get(&id)),
            "workflow_id": row.workflow_id,
            "what": spec.cron.clone().map(|c| format!("cron {c}")).or(spec.interval_seconds.map(|s| format!("every {s}s"))),
            "timezone": spec.timezone,
            "missed_policy": row.missed,
            "paused": row.paused,
            "next_fire_at": row.next_fire_at.map(|t| t.to_rfc3339()),
            "last_fired_at": row.last_fired_at.map(|t| t.to_rfc3339()),
            "upcoming": upcoming,
            "upcoming_more": upcoming.len() >= MAX_MARKS,
            "missed": missed,
        }));
    }
    let hours: Vec<Value> = (0..=24)
        .step_by(3)
        .map(|h| json!({"label": (now + Duration::hours(h)).format("%H:%M").to_string(), "left": h as f64 / 24.0 * 100.0}))
        .collect();
    show(
        "schedules.html",
        &session,
        "schedules",
        "Schedules",
        json!({"schedules": items, "hours": hours, "now": now.to_rfc3339()}),
    )
}
