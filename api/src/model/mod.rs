//! The shapes of the HTTP API (and of the rows behind them): events, jobs, logs, tokens.
//!
//! Request types reject unknown fields, and `validate()` checks what serde cannot, returning
//! a [`FieldError`] that names the offending field so clients get a precise 4xx.

pub mod action;
pub mod event;
pub mod job;
pub mod schedule;
pub mod server;
pub mod token;
pub mod variable;
pub mod webhook;
pub mod workflow;

pub use event::{Event, EventPatch, Executor, HttpRequestSpec, NewEvent, Runtime};
pub use job::{Job, JobError, JobStatus, JobSummary, LogLine, LogPage, RunRequest};
pub use token::{NewToken, Role, Token, TokenCreated};

/// A request field that failed validation: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Defines the `as_str`/`FromStr`/`TryFrom<String>` plumbing for an enum stored as text, so
/// rows decode with `#[sqlx(try_from = "String")]` and serde/utoipa derive the JSON side.
macro_rules! text_enum {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    other => Err(format!(
                        "unknown {} {other:?} (expected one of: {})",
                        stringify!($ty),
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl TryFrom<String> for $ty {
            type Error = String;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }
    };
}
pub(crate) use text_enum;
