//! Conditional actions: what happens when a run of an event ends — run another event with
//! this run's output as its input, or send a message.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{FieldError, text_enum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    OnSuccess,
    /// Failed or timed out (not cancelled).
    OnFailure,
    /// Any end, cancelled included.
    Always,
    /// The run set its condition flag to true (`baton_set_condition true`).
    OnCondition,
    /// The run became stuck (no log line, progress or start for its event's
    /// `stuck_after_seconds`): fired once per time it becomes stuck, while it still runs.
    OnStuck,
}
text_enum!(Trigger { OnSuccess => "on_success", OnFailure => "on_failure", Always => "always", OnCondition => "on_condition", OnStuck => "on_stuck" });

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Webhook,
    Slack,
    Discord,
    Email,
}
text_enum!(Channel { Webhook => "webhook", Slack => "slack", Discord => "discord", Email => "email" });

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ActionSpec {
    /// Run another event; this run's output becomes its input.
    RunEvent { event_id: Uuid },
    /// Send a message rendered from `template` (Jinja syntax; `event` and `job` are available).
    SendMessage {
        channel: Channel,
        /// A URL (webhook, slack, discord) or an email address. A URL may reference secret
        /// variables as `{{secret.NAME}}` (the whole URL or a part of it), substituted when
        /// the message is delivered; non-admin callers see only its scheme and host.
        target: String,
        #[serde(default = "default_template")]
        template: String,
        /// Email subject (a template too).
        #[serde(default)]
        subject: Option<String>,
    },
}

fn default_template() -> String {
    "{{ event.name }} {{ job.status }}{% if job.error %}: {{ job.error.message }}{% endif %}"
        .to_owned()
}

/// The body of `POST /api/v1/events/{id}/actions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAction {
    pub trigger: Trigger,
    #[serde(default)]
    pub delay_seconds: i32,
    /// A CEL expression over the finished run — `status`, `output`, `condition`,
    /// `exit_code`, `error`, `input`, `job`, `event` — e.g. `status == 'succeeded' &&
    /// output.rows > 100 || status == 'timed_out'`: the action fires only when its trigger
    /// holds and this is true.
    #[serde(default, rename = "if")]
    pub if_: Option<String>,
    pub action: ActionSpec,
}

/// The variables an action's `if` may use.
pub const ACTION_IF_VARIABLES: &[&str] = &[
    "status",
    "output",
    "condition",
    "exit_code",
    "error",
    "input",
    "job",
    "event",
];

impl NewAction {
    pub fn validate(&self) -> Result<(), FieldError> {
        super::event::check_range("delay_seconds", self.delay_seconds, 0, 2_592_000)?;
        if let Some(source) = &self.if_ {
            let compiled =
                crate::workflow::expr::compile(source).map_err(|e| FieldError::new("if", e))?;
            if let Some(unknown) = compiled
                .references
                .variables
                .iter()
                .find(|v| !ACTION_IF_VARIABLES.contains(&v.as_str()))
            {
                return Err(FieldError::new(
                    "if",
                    format!(
                        "unknown variable {unknown:?} (available: {})",
                        ACTION_IF_VARIABLES.join(", ")
                    ),
                ));
            }
        }
        if let ActionSpec::SendMessage {
            channel,
            target,
            template,
            subject,
        } = &self.action
        {
            match channel {
                Channel::Email if baton_proto::secret_ref::has_references(target) => {
                    return Err(FieldError::new(
                        "action.target",
                        "secret references are only supported in webhook, slack and discord targets",
                    ));
                }
                Channel::Email => {
                    let ok = target.len() <= 254
                        && target
                            .split_once('@')
                            .is_some_and(|(user, host)| !user.is_empty() && host.contains('.'))
                        && !target.chars().any(|c| c.is_whitespace() || c.is_control());
                    if !ok {
                        return Err(FieldError::new("action.target", "must be an email address"));
                    }
                }
                _ => {
                    super::event::check_secret_refs("action.target", target)?;
                    // A target that is one reference is checked when delivered; otherwise
                    // the URL around the references must be one.
                    let whole_ref = baton_proto::secret_ref::only_references(target)
                        && !target.contains(char::is_whitespace);
                    let url = placeholder_refs(target);
                    let ok = target.len() <= 2048
                        && (whole_ref
                            || ((url.starts_with("http://") || url.starts_with("https://"))
                                && !url.chars().any(|c| c.is_whitespace() || c.is_control())));
                    if !ok {
                        return Err(FieldError::new(
                            "action.target",
                            "must be an http:// or https:// URL",
                        ));
                    }
                }
            }
            if template.len() > 16 * 1024 {
                return Err(FieldError::new("action.template", "must be at most 16 KiB"));
            }
            crate::actions::check_template(template)
                .map_err(|e| FieldError::new("action.template", e))?;
            if let Some(subject) = subject {
                crate::actions::check_template(subject)
                    .map_err(|e| FieldError::new("action.subject", e))?;
            }
        }
        Ok(())
    }
}

/// `target` with each secret reference replaced by a harmless placeholder, for checking the
/// URL around it.
fn placeholder_refs(target: &str) -> String {
    baton_proto::secret_ref::resolve(target, |_| Some("secret"))
        .map(|t| t.into_owned())
        .unwrap_or_else(|_| target.to_owned())
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Action {
    pub id: Uuid,
    pub event_id: Uuid,
    pub trigger: Trigger,
    pub delay_seconds: i32,
    /// The action's CEL condition, if any.
    #[serde(rename = "if")]
    pub if_: Option<String>,
    pub action: ActionSpec,
    pub created_at: DateTime<Utc>,
}
