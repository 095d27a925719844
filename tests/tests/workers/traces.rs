//! One trace per job: the REST handler that queues it (a child of the client's
//! `traceparent`), the dispatch, the worker's run and its executor's steps, the completion and
//! the actions it fires — and the chained job after it — exported over OTLP by the api (gRPC)
//! and the worker (HTTP/protobuf) to real receivers, with the script's `TRACEPARENT` naming a
//! span of that trace.

use std::process::Stdio;

use baton_tests::otlp::{OtlpReceiver, ReceivedSpan};
use baton_tests::{TestApp, spawn_app, test_database};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{
    ApiProcess, InProcessWorker, WorkerProcess, all_lines, local_event, wait_finished, wait_job,
};

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

/// Queues a run with the client's trace context; returns the job id.
async fn run_traced(app: &TestApp, event: &str) -> String {
    let response = app
        .request(Method::POST, &format!("/api/v1/events/{event}/run"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&json!({}))
        .send()
        .await
        .expect("run");
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let body: Value = response.json().await.expect("json");
    body["job_id"].as_str().expect("job_id").to_owned()
}

/// The `TRACEPARENT` the job's script printed (`TP=...`), split into trace id and span id.
async fn script_traceparent(app: &TestApp, job: &str) -> (String, String) {
    let lines = all_lines(app, job).await;
    let line = lines
        .iter()
        .filter_map(|l| l["text"].as_str())
        .find_map(|t| t.strip_prefix("TP="))
        .unwrap_or_else(|| panic!("no TP= line in {lines:?}"))
        .to_owned();
    let parts: Vec<&str> = line.split('-').collect();
    assert_eq!(parts.len(), 4, "not a traceparent: {line:?}");
    assert_eq!(parts[0], "00", "{line}");
    (parts[1].to_owned(), parts[2].to_owned())
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.name == name && s.trace_id == CLIENT_TRACE)
        .collect()
}

#[tokio::test]
async fn a_job_and_its_chain_form_one_trace_across_api_worker_and_script() {
    let api_receiver = OtlpReceiver::grpc().await;
    let worker_receiver = OtlpReceiver::http().await;
    let database = test_database().await;
    let api = ApiProcess::start(
        &database,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &api_receiver.endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "api-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("RUST_LOG", "warn"),
        ],
    )
    .await;
    let app = api.app(&database).await;
    let _worker = WorkerProcess::start_with_env(
        &app,
        &app.grpc_address,
        2,
        &["--allow-local", "--no-container"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &worker_receiver.endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "worker-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("RUST_LOG", "warn"),
        ],
        Stdio::inherit(),
    )
    .await;
    let script = r#"echo "TP=$TRACEPARENT""#;
    let first = local_event(&app, "traced", "bash", script).await;
    let second = local_event(&app, "chained", "bash", script).await;
    let (status, body) = app
        .post(
            &format!("/api/v1/events/{first}/actions"),
            &json!({"trigger": "on_success", "action": {"type": "run_event", "event_id": second}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");

    let job = run_traced(&app, &first).await;
    let done = wait_finished(&app, &job).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, chained) = app.get(&format!("/api/v1/jobs?root_job_id={job}")).await;
    let chained_id = chained["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["id"] != job.as_str())
        .and_then(|j| j["id"].as_str())
        .map(str::to_owned);
    let chained_id = match chained_id {
        Some(id) => id,
        None => {
            // The chained job is queued in the completion's transaction; list again.
            let found = wait_job(&app, &job, |_| true).await;
            panic!("no chained job of {job}: {chained} ({found})");
        }
    };
    let chained_done = wait_finished(&app, &chained_id).await;
    assert_eq!(chained_done["status"], "succeeded", "{chained_done}");

    // The scripts' TRACEPARENT carries the client's trace.
    let (trace, script_parent) = script_traceparent(&app, &job).await;
    assert_eq!(trace, CLIENT_TRACE);
    let (chained_trace, chained_parent) = script_traceparent(&app, &chained_id).await;
    assert_eq!(
        chained_trace, CLIENT_TRACE,
        "the chained job left the trace"
    );

    let api_spans = api_receiver
        .wait_for("the api's spans of both jobs", |s| {
            named(s, "job.enqueue").len() == 1
                && named(s, "job.dispatch").len() == 2
                && named(s, "job.complete").len() == 2
                && named(s, "action.run_event").len() == 1
        })
        .await;
    let worker_spans = worker_receiver
        .wait_for("the worker's spans of both jobs", |s| {
            named(s, "job").len() == 2 && named(s, "executor.run").len() == 2
        })
        .await;
    for span in named(&api_spans, "job.enqueue") {
        assert_eq!(
            span.parent_span_id, CLIENT_SPAN,
            "the client's span is the parent"
        );
        assert_eq!(span.service, "api-under-test");
        assert_eq!(span.protocol, "grpc");
    }
    for span in named(&worker_spans, "job") {
        assert_eq!(span.service, "worker-under-test");
        assert_eq!(span.protocol, "http/protobuf");
    }
    // Parent links: enqueue → dispatch → worker run → executor run (the script's parent) →
    // completion → action → the chained job's dispatch.
    let id_of = |spans: &[&ReceivedSpan]| -> Vec<String> {
        spans.iter().map(|s| s.span_id.clone()).collect()
    };
    let enqueue = id_of(&named(&api_spans, "job.enqueue"));
    let dispatches = named(&api_spans, "job.dispatch");
    let runs = named(&worker_spans, "job");
    let executor_runs = named(&worker_spans, "executor.run");
    let completes = named(&api_spans, "job.complete");
    let actions = id_of(&named(&api_spans, "action.run_event"));
    let first_dispatch = dispatches
        .iter()
        .find(|d| enqueue.contains(&d.parent_span_id))
        .expect("a dispatch under the enqueue span");
    let first_run = runs
        .iter()
        .find(|r| r.parent_span_id == first_dispatch.span_id)
        .expect("the worker's run under the dispatch span");
    let first_exec = executor_runs
        .iter()
        .find(|e| e.parent_span_id == first_run.span_id)
        .expect("the executor's run under the worker's run");
    assert_eq!(
        script_parent, first_exec.span_id,
        "the script's TRACEPARENT names the executor's span"
    );
    assert!(
        completes
            .iter()
            .any(|c| c.parent_span_id == first_run.span_id),
        "the completion is a child of the worker's run: {completes:#?}"
    );
    let second_dispatch = dispatches
        .iter()
        .find(|d| actions.contains(&d.parent_span_id))
        .expect("the chained job's dispatch under the action's span");
    let second_run = runs
        .iter()
        .find(|r| r.parent_span_id == second_dispatch.span_id)
        .expect("the chained job's run under its dispatch");
    assert!(
        executor_runs
            .iter()
            .any(|e| e.parent_span_id == second_run.span_id && e.span_id == chained_parent),
        "the chained script's TRACEPARENT names its executor span"
    );
}

/// Without any exporter, the client's trace context still reaches the script unchanged (and
/// is stored with the job for a retry).
#[tokio::test]
async fn without_an_exporter_the_clients_traceparent_reaches_the_script() {
    let app = spawn_app().await;
    let _worker = InProcessWorker::start(&app, 1).await;
    let event = local_event(&app, "plain", "bash", r#"echo "TP=$TRACEPARENT""#).await;
    let job = run_traced(&app, &event).await;
    let done = wait_finished(&app, &job).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        script_traceparent(&app, &job).await,
        (CLIENT_TRACE.to_owned(), CLIENT_SPAN.to_owned())
    );
    let stored: Option<String> =
        sqlx::query_scalar("SELECT trace_context FROM jobs WHERE id = $1::uuid")
            .bind(&job)
            .fetch_one(&app.pool)
            .await
            .expect("the job row");
    assert_eq!(stored, Some(format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")));

    // An invalid header is ignored (W3C): the job runs, with no trace.
    let response = app
        .request(Method::POST, &format!("/api/v1/events/{event}/run"))
        .header("traceparent", "not-a-traceparent")
        .json(&json!({}))
        .send()
        .await
        .expect("run");
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let job: Value = response.json().await.expect("json");
    let done = wait_finished(&app, job["job_id"].as_str().expect("id")).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

/// `BATON_LOG_FORMAT=json`: one JSON object per line, with the job's `job.id`, `event.id` and
/// `trace_id` on every line logged about it.
#[tokio::test]
async fn json_logs_carry_the_job_event_and_trace_ids() {
    let app = spawn_app().await;
    let mut worker = WorkerProcess::start_with_env(
        &app,
        &app.grpc_address,
        1,
        &["--allow-local", "--no-container"],
        &[("BATON_LOG_FORMAT", "json"), ("RUST_LOG", "info")],
        Stdio::piped(),
    )
    .await;
    let log = crate::support::LogLines::read(worker.child.stderr.take().expect("stderr"));
    let event = local_event(&app, "logged", "bash", "echo hi").await;
    let job = run_traced(&app, &event).await;
    let done = wait_finished(&app, &job).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let line = log
        .wait_for("the job's completion", |l| l.contains("run succeeded"))
        .await;
    let line: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(line["job.id"], job.as_str(), "{line}");
    assert_eq!(line["event.id"], event.as_str(), "{line}");
    assert_eq!(line["trace_id"], CLIENT_TRACE, "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    for other in log.lines() {
        assert!(
            serde_json::from_str::<Value>(&other).is_ok(),
            "not a JSON line: {other}"
        );
    }
}
