//! Signing in to the dashboard: a pasted API token opens a server-side session; the browser
//! keeps only a random session id in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` when
//! the dashboard is served over TLS: `BATON_SECURE_COOKIES`, or a proxy's
//! `X-Forwarded-Proto: https`). The session acts with its token's role and ends with the
//! token (revoked: refused at once) or after [`SESSION_TTL`]; signing out deletes it.
//!
//! CSRF: every form carries a token derived from the session secret (`SHA-256("csrf:" ||
//! secret)`), compared in constant time on every POST; the sign-in form, which has no session
//! yet, uses a double-submit cookie. `SameSite=Strict` is a second, independent guard.

use std::time::Duration;

use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::forms::Form;
use super::render::{DashError, fragment};
use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::model::Role;
use crate::storage::sessions;

pub const SESSION_COOKIE: &str = "baton_session";
const LOGIN_COOKIE: &str = "baton_login";
/// How long a session lasts (signing in again opens a new one).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// A signed-in browser: the token's identity as the REST API sees it, and the CSRF token its
/// forms must carry.
#[derive(Debug, Clone)]
pub struct Session {
    pub caller: Caller,
    pub csrf: String,
    /// The stored hash of the session id (long-lived streams re-check it).
    pub id_hash: Vec<u8>,
}

impl Session {
    /// Whether the session still stands (not signed out, expired or its token revoked).
    pub async fn still_valid(&self, state: &AppState) -> bool {
        matches!(
            sessions::find(&state.pool, &self.id_hash).await,
            Ok(Some(_))
        )
    }
}

impl Session {
    /// Refuses a form whose CSRF token is not this session's.
    pub fn check_csrf(&self, form: &Form) -> Result<(), DashError> {
        let given = form.get("_csrf").unwrap_or_default();
        if constant_time_eq(given.as_bytes(), self.csrf.as_bytes()) {
            Ok(())
        } else {
            Err(DashError::Csrf)
        }
    }
}

fn random_secret() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(43)
        .map(char::from)
        .collect()
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

fn csrf_of(secret: &str) -> String {
    hex::encode(Sha256::digest(format!("csrf:{secret}").as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn secure(state: &AppState, headers: &HeaderMap) -> bool {
    state.config.secure_cookies
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

fn set_cookie(name: &str, value: &str, max_age: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
}

impl FromRequestParts<AppState> for Session {
    type Rejection = DashError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let next = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let sign_in = || DashError::SignIn { next: next.clone() };
        let secret = cookie(&parts.headers, SESSION_COOKIE).ok_or_else(sign_in)?;
        let id_hash = hash(&secret);
        let owner = sessions::find(&state.pool, &id_hash)
            .await?
            .ok_or_else(sign_in)?;
        let caller = Caller {
            token_id: owner.token_id,
            name: owner.name,
            role: owner.role,
        };
        // What the REST API would answer this token (a worker token: 403 everywhere).
        caller.require(Role::Viewer)?;
        Ok(Session {
            caller,
            csrf: csrf_of(&secret),
            id_hash,
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

/// Only a path of this site (never `//host` or a scheme) may be the target after sign-in.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_owned(),
        _ => "/".to_owned(),
    }
}

pub async fn login_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Result<Response, DashError> {
    login_form(&state, &headers, q.next.as_deref(), None, StatusCode::OK)
}

fn login_form(
    state: &AppState,
    headers: &HeaderMap,
    next: Option<&str>,
    error: Option<&str>,
    status: StatusCode,
) -> Result<Response, DashError> {
    let nonce = random_secret();
    let body = fragment(
        "login.html",
        &json!({"title": "Sign in", "next": safe_next(next), "nonce": nonce, "error": error}),
    )?;
    let mut response = (status, Html(body)).into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, &nonce, 600, secure(state, headers)),
    );
    Ok(response)
}

/// `POST /login`: `token`, `next`, `_csrf` (the double-submitted nonce).
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Form,
) -> Result<Response, DashError> {
    let nonce = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    let given = form.get("_csrf").unwrap_or_default();
    if nonce.is_empty() || !constant_time_eq(nonce.as_bytes(), given.as_bytes()) {
        return Err(DashError::Csrf);
    }
    let next = form.get("next");
    let token = form.get("token").unwrap_or_default().trim().to_owned();
    let refuse = |message: &str, status: StatusCode| {
        login_form(&state, &headers, next, Some(message), status)
    };
    if token.is_empty() {
        return refuse(
            "token: paste an API token",
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    // The same verification as a bearer token (the token cache, revocations). A refusal is
    // a 401, which the rate limiter counts as a failed authentication of this address.
    let Some(verified) = crate::auth::verify(&state, &token).await? else {
        return refuse("unknown or revoked token", StatusCode::UNAUTHORIZED);
    };
    if verified.role == Role::Worker {
        return refuse(
            "worker tokens can only be used by workers",
            StatusCode::FORBIDDEN,
        );
    }
    let secret = random_secret();
    sessions::insert(&state.pool, &hash(&secret), verified.id, SESSION_TTL).await?;
    crate::storage::audit::record(
        &state.pool,
        &crate::storage::audit::AuditEntry {
            token_id: Some(verified.id),
            actor: &verified.name,
            action: "dashboard.sign_in",
            target_type: "token",
            target_id: Some(verified.id.to_string()),
            detail: json!({}),
        },
    )
    .await
    .map_err(ApiError::from)?;
    let secure = secure(&state, &headers);
    let mut response = Redirect::to(&safe_next(next)).into_response();
    let ttl = i64::try_from(SESSION_TTL.as_secs()).unwrap_or(i64::MAX);
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, &secret, ttl, secure),
    );
    response
        .headers_mut()
        .append(header::SET_COOKIE, set_cookie(LOGIN_COOKIE, "", 0, secure));
    Ok(response)
}

/// `POST /logout`: ends the session (even one whose token was revoked since).
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Form,
) -> Result<Response, DashError> {
    if let Some(secret) = cookie(&headers, SESSION_COOKIE) {
        let given = form.get("_csrf").unwrap_or_default();
        if !constant_time_eq(given.as_bytes(), csrf_of(&secret).as_bytes()) {
            return Err(DashError::Csrf);
        }
        sessions::delete(&state.pool, &hash(&secret)).await?;
    }
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, "", 0, secure(&state, &headers)),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_follow_sign_in() {
        assert_eq!(safe_next(Some("/runs/1?x=2")), "/runs/1?x=2");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn csrf_tokens_depend_on_the_session_and_compare_exactly() {
        let (a, b) = (csrf_of("one"), csrf_of("two"));
        assert_ne!(a, b);
        assert!(constant_time_eq(a.as_bytes(), a.as_bytes()));
        assert!(!constant_time_eq(a.as_bytes(), b.as_bytes()));
        assert!(!constant_time_eq(a.as_bytes(), &a.as_bytes()[1..]));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; baton_session=xyz"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("xyz"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
