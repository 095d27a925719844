//! The REST API (axum): routes, OpenAPI document, and the fallbacks that keep every answer
//! JSON. Handlers are thin: they authenticate, validate, call `storage`, write the audit log.

pub(crate) mod actions;
pub(crate) mod events;
pub(crate) mod extract;
mod health;
mod hooks;
pub(crate) mod jobs;
mod openapi_responses;
pub mod rate_limit;
pub(crate) mod schedules;
pub(crate) mod servers;
pub(crate) mod stream;
pub mod stream_slots;
mod tokens;
mod trace;
mod uri_guard;
pub(crate) mod variables;
mod webhooks;
pub(crate) mod workers;
pub(crate) mod workflows;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use serde_json::Value;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::storage::audit::{self, AuditEntry};

#[derive(OpenApi)]
#[openapi(
    info(title = "Baton API", description = "Queue, run and chain jobs on Baton's workers."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(crate::error::ErrorBody))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole HTTP surface. `state.pool` is the REST pool (see [`crate::server`]).
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.body_limit_bytes;
    let limiter = std::sync::Arc::new(rate_limit::RateLimiter::new(&state.config));
    let (api, spec) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(events::create_event, events::list_events))
        .routes(routes!(
            events::get_event,
            events::patch_event,
            events::delete_event
        ))
        .routes(routes!(events::run_event))
        .routes(routes!(actions::create_action, actions::list_actions))
        .routes(routes!(actions::delete_action))
        .routes(routes!(webhooks::create_webhook, webhooks::list_webhooks))
        .routes(routes!(webhooks::revoke_webhook))
        .routes(routes!(
            webhooks::create_workflow_webhook,
            webhooks::list_workflow_webhooks
        ))
        .routes(routes!(webhooks::revoke_workflow_webhook))
        .routes(routes!(hooks::deliver))
        .routes(routes!(schedules::create_schedule))
        .routes(routes!(schedules::create_workflow_schedule))
        .routes(routes!(schedules::list_schedules))
        .routes(routes!(
            schedules::get_schedule,
            schedules::patch_schedule,
            schedules::delete_schedule
        ))
        .routes(routes!(schedules::pause_schedule))
        .routes(routes!(schedules::resume_schedule))
        .routes(routes!(variables::list_variables))
        .routes(routes!(
            variables::put_variable,
            variables::get_variable,
            variables::delete_variable
        ))
        .routes(routes!(jobs::list_jobs))
        .routes(routes!(jobs::get_job))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(jobs::rerun_job))
        .routes(routes!(jobs::get_logs))
        .routes(routes!(jobs::get_logs_text))
        .routes(routes!(stream::stream_logs))
        .routes(routes!(
            workflows::create_workflow,
            workflows::list_workflows
        ))
        .routes(routes!(workflows::get_workflow, workflows::delete_workflow))
        .routes(routes!(workflows::run_workflow))
        .routes(routes!(workflows::list_runs))
        .routes(routes!(workflows::get_run))
        .routes(routes!(workflows::cancel_run))
        .routes(routes!(workflows::retry_run))
        .routes(routes!(workers::list_workers))
        .routes(routes!(servers::create_server, servers::list_servers))
        .routes(routes!(servers::get_server, servers::delete_server))
        .routes(routes!(tokens::create_token, tokens::list_tokens))
        .routes(routes!(tokens::revoke_token))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .split_for_parts();
    let mut spec = spec;
    // After the routes are in: the modifiers of `ApiDoc` run before.
    utoipa::Modify::modify(&openapi_responses::CommonResponses, &mut spec);
    let spec = std::sync::Arc::new(spec);
    api.route(
        "/api/v1/openapi.json",
        axum::routing::get(move || {
            let spec = spec.clone();
            async move { axum::Json(spec.as_ref().clone()) }
        }),
    )
    .route("/metrics", axum::routing::get(crate::metrics::render))
    .merge(crate::dashboard::router())
    .fallback(not_found)
    .method_not_allowed_fallback(method_not_allowed)
    .layer(DefaultBodyLimit::max(body_limit))
    .layer(axum::middleware::from_fn(uri_guard::reject_nul))
    .layer(axum::middleware::from_fn_with_state(
        limiter,
        rate_limit::limit,
    ))
    .layer(TraceLayer::new_for_http())
    .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see /api/v1/openapi.json".into())
}

async fn method_not_allowed() -> impl IntoResponse {
    let body = crate::error::ErrorBody {
        error: crate::error::ErrorDetail {
            code: "method_not_allowed".into(),
            message: "this route does not accept that method; see /api/v1/openapi.json".into(),
            field: None,
        },
    };
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body))
}

/// A page of results and the cursor for the next one (absent on the last page).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Records a mutating call in the audit log, in the caller's transaction.
async fn audit(
    db: impl sqlx::PgExecutor<'_>,
    caller: &Caller,
    action: &str,
    target_type: &str,
    target_id: impl ToString,
    detail: Value,
) -> Result<(), ApiError> {
    audit::record(
        db,
        &AuditEntry {
            token_id: Some(caller.token_id),
            actor: &caller.name,
            action,
            target_type,
            target_id: Some(target_id.to_string()),
            detail,
        },
    )
    .await?;
    Ok(())
}
