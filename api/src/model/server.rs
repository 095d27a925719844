//! Servers that `ssh` events run on. Credentials go in, never out.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{FieldError, text_enum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum HostKeyPolicy {
    /// The server's key must match `host_key`.
    #[default]
    Strict,
    /// The first key seen is recorded, and enforced from then on.
    AcceptNew,
}
text_enum!(HostKeyPolicy { Strict => "strict", AcceptNew => "accept_new" });

/// The body of `POST /api/v1/servers`.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewServer {
    pub name: String,
    pub host: String,
    #[serde(default = "default_port")]
    pub port: i32,
    pub username: String,
    /// An OpenSSH or PEM private key (give this or `password`).
    #[serde(default)]
    pub private_key: Option<String>,
    /// The private key's passphrase, if it has one.
    #[serde(default)]
    pub passphrase: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub host_key_policy: HostKeyPolicy,
    /// The server's public host key ("ssh-ed25519 AAAA..."); required with `strict`.
    #[serde(default)]
    pub host_key: Option<String>,
    /// Runs on this server at once, per worker.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: i32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Debug for NewServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewServer")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("host_key_policy", &self.host_key_policy)
            .finish_non_exhaustive()
    }
}

fn default_port() -> i32 {
    22
}
fn default_max_concurrent() -> i32 {
    4
}

/// The credentials, as encrypted at rest and handed to workers.
#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Credentials {
    PrivateKey {
        private_key: String,
        passphrase: Option<String>,
    },
    Password {
        password: String,
    },
}

impl NewServer {
    /// Checks the fields and splits off the credentials.
    pub fn validate(&self) -> Result<Credentials, FieldError> {
        super::event::check_name("name", &self.name)?;
        let host_ok = !self.host.is_empty()
            && self.host.len() <= 255
            && self
                .host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c));
        if !host_ok {
            return Err(FieldError::new("host", "must be a host name or IP address"));
        }
        super::event::check_range("port", self.port, 1, 65535)?;
        if self.username.is_empty()
            || self.username.len() > 64
            || self
                .username
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(FieldError::new(
                "username",
                "must be 1 to 64 characters without spaces",
            ));
        }
        super::event::check_range("max_concurrent", self.max_concurrent, 1, 1024)?;
        for (k, v) in &self.labels {
            super::event::check_label(k, v)?;
        }
        match (&self.host_key, self.host_key_policy) {
            (Some(key), _) => check_host_key(key)?,
            (None, HostKeyPolicy::Strict) => {
                return Err(FieldError::new(
                    "host_key",
                    "is required with host_key_policy strict (or use accept_new to record it on first use)",
                ));
            }
            (None, HostKeyPolicy::AcceptNew) => {}
        }
        match (&self.private_key, &self.password) {
            (Some(key), None) => {
                let key = key.trim();
                if !(key.starts_with("-----BEGIN ") && key.contains("PRIVATE KEY-----")) {
                    return Err(FieldError::new(
                        "private_key",
                        "must be an OpenSSH or PEM private key (-----BEGIN ... PRIVATE KEY-----)",
                    ));
                }
                Ok(Credentials::PrivateKey {
                    private_key: format!("{key}\n"),
                    passphrase: self.passphrase.clone().filter(|p| !p.is_empty()),
                })
            }
            (None, Some(password)) if !password.is_empty() => {
                if self.passphrase.is_some() {
                    return Err(FieldError::new("passphrase", "only goes with private_key"));
                }
                Ok(Credentials::Password {
                    password: password.clone(),
                })
            }
            (None, Some(_)) => Err(FieldError::new("password", "must not be empty")),
            (Some(_), Some(_)) => Err(FieldError::new(
                "password",
                "give private_key or password, not both",
            )),
            (None, None) => Err(FieldError::new(
                "private_key",
                "give private_key or password",
            )),
        }
    }
}

/// An OpenSSH public key line: type, base64 blob, optional comment.
pub fn check_host_key(key: &str) -> Result<(), FieldError> {
    let mut parts = key.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(FieldError::new(
            "host_key",
            "must be an OpenSSH public key line: \"ssh-ed25519 AAAA...\"",
        ));
    };
    let known = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
    ];
    if !known.contains(&kind) {
        return Err(FieldError::new(
            "host_key",
            format!(
                "unknown key type {kind:?} (expected one of {})",
                known.join(", ")
            ),
        ));
    }
    use base64::Engine;
    if base64::engine::general_purpose::STANDARD
        .decode(blob)
        .is_err()
    {
        return Err(FieldError::new(
            "host_key",
            "the key data is not valid base64",
        ));
    }
    Ok(())
}

/// A stored server (no secrets).
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct Server {
    pub id: Uuid,
    pub name: String,
    pub host: String,
    pub port: i32,
    pub username: String,
    /// `private_key` or `password`.
    pub auth_method: String,
    #[sqlx(try_from = "String")]
    pub host_key_policy: HostKeyPolicy,
    pub host_key: Option<String>,
    pub host_key_recorded_at: Option<DateTime<Utc>>,
    pub max_concurrent: i32,
    #[sqlx(json)]
    pub labels: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}
