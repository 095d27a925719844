//! Liveness and readiness probes (no authentication).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::AppState;

#[utoipa::path(get, path = "/healthz", tag = "health", security(), responses((status = 200, description = "the process is up")))]
pub async fn healthz() -> axum::Json<Value> {
    axum::Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "health", security(),
    responses((status = 200, description = "the database answers"), (status = 503, description = "it does not")))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, axum::Json<Value>) {
    let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool);
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => (StatusCode::OK, axum::Json(json!({"status": "ready"}))),
        Ok(Err(e)) => {
            // The detail (hosts, users, server messages) is for the log, not anonymous callers.
            tracing::warn!(error = %e, "readiness check: the database refused");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(
                    json!({"status": "unavailable", "reason": "the database is unavailable; see the api log"}),
                ),
            )
        }
        Err(_) => {
            tracing::warn!("readiness check: the database did not answer within 2 s");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(
                    json!({"status": "unavailable", "reason": "the database did not answer within 2 s"}),
                ),
            )
        }
    }
}
