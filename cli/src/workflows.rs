//! `baton workflows create|list|run|runs|show|cancel|retry`.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::Client;
use crate::commands::{print_json, resolve_named};

#[derive(Debug, Subcommand)]
pub enum WorkflowsCommand {
    /// Create a workflow from a definition file (JSON, or YAML for .yaml/.yml; `-` reads stdin
    /// as JSON unless it starts like YAML).
    Create {
        file: String,
    },
    List,
    /// Run a workflow (by id or name).
    Run {
        workflow: String,
        /// The run's input, as JSON.
        #[arg(long)]
        input: Option<String>,
        /// Wait until the run ends and print its steps; fail unless it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// List runs, newest first (all, or one workflow's).
    Runs {
        #[arg(long)]
        workflow: Option<String>,
        /// running, succeeded, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
    },
    /// A run with every step: status, jobs, timings, output.
    Show {
        run: String,
    },
    /// Cancel a run: running steps are killed, nothing more starts.
    Cancel {
        run: String,
        /// SIGKILL at once instead of SIGTERM and a grace period.
        #[arg(long)]
        force: bool,
    },
    /// Retry a failed or cancelled run from its failed steps (succeeded steps are kept).
    Retry {
        run: String,
    },
}

/// The content type of a definition file: YAML by extension, or by a first character that
/// cannot start JSON.
pub fn content_type(path: &str, text: &str) -> &'static str {
    let lower = path.to_ascii_lowercase();
    let yaml_name = lower.ends_with(".yaml") || lower.ends_with(".yml");
    let json_start = text.trim_start().starts_with(['{', '[']);
    if yaml_name || !json_start {
        "application/yaml"
    } else {
        "application/json"
    }
}

fn run_line(r: &Value) -> String {
    format!(
        "{}  {:<10} {:<30} attempt {}  started {}",
        r["id"].as_str().unwrap_or(""),
        r["status"].as_str().unwrap_or(""),
        r["workflow_name"].as_str().unwrap_or(""),
        r["attempt"],
        r["created_at"].as_str().unwrap_or("")
    )
}

fn print_steps(run: &Value) {
    println!("{}", run_line(run));
    for s in run["steps"].as_array().into_iter().flatten() {
        let detail = s["skip_reason"]
            .as_str()
            .map(|r| format!("({r})"))
            .or_else(|| s["error"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let jobs = s["job_ids"].as_array().map_or(0, Vec::len);
        println!(
            "  {:<24} {:<10} jobs {:<4} {}",
            s["id"].as_str().unwrap_or(""),
            s["status"].as_str().unwrap_or(""),
            jobs,
            detail
        );
    }
}

pub async fn run(client: &Client, command: WorkflowsCommand) -> anyhow::Result<()> {
    let workflow_id =
        |name: String| async move { resolve_named(client, "workflows", "workflow", &name).await };
    match command {
        WorkflowsCommand::Create { file } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let kind = content_type(&file, &text);
            let created = client
                .post_raw("/api/v1/workflows", kind, text.into_bytes())
                .await?;
            print_json(&created)
        }
        WorkflowsCommand::List => {
            let page = client.get("/api/v1/workflows?limit=500").await?;
            for w in page["items"].as_array().into_iter().flatten() {
                println!(
                    "{}  {:<30} {} steps",
                    w["id"].as_str().unwrap_or(""),
                    w["name"].as_str().unwrap_or(""),
                    w["steps"].as_array().map_or(0, Vec::len)
                );
            }
            Ok(())
        }
        WorkflowsCommand::Run {
            workflow,
            input,
            wait,
        } => {
            let id = workflow_id(workflow).await?;
            let input = input
                .as_deref()
                .map(serde_json::from_str::<Value>)
                .transpose()
                .context("--input is not valid JSON")?
                .unwrap_or_else(|| json!({}));
            let started = client
                .post(
                    &format!("/api/v1/workflows/{id}/run"),
                    &json!({"input": input}),
                )
                .await?;
            let run_id = started["run_id"].as_str().unwrap_or_default().to_owned();
            if !wait {
                println!("{run_id}");
                return Ok(());
            }
            let run = loop {
                let run = client
                    .get(&format!("/api/v1/workflow-runs/{run_id}"))
                    .await?;
                if run["status"] != "running" {
                    break run;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            print_steps(&run);
            if run["status"] != "succeeded" {
                bail!("run {run_id} ended {}", run["status"]);
            }
            Ok(())
        }
        WorkflowsCommand::Runs { workflow, status } => {
            let mut path = "/api/v1/workflow-runs?limit=100".to_owned();
            if let Some(w) = workflow {
                path.push_str(&format!("&workflow_id={}", workflow_id(w).await?));
            }
            if let Some(s) = status {
                path.push_str(&format!("&status={s}"));
            }
            let page = client.get(&path).await?;
            for r in page["items"].as_array().into_iter().flatten() {
                println!("{}", run_line(r));
            }
            Ok(())
        }
        WorkflowsCommand::Show { run } => {
            let run = client.get(&format!("/api/v1/workflow-runs/{run}")).await?;
            print_steps(&run);
            Ok(())
        }
        WorkflowsCommand::Cancel { run, force } => {
            let query = if force { "?force=true" } else { "" };
            let run = client
                .post(
                    &format!("/api/v1/workflow-runs/{run}/cancel{query}"),
                    &Value::Null,
                )
                .await?;
            print_steps(&run);
            Ok(())
        }
        WorkflowsCommand::Retry { run } => {
            let run = client
                .post(&format!("/api/v1/workflow-runs/{run}/retry"), &Value::Null)
                .await?;
            print_steps(&run);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_recognised_by_name_or_content() {
        assert_eq!(content_type("w.yaml", "{}"), "application/yaml");
        assert_eq!(content_type("W.YML", "name: x"), "application/yaml");
        assert_eq!(content_type("w.json", " {\"name\": 1}"), "application/json");
        assert_eq!(content_type("-", "name: x\nsteps: []"), "application/yaml");
        assert_eq!(content_type("-", "{\"name\": \"x\"}"), "application/json");
    }
}
