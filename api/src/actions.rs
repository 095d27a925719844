//! What a finished job sets in motion, decided inside the transaction that records its end:
//! the script's variable writes are applied, its event's conditional actions are evaluated,
//! chained jobs are queued and messages are put in the outbox. Either all of it commits with
//! the completion or none of it does, so a crash can neither lose nor duplicate a chain step.

use std::collections::HashMap;
use tracing::Instrument as _;

use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::crypto::Vault;
use crate::model::action::{ActionSpec, Trigger};
use crate::model::event::VariablesWrite;
use crate::model::{Job, JobStatus};
use crate::storage::queue::{self, ChainLink, NewJob};
use crate::storage::variables::{self, StoredValue};
use crate::storage::{StorageError, actions, events};

/// The default limit on how deep a chain may go (a cycle stops there, with a note).
pub const DEFAULT_CHAIN_DEPTH_LIMIT: i32 = 20;

/// What evaluating actions needs besides the transaction: the vault (variable writes,
/// masking messages) and the chain depth limit (chained runs).
#[derive(Debug, Clone)]
pub struct Effects {
    pub vault: Vault,
    pub chain_depth_limit: i32,
}

impl Effects {
    pub fn from_state(state: &crate::AppState) -> Self {
        Self {
            vault: state.vault.clone(),
            chain_depth_limit: state.config.chain_depth_limit,
        }
    }
}

/// Checks that a template parses.
pub fn check_template(template: &str) -> Result<(), String> {
    let env = environment();
    env.template_from_str(template)
        .map(|_| ())
        .map_err(|e| format!("invalid template: {e}"))
}

/// How many steps (instructions) one render may take: plenty for any message, and a loop
/// that runs away stops here instead of holding the completion's transaction.
pub const TEMPLATE_FUEL: u64 = 100_000;
/// How deep includes, macros and nested blocks may go.
pub const TEMPLATE_RECURSION_LIMIT: usize = 32;
/// The most a rendered subject or body may be.
pub const MAX_RENDERED_BYTES: usize = 256 * 1024;

fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    // Messages are plain text or JSON-carried text, not HTML.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
    env
}

/// Collects rendered text and refuses to grow past [`MAX_RENDERED_BYTES`].
#[derive(Default)]
struct CappedOutput {
    text: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("the rendered text is too large"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders a template within the fuel, recursion and size limits; the error says which
/// limit was hit or what else went wrong.
pub fn try_render(template: &str, context: &Value) -> Result<String, String> {
    let env = environment();
    let compiled = env.template_from_str(template).map_err(|e| e.to_string())?;
    let mut out = CappedOutput::default();
    match compiled.render_captured_to(context, &mut out) {
        Ok(_) => Ok(String::from_utf8_lossy(&out.text).into_owned()),
        Err(_) if out.overflowed => Err(format!(
            "the rendered text exceeds {} KiB",
            MAX_RENDERED_BYTES / 1024
        )),
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(format!(
            "the template needs more than {TEMPLATE_FUEL} steps (a loop too long?)"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The text that stands in for a template that failed: the message still goes out and says
/// what is wrong.
fn failed_template_text(reason: &str) -> String {
    format!("[baton: the message template failed: {reason}]")
}

/// Renders a template; a template that fails at render time (or exceeds a limit) yields an
/// explanation instead, so the message still goes out and says what is wrong.
pub fn render(template: &str, context: &Value) -> String {
    try_render(template, context).unwrap_or_else(|e| failed_template_text(&e))
}

/// Does `trigger` fire for a job that ended so?
pub fn fires(trigger: Trigger, job: &Job) -> bool {
    match trigger {
        Trigger::OnSuccess => job.status == JobStatus::Succeeded,
        Trigger::OnFailure => matches!(job.status, JobStatus::Failed | JobStatus::TimedOut),
        Trigger::Always => job.status.is_terminal(),
        Trigger::OnCondition => job.condition == Some(true),
        // Fired when the job becomes stuck ([`after_stuck`]), never by its end.
        Trigger::OnStuck => false,
    }
}

/// When actions are evaluated: at a job's end, or when it becomes stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    End,
    Stuck,
}

impl Moment {
    fn fires(self, trigger: Trigger, job: &Job) -> bool {
        match self {
            Self::End => fires(trigger, job),
            Self::Stuck => trigger == Trigger::OnStuck,
        }
    }
}

/// The `on_stuck` actions of a job the reaper just flagged as stuck, in the caller's
/// transaction, which also holds the flag: they fire once per time it becomes stuck.
pub async fn after_stuck(
    conn: &mut PgConnection,
    vault: &Vault,
    chain_depth_limit: i32,
    job_id: Uuid,
) -> Result<(), StorageError> {
    evaluate(
        conn,
        vault,
        chain_depth_limit,
        job_id,
        &HashMap::new(),
        Moment::Stuck,
    )
    .await
}

/// Evaluates an action's CEL `if` over the finished job (see
/// [`crate::model::action::ACTION_IF_VARIABLES`]).
pub fn condition_holds(source: &str, job: &Job, context: &Value) -> Result<bool, String> {
    let null = Value::Null;
    let status = json!(job.status.as_str());
    let output = job.output.clone().unwrap_or(Value::Null);
    let condition = json!(job.condition);
    let exit_code = json!(job.exit_code);
    let error = json!(job.error);
    crate::workflow::expr::eval_bool(
        source,
        &[
            ("status", &status),
            ("output", &output),
            ("condition", &condition),
            ("exit_code", &exit_code),
            ("error", &error),
            ("input", &job.input),
            ("job", context.get("job").unwrap_or(&null)),
            ("event", context.get("event").unwrap_or(&null)),
        ],
    )
}

/// Everything a job that ended without a worker's report sets in motion (failed by the
/// reaper or the dispatcher, cancelled while queued): its actions, in the caller's
/// transaction, which also holds the transition.
pub async fn after_terminal(
    conn: &mut PgConnection,
    vault: &Vault,
    chain_depth_limit: i32,
    job_id: Uuid,
) -> Result<(), StorageError> {
    after_finish(conn, vault, chain_depth_limit, job_id, &HashMap::new()).await
}

/// Everything a finished job sets in motion, in the caller's transaction.
pub async fn after_finish(
    conn: &mut PgConnection,
    vault: &Vault,
    chain_depth_limit: i32,
    job_id: Uuid,
    variable_writes: &HashMap<String, String>,
) -> Result<(), StorageError> {
    evaluate(
        conn,
        vault,
        chain_depth_limit,
        job_id,
        variable_writes,
        Moment::End,
    )
    .await
}

async fn evaluate(
    conn: &mut PgConnection,
    vault: &Vault,
    chain_depth_limit: i32,
    job_id: Uuid,
    variable_writes: &HashMap<String, String>,
    moment: Moment,
) -> Result<(), StorageError> {
    let job = queue::get_job(&mut *conn, job_id).await?;
    if job.workflow_run_id.is_some() {
        // A workflow step's end moves its run on, in this same transaction.
        crate::workflow::engine::on_job_finished(&mut *conn, &job).await?;
    }
    // Most completions set nothing in motion: stop before loading the event.
    let actions = actions::list_actions(&mut *conn, job.event_id).await?;
    if actions.is_empty() && variable_writes.is_empty() {
        return Ok(());
    }
    let event = match events::get_event(&mut *conn, job.event_id).await {
        Ok(e) => e,
        Err(StorageError::EventNotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let output_failed = job
        .error
        .as_ref()
        .is_some_and(|e| e.kind == crate::model::job::ErrorKind::Output);
    if !output_failed {
        apply_variable_writes(
            conn,
            vault,
            &job,
            event.spec.variables_write,
            variable_writes,
        )
        .await?;
    }
    if actions.is_empty() {
        return Ok(());
    }
    let context = json!({"event": {"id": event.id, "name": event.spec.name, "description": event.spec.description},
                         "job": job});
    for action in actions {
        if !moment.fires(action.trigger, &job) {
            continue;
        }
        if let Some(source) = &action.if_ {
            match condition_holds(source, &job, &context) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    let note = format!("action {}: if: {e}; not fired", action.id);
                    tracing::warn!(job.id = %job.id, %note);
                    actions::add_note(&mut *conn, job.id, &note).await?;
                    continue;
                }
            }
        }
        match &action.action {
            ActionSpec::RunEvent { event_id } => {
                let depth = job.depth + 1;
                let target = match events::get_event(&mut *conn, *event_id).await {
                    Ok(t) => t,
                    Err(StorageError::EventNotFound(_)) => {
                        actions::add_note(
                            &mut *conn,
                            job.id,
                            &format!("run_event {event_id}: the event no longer exists"),
                        )
                        .await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if depth > chain_depth_limit {
                    let note = format!(
                        "chain depth limit of {chain_depth_limit} reached: {} was not started (a cycle?)",
                        target.spec.name
                    );
                    tracing::warn!(job.id = %job.id, %note);
                    actions::add_note(&mut *conn, job.id, &note).await?;
                    continue;
                }
                let run_at =
                    chrono::Utc::now() + chrono::Duration::seconds(i64::from(action.delay_seconds));
                // The chained job continues this trace, as a child of this action's span.
                let span = tracing::info_span!("action.run_event", action.id = %action.id,
                                               target.event.id = %target.id);
                let trace_context = span.in_scope(baton_telemetry::current_traceparent);
                let enqueued = queue::enqueue(
                    &mut *conn,
                    &NewJob {
                        event: &target,
                        // This run's output is the next run's input.
                        input: job.output.clone().unwrap_or_else(|| json!({})),
                        priority: target.spec.priority,
                        run_at: (action.delay_seconds > 0).then_some(run_at),
                        idempotency_key: None,
                        parent: Some(ChainLink {
                            parent_job_id: job.id,
                            root_job_id: job.root_job_id,
                            depth,
                        }),
                        created_by: None,
                        trace_context,
                    },
                )
                .instrument(span)
                .await?;
                if crate::admission::needed(&target) {
                    crate::admission::admit(conn, vault, chain_depth_limit, enqueued.job_id)
                        .await?;
                }
                crate::metrics::job_enqueued();
            }
            ActionSpec::SendMessage {
                channel,
                target,
                template,
                subject,
            } => {
                // The job's secrets never leave in a message (crate::masking).
                let secrets = crate::secrets::event_secrets(&mut *conn, vault, event.id).await?;
                let mut failures = Vec::new();
                let mut render_noting = |part: &str, text: &str| {
                    try_render(text, &context).unwrap_or_else(|e| {
                        failures.push(format!(
                            "send_message {}: the {part} template failed: {e}",
                            action.id
                        ));
                        failed_template_text(&e)
                    })
                };
                let body = secrets.mask(&render_noting("body", template)).into_owned();
                let subject = subject
                    .as_deref()
                    .map(|s| render_noting("subject", s))
                    .unwrap_or_else(|| format!("[baton] {} {}", event.spec.name, job.status));
                let subject = secrets.mask(&subject).into_owned();
                let mut payload = context.clone();
                secrets.mask_json(&mut payload);
                for note in failures {
                    tracing::warn!(job.id = %job.id, %note);
                    actions::add_note(&mut *conn, job.id, &note).await?;
                }
                let span = tracing::info_span!("action.send_message", action.id = %action.id,
                                               channel = channel.as_str());
                actions::enqueue_message(
                    &mut *conn,
                    &actions::NewMessage {
                        job_id: job.id,
                        action_id: action.id,
                        channel: channel.as_str(),
                        target,
                        subject: &subject,
                        body: &body,
                        payload: &payload,
                        delay_seconds: action.delay_seconds,
                    },
                )
                .instrument(span)
                .await?;
            }
        }
    }
    Ok(())
}

/// A script's `baton_set_variable` writes. Each updates the event's own variable with that key
/// if there is one. Otherwise, with `variables_write: event` (the default) a new key is
/// created in the event's scope and a key that exists only globally is refused; with
/// `global` the global one is updated (created if missing). A secret stays secret. Every
/// refused write leaves a note on the job.
async fn apply_variable_writes(
    conn: &mut PgConnection,
    vault: &Vault,
    job: &Job,
    scope: VariablesWrite,
    writes: &HashMap<String, String>,
) -> Result<(), StorageError> {
    let mut keys: Vec<&String> = writes.keys().collect();
    keys.sort();
    for key in keys {
        let value = &writes[key];
        if crate::model::variable::check_key(key).is_err()
            || value.len() > crate::model::variable::MAX_VALUE_BYTES
        {
            refuse(
                conn,
                job,
                format!("variable {key:?} not written: invalid key or value too large"),
            )
            .await?;
            continue;
        }
        let existing = match variables::get(&mut *conn, key, Some(job.event_id)).await? {
            Some(v) => Some(v),
            None => variables::get(&mut *conn, key, None).await?,
        };
        let (event_id, secret) = match (&existing, scope) {
            (Some(v), _) if v.event_id.is_some() => (v.event_id, v.secret),
            (Some(_), VariablesWrite::Event) => {
                refuse(
                    conn,
                    job,
                    format!(
                        "variable {key:?} not written: it is global, and this event's scripts may \
                         write only the event's own variables (variables_write: event)"
                    ),
                )
                .await?;
                continue;
            }
            (Some(v), VariablesWrite::Global) => (None, v.secret),
            (None, VariablesWrite::Event) => (Some(job.event_id), false),
            (None, VariablesWrite::Global) => (None, false),
        };
        let stored = if secret {
            match vault.seal(value.as_bytes(), &variables::identity(key, event_id)) {
                Ok(sealed) => StoredValue::Sealed(sealed),
                Err(e) => {
                    refuse(
                        conn,
                        job,
                        format!("secret variable {key:?} not written: {e}"),
                    )
                    .await?;
                    continue;
                }
            }
        } else {
            StoredValue::Plain(value.clone())
        };
        variables::upsert(&mut *conn, key, event_id, &stored, None, Some(job.id)).await?;
    }
    Ok(())
}

/// A variable write that was not applied: noted on the job and logged.
async fn refuse(conn: &mut PgConnection, job: &Job, note: String) -> Result<(), StorageError> {
    tracing::warn!(job.id = %job.id, %note);
    actions::add_note(&mut *conn, job.id, &note).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_event_and_job_fields() {
        let ctx = json!({"event": {"name": "backup"}, "job": {"status": "failed", "error": {"message": "disk full"}}});
        assert_eq!(
            render("{{event.name}} failed: {{job.error.message}}", &ctx),
            "backup failed: disk full"
        );
        assert_eq!(render("{{ job.missing }}!", &ctx), "!");
        assert!(check_template("{{ unclosed").is_err());
        assert!(
            render("{% include 'missing' %}", &ctx)
                .starts_with("[baton: the message template failed")
        );
    }

    #[test]
    fn a_runaway_template_stops_at_its_limits_with_a_clear_reason() {
        let ctx = json!({"job": {"status": "failed"}});
        let started = std::time::Instant::now();
        let endless =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let err = try_render(endless, &ctx).expect_err("out of fuel");
        assert!(err.contains("steps"), "{err}");
        assert!(
            render(endless, &ctx).starts_with("[baton: the message template failed"),
            "the message says what went wrong"
        );
        let huge = "{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}";
        let err = try_render(huge, &ctx).expect_err("too large");
        assert!(err.contains("exceeds 256 KiB"), "{err}");
        let deep = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(1) }}";
        assert!(try_render(deep, &ctx).is_err(), "recursion is bounded");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "limits hit quickly: {:?}",
            started.elapsed()
        );
        // Ordinary templates are far from the limits.
        let fine = "{% for i in range(100) %}{{ job.status }} {% endfor %}";
        assert_eq!(try_render(fine, &ctx).expect("renders").len(), 700);
    }
}
