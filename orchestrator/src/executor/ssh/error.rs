//! [`SshError`]: why an SSH run could not be carried out, and whether retrying may help.

use std::time::Duration;

/// A failure of the SSH transport (as opposed to the script's own failure), carried in
/// [`ExecError::Ssh`](crate::executor::ExecError::Ssh).
///
/// Every variant is an infrastructure error. [`SshError::is_retryable`] says whether another
/// attempt may succeed: network failures are retryable, wrong credentials, a refused host key
/// and an invalid server definition are not (they fail the same way until someone fixes the
/// server's definition).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The host name could not be resolved. Retryable.
    #[error("cannot resolve SSH host `{host}`: {message}")]
    Dns {
        /// The host name.
        host: String,
        /// The resolver's message.
        message: String,
    },
    /// Nothing listens on the port (TCP connection refused). Retryable.
    #[error("SSH connection to {address} refused")]
    ConnectionRefused {
        /// `host:port`.
        address: String,
    },
    /// The TCP connection or the SSH handshake failed or timed out (unreachable network, reset,
    /// protocol error, lost connection). Retryable.
    #[error("cannot connect to SSH server {address}: {message}")]
    Connect {
        /// `host:port`.
        address: String,
        /// What went wrong.
        message: String,
    },
    /// The server refused the credentials. Not retryable.
    #[error("SSH authentication as `{username}` on {address} failed: {message}")]
    AuthFailed {
        /// `host:port`.
        address: String,
        /// The login user.
        username: String,
        /// Which method was refused and what the server still offers.
        message: String,
    },
    /// The server presented a host key other than the pinned (or previously accepted) one:
    /// possibly a man-in-the-middle, or a reinstalled server whose new key must be registered.
    /// Nothing was sent to the server. Not retryable.
    #[error(
        "host key mismatch for SSH server {address}: expected {expected}, the server presented {presented}; refusing to connect"
    )]
    HostKeyMismatch {
        /// `host:port`.
        address: String,
        /// Fingerprint (`SHA256:…`) of the key that was expected.
        expected: String,
        /// Fingerprint of the key the server presented.
        presented: String,
    },
    /// The server definition cannot be used (unreadable private key, wrong passphrase, invalid
    /// pinned host key, `strict` policy without a pinned key, …). Not retryable.
    #[error("invalid SSH server definition: {reason}")]
    InvalidTarget {
        /// What is wrong.
        reason: String,
    },
    /// Recent connection attempts to this server all failed: the circuit breaker fails runs
    /// fast until its cool-down has passed and a probe connection succeeds. Retryable.
    #[error(
        "SSH server {address} is unreachable ({failures} consecutive connection failures, last: {last_error}); circuit open, next attempt in {retry_in:?}"
    )]
    CircuitOpen {
        /// `host:port`.
        address: String,
        /// Consecutive connection failures that opened the circuit.
        failures: u32,
        /// The last connection error.
        last_error: String,
        /// Time until a probe is allowed (zero while another run is probing).
        retry_in: Duration,
    },
    /// The connection was established but the run could not be carried out over it: a channel
    /// or SFTP operation failed, or the connection was lost during the run. Retryable.
    #[error("SSH session with {address} failed: {message}")]
    Session {
        /// `host:port`.
        address: String,
        /// What went wrong.
        message: String,
    },
}

impl SshError {
    /// Whether another attempt may succeed: true for DNS, refused and failed connections, an
    /// open circuit and session failures; false for authentication failures, host key
    /// mismatches and invalid server definitions.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            SshError::AuthFailed { .. }
                | SshError::HostKeyMismatch { .. }
                | SshError::InvalidTarget { .. }
        )
    }

    /// Whether this failure means the server could not be reached (what the circuit breaker
    /// counts): DNS, refused and failed connections.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            SshError::Dns { .. } | SshError::ConnectionRefused { .. } | SshError::Connect { .. }
        )
    }

    pub(crate) fn invalid_target(reason: impl Into<String>) -> Self {
        SshError::InvalidTarget {
            reason: reason.into(),
        }
    }

    pub(crate) fn session(address: &str, message: impl Into<String>) -> Self {
        SshError::Session {
            address: address.to_owned(),
            message: message.into(),
        }
    }
}
