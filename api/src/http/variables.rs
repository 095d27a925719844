//! `/api/v1/variables/{key}`: values scripts read and write. Secrets are sealed with the
//! master key, readable by scripts, and never returned by the API.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

use super::audit;
use super::extract::JsonBody;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::model::Role;
use crate::model::variable::{PutVariable, Scope, Variable, check_key};
use crate::storage::variables::{self, StoredValue, VariableRow};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ScopeQuery {
    /// `global` (default) or `event:{event id}`.
    pub scope: Option<String>,
}

fn view(row: VariableRow) -> Variable {
    Variable {
        scope: row
            .event_id
            .map_or_else(|| "global".to_owned(), |id| format!("event:{id}")),
        key: row.key,
        secret: row.secret,
        value: if row.secret { None } else { row.value },
        created_at: row.created_at,
        updated_at: row.updated_at,
        updated_by_job: row.updated_by_job,
    }
}

fn scope_of(q: &ScopeQuery) -> Result<Scope, ApiError> {
    Ok(Scope::parse(
        "scope",
        q.scope.as_deref().unwrap_or("global"),
    )?)
}

#[utoipa::path(put, path = "/api/v1/variables/{key}", tag = "variables", params(("key" = String, Path)),
    request_body = PutVariable,
    responses((status = 200, body = Variable), (status = 422, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn put_variable(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    JsonBody(put): JsonBody<PutVariable>,
) -> Result<axum::Json<Variable>, ApiError> {
    caller.require(Role::Admin)?;
    check_key(&key)?;
    let scope = put.validate()?;
    let mut tx = state.pool.begin().await?;
    let stored = if put.secret {
        StoredValue::Sealed(state.vault.seal(
            put.value.as_bytes(),
            &variables::identity(&key, scope.event_id()),
        )?)
    } else {
        StoredValue::Plain(put.value.clone())
    };
    let row = variables::upsert(
        &mut *tx,
        &key,
        scope.event_id(),
        &stored,
        Some(caller.token_id),
        None,
    )
    .await?;
    audit(
        &mut *tx,
        &caller,
        "variable.put",
        "variable",
        format!("{scope}/{key}"),
        json!({"secret": put.secret}),
    )
    .await?;
    tx.commit().await?;
    Ok(axum::Json(view(row)))
}

#[utoipa::path(get, path = "/api/v1/variables/{key}", tag = "variables", params(("key" = String, Path), ScopeQuery),
    responses((status = 200, body = Variable), (status = 404, body = ErrorBody)))]
pub async fn get_variable(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    query: Result<Query<ScopeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Variable>, ApiError> {
    caller.require(Role::Viewer)?;
    check_key(&key)?;
    let Query(q) = query.map_err(super::jobs::query_error)?;
    let scope = scope_of(&q)?;
    let row = variables::get(&state.pool, &key, scope.event_id())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no variable {key:?} in scope {scope}")))?;
    Ok(axum::Json(view(row)))
}

#[utoipa::path(get, path = "/api/v1/variables", tag = "variables", params(ScopeQuery),
    responses((status = 200, body = Vec<Variable>)))]
pub async fn list_variables(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ScopeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Vec<Variable>>, ApiError> {
    caller.require(Role::Viewer)?;
    let Query(q) = query.map_err(super::jobs::query_error)?;
    let scope = match &q.scope {
        None => None,
        Some(_) => Some(scope_of(&q)?.event_id()),
    };
    let rows = variables::list(&state.pool, scope).await?;
    Ok(axum::Json(rows.into_iter().map(view).collect()))
}

#[utoipa::path(delete, path = "/api/v1/variables/{key}", tag = "variables", params(("key" = String, Path), ScopeQuery),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_variable(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    query: Result<Query<ScopeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    check_key(&key)?;
    let Query(q) = query.map_err(super::jobs::query_error)?;
    let scope = scope_of(&q)?;
    let mut tx = state.pool.begin().await?;
    if !variables::delete(&mut *tx, &key, scope.event_id()).await? {
        return Err(ApiError::NotFound(format!(
            "no variable {key:?} in scope {scope}"
        )));
    }
    audit(
        &mut *tx,
        &caller,
        "variable.delete",
        "variable",
        format!("{scope}/{key}"),
        json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
