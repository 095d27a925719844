//! `baton schedules list|create|pause|resume|delete`.

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::client::Client;

#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// List schedules (all, or one event's).
    List {
        /// Event id or name.
        #[arg(long)]
        event: Option<String>,
    },
    /// Schedule an event (by id or name): `--cron` or `--every SECONDS`.
    Create(CreateArgs),
    Pause {
        id: String,
    },
    /// Resume a paused schedule; the slots it missed follow its `missed` policy.
    Resume {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Event id or name.
    pub event: String,
    /// Cron pattern: 5 fields, or 6 with seconds first; or @hourly, @daily…
    #[arg(long, required_unless_present = "every", conflicts_with = "every")]
    pub cron: Option<String>,
    /// Fire every this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub every: Option<i64>,
    /// IANA time zone of the cron pattern (default UTC).
    #[arg(long)]
    pub timezone: Option<String>,
    /// none, last (default) or all.
    #[arg(long)]
    pub missed: Option<String>,
    #[arg(long)]
    pub max_catch_up: Option<i32>,
    /// Spread fires by a stable offset of up to this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub jitter: Option<i32>,
    /// Each run's input, as JSON.
    #[arg(long)]
    pub input: Option<String>,
    /// RFC 3339: no fire before.
    #[arg(long)]
    pub start_at: Option<String>,
    /// RFC 3339: no fire after.
    #[arg(long)]
    pub end_at: Option<String>,
    /// Create it paused.
    #[arg(long)]
    pub paused: bool,
}

/// The body of `POST /api/v1/events/{id}/schedules`: only the options given.
pub fn create_body(args: &CreateArgs) -> anyhow::Result<Value> {
    let mut body = Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            body.insert(key.to_owned(), v);
        }
    };
    put("cron", args.cron.clone().map(Value::from));
    put("interval_seconds", args.every.map(Value::from));
    put("timezone", args.timezone.clone().map(Value::from));
    put("missed", args.missed.clone().map(Value::from));
    put("max_catch_up", args.max_catch_up.map(Value::from));
    put("jitter_seconds", args.jitter.map(Value::from));
    put("start_at", args.start_at.clone().map(Value::from));
    put("end_at", args.end_at.clone().map(Value::from));
    put("paused", args.paused.then_some(Value::Bool(true)));
    let input = args
        .input
        .as_deref()
        .map(serde_json::from_str::<Value>)
        .transpose()
        .context("--input is not valid JSON")?;
    put("input", input);
    Ok(Value::Object(body))
}

pub async fn run(client: &Client, command: SchedulesCommand) -> anyhow::Result<()> {
    match command {
        SchedulesCommand::List { event } => {
            let filter = match event {
                Some(e) => format!(
                    "&event_id={}",
                    crate::commands::resolve_event(client, &e).await?
                ),
                None => String::new(),
            };
            let mut cursor: Option<String> = None;
            loop {
                let mut path = format!("/api/v1/schedules?limit=500{filter}");
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={c}"));
                }
                let page = client.get(&path).await?;
                for s in page["items"].as_array().cloned().unwrap_or_default() {
                    let when = s["cron"]
                        .as_str()
                        .map(str::to_owned)
                        .or_else(|| {
                            s["interval_seconds"]
                                .as_i64()
                                .map(|n| format!("every {n}s"))
                        })
                        .unwrap_or_default();
                    let target = match s["workflow_id"].as_str() {
                        Some(w) => format!("workflow {w}"),
                        None => format!("event {}", s["event_id"].as_str().unwrap_or("")),
                    };
                    println!(
                        "{}  {target}  {:<20} {:<16} {:<6} next {}",
                        s["id"].as_str().unwrap_or(""),
                        when,
                        s["timezone"].as_str().unwrap_or(""),
                        if s["paused"] == json!(true) {
                            "paused"
                        } else {
                            "active"
                        },
                        s["next_runs"][0].as_str().unwrap_or("-"),
                    );
                }
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => return Ok(()),
                }
            }
        }
        SchedulesCommand::Create(args) => {
            let event = crate::commands::resolve_event(client, &args.event).await?;
            let body = create_body(&args)?;
            let created = client
                .post(&format!("/api/v1/events/{event}/schedules"), &body)
                .await?;
            crate::commands::print_json(&created)
        }
        SchedulesCommand::Pause { id } => crate::commands::print_json(
            &client
                .post(&format!("/api/v1/schedules/{id}/pause"), &Value::Null)
                .await?,
        ),
        SchedulesCommand::Resume { id } => crate::commands::print_json(
            &client
                .post(&format!("/api/v1/schedules/{id}/resume"), &Value::Null)
                .await?,
        ),
        SchedulesCommand::Delete { id } => {
            client
                .call(Method::DELETE, &format!("/api/v1/schedules/{id}"), None)
                .await?;
            println!("deleted {id}");
            Ok(())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: SchedulesCommand,
    }

    fn create(args: &[&str]) -> Result<Value, String> {
        let cli = Cli::try_parse_from(["schedules", "create"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        match cli.command {
            SchedulesCommand::Create(a) => create_body(&a).map_err(|e| e.to_string()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_sends_only_the_options_given() {
        assert_eq!(
            create(&[
                "nightly",
                "--cron",
                "0 2 * * *",
                "--timezone",
                "Europe/Paris"
            ])
            .unwrap(),
            json!({"cron": "0 2 * * *", "timezone": "Europe/Paris"})
        );
        assert_eq!(
            create(&[
                "e",
                "--every",
                "30",
                "--missed",
                "all",
                "--max-catch-up",
                "5",
                "--jitter",
                "3",
                "--input",
                "{\"a\":1}",
                "--paused"
            ])
            .unwrap(),
            json!({"interval_seconds": 30, "missed": "all", "max_catch_up": 5,
                   "jitter_seconds": 3, "input": {"a": 1}, "paused": true})
        );
        assert!(create(&["e"]).is_err(), "cron or every is required");
        assert!(create(&["e", "--cron", "* * * * *", "--every", "5"]).is_err());
        assert!(create(&["e", "--every", "5", "--input", "{"]).is_err());
    }
}
