//! Probes and the OpenAPI document.

use baton_tests::{send, spawn_app};
use reqwest::{Method, StatusCode};

#[tokio::test]
async fn probes_answer_without_a_token() {
    let app = spawn_app().await;
    let (status, body) = send(app.anonymous(Method::GET, "/healthz")).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, body) = send(app.anonymous(Method::GET, "/readyz")).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
}

#[tokio::test]
async fn readyz_fails_when_the_database_is_gone() {
    let app = spawn_app().await;
    app.pool.close().await;
    let (status, body) = send(app.anonymous(Method::GET, "/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

#[tokio::test]
async fn openapi_documents_every_route() {
    let app = spawn_app().await;
    let (status, spec) = send(app.anonymous(Method::GET, "/api/v1/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["openapi"].as_str().expect("version").starts_with("3."));
    let paths = spec["paths"].as_object().expect("paths");
    for path in [
        "/api/v1/events",
        "/api/v1/events/{id}",
        "/api/v1/events/{id}/run",
        "/api/v1/jobs",
        "/api/v1/jobs/{id}",
        "/api/v1/jobs/{id}/cancel",
        "/api/v1/jobs/{id}/logs",
        "/api/v1/tokens",
        "/api/v1/tokens/{id}",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(spec["components"]["schemas"]["NewEvent"].is_object());
    assert!(spec["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn openapi_declares_the_answers_every_operation_can_give() {
    let app = spawn_app().await;
    let (status, spec) = send(app.anonymous(Method::GET, "/api/v1/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    let paths = spec["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            let responses = op["responses"].as_object().expect("responses");
            let public = path == "/healthz" || path == "/readyz";
            for status in ["401", "403", "429"] {
                assert_eq!(
                    responses.contains_key(status),
                    !public,
                    "{method} {path}: {status} documented? {responses:?}"
                );
            }
            if op.get("requestBody").is_some() {
                for status in ["400", "413", "422"] {
                    assert!(responses.contains_key(status), "{method} {path}: {status}");
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} operations in the document");
}

#[tokio::test]
async fn metrics_report_queue_depth_in_prometheus_format() {
    let app = spawn_app().await;
    let ev = app.create_event(&baton_tests::bash_event("m")).await;
    app.run_event(ev["id"].as_str().expect("id"), &serde_json::json!({}))
        .await;
    let response = app
        .anonymous(Method::GET, "/metrics")
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("text");
    assert!(text.contains("baton_jobs{status=\"queued\"} 1"), "{text}");
    assert!(text.contains("baton_workers_connected 0"), "{text}");
}
