//! Templates (embedded with `include_str!`, compiled once), the HTML error page, the security
//! headers of every dashboard answer, and the two static assets.

use std::sync::OnceLock;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use minijinja::Environment;
use serde_json::{Value, json};

use super::session::Session;
use crate::error::ApiError;
use crate::model::Role;

const TEMPLATES: &[(&str, &str)] = &[
    ("layout.html", include_str!("templates/layout.html")),
    ("login.html", include_str!("templates/login.html")),
    ("error.html", include_str!("templates/error.html")),
    ("runs.html", include_str!("templates/runs.html")),
    ("runs_rows.html", include_str!("templates/runs_rows.html")),
    (
        "runs_counts.html",
        include_str!("templates/runs_counts.html"),
    ),
    (
        "runs_active.html",
        include_str!("templates/runs_active.html"),
    ),
    ("run.html", include_str!("templates/run.html")),
    (
        "run_summary.html",
        include_str!("templates/run_summary.html"),
    ),
    ("events.html", include_str!("templates/events.html")),
    ("event.html", include_str!("templates/event.html")),
    ("event_form.html", include_str!("templates/event_form.html")),
    ("schedules.html", include_str!("templates/schedules.html")),
    ("workers.html", include_str!("templates/workers.html")),
    ("dead.html", include_str!("templates/dead.html")),
    ("variables.html", include_str!("templates/variables.html")),
    ("servers.html", include_str!("templates/servers.html")),
    ("workflows.html", include_str!("templates/workflows.html")),
    (
        "workflow_run.html",
        include_str!("templates/workflow_run.html"),
    ),
];

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // `.html` templates escape every value unless marked safe (only the server's own
        // markup: ANSI-rendered lines and SVG graphs, escaped when they were built).
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .unwrap_or_else(|e| panic!("dashboard template {name} does not compile: {e}"));
        }
        env.add_filter("ts", |v: String| ts_text(&v));
        env
    })
}

/// `2026-01-02T03:04:05.678Z` as `2026-01-02 03:04:05`.
fn ts_text(raw: &str) -> String {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| {
            t.with_timezone(&Utc)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|_| raw.to_owned())
}

/// A short human duration: `4s`, `2m 05s`, `3h 02m`, `2d 4h`.
pub fn duration_text(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// What a dashboard handler can fail with: an API error (shown as a page with its status),
/// a missing session (to the sign-in page), or a bad CSRF token.
#[derive(Debug)]
pub enum DashError {
    Api(ApiError),
    SignIn { next: String },
    Csrf,
    Template(String),
}

impl From<ApiError> for DashError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl From<crate::storage::StorageError> for DashError {
    fn from(e: crate::storage::StorageError) -> Self {
        Self::Api(e.into())
    }
}

impl From<crate::model::FieldError> for DashError {
    fn from(e: crate::model::FieldError) -> Self {
        Self::Api(e.into())
    }
}

impl IntoResponse for DashError {
    fn into_response(self) -> Response {
        let (status, title, message) = match self {
            Self::SignIn { next } => {
                let target = format!("/login?next={}", urlencode(&next));
                return Redirect::to(&target).into_response();
            }
            Self::Csrf => (
                StatusCode::FORBIDDEN,
                "Form expired",
                "The form's security token is missing or does not match this session. Reload the page and try again.".to_owned(),
            ),
            Self::Template(e) => {
                tracing::error!(error = %e, "dashboard template failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal error",
                    "The page could not be drawn; the server log says why.".to_owned(),
                )
            }
            Self::Api(e) => {
                let (status, _, field) = e.parts();
                let message = if status.is_server_error() {
                    if let ApiError::Storage(inner) = &e {
                        tracing::error!(error = %inner, "dashboard request failed");
                    }
                    "The server could not answer; the server log says why.".to_owned()
                } else {
                    match field {
                        Some(f) if !e.to_string().starts_with(&f) => format!("{f}: {e}"),
                        _ => e.to_string(),
                    }
                };
                let title = status.canonical_reason().unwrap_or("Error");
                let body = env()
                    .get_template("error.html")
                    .and_then(|t| t.render(json!({"title": title, "status": status.as_u16(), "message": message})))
                    .unwrap_or(message);
                let mut response = (status, Html(body)).into_response();
                if status == StatusCode::TOO_MANY_REQUESTS {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                }
                return response;
            }
        };
        let body = env()
            .get_template("error.html")
            .and_then(|t| {
                t.render(json!({"title": title, "status": status.as_u16(), "message": message}))
            })
            .unwrap_or_else(|_| message.clone());
        (status, Html(body)).into_response()
    }
}

/// Renders a page inside the layout: `ctx` plus who is signed in, the CSRF token, what the
/// role may do and the active navigation entry.
pub fn show(
    template: &str,
    session: &Session,
    nav: &str,
    title: &str,
    mut ctx: Value,
) -> Result<Response, DashError> {
    if let Value::Object(map) = &mut ctx {
        map.insert("title".into(), json!(title));
        map.insert("nav".into(), json!(nav));
        map.insert(
            "me".into(),
            json!({"name": session.caller.name, "role": session.caller.role}),
        );
        map.insert("csrf".into(), json!(session.csrf));
        map.insert(
            "can_operate".into(),
            json!(session.caller.role.allows(Role::Operator)),
        );
        map.insert(
            "can_admin".into(),
            json!(session.caller.role.allows(Role::Admin)),
        );
    }
    Ok(Html(fragment(template, &ctx)?).into_response())
}

/// Renders a template on its own (a page without the session, or a live fragment).
pub fn fragment(template: &str, ctx: &Value) -> Result<String, DashError> {
    env()
        .get_template(template)
        .and_then(|t| t.render(ctx))
        .map_err(|e| DashError::Template(format!("{template}: {e:#}")))
}

/// Percent-encodes a query value.
pub fn urlencode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Headers on every dashboard answer: a strict Content-Security-Policy (scripts and styles
/// only from this origin; inline `style` attributes allowed for the colours and positions
/// the server computed), no framing, no sniffing, no referrer leaving the site.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let set = |headers: &mut axum::http::HeaderMap, name: &'static str, value: &'static str| {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    };
    set(
        headers,
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; \
         img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(headers, "x-frame-options", "DENY");
    set(headers, "x-content-type-options", "nosniff");
    set(headers, "referrer-policy", "same-origin");
    set(headers, "cache-control", "no-store");
    response
}

pub async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/app.css"))
}

pub async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles() {
        for (name, _) in TEMPLATES {
            assert!(env().get_template(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration_text(5), "5s");
        assert_eq!(duration_text(125), "2m 05s");
        assert_eq!(duration_text(3 * 3600 + 120), "3h 02m");
        assert_eq!(duration_text(2 * 86_400 + 4 * 3600), "2d 4h");
    }
}
