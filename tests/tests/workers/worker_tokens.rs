//! Worker tokens with real workers: one whose token is revoked (through another replica than
//! the one it is connected to) is cut off and runs nothing more; one whose token is bound to
//! other labels cannot take jobs meant for `prod` workers by declaring `env=prod`.

use std::time::Duration;

use baton_tests::{TestApp, spawn_app, spawn_replica};
use baton_worker::config::Labels;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{InProcessWorker, WorkerProcess, local_event, wait_finished};

async fn workers(app: &TestApp) -> Vec<Value> {
    let (_, list) = app.get("/api/v1/workers").await;
    list.as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_worker_whose_token_is_revoked_is_cut_off_and_runs_nothing_more() {
    let app = spawn_app().await;
    let other = spawn_replica(app.database_url.clone(), |_| {}).await;
    let ev = local_event(&app, "revocation", "sh", "echo ran").await;
    // Connected to replica 2.
    let _first = WorkerProcess::start(&other, 1).await;
    let before = app.run_event(&ev, &json!({})).await;
    let job = wait_finished(&app, &before).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let first_worker = job["worker_id"].clone();

    let (_, tokens) = app.get("/api/v1/tokens").await;
    let token = tokens
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["role"] == "worker")
        .expect("the worker's token")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, _) = app.delete(&format!("/api/v1/tokens/{token}")).await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT);
    // Replica 2 ends its stream; it cannot come back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let list = workers(&app).await;
        let me = list
            .iter()
            .find(|w| w["id"] == first_worker)
            .expect("the worker is listed");
        if me["connected"] == false {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revoked worker is still connected: {me}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = app.run_event(&ev, &json!({})).await;
    // Watched for a few of its reconnection attempts: nothing reaches it.
    let watch = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < watch {
        let (_, job) = app.get(&format!("/api/v1/jobs/{after}")).await;
        assert_eq!(job["status"], "queued", "{job}");
        let connected = workers(&app)
            .await
            .iter()
            .any(|w| w["id"] == first_worker && w["connected"] == true);
        assert!(!connected, "the revoked worker reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = InProcessWorker::start(&app, 1).await;
    let job = wait_finished(&app, &after).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_ne!(job["worker_id"], first_worker);
    second.stop().await;
}

async fn bound_token(app: &TestApp, env: &str) -> String {
    let (status, body) = app
        .post(
            "/api/v1/tokens",
            &json!({"name": format!("{env} workers"), "role": "worker",
                    "worker_labels": {"env": env}, "executors": ["local"]}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    body["token"].as_str().expect("token").to_owned()
}

async fn labelled_worker(app: &TestApp, token: String, env: &str, id: Uuid) -> InProcessWorker {
    let env = env.to_owned();
    InProcessWorker::start_with(app, 1, move |c| {
        c.token = token;
        c.labels = Labels::from_pairs([("env", env)]);
        c.no_container = true;
        c.worker_id = Some(id);
    })
    .await
}

#[tokio::test]
async fn a_worker_bound_to_staging_cannot_take_prod_jobs_by_declaring_prod() {
    let app = spawn_app().await;
    let ev = app
        .create_event(
            &json!({"name": "deploy-prod", "runtime": "sh", "content": "echo deployed",
                              "executor": "local", "labels": {"env": "prod"}}),
        )
        .await;
    let job = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let liar_id = Uuid::now_v7();
    let liar = labelled_worker(&app, bound_token(&app, "staging").await, "prod", liar_id).await;
    // Watched over several of its attempts: refused each time, the job waits.
    let watch = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < watch {
        let (_, j) = app.get(&format!("/api/v1/jobs/{job}")).await;
        assert_eq!(j["status"], "queued", "{j}");
        assert!(
            !workers(&app)
                .await
                .iter()
                .any(|w| w["id"] == liar_id.to_string()),
            "the worker declaring labels beyond its token was let in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let honest_id = Uuid::now_v7();
    let honest = labelled_worker(&app, bound_token(&app, "prod").await, "prod", honest_id).await;
    let done = wait_finished(&app, &job).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["worker_id"], honest_id.to_string());
    honest.stop().await;
    drop(liar);
}
