//! API tokens and roles.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{FieldError, text_enum};

/// What a token may do. `admin` ⊃ `operator` ⊃ `viewer`; `worker` tokens only open the
/// worker gRPC stream and can do nothing on the REST API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Operator,
    Viewer,
    Worker,
}
text_enum!(Role { Admin => "admin", Operator => "operator", Viewer => "viewer", Worker => "worker" });

impl Role {
    /// Whether a token with this role may do what `required` allows.
    pub fn allows(self, required: Role) -> bool {
        let rank = |r: Role| match r {
            Role::Admin => 3,
            Role::Operator => 2,
            Role::Viewer => 1,
            Role::Worker => 0,
        };
        match required {
            Role::Worker => self == Role::Worker,
            _ => self != Role::Worker && rank(self) >= rank(required),
        }
    }
}

/// A stored token (never its secret).
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct Token {
    pub id: Uuid,
    pub name: String,
    #[sqlx(try_from = "String")]
    pub role: Role,
    /// The first characters of the token, to recognise it.
    pub token_prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub name: String,
    pub role: Role,
}

impl NewToken {
    pub fn validate(&self) -> Result<(), FieldError> {
        super::event::check_name("name", &self.name)
    }
}

/// The answer to `POST /api/v1/tokens`: the only time the secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenCreated {
    #[serde(flatten)]
    pub info: Token,
    /// The bearer token itself. Store it now: only its hash is kept.
    pub token: String,
}
