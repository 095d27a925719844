//! One job run: from an `Assignment` to a `Finished`.
//!
//! [`plan`] turns an assignment into a [`RunSpec`] and the files of the run directory (or a
//! [`Failure`] when the job cannot be run here); [`run`] is the job's task: it prepares
//! `$BATON_DIR`, runs the executor, turns its events into numbered, batched log lines and
//! progress reports (holding back when too much is unacknowledged), collects `out/`, and hands
//! the `Finished` message to the worker's state, which keeps it until it is acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use baton_proto::v1::{Assignment, ErrorKind as WireKind, Finished, Stream as WireStream};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::executor::ssh::SshTarget;
use crate::executor::{
    DEFAULT_TIMEOUT, ErrorKind, ExecError, ExecEvent, Executor, HttpRequestSpec, OutputStream,
    ResourceLimits, RunOutcome, RunResult, RunSpec, Runtime,
};
use crate::logbook::{BatchLimits, Batcher};
use crate::rundir::{self, Collected, RunFiles};
use crate::worker::{JobKey, Shared};

/// Capacity of the channel between an executor and its job task (events: mostly blocks of
/// lines, one per read of at most 64 KiB, or single lines). Small, so that a job held back by
/// unacknowledged logs has at most a few MiB waiting here.
const EVENTS_CAPACITY: usize = 64;

/// Why a job ends without (or before) running: the error reported in its `Finished`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub kind: WireKind,
    pub message: String,
    pub retryable: bool,
}

impl Failure {
    pub(crate) fn infrastructure(message: impl Into<String>, retryable: bool) -> Self {
        Failure {
            kind: WireKind::Infrastructure,
            message: message.into(),
            retryable,
        }
    }

    /// A `Finished` for a job that did not run.
    pub(crate) fn finished(&self, job_id: &str, lease_token: i64, last_seq: i64) -> Finished {
        Finished {
            job_id: job_id.to_owned(),
            lease_token,
            last_seq,
            error_kind: self.kind as i32,
            error_message: self.message.clone(),
            retryable: self.retryable,
            ..Finished::default()
        }
    }
}

/// What an assignment turned into: a run to start, or a job already done without one.
pub(crate) enum Planned {
    Run(Box<Plan>),
    /// A `noop` job: nothing to start; it succeeds at once, its output being its input.
    Done(Finished),
}

/// What the worker needs to run a job.
pub(crate) struct Plan {
    pub executor: Arc<dyn Executor>,
    pub spec: RunSpec,
    pub files: RunFiles,
    /// The job's last stored log line (earlier attempts'): this run's lines follow it.
    pub log_seq_base: i64,
    pub attempt: i32,
    /// The job's trace context as the worker hands it on (its run span's, or the
    /// assignment's when no traces are exported): the script's `TRACEPARENT` falls back to it.
    pub traceparent: Option<String>,
}

/// The part of the event snapshot (`Assignment.spec_json`) the worker uses; other fields are
/// ignored.
#[derive(Debug, Deserialize)]
struct EventSnapshot {
    #[serde(default)]
    name: Option<String>,
    runtime: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    request: Option<HttpRequestSpec>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    timeout_seconds: Option<i64>,
    #[serde(default)]
    executor: Option<String>,
    #[serde(default)]
    server_id: Option<Value>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    network: Option<bool>,
    #[serde(default)]
    limits: Option<ResourceLimits>,
    /// Absent in snapshots of jobs queued before the field existed: the default applies.
    #[serde(default)]
    startup_window_seconds: Option<u32>,
}

/// The startup window of a job whose snapshot names none (the events' default).
const DEFAULT_STARTUP_WINDOW: Duration = Duration::from_secs(5);

/// Resolves an assignment into a plan: parses the event snapshot and the context, picks the
/// executor. Errors are what the job's `Finished` reports.
pub(crate) fn plan(
    a: &Assignment,
    executors: &HashMap<&'static str, Arc<dyn Executor>>,
) -> Result<Planned, Failure> {
    let mut de = serde_json::Deserializer::from_str(&a.spec_json);
    let snapshot: EventSnapshot = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!(" at `{path}`")
        };
        Failure::infrastructure(
            format!("the job's event definition is invalid{at}: {}", e.inner()),
            false,
        )
    })?;
    if snapshot.runtime == "noop" {
        return Ok(Planned::Done(noop_finished(a)));
    }
    // An unknown runtime can be a newer api than this worker: another worker may know it.
    let runtime: Runtime =
        snapshot
            .runtime
            .parse()
            .map_err(|e: crate::executor::UnknownRuntime| {
                Failure::infrastructure(format!("this worker cannot run the job: {e}"), true)
            })?;
    let executor_name = match (&snapshot.executor, &snapshot.server_id) {
        (Some(name), _) => name.clone(),
        (None, Some(id)) if !id.is_null() => "ssh".to_owned(),
        (None, _) => "container".to_owned(),
    };
    let executor = executors.get(executor_name.as_str()).ok_or_else(|| {
        let mut offered: Vec<&str> = executors.keys().copied().collect();
        offered.sort_unstable();
        Failure::infrastructure(
            format!(
                "this worker does not offer the `{executor_name}` executor (it offers: {})",
                offered.join(", ")
            ),
            true,
        )
    })?;
    if !executor.supports(runtime) {
        return Err(Failure::infrastructure(
            format!("the {executor_name} executor cannot run the {runtime} runtime"),
            true,
        ));
    }
    let job_uuid = Uuid::parse_str(&a.job_id).map_err(|_| {
        Failure::infrastructure(format!("job id `{}` is not a UUID", a.job_id), false)
    })?;

    let context: Value = if a.context_json.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_str(&a.context_json).map_err(|e| {
            Failure::infrastructure(format!("the job's context is not valid JSON: {e}"), false)
        })?
    };

    let timeout = match snapshot.timeout_seconds {
        Some(s) if s > 0 => Duration::from_secs(s.unsigned_abs()),
        _ => DEFAULT_TIMEOUT,
    };
    let ssh = server_target(&a.server_json)?;
    if executor_name == "ssh" && ssh.is_none() {
        return Err(Failure::infrastructure(
            "the job runs on the ssh executor but its assignment names no server",
            false,
        ));
    }
    // `{{secret.NAME}}` in env and header values: substituted here, from the variables the
    // event can read; a reference to any other fails the job (not retried: it would again).
    let readable = context.get("variables").and_then(Value::as_object);
    let unresolvable = |e: String| {
        Failure::infrastructure(
            format!("{e} (a secret reference names a global variable or one of this event's own)"),
            false,
        )
    };
    let env = crate::secret_refs::resolve_values("env", snapshot.env.unwrap_or_default(), readable)
        .map_err(unresolvable)?;
    let request = match snapshot.request {
        Some(mut request) => {
            request.headers = crate::secret_refs::resolve_values(
                "request.headers",
                std::mem::take(&mut request.headers),
                readable,
            )
            .map_err(unresolvable)?;
            Some(request)
        }
        None => None,
    };
    let spec = RunSpec {
        content: snapshot.content,
        command: snapshot.command,
        request,
        env,
        image: snapshot.image.filter(|i| !i.trim().is_empty()),
        network: snapshot.network.unwrap_or(false),
        limits: snapshot.limits,
        ssh,
        startup_window: Some(
            snapshot
                .startup_window_seconds
                .map_or(DEFAULT_STARTUP_WINDOW, |s| {
                    Duration::from_secs(u64::from(s))
                }),
        ),
        ..RunSpec::script(runtime, "")
            .with_job_id(job_uuid)
            .with_timeout(timeout)
    };

    let event = event_json(
        a,
        snapshot.name.as_deref(),
        runtime,
        &executor_name,
        &context,
    );
    let variables = context
        .get("variables")
        .and_then(Value::as_object)
        .map(|vars| {
            vars.iter()
                .filter_map(|(k, v)| {
                    let bytes = match v {
                        Value::Null => return None,
                        Value::String(s) => s.clone().into_bytes(),
                        other => other.to_string().into_bytes(),
                    };
                    Some((k.clone(), bytes))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Planned::Run(Box::new(Plan {
        executor: executor.clone(),
        spec,
        files: RunFiles {
            input_json: a.input_json.clone(),
            event,
            variables,
        },
        log_seq_base: a.log_seq_base.max(0),
        traceparent: None,
        attempt: a.attempt,
    })))
}

/// The `Finished` of a `noop` job: succeeded, its output the job's input (JSON from the api,
/// passed on untouched; an absent input is no output).
fn noop_finished(a: &Assignment) -> Finished {
    Finished {
        job_id: a.job_id.clone(),
        lease_token: a.lease_token,
        exit_code: Some(0),
        output_json: a.input_json.trim().to_owned(),
        ..Finished::default()
    }
}

/// The server of an ssh job (`Assignment.server_json`; empty for other executors). Errors name
/// the field but never quote the JSON, which carries credentials.
fn server_target(server_json: &str) -> Result<Option<SshTarget>, Failure> {
    if server_json.trim().is_empty() {
        return Ok(None);
    }
    let mut de = serde_json::Deserializer::from_str(server_json);
    serde_path_to_error::deserialize(&mut de)
        .map(Some)
        .map_err(|e| {
            let path = e.path().to_string();
            let inner = e.inner().to_string();
            // "missing field `x`" is safe to show; other messages may quote a value.
            let detail = if inner.starts_with("missing field") {
                format!(": {inner}")
            } else {
                String::new()
            };
            Failure::infrastructure(
                format!("the job's server definition is invalid at `{path}`{detail}"),
                false,
            )
        })
}

/// `event.json`: the documented fields from the assignment, overridden by the context's
/// `"event"` object (which may carry more).
fn event_json(
    a: &Assignment,
    name: Option<&str>,
    runtime: Runtime,
    executor: &str,
    context: &Value,
) -> Value {
    let opt = |s: &str| {
        if s.is_empty() {
            Value::Null
        } else {
            Value::String(s.to_owned())
        }
    };
    let mut event = Map::new();
    event.insert("job_id".into(), opt(&a.job_id));
    event.insert("event_id".into(), opt(&a.event_id));
    event.insert("event_name".into(), name.map_or(Value::Null, |n| n.into()));
    event.insert("attempt".into(), a.attempt.into());
    event.insert("parent_job_id".into(), opt(&a.parent_job_id));
    event.insert("root_job_id".into(), opt(&a.root_job_id));
    event.insert("runtime".into(), runtime.as_str().into());
    event.insert("executor".into(), executor.into());
    if let Some(given) = context.get("event").and_then(Value::as_object) {
        for (k, v) in given {
            // A null from the api does not hide what the worker knows (e.g. the executor).
            if v.is_null() && event.get(k).is_some_and(|known| !known.is_null()) {
                continue;
            }
            event.insert(k.clone(), v.clone());
        }
    }
    Value::Object(event)
}

/// How a run ended, in the protocol's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub kind: WireKind,
    pub message: String,
    pub retryable: bool,
    /// Notes for the job's log (`STREAM_SYSTEM`), e.g. an output ignored because the run had
    /// already failed.
    pub notes: Vec<String>,
}

/// Combines the executor's outcome with what was collected from `out/`. A run that failed for
/// its own reason keeps it; a run that succeeded but left an invalid output fails with kind
/// OUTPUT.
pub(crate) fn verdict(outcome: &RunOutcome, collected: &Collected) -> Verdict {
    match outcome.result() {
        RunResult::Succeeded if collected.problems.is_empty() => Verdict {
            kind: WireKind::Unspecified,
            message: String::new(),
            retryable: false,
            notes: Vec::new(),
        },
        RunResult::Succeeded => Verdict {
            kind: WireKind::Output,
            message: collected.problems.join("; "),
            retryable: false,
            notes: Vec::new(),
        },
        RunResult::Failed(kind) => {
            let (kind, retryable) = match kind {
                ErrorKind::Script => (
                    WireKind::Script,
                    // An invalid definition fails the same way every time.
                    !matches!(outcome.error, Some(ExecError::InvalidSpec { .. })),
                ),
                // A server that refuses us (authentication, host key) refuses every attempt.
                ErrorKind::Infrastructure => (
                    WireKind::Infrastructure,
                    !matches!(&outcome.error, Some(ExecError::Ssh(e)) if !e.is_retryable()),
                ),
                ErrorKind::Timeout => (WireKind::Timeout, true),
                ErrorKind::Cancelled => (WireKind::Cancelled, false),
            };
            Verdict {
                kind,
                message: outcome.summary(),
                retryable,
                notes: collected
                    .problems
                    .iter()
                    .map(|p| format!("baton: output not collected: {p}"))
                    .collect(),
            }
        }
    }
}

/// Builds the `Finished` of a run that ran.
pub(crate) fn finished_message(
    key: &JobKey,
    last_seq: i64,
    outcome: &RunOutcome,
    verdict: &Verdict,
    collected: Collected,
) -> Finished {
    Finished {
        job_id: key.job_id.clone(),
        lease_token: key.lease_token,
        last_seq,
        exit_code: outcome.exit_code,
        signal: outcome.signal,
        error_kind: verdict.kind as i32,
        error_message: verdict.message.clone(),
        retryable: verdict.retryable,
        output_json: collected.output_json.unwrap_or_default(),
        condition: collected.condition,
        variables: collected.variables.into_iter().collect(),
        start_failure: outcome.start_failure(),
        // Set from the job's entry when sent (`Shared::job_finished`).
        traceparent: String::new(),
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Releases the job's slot exactly once (when the run ended, or when the task ends early),
/// and reports the job as failed if its task ends without reporting anything (a bug must not
/// leave a job held, and its lease renewed, forever).
struct Guard<'a> {
    shared: &'a Shared,
    key: &'a JobKey,
    slot_held: bool,
    reported: bool,
}

impl Guard<'_> {
    fn release_slot(&mut self) {
        if std::mem::take(&mut self.slot_held) {
            self.shared.release_slot();
        }
    }

    fn finish(&mut self, finished: Finished) {
        self.reported = true;
        self.shared.job_finished(self.key, finished);
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.release_slot();
        if !self.reported {
            let failure = Failure::infrastructure("the worker's job task ended unexpectedly", true);
            self.shared.job_finished(
                self.key,
                failure.finished(&self.key.job_id, self.key.lease_token, 0),
            );
        }
    }
}

/// The job's task. Its slot was taken by the caller and is released here.
pub(crate) async fn run(
    shared: Arc<Shared>,
    key: JobKey,
    plan: Plan,
    cancel: CancellationToken,
    wake: Arc<Notify>,
) {
    let mut guard = Guard {
        shared: &shared,
        key: &key,
        slot_held: true,
        reported: false,
    };
    let Plan {
        executor,
        mut spec,
        files,
        log_seq_base,
        attempt,
        traceparent,
    } = plan;
    let dir = shared
        .files
        .runs_dir()
        .join(format!("{}-{}", key.job_id, key.lease_token));

    let prepared = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || rundir::prepare(&dir, &files))
            .instrument(tracing::info_span!("run.prepare"))
            .await
    };
    let prepared = match prepared {
        Ok(Ok(skipped)) => Ok(skipped),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let skipped = match prepared {
        Ok(skipped) => skipped,
        Err(reason) => {
            tracing::warn!(dir = %dir.display(), error = %reason, "cannot prepare the run directory");
            guard.release_slot();
            let failure = Failure::infrastructure(
                format!(
                    "cannot prepare the run directory {}: {reason}",
                    dir.display()
                ),
                true,
            );
            guard.finish(failure.finished(&key.job_id, key.lease_token, 0));
            remove_dir(dir).await;
            return;
        }
    };

    let mut batcher = Batcher::new(BatchLimits::default()).continuing_after(log_seq_base);
    let mut lost = false;
    let mut blocked = false;
    let limit = shared.config.max_unacked_log_bytes;

    // Hands a closed batch to the shared state (which sends it when connected).
    let flush = |chunk: crate::logbook::Chunk, lost: &mut bool, blocked: &mut bool| {
        if *lost {
            return;
        }
        match shared.job_logs(&key, chunk) {
            Some(unacked) => *blocked = unacked > limit,
            None => *lost = true,
        }
    };

    if log_seq_base > 0 {
        // The job's log already holds an earlier attempt's lines: show where this one starts.
        let note = format!("baton: attempt {attempt} starts");
        if let Some(lines) = batcher.push(WireStream::System, &note, now_ms(), Instant::now()) {
            flush(lines, &mut lost, &mut blocked);
        }
    }
    for k in skipped {
        let note = format!(
            "baton: variable `{}` was not given to the run: not a valid key",
            k.escape_debug()
        );
        if let Some(lines) = batcher.push(WireStream::System, &note, now_ms(), Instant::now()) {
            flush(lines, &mut lost, &mut blocked);
        }
    }

    let server_id = spec.ssh.as_ref().map(|t| t.server_id);
    spec.run_dir = Some(dir.clone());
    spec.helpers_dir = Some(shared.files.helpers_dir());
    let stop_at = Instant::now().checked_add(spec.timeout);
    let (events_tx, mut events) = mpsc::channel(EVENTS_CAPACITY);
    // The executor's run is a span of its own; the script's `TRACEPARENT` names it (or the
    // job's context when no traces are exported) so the script's own spans join the trace.
    let run_span = tracing::info_span!("executor.run", executor = executor.name(),
                                       runtime = %spec.runtime);
    if let Some(tp) = baton_telemetry::traceparent_of(&run_span).or(traceparent) {
        spec.env.insert("TRACEPARENT".into(), tp);
    }
    let run = executor
        .run(spec, events_tx, cancel.clone())
        .instrument(run_span);
    tokio::pin!(run);

    let mut outcome: Option<RunOutcome> = None;
    let mut events_open = true;
    let mut last_progress: Option<u8> = None;
    while outcome.is_none() || events_open {
        // Once the run is being stopped (cancel, timeout) its last lines are read whatever
        // the back-pressure: the executor cannot finish before they are.
        let stopping = cancel.is_cancelled() || stop_at.is_some_and(|t| Instant::now() >= t);
        let read = events_open && (lost || !blocked || stopping);
        let deadline = batcher.deadline();
        tokio::select! {
            ended = &mut run, if outcome.is_none() => {
                outcome = Some(ended);
                guard.release_slot();
            }
            event = events.recv(), if read => match event {
                None => events_open = false,
                Some(_) if lost => {}
                Some(ExecEvent::Started { pid }) => {
                    tracing::info!(pid, "run started");
                    if !shared.job_started(&key) {
                        lost = true;
                    }
                }
                Some(ExecEvent::Line { stream, text }) => {
                    let stream = match stream {
                        OutputStream::Stdout => WireStream::Stdout,
                        OutputStream::Stderr => WireStream::Stderr,
                    };
                    if let Some(lines) = batcher.push(stream, &text, now_ms(), Instant::now()) {
                        flush(lines, &mut lost, &mut blocked);
                    }
                }
                Some(ExecEvent::Lines { stream, lines }) => {
                    let stream = match stream {
                        OutputStream::Stdout => WireStream::Stdout,
                        OutputStream::Stderr => WireStream::Stderr,
                    };
                    // Lines read together share their time: one clock reading per block.
                    let (ts_ms, now) = (now_ms(), Instant::now());
                    for text in lines.iter() {
                        if let Some(lines) = batcher.push(stream, text, ts_ms, now) {
                            flush(lines, &mut lost, &mut blocked);
                        }
                    }
                }
                Some(ExecEvent::Progress(p)) => {
                    if last_progress != Some(p) {
                        last_progress = Some(p);
                        if !shared.job_progress(&key, p) {
                            lost = true;
                        }
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                if let Some(lines) = batcher.take() {
                    flush(lines, &mut lost, &mut blocked);
                }
            }
            _ = wake.notified(), if blocked && !lost => {
                match shared.job_unacked_bytes(&key) {
                    Some(unacked) => blocked = unacked > limit,
                    None => lost = true,
                }
            }
            _ = cancel.cancelled(), if blocked && !stopping => {}
            _ = tokio::time::sleep_until(stop_at.unwrap_or_else(Instant::now)), if blocked && !stopping && stop_at.is_some() => {}
        }
    }
    let Some(outcome) = outcome else {
        unreachable!("the loop ends with an outcome")
    };
    if lost {
        tracing::info!("run stopped: the lease was lost");
        guard.reported = true; // nothing more may be said about it
        remove_dir(dir).await;
        return;
    }

    if let (Some(server_id), Some(host_key)) = (server_id, &outcome.observed_host_key) {
        tracing::info!(server.id = %server_id, "reporting the host key seen on first use");
        shared.job_host_key_seen(&key, server_id, host_key);
    }

    let max_output = shared.config.max_output_bytes;
    let collected = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || rundir::collect(&dir, max_output))
            .await
            .unwrap_or_else(|e| Collected {
                problems: vec![format!("cannot collect the run's output: {e}")],
                ..Collected::default()
            })
    };
    let verdict = verdict(&outcome, &collected);
    for note in &verdict.notes {
        if let Some(lines) = batcher.push(WireStream::System, note, now_ms(), Instant::now()) {
            flush(lines, &mut lost, &mut blocked);
        }
    }
    if let Some(lines) = batcher.take() {
        flush(lines, &mut lost, &mut blocked);
    }
    let finished = finished_message(&key, batcher.last_seq(), &outcome, &verdict, collected);
    if verdict.kind == WireKind::Unspecified {
        tracing::info!(
            duration_ms = outcome.duration.as_millis() as u64,
            lines = batcher.last_seq(),
            "run succeeded"
        );
    } else {
        tracing::info!(
            duration_ms = outcome.duration.as_millis() as u64,
            lines = batcher.last_seq(),
            kind = verdict.kind.as_str_name(),
            error = %verdict.message,
            "run failed"
        );
    }
    if lost {
        guard.reported = true;
    } else {
        guard.finish(finished);
    }
    remove_dir(dir).await;
}

async fn remove_dir(dir: std::path::PathBuf) {
    let shown = dir.display().to_string();
    let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    })
    .await;
    match removed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(dir = %shown, error = %e, "cannot remove the run directory"),
        Err(e) => tracing::warn!(dir = %shown, error = %e, "cannot remove the run directory"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;
    use crate::executor::LocalExecutor;

    fn executors() -> HashMap<&'static str, Arc<dyn Executor>> {
        let local: Arc<dyn Executor> = Arc::new(LocalExecutor::default());
        HashMap::from([("local", local)])
    }

    fn assignment(spec: Value) -> Assignment {
        Assignment {
            job_id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
            lease_token: 3,
            event_id: "0190a1b2-0000-7000-8000-000000000001".into(),
            attempt: 2,
            spec_json: spec.to_string(),
            input_json: r#"{"n": 1}"#.into(),
            parent_job_id: String::new(),
            root_job_id: "0190a1b2-0000-7000-8000-000000000002".into(),
            context_json: serde_json::json!({
                "event": {"event_name": "from context", "extra": true, "executor": null},
                "variables": {"greeting": "hi", "num": 5, "gone": null}
            })
            .to_string(),
            ..Assignment::default()
        }
    }

    /// The plan of an assignment that must run.
    fn run_plan(a: &Assignment, executors: &HashMap<&'static str, Arc<dyn Executor>>) -> Plan {
        match plan(a, executors) {
            Ok(Planned::Run(plan)) => *plan,
            Ok(Planned::Done(f)) => panic!("done without running: {f:?}"),
            Err(f) => panic!("not planned: {f:?}"),
        }
    }

    #[test]
    fn a_noop_job_is_done_at_once_with_its_input_as_output() {
        let mut a = assignment(serde_json::json!({"runtime": "noop", "executor": "container"}));
        a.input_json = r#"{"n": 1}"#.into();
        // No executor needed, not even the one the event names.
        let Ok(Planned::Done(f)) = plan(&a, &executors()) else {
            panic!("a noop job must be done without a run");
        };
        assert_eq!(
            (f.job_id.as_str(), f.lease_token),
            (a.job_id.as_str(), a.lease_token)
        );
        assert_eq!(f.exit_code, Some(0));
        assert_eq!(f.error_kind, WireKind::Unspecified as i32);
        assert_eq!(f.output_json, r#"{"n": 1}"#);
    }

    #[test]
    fn plans_a_local_script() {
        let a = assignment(serde_json::json!({
            "id": "x", "name": "nightly", "runtime": "bash", "content": "echo hi",
            "executor": "local", "env": {"A": "1"}, "timeout_seconds": 7,
            "labels": {}, "some_future_field": [1, 2]
        }));
        let plan = run_plan(&a, &executors());
        assert_eq!(plan.executor.name(), "local");
        assert_eq!(plan.spec.runtime, Runtime::Bash);
        assert_eq!(plan.spec.content.as_deref(), Some("echo hi"));
        assert_eq!(plan.spec.timeout, Duration::from_secs(7));
        assert_eq!(plan.spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(plan.spec.job_id.to_string(), a.job_id);
        assert_eq!(plan.files.input_json, r#"{"n": 1}"#);
        let e = &plan.files.event;
        assert_eq!(e["job_id"], a.job_id.as_str());
        assert_eq!(e["attempt"], 2);
        assert_eq!(e["parent_job_id"], Value::Null);
        assert_eq!(e["event_name"], "from context");
        assert_eq!(e["extra"], true);
        assert_eq!(e["executor"], "local");
        assert_eq!(plan.files.variables.get("greeting").unwrap(), b"hi");
        assert_eq!(plan.files.variables.get("num").unwrap(), b"5");
        assert!(!plan.files.variables.contains_key("gone"));
    }

    #[test]
    fn maps_container_fields_and_the_server() {
        let container: Arc<dyn Executor> = Arc::new(LocalExecutor::default());
        let mut executors = executors();
        executors.insert("container", container.clone());
        executors.insert("ssh", container);
        let a = assignment(serde_json::json!({
            "runtime": "python", "content": "print(1)", "executor": "container",
            "image": "python:3.13-slim", "network": true, "limits": {"memory_mib": 256, "cpus": 0.5}
        }));
        let planned = run_plan(&a, &executors);
        assert_eq!(planned.spec.image.as_deref(), Some("python:3.13-slim"));
        assert!(planned.spec.network);
        let limits = planned.spec.limits.unwrap();
        assert_eq!(
            (limits.memory_mib, limits.cpus, limits.pids),
            (Some(256), Some(0.5), None)
        );
        assert!(planned.spec.ssh.is_none());

        let server_id = "0190a1b2-0000-7000-8000-00000000000a";
        let mut a = assignment(serde_json::json!({
            "runtime": "bash", "content": "true", "executor": "ssh", "server_id": server_id
        }));
        a.server_json = serde_json::json!({
            "server_id": server_id, "name": "web1", "host": "10.0.0.5", "port": 2222,
            "username": "deploy", "auth": {"password": "hunter2"},
            "host_key_policy": "strict", "host_key": "ssh-ed25519 AAAA", "max_concurrent": 2
        })
        .to_string();
        let plan_ssh = run_plan(&a, &executors);
        let target = plan_ssh.spec.ssh.unwrap();
        assert_eq!(target.server_id.to_string(), server_id);
        assert_eq!((target.host.as_str(), target.port), ("10.0.0.5", 2222));
        assert!(!plan_ssh.spec.network);

        a.server_json = serde_json::json!({"server_id": server_id, "host": 5, "username": "u",
            "auth": {"password": "hunter2"}})
        .to_string();
        let f = plan(&a, &executors).err().unwrap();
        assert!(!f.retryable);
        assert!(f.message.contains("at `host`"), "{}", f.message);
        a.server_json = String::new();
        let f = plan(&a, &executors).err().unwrap();
        assert!(f.message.contains("names no server"), "{}", f.message);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let f = plan(
            &assignment(serde_json::json!({"runtime": "bash", "content": "x"})),
            &executors(),
        )
        .err()
        .unwrap();
        assert_eq!(f.kind, WireKind::Infrastructure);
        assert!(f.retryable);
        assert_eq!(
            f.message,
            "this worker does not offer the `container` executor (it offers: local)"
        );
        let f = plan(
            &assignment(serde_json::json!({"runtime": "bash", "server_id": "s", "content": "x"})),
            &executors(),
        )
        .err()
        .unwrap();
        assert!(f.message.contains("`ssh`"), "{}", f.message);
        let f = plan(
            &assignment(serde_json::json!({"runtime": "cobol", "executor": "local"})),
            &executors(),
        )
        .err()
        .unwrap();
        assert!(
            f.message.contains("unknown runtime `cobol`"),
            "{}",
            f.message
        );
        let f = plan(
            &assignment(
                serde_json::json!({"runtime": "bash", "executor": "local", "env": {"A": 1}}),
            ),
            &executors(),
        )
        .err()
        .unwrap();
        assert!(f.message.contains("at `env.A`"), "{}", f.message);
        assert!(!f.retryable);
    }

    fn outcome(exit: Option<i32>, error: Option<ExecError>) -> RunOutcome {
        let mut o = match error {
            Some(e) => RunOutcome::from_error(e, Duration::ZERO),
            None => RunOutcome::default(),
        };
        o.exit_code = exit;
        o
    }

    #[test]
    fn verdicts() {
        let ok = Collected::default();
        let bad = Collected {
            problems: vec!["output is 2000000 bytes, over the 1048576-byte limit".into()],
            ..Collected::default()
        };
        let v = verdict(&outcome(Some(0), None), &ok);
        assert_eq!(
            (v.kind, v.retryable, v.message.as_str()),
            (WireKind::Unspecified, false, "")
        );
        let v = verdict(&outcome(Some(0), None), &bad);
        assert_eq!(v.kind, WireKind::Output);
        assert!(!v.retryable);
        assert_eq!(
            v.message,
            "output is 2000000 bytes, over the 1048576-byte limit"
        );
        // a run that failed for another reason keeps it; the output problem becomes a note
        let v = verdict(&outcome(Some(3), None), &bad);
        assert_eq!(
            (v.kind, v.retryable, v.message.as_str()),
            (WireKind::Script, true, "exit code 3")
        );
        assert_eq!(v.notes.len(), 1);
        let v = verdict(&outcome(None, Some(ExecError::Cancelled)), &ok);
        assert_eq!((v.kind, v.retryable), (WireKind::Cancelled, false));
        let v = verdict(
            &outcome(
                None,
                Some(ExecError::TimedOut {
                    after: Duration::from_secs(1),
                }),
            ),
            &ok,
        );
        assert_eq!((v.kind, v.retryable), (WireKind::Timeout, true));
        let v = verdict(
            &outcome(None, Some(ExecError::start_failed("no bash"))),
            &ok,
        );
        assert_eq!((v.kind, v.retryable), (WireKind::Infrastructure, true));
        assert_eq!(v.message, "failed to start: no bash");
        // a server that refuses us is not retried; one that is down is
        let mismatch = crate::executor::ssh::SshError::HostKeyMismatch {
            address: "h:22".into(),
            expected: "SHA256:a".into(),
            presented: "SHA256:b".into(),
        };
        let v = verdict(&outcome(None, Some(ExecError::Ssh(mismatch))), &ok);
        assert_eq!((v.kind, v.retryable), (WireKind::Infrastructure, false));
        let session = crate::executor::ssh::SshError::Session {
            address: "h:22".into(),
            message: "lost".into(),
        };
        let v = verdict(&outcome(None, Some(ExecError::Ssh(session))), &ok);
        assert_eq!((v.kind, v.retryable), (WireKind::Infrastructure, true));
        let v = verdict(
            &outcome(None, Some(ExecError::invalid_spec("no script"))),
            &ok,
        );
        assert_eq!((v.kind, v.retryable), (WireKind::Script, false));
    }
}
