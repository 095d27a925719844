//! Delivers the messages conditional actions put in the outbox: webhook, Slack, Discord (HTTP
//! POST with reqwest) and email (SMTP with lettre). Every replica runs a deliverer; a message is
//! held (`locked_until`) by the one sending it. Failures retry with exponential backoff and
//! jitter up to `max_attempts`, then the message is marked failed with the last error.
//!
//! HTTP deliveries keep to the address policy of `baton_egress` (internal addresses refused
//! after DNS resolution and on every redirect, unless `BATON_HTTP_ALLOW_CIDRS` allows them),
//! and read at most [`ERROR_BODY_BYTES`] of a failing answer, within [`ERROR_BODY_TIMEOUT`],
//! for the error message.

use std::sync::Arc;
use std::time::Duration;

use baton_egress::AddressPolicy;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::storage::actions::{self, OutboxMessage};

/// How long a replica holds a message it is sending.
const HOLD_SECONDS: i32 = 60;
const FALLBACK_POLL: Duration = Duration::from_secs(10);
/// Most bytes of a failing answer's body read for the error message.
pub const ERROR_BODY_BYTES: usize = 4096;
/// Longest time spent reading that prefix.
pub const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Characters of that prefix kept in the message's `last_error`.
const ERROR_BODY_CHARS: usize = 200;

/// Where email goes out.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// `smtp://host:port` (plain, for a local relay) or `smtps://user:pass@host:465`.
    pub url: String,
    pub from: String,
}

pub struct Deliverer {
    pool: PgPool,
    http: Result<reqwest::Client, ()>,
    policy: AddressPolicy,
    smtp: Option<SmtpSettings>,
    pub wake: Arc<Notify>,
    /// Opens the secret variables a target references (`{{secret.NAME}}`).
    vault: crate::crypto::Vault,
}

/// At most `limit` bytes of `response`'s body, read for at most `within` (what arrived by
/// then), as text. A huge or endless answer costs neither memory nor time.
pub async fn body_prefix(
    mut response: reqwest::Response,
    limit: usize,
    within: Duration,
) -> String {
    let mut prefix = Vec::new();
    let read = async {
        while prefix.len() < limit {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = limit - prefix.len();
                    prefix.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(within, read).await;
    String::from_utf8_lossy(&prefix).into_owned()
}

/// `error: cause: cause` (reqwest's top-level message hides the useful part, such as the
/// address policy's refusal).
fn error_chain(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

impl Deliverer {
    /// A deliverer whose HTTP messages may reach the internal addresses `policy` allows.
    pub fn new(
        pool: PgPool,
        smtp: Option<SmtpSettings>,
        wake: Arc<Notify>,
        policy: AddressPolicy,
    ) -> Self {
        // Building only fails if TLS cannot be set up; a client without the policy is never
        // used as a fallback: deliveries then fail with the reason.
        let http = baton_egress::client_builder(policy.clone())
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("baton/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| tracing::error!(error = %e, "cannot build the outbox's HTTP client"));
        Self {
            pool,
            http,
            policy,
            smtp,
            wake,
            vault: crate::crypto::Vault::new(None).expect("a vault without a key always builds"),
        }
    }

    /// Resolves the secret references of targets with `vault` (without it, a target with a
    /// reference cannot be delivered).
    pub fn with_vault(mut self, vault: crate::crypto::Vault) -> Self {
        self.vault = vault;
        self
    }

    /// The URL to post to: the target with its secret references resolved. Messages about
    /// it name the stored target, never the resolved one.
    async fn url_of(&self, m: &OutboxMessage) -> Result<String, String> {
        let event_id = m.payload.0["event"]["id"]
            .as_str()
            .and_then(|id| uuid::Uuid::parse_str(id).ok());
        let url =
            crate::secret_refs::resolve_for_event(&self.pool, &self.vault, event_id, &m.target)
                .await
                .map_err(|e| format!("target {}: {e}", m.target))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "target {} is not an http:// or https:// URL once resolved",
                m.target
            ));
        }
        Ok(url.into_owned())
    }

    pub async fn run(self, stop: CancellationToken) {
        loop {
            let sleep_for = match self.pass().await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox pass failed; retrying");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep_for) => {}
            }
        }
    }

    async fn pass(&self) -> Result<Duration, crate::storage::StorageError> {
        loop {
            let batch = actions::claim_messages(&self.pool, 20, HOLD_SECONDS).await?;
            if batch.is_empty() {
                break;
            }
            let sends = batch.into_iter().map(|m| async move {
                let result = self.deliver(&m).await;
                (m, result)
            });
            for (m, result) in futures::future::join_all(sends).await {
                match result {
                    Ok(()) => {
                        tracing::info!(message.id = %m.id, channel = %m.channel, "message delivered");
                        actions::mark_delivered(&self.pool, m.id).await?;
                    }
                    Err(e) => {
                        let retry_in = crate::storage::queue::retry_delay(m.attempts, 2, 600);
                        tracing::warn!(message.id = %m.id, channel = %m.channel, attempt = m.attempts, error = %e, ?retry_in, "delivery failed");
                        actions::mark_failed(&self.pool, m.id, &e, retry_in).await?;
                    }
                }
            }
        }
        let next = actions::next_message_due(&self.pool).await?;
        Ok(next
            .and_then(|at| (at - chrono::Utc::now()).to_std().ok())
            .map_or(FALLBACK_POLL, |d| d.min(FALLBACK_POLL))
            + Duration::from_millis(5))
    }

    async fn deliver(&self, m: &OutboxMessage) -> Result<(), String> {
        let body = match m.channel.as_str() {
            "slack" => json!({"text": m.body}),
            "discord" => json!({"content": m.body}),
            "webhook" => {
                json!({"text": m.body, "subject": m.subject, "event": m.payload.0["event"], "job": m.payload.0["job"]})
            }
            "email" => return self.email(m).await,
            other => return Err(format!("unknown channel {other}")),
        };
        let http = self
            .http
            .as_ref()
            .map_err(|()| "the api cannot build its HTTP client (see its log)".to_owned())?;
        // The target with its `{{secret.NAME}}` references resolved; errors name the stored
        // target, never the resolved one.
        let resolved = self.url_of(m).await?;
        let url = reqwest::Url::parse(&resolved).map_err(|e| format!("{}: {e}", m.target))?;
        // An IP literal is connected to without resolving: the resolver never sees it.
        self.policy
            .check_url(&url)
            .map_err(|refused| format!("{}: {refused}", m.target))?;
        let response = http.post(url).json(&body).send().await.map_err(|e| {
            format!(
                "cannot reach {}: {}",
                m.target,
                error_chain(&e.without_url())
            )
        })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            let text = body_prefix(response, ERROR_BODY_BYTES, ERROR_BODY_TIMEOUT).await;
            Err(format!(
                "{} answered {status}: {}",
                m.target,
                text.chars().take(ERROR_BODY_CHARS).collect::<String>()
            ))
        }
    }

    async fn email(&self, m: &OutboxMessage) -> Result<(), String> {
        use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
        let smtp = self
            .smtp
            .as_ref()
            .ok_or("email is not configured on the api (set BATON_SMTP_URL and BATON_SMTP_FROM)")?;
        let email = Message::builder()
            .from(
                smtp.from
                    .parse()
                    .map_err(|e| format!("BATON_SMTP_FROM {:?}: {e}", smtp.from))?,
            )
            .to(m
                .target
                .parse()
                .map_err(|e| format!("recipient {:?}: {e}", m.target))?)
            .subject(m.subject.clone())
            .body(m.body.clone())
            .map_err(|e| format!("cannot build the email: {e}"))?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&smtp.url)
            .map_err(|e| format!("BATON_SMTP_URL: {e}"))?
            .timeout(Some(Duration::from_secs(15)))
            .build();
        transport
            .send(email)
            .await
            .map(|_| ())
            .map_err(|e| format!("SMTP: {e}"))
    }
}
