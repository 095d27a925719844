//! Events: the list, the create/edit form, an event's page (run now with a JSON input, its
//! actions, its schedules with their next fire times, its history). Every change goes through
//! the REST handler of the operation, with the form turned into the JSON body the API takes
//! (so a bad field is named exactly as the API names it).

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::{Map, Value, json};

use super::forms::Form;
use super::render::{DashError, show};
use super::runs::{RunView, worker_names};
use super::session::Session;
use crate::AppState;
use crate::http::extract::{JsonBody, parse_json};
use crate::http::{actions, events, jobs, schedules};
use crate::model::action::{Channel, Trigger};
use crate::model::event::{ConcurrencyStrategy, RetryOn};
use crate::model::{Event, Executor, FieldError, Role, Runtime};
use crate::storage::servers;

pub async fn list(
    State(state): State<AppState>,
    session: Session,
    query: Result<Query<events::ListEventsQuery>, QueryRejection>,
) -> Result<Response, DashError> {
    let Query(q) = query.map_err(crate::http::jobs::query_error)?;
    let cursor = q.cursor.clone();
    let axum::Json(found) = events::list_events(
        State(state),
        session.caller.clone(),
        Ok(Query(events::ListEventsQuery {
            limit: Some("100".into()),
            cursor,
        })),
    )
    .await?;
    show(
        "events.html",
        &session,
        "events",
        "Events",
        json!({"events": found.items, "next_href": found.next_cursor.map(|c| format!("/events?cursor={}", super::render::urlencode(&c)))}),
    )
}

/// The choices of the form's selects.
async fn choices(state: &AppState) -> Result<Value, DashError> {
    let servers = servers::list_servers(&state.pool).await?;
    Ok(json!({
        "runtimes": Runtime::ALL.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "executors": Executor::ALL.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "retry_ons": RetryOn::ALL.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "strategies": ConcurrencyStrategy::ALL.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "servers": servers.iter().map(|s| json!({"id": s.id, "name": s.name})).collect::<Vec<_>>(),
    }))
}

/// The form's values for an existing event.
fn values_of(event: &Event) -> Value {
    let s = &event.spec;
    let lines = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let limits = s.limits.unwrap_or_default();
    json!({
        "name": s.name, "description": s.description, "runtime": s.runtime.as_str(),
        "content": s.content, "command": s.command.as_ref().map(|c| c.join("\n")),
        "request": s.request.as_ref().map(|r| serde_json::to_string_pretty(r).unwrap_or_default()),
        "executor": serde_json::to_value(s.executor).unwrap_or_default(),
        "server_id": s.server_id, "image": s.image, "env": lines(&s.env), "labels": lines(&s.labels),
        "timeout_seconds": s.timeout_seconds, "max_attempts": s.max_attempts,
        "retry_backoff_seconds": s.retry_backoff_seconds, "retry_backoff_max_seconds": s.retry_backoff_max_seconds,
        "retry_on": s.retry_on.as_str(), "network": s.network, "priority": s.priority,
        "memory_mib": limits.memory_mib, "cpus": limits.cpus, "pids": limits.pids,
        "concurrency_max": s.concurrency.as_ref().map(|c| c.max),
        "concurrency_key": s.concurrency.as_ref().and_then(|c| c.key.clone()),
        "concurrency_strategy": s.concurrency.as_ref().map(|c| c.strategy.as_str()),
        "stuck_after_seconds": s.stuck_after_seconds,
        "startup_window_seconds": s.startup_window_seconds,
    })
}

/// The form's values as it was sent (to show it again with an error).
fn values_from(form: &Form) -> Value {
    let mut map = Map::new();
    for key in [
        "name",
        "description",
        "runtime",
        "content",
        "command",
        "request",
        "executor",
        "server_id",
        "image",
        "env",
        "labels",
        "timeout_seconds",
        "max_attempts",
        "retry_backoff_seconds",
        "retry_backoff_max_seconds",
        "retry_on",
        "priority",
        "memory_mib",
        "cpus",
        "pids",
        "concurrency_max",
        "concurrency_key",
        "concurrency_strategy",
        "stuck_after_seconds",
        "startup_window_seconds",
    ] {
        map.insert(key.into(), json!(form.get(key)));
    }
    map.insert("network".into(), json!(form.get("network") == Some("on")));
    Value::Object(map)
}

/// `K=V` lines as a map, naming `field` on a line without `=`.
fn pairs(field: &str, text: Option<&str>) -> Result<BTreeMap<String, String>, FieldError> {
    let mut map = BTreeMap::new();
    for (i, line) in text.unwrap_or_default().lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| FieldError::new(field, format!("line {}: expected KEY=VALUE", i + 1)))?;
        map.insert(k.trim().to_owned(), v.to_owned());
    }
    Ok(map)
}

fn number(form: &Form, field: &str) -> Result<Option<Value>, FieldError> {
    match form.text(field) {
        None => Ok(None),
        Some(t) => t
            .parse::<i64>()
            .map(|n| Some(json!(n)))
            .or_else(|_| t.parse::<f64>().map(|n| Some(json!(n))))
            .map_err(|_| FieldError::new(field, format!("{t:?} is not a number"))),
    }
}

/// The form as the JSON of `POST /api/v1/events`; with `patch`, cleared optional fields are
/// `null` (a merge patch removes them).
fn event_json(form: &Form, patch: bool) -> Result<Value, FieldError> {
    let mut body = Map::new();
    let mut optional = |key: &str, value: Option<Value>| match value {
        Some(v) => {
            body.insert(key.into(), v);
        }
        None if patch => {
            body.insert(key.into(), Value::Null);
        }
        None => {}
    };
    let runtime = form.text("runtime").unwrap_or("bash");
    optional(
        "content",
        form.get("content")
            .filter(|c| !c.trim().is_empty())
            .map(|c| json!(c.replace("\r\n", "\n"))),
    );
    let command: Vec<String> = form
        .get("command")
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    optional("command", (!command.is_empty()).then(|| json!(command)));
    let request = match form.text("request") {
        Some(text) => Some(
            serde_json::from_str::<Value>(text)
                .map_err(|e| FieldError::new("request", format!("not JSON: {e}")))?,
        ),
        None => None,
    };
    optional("request", request);
    optional("executor", form.text("executor").map(|e| json!(e)));
    optional("server_id", form.text("server_id").map(|e| json!(e)));
    optional("image", form.text("image").map(|e| json!(e)));
    let mut limits = Map::new();
    for key in ["memory_mib", "cpus", "pids"] {
        if let Some(v) = number(form, key)? {
            limits.insert(key.into(), v);
        }
    }
    optional(
        "limits",
        (!limits.is_empty()).then_some(Value::Object(limits)),
    );
    optional("stuck_after_seconds", number(form, "stuck_after_seconds")?);
    // A run policy needs its `max`; a key or strategy without one is named as the error.
    let concurrency = match number(form, "concurrency_max")? {
        Some(max) => {
            let mut c = Map::new();
            c.insert("max".into(), max);
            if let Some(key) = form.text("concurrency_key") {
                c.insert("key".into(), json!(key));
            }
            if let Some(strategy) = form.text("concurrency_strategy") {
                c.insert("strategy".into(), json!(strategy));
            }
            Some(Value::Object(c))
        }
        None if form.text("concurrency_key").is_some() => {
            return Err(FieldError::new(
                "concurrency.max",
                "a concurrency key needs a maximum",
            ));
        }
        None => None,
    };
    optional("concurrency", concurrency);
    body.insert(
        "name".into(),
        json!(form.get("name").unwrap_or_default().trim()),
    );
    body.insert(
        "description".into(),
        json!(form.get("description").unwrap_or_default()),
    );
    body.insert("runtime".into(), json!(runtime));
    body.insert("env".into(), json!(pairs("env", form.get("env"))?));
    body.insert("labels".into(), json!(pairs("labels", form.get("labels"))?));
    body.insert("network".into(), json!(form.get("network") == Some("on")));
    if let Some(r) = form.text("retry_on") {
        body.insert("retry_on".into(), json!(r));
    }
    for key in [
        "timeout_seconds",
        "max_attempts",
        "retry_backoff_seconds",
        "retry_backoff_max_seconds",
        "priority",
        "startup_window_seconds",
    ] {
        if let Some(v) = number(form, key)? {
            body.insert(key.into(), v);
        }
    }
    Ok(Value::Object(body))
}

async fn form_page(
    state: &AppState,
    session: &Session,
    event: Option<&Event>,
    values: Value,
    error: Option<String>,
    status: StatusCode,
) -> Result<Response, DashError> {
    let title = match event {
        Some(e) => format!("Edit {}", e.spec.name),
        None => "New event".into(),
    };
    let mut response = show(
        "event_form.html",
        session,
        "events",
        &title,
        json!({"event": event, "v": values, "error": error, "choices": choices(state).await?}),
    )?;
    *response.status_mut() = status;
    Ok(response)
}

pub async fn new_form(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, DashError> {
    session.caller.require(Role::Admin)?;
    let defaults = json!({"runtime": "bash", "executor": "", "timeout_seconds": 3600, "max_attempts": 1, "priority": 0});
    form_page(&state, &session, None, defaults, None, StatusCode::OK).await
}

pub async fn edit_form(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Response, DashError> {
    session.caller.require(Role::Admin)?;
    let axum::Json(event) =
        events::get_event(State(state.clone()), session.caller.clone(), Path(id)).await?;
    form_page(
        &state,
        &session,
        Some(&event),
        values_of(&event),
        None,
        StatusCode::OK,
    )
    .await
}

/// A refused form is shown again with the API's message (naming the field); other errors
/// are error pages.
async fn refused(
    state: &AppState,
    session: &Session,
    event: Option<&Event>,
    form: &Form,
    err: crate::error::ApiError,
) -> Result<Response, DashError> {
    let (status, _, _) = err.parts();
    if status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::CONFLICT {
        form_page(
            state,
            session,
            event,
            values_from(form),
            Some(err.to_string()),
            status,
        )
        .await
    } else {
        Err(err.into())
    }
}

/// `POST /events`: create.
pub async fn create(
    State(state): State<AppState>,
    session: Session,
    form: Form,
) -> Result<Response, DashError> {
    session.check_csrf(&form)?;
    session.caller.require(Role::Admin)?;
    let result = async {
        let body = event_json(&form, false)?;
        let spec = parse_json(body.to_string().as_bytes())?;
        events::create_event(State(state.clone()), session.caller.clone(), JsonBody(spec)).await
    }
    .await;
    match result {
        Ok((_, axum::Json(event))) => {
            Ok(Redirect::to(&format!("/events/{}", event.id)).into_response())
        }
        Err(e) => refused(&state, &session, None, &form, e).await,
    }
}

/// `POST /events/{id}`: save an edit (a merge patch of the form's fields).
pub async fn update(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, DashError> {
    session.check_csrf(&form)?;
    let axum::Json(current) = events::get_event(
        State(state.clone()),
        session.caller.clone(),
        Path(id.clone()),
    )
    .await?;
    let result = async {
        let body = event_json(&form, true)?;
        let patch = parse_json(body.to_string().as_bytes())?;
        events::patch_event(
            State(state.clone()),
            session.caller.clone(),
            Path(id.clone()),
            JsonBody(patch),
        )
        .await
    }
    .await;
    match result {
        Ok(axum::Json(event)) => Ok(Redirect::to(&format!("/events/{}", event.id)).into_response()),
        Err(e) => refused(&state, &session, Some(&current), &form, e).await,
    }
}

/// `GET /events/{id}`: the event, run now, actions, schedules, history.
pub async fn page_view(
    state: AppState,
    session: Session,
    id: String,
    run_error: Option<String>,
    input: Option<String>,
) -> Result<Response, DashError> {
    let axum::Json(event) = events::get_event(
        State(state.clone()),
        session.caller.clone(),
        Path(id.clone()),
    )
    .await?;
    let axum::Json(actions) = actions::list_actions(
        State(state.clone()),
        session.caller.clone(),
        Path(id.clone()),
    )
    .await?;
    let axum::Json(scheds) = schedules::list_schedules(
        State(state.clone()),
        session.caller.clone(),
        Ok(Query(schedules::ListSchedulesQuery {
            event_id: Some(id.clone()),
            workflow_id: None,
            limit: Some("100".into()),
            cursor: None,
        })),
    )
    .await?;
    let axum::Json(history) = jobs::list_jobs(
        State(state.clone()),
        session.caller.clone(),
        Ok(Query(jobs::ListJobsQuery {
            event_id: Some(id.clone()),
            limit: Some("20".into()),
            ..Default::default()
        })),
    )
    .await?;
    let names = worker_names(&state).await?;
    let all = crate::storage::events::list_events(&state.pool, None, 500).await?;
    let ctx = json!({
        "event": event,
        "spec_json": serde_json::to_string_pretty(&event.spec).unwrap_or_default(),
        "actions": actions,
        "schedules": scheds.items,
        "history": history.items.iter().map(|j| RunView::new(j, &names)).collect::<Vec<_>>(),
        "run_error": run_error,
        "input": input.unwrap_or_else(|| "{}".into()),
        "triggers": Trigger::ALL.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        "channels": Channel::ALL.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        "all_events": all.iter().map(|e| json!({"id": e.id, "name": e.spec.name})).collect::<Vec<_>>(),
    });
    let title = format!("Event {}", event.spec.name);
    show("event.html", &session, "events", &title, ctx)
}

pub async fn page_handler(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Response, DashError> {
    page_view(state, session, id, None, None).await
}

/// `POST /events/{id}/run`: `input` (JSON), optional `priority`.
pub async fn run(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, DashError> {
    session.check_csrf(&form)?;
    let result = async {
        let input: Value = match form.text("input") {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| FieldError::new("input", format!("not JSON: {e}")))?,
            None => json!({}),
        };
        let mut body = json!({"input": input});
        if let Some(p) = number(&form, "priority")? {
            body["priority"] = p;
        }
        let request = parse_json(body.to_string().as_bytes())?;
        events::run_event(
            State(state.clone()),
            session.caller.clone(),
            Path(id.clone()),
            axum::http::HeaderMap::new(),
            JsonBody(request),
        )
        .await
    }
    .await;
    match result {
        Ok((_, axum::Json(accepted))) => {
            Ok(Redirect::to(&format!("/runs/{}", accepted.job_id)).into_response())
        }
        Err(e) if e.parts().0 == StatusCode::UNPROCESSABLE_ENTITY => {
            let mut response = page_view(
                state,
                session,
                id,
                Some(e.to_string()),
                form.get("input").map(str::to_owned),
            )
            .await?;
            *response.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
            Ok(response)
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /events/{id}/actions`: `trigger`, `delay_seconds`, `type` (run_event: `event_id`;
/// send_message: `channel`, `target`, `template`).
pub async fn add_action(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, DashError> {
    session.check_csrf(&form)?;
    let result = async {
        let action = match form.get("type") {
            Some("send_message") => {
                let mut a = json!({"type": "send_message", "channel": form.get("channel"), "target": form.get("target").unwrap_or_default()});
                if let Some(t) = form.text("template") {
                    a["template"] = json!(t);
                }
                a
            }
            _ => json!({"type": "run_event", "event_id": form.get("event_id").unwrap_or_default()}),
        };
        let mut body = json!({"trigger": form.get("trigger").unwrap_or_default(), "action": action});
        if let Some(d) = number(&form, "delay_seconds")? {
            body["delay_seconds"] = d;
        }
        let new = parse_json(body.to_string().as_bytes())?;
        actions::create_action(State(state.clone()), session.caller.clone(), Path(id.clone()), JsonBody(new)).await
    }
    .await;
    match result {
        Ok(_) => Ok(Redirect::to(&format!("/events/{id}#actions")).into_response()),
        Err(e) => Err(e.into()),
    }
}

/// `POST /events/{id}/actions/{action_id}/delete`.
pub async fn delete_action(
    State(state): State<AppState>,
    session: Session,
    Path((id, action_id)): Path<(String, String)>,
    form: Form,
) -> Result<Response, DashError> {
    session.check_csrf(&form)?;
    actions::delete_action(
        State(state),
        session.caller.clone(),
        Path((id.clone(), action_id)),
    )
    .await?;
    Ok(Redirect::to(&format!("/events/{id}#actions")).into_response())
}
