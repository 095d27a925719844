#![forbid(unsafe_code)]
//! Baton's worker (`baton-worker`).
//!
//! The worker holds a gRPC stream to an api replica, receives jobs, runs them with an executor
//! and reports logs, progress and results. Its [`executor`] module is the reusable execution
//! engine (run a command or script, stream its output as events, cancel it, time it out) and
//! can be used without the rest of Baton.
//!
//! Run a worker with [`run`] (or [`Worker::new`] + [`Worker::run`]) and a [`WorkerConfig`];
//! the `baton-worker` binary is that plus signal handling.
//!
//! # Architecture
//!
//! ```text
//!                 ┌──────────────── Shared (one Mutex<State>) ───────────────┐
//!  api ◄── gRPC ──┤ session task   jobs: job id → entry (lease, cancel token, │
//!  stream         │  Hello/Welcome        unacked log batches, Finished)     │
//!                 │  dispatch       running: processes alive (slots)         │
//!                 │  heartbeats     session: the current outbound queue      │
//!                 └──────▲──────────────────────────────────▲────────────────┘
//!                        │ Assignment → spawn               │ batches, Started, Progress,
//!                        ▼                                  │ Finished
//!                 job task (one per run) ◄── ExecEvent ── Executor (local, container, ssh)
//! ```
//!
//! * **Session** (`session` module). One long-lived `Session` stream at a time. The worker
//!   queues `Hello` (its id — [`WorkerConfig::worker_id`], else a UUIDv7 made once per
//!   [`Worker`] —, name, labels, executors, slots, and the jobs it still holds), waits for
//!   `Welcome`, then dispatches the api's messages and sends a `Heartbeat` (every held job,
//!   free slots) every `heartbeat_interval_ms`. When the stream breaks, it reconnects forever with exponential
//!   backoff and full jitter (100 ms doubling to a 10 s cap), logging each failed attempt once
//!   at `warn`.
//! * **One outbound queue per session.** Everything for the api goes through the state:
//!   a job's task records what must survive a disconnection (log batches until `LogAck`,
//!   `Finished` until `FinishedAck`) in the job's entry and, when a session is attached, queues
//!   the message on that session's unbounded queue. Job tasks therefore never wait on the
//!   network: with no session they keep running and buffering. On `Welcome` the state, under
//!   its lock, drops the jobs the api reports lost (`held = false`) or already recorded
//!   (`finished = true`), re-sends `Started`, the log lines after `stored_seq` and any pending
//!   `Finished`, and only then attaches the new queue — so re-sent lines always precede new
//!   ones.
//! * **Jobs** (`job` module). An `Assignment`'s `spec_json` (the event snapshot) becomes a
//!   [`executor::RunSpec`]; the per-run directory `$BATON_DIR` is prepared as
//!   `docs/helpers.md` specifies (`input.json`, `event.json` from the context's `"event"`,
//!   `vars/KEY` from its `"variables"`), next to the runtime helpers, which are embedded in
//!   the binary and written once per worker to a private temporary directory. Output lines
//!   are numbered 1, 2, 3, …, encoded into a chunk (`baton_proto::logchunk`) and sent in
//!   `LogBatch`es closed when they reach a size or a
//!   number of lines, or 20 ms after their first line ([`logbook::BatchLimits`]). A job with
//!   more than
//!   [`WorkerConfig::max_unacked_log_bytes`] unacknowledged stops reading its executor's
//!   events until acknowledgements arrive: the back-pressure reaches the process through its
//!   pipe. At the end `out/` is collected (output JSON within
//!   [`WorkerConfig::max_output_bytes`], condition, variables) into `Finished`, and the run
//!   directory is removed. A job holds a slot until its process has ended.
//! * **Errors.** The executor's verdict maps to the protocol's `ErrorKind`: script,
//!   infrastructure and timeout failures are retryable (except ssh authentication and host
//!   key failures); cancellations, invalid outputs and invalid definitions are not. A job
//!   this worker cannot run (executor not offered, unknown runtime, draining) is finished at
//!   once as an infrastructure error.
//! * **Cancel / LeaseLost.** `Cancel` fires the job's cancellation token (the executor kills
//!   the process tree and the job reports `CANCELLED`). `LeaseLost` also removes the job's
//!   entry: its task notices, discards the rest of the run and sends nothing more.
//! * **Shutdown** ([`Worker::run`]): `Drain` is sent (and again after any reconnect), new
//!   assignments are finished at once as "worker draining" (retryable), running jobs get
//!   [`WorkerConfig::drain_timeout`] to finish, then are cancelled; the worker waits (at most
//!   10 s) for their completions to be acknowledged and returns.
//! * **Executors** ([`executors_for`]): `ssh` always (the server comes in the assignment's
//!   `server_json`; a host key accepted on first use is reported as `HostKeySeen`),
//!   `container` when a Docker engine answers at start (its reaper removes this worker id's
//!   orphaned containers at start and every 5 minutes), `local` with
//!   [`WorkerConfig::allow_local`].
//!
//! Every job's work runs in a `tracing` span `job` with `job.id`, `event.id` and `attempt`.

pub mod config;
pub mod executor;
mod job;
pub mod logbook;
mod metrics;
pub mod rundir;
mod secret_refs;
mod session;
mod worker;

pub use config::{Labels, WorkerConfig};
pub use session::{BACKOFF_BASE, BACKOFF_CAP, ProtocolRefused, backoff_delay};
pub use worker::{Worker, executors_for, run};

/// Exit status of a worker process whose api refused its protocol version (`EX_CONFIG`):
/// restarting cannot help until one side is upgraded (systemd: `RestartPreventExitStatus=78`).
pub const EXIT_REFUSED: u8 = 78;

/// The exit status for how [`run`] ended, after printing the error (if any) on stderr:
/// success, [`EXIT_REFUSED`] when the api refused this worker's protocol version, else 1.
pub fn exit_status(program: &str, result: &anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ProtocolRefused>().is_some() => {
            eprintln!("{program}: refused by the api: {e:#}");
            std::process::ExitCode::from(EXIT_REFUSED)
        }
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
