//! Conditional actions, evaluated in the completion's transaction: chained runs carry output to
//! input, triggers, delays, the chain depth limit, messages through the outbox.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use baton_api::model::Role;
use baton_proto::v1::{Assignment, ErrorKind, Finished};
use baton_proto::{ServerMsg, WorkerMsg};
use baton_tests::protocol::{ScriptedWorker, hello};
use baton_tests::receivers::{HttpReceiver, SmtpSink};
use baton_tests::{TestApp, bash_event, spawn_app, spawn_app_with, spawn_replica};
use serde_json::{Value, json};
use uuid::Uuid;

async fn worker(app: &TestApp) -> ScriptedWorker {
    let token = app.token(Role::Worker).await;
    ScriptedWorker::connect(&app.grpc_address, &token, hello(Uuid::now_v7(), 4))
        .await
        .0
}

async fn assignment(w: &mut ScriptedWorker) -> Assignment {
    w.next_matching(|m| match m {
        ServerMsg::Assignment(a) => Some(a.clone()),
        _ => None,
    })
    .await
}

/// Reports the assignment's run as ended: success with `output`/`condition`, or a script failure.
async fn finish(
    w: &mut ScriptedWorker,
    a: &Assignment,
    ok: bool,
    output: Option<Value>,
    condition: Option<bool>,
) {
    w.send(WorkerMsg::Finished(Finished {
        job_id: a.job_id.clone(),
        lease_token: a.lease_token,
        exit_code: Some(if ok { 0 } else { 1 }),
        error_kind: if ok {
            ErrorKind::Unspecified as i32
        } else {
            ErrorKind::Script as i32
        },
        error_message: if ok {
            String::new()
        } else {
            "exit code 1".into()
        },
        output_json: output.map(|o| o.to_string()).unwrap_or_default(),
        condition,
        ..Default::default()
    }))
    .await;
    w.next_matching(|m| match m {
        ServerMsg::FinishedAck(f) if f.job_id == a.job_id => Some(()),
        _ => None,
    })
    .await;
}

async fn event(app: &TestApp, name: &str) -> String {
    app.create_event(&bash_event(name)).await["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

async fn add_action(app: &TestApp, event: &str, body: Value) -> Value {
    let (status, action) = app
        .post(&format!("/api/v1/events/{event}/actions"), &body)
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{action}");
    action
}

#[tokio::test]
async fn output_flows_down_a_chain_with_parent_and_root_recorded() {
    let app = spawn_app().await;
    let (a, b, c) = (
        event(&app, "a").await,
        event(&app, "b").await,
        event(&app, "c").await,
    );
    add_action(
        &app,
        &a,
        json!({"trigger": "on_success", "action": {"type": "run_event", "event_id": b}}),
    )
    .await;
    add_action(
        &app,
        &b,
        json!({"trigger": "on_success", "action": {"type": "run_event", "event_id": c}}),
    )
    .await;
    let (_, listed) = app.get(&format!("/api/v1/events/{a}/actions")).await;
    assert_eq!(listed.as_array().expect("list").len(), 1);
    let mut w = worker(&app).await;
    let root = app.run_event(&a, &json!({"input": {"n": 1}})).await;
    let ja = assignment(&mut w).await;
    finish(&mut w, &ja, true, Some(json!({"n": 2})), None).await;
    let jb = assignment(&mut w).await;
    assert_eq!(
        serde_json::from_str::<Value>(&jb.input_json).expect("input"),
        json!({"n": 2})
    );
    assert_eq!(
        (jb.parent_job_id.as_str(), jb.root_job_id.as_str()),
        (root.as_str(), root.as_str())
    );
    finish(&mut w, &jb, true, Some(json!({"n": 3})), None).await;
    let jc = assignment(&mut w).await;
    assert_eq!(
        serde_json::from_str::<Value>(&jc.input_json).expect("input"),
        json!({"n": 3})
    );
    assert_eq!(
        (jc.parent_job_id.as_str(), jc.root_job_id.as_str()),
        (jb.job_id.as_str(), root.as_str())
    );
    finish(&mut w, &jc, true, None, None).await;
    let (_, chain) = app.get(&format!("/api/v1/jobs?root_job_id={root}")).await;
    let mut ids: Vec<&str> = chain["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|j| j["id"].as_str().expect("id"))
        .collect();
    ids.sort();
    let mut expected = vec![ja.job_id.as_str(), jb.job_id.as_str(), jc.job_id.as_str()];
    expected.sort();
    assert_eq!(ids, expected, "the whole chain is listed by its root");
    let (_, jc_view) = app.get(&format!("/api/v1/jobs/{}", jc.job_id)).await;
    assert_eq!(jc_view["depth"], 2);
}

#[tokio::test]
async fn each_trigger_fires_exactly_when_it_should() {
    let app = spawn_app().await;
    let src = event(&app, "src").await;
    let mut targets = std::collections::HashMap::new();
    for trigger in ["on_success", "on_failure", "always", "on_condition"] {
        let t = event(&app, &format!("after-{trigger}")).await;
        add_action(
            &app,
            &src,
            json!({"trigger": trigger, "action": {"type": "run_event", "event_id": t}}),
        )
        .await;
        targets.insert(t, trigger);
    }
    let mut w = worker(&app).await;
    // (succeeded?, condition) → triggers expected to fire
    for (ok, condition, expected) in [
        (true, None, vec!["on_success", "always"]),
        (false, None, vec!["on_failure", "always"]),
        (
            true,
            Some(true),
            vec!["on_success", "always", "on_condition"],
        ),
        (true, Some(false), vec!["on_success", "always"]),
    ] {
        let id = app.run_event(&src, &json!({})).await;
        let a = assignment(&mut w).await;
        assert_eq!(a.job_id, id);
        finish(&mut w, &a, ok, None, condition).await;
        let (_, children) = app.get(&format!("/api/v1/jobs?root_job_id={id}")).await;
        let mut fired: Vec<&str> = children["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter(|j| j["id"] != id.as_str())
            .map(|j| targets[j["event_id"].as_str().expect("event")])
            .collect();
        fired.sort();
        let mut expected = expected.clone();
        expected.sort();
        assert_eq!(fired, expected, "ok={ok} condition={condition:?}");
        // Drain the chained assignments (they are not the subject here).
        for _ in 0..expected.len() {
            let child = assignment(&mut w).await;
            finish(&mut w, &child, true, None, None).await;
        }
    }
}

#[tokio::test]
async fn a_delayed_action_queues_its_run_for_later() {
    let app = spawn_app().await;
    let (a, b) = (event(&app, "now").await, event(&app, "later").await);
    add_action(&app, &a, json!({"trigger": "always", "delay_seconds": 3600, "action": {"type": "run_event", "event_id": b}})).await;
    let mut w = worker(&app).await;
    let root = app.run_event(&a, &json!({})).await;
    let ja = assignment(&mut w).await;
    finish(&mut w, &ja, true, None, None).await;
    let (_, chain) = app
        .get(&format!("/api/v1/jobs?root_job_id={root}&status=queued"))
        .await;
    let later = &chain["items"][0];
    let run_at: chrono::DateTime<chrono::Utc> = later["run_at"]
        .as_str()
        .expect("run_at")
        .parse()
        .expect("time");
    assert!(
        run_at > chrono::Utc::now() + chrono::Duration::minutes(59),
        "{later}"
    );
    assert!(
        w.try_next(Duration::from_millis(500)).await.is_none(),
        "not dispatched before it is due"
    );
}

/// A job queued for later reaches an idle worker when it is due — promptly, not at the next
/// fallback poll (5 s): the queue notification says it is for later, so the dispatcher looks
/// up when it is due even though it had learnt that nothing was waiting.
#[tokio::test]
async fn a_job_for_later_is_dispatched_when_due() {
    let app = spawn_app().await;
    let ev = event(&app, "soon").await;
    let mut w = worker(&app).await;
    // One run now, so the dispatcher has looked and found nothing else waiting.
    app.run_event(&ev, &json!({})).await;
    let first = assignment(&mut w).await;
    finish(&mut w, &first, true, None, None).await;

    let run_at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let job_id = app
        .run_event(&ev, &json!({"run_at": run_at.to_rfc3339()}))
        .await;
    let a = assignment(&mut w).await;
    let arrived = chrono::Utc::now();
    assert_eq!(a.job_id, job_id);
    assert!(
        arrived >= run_at,
        "dispatched {arrived} before it was due ({run_at})"
    );
    assert!(
        arrived < run_at + chrono::Duration::milliseconds(2500),
        "dispatched {arrived}, long after it was due ({run_at})"
    );
}

/// A run queued through one replica reaches a worker connected to another promptly: the
/// queuing replica announces it (one notification per burst of runs), well before the other's
/// fallback poll (5 s) would find it.
#[tokio::test]
async fn a_run_queued_on_one_replica_reaches_a_worker_on_another() {
    let app = spawn_app().await;
    let other = baton_tests::spawn_replica(app.database_url.clone(), |_| {}).await;
    let ev = event(&app, "across").await;
    let mut w = worker(&other).await;
    for _ in 0..3 {
        let queued_at = std::time::Instant::now();
        let job_id = app.run_event(&ev, &json!({})).await;
        let a = assignment(&mut w).await;
        assert_eq!(a.job_id, job_id);
        assert!(
            queued_at.elapsed() < Duration::from_millis(2500),
            "took {:?} to reach the other replica's worker",
            queued_at.elapsed()
        );
        finish(&mut w, &a, true, None, None).await;
    }
}

#[tokio::test]
async fn a_cycle_stops_at_the_depth_limit_with_a_recorded_reason() {
    let app = spawn_app_with(|c| c.chain_depth_limit = 3).await;
    let (a, b) = (event(&app, "ping").await, event(&app, "pong").await);
    add_action(
        &app,
        &a,
        json!({"trigger": "always", "action": {"type": "run_event", "event_id": b}}),
    )
    .await;
    add_action(
        &app,
        &b,
        json!({"trigger": "always", "action": {"type": "run_event", "event_id": a}}),
    )
    .await;
    let mut w = worker(&app).await;
    let root = app.run_event(&a, &json!({})).await;
    let mut last = String::new();
    for _ in 0..4 {
        let j = assignment(&mut w).await;
        finish(&mut w, &j, true, None, None).await;
        last = j.job_id;
    }
    assert!(
        w.try_next(Duration::from_millis(500)).await.is_none(),
        "the chain stopped"
    );
    let (_, chain) = app.get(&format!("/api/v1/jobs?root_job_id={root}")).await;
    assert_eq!(
        chain["items"].as_array().expect("items").len(),
        4,
        "root + 3 links"
    );
    let (_, last_job) = app.get(&format!("/api/v1/jobs/{last}")).await;
    let note = last_job["action_notes"][0].as_str().expect("a note");
    assert!(note.contains("chain depth limit of 3"), "{note}");
}

#[tokio::test]
async fn messages_go_out_through_the_outbox_and_survive_a_receiver_that_is_down() {
    // The receiver listens on loopback, which the outbox reaches only when allowed.
    let app = spawn_app_with(|c| c.http_allow_cidrs = "127.0.0.0/8".parse().expect("cidr")).await;
    // The webhook receiver's port is reserved but nothing listens yet.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let ev = event(&app, "notify-me").await;
    for (channel, path) in [
        ("webhook", "hook"),
        ("slack", "slack"),
        ("discord", "discord"),
    ] {
        add_action(&app, &ev, json!({"trigger": "on_failure", "action": {"type": "send_message", "channel": channel,
            "target": format!("http://{addr}/{path}"), "template": "{{event.name}} failed: {{job.error.message}}"}})).await;
    }
    let mut w = worker(&app).await;
    let id = app.run_event(&ev, &json!({})).await;
    let a = assignment(&mut w).await;
    finish(&mut w, &a, false, None, None).await;
    // First attempts fail (connection refused) and are rescheduled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM message_outbox WHERE attempts >= 1 AND status = 'pending' AND last_error IS NOT NULL")
            .fetch_one(&app.pool).await.expect("count");
        if failed == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "first attempts did not happen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let receiver = HttpReceiver::default();
    let server = receiver.serve(tokio::net::TcpListener::bind(addr).await.expect("rebind"));
    let got = receiver.wait_for(3).await;
    server.abort();
    let texts: Vec<String> = got
        .iter()
        .map(|m| {
            m.get("text")
                .or(m.get("content"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert!(
        texts.iter().all(|t| t == "notify-me failed: exit code 1"),
        "{texts:?}"
    );
    let webhook = got
        .iter()
        .find(|m| m.get("job").is_some())
        .expect("the webhook carries the job");
    assert_eq!(webhook["job"]["id"], id.as_str());
    assert!(
        got.iter().any(|m| m.get("content").is_some()),
        "discord shape"
    );
    // Marked delivered once the receiver answered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let delivered: i64 =
            sqlx::query_scalar("SELECT count(*) FROM message_outbox WHERE status = 'delivered'")
                .fetch_one(&app.pool)
                .await
                .expect("count");
        if delivered == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {delivered} marked delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server on `ip` that counts the requests it gets and answers each: `/go?to=URL` with a
/// 307 redirect to URL, `/endless` with a 500 whose body never ends (1 KiB every 10 ms), and
/// anything else with 200.
async fn counting_server(ip: &str) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use axum::body::Body;
    use axum::extract::{Query, Request};
    use axum::response::{IntoResponse, Redirect, Response};

    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(
        move |query: Query<std::collections::HashMap<String, String>>, request: Request| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                if let Some(to) = query.get("to") {
                    return Redirect::temporary(to).into_response();
                }
                if request.uri().path() == "/endless" {
                    let chunks = futures::stream::unfold((), |()| async {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Some((Ok::<_, std::io::Error>(vec![b'x'; 1024]), ()))
                    });
                    let mut response = Response::new(Body::from_stream(chunks));
                    *response.status_mut() = reqwest::StatusCode::INTERNAL_SERVER_ERROR;
                    return response;
                }
                "ok".into_response()
            }
        },
    );
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, hits)
}

/// Fails a run of a new event whose `on_failure` actions send webhooks to `targets`, and
/// returns each message's `last_error` once every one has failed an attempt (30 s at most).
async fn webhook_errors(app: &TestApp, targets: &[String]) -> Vec<String> {
    let ev = event(app, "hooked").await;
    for target in targets {
        add_action(
            app,
            &ev,
            json!({"trigger": "on_failure", "action": {"type": "send_message",
            "channel": "webhook", "target": target, "template": "{{event.name}} failed"}}),
        )
        .await;
    }
    let mut w = worker(app).await;
    app.run_event(&ev, &json!({})).await;
    let a = assignment(&mut w).await;
    finish(&mut w, &a, false, None, None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let errors: Vec<Option<String>> =
            sqlx::query_scalar("SELECT last_error FROM message_outbox ORDER BY target")
                .fetch_all(&app.pool)
                .await
                .expect("outbox");
        if errors.len() == targets.len() && errors.iter().all(Option::is_some) {
            return errors.into_iter().flatten().collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every message failed an attempt: {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_outbox_refuses_internal_addresses_by_default() {
    let app = spawn_app().await;
    let (addr, hits) = counting_server("127.0.0.1").await;
    let targets = [
        format!("http://{addr}/hook"),
        format!("http://localhost:{}/hook", addr.port()),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("http://[::ffff:127.0.0.1]:{}/hook", addr.port()),
    ];
    let errors = webhook_errors(&app, &targets).await;
    for error in &errors {
        assert!(
            error.contains("internal addresses is refused")
                && error.contains("BATON_HTTP_ALLOW_CIDRS"),
            "{error}"
        );
    }
    assert!(
        errors.iter().any(|e| e.contains("`localhost` resolves to")),
        "{errors:?}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "nothing reached the receiver"
    );
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM message_outbox WHERE status = 'delivered'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(delivered, 0);
}

#[tokio::test]
async fn the_outbox_follows_no_redirect_to_an_internal_address() {
    // The webhook's own host (127.0.0.2) is allowed; where it redirects (127.0.0.1) is not.
    let app = spawn_app_with(|c| c.http_allow_cidrs = "127.0.0.2/32".parse().expect("cidr")).await;
    let (front, front_hits) = counting_server("127.0.0.2").await;
    let (inner, inner_hits) = counting_server("127.0.0.1").await;
    let targets = [
        format!("http://{front}/go?to=http://{inner}/internal"),
        format!(
            "http://{front}/go?to=http://localhost:{}/internal",
            inner.port()
        ),
    ];
    let errors = webhook_errors(&app, &targets).await;
    for error in &errors {
        assert!(error.contains("internal addresses is refused"), "{error}");
    }
    assert!(
        front_hits.load(Ordering::SeqCst) >= 2,
        "the allowed host was called"
    );
    assert_eq!(
        inner_hits.load(Ordering::SeqCst),
        0,
        "no redirect was followed"
    );
}

#[tokio::test]
async fn a_failing_webhook_is_read_only_a_bounded_prefix() {
    let app = spawn_app_with(|c| c.http_allow_cidrs = "127.0.0.0/8".parse().expect("cidr")).await;
    let (addr, _) = counting_server("127.0.0.1").await;
    let started = tokio::time::Instant::now();
    // The answer is a 500 whose body never ends: the attempt must end without reading it all.
    let errors = webhook_errors(&app, &[format!("http://{addr}/endless")]).await;
    let took = started.elapsed();
    let error = &errors[0];
    assert!(error.contains("answered 500"), "{error}");
    assert!(
        error.contains("xxxxxxxx"),
        "the body's beginning is kept: {error}"
    );
    assert!(
        error.len() < 1024,
        "only a short prefix is stored: {} bytes",
        error.len()
    );
    // The client's 15 s request timeout would have ended an unbounded read, without the text.
    assert!(took < Duration::from_secs(12), "the attempt took {took:?}");
}

#[tokio::test]
async fn email_goes_through_smtp() {
    let sink = SmtpSink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let smtp_url = format!("smtp://{}", listener.local_addr().expect("addr"));
    let _server = sink.serve(listener);
    let app = spawn_app_with(|c| {
        c.smtp_url = Some(smtp_url);
        c.smtp_from = "baton@example.test".into();
    })
    .await;
    let ev = event(&app, "mailer").await;
    add_action(&app, &ev, json!({"trigger": "on_success", "action": {"type": "send_message", "channel": "email",
        "target": "ops@example.test", "subject": "{{event.name}} ok", "template": "rows: {{job.output.rows}}"}})).await;
    let mut w = worker(&app).await;
    app.run_event(&ev, &json!({})).await;
    let a = assignment(&mut w).await;
    finish(&mut w, &a, true, Some(json!({"rows": 7})), None).await;
    let mail = sink.wait_for(1).await.remove(0);
    assert_eq!(mail.from, "baton@example.test");
    assert_eq!(mail.to, vec!["ops@example.test".to_owned()]);
    assert!(mail.data.contains("Subject: mailer ok"), "{}", mail.data);
    assert!(mail.data.contains("rows: 7"), "{}", mail.data);
}

#[tokio::test]
async fn actions_are_validated() {
    let app = spawn_app().await;
    let ev = event(&app, "v").await;
    for (body, field) in [
        (
            json!({"trigger": "sometimes", "action": {"type": "run_event", "event_id": ev}}),
            "trigger",
        ),
        (
            json!({"trigger": "always", "action": {"type": "run_event", "event_id": Uuid::now_v7()}}),
            "action.event_id",
        ),
        (
            json!({"trigger": "always", "delay_seconds": -1, "action": {"type": "run_event", "event_id": ev}}),
            "delay_seconds",
        ),
        (
            json!({"trigger": "always", "action": {"type": "send_message", "channel": "pigeon", "target": "x"}}),
            "action",
        ),
        (
            json!({"trigger": "always", "action": {"type": "send_message", "channel": "webhook", "target": "ftp://x"}}),
            "action.target",
        ),
        (
            json!({"trigger": "always", "action": {"type": "send_message", "channel": "email", "target": "nobody"}}),
            "action.target",
        ),
        (
            json!({"trigger": "always", "action": {"type": "send_message", "channel": "slack", "target": "http://x/y", "template": "{{ oops"}}),
            "action.template",
        ),
    ] {
        let (status, err) = app
            .post(&format!("/api/v1/events/{ev}/actions"), &body)
            .await;
        assert!(status.is_client_error(), "{body}: {status}");
        assert_eq!(err["error"]["field"], field, "{body}: {err}");
    }
    let (status, _) = app
        .post(
            &format!("/api/v1/events/{}/actions", Uuid::now_v7()),
            &json!({"trigger": "always", "action": {"type": "run_event", "event_id": ev}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    let action = add_action(
        &app,
        &ev,
        json!({"trigger": "always", "action": {"type": "run_event", "event_id": ev}}),
    )
    .await;
    let (status, _) = app
        .delete(&format!(
            "/api/v1/events/{ev}/actions/{}",
            action["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn the_next_step_runs_exactly_once_even_if_the_api_dies_right_after_a_completion() {
    let app = spawn_app().await;
    let (a, b) = (event(&app, "first").await, event(&app, "second").await);
    add_action(
        &app,
        &a,
        json!({"trigger": "on_success", "action": {"type": "run_event", "event_id": b}}),
    )
    .await;
    let token = app.token(Role::Worker).await;
    let worker_id = Uuid::now_v7();
    let (mut w, _) = ScriptedWorker::connect(&app.grpc_address, &token, hello(worker_id, 1)).await;
    let root = app.run_event(&a, &json!({})).await;
    let ja = assignment(&mut w).await;
    finish(&mut w, &ja, true, Some(json!({"x": 1})), None).await;
    // The replica dies right after recording the completion; another takes over.
    let database_url = app.database_url.clone();
    app.stop().await;
    drop(w);
    let other = spawn_replica(database_url, |_| {}).await;
    let mut h = hello(worker_id, 1);
    h.running = vec![baton_proto::v1::HeldJob {
        job_id: ja.job_id.clone(),
        lease_token: ja.lease_token,
    }];
    let (mut w, welcome) = ScriptedWorker::connect(&other.grpc_address, &token, h).await;
    assert!(
        welcome.resumed[0].finished,
        "the completion was recorded before the crash"
    );
    let jb = assignment(&mut w).await;
    assert_eq!(
        serde_json::from_str::<Value>(&jb.input_json).expect("input"),
        json!({"x": 1})
    );
    finish(&mut w, &jb, true, None, None).await;
    let (_, chain) = other.get(&format!("/api/v1/jobs?root_job_id={root}")).await;
    assert_eq!(
        chain["items"].as_array().expect("items").len(),
        2,
        "exactly one next step"
    );
}
