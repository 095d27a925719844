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
    app.http_pool.close().await;
    let (status, body) = send(app.anonymous(Method::GET, "/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

/// The database's own error (which names the database, its users, its hosts) goes to the log;
/// an anonymous caller reads a generic reason.
#[tokio::test]
async fn readyz_does_not_show_database_errors_to_anonymous_callers() {
    let app = spawn_app().await;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&app.pool)
        .await
        .expect("name");
    // From another database: PostgreSQL refuses this for the current one.
    let options: sqlx::postgres::PgConnectOptions = app.database_url.parse().expect("database URL");
    let mut admin: sqlx::PgConnection =
        <sqlx::PgConnection as sqlx::Connection>::connect_with(&options.database("postgres"))
            .await
            .expect("connect to postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false"
    )))
    .execute(&mut admin)
    .await
    .expect("refuse new connections");
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&database)
    .execute(&mut admin)
    .await
    .expect("drop the api's connections");
    let (status, body) = send(app.anonymous(Method::GET, "/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let text = body.to_string();
    assert!(
        !text.contains(&database)
            && !text.contains("accepting")
            && !text.contains("error returned"),
        "no database detail in {text}"
    );
    assert_eq!(body["status"], "unavailable");
    assert!(
        body["reason"]
            .as_str()
            .expect("reason")
            .contains("database"),
        "{body}"
    );
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
async fn metrics_report_queue_depth_in_prometheus_format() {
    let app = spawn_app().await;
    let ev = app.create_event(&baton_tests::bash_event("m")).await;
    app.run_event(ev["id"].as_str().expect("id"), &serde_json::json!({}))
        .await;
    let text = metrics_until(&app, "baton_jobs{status=\"queued\"} 1").await;
    assert!(text.contains("baton_workers_connected 0"), "{text}");
}

/// Scrapes until the text holds `wanted` (the gauges are refreshed in the background).
async fn metrics_until(app: &baton_tests::TestApp, wanted: &str) -> String {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let response = app
            .anonymous(Method::GET, "/metrics")
            .send()
            .await
            .expect("metrics");
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.expect("text");
        if text.contains(wanted) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{wanted} not in {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A scrape costs no query: the queue depth is read by a background task, so scrapes go on
/// answering the last reading (not zeros) while the database is out of reach, however often.
#[tokio::test]
async fn metrics_scrapes_do_not_query_the_database() {
    let app = baton_tests::spawn_app_with(|c| {
        c.metrics_refresh_interval = std::time::Duration::from_millis(100);
    })
    .await;
    let ev = app.create_event(&baton_tests::bash_event("m")).await;
    for _ in 0..2 {
        app.run_event(ev["id"].as_str().expect("id"), &serde_json::json!({}))
            .await;
    }
    metrics_until(&app, "baton_jobs{status=\"queued\"} 2").await;
    app.pool.close().await;
    app.http_pool.close().await;
    for _ in 0..50 {
        let started = std::time::Instant::now();
        let response = app
            .anonymous(Method::GET, "/metrics")
            .send()
            .await
            .expect("metrics");
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.expect("text");
        assert!(text.contains("baton_jobs{status=\"queued\"} 2"), "{text}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}

/// Every operation documents the answers any handler can give (rate limits, authentication,
/// bad parameters and bodies, an unavailable database), so no status is undocumented.
#[tokio::test]
async fn openapi_documents_the_common_error_statuses_of_every_operation() {
    let app = spawn_app().await;
    let (_, spec) = send(app.anonymous(Method::GET, "/api/v1/openapi.json")).await;
    let paths = spec["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("item") {
            let Some(responses) = op["responses"].as_object() else {
                continue;
            };
            let mut wanted = vec!["429", "503", "422"];
            if path.starts_with("/api/v1/") && path != "/api/v1/openapi.json" {
                wanted.extend(["401", "403"]);
            }
            if path.contains('{') {
                wanted.push("404");
            }
            if op.get("requestBody").is_some() {
                wanted.extend(["400", "413"]);
            }
            for code in wanted {
                assert!(
                    responses.contains_key(code),
                    "{method} {path} lacks {code}: {responses:?}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "{checked} operations");
    let stream = &paths["/api/v1/jobs/{id}/logs/stream"]["get"]["responses"]["429"];
    assert!(
        stream["description"]
            .as_str()
            .expect("description")
            .contains("STREAMS"),
        "{stream}"
    );
}
