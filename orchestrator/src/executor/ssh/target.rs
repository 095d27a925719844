//! The server a run goes to: [`SshTarget`], [`SshAuth`] and [`HostKeyPolicy`].

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A registered server, as the worker receives it inside a job's assignment.
///
/// Deserializes from:
///
/// ```json
/// {"server_id": "0190…", "host": "10.0.0.5", "port": 22, "username": "deploy",
///  "auth": {"private_key": "-----BEGIN OPENSSH PRIVATE KEY-----…", "passphrase": null},
///  "host_key_policy": "strict", "host_key": "ssh-ed25519 AAAA…", "max_concurrent": 4}
/// ```
///
/// (the API's `server_json`; other fields, such as `name`, are ignored). `auth` may instead be
/// `{"password": "…"}`. `port` defaults to 22, `host_key_policy` to
/// `strict` (`accept-new` is accepted as an alias of `accept_new`), `host_key` to none and
/// `max_concurrent` to 4 (0 is treated as 1).
///
/// `Debug` never prints the private key, its passphrase or the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshTarget {
    /// The server's id in the API. Connections, the concurrency limit, the circuit breaker and
    /// keys learned with `accept_new` are kept per server id.
    pub server_id: Uuid,
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Login user.
    pub username: String,
    /// How to authenticate.
    pub auth: SshAuth,
    /// How the server's host key is checked.
    #[serde(default)]
    pub host_key_policy: HostKeyPolicy,
    /// The pinned host key, as an OpenSSH public key line (`"ssh-ed25519 AAAA… [comment]"`).
    /// Required with [`HostKeyPolicy::Strict`]; with [`HostKeyPolicy::AcceptNew`] it is set
    /// once the API has recorded the key seen on first use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// Most runs this worker has on the server at once (and so most connections it opens to
    /// it). 0 counts as 1.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
}

fn default_port() -> u16 {
    22
}

fn default_max_concurrent() -> u32 {
    4
}

impl SshTarget {
    /// A target with key authentication, `strict` policy and no pinned key yet (set
    /// [`SshTarget::host_key`] before use, or switch to [`HostKeyPolicy::AcceptNew`]).
    pub fn new(
        server_id: Uuid,
        host: impl Into<String>,
        port: u16,
        username: impl Into<String>,
        auth: SshAuth,
    ) -> Self {
        SshTarget {
            server_id,
            host: host.into(),
            port,
            username: username.into(),
            auth,
            host_key_policy: HostKeyPolicy::Strict,
            host_key: None,
            max_concurrent: default_max_concurrent(),
        }
    }

    /// `host:port` (IPv6 literals in brackets), for messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The concurrency limit actually applied (at least 1).
    pub fn effective_max_concurrent(&self) -> u32 {
        self.max_concurrent.max(1)
    }
}

impl fmt::Debug for SshTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshTarget")
            .field("server_id", &self.server_id)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("auth", &self.auth)
            .field("host_key_policy", &self.host_key_policy)
            .field("host_key", &self.host_key)
            .field("max_concurrent", &self.max_concurrent)
            .finish()
    }
}

/// How the worker authenticates to a server.
///
/// JSON: `{"private_key": "PEM", "passphrase": "…"}` (passphrase optional) or
/// `{"password": "…"}`, as the API stores and sends credentials.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "AuthWire", into = "AuthWire")]
pub enum SshAuth {
    /// A private key in OpenSSH (`-----BEGIN OPENSSH PRIVATE KEY-----`) or PKCS#8 PEM format,
    /// optionally encrypted with `passphrase`.
    PrivateKey {
        /// The key text.
        pem: String,
        /// The passphrase of an encrypted key.
        passphrase: Option<String>,
    },
    /// A password.
    Password(String),
}

/// The JSON form of [`SshAuth`].
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum AuthWire {
    PrivateKey {
        private_key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        passphrase: Option<String>,
    },
    Password {
        password: String,
    },
}

impl From<AuthWire> for SshAuth {
    fn from(wire: AuthWire) -> Self {
        match wire {
            AuthWire::PrivateKey {
                private_key,
                passphrase,
            } => SshAuth::PrivateKey {
                pem: private_key,
                passphrase,
            },
            AuthWire::Password { password } => SshAuth::Password(password),
        }
    }
}

impl From<SshAuth> for AuthWire {
    fn from(auth: SshAuth) -> Self {
        match auth {
            SshAuth::PrivateKey { pem, passphrase } => AuthWire::PrivateKey {
                private_key: pem,
                passphrase,
            },
            SshAuth::Password(password) => AuthWire::Password { password },
        }
    }
}

impl fmt::Debug for SshAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SshAuth::PrivateKey { passphrase, .. } => f
                .debug_struct("PrivateKey")
                .field("pem", &"<redacted>")
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .finish(),
            SshAuth::Password(_) => f.debug_tuple("Password").field(&"<redacted>").finish(),
        }
    }
}

/// How a server's host key is checked. A key that differs from the pinned (or learned) one is
/// refused under both policies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKeyPolicy {
    /// The server must present exactly [`SshTarget::host_key`] (which must be set).
    #[default]
    Strict,
    /// With no [`SshTarget::host_key`], the first key seen is accepted, reported in
    /// [`RunOutcome::observed_host_key`](crate::executor::RunOutcome::observed_host_key) for
    /// the API to record, and required by this executor from then on. With a key, as strict.
    #[serde(alias = "accept-new")]
    AcceptNew,
}

impl HostKeyPolicy {
    /// `"strict"` or `"accept_new"`.
    pub fn as_str(self) -> &'static str {
        match self {
            HostKeyPolicy::Strict => "strict",
            HostKeyPolicy::AcceptNew => "accept_new",
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    #[test]
    fn deserializes_the_assignment_shape() {
        let t: SshTarget = serde_json::from_value(serde_json::json!({
            "server_id": "0190a5f0-0000-7000-8000-000000000001",
            "host": "db1", "username": "deploy",
            "name": "db1",
            "auth": {"private_key": "SECRET-PEM", "passphrase": "SECRET-PASS"},
            "host_key_policy": "accept-new",
        }))
        .unwrap();
        assert_eq!(t.port, 22);
        assert_eq!(t.max_concurrent, 4);
        assert_eq!(t.host_key_policy, HostKeyPolicy::AcceptNew);
        assert_eq!(t.host_key, None);
        assert_eq!(
            t.auth,
            SshAuth::PrivateKey {
                pem: "SECRET-PEM".into(),
                passphrase: Some("SECRET-PASS".into())
            }
        );
        let back: SshTarget = serde_json::from_value(serde_json::to_value(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        let shown = format!("{t:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("db1"));

        let t: SshTarget = serde_json::from_value(serde_json::json!({
            "server_id": "0190a5f0-0000-7000-8000-000000000001",
            "host": "::1", "port": 2222, "username": "u",
            "auth": {"password": "SECRET-PW"},
            "host_key": "ssh-ed25519 AAAA", "max_concurrent": 0,
        }))
        .unwrap();
        assert_eq!(t.host_key_policy, HostKeyPolicy::Strict);
        assert_eq!(t.auth, SshAuth::Password("SECRET-PW".into()));
        assert_eq!(t.effective_max_concurrent(), 1);
        assert_eq!(t.address(), "[::1]:2222");
        let shown = format!("{t:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        let back: SshTarget = serde_json::from_value(serde_json::to_value(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }
}
