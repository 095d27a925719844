//! `/api/v1/tokens`: admin-only management of API and worker tokens.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::json;

use super::audit;
use super::extract::{JsonBody, parse_uuid};
use crate::AppState;
use crate::auth::{self, Caller};
use crate::error::{ApiError, ErrorBody};
use crate::model::token::WorkerBinding;
use crate::model::{NewToken, Role, Token, TokenCreated};
use crate::storage::tokens;

#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = NewToken,
    responses((status = 201, body = TokenCreated, description = "the secret is shown only here"),
              (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(new): JsonBody<NewToken>,
) -> Result<(StatusCode, axum::Json<TokenCreated>), ApiError> {
    caller.require(Role::Admin)?;
    new.validate()?;
    let binding = WorkerBinding {
        labels: new.worker_labels.clone(),
        executors: new.executor_names(),
    };
    let (info, token) = auth::create_bound_token(
        &state.pool,
        &new.name,
        new.role,
        Some(caller.token_id),
        &binding,
    )
    .await?;
    audit(
        &state.pool,
        &caller,
        "token.create",
        "token",
        info.id,
        json!({"name": info.name, "role": info.role,
               "worker_labels": info.worker_labels, "executors": info.executors}),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(TokenCreated { info, token }),
    ))
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", responses((status = 200, body = Vec<Token>)))]
pub async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<Token>>, ApiError> {
    caller.require(Role::Admin)?;
    Ok(axum::Json(tokens::list_tokens(&state.pool).await?))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = Uuid, Path)),
    responses((status = 204, description = "revoked"), (status = 404, body = ErrorBody)))]
pub async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    let id = parse_uuid("id", &id)?;
    let mut tx = state.pool.begin().await?;
    tokens::revoke_token(&mut *tx, id).await?;
    audit(&mut *tx, &caller, "token.revoke", "token", id, json!({})).await?;
    tx.commit().await?;
    // Other replicas hear of it by NOTIFY; this one stops accepting it (and ends the worker
    // streams opened with it) before answering.
    state.tokens.forget(id);
    Ok(StatusCode::NO_CONTENT)
}
