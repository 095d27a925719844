//! Jobs on the container executor, through the api: the worker offers `container` when a
//! Docker engine answers, and runs each job in a fresh container of the default runtime image
//! (built by `deploy/images/build` when missing).

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use baton_tests::spawn_app;
use serde_json::json;

use crate::chains::{data_flows, placed_event};
use crate::support::{InProcessWorker, all_lines, wait_finished};

/// Builds the default runtime images once per test binary (quick when they exist).
pub(crate) fn ensure_images() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .join("deploy/images/build");
        let status = Command::new(&script)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(status.success(), "{} failed: {status}", script.display());
    });
}

/// An in-process worker offering `container` (and nothing else that could take the jobs).
async fn container_worker(app: &baton_tests::TestApp) -> InProcessWorker {
    ensure_images();
    InProcessWorker::start_with(app, 2, |c| c.allow_local = false).await
}

#[tokio::test]
async fn bash_and_python_jobs_run_in_containers() {
    let app = spawn_app().await;
    let worker = container_worker(&app).await;
    let placement = json!({"executor": "container"});
    let bash = placed_event(
        &app,
        "in-a-container",
        "bash",
        r#"source baton.sh
echo "hello from $(id -u)"
baton_output "{\"shell\": \"bash\", \"input\": $(baton_input)}""#,
        &placement,
    )
    .await;
    let python = placed_event(
        &app,
        "py-in-a-container",
        "python",
        "import baton\nprint('python here')\nbaton.output({'sum': baton.input()['a'] + 1})",
        &placement,
    )
    .await;

    let id = app.run_event(&bash, &json!({"input": {"x": 1}})).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"], json!({"shell": "bash", "input": {"x": 1}}));
    let lines = all_lines(&app, &id).await;
    assert!(
        lines.iter().any(|l| l["text"] == "hello from 10001"),
        "the run's output is collected, as the image's unprivileged user: {lines:?}"
    );

    let id = app.run_event(&python, &json!({"input": {"a": 41}})).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"], json!({"sum": 42}));
    let lines = all_lines(&app, &id).await;
    assert!(
        lines.iter().any(|l| l["text"] == "python here"),
        "{lines:?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn the_chain_runs_with_every_step_in_a_container() {
    let app = spawn_app().await;
    let worker = container_worker(&app).await;
    data_flows(&app, &json!({"executor": "container"})).await;
    worker.stop().await;
}

/// The startup window's rule on the container executor (see `policies`).
#[tokio::test]
async fn the_startup_window_marks_early_exits_in_containers() {
    let app = spawn_app().await;
    let worker = container_worker(&app).await;
    crate::policies::startup_window_cases(&app, &json!({"executor": "container"})).await;
    worker.stop().await;
}
