//! Webhook triggers: a URL (`/hooks/{key}`) that starts a run of an event without a token.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::FieldError;

/// At most this many headers may be passed to runs.
pub const MAX_HEADERS: usize = 32;

/// `POST /api/v1/events/{id}/webhooks`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// A name to recognise the webhook by (1-200 characters).
    pub name: String,
    /// When set, every delivery must carry `X-Baton-Signature: sha256=<hex HMAC-SHA256 of the
    /// raw body under this secret>` (as GitHub sends it); stored sealed, never shown again.
    #[serde(default)]
    pub signing_secret: Option<String>,
    /// Request headers passed to the run as `input._headers` (names, matched without regard to
    /// case, given to the run lower-cased), e.g. `["X-GitHub-Event"]`. Deliveries must then be
    /// JSON objects.
    #[serde(default)]
    pub headers: Option<Vec<String>>,
}

impl NewWebhook {
    /// Checks the fields and lower-cases the header names.
    pub fn validate(&mut self) -> Result<(), FieldError> {
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(FieldError::new(
                "name",
                "must be 1 to 200 printable characters",
            ));
        }
        if let Some(secret) = &self.signing_secret
            && (secret.len() < 8 || secret.len() > 1024 || secret.contains('\0'))
        {
            return Err(FieldError::new(
                "signing_secret",
                "must be 8 to 1024 bytes without NUL characters",
            ));
        }
        if let Some(headers) = &mut self.headers {
            if headers.len() > MAX_HEADERS {
                return Err(FieldError::new(
                    "headers",
                    format!("at most {MAX_HEADERS} headers"),
                ));
            }
            for (i, header) in headers.iter_mut().enumerate() {
                if axum::http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    return Err(FieldError::new(
                        format!("headers[{i}]"),
                        "is not a valid HTTP header name",
                    ));
                }
                *header = header.to_ascii_lowercase();
            }
            headers.sort();
            headers.dedup();
        }
        Ok(())
    }
}

/// A webhook as the API shows it (never its key or secret).
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct Webhook {
    pub id: Uuid,
    /// The event whose runs it starts (null for a workflow's webhook).
    pub event_id: Option<Uuid>,
    /// The workflow whose runs it starts (null for an event's webhook).
    pub workflow_id: Option<Uuid>,
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub key_prefix: String,
    /// Whether deliveries must be signed (`X-Baton-Signature`).
    pub signed: bool,
    /// Headers passed to runs as `input._headers` (lower-cased).
    pub headers: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The answer to creating a webhook: the key is shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookCreated {
    #[serde(flatten)]
    pub webhook: Webhook,
    /// The secret part of the URL; stored hashed, never shown again.
    pub key: String,
    /// Where to send deliveries: `POST` a JSON body here (path relative to the api's address).
    pub url: String,
}
