//! What a finished job sets in motion, decided inside the transaction that records its end:
//! the script's variable writes are applied, its event's conditional actions are evaluated,
//! chained jobs are queued and messages are put in the outbox. Either all of it commits with
//! the completion or none of it does, so a crash can neither lose nor duplicate a chain step.

use std::collections::HashMap;

use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::crypto::Vault;
use crate::model::action::{ActionSpec, Trigger};
use crate::model::{Job, JobStatus};
use crate::storage::queue::{self, ChainLink, NewJob};
use crate::storage::variables::{self, StoredValue};
use crate::storage::{StorageError, actions, events};

/// The default limit on how deep a chain may go (a cycle stops there, with a note).
pub const DEFAULT_CHAIN_DEPTH_LIMIT: i32 = 20;

/// Checks that a template parses.
pub fn check_template(template: &str) -> Result<(), String> {
    let env = environment();
    env.template_from_str(template)
        .map(|_| ())
        .map_err(|e| format!("invalid template: {e}"))
}

fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    // Messages are plain text or JSON-carried text, not HTML.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
    env
}

/// Renders a template; a template that fails at render time yields an explanation instead, so
/// the message still goes out and says what is wrong.
pub fn render(template: &str, context: &Value) -> String {
    let env = environment();
    match env.render_str(template, context) {
        Ok(text) => text,
        Err(e) => format!("[baton: the message template failed: {e}]"),
    }
}

/// Does `trigger` fire for a job that ended so?
pub fn fires(trigger: Trigger, job: &Job) -> bool {
    match trigger {
        Trigger::OnSuccess => job.status == JobStatus::Succeeded,
        Trigger::OnFailure => matches!(job.status, JobStatus::Failed | JobStatus::TimedOut),
        Trigger::Always => job.status.is_terminal(),
        Trigger::OnCondition => job.condition == Some(true),
    }
}

/// Everything a finished job sets in motion, in the caller's transaction.
pub async fn after_finish(
    conn: &mut PgConnection,
    vault: &Vault,
    chain_depth_limit: i32,
    job_id: Uuid,
    variable_writes: &HashMap<String, String>,
) -> Result<(), StorageError> {
    let job = queue::get_job(&mut *conn, job_id).await?;
    // Most completions set nothing in motion: stop before loading the event.
    let actions = actions::list_actions(&mut *conn, job.event_id).await?;
    if actions.is_empty() && variable_writes.is_empty() {
        return Ok(());
    }
    let output_failed = job
        .error
        .as_ref()
        .is_some_and(|e| e.kind == crate::model::job::ErrorKind::Output);
    if !output_failed {
        apply_variable_writes(conn, vault, &job, variable_writes).await?;
    }
    if actions.is_empty() {
        return Ok(());
    }
    let event = match events::get_event(&mut *conn, job.event_id).await {
        Ok(e) => e,
        Err(StorageError::EventNotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let context = json!({"event": {"id": event.id, "name": event.spec.name, "description": event.spec.description},
                         "job": job});
    for action in actions {
        if !fires(action.trigger, &job) {
            continue;
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
                queue::enqueue(
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
                    },
                )
                .await?;
            }
            ActionSpec::SendMessage {
                channel,
                target,
                template,
                subject,
            } => {
                // The job's secrets never leave in a message (crate::masking).
                let secrets = crate::secrets::event_secrets(&mut *conn, vault, event.id).await?;
                let body = secrets.mask(&render(template, &context)).into_owned();
                let subject = subject
                    .as_deref()
                    .map(|s| render(s, &context))
                    .unwrap_or_else(|| format!("[baton] {} {}", event.spec.name, job.status));
                let subject = secrets.mask(&subject).into_owned();
                let mut payload = context.clone();
                secrets.mask_json(&mut payload);
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
                .await?;
            }
        }
    }
    Ok(())
}

/// A script's `baton_set_variable` writes: each updates the event's own variable with that key
/// if there is one, else the global one (created if missing); a secret stays secret.
async fn apply_variable_writes(
    conn: &mut PgConnection,
    vault: &Vault,
    job: &Job,
    writes: &HashMap<String, String>,
) -> Result<(), StorageError> {
    let mut keys: Vec<&String> = writes.keys().collect();
    keys.sort();
    for key in keys {
        let value = &writes[key];
        if crate::model::variable::check_key(key).is_err()
            || value.len() > crate::model::variable::MAX_VALUE_BYTES
        {
            actions::add_note(
                &mut *conn,
                job.id,
                &format!("variable {key:?} not written: invalid key or value too large"),
            )
            .await?;
            continue;
        }
        let scoped = variables::get(&mut *conn, key, Some(job.event_id)).await?;
        let existing = match scoped {
            Some(v) => Some(v),
            None => variables::get(&mut *conn, key, None).await?,
        };
        let (id, event_id, secret) = match &existing {
            Some(v) => (v.id, v.event_id, v.secret),
            None => (Uuid::now_v7(), None, false),
        };
        let stored = if secret {
            match vault.seal(value.as_bytes(), id.as_bytes()) {
                Ok(sealed) => StoredValue::Sealed(sealed),
                Err(e) => {
                    actions::add_note(
                        &mut *conn,
                        job.id,
                        &format!("secret variable {key:?} not written: {e}"),
                    )
                    .await?;
                    continue;
                }
            }
        } else {
            StoredValue::Plain(value.clone())
        };
        variables::upsert(&mut *conn, id, key, event_id, &stored, None, Some(job.id)).await?;
    }
    Ok(())
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
}
