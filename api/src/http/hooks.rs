//! `POST /hooks/{key}`: a webhook delivery starts a run of the webhook's event. No bearer
//! token: the key in the path is the credential (and, when the webhook has a signing secret,
//! the `X-Baton-Signature` HMAC of the body). Limited per key (`BATON_WEBHOOK_RATE_LIMIT_*`, in
//! `rate_limit.rs`); unknown keys count as failed authentications of the client's address.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Map, Value, json};

use super::extract::parse_json;
use super::rate_limit::AuthVerified;
use crate::AppState;
use crate::auth::hash_token;
use crate::error::{ApiError, ErrorBody};
use crate::model::FieldError;
use crate::storage::audit::{self, AuditEntry};
use crate::storage::webhooks::{self as store, HookTarget};
use crate::storage::{events, queue, workflows};
use crate::webhooks::{SIGNATURE_HEADER, secret_identity, verify};
use crate::workflow::engine;
use uuid::Uuid;

/// Longest `Idempotency-Key` a delivery may carry (the stored key is prefixed with the
/// webhook's id, and stored keys are at most 200 characters).
pub const MAX_IDEMPOTENCY_KEY: usize = 150;

#[utoipa::path(post, path = "/hooks/{key}", tag = "webhooks", security(()),
    params(("key" = String, Path, description = "the webhook's key, as returned once when it was created"),
           ("Idempotency-Key" = Option<String>, Header, description = "deliveries with the same key (per webhook) start one run; a repeat answers the first job"),
           ("X-Baton-Signature" = Option<String>, Header, description = "`sha256=<hex HMAC-SHA256 of the raw body>`; required when the webhook has a signing secret")),
    request_body(content = Object, description = "any JSON value (an object when the webhook passes headers): the run's input, with the listed headers in `_headers`"),
    responses((status = 202, body = DeliveryAccepted, description = "a run was queued (`job_id`; `run_id` for a workflow's webhook), or, for a repeated Idempotency-Key, the first one is returned"),
              (status = 400, body = ErrorBody, description = "the body is missing or not JSON"),
              (status = 401, body = ErrorBody, description = "the signature is missing, malformed or does not match the body"),
              (status = 404, body = ErrorBody, description = "no live webhook has this key (unknown or revoked)"),
              (status = 413, body = ErrorBody, description = "the body is larger than BATON_BODY_LIMIT"),
              (status = 422, body = ErrorBody, description = "the body holds a NUL character, is not an object where headers are passed, or the Idempotency-Key is invalid"),
              (status = 429, body = ErrorBody, description = "this key's rate limit (or the address's failed-key limit) is reached; see Retry-After")))]
pub async fn deliver(
    State(state): State<AppState>,
    verified: Option<Extension<AuthVerified>>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, axum::Json<DeliveryAccepted>), ApiError> {
    // Unknown and revoked keys take the same lookup and get the same answer.
    let target = store::find_live_by_hash(&state.pool, &hash_token(&key))
        .await?
        .ok_or_else(|| ApiError::NotFound("no such webhook (unknown or revoked key)".into()))?;
    if let Some(Extension(verified)) = verified {
        verified.mark();
    }
    let body = body.map_err(|rejection| ApiError::BadBody {
        status: rejection.status(),
        message: rejection.body_text(),
        field: None,
    })?;
    if let Some(sealed) = &target.signing_secret {
        let secret = state
            .vault
            .open(sealed, secret_identity(target.id).as_bytes())?;
        verify(
            &secret,
            &body,
            headers.get(SIGNATURE_HEADER).map(|v| v.as_bytes()),
        )
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    }
    let input = input_of(&target, &body, &headers)?;
    let idempotency_key = idempotency_key(&target, &headers)?;

    let mut tx = state.pool.begin().await?;
    let actor = format!("webhook {}", target.name);
    if let Some(workflow_id) = target.workflow_id {
        let workflow = workflows::get_workflow(&mut *tx, workflow_id).await?;
        let (run, created) =
            engine::start_run(&mut tx, &workflow, &input, None, idempotency_key.as_deref()).await?;
        if created {
            audit::record(
                &mut *tx,
                &AuditEntry {
                    token_id: None,
                    actor: &actor,
                    action: "webhook.deliver",
                    target_type: "workflow_run",
                    target_id: Some(run.id.to_string()),
                    detail: json!({"webhook_id": target.id, "workflow_id": workflow_id}),
                },
            )
            .await?;
        }
        tx.commit().await?;
        return Ok((
            StatusCode::ACCEPTED,
            axum::Json(DeliveryAccepted {
                job_id: None,
                run_id: Some(run.id),
                created,
            }),
        ));
    }
    let event_id = target
        .event_id
        .ok_or_else(|| ApiError::NotFound("the webhook's target no longer exists".into()))?;
    let event = events::get_event(&mut *tx, event_id).await?;
    let job = queue::NewJob {
        event: &event,
        input,
        priority: event.spec.priority,
        run_at: None,
        idempotency_key: idempotency_key.as_deref(),
        parent: None,
        created_by: None,
        trace_context: baton_telemetry::current_traceparent(),
    };
    // The row trigger notifies the dispatchers on commit.
    let enqueued = queue::enqueue(&mut *tx, &job).await?;
    if enqueued.created && crate::admission::needed(&event) {
        crate::admission::admit(
            &mut tx,
            &state.vault,
            state.config.chain_depth_limit,
            enqueued.job_id,
        )
        .await?;
    }
    if enqueued.created {
        audit::record(
            &mut *tx,
            &AuditEntry {
                token_id: None,
                actor: &actor,
                action: "webhook.deliver",
                target_type: "job",
                target_id: Some(enqueued.job_id.to_string()),
                detail: json!({"webhook_id": target.id, "event_id": event_id}),
            },
        )
        .await?;
    }
    tx.commit().await?;
    if enqueued.created {
        crate::metrics::job_enqueued();
    }
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(DeliveryAccepted {
            job_id: Some(enqueued.job_id),
            run_id: None,
            created: enqueued.created,
        }),
    ))
}

/// The answer to a delivery: the event's job, or the workflow's run.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DeliveryAccepted {
    /// The job queued (a webhook of an event).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<Uuid>,
    /// The run started (a webhook of a workflow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    /// False when the Idempotency-Key matched an earlier delivery (its job or run is returned).
    pub created: bool,
}

/// The run's input: the body, with the webhook's headers in `_headers` (lower-cased names;
/// repeated headers joined with `, `; absent ones left out).
fn input_of(target: &HookTarget, body: &[u8], headers: &HeaderMap) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadBody {
            status: StatusCode::BAD_REQUEST,
            message: "a JSON body is required".into(),
            field: None,
        });
    }
    let mut input: Value = parse_json(body)?;
    if target.headers.is_empty() {
        return Ok(input);
    }
    let Some(object) = input.as_object_mut() else {
        return Err(FieldError::new(
            "body",
            "must be a JSON object: this webhook passes request headers to the run as `_headers`",
        )
        .into());
    };
    let mut passed = Map::new();
    for name in &target.headers {
        let values: Vec<String> = headers
            .get_all(name.as_str())
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).replace('\0', ""))
            .collect();
        if !values.is_empty() {
            passed.insert(name.clone(), Value::String(values.join(", ")));
        }
    }
    object.insert("_headers".into(), Value::Object(passed));
    Ok(input)
}

/// The delivery's `Idempotency-Key`, scoped to the webhook.
fn idempotency_key(target: &HookTarget, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| {
            !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY && !k.chars().any(char::is_control)
        })
        .ok_or_else(|| {
            FieldError::new(
                "Idempotency-Key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"),
            )
        })?;
    Ok(Some(format!("webhook:{}:{key}", target.id)))
}
