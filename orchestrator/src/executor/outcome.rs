//! How a run ended: [`RunOutcome`], [`ExecError`], [`ErrorKind`] and [`RunResult`].

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Who is at fault when a run did not succeed.
///
/// The distinction drives retries and what the job record shows: an infrastructure error says
/// nothing about the script and is usually worth retrying, a script error is the job's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The run could not be started or supervised: missing interpreter, bad working directory,
    /// spawn error, unreachable HTTP endpoint, local I/O failure.
    Infrastructure,
    /// The run started and failed: non-zero exit, killed by a signal, killed for exceeding its
    /// memory limit, HTTP status ≥ 400, or an invalid job definition (missing script, empty
    /// argv, malformed URL).
    Script,
    /// The run exceeded its timeout and was killed.
    Timeout,
    /// The run was cancelled and killed.
    Cancelled,
}

impl ErrorKind {
    /// Lowercase name (`infrastructure`, `script`, `timeout`, `cancelled`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Infrastructure => "infrastructure",
            ErrorKind::Script => "script",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a run failed, other than by simply exiting non-zero.
///
/// A plain non-zero exit or death by signal is *not* an `ExecError`: it is reported through
/// [`RunOutcome::exit_code`] / [`RunOutcome::signal`] and classified as a script failure.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The run could not be started (missing interpreter, bad working directory, exec of a
    /// program that does not exist, …). Detected at spawn time or within the startup window.
    #[error("failed to start: {reason}")]
    StartFailed {
        /// Human-readable cause, including the program or path involved.
        reason: String,
    },
    /// The run exited non-zero within its startup window although its program ran (see
    /// [`startup`](super::startup)): a start failure that is the script's fault (a syntax
    /// error, a command missing inside the script, an immediate `exit 1`).
    #[error("failed to start: {reason}")]
    EarlyExit {
        /// The exit code.
        code: i32,
        /// What happened, with the end of its stderr.
        reason: String,
    },
    /// The job definition cannot be run (no script, empty argv, invalid method or URL, …).
    #[error("invalid run spec: {reason}")]
    InvalidSpec {
        /// What is wrong.
        reason: String,
    },
    /// An `http` run got a response with status ≥ 400.
    #[error("HTTP request failed with status {status}")]
    HttpStatus {
        /// The response status code.
        status: u16,
    },
    /// An `http` run could not get a response (DNS, connect, TLS, broken body, …).
    #[error("HTTP request error: {message}")]
    HttpTransport {
        /// Description from the HTTP client, with its causes.
        message: String,
    },
    /// An `http` run was not sent, or a redirect not followed, because its target is an
    /// address the worker's policy refuses (loopback, private, link-local…: see
    /// `baton_egress`), or because the run has no network.
    #[error("HTTP request refused: {reason}")]
    HttpRefused {
        /// The address and why it is refused, or the missing network.
        reason: String,
    },
    /// A local I/O operation needed to run or supervise the process failed.
    #[error("{context}: {source}")]
    Io {
        /// What the executor was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The run exceeded its timeout and was killed.
    #[error("timed out after {after:?}")]
    TimedOut {
        /// The configured timeout.
        after: Duration,
    },
    /// The run was cancelled and killed.
    #[error("cancelled")]
    Cancelled,
    /// The run was killed by the kernel's out-of-memory killer because it used more memory
    /// than its limit (container executor: the engine reported `OOMKilled`). A script error:
    /// the run needs a higher memory limit or less memory.
    #[error("killed by the out-of-memory killer: the run exceeded its memory limit{}", limit_text(*limit_mib))]
    OutOfMemory {
        /// The memory limit of the run in MiB, when known.
        limit_mib: Option<u64>,
    },
    /// The SSH transport failed: the server could not be reached or refused us, or the session
    /// broke (see [`SshError`](super::ssh::SshError), whose `is_retryable` tells whether another
    /// attempt may help: authentication failures and host key mismatches are not retryable).
    #[error(transparent)]
    Ssh(super::ssh::SshError),
}

fn limit_text(limit_mib: Option<u64>) -> String {
    limit_mib
        .map(|m| format!(" of {m} MiB"))
        .unwrap_or_default()
}

impl ExecError {
    /// Classifies the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ExecError::StartFailed { .. }
            | ExecError::HttpTransport { .. }
            | ExecError::Io { .. }
            | ExecError::Ssh(_) => ErrorKind::Infrastructure,
            ExecError::InvalidSpec { .. }
            | ExecError::EarlyExit { .. }
            | ExecError::HttpStatus { .. }
            | ExecError::HttpRefused { .. }
            | ExecError::OutOfMemory { .. } => ErrorKind::Script,
            ExecError::TimedOut { .. } => ErrorKind::Timeout,
            ExecError::Cancelled => ErrorKind::Cancelled,
        }
    }

    /// The run failed to start (at spawn, or within its startup window): the job records
    /// `error.start_failure = true`.
    pub fn is_start_failure(&self) -> bool {
        matches!(
            self,
            ExecError::StartFailed { .. } | ExecError::EarlyExit { .. }
        )
    }

    /// Shorthand for [`ExecError::StartFailed`].
    pub fn start_failed(reason: impl Into<String>) -> Self {
        ExecError::StartFailed {
            reason: reason.into(),
        }
    }

    /// Shorthand for [`ExecError::InvalidSpec`].
    pub fn invalid_spec(reason: impl Into<String>) -> Self {
        ExecError::InvalidSpec {
            reason: reason.into(),
        }
    }

    /// Shorthand for [`ExecError::Io`].
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        ExecError::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}

/// The final state of a run, as reported by [`Executor::run`](super::Executor::run).
///
/// Use [`RunOutcome::result`] for the job-level verdict.
#[derive(Debug, Clone, Default)]
pub struct RunOutcome {
    /// Exit code of the main process, when it exited normally. `http` runs report `Some(0)`
    /// when the response status is below 400 and `None` otherwise.
    pub exit_code: Option<i32>,
    /// Signal that killed the main process (`exit_code` is then `None`).
    pub signal: Option<i32>,
    /// The run was killed because it exceeded its timeout.
    pub timed_out: bool,
    /// The run was killed because it was cancelled.
    pub cancelled: bool,
    /// Why the run failed, other than by a plain non-zero exit or signal.
    pub error: Option<ExecError>,
    /// Status of the response of an `http` run.
    pub http_status: Option<u16>,
    /// Process id of the main process, when there was one.
    pub pid: Option<u32>,
    /// Wall-clock time from the start of `run` to the end of output collection.
    pub duration: Duration,
    /// SSH executor, `accept_new` policy, server without a recorded host key: the key the
    /// server presented and this executor accepted (`"ssh-ed25519 AAAA…"`), for the worker to
    /// send to the API so it is pinned from then on. `None` otherwise.
    pub observed_host_key: Option<String>,
}

/// Job-level verdict of a [`RunOutcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    /// Exit code 0 (or HTTP status < 400) and no error.
    Succeeded,
    /// Anything else; the kind says whose fault it is (`Timeout` / `Cancelled` included).
    Failed(ErrorKind),
}

impl RunResult {
    /// The job status this verdict maps to: `succeeded`, `failed`, `timed_out` or `cancelled`.
    pub fn job_status(self) -> &'static str {
        match self {
            RunResult::Succeeded => "succeeded",
            RunResult::Failed(ErrorKind::Timeout) => "timed_out",
            RunResult::Failed(ErrorKind::Cancelled) => "cancelled",
            RunResult::Failed(_) => "failed",
        }
    }

    /// The error kind, when the run did not succeed.
    pub fn error_kind(self) -> Option<ErrorKind> {
        match self {
            RunResult::Succeeded => None,
            RunResult::Failed(kind) => Some(kind),
        }
    }
}

impl RunOutcome {
    /// An outcome that failed with `error` before or without a process.
    pub fn from_error(error: ExecError, duration: Duration) -> Self {
        RunOutcome {
            timed_out: matches!(error, ExecError::TimedOut { .. }),
            cancelled: matches!(error, ExecError::Cancelled),
            error: Some(error),
            duration,
            ..RunOutcome::default()
        }
    }

    /// The job-level verdict: succeeded iff the exit code is 0 and there is no error;
    /// otherwise cancellation, timeout, the error's kind, or a script failure, in that order.
    pub fn result(&self) -> RunResult {
        if self.cancelled {
            return RunResult::Failed(ErrorKind::Cancelled);
        }
        if self.timed_out {
            return RunResult::Failed(ErrorKind::Timeout);
        }
        if let Some(error) = &self.error {
            return RunResult::Failed(error.kind());
        }
        if self.exit_code == Some(0) {
            RunResult::Succeeded
        } else {
            RunResult::Failed(ErrorKind::Script)
        }
    }

    /// The run failed to start (see [`ExecError::is_start_failure`]); never for a cancelled
    /// or timed-out run.
    pub fn start_failure(&self) -> bool {
        !self.cancelled
            && !self.timed_out
            && self.error.as_ref().is_some_and(ExecError::is_start_failure)
    }

    /// True when [`RunOutcome::result`] is [`RunResult::Succeeded`].
    pub fn succeeded(&self) -> bool {
        self.result() == RunResult::Succeeded
    }

    /// A one-line human summary, suitable for a job record (`"exit code 3"`,
    /// `"killed by signal 9 (SIGKILL)"`, `"failed to start: …"`, …).
    pub fn summary(&self) -> String {
        if let Some(error) = &self.error {
            return error.to_string();
        }
        match (self.exit_code, self.signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
                Ok(s) => format!("killed by signal {sig} ({})", s.as_str()),
                Err(_) => format!("killed by signal {sig}"),
            },
            (None, None) => "no exit status".to_owned(),
        }
    }
}
