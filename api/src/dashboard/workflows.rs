//! Workflows: the definitions with their latest runs, and a run's page with its steps drawn as
//! a graph (`needs` as edges, each step coloured by its status, linked to its job) — through
//! the handlers of `GET /api/v1/workflows`, `/workflow-runs` and `/workflow-runs/{id}`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde_json::json;

use super::graph::{self, Edge, Node};
use super::render::{DashError, show};
use super::session::Session;
use crate::AppState;
use crate::http::workflows;
use crate::model::workflow::WorkflowRun;

/// Runs listed under the definitions.
const RECENT_RUNS: &str = "50";

fn query<T>(value: T) -> Result<Query<T>, QueryRejection> {
    Ok(Query(value))
}

pub async fn list_view(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, DashError> {
    let axum::Json(defs) = workflows::list_workflows(
        State(state.clone()),
        session.caller.clone(),
        query(workflows::ListWorkflowsQuery::first(Some("500"))),
    )
    .await?;
    let axum::Json(runs) = workflows::list_runs(
        State(state),
        session.caller.clone(),
        query(workflows::ListRunsQuery::first(Some(RECENT_RUNS))),
    )
    .await?;
    let defs: Vec<_> = defs
        .items
        .iter()
        .map(|w| json!({"id": w.id, "name": w.spec.name, "steps": w.spec.steps.len()}))
        .collect();
    show(
        "workflows.html",
        &session,
        "workflows",
        "Workflows",
        json!({"workflows": defs, "runs": runs.items}),
    )
}

pub async fn run_view(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Response, DashError> {
    let axum::Json(run) =
        workflows::get_run(State(state), session.caller.clone(), Path(id)).await?;
    let svg = steps_graph(&run);
    let steps: Vec<_> = run
        .steps
        .iter()
        .flatten()
        .map(|s| {
            json!({
                "s": s,
                "output": s.output.as_ref().map(|o| serde_json::to_string_pretty(o).unwrap_or_default()),
            })
        })
        .collect();
    let input = serde_json::to_string_pretty(&run.input).unwrap_or_default();
    show(
        "workflow_run.html",
        &session,
        "workflows",
        &format!("Workflow run of {}", run.workflow_name),
        json!({"run": run, "steps": steps, "input": input, "graph": svg}),
    )
}

/// The run's steps as nodes and their `needs` as edges.
fn steps_graph(run: &WorkflowRun) -> Option<String> {
    let steps = run.steps.as_ref().filter(|s| !s.is_empty())?;
    let nodes: Vec<Node> = steps
        .iter()
        .map(|s| Node {
            id: s.id.clone(),
            label: s.id.clone(),
            sublabel: match (s.items, s.job_ids.len()) {
                (Some(items), _) => format!("{} · {items} items", s.status.as_str()),
                (None, 0) => s.status.as_str().to_owned(),
                (None, _) => format!(
                    "{} · job …{}",
                    s.status.as_str(),
                    &s.job_ids[0].to_string()[28..]
                ),
            },
            class: s.status.as_str().to_owned(),
            // A single job links to its run page; a for_each step to its jobs, filtered.
            href: match s.job_ids.as_slice() {
                [] => None,
                [job] => Some(format!("/runs/{job}")),
                _ => Some(format!("#step-{}", s.id)),
            },
            current: false,
        })
        .collect();
    let edges: Vec<Edge> = steps
        .iter()
        .flat_map(|s| {
            s.needs.iter().map(|n| Edge {
                from: n.clone(),
                to: s.id.clone(),
            })
        })
        .collect();
    Some(graph::svg(
        &format!("Workflow {} with {} steps", run.workflow_name, steps.len()),
        &nodes,
        &edges,
    ))
}
