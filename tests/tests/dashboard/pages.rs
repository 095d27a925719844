//! Sign in, create an event through the form, run it, watch its live log render a red line
//! red while it runs, cancel a long run, see what a viewer may not do, and draw a chain.

use baton_api::model::Role;
use baton_tests::worker::{InProcessWorker, wait_finished, wait_job};
use baton_tests::{TestApp, spawn_app};
use fantoccini::{Client, Locator};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::browser::{Driver, element, eventually, js, screenshot};

/// The script of the long run: a red line at once, a 256-colour bold line a few seconds later
/// (arrives over the live stream), hostile markup, progress, then a long sleep.
const SCRIPT: &str = r#"printf '\033[31mDANGER red line\033[0m and plain\n'
echo '<img src=x onerror="document.title=1">&amp; <script>window.pwned=1</script>'
echo 'PROGRESS: 40'
sleep 3
printf '\033[1;38;5;208mLIVE-LINE\033[0m\n'
sleep 600
"#;

async fn sign_in(client: &Client, app: &TestApp, token: &str) {
    client
        .goto(&format!("{}/", app.address))
        .await
        .expect("open /");
    // Not signed in: the runs page sends the browser to the sign-in form.
    eventually("the sign-in form is shown", || async {
        client
            .current_url()
            .await
            .is_ok_and(|u| u.path() == "/login")
    })
    .await;
    element(client, "#token")
        .await
        .send_keys(token)
        .await
        .expect("type the token");
    element(client, "form[action='/login'] button[type=submit]")
        .await
        .click()
        .await
        .expect("sign in");
    element(client, "nav a[aria-current=page]").await;
}

async fn sign_out(client: &Client) {
    element(client, "form.signout button")
        .await
        .click()
        .await
        .expect("sign out");
    element(client, "#token").await;
}

async fn text_of(client: &Client, css: &str) -> String {
    element(client, css).await.text().await.unwrap_or_default()
}

/// Waits until the page's `h1` reads `expected` (a click's navigation may still be under way:
/// the old page, or a stale element, reads otherwise).
async fn heading_becomes(client: &Client, expected: &str) {
    eventually(&format!("the heading reads {expected:?}"), || async {
        text_of(client, "h1").await == expected
    })
    .await;
}

/// Creates an event through the API and returns its id.
async fn api_event(app: &TestApp, name: &str, content: &str) -> String {
    let event = app
        .create_event(
            &json!({"name": name, "runtime": "bash", "executor": "local", "content": content}),
        )
        .await;
    event["id"].as_str().expect("id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_drives_runs_live_in_a_real_browser() {
    let app = spawn_app().await;
    let _worker = InProcessWorker::start(&app, 4).await;
    let driver = Driver::start().await;
    let client = driver.browser().await;

    // A wrong token is refused on the form itself.
    client
        .goto(&format!("{}/login", app.address))
        .await
        .expect("open /login");
    element(&client, "#token")
        .await
        .send_keys("baton_not_a_token")
        .await
        .expect("type");
    element(&client, "form[action='/login'] button")
        .await
        .click()
        .await
        .expect("submit");
    let refusal = text_of(&client, "#token-error").await;
    assert!(refusal.contains("unknown or revoked token"), "{refusal}");

    sign_in(&client, &app, &app.admin_token).await;
    heading_becomes(&client, "Runs").await;
    // The session cookie is HttpOnly: the page's scripts cannot read it.
    assert_eq!(js(&client, "return document.cookie").await, json!(""));

    // Create an event through the form.
    client
        .goto(&format!("{}/events/new", app.address))
        .await
        .expect("open the form");
    element(&client, "#f-name")
        .await
        .send_keys("long-red")
        .await
        .expect("name");
    element(&client, "#f-content")
        .await
        .send_keys(SCRIPT)
        .await
        .expect("script");
    element(&client, "#f-executor")
        .await
        .select_by_value("local")
        .await
        .expect("executor");
    screenshot(&client, "event-form").await;
    element(&client, "#save-event")
        .await
        .click()
        .await
        .expect("create");
    heading_becomes(&client, "Event long-red").await;
    let event_url = client.current_url().await.expect("url");
    let event_id = event_url.path().trim_start_matches("/events/").to_owned();
    let (_, stored) = app.get(&format!("/api/v1/events/{event_id}")).await;
    assert_eq!(stored["content"], json!(SCRIPT.replace("\r\n", "\n")));
    assert_eq!(stored["executor"], "local");

    // A bad input is refused with the field named, and nothing runs.
    let input = element(&client, "#run-input").await;
    input.clear().await.expect("clear");
    input.send_keys("{not json").await.expect("type");
    element(&client, "#run-button")
        .await
        .click()
        .await
        .expect("run");
    let error = text_of(&client, "p.error[role=alert]").await;
    assert!(error.starts_with("input"), "{error}");

    // Run it with a JSON input.
    let input = element(&client, "#run-input").await;
    input.clear().await.expect("clear");
    input.send_keys(r#"{"rows": 3}"#).await.expect("type");
    element(&client, "#run-button")
        .await
        .click()
        .await
        .expect("run");
    eventually("the run's page opens", || async {
        client
            .current_url()
            .await
            .is_ok_and(|u| u.path().starts_with("/runs/"))
    })
    .await;
    let run_url = client.current_url().await.expect("url");
    let job_id = run_url.path().trim_start_matches("/runs/").to_owned();
    let (_, job) = app.get(&format!("/api/v1/jobs/{job_id}")).await;
    assert_eq!(job["input"], json!({"rows": 3}));
    js(&client, "window.__sameDocument = true; return 1").await;

    // The red line, rendered red, while the job runs.
    let red = element(&client, "#log .a-f1").await;
    assert!(red.text().await.expect("text").contains("DANGER red line"));
    let color = js(
        &client,
        "return getComputedStyle(document.querySelector('#log .a-f1')).color",
    )
    .await;
    let rgb: Vec<u32> = color
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("rgb(")
        .trim_end_matches(')')
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    assert!(
        rgb.len() >= 3 && rgb[0] >= 180 && rgb[1] <= 130 && rgb[2] <= 130,
        "not red: {color}"
    );
    let (_, now) = app.get(&format!("/api/v1/jobs/{job_id}")).await;
    assert_eq!(now["status"], "running", "{now}");

    // A line printed seconds later arrives without a reload, bold in palette colour 208.
    let live = element(&client, "#log .a-bold").await;
    assert!(live.text().await.expect("text").contains("LIVE-LINE"));
    let style = js(&client, "const s = getComputedStyle(document.querySelector('#log .a-bold')); return [s.color, s.fontWeight]").await;
    assert_eq!(style[0], "rgb(255, 135, 0)", "{style}");
    assert_eq!(
        js(&client, "return window.__sameDocument === true").await,
        json!(true)
    );
    // Log lines are text, never markup.
    assert_eq!(
        js(
            &client,
            "return document.querySelectorAll('#log img, #log script').length"
        )
        .await,
        json!(0)
    );
    assert_eq!(
        js(&client, "return window.pwned === undefined").await,
        json!(true)
    );
    assert!(
        text_of(&client, "#log")
            .await
            .contains("<img src=x onerror=")
    );
    // Progress shows in the summary.
    eventually("progress 40 is shown", || async {
        js(
            &client,
            "const p = document.querySelector('#summary progress'); return p ? p.value : -1",
        )
        .await
            == json!(40)
    })
    .await;
    screenshot(&client, "run-live").await;
    // Search keeps the matching lines.
    element(&client, "#log-search")
        .await
        .send_keys("danger")
        .await
        .expect("search");
    eventually("search filters the log", || async {
        js(
            &client,
            "return document.querySelectorAll('#log .line:not(.hidden)').length",
        )
        .await
            == json!(1)
    })
    .await;
    assert_eq!(text_of(&client, "#log-matches").await, "1 matching line");

    // The download is plain text.
    let response = app
        .request(Method::GET, &format!("/api/v1/jobs/{job_id}/logs.txt"))
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .headers()
            .get("content-disposition")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("attachment"))
    );
    let text = response.text().await.expect("text");
    assert!(text.starts_with("DANGER red line and plain\n"), "{text}");
    assert!(!text.contains('\u{1b}'));

    // The runs page lists it, live.
    client
        .goto(&format!("{}/", app.address))
        .await
        .expect("runs");
    element(&client, &format!("tr.run[data-id='{job_id}']")).await;
    assert!(text_of(&client, "#active").await.contains("long-red"));
    let second = app.run_event(&event_id, &json!({})).await;
    element(&client, &format!("tr.run[data-id='{second}']")).await;
    screenshot(&client, "runs").await;

    // Cancel the long run from its page.
    client
        .goto(&format!("{}/runs/{job_id}", app.address))
        .await
        .expect("run page");
    element(&client, "#cancel-button")
        .await
        .click()
        .await
        .expect("cancel");
    let cancelled = wait_finished(&app, &job_id).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    eventually("the page shows it cancelled", || async {
        client.find(Locator::Css("#run-status")).await.is_ok()
            && text_of(&client, "#run-status").await == "cancelled"
    })
    .await;
    element(&client, "#rerun-button").await;

    // A viewer sees no cancel button, and a forged cancel is refused.
    let viewer = app.token(Role::Viewer).await;
    wait_job(&app, &second, |j| j["status"] == "running").await;
    sign_out(&client).await;
    sign_in(&client, &app, &viewer).await;
    client
        .goto(&format!("{}/runs/{second}", app.address))
        .await
        .expect("run page");
    element(&client, "#summary").await;
    assert!(
        client
            .find_all(Locator::Css("#cancel-button, #kill-button"))
            .await
            .expect("find")
            .is_empty()
    );
    let forged = js(
        &client,
        &format!(
            "const csrf = document.querySelector('form.signout input[name=_csrf]').value;
             const post = (body) => fetch('/runs/{second}/cancel', {{method: 'POST', body: new URLSearchParams(body)}}).then(r => r.status);
             return Promise.all([post({{_csrf: csrf}}), post({{_csrf: 'forged'}}), post({{}})]);"
        ),
    )
    .await;
    assert_eq!(
        forged,
        json!([403, 403, 403]),
        "a viewer's cancel must be refused"
    );
    let (_, still) = app.get(&format!("/api/v1/jobs/{second}")).await;
    assert_eq!(still["status"], "running");
    assert_eq!(still["cancel_requested"], false);
    // As does the event form.
    client
        .goto(&format!("{}/events/new", app.address))
        .await
        .expect("form");
    heading_becomes(&client, "403 · Forbidden").await;
    let (status, _) = app
        .post(
            &format!("/api/v1/jobs/{second}/cancel?force=true"),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    // A chain of three runs is drawn as three nodes.
    let c = api_event(&app, "chain-c", "echo c").await;
    let b = api_event(&app, "chain-b", "echo b").await;
    let a = api_event(&app, "chain-a", "echo a").await;
    for (from, to) in [(&a, &b), (&b, &c)] {
        let (status, body) = app
            .post(
                &format!("/api/v1/events/{from}/actions"),
                &json!({"trigger": "on_success", "action": {"type": "run_event", "event_id": to}}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let root = app.run_event(&a, &json!({})).await;
    eventually("the chain ran", || async {
        let (_, page) = app.get(&format!("/api/v1/jobs?root_job_id={root}")).await;
        page["items"].as_array().is_some_and(|items| {
            items.len() == 3 && items.iter().all(|j| j["status"] == "succeeded")
        })
    })
    .await;
    client
        .goto(&format!("{}/runs/{root}", app.address))
        .await
        .expect("chain root");
    element(&client, "svg.graph").await;
    assert_eq!(
        js(
            &client,
            "return document.querySelectorAll('svg.graph g.node').length"
        )
        .await,
        json!(3)
    );
    screenshot(&client, "chain").await;

    other_pages(&client, &app, &event_id).await;
    client.close().await.expect("close the browser");
}

/// The remaining pages render with what they list, and are screenshotted.
async fn other_pages(client: &Client, app: &TestApp, event_id: &str) {
    let (status, _) = app
        .post(
            &format!("/api/v1/events/{event_id}/schedules"),
            &json!({"interval_seconds": 3600, "paused": false}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    for (key, value, secret) in [
        ("REGION", "eu-west-1", false),
        ("API_KEY", "s3cr3t-value-xyz", true),
    ] {
        let (status, body) = app
            .request(Method::PUT, &format!("/api/v1/variables/{key}"))
            .json(&json!({"value": value, "secret": secret}))
            .send()
            .await
            .map(|r| (r.status(), ()))
            .expect("put variable");
        assert!(status.is_success(), "{body:?}");
    }
    let failing = api_event(app, "always-fails", "echo nope >&2; exit 3").await;
    let dead = app.run_event(&failing, &json!({})).await;
    let finished: Value = wait_finished(app, &dead).await;
    assert_eq!(finished["dead"], true);

    for (path, name, expect) in [
        ("/events", "events", "long-red"),
        ("/schedules", "schedules", "every 3600s"),
        ("/workers", "workers", "connected"),
        ("/dead", "dead", "always-fails"),
        ("/variables", "variables", "REGION"),
        ("/servers", "servers", "No servers"),
    ] {
        client
            .goto(&format!("{}{path}", app.address))
            .await
            .expect("page");
        let main = text_of(client, "main").await;
        assert!(main.contains(expect), "{path} lacks {expect:?}: {main}");
        assert!(!main.contains("s3cr3t-value-xyz"), "{path} shows a secret");
        screenshot(client, name).await;
    }
    // Phone width: the runs page still fits.
    client.set_window_size(390, 844).await.expect("resize");
    client
        .goto(&format!("{}/", app.address))
        .await
        .expect("runs");
    element(client, "#runs-body").await;
    let overflow = js(
        client,
        "return document.documentElement.scrollWidth <= window.innerWidth + 1",
    )
    .await;
    assert_eq!(
        overflow,
        json!(true),
        "the runs page scrolls sideways on a phone"
    );
    screenshot(client, "runs-phone").await;
}
