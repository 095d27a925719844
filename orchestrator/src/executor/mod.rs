//! The execution engine: run a command or script, stream its output as events, cancel it,
//! time it out.
//!
//! This module is usable on its own, without the rest of Baton (no database, no API, no gRPC).
//! An [`Executor`] takes a [`RunSpec`] (what to run and how), a channel for [`ExecEvent`]s
//! (start, output lines, progress) and a [`CancellationToken`], and resolves to a
//! [`RunOutcome`] (exit code or signal, timeout / cancel flags, error, duration).
//! [`RunOutcome::result`] turns that into the job-level verdict: succeeded, or failed with an
//! [`ErrorKind`] (script, infrastructure, timeout, cancelled).
//!
//! ```
//! use baton_worker::executor::{Executor, LocalExecutor, RunSpec, Runtime, run_collect};
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let executor = LocalExecutor::default();
//! let spec = RunSpec::script(Runtime::Sh, "echo hello; echo PROGRESS: 50; exit 3");
//! let (outcome, events) = run_collect(&executor, spec, CancellationToken::new()).await;
//! assert_eq!(outcome.exit_code, Some(3));
//! assert!(!outcome.succeeded());
//! assert!(events.len() >= 4); // Started, "hello", "PROGRESS: 50", Progress(50)
//! # }
//! ```
//!
//! # Runtimes
//!
//! * `bash`, `sh`, `python`, `node`: [`RunSpec::content`] is written to a private temporary
//!   file and run by the interpreter.
//! * `exec`: [`RunSpec::command`] is an argv executed directly, without a shell.
//! * `http`: [`RunSpec::request`] is sent by the executor itself (no process); the response
//!   body is streamed as stdout lines, a status ≥ 400 fails the run as a script error, a
//!   request that gets no response (DNS, connect, TLS) is an infrastructure error.
//!
//! # Contract shared by all executors
//!
//! * **Events.** [`ExecEvent::Started`] comes first (once the process exists), then the output
//!   as [`ExecEvent::Lines`] (or [`ExecEvent::Line`]s) as it is produced — not at the end. Order is preserved within a
//!   stream; stdout and stderr are read concurrently, so their interleaving is only
//!   approximately chronological. Lines are split on `\n` (a trailing `\r` is dropped), capped
//!   at a maximum length (longer lines are emitted in pieces, see
//!   [`output::DEFAULT_MAX_LINE_BYTES`]), and invalid UTF-8 is replaced lossily. A final line
//!   without a newline is still emitted. A stdout line `PROGRESS: N` (0–100, whitespace
//!   allowed) is emitted as a line *and* as [`ExecEvent::Progress`].
//! * **Back-pressure.** When the events channel is full the executor waits: lines are never
//!   dropped, and a process that writes faster than the consumer reads is slowed down by its
//!   pipe. The consumer must therefore keep receiving (or drop the receiver: the run then goes
//!   on and its output is discarded).
//! * **Timeout and cancellation.** When [`RunSpec::timeout`] expires or the token is cancelled,
//!   the whole process tree gets `SIGTERM`, then `SIGKILL` after [`RunSpec::kill_grace`]; the
//!   outcome has `timed_out` / `cancelled` set and the matching [`ExecError`]. Cancellation is
//!   acted on immediately (the signal is sent as soon as the token fires).
//! * **Exit.** A normal exit reports [`RunOutcome::exit_code`]; death by a signal reports
//!   [`RunOutcome::signal`] with no exit code. Background processes the run left behind in its
//!   process group are killed when the main process exits.
//! * **Start failures.** A run that could not be started (missing interpreter, bad working
//!   directory, unknown program) fails with [`ExecError::StartFailed`], an infrastructure
//!   error, distinct from "ran and failed" (a non-zero exit, which is the script's fault).
//! * **Object safety.** [`Executor`] is object-safe; workers hold `Arc<dyn Executor>`.
//!
//! Implementations: [`LocalExecutor`] (processes on this host; see [`local`] for the details
//! and limits: children that leave the process group, e.g. via `setsid`, are not killed).

pub mod container;
pub mod http;
pub mod line_block;
pub mod local;
mod outcome;
pub mod output;
mod process;
mod spec;
pub mod ssh;
pub mod startup;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use container::{ContainerConfig, ContainerExecutor, PullPolicy, ResourceLimits, SpareStats};
pub use line_block::LineBlock;
pub use local::{LocalConfig, LocalExecutor};
pub use outcome::{ErrorKind, ExecError, RunOutcome, RunResult};
pub use spec::{
    DEFAULT_KILL_GRACE, DEFAULT_TIMEOUT, HttpRequestSpec, RunSpec, Runtime, UnknownRuntime,
};

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// Standard output (also the body of an `http` response).
    Stdout,
    /// Standard error.
    Stderr,
}

impl OutputStream {
    /// `"stdout"` or `"stderr"`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// Something that happened during a run, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The run started; `pid` is the main process id when there is a local process.
    Started {
        /// Process id of the main process (`None` for `http` and remote runs).
        pid: Option<u32>,
    },
    /// One line of output, without its line terminator.
    Line {
        /// The stream it was written to.
        stream: OutputStream,
        /// The text (lossily decoded UTF-8, at most the line cap in bytes).
        text: String,
    },
    /// Lines read together from one stream (what a flood of output comes as), in order.
    Lines {
        /// The stream they were written to.
        stream: OutputStream,
        /// The texts, as in [`ExecEvent::Line`].
        lines: LineBlock,
    },
    /// The run reported its progress (0–100) with a `PROGRESS: N` line.
    Progress(u8),
}

impl ExecEvent {
    /// This event as single-line events: a [`ExecEvent::Lines`] becomes one
    /// [`ExecEvent::Line`] per line, anything else stays as it is. For consumers that look at
    /// lines one by one (tests, mostly).
    pub fn into_single_lines(self) -> Vec<ExecEvent> {
        match self {
            ExecEvent::Lines { stream, lines } => lines
                .iter()
                .map(|text| ExecEvent::Line {
                    stream,
                    text: text.to_owned(),
                })
                .collect(),
            other => vec![other],
        }
    }
}

/// Runs one [`RunSpec`] somewhere (this host, a container, an SSH server).
///
/// Object-safe: hold it as `Arc<dyn Executor>`. See the [module documentation](self) for the
/// contract every implementation keeps.
pub trait Executor: Send + Sync {
    /// Short name, e.g. `"local"`, `"container"`, `"ssh"` (advertised to the API).
    fn name(&self) -> &'static str;

    /// Whether this executor can run `runtime`.
    fn supports(&self, runtime: Runtime) -> bool {
        let _ = runtime;
        true
    }

    /// Runs `spec` to the end, sending events to `events` (waiting when the channel is full),
    /// and stopping the run when `cancel` fires. Never panics on run failures: every failure
    /// is described by the returned [`RunOutcome`].
    fn run(
        &self,
        spec: RunSpec,
        events: mpsc::Sender<ExecEvent>,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, RunOutcome>;
}

/// Runs `spec` and collects all its events in memory (convenient for small runs and tests),
/// line blocks as single [`ExecEvent::Line`]s.
pub async fn run_collect(
    executor: &dyn Executor,
    spec: RunSpec,
    cancel: CancellationToken,
) -> (RunOutcome, Vec<ExecEvent>) {
    let (tx, mut rx) = mpsc::channel(1024);
    let run = executor.run(spec, tx, cancel);
    let collect = async {
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            events.extend(event.into_single_lines());
        }
        events
    };
    tokio::join!(run, collect)
}

/// Sleeps until `deadline`, or forever when there is none (a timeout too large to represent).
pub(crate) async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
