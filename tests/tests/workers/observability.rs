//! Metrics as Prometheus scrapes them: an api process and a worker process run a success and a
//! failing job retried once; their `/metrics` count exactly that (each process has its own
//! counters). The example Prometheus and Grafana files of deploy/observability are checked
//! against those real scrapes: every metric the dashboard queries exists, the scrape config is
//! valid YAML with the expected jobs, the provisioning files name the dashboard's data source.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use baton_tests::{TestApp, test_database};
use serde_json::{Value, json};

use crate::support::{ApiProcess, WorkerProcess, local_event, wait_finished};

fn observability_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability")
}

/// The value of the series `series` (name and labels exactly as rendered), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Scrapes `url` until every series in `wanted` has exactly its value (120 s at most: the
/// database gauges follow within a refresh interval).
async fn scrape_until(url: &str, wanted: &[(&str, f64)]) -> String {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let text = match client.get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if wanted
            .iter()
            .all(|(series, expected)| value(&text, series) == Some(*expected))
        {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never showed {wanted:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The metric names a PromQL expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("baton_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn has_series(text: &str, name: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
    })
}

async fn start_worker(app: &TestApp, metrics: &str) -> WorkerProcess {
    WorkerProcess::start_with_env(
        app,
        &app.grpc_address,
        2,
        &["--allow-local", "--no-container"],
        &[("BATON_WORKER_METRICS_LISTEN", metrics)],
        Stdio::inherit(),
    )
    .await
}

#[tokio::test]
async fn metrics_count_runs_and_the_example_dashboard_queries_only_real_metrics() {
    let database = test_database().await;
    let api = ApiProcess::start(&database, &[("BATON_METRICS_REFRESH_SECONDS", "0.1")]).await;
    let app = api.app(&database).await;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let worker_metrics = format!("127.0.0.1:{metrics_port}");
    let _worker = start_worker(&app, &worker_metrics).await;

    let ok = local_event(&app, "fine", "bash", "echo fine").await;
    let failing = app
        .create_event(
            &json!({"name": "flaky", "runtime": "bash", "content": "exit 3",
                              "executor": "local", "max_attempts": 2, "retry_backoff_seconds": 0}),
        )
        .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let later = (chrono::Utc::now() + chrono::Duration::days(30)).to_rfc3339();
    let delayed = app
        .run_event(&ok, &json!({"priority": 7, "run_at": later}))
        .await;
    for job in [
        app.run_event(&ok, &json!({})).await,
        app.run_event(&failing, &json!({})).await,
    ] {
        let done = wait_finished(&app, &job).await;
        assert!(
            matches!(done["status"].as_str(), Some("succeeded" | "failed")),
            "{done}"
        );
    }

    let api_text = scrape_until(
        &format!("{}/metrics", app.address),
        &[
            ("baton_jobs_enqueued_total", 3.0),
            ("baton_jobs_finished_total{status=\"succeeded\"}", 1.0),
            ("baton_jobs_finished_total{status=\"failed\"}", 1.0),
            ("baton_jobs_retried_total", 1.0),
            (
                "baton_executor_errors_total{executor=\"local\",kind=\"script\"}",
                2.0,
            ),
            ("baton_job_duration_seconds_count{executor=\"local\"}", 3.0),
            ("baton_dispatch_latency_seconds_count", 3.0),
            ("baton_jobs_queued{priority=\"7\"}", 1.0),
            ("baton_workers_connected", 1.0),
            ("baton_worker_slots{state=\"total\"}", 2.0),
            // Exact: nothing else ran in this api process.
            ("baton_jobs_running", 0.0),
            ("baton_outbox_pending", 0.0),
            ("baton_worker_slots{state=\"busy\"}", 0.0),
        ],
    )
    .await;
    let worker_text = scrape_until(
        &format!("http://{worker_metrics}/metrics"),
        &[
            ("baton_worker_runs_total{result=\"succeeded\"}", 1.0),
            ("baton_worker_runs_total{result=\"script\"}", 2.0),
            ("baton_worker_slots{state=\"total\"}", 2.0),
            ("baton_worker_connected", 1.0),
            ("baton_worker_slots{state=\"busy\"}", 0.0),
            ("baton_worker_ssh_connections{state=\"open\"}", 0.0),
        ],
    )
    .await;

    // The dashboard: valid JSON, and every metric it queries is in these scrapes.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(observability_dir().join("grafana/dashboards/baton.json"))
            .expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr} reads no baton metric");
            for name in names {
                assert!(
                    has_series(&api_text, &name) || has_series(&worker_text, &name),
                    "the dashboard queries {name} ({expr}), which no scrape has"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 15, "only {queried} metric references");

    // The scrape config: YAML with one job for the api replicas and one for the workers.
    let prometheus: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(observability_dir().join("prometheus.yml"))
            .expect("read prometheus.yml"),
    )
    .expect("prometheus.yml is YAML");
    let jobs = prometheus["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    let names: Vec<&str> = jobs.iter().filter_map(|j| j["job_name"].as_str()).collect();
    assert_eq!(names, ["baton-api", "baton-worker"]);
    // Its targets are the compose file's services and ports.
    let compose: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(observability_dir().join("../../docker-compose.yml"))
            .expect("read docker-compose.yml"),
    )
    .expect("docker-compose.yml is YAML");
    let services = &compose["services"];
    for job in jobs {
        assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    }
    let api_targets = jobs[0]["static_configs"][0]["targets"]
        .as_sequence()
        .expect("api targets");
    assert!(!api_targets.is_empty());
    for target in api_targets {
        let (host, port) = target
            .as_str()
            .and_then(|t| t.split_once(':'))
            .expect("host:port");
        assert!(
            services[host].is_mapping(),
            "{host} is not a compose service"
        );
        assert_eq!(port, "8080", "the api's HTTP port in the compose file");
    }
    let workers = &jobs[1]["dns_sd_configs"][0];
    let worker_service = workers["names"][0].as_str().expect("worker DNS name");
    let listen = services[worker_service]["environment"]["BATON_WORKER_METRICS_LISTEN"]
        .as_str()
        .expect("the compose workers serve their metrics");
    assert_eq!(
        Some(listen.rsplit(':').next().expect("port")),
        workers["port"].as_u64().map(|p| p.to_string()).as_deref(),
        "Prometheus scrapes the workers' metrics port"
    );

    // Grafana provisioning: the data source the dashboard selects, and the dashboards folder.
    let datasources: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            observability_dir().join("grafana/provisioning/datasources/prometheus.yml"),
        )
        .expect("read the data source"),
    )
    .expect("YAML");
    let uid = datasources["datasources"][0]["uid"].as_str().expect("uid");
    assert_eq!(
        datasources["datasources"][0]["type"].as_str(),
        Some("prometheus")
    );
    assert_eq!(
        dashboard["templating"]["list"][0]["current"]["value"].as_str(),
        Some(uid)
    );
    let providers: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            observability_dir().join("grafana/provisioning/dashboards/baton.yml"),
        )
        .expect("read the dashboard provider"),
    )
    .expect("YAML");
    assert_eq!(providers["providers"][0]["type"].as_str(), Some("file"));

    let (status, _) = app
        .post(&format!("/api/v1/jobs/{delayed}/cancel"), &json!({}))
        .await;
    assert!(status.is_success());
    scrape_until(
        &format!("{}/metrics", app.address),
        &[("baton_jobs_finished_total{status=\"cancelled\"}", 1.0)],
    )
    .await;
}
