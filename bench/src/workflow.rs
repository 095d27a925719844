//! `workflow`: what a DAG costs over the same work queued as independent runs.
//!
//! On one api replica and one in-process worker (local executor, `noop` event: no process),
//! each round measures, end to end (the `POST` until the last job is recorded):
//! - `dag`: a workflow of `--steps` steps — one root, `steps - 2` steps needing it, one join
//!   needing them all — started with `POST /workflows/{id}/run`, until the run has ended;
//! - `for_each`: a workflow of one root and one `for_each` step over `steps - 1` elements of
//!   the run's input (no `max_parallel`), until the run has ended;
//! - `independent`: `--steps` runs of the same event through `POST /events/{id}/run`, sent
//!   by `--clients` concurrent clients, until all have succeeded.
//!
//! Completion is seen by polling the benchmark's own connection every millisecond. Reported:
//! medians over `--rounds` (after one unmeasured round), and `ratio` = dag ÷ independent —
//! the DAG's orchestration overhead, including its two extra dependency hops (root before
//! the fan-out, join after it).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::support::{self, ApiHandle, Summary, median};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Steps of the DAG (root + fan-out + join), and independent runs to compare with.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(3..=500))]
    steps: u32,
    /// Measured rounds; medians are reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Worker slots.
    #[arg(long, default_value_t = 32)]
    slots: u32,
    /// Concurrent clients sending the independent runs.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    clients: u32,
}

pub async fn run(args: Args) -> anyhow::Result<Summary> {
    let cluster = support::cluster().await?;
    let api = support::start_api(&cluster, "bench_workflow", 4, |_| {}).await?;
    let worker = api.start_worker(args.slots).await?;
    api.wait_workers(1).await?;
    let noop = api
        .create_event(
            &json!({"name": "bench-workflow-noop", "runtime": "noop", "executor": "local"}),
        )
        .await?;
    let n = args.steps as usize;
    let dag = create(&api, &dag_definition(&noop, n)).await?;
    let fan = create(
        &api,
        &json!({"name": "bench-for-each", "steps": [
            {"id": "root", "event_id": noop},
            {"id": "fan", "event_id": noop, "needs": ["root"], "for_each": "input.items"}
        ]}),
    )
    .await?;
    println!(
        "config: steps={n} rounds={} slots={} clients={}; load average {}",
        args.rounds,
        args.slots,
        args.clients,
        support::load_average()
    );
    let (mut dags, mut fans, mut singles) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..=args.rounds {
        let d = time_run(&api, &dag, &json!({})).await?;
        let items: Vec<u32> = (0..(n as u32 - 1)).collect();
        let f = time_run(&api, &fan, &json!({"items": items})).await?;
        let s = time_independent(&api, &noop, n, args.clients).await?;
        println!(
            "round {round}{}: dag {:.1} ms, for_each {:.1} ms, {n} independent runs {:.1} ms",
            if round == 0 { " (warm-up)" } else { "" },
            ms(d),
            ms(f),
            ms(s)
        );
        if round > 0 {
            dags.push(ms(d));
            singles.push(ms(s));
            fans.push(ms(f));
        }
    }
    worker.stop().await?;
    api.stop().await?;
    cluster.stop().context("stopping PostgreSQL")?;
    let (dag_ms, single_ms) = (median(&dags), median(&singles));
    let fan_ms = median(&fans);
    Ok(Summary::new("workflow")
        .field("steps", n)
        .field("dag_ms", format!("{dag_ms:.1}"))
        .field("independent_ms", format!("{single_ms:.1}"))
        .field("ratio", format!("{:.2}", dag_ms / single_ms))
        .field("for_each_ms", format!("{fan_ms:.1}"))
        .field("for_each_ratio", format!("{:.2}", fan_ms / single_ms))
        .field("rounds", args.rounds))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// root → `n - 2` steps → join.
fn dag_definition(event: &str, n: usize) -> Value {
    let middle: Vec<String> = (0..n - 2).map(|i| format!("s{i}")).collect();
    let mut steps = vec![json!({"id": "root", "event_id": event})];
    steps.extend(
        middle
            .iter()
            .map(|id| json!({"id": id, "event_id": event, "needs": ["root"]})),
    );
    steps.push(json!({"id": "join", "event_id": event, "needs": middle}));
    json!({"name": "bench-dag", "steps": steps})
}

async fn create(api: &ApiHandle, definition: &Value) -> anyhow::Result<String> {
    let created = api.rest.post("/api/v1/workflows", definition).await?;
    created["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no id in {created}"))
}

/// Runs the workflow and waits for the run to end (it must succeed).
async fn time_run(api: &ApiHandle, workflow: &str, input: &Value) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let answer = api
        .rest
        .post(
            &format!("/api/v1/workflows/{workflow}/run"),
            &json!({"input": input}),
        )
        .await?;
    let run: Uuid = answer["run_id"]
        .as_str()
        .with_context(|| format!("no run_id in {answer}"))?
        .parse()?;
    let status = wait(|| async {
        let status: String = sqlx::query_scalar("SELECT status FROM workflow_runs WHERE id = $1")
            .bind(run)
            .fetch_one(&api.pool)
            .await?;
        Ok((status != "running").then_some(status))
    })
    .await?;
    let took = started.elapsed();
    ensure!(status == "succeeded", "run {run} ended {status}");
    Ok(took)
}

/// `n` runs of the event from `clients` clients; waits until all succeeded.
async fn time_independent(
    api: &ApiHandle,
    event: &str,
    n: usize,
    clients: u32,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut senders = JoinSet::new();
    for c in 0..clients as usize {
        let count = n / clients as usize + usize::from(c < n % clients as usize);
        let rest = api.rest.clone();
        let path = format!("/api/v1/events/{event}/run");
        senders.spawn(async move {
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                let answer = rest.post(&path, &json!({})).await?;
                let id: Uuid = answer["job_id"]
                    .as_str()
                    .with_context(|| format!("no job_id in {answer}"))?
                    .parse()?;
                ids.push(id);
            }
            anyhow::Ok(ids)
        });
    }
    let mut ids = Vec::with_capacity(n);
    while let Some(sent) = senders.join_next().await {
        ids.extend(sent??);
    }
    wait(|| async {
        let (done, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'),
                    count(*) FILTER (WHERE status IN ('failed', 'timed_out', 'cancelled'))
             FROM jobs WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_one(&api.pool)
        .await?;
        ensure!(failed == 0, "{failed} independent runs did not succeed");
        Ok((done as usize == ids.len()).then_some(()))
    })
    .await?;
    Ok(started.elapsed())
}

/// Polls `check` every millisecond until it returns a value (60 s at most).
async fn wait<T, F, Fut>(mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        ensure!(Instant::now() < deadline, "not done after 60 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
