//! The REST subcommands: events, run, jobs, logs, schedules, webhooks, tokens.

use anyhow::{Context, bail};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Client, Connection};

#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Define and inspect events.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Run an event (by id or name).
    Run {
        event: String,
        /// The run's input, as JSON.
        #[arg(long)]
        input: Option<String>,
        #[arg(long)]
        priority: Option<i32>,
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Follow the logs and exit with the job's outcome.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Inspect and cancel jobs.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Run events on a schedule (cron or interval).
    Schedules {
        #[command(subcommand)]
        command: crate::schedules::SchedulesCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Start an event's runs from other systems: webhook URLs with optional HMAC signing.
    Webhooks {
        #[command(subcommand)]
        command: crate::webhooks::WebhooksCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Define and run workflows (DAGs of steps), watch, cancel and retry their runs.
    Workflows {
        #[command(subcommand)]
        command: crate::workflows::WorkflowsCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Manage API and worker tokens (admin).
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    List,
    Get {
        event: String,
    },
    /// Create an event from a JSON file (`-` for stdin).
    Create {
        file: String,
    },
    Delete {
        event: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        event: Option<String>,
        /// Only jobs flagged stuck (no log line or progress for their event's
        /// `stuck_after_seconds`).
        #[arg(long)]
        stuck: bool,
    },
    Get {
        id: String,
    },
    Cancel {
        id: String,
        /// Kill the run at once (SIGKILL to its process tree), without the SIGTERM grace.
        #[arg(long)]
        force: bool,
    },
    /// Queue a new run of a finished job (also a dead one) with the same event snapshot and
    /// input; prints the new job's id.
    Rerun {
        id: String,
    },
    /// Print a job's output; `--follow` keeps printing until it finishes.
    Logs {
        id: String,
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    List,
    Create {
        name: String,
        /// admin, operator, viewer or worker.
        #[arg(long)]
        role: String,
        /// Worker tokens: bind the token to this label (`key=value`, repeatable). A worker
        /// using it may declare only these labels. `--no-labels` binds it to none.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Worker tokens: may declare no labels at all.
        #[arg(long, conflicts_with = "labels")]
        no_labels: bool,
        /// Worker tokens: bind the token to this executor (container, ssh or local;
        /// repeatable). A worker using it may offer only these.
        #[arg(long = "executor", value_name = "EXECUTOR")]
        executors: Vec<String>,
    },
}

/// The body of `POST /api/v1/tokens` for `baton tokens create`.
fn new_token_body(
    name: &str,
    role: &str,
    labels: &[String],
    no_labels: bool,
    executors: &[String],
) -> anyhow::Result<Value> {
    let mut body = json!({"name": name, "role": role});
    if !labels.is_empty() || no_labels {
        let mut bound = serde_json::Map::new();
        for label in labels {
            let (key, value) = label
                .split_once('=')
                .with_context(|| format!("--label {label:?} must be KEY=VALUE"))?;
            bound.insert(key.to_owned(), Value::String(value.to_owned()));
        }
        body["worker_labels"] = Value::Object(bound);
    }
    if !executors.is_empty() {
        body["executors"] = json!(executors);
    }
    Ok(body)
}

pub async fn run(cmd: ApiCommand) -> anyhow::Result<()> {
    match cmd {
        ApiCommand::Events { command, conn } => events(&Client::new(&conn)?, command).await,
        ApiCommand::Run {
            event,
            input,
            priority,
            idempotency_key,
            wait,
            conn,
        } => {
            let client = Client::new(&conn)?;
            let id = resolve_event(&client, &event).await?;
            let input: Option<Value> = input
                .map(|s| serde_json::from_str(&s).context("--input is not valid JSON"))
                .transpose()?;
            let answer = client
                .post(
                    &format!("/api/v1/events/{id}/run"),
                    &json!({"input": input, "priority": priority, "idempotency_key": idempotency_key}),
                )
                .await?;
            let job_id = answer["job_id"]
                .as_str()
                .context("no job_id in the answer")?
                .to_owned();
            if !wait {
                println!("{job_id}");
                return Ok(());
            }
            eprintln!("job {job_id}");
            follow_logs(&client, &job_id).await?;
            let job = client.get(&format!("/api/v1/jobs/{job_id}")).await?;
            eprintln!("status: {}", job["status"].as_str().unwrap_or("?"));
            if job["status"] != "succeeded" {
                bail!(
                    "job {job_id} ended {}: {}",
                    job["status"],
                    job["error"]["message"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        ApiCommand::Jobs { command, conn } => jobs(&Client::new(&conn)?, command).await,
        ApiCommand::Schedules { command, conn } => {
            crate::schedules::run(&Client::new(&conn)?, command).await
        }
        ApiCommand::Webhooks { command, conn } => {
            crate::webhooks::run(&Client::new(&conn)?, command).await
        }
        ApiCommand::Workflows { command, conn } => {
            crate::workflows::run(&Client::new(&conn)?, command).await
        }
        ApiCommand::Tokens { command, conn } => {
            let client = Client::new(&conn)?;
            let out = match command {
                TokensCommand::List => client.get("/api/v1/tokens").await?,
                TokensCommand::Create {
                    name,
                    role,
                    labels,
                    no_labels,
                    executors,
                } => {
                    let body = new_token_body(&name, &role, &labels, no_labels, &executors)?;
                    client.post("/api/v1/tokens", &body).await?
                }
            };
            print_json(&out)
        }
    }
}

async fn events(client: &Client, command: EventsCommand) -> anyhow::Result<()> {
    let out = match command {
        EventsCommand::List => {
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    Some(c) => format!("/api/v1/events?limit=500&cursor={}", urlencode(c)),
                    None => "/api/v1/events?limit=500".to_owned(),
                };
                let page = client.get(&path).await?;
                all.extend(page["items"].as_array().cloned().unwrap_or_default());
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => break,
                }
            }
            for e in &all {
                println!(
                    "{}  {:<30} {:<7} {}",
                    e["id"].as_str().unwrap_or(""),
                    e["name"].as_str().unwrap_or(""),
                    e["runtime"].as_str().unwrap_or(""),
                    e["executor"].as_str().unwrap_or("")
                );
            }
            return Ok(());
        }
        EventsCommand::Get { event } => {
            let id = resolve_event(client, &event).await?;
            client.get(&format!("/api/v1/events/{id}")).await?
        }
        EventsCommand::Create { file } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {file}"))?
            };
            let spec: Value =
                serde_json::from_str(&text).with_context(|| format!("{file} is not valid JSON"))?;
            client.post("/api/v1/events", &spec).await?
        }
        EventsCommand::Delete { event } => {
            let id = resolve_event(client, &event).await?;
            client
                .call(Method::DELETE, &format!("/api/v1/events/{id}"), None)
                .await?;
            println!("deleted {id}");
            return Ok(());
        }
    };
    print_json(&out)
}

async fn jobs(client: &Client, command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::List {
            status,
            event,
            stuck,
        } => {
            let mut query = vec!["limit=100".to_owned()];
            if stuck {
                query.push("stuck=true".to_owned());
            }
            if let Some(s) = status {
                query.push(format!("status={}", urlencode(&s)));
            }
            if let Some(e) = event {
                query.push(format!("event_id={}", resolve_event(client, &e).await?));
            }
            let page = client
                .get(&format!("/api/v1/jobs?{}", query.join("&")))
                .await?;
            for j in page["items"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{}  {:<10} attempt {:<2} {:<30} {}{}",
                    j["id"].as_str().unwrap_or(""),
                    j["status"].as_str().unwrap_or(""),
                    j["attempt"],
                    j["event_name"].as_str().unwrap_or(""),
                    j["created_at"].as_str().unwrap_or(""),
                    if j["stuck"] == true { "  STUCK" } else { "" }
                );
            }
            Ok(())
        }
        JobsCommand::Get { id } => print_json(&client.get(&format!("/api/v1/jobs/{id}")).await?),
        JobsCommand::Cancel { id, force } => {
            let path = if force {
                format!("/api/v1/jobs/{id}/cancel?force=true")
            } else {
                format!("/api/v1/jobs/{id}/cancel")
            };
            print_json(&client.post(&path, &Value::Null).await?)
        }
        JobsCommand::Rerun { id } => {
            let accepted = client
                .post(&format!("/api/v1/jobs/{id}/rerun"), &Value::Null)
                .await?;
            println!("{}", accepted["job_id"].as_str().unwrap_or_default());
            Ok(())
        }
        JobsCommand::Logs { id, follow } => {
            if follow {
                follow_logs(client, &id).await
            } else {
                print_logs_once(client, &id).await.map(|_| ())
            }
        }
    }
}

/// Prints all stored lines; returns the last sequence number and whether the job is done.
async fn print_logs_once(client: &Client, id: &str) -> anyhow::Result<(i64, bool)> {
    let mut after = 0;
    loop {
        let page = client
            .get(&format!("/api/v1/jobs/{id}/logs?after={after}&limit=10000"))
            .await?;
        let lines = page["lines"].as_array().cloned().unwrap_or_default();
        print_lines(&lines);
        after = page["next"].as_i64().unwrap_or(after);
        if lines.len() < 10_000 {
            return Ok((after, page["done"].as_bool().unwrap_or(false)));
        }
    }
}

fn print_lines(lines: &[Value]) {
    for line in lines {
        let text = line["text"].as_str().unwrap_or("");
        if line["stream"] == "stderr" {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

/// Prints lines live (the api's Server-Sent Events stream) until the job finishes.
async fn follow_logs(client: &Client, id: &str) -> anyhow::Result<()> {
    // The api ends a stream that had nothing new for a while with `idle`: resume after it.
    let mut after = 0i64;
    loop {
        let mut response = client
            .stream(&format!("/api/v1/jobs/{id}/logs/stream?after={after}"))
            .await?;
        let mut buffer: Vec<u8> = Vec::new();
        let mut idle = false;
        while let Some(chunk) = response.chunk().await? {
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = buffer.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&block);
                let mut event = "message";
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = e.trim();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                match event {
                    "line" => {
                        after = value["seq"].as_i64().unwrap_or(after);
                        print_lines(&[value]);
                    }
                    "idle" => idle = true,
                    "status" => return Ok(()),
                    _ => {}
                }
            }
        }
        if !idle {
            return Ok(());
        }
    }
}

/// An event id from an id or a name.
pub(crate) async fn resolve_event(client: &Client, event: &str) -> anyhow::Result<String> {
    resolve_named(client, "events", "event", event).await
}

/// The id of the object named `name` (or `name` itself when it is an id) in the paged
/// collection `/api/v1/{collection}`, whose items carry `id` and `name`.
pub(crate) async fn resolve_named(
    client: &Client,
    collection: &str,
    what: &str,
    name: &str,
) -> anyhow::Result<String> {
    if uuid::Uuid::parse_str(name).is_ok() {
        return Ok(name.to_owned());
    }
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/{collection}?limit=500&cursor={}", urlencode(c)),
            None => format!("/api/v1/{collection}?limit=500"),
        };
        let page = client.get(&path).await?;
        if let Some(found) = page["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
        {
            return Ok(found["id"].as_str().unwrap_or_default().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => bail!("no {what} named {name:?}"),
        }
    }
}

pub(crate) fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bindings_become_the_request_fields() {
        let body = new_token_body(
            "w",
            "worker",
            &["env=prod".to_owned()],
            false,
            &["ssh".to_owned()],
        )
        .expect("body");
        assert_eq!(
            body,
            json!({"name": "w", "role": "worker", "worker_labels": {"env": "prod"}, "executors": ["ssh"]})
        );
        let bare = new_token_body("w", "worker", &[], true, &[]).expect("body");
        assert_eq!(bare["worker_labels"], json!({}));
        let plain = new_token_body("v", "viewer", &[], false, &[]).expect("body");
        assert_eq!(plain, json!({"name": "v", "role": "viewer"}));
        assert!(new_token_body("w", "worker", &["env".to_owned()], false, &[]).is_err());
    }
}
