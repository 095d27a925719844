//! `GET /api/v1/workers`: the workers the api knows, connected first.

use axum::extract::State;

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::model::Role;
use crate::storage::workers::{self, Worker};

#[utoipa::path(get, path = "/api/v1/workers", tag = "workers", responses((status = 200, body = Vec<Worker>)))]
pub async fn list_workers(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<Worker>>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(axum::Json(
        workers::list(&state.pool, state.config.lease).await?,
    ))
}
