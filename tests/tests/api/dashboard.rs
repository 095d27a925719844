//! The dashboard over plain HTTP (no browser): sessions and their cookies, CSRF, roles as in
//! the API, escaping of everything a run can write, reading without JavaScript.

use baton_api::model::Role;
use baton_tests::worker::{InProcessWorker, wait_finished};
use baton_tests::{TestApp, spawn_app};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use serde_json::json;

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<(String, String)> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| {
            let value = v.split(';').next().unwrap_or_default()[name.len() + 1..].to_owned();
            (value, v.to_owned())
        })
}

/// A signed-in browser, as far as HTTP goes: the session cookie and the page's CSRF token.
struct Browser {
    client: reqwest::Client,
    base: String,
    cookie: String,
    csrf: String,
}

impl Browser {
    async fn sign_in(app: &TestApp, token: &str) -> Self {
        let client = no_redirects();
        let form = client
            .get(format!("{}/login", app.address))
            .send()
            .await
            .expect("login page");
        let (nonce, _) = cookie(form.headers(), "baton_login").expect("nonce cookie");
        let answer = client
            .post(format!("{}/login", app.address))
            .header("cookie", format!("baton_login={nonce}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("_csrf={nonce}&token={token}&next=%2F"))
            .send()
            .await
            .expect("sign in");
        assert_eq!(answer.status(), StatusCode::SEE_OTHER);
        let (session, raw) = cookie(answer.headers(), "baton_session").expect("session cookie");
        assert!(
            raw.contains("HttpOnly") && raw.contains("SameSite=Strict"),
            "{raw}"
        );
        let mut browser = Self {
            client,
            base: app.address.clone(),
            cookie: format!("baton_session={session}"),
            csrf: String::new(),
        };
        let (_, page) = browser.get("/").await;
        browser.csrf = page
            .split("name=\"_csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("a CSRF token in the page")
            .to_owned();
        browser
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .expect("get");
        (r.status(), r.text().await.expect("body"))
    }

    async fn post(&self, path: &str, body: &str) -> (StatusCode, String) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned())
            .send()
            .await
            .expect("post");
        let location = r
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_owned);
        let status = r.status();
        (status, location.unwrap_or(r.text().await.expect("body")))
    }
}

#[tokio::test]
async fn pages_need_a_session_and_sessions_follow_their_token() {
    let app = spawn_app().await;
    let client = no_redirects();
    let r = client
        .get(format!("{}/?status=failed", app.address))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/login?next=/%3Fstatus%3Dfailed");
    // The dashboard sends a strict policy with every page.
    let login = client
        .get(format!("{}/login", app.address))
        .send()
        .await
        .expect("login");
    let csp = login.headers()["content-security-policy"]
        .to_str()
        .expect("csp");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    // Behind a TLS proxy the cookies are Secure.
    let https = client
        .get(format!("{}/login", app.address))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .expect("login");
    assert!(
        cookie(https.headers(), "baton_login")
            .expect("cookie")
            .1
            .contains("; Secure")
    );

    // A sign-in without the double-submitted nonce is refused.
    let forged = client
        .post(format!("{}/login", app.address))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("_csrf=x&token={}", app.admin_token))
        .send()
        .await
        .expect("post");
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert!(cookie(forged.headers(), "baton_session").is_none());

    // A worker token cannot sign in.
    let worker = app.token(Role::Worker).await;
    let form = client
        .get(format!("{}/login", app.address))
        .send()
        .await
        .expect("login");
    let (nonce, _) = cookie(form.headers(), "baton_login").expect("nonce");
    let refused = client
        .post(format!("{}/login", app.address))
        .header("cookie", format!("baton_login={nonce}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("_csrf={nonce}&token={worker}"))
        .send()
        .await
        .expect("post");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    // Revoking the token ends its sessions at once.
    let (status, created) = app
        .post(
            "/api/v1/tokens",
            &json!({"name": "ops", "role": "operator"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let operator = Browser::sign_in(&app, created["token"].as_str().expect("token")).await;
    assert_eq!(operator.get("/").await.0, StatusCode::OK);
    let (status, _) = app
        .delete(&format!(
            "/api/v1/tokens/{}",
            created["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(operator.get("/").await.0, StatusCode::SEE_OTHER);

    // Signing out ends the session; the old cookie no longer opens anything.
    let admin = Browser::sign_in(&app, &app.admin_token).await;
    let (status, _) = admin.post("/logout", "_csrf=wrong").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(admin.get("/workers").await.0, StatusCode::OK);
    let (status, location) = admin
        .post("/logout", &format!("_csrf={}", admin.csrf))
        .await;
    assert_eq!(
        (status, location.as_str()),
        (StatusCode::SEE_OTHER, "/login")
    );
    assert_eq!(admin.get("/workers").await.0, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn forms_need_the_csrf_token_and_the_role_the_api_needs() {
    let app = spawn_app().await;
    let _worker = InProcessWorker::start(&app, 2).await;
    let event = app
        .create_event(&baton_tests::bash_event("csrf-target"))
        .await;
    let event_id = event["id"].as_str().expect("id");
    let job = app.run_event(event_id, &json!({})).await;
    wait_finished(&app, &job).await;

    let admin = Browser::sign_in(&app, &app.admin_token).await;
    // Without the token (or with another session's), nothing happens.
    let (status, _) = admin.post(&format!("/runs/{job}/rerun"), "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let other = Browser::sign_in(&app, &app.admin_token).await;
    let (status, _) = admin
        .post(
            &format!("/runs/{job}/rerun"),
            &format!("_csrf={}", other.csrf),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, page) = app.get(&format!("/api/v1/jobs?event_id={event_id}")).await;
    assert_eq!(page["items"].as_array().expect("items").len(), 1);

    // A viewer sees no run, rerun or edit controls, and the server refuses them anyway.
    let viewer = Browser::sign_in(&app, &app.token(Role::Viewer).await).await;
    let (_, run_page) = viewer.get(&format!("/runs/{job}")).await;
    assert!(!run_page.contains("rerun-button") && !run_page.contains("cancel-button"));
    let (_, event_page) = viewer.get(&format!("/events/{event_id}")).await;
    assert!(!event_page.contains("run-button") && !event_page.contains("/edit\""));
    let (status, body) = viewer
        .post(
            &format!("/runs/{job}/rerun"),
            &format!("_csrf={}", viewer.csrf),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("operator role"), "{body}");
    let (status, _) = viewer
        .post(
            &format!("/events/{event_id}/run"),
            &format!("_csrf={}&input=%7B%7D", viewer.csrf),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = viewer
        .post(
            "/events",
            &format!("_csrf={}&name=x&runtime=bash&content=true", viewer.csrf),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // An operator may rerun: the dead-letter form reruns each selected run.
    let (status, location) = admin
        .post(
            "/dead/rerun",
            &format!("_csrf={}&id={job}&id={job}", admin.csrf),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{location}");
    let (_, page) = app.get(&format!("/api/v1/jobs?event_id={event_id}")).await;
    assert_eq!(page["items"].as_array().expect("items").len(), 3);
    // A row's own button reruns that run only, whatever else is ticked.
    let (status, location) = admin
        .post(
            "/dead/rerun",
            &format!("_csrf={}&id={job}&id={job}&only={job}", admin.csrf),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(location.starts_with("/runs/"), "{location}");
    let (_, page) = app.get(&format!("/api/v1/jobs?event_id={event_id}")).await;
    assert_eq!(page["items"].as_array().expect("items").len(), 4);

    // A bad field in the event form is named, and the form comes back filled in.
    let (status, body) = admin
        .post(
            "/events",
            &format!(
                "_csrf={}&name=bad&runtime=bash&content=true&timeout_seconds=abc",
                admin.csrf
            ),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body.contains("timeout_seconds"), "{body}");
    assert!(body.contains("value=\"bad\""), "{body}");

    // Run policies through the form: stored on the event, shown again when editing.
    let (status, location) = admin
        .post(
            "/events",
            &format!(
                "_csrf={}&name=policed&runtime=bash&content=true&concurrency_max=2\
                 &concurrency_key=%7B%7B+input.host+%7D%7D&concurrency_strategy=skip\
                 &stuck_after_seconds=30&startup_window_seconds=3",
                admin.csrf
            ),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{location}");
    let (_, events) = app.get("/api/v1/events?limit=500").await;
    let policed = events["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|e| e["name"] == "policed")
        .expect("the event made by the form")
        .clone();
    assert_eq!(
        policed["concurrency"],
        json!({"max": 2, "key": "{{ input.host }}", "strategy": "skip"})
    );
    assert_eq!(policed["stuck_after_seconds"], 30);
    assert_eq!(policed["startup_window_seconds"], 3);
    let id = policed["id"].as_str().expect("id");
    let (_, edit) = admin.get(&format!("/events/{id}/edit")).await;
    assert!(edit.contains("value=\"{{ input.host }}\""), "{edit}");
    assert!(edit.contains("<option value=\"skip\" selected>"), "{edit}");
    // A key without a maximum is named.
    let (status, body) = admin
        .post(
            "/events",
            &format!(
                "_csrf={}&name=nomax&runtime=bash&content=true&concurrency_key=k",
                admin.csrf
            ),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body.contains("concurrency.max"), "{body}");
}

#[tokio::test]
async fn everything_a_run_writes_is_escaped() {
    let app = spawn_app().await;
    let _worker = InProcessWorker::start(&app, 2).await;
    let hostile = "<script>alert(1)</script>";
    let event = app
        .create_event(&json!({
            "name": "x<b>bold</b>", "runtime": "bash", "executor": "local",
            "description": "<img src=x onerror=alert(2)>",
            "content": "echo '<script>alert(1)</script>'; printf '\\033[38;2;1;2;3m\"><svg onload=alert(3)>\\033[0m\\n'; source baton.sh; baton_output '{\"k\": \"</pre><script>alert(4)</script>\"}'"
        }))
        .await;
    let event_id = event["id"].as_str().expect("id");
    let job = app
        .run_event(
            event_id,
            &json!({"input": {"q": "<iframe src=javascript:alert(5)>"}}),
        )
        .await;
    let done = wait_finished(&app, &job).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let admin = Browser::sign_in(&app, &app.admin_token).await;
    for path in [
        format!("/runs/{job}"),
        "/".to_owned(),
        format!("/events/{event_id}"),
        "/events".to_owned(),
    ] {
        let (status, page) = admin.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        for raw in [
            hostile,
            "<b>bold</b>",
            "<img src=x",
            "<svg onload",
            "<iframe",
            "</pre><script>",
        ] {
            assert!(!page.contains(raw), "{path} contains raw {raw:?}");
        }
    }
    let (_, page) = admin.get(&format!("/runs/{job}")).await;
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(
        page.contains(
            "<span style=\"color:#010203;\">&quot;&gt;&lt;svg onload=alert(3)&gt;</span>"
        ),
        "{page}"
    );
    // Read without JavaScript: the log, output and input are in the page itself.
    assert!(page.contains("&lt;iframe src=javascript:alert(5)&gt;"));
    // (minijinja also escapes `/`.)
    assert!(
        page.contains("&lt;&#x2f;pre&gt;&lt;script&gt;alert(4)"),
        "{page}"
    );
}

#[tokio::test]
async fn a_workflow_run_page_draws_its_steps_as_a_graph() {
    let app = spawn_app().await;
    let _worker = InProcessWorker::start(&app, 4).await;
    let event = app
        .create_event(&json!({"name": "wf-step", "runtime": "noop", "executor": "local"}))
        .await;
    let e = event["id"].as_str().expect("id");
    let workflow = baton_tests::workflows::create_workflow(
        &app,
        &json!({"name": "dash-diamond", "steps": [
            {"id": "a", "event_id": e},
            {"id": "b", "event_id": e, "needs": ["a"]},
            {"id": "c", "event_id": e, "needs": ["a"]},
            {"id": "d", "event_id": e, "needs": ["b", "c"]}]}),
    )
    .await;
    let run_id = baton_tests::workflows::run_workflow(&app, &workflow, &json!({})).await;
    let run = baton_tests::workflows::wait_run_ended(&app, &run_id).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    let viewer = Browser::sign_in(&app, &app.token(Role::Viewer).await).await;
    let (status, page) = viewer.get(&format!("/workflow-runs/{run_id}")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("id=\"workflow-graph\""), "{page}");
    assert_eq!(page.matches("<g class=\"node").count(), 4, "{page}");
    // Each step links to its job's page; the edges are the four `needs`.
    let d_job = baton_tests::workflows::step(&run, "d")["job_ids"][0]
        .as_str()
        .expect("d's job")
        .to_owned();
    assert!(page.contains(&format!("href=\"/runs/{d_job}\"")), "{page}");
    let (_, job_page) = viewer.get(&format!("/runs/{d_job}")).await;
    assert!(
        job_page.contains(&format!("href=\"/workflow-runs/{run_id}\"")),
        "the step's run page links back to its workflow run"
    );
    let (status, list) = viewer.get("/workflows").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        list.contains("dash-diamond") && list.contains(&run_id),
        "{list}"
    );
    let (status, _) = viewer.get("/workflow-runs/not-a-uuid").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}
