//! `baton webhooks list|create|revoke`: an event's webhook triggers.

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Map, Value};

use crate::client::Client;

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// List an event's webhooks (revoked ones included; keys and secrets are never shown).
    List {
        /// Event id or name.
        event: String,
    },
    /// Create a webhook: prints its URL and key once (the key is stored hashed).
    Create(CreateArgs),
    /// Revoke a webhook: its key no longer starts runs.
    Revoke {
        /// Event id or name.
        event: String,
        /// The webhook's id.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Event id or name.
    pub event: String,
    /// A name for the webhook (who calls it).
    #[arg(long)]
    pub name: String,
    /// Require `X-Baton-Signature: sha256=<hex HMAC-SHA256 of the body>` with this secret.
    #[arg(long)]
    pub signing_secret: Option<String>,
    /// A request header to pass to the run as `input._headers` (repeatable).
    #[arg(long = "header", value_name = "NAME")]
    pub headers: Vec<String>,
}

/// The body of `POST /api/v1/events/{id}/webhooks`: only the options given.
pub fn create_body(args: &CreateArgs) -> Value {
    let mut body = Map::new();
    body.insert("name".into(), Value::from(args.name.clone()));
    if let Some(secret) = &args.signing_secret {
        body.insert("signing_secret".into(), Value::from(secret.clone()));
    }
    if !args.headers.is_empty() {
        body.insert("headers".into(), Value::from(args.headers.clone()));
    }
    Value::Object(body)
}

pub async fn run(client: &Client, command: WebhooksCommand) -> anyhow::Result<()> {
    match command {
        WebhooksCommand::List { event } => {
            let event = crate::commands::resolve_event(client, &event).await?;
            let hooks = client
                .get(&format!("/api/v1/events/{event}/webhooks"))
                .await?;
            for h in hooks.as_array().cloned().unwrap_or_default() {
                println!(
                    "{}  {:<24} key {}…  {:<8} {}",
                    h["id"].as_str().unwrap_or(""),
                    h["name"].as_str().unwrap_or(""),
                    h["key_prefix"].as_str().unwrap_or(""),
                    if h["signed"] == Value::Bool(true) {
                        "signed"
                    } else {
                        "unsigned"
                    },
                    match h["revoked_at"].as_str() {
                        Some(at) => format!("revoked {at}"),
                        None => "active".to_owned(),
                    },
                );
            }
            Ok(())
        }
        WebhooksCommand::Create(args) => {
            let event = crate::commands::resolve_event(client, &args.event).await?;
            let created = client
                .post(
                    &format!("/api/v1/events/{event}/webhooks"),
                    &create_body(&args),
                )
                .await?;
            let url = created["url"].as_str().context("no url in the answer")?;
            let key = created["key"].as_str().context("no key in the answer")?;
            println!("url: {}", client.absolute(url));
            println!("key: {key}");
            eprintln!("(the key is shown only now: keep it)");
            Ok(())
        }
        WebhooksCommand::Revoke { event, id } => {
            let event = crate::commands::resolve_event(client, &event).await?;
            client
                .call(
                    Method::DELETE,
                    &format!("/api/v1/events/{event}/webhooks/{id}"),
                    None,
                )
                .await?;
            println!("revoked {id}");
            Ok(())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: WebhooksCommand,
    }

    fn create(args: &[&str]) -> Result<Value, String> {
        let cli = Cli::try_parse_from(["webhooks", "create"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        match cli.command {
            WebhooksCommand::Create(a) => Ok(create_body(&a)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_sends_only_the_options_given() {
        assert_eq!(
            create(&["deploy", "--name", "github"]).unwrap(),
            json!({"name": "github"})
        );
        assert_eq!(
            create(&[
                "deploy",
                "--name",
                "github",
                "--signing-secret",
                "s3cret",
                "--header",
                "X-GitHub-Event",
                "--header",
                "X-GitHub-Delivery"
            ])
            .unwrap(),
            json!({"name": "github", "signing_secret": "s3cret",
                   "headers": ["X-GitHub-Event", "X-GitHub-Delivery"]})
        );
        assert!(create(&["deploy"]).is_err(), "--name is required");
    }
}
