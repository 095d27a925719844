//! Rate limits (per token, per address without a token, failed authentications per address)
//! and the REST API's own database pool, which a REST flood cannot take from the workers.

use std::time::Duration;

use baton_api::model::Role;
use baton_proto::v1::Finished;
use baton_proto::{ServerMsg, WorkerMsg};
use baton_tests::protocol::{ScriptedWorker, hello};
use baton_tests::{bash_event, send, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds")
}

#[tokio::test]
async fn a_token_past_its_rate_gets_429_with_retry_after_and_others_do_not() {
    let app = spawn_app_with(|c| {
        c.rate_limit_per_second = 1;
        c.rate_limit_burst = 5;
    })
    .await;
    let mut limited = None;
    for _ in 0..20 {
        let response = app
            .request(Method::GET, "/api/v1/events")
            .send()
            .await
            .expect("sent");
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
    }
    let limited = limited.expect("the burst of 5 runs out within 20 requests");
    let wait = retry_after(&limited);
    assert!((1..=2).contains(&wait));
    let body: serde_json::Value = limited.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("token")
    );
    // Another token has its own bucket (created with a direct insert: the admin is limited).
    let (secret_info, secret) =
        baton_api::auth::create_token(&app.pool, "other", Role::Viewer, None)
            .await
            .expect("token");
    drop(secret_info);
    let (status, _) = send(app.request_as(&secret, Method::GET, "/api/v1/events")).await;
    assert_eq!(status, StatusCode::OK);
    // After the wait it says, the first token is served again.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (status, body) = app.get("/api/v1/events").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn guessing_tokens_is_limited_per_address_without_touching_the_database() {
    let app = spawn_app_with(|c| c.auth_failures_per_second = 1).await;
    // The admin token authenticates once: it is known from then on.
    let (status, _) = app.get("/api/v1/events").await;
    assert_eq!(status, StatusCode::OK);
    // A burst of 10 failures, then 429 for tokens not seen to authenticate.
    let mut statuses = Vec::new();
    for i in 0..15 {
        let guess = format!("baton_guess_{i:040}");
        let response = app
            .request_as(&guess, Method::GET, "/api/v1/events")
            .send()
            .await
            .expect("sent");
        statuses.push(response.status().as_u16());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(retry_after(&response) >= 1);
        }
    }
    assert_eq!(&statuses[..10], &[401; 10], "{statuses:?}");
    assert_eq!(&statuses[10..], &[429; 5], "{statuses:?}");
    // Refused before the lookup: it needs no database at all.
    let (status, _) = app.get("/api/v1/events").await;
    assert_eq!(status, StatusCode::OK, "a known token is not affected");
    app.http_pool.close().await;
    let (status, body) =
        send(app.request_as("baton_guess_again", Method::GET, "/api/v1/events")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
}

#[tokio::test]
async fn requests_without_a_token_are_limited_per_address() {
    let app = spawn_app_with(|c| c.anonymous_rate_limit_per_second = 2).await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let (status, _) = send(app.anonymous(Method::GET, "/healthz")).await;
        statuses.push(status.as_u16());
    }
    assert_eq!(
        &statuses[..4],
        &[200; 4],
        "burst of twice the rate: {statuses:?}"
    );
    assert!(statuses[4..].contains(&429), "{statuses:?}");
    // Tokens are not counted against the anonymous budget.
    let (status, _) = app.get("/api/v1/events").await;
    assert_eq!(status, StatusCode::OK);
}

/// With every connection of the REST pool held (as by a flood of slow REST requests), a worker
/// still connects, is assigned a job, and has its result recorded: the worker protocol has a
/// pool of its own.
#[tokio::test]
async fn a_rest_flood_cannot_starve_the_worker_protocol() {
    let app = spawn_app_with(|c| c.http_db_pool_size = 2).await;
    let ev = app.create_event(&bash_event("starve")).await;
    let job = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let worker_token = app.token(Role::Worker).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(app.http_pool.acquire().await.expect("a REST connection"));
    }
    let work = async {
        let (mut worker, _) =
            ScriptedWorker::connect(&app.grpc_address, &worker_token, hello(Uuid::now_v7(), 1))
                .await;
        let assignment = worker
            .next_matching(|m| match m {
                ServerMsg::Assignment(a) => Some(a.clone()),
                _ => None,
            })
            .await;
        assert_eq!(assignment.job_id, job);
        worker
            .send(WorkerMsg::Finished(Finished {
                job_id: job.clone(),
                lease_token: assignment.lease_token,
                exit_code: Some(0),
                ..Default::default()
            }))
            .await;
        worker
            .next_matching(|m| match m {
                ServerMsg::FinishedAck(_) => Some(()),
                _ => None,
            })
            .await;
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .expect("the worker was served while the REST pool was exhausted");
    let status: String = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1::uuid")
        .bind(&job)
        .fetch_one(&app.pool)
        .await
        .expect("status");
    assert_eq!(status, "succeeded");
    drop(held);
    let (status, body) = app.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("succeeded"))
    );
}
