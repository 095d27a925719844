//! Variables: named values scripts read (`baton_get_variable`) and write
//! (`baton_set_variable`), global or scoped to one event, optionally secret.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::FieldError;

/// Where a variable applies. Scripts of an event see its event-scoped variables over the
/// global ones with the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Global,
    Event(Uuid),
}

impl Scope {
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldError> {
        if raw == "global" {
            return Ok(Self::Global);
        }
        raw.strip_prefix("event:")
            .and_then(|id| Uuid::parse_str(id).ok())
            .map(Self::Event)
            .ok_or_else(|| FieldError::new(field, "must be `global` or `event:{event id}`"))
    }

    pub fn event_id(self) -> Option<Uuid> {
        match self {
            Self::Global => None,
            Self::Event(id) => Some(id),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Global => f.write_str("global"),
            Self::Event(id) => write!(f, "event:{id}"),
        }
    }
}

/// The body of `PUT /api/v1/variables/{key}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutVariable {
    pub value: String,
    /// `global` (default) or `event:{event id}`.
    #[serde(default)]
    pub scope: Option<String>,
    /// Secret values are encrypted at rest, never returned, and masked as `***` in logs.
    #[serde(default)]
    pub secret: bool,
}

impl std::fmt::Debug for PutVariable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutVariable")
            .field("scope", &self.scope)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

/// Largest variable value.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

pub fn check_key(key: &str) -> Result<(), FieldError> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && key != "."
        && key != ".."
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "key",
            "must be 1-128 of [A-Za-z0-9_.-] (not `.` or `..`)",
        ))
    }
}

impl PutVariable {
    pub fn validate(&self) -> Result<Scope, FieldError> {
        if self.value.len() > MAX_VALUE_BYTES {
            return Err(FieldError::new(
                "value",
                format!("must be at most {MAX_VALUE_BYTES} bytes"),
            ));
        }
        if self.value.contains('\0') {
            return Err(FieldError::new("value", "must not contain NUL bytes"));
        }
        Scope::parse("scope", self.scope.as_deref().unwrap_or("global"))
    }
}

/// A variable as the API shows it: a secret's value is never returned (`null`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Variable {
    pub key: String,
    pub scope: String,
    pub secret: bool,
    pub value: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub updated_by_job: Option<Uuid>,
}
