//! Host key pinning: parsing the pinned key, checking the key the server presents, and the
//! `russh` client handler that does it during the handshake.

use std::sync::{Arc, Mutex, PoisonError};

use russh::keys::{Algorithm, HashAlg, PublicKey, PublicKeyOrCertificate};

use super::SshError;

/// Parses an OpenSSH public key line (`"ssh-ed25519 AAAA… [comment]"`).
pub(crate) fn parse_host_key(line: &str) -> Result<PublicKey, SshError> {
    let line = line.trim();
    PublicKey::from_openssh(line).map_err(|e| {
        SshError::invalid_target(format!(
            "the pinned host key is not an OpenSSH public key line (\"ssh-ed25519 AAAA…\"): {e}"
        ))
    })
}

/// The key as an OpenSSH public key line without comment (`"ssh-ed25519 AAAA…"`).
pub fn key_line(key: &PublicKey) -> String {
    let bare = PublicKey::new(key.key_data().clone(), "");
    bare.to_openssh()
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| fingerprint(key))
}

/// `SHA256:…` fingerprint, as OpenSSH prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Whether two keys are the same key (comments ignored).
pub(crate) fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

/// Host key algorithms to offer when `key` is expected, so the server proves possession of that
/// key (and not of another of its host keys, which would look like a mismatch).
pub(crate) fn algorithms_for(key: &PublicKey) -> Vec<Algorithm> {
    match key.algorithm() {
        Algorithm::Rsa { .. } => vec![
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
            Algorithm::Rsa { hash: None },
        ],
        other => vec![other],
    }
}

/// What the handler saw during the handshake.
#[derive(Debug, Clone, Default)]
pub(crate) enum HostKeySeen {
    /// The handshake did not reach the host key check.
    #[default]
    Nothing,
    /// The key was accepted (it matched, or was accepted as new).
    Accepted(PublicKey),
    /// The key differs from the expected one.
    Mismatch {
        expected: PublicKey,
        presented: PublicKey,
    },
}

/// The `russh` client handler: checks the server's host key against `expected` (or accepts any
/// key when `expected` is `None`, the first use under `accept_new`) and records what it saw.
pub(crate) struct ClientHandler {
    expected: Option<PublicKey>,
    seen: Arc<Mutex<HostKeySeen>>,
}

impl ClientHandler {
    pub(crate) fn new(expected: Option<PublicKey>) -> (Self, Arc<Mutex<HostKeySeen>>) {
        let seen = Arc::new(Mutex::new(HostKeySeen::Nothing));
        (
            ClientHandler {
                expected,
                seen: seen.clone(),
            },
            seen,
        )
    }
}

/// Reads a shared `HostKeySeen` (a poisoned lock still holds valid data).
pub(crate) fn seen(slot: &Mutex<HostKeySeen>) -> HostKeySeen {
    slot.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

impl russh::client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // A certificate is judged by the key it certifies: only the pinned key is trusted,
        // never a certificate authority.
        let presented = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(cert) => {
                PublicKey::new(cert.public_key().clone(), "")
            }
        };
        let (verdict, accept) = match &self.expected {
            Some(expected) if !same_key(expected, &presented) => (
                HostKeySeen::Mismatch {
                    expected: expected.clone(),
                    presented,
                },
                false,
            ),
            _ => (HostKeySeen::Accepted(presented), true),
        };
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = verdict;
        Ok(accept)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAj8txzLPRZ2RoUlwufmddzeUkmXw1+IAGb9hviFbBL6 user@host";

    #[test]
    fn parses_and_prints_key_lines() {
        let key = parse_host_key(&format!("  {KEY}\n")).unwrap();
        assert_eq!(
            key_line(&key),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAj8txzLPRZ2RoUlwufmddzeUkmXw1+IAGb9hviFbBL6"
        );
        assert!(fingerprint(&key).starts_with("SHA256:"));
        let bare = parse_host_key(&key_line(&key)).unwrap();
        assert!(same_key(&key, &bare));
        assert_eq!(algorithms_for(&key), vec![Algorithm::Ed25519]);
        let err = parse_host_key("not a key").unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("pinned host key"), "{err}");
    }
}
