//! A report the api cannot store never leaves a job `running`: values PostgreSQL refuses fail
//! the run as an `output` error at once, and a completion the database refuses (injected with a
//! real trigger) is re-sent by the worker until it lands, or reported as an infrastructure
//! failure if it keeps being refused.

use std::time::{Duration, Instant};

use serde_json::json;

use baton_tests::faults::refuse_successes;

use crate::support::{InProcessWorker, local_event, wait_finished};

#[tokio::test]
async fn a_nul_byte_in_a_variable_fails_the_job_as_output_within_seconds() {
    let app = baton_tests::spawn_app().await;
    let ev = local_event(
        &app,
        "nul-var",
        "bash",
        r#"set -e; mkdir -p "$BATON_DIR/out/vars"; printf 'a\0b' > "$BATON_DIR/out/vars/k"; echo done"#,
    )
    .await;
    let worker = InProcessWorker::start(&app, 1).await;
    let started = Instant::now();
    let id = app.run_event(&ev, &json!({})).await;
    let job = wait_finished(&app, &id).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["kind"], "output", "{job}");
    assert!(
        job["error"]["message"]
            .as_str()
            .expect("message")
            .contains("NUL"),
        "{job}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_completion_the_database_refuses_for_a_moment_is_sent_again() {
    let app = baton_tests::spawn_app().await;
    // More refusals than the api's own retry of a failed group absorbs.
    refuse_successes(&app.pool, 4).await;
    let ev = local_event(&app, "refused-once", "bash", "echo hi").await;
    let worker = InProcessWorker::start(&app, 1).await;
    let id = app.run_event(&ev, &json!({})).await;
    let job = tokio::time::timeout(Duration::from_secs(60), wait_finished(&app, &id))
        .await
        .expect("the job finished in time");
    assert_eq!(job["status"], "succeeded", "{job}");
    let refused: i64 = sqlx::query_scalar("SELECT last_value FROM refusals")
        .fetch_one(&app.pool)
        .await
        .expect("sequence");
    assert!(refused >= 5, "the trigger refused {refused} times");
    worker.stop().await;
}

#[tokio::test]
async fn a_completion_the_database_always_refuses_fails_the_job_with_the_reason() {
    let app = baton_tests::spawn_app().await;
    refuse_successes(&app.pool, i64::MAX).await;
    let ev = local_event(&app, "refused-always", "bash", "echo hi").await;
    let worker = InProcessWorker::start(&app, 1).await;
    let id = app.run_event(&ev, &json!({})).await;
    let job = tokio::time::timeout(Duration::from_secs(60), wait_finished(&app, &id))
        .await
        .expect("the job finished in time");
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["kind"], "infrastructure", "{job}");
    let message = job["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("refused this run's completion") && message.contains("injected"),
        "{job}"
    );
    worker.stop().await;
}
