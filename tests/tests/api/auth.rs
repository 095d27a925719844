//! Authentication (401), roles (403), token management and the audit log.

use baton_api::model::Role;
use std::time::{Duration, Instant};

use baton_tests::{bash_event, send, spawn_app, spawn_replica};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn missing_malformed_unknown_and_revoked_tokens_get_401() {
    let app = spawn_app().await;
    let (status, err) = send(app.anonymous(Method::GET, "/api/v1/events")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(err["error"]["code"], "unauthorized");
    let (status, _) = send(
        app.anonymous(Method::GET, "/api/v1/events")
            .header("authorization", "Basic abc"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(app.request_as("baton_wrong", Method::GET, "/api/v1/events")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let viewer = app.token(Role::Viewer).await;
    let (status, _) = send(app.request_as(&viewer, Method::GET, "/api/v1/events")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, tokens) = app.get("/api/v1/tokens").await;
    let id = token_id(&tokens, "viewer");
    assert!(
        tokens.to_string().find(&viewer).is_none(),
        "secrets are never listed"
    );
    let (status, _) = app.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = send(app.request_as(&viewer, Method::GET, "/api/v1/events")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// The id of the (first) token with `role` in a `GET /api/v1/tokens` answer.
fn token_id(tokens: &serde_json::Value, role: &str) -> String {
    tokens
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["role"] == role)
        .unwrap_or_else(|| panic!("no {role} token in {tokens}"))["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

/// Replicas remember verified tokens (so a busy client costs no token query per request);
/// a revocation on one replica must still reach the others at once, not after the cache's TTL.
#[tokio::test]
async fn a_token_revoked_on_one_replica_is_refused_by_the_others() {
    let app = spawn_app().await;
    let other = spawn_replica(app.database_url.clone(), |_| {}).await;
    let operator = app.token(Role::Operator).await;
    // Both replicas verify (and so cache) it.
    for replica in [&app, &other] {
        let (status, _) = send(replica.request_as(&operator, Method::GET, "/api/v1/events")).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, tokens) = app.get("/api/v1/tokens").await;
    let id = token_id(&tokens, "operator");
    let (status, _) = app.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The revoking replica refuses it before answering the DELETE.
    let (status, _) = send(app.request_as(&operator, Method::GET, "/api/v1/events")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The other hears of it by NOTIFY: well within the cache's 30 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = send(other.request_as(&operator, Method::GET, "/api/v1/events")).await;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            Instant::now() < deadline,
            "the other replica still accepts a token revoked 10 s ago"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn roles_allow_what_they_should_and_nothing_more() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("rbac")).await;
    let ev_id = ev["id"].as_str().expect("id").to_owned();
    let job_id = app.run_event(&ev_id, &json!({})).await;

    let operator = app.token(Role::Operator).await;
    let viewer = app.token(Role::Viewer).await;
    let worker = app.token(Role::Worker).await;

    // (method, path, body, lowest role allowed)
    let calls = [
        (Method::GET, "/api/v1/events".to_owned(), None, Role::Viewer),
        (
            Method::GET,
            format!("/api/v1/events/{ev_id}"),
            None,
            Role::Viewer,
        ),
        (Method::GET, "/api/v1/jobs".to_owned(), None, Role::Viewer),
        (
            Method::GET,
            format!("/api/v1/jobs/{job_id}"),
            None,
            Role::Viewer,
        ),
        (
            Method::GET,
            format!("/api/v1/jobs/{job_id}/logs"),
            None,
            Role::Viewer,
        ),
        (
            Method::POST,
            format!("/api/v1/events/{ev_id}/run"),
            Some(json!({})),
            Role::Operator,
        ),
        (
            Method::POST,
            "/api/v1/events".to_owned(),
            Some(bash_event("new")),
            Role::Admin,
        ),
        (
            Method::PATCH,
            format!("/api/v1/events/{ev_id}"),
            Some(json!({"priority": 1})),
            Role::Admin,
        ),
        (Method::GET, "/api/v1/tokens".to_owned(), None, Role::Admin),
        (
            Method::POST,
            "/api/v1/tokens".to_owned(),
            Some(json!({"name": "t", "role": "viewer"})),
            Role::Admin,
        ),
    ];
    for (method, path, body, needed) in calls {
        for (token, role) in [
            (&viewer, Role::Viewer),
            (&operator, Role::Operator),
            (&worker, Role::Worker),
        ] {
            let mut req = app.request_as(token, method.clone(), &path);
            if let Some(b) = &body {
                req = req.json(b);
            }
            let (status, answer) = send(req).await;
            if role.allows(needed) {
                assert!(
                    status.is_success(),
                    "{role} {method} {path}: {status} {answer}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{role} {method} {path}: {answer}"
                );
                assert_eq!(answer["error"]["code"], "forbidden");
            }
        }
    }
    // Operators cancel.
    let (status, _) = send(app.request_as(
        &operator,
        Method::POST,
        &format!("/api/v1/jobs/{job_id}/cancel"),
    ))
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) =
        send(app.request_as(&viewer, Method::DELETE, &format!("/api/v1/events/{ev_id}"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn token_requests_are_validated() {
    let app = spawn_app().await;
    for (body, field) in [
        (json!({"name": "x", "role": "root"}), "role"),
        (json!({"name": "", "role": "viewer"}), "name"),
        (json!({"role": "viewer"}), "name"),
    ] {
        let (status, err) = app.post("/api/v1/tokens", &body).await;
        assert!(status.is_client_error(), "{body}");
        let text = err.to_string();
        assert!(
            err["error"]["field"] == field || text.contains(field),
            "{body}: {err}"
        );
    }
    let (status, _) = app
        .delete("/api/v1/tokens/0190a0a0-0000-7000-8000-000000000000")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn every_mutating_call_is_audited() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("audited")).await;
    let id = ev["id"].as_str().expect("id");
    app.patch(&format!("/api/v1/events/{id}"), &json!({"priority": 3}))
        .await;
    let job = app.run_event(id, &json!({})).await;
    app.post(&format!("/api/v1/jobs/{job}/cancel"), &json!(null))
        .await;
    app.token(Role::Viewer).await;
    // A refused call is not audited as done.
    app.post("/api/v1/events", &json!({"name": ""})).await;

    let rows: Vec<(String, String, String, Option<String>)> =
        sqlx::query_as("SELECT actor, action, target_type, target_id FROM audit_log ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .expect("audit rows");
    let actions: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        actions,
        vec![
            "event.create",
            "event.update",
            "event.run",
            "job.cancel",
            "token.create"
        ]
    );
    assert!(rows.iter().all(|r| r.0 == "admin (BATON_ADMIN_TOKEN)"));
    assert_eq!(rows[0].3.as_deref(), Some(id));
    assert_eq!(rows[2].3.as_deref(), Some(job.as_str()));
}

/// A revoked BATON_ADMIN_TOKEN used to make the next start fail (its hash is stored, so
/// registering it again broke the unique constraint). The start must succeed, and the revoked
/// token must stay revoked.
#[tokio::test]
async fn a_revoked_bootstrap_admin_token_stays_revoked_and_the_api_still_starts() {
    let app = spawn_app().await;
    let second_admin = app.token(Role::Admin).await;
    let (_, tokens) = app.get("/api/v1/tokens").await;
    let bootstrap = tokens
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["name"] == "admin (BATON_ADMIN_TOKEN)")
        .expect("the bootstrap token")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, _) = app.delete(&format!("/api/v1/tokens/{bootstrap}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // Same configuration (BATON_ADMIN_TOKEN still set to the revoked token): it starts.
    let app = app.restart(|_| {}).await;
    let (status, _) = app.get("/api/v1/events").await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the revoked token is not re-activated"
    );
    let (status, _) = send(app.request_as(&second_admin, Method::GET, "/api/v1/events")).await;
    assert_eq!(status, StatusCode::OK);
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_tokens WHERE name = 'admin (BATON_ADMIN_TOKEN)' AND revoked_at IS NULL",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(live, 0, "no new row for the revoked token either");

    // With no live admin left at all, a start generates a fresh admin token (as a first
    // start does) rather than bringing the revoked one back.
    let (_, tokens) = send(app.request_as(&second_admin, Method::GET, "/api/v1/tokens")).await;
    let second_id = tokens
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["role"] == "admin" && t["revoked_at"].is_null())
        .expect("the second admin")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, _) = send(app.request_as(
        &second_admin,
        Method::DELETE,
        &format!("/api/v1/tokens/{second_id}"),
    ))
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let generated = baton_api::auth::bootstrap_admin(&app.pool, Some(baton_tests::ADMIN_TOKEN))
        .await
        .expect("the bootstrap succeeds")
        .expect("a fresh admin token is generated");
    assert_ne!(generated, baton_tests::ADMIN_TOKEN);
    let (status, _) = send(app.request_as(&generated, Method::GET, "/api/v1/tokens")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.get("/api/v1/events").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
