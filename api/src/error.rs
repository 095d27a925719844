//! The one place where errors become HTTP statuses (and, for the worker protocol, gRPC codes).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::model::FieldError;
use crate::storage::StorageError;

/// An error answered to an HTTP client as `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// A request field is invalid; the field is named.
    #[error(transparent)]
    Validation(#[from] FieldError),
    /// The body is not JSON, or not of the expected shape.
    #[error("{message}")]
    BadBody {
        status: StatusCode,
        message: String,
        field: Option<String>,
    },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// A rate limit was reached (the answer carries `Retry-After`).
    #[error("{0}")]
    TooManyRequests(String),
    /// The token holds as many live log streams as it may.
    #[error("{0}")]
    TooManyStreams(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
}

/// The error body, as documented in the OpenAPI spec.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    /// The status, the error code and the field named, as the JSON body carries them.
    pub fn parts(&self) -> (StatusCode, &'static str, Option<String>) {
        use StorageError as S;
        match self {
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", None),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", None),
            Self::Validation(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                Some(e.field.clone()),
            ),
            Self::BadBody { status, field, .. } => {
                let code = if *status == StatusCode::PAYLOAD_TOO_LARGE {
                    "body_too_large"
                } else {
                    "invalid_body"
                };
                (*status, code, field.clone())
            }
            Self::Conflict { code, .. } => (StatusCode::CONFLICT, code, None),
            Self::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited", None),
            Self::TooManyStreams(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_streams", None),
            Self::Crypto(crate::crypto::CryptoError::NoMasterKey) => {
                (StatusCode::SERVICE_UNAVAILABLE, "master_key_missing", None)
            }
            Self::Crypto(_) => (StatusCode::INTERNAL_SERVER_ERROR, "secret_unreadable", None),
            Self::Storage(e) => match e {
                S::EventNotFound(_) => (StatusCode::NOT_FOUND, "event_not_found", None),
                S::JobNotFound(_) => (StatusCode::NOT_FOUND, "job_not_found", None),
                S::TokenNotFound(_) => (StatusCode::NOT_FOUND, "token_not_found", None),
                S::ScheduleNotFound(_) => (StatusCode::NOT_FOUND, "schedule_not_found", None),
                S::ServerNotFound(_) => (StatusCode::NOT_FOUND, "server_not_found", None),
                S::ServerNameTaken(_) => (
                    StatusCode::CONFLICT,
                    "server_name_taken",
                    Some("name".into()),
                ),
                S::ServerInUse(_) => (StatusCode::CONFLICT, "server_in_use", None),
                S::EventNameTaken(_) => (
                    StatusCode::CONFLICT,
                    "event_name_taken",
                    Some("name".into()),
                ),
                S::EventBusy(_) => (StatusCode::CONFLICT, "event_busy", None),
                S::EventChanged(_) => (StatusCode::CONFLICT, "event_changed", None),
                S::LeaseLost { .. } => (StatusCode::CONFLICT, "lease_lost", None),
                S::LogGap { .. } | S::LogsIncomplete { .. } => {
                    (StatusCode::CONFLICT, "log_sequence", None)
                }
                S::JobFinished { .. } => (StatusCode::CONFLICT, "job_finished", None),
                S::WebhookNotFound(_) => (StatusCode::NOT_FOUND, "webhook_not_found", None),
                S::JobNotFinished { .. } => (StatusCode::CONFLICT, "job_not_finished", None),
                S::WorkflowNotFound(_) => (StatusCode::NOT_FOUND, "workflow_not_found", None),
                S::WorkflowNameTaken(_) => (
                    StatusCode::CONFLICT,
                    "workflow_name_taken",
                    Some("name".into()),
                ),
                S::WorkflowBusy(_) => (StatusCode::CONFLICT, "workflow_busy", None),
                S::WorkflowRunNotFound(_) => {
                    (StatusCode::NOT_FOUND, "workflow_run_not_found", None)
                }
                S::WorkflowRunFinished { .. } => {
                    (StatusCode::CONFLICT, "workflow_run_finished", None)
                }
                S::WorkflowRunNotRetryable { .. } => {
                    (StatusCode::CONFLICT, "workflow_run_not_retryable", None)
                }
                S::Database(sqlx::Error::PoolTimedOut) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    None,
                ),
                S::Database(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = self.parts();
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            // Details go to the log, not to the client.
            tracing::error!(error = %self, "request failed");
            "internal error; see the api log".to_owned()
        } else {
            self.to_string()
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message,
                field,
            },
        };
        (status, axum::Json(body)).into_response()
    }
}

/// The gRPC status for a storage error met while serving a worker.
pub fn grpc_status(err: &StorageError) -> tonic::Status {
    use StorageError as S;
    match err {
        S::LeaseLost { .. } => tonic::Status::failed_precondition(err.to_string()),
        S::JobNotFound(_)
        | S::EventNotFound(_)
        | S::TokenNotFound(_)
        | S::ServerNotFound(_)
        | S::WebhookNotFound(_) => tonic::Status::not_found(err.to_string()),
        S::ScheduleNotFound(_) | S::WorkflowNotFound(_) | S::WorkflowRunNotFound(_) => {
            tonic::Status::not_found(err.to_string())
        }
        S::WorkflowNameTaken(_)
        | S::WorkflowBusy(_)
        | S::WorkflowRunFinished { .. }
        | S::WorkflowRunNotRetryable { .. } => tonic::Status::failed_precondition(err.to_string()),
        S::ServerNameTaken(_) | S::ServerInUse(_) => {
            tonic::Status::failed_precondition(err.to_string())
        }
        S::LogGap { .. } | S::LogsIncomplete { .. } => tonic::Status::out_of_range(err.to_string()),
        S::JobFinished { .. }
        | S::JobNotFinished { .. }
        | S::EventBusy(_)
        | S::EventNameTaken(_)
        | S::EventChanged(_) => tonic::Status::failed_precondition(err.to_string()),
        S::Database(_) => {
            tracing::error!(error = %err, "worker request failed");
            tonic::Status::unavailable("database error")
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        Self::Storage(err.into())
    }
}
