//! Delivers the messages conditional actions put in the outbox: webhook, Slack, Discord (HTTP
//! POST with reqwest) and email (SMTP with lettre). Every replica runs a deliverer; a message is
//! held (`locked_until`) by the one sending it. Failures retry with exponential backoff and
//! jitter up to `max_attempts`, then the message is marked failed with the last error.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::storage::actions::{self, OutboxMessage};

/// How long a replica holds a message it is sending.
const HOLD_SECONDS: i32 = 60;
const FALLBACK_POLL: Duration = Duration::from_secs(10);

/// Where email goes out.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// `smtp://host:port` (plain, for a local relay) or `smtps://user:pass@host:465`.
    pub url: String,
    pub from: String,
}

pub struct Deliverer {
    pool: PgPool,
    http: reqwest::Client,
    smtp: Option<SmtpSettings>,
    pub wake: Arc<Notify>,
    /// Opens the secret variables a target references (`{{secret.NAME}}`).
    vault: crate::crypto::Vault,
}

impl Deliverer {
    pub fn new(pool: PgPool, smtp: Option<SmtpSettings>, wake: Arc<Notify>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("baton/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Self {
            pool,
            http,
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
        let url = self.url_of(m).await?;
        let response = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {}", m.target, e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            let text = response.text().await.unwrap_or_default();
            Err(format!(
                "{} answered {status}: {}",
                m.target,
                text.chars().take(200).collect::<String>()
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
