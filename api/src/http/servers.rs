//! `/api/v1/servers`: where ssh events run. Credentials are encrypted before they are stored
//! and are never returned.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::json;
use uuid::Uuid;

use super::audit;
use super::extract::{JsonBody, parse_uuid};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::model::Role;
use crate::model::server::{Credentials, NewServer, Server};
use crate::storage::servers;

#[utoipa::path(post, path = "/api/v1/servers", tag = "servers", request_body = NewServer,
    responses((status = 201, body = Server), (status = 422, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "BATON_MASTER_KEY is not configured")))]
pub async fn create_server(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(new): JsonBody<NewServer>,
) -> Result<(StatusCode, axum::Json<Server>), ApiError> {
    caller.require(Role::Admin)?;
    let credentials = new.validate()?;
    let id = Uuid::now_v7();
    let auth_method = match credentials {
        Credentials::PrivateKey { .. } => "private_key",
        Credentials::Password { .. } => "password",
    };
    let plaintext =
        serde_json::to_vec(&credentials).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let sealed = state.vault.seal(&plaintext, id.as_bytes())?;
    let mut tx = state.pool.begin().await?;
    let server = servers::insert_server(&mut *tx, id, &new, auth_method, &sealed).await?;
    audit(
        &mut *tx,
        &caller,
        "server.create",
        "server",
        id,
        json!({"name": server.name, "host": server.host}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(server)))
}

#[utoipa::path(get, path = "/api/v1/servers", tag = "servers", responses((status = 200, body = Vec<Server>)))]
pub async fn list_servers(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<Server>>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(axum::Json(servers::list_servers(&state.pool).await?))
}

#[utoipa::path(get, path = "/api/v1/servers/{id}", tag = "servers", params(("id" = Uuid, Path)),
    responses((status = 200, body = Server), (status = 404, body = ErrorBody)))]
pub async fn get_server(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Server>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = parse_uuid("id", &id)?;
    Ok(axum::Json(servers::get_server(&state.pool, id).await?))
}

#[utoipa::path(delete, path = "/api/v1/servers/{id}", tag = "servers", params(("id" = Uuid, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_server(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    let id = parse_uuid("id", &id)?;
    let mut tx = state.pool.begin().await?;
    servers::delete_server(&mut *tx, id).await?;
    audit(&mut *tx, &caller, "server.delete", "server", id, json!({})).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
