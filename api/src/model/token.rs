//! API tokens and roles.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::event::Executor;
use super::{FieldError, text_enum};

/// What a token may do. `admin` ⊃ `operator` ⊃ `viewer`; `worker` tokens only open the
/// worker gRPC stream and can do nothing on the REST API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Operator,
    Viewer,
    Worker,
}
text_enum!(Role { Admin => "admin", Operator => "operator", Viewer => "viewer", Worker => "worker" });

impl Role {
    /// Whether a token with this role may do what `required` allows.
    pub fn allows(self, required: Role) -> bool {
        let rank = |r: Role| match r {
            Role::Admin => 3,
            Role::Operator => 2,
            Role::Viewer => 1,
            Role::Worker => 0,
        };
        match required {
            Role::Worker => self == Role::Worker,
            _ => self != Role::Worker && rank(self) >= rank(required),
        }
    }
}

/// A stored token (never its secret).
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct Token {
    pub id: Uuid,
    pub name: String,
    #[sqlx(try_from = "String")]
    pub role: Role,
    /// The first characters of the token, to recognise it.
    pub token_prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Worker tokens: the only labels its workers may declare (`null`: any labels).
    #[sqlx(json(nullable))]
    pub worker_labels: Option<BTreeMap<String, String>>,
    /// Worker tokens: the only executors its workers may offer (`null`: any executor).
    #[sqlx(rename = "worker_executors")]
    pub executors: Option<Vec<String>>,
}

impl Token {
    /// What the token's workers may declare.
    pub fn binding(&self) -> WorkerBinding {
        WorkerBinding {
            labels: self.worker_labels.clone(),
            executors: self.executors.clone(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub name: String,
    pub role: Role,
    /// Worker tokens only: bind the token to these labels. A worker using it is refused if
    /// its `Hello` declares a label not listed here with this value (`{}`: no labels at all).
    /// Absent: the worker may declare any labels.
    #[serde(default)]
    pub worker_labels: Option<BTreeMap<String, String>>,
    /// Worker tokens only: bind the token to these executors. A worker using it gets jobs of
    /// these executors only, whatever else it offers (refused if it offers none of them).
    /// Absent: any executor.
    #[serde(default)]
    pub executors: Option<Vec<Executor>>,
}

/// At most this many labels in a binding (as on events).
const MAX_BOUND_LABELS: usize = 64;

impl NewToken {
    pub fn validate(&self) -> Result<(), FieldError> {
        super::event::check_name("name", &self.name)?;
        if self.role != Role::Worker {
            for (field, set) in [
                ("worker_labels", self.worker_labels.is_some()),
                ("executors", self.executors.is_some()),
            ] {
                if set {
                    return Err(FieldError::new(
                        field,
                        format!("only worker tokens can be bound, not {} tokens", self.role),
                    ));
                }
            }
        }
        if let Some(labels) = &self.worker_labels {
            for (key, value) in labels {
                super::event::check_label(key, value)
                    .map_err(|e| FieldError::new(format!("worker_{}", e.field), e.message))?;
            }
            if labels.len() > MAX_BOUND_LABELS {
                return Err(FieldError::new(
                    "worker_labels",
                    format!("at most {MAX_BOUND_LABELS} labels"),
                ));
            }
        }
        if let Some(executors) = &self.executors {
            if executors.is_empty() {
                return Err(FieldError::new(
                    "executors",
                    "must name at least one executor (omit it to allow any)",
                ));
            }
            if let Some(dup) = executors
                .iter()
                .enumerate()
                .find(|(i, e)| executors[..*i].contains(e))
            {
                return Err(FieldError::new(
                    "executors",
                    format!("{} is listed twice", dup.1),
                ));
            }
        }
        Ok(())
    }

    /// The executors as stored.
    pub fn executor_names(&self) -> Option<Vec<String>> {
        self.executors
            .as_ref()
            .map(|e| e.iter().map(|x| x.as_str().to_owned()).collect())
    }
}

/// What a worker token allows its workers to declare in `Hello`; `None`: anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerBinding {
    pub labels: Option<BTreeMap<String, String>>,
    pub executors: Option<Vec<String>>,
}

impl WorkerBinding {
    /// Admits a worker's `Hello`: a label beyond the binding refuses the worker (labels are
    /// declared on purpose, so a mismatch is a mistake or an impersonation, said loudly); the
    /// executors are clipped to the binding (a worker offers `ssh` always and `container`
    /// whenever a Docker engine answers, so refusing would make bindings impractical), and
    /// refused only when none is left. Returns the executors the worker gets jobs for.
    pub fn admit<'a>(
        &self,
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        executors: &[String],
    ) -> Result<Vec<String>, String> {
        if let Some(allowed) = &self.labels {
            for (key, value) in labels {
                if allowed.get(key).map(String::as_str) != Some(value) {
                    let allowed = if allowed.is_empty() {
                        "no labels".to_owned()
                    } else {
                        let list: Vec<String> =
                            allowed.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        format!("only the labels {}", list.join(", "))
                    };
                    return Err(format!(
                        "this worker token allows {allowed}; the worker declares {key}={value}"
                    ));
                }
            }
        }
        let Some(allowed) = &self.executors else {
            return Ok(executors.to_vec());
        };
        let kept: Vec<String> = executors
            .iter()
            .filter(|e| allowed.contains(e))
            .cloned()
            .collect();
        if kept.is_empty() {
            return Err(format!(
                "this worker token allows only the executors {}; the worker offers none of them ({})",
                allowed.join(", "),
                executors.join(", ")
            ));
        }
        Ok(kept)
    }
}

/// The answer to `POST /api/v1/tokens`: the only time the secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenCreated {
    #[serde(flatten)]
    pub info: Token,
    /// The bearer token itself. Store it now: only its hash is kept.
    pub token: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_refuses_labels_and_clips_executors() {
        let binding = WorkerBinding {
            labels: Some(BTreeMap::from([("env".to_owned(), "prod".to_owned())])),
            executors: Some(vec!["ssh".to_owned()]),
        };
        let ssh = vec!["ssh".to_owned()];
        assert_eq!(binding.admit([("env", "prod")], &ssh), Ok(ssh.clone()));
        assert_eq!(binding.admit([], &ssh), Ok(ssh.clone()));
        let err = binding
            .admit([("env", "staging")], &ssh)
            .expect_err("other value");
        assert!(
            err.contains("env=staging") && err.contains("env=prod"),
            "{err}"
        );
        assert!(binding.admit([("region", "eu")], &ssh).is_err());
        assert_eq!(
            binding.admit([], &["container".to_owned(), "ssh".to_owned()]),
            Ok(ssh.clone()),
            "clipped"
        );
        let err = binding
            .admit([], &["local".to_owned()])
            .expect_err("nothing left");
        assert!(err.contains("none of them (local)"), "{err}");
        // Unbound: anything goes; bound to no labels: none.
        assert_eq!(
            WorkerBinding::default().admit([("env", "prod")], &ssh),
            Ok(ssh.clone())
        );
        let none = WorkerBinding {
            labels: Some(BTreeMap::new()),
            executors: None,
        };
        assert!(
            none.admit([("env", "prod")], &ssh)
                .expect_err("no labels")
                .contains("no labels")
        );
    }
}
