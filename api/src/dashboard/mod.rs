//! The web dashboard, served by `baton-api` at `/` (the REST API stays under `/api/v1`):
//! server-rendered HTML (minijinja templates embedded in the binary, one per page) with a
//! small hand-written script for the live parts (Server-Sent Events). Every page reads
//! without JavaScript.
//!
//! The dashboard is another client of the same rules: a browser session (see [`session`])
//! stands for an API token and yields the REST API's [`Caller`](crate::auth::Caller); pages
//! read through the REST handlers or the storage functions behind them after the same
//! `Caller::require` checks, and every form calls the REST handler of the operation, so roles,
//! validation (the field is named), auditing and transactions are the API's own. Forms carry a
//! CSRF token and session cookies are `SameSite=Strict`.
//!
//! Modules: [`session`] (sign-in, CSRF), [`ansi`] (log lines to HTML), [`graph`] (SVG graphs
//! of nodes and edges), [`render`] (templates, errors, headers) and one module per page.

pub mod ansi;
mod dead;
mod events;
mod forms;
pub mod graph;
mod live;
mod render;
mod run;
mod runs;
mod schedules;
pub mod session;
mod settings;
mod workers;
mod workflows;

use axum::Router;
use axum::routing::{get, post};

use crate::AppState;

/// The dashboard's routes (merged into the api's router at `/`).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(runs::page))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/runs/{id}", get(run::page_view))
        .route("/runs/{id}/cancel", post(run::cancel))
        .route("/runs/{id}/rerun", post(run::rerun))
        .route("/live/runs", get(live::runs))
        .route("/live/runs/{id}", get(live::run))
        .route("/events", get(events::list).post(events::create))
        .route("/events/new", get(events::new_form))
        .route(
            "/events/{id}",
            get(events::page_handler).post(events::update),
        )
        .route("/events/{id}/edit", get(events::edit_form))
        .route("/events/{id}/run", post(events::run))
        .route("/events/{id}/actions", post(events::add_action))
        .route(
            "/events/{id}/actions/{action_id}/delete",
            post(events::delete_action),
        )
        .route("/schedules", get(schedules::page_view))
        .route("/workers", get(workers::page_view))
        .route("/workflows", get(workflows::list_view))
        .route("/workflow-runs/{id}", get(workflows::run_view))
        .route("/dead", get(dead::page_view))
        .route("/dead/rerun", post(dead::rerun))
        .route("/variables", get(settings::variables))
        .route("/servers", get(settings::servers))
        .route("/assets/app.css", get(render::css))
        .route("/assets/app.js", get(render::js))
        .layer(axum::middleware::from_fn(render::security_headers))
}
