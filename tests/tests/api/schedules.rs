//! Schedules: CRUD and validation, firing through the real loop on one and two replicas,
//! exactly once per nominal time, catch-up per `missed` mode, pause/resume, edits, and DST
//! days through the real firing transaction with an injected clock.
#![allow(clippy::unwrap_used)] // a panic is how a test reports a failure

use std::time::Duration;

use baton_api::schedule::firing;

use baton_tests::schedules::{eventually, fired_slots};
use baton_tests::{TestApp, bash_event, spawn_app, spawn_replica};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// Fires what is due at `now` with no master key (these schedules' events have no actions).
async fn fire_due(
    pool: &sqlx::PgPool,
    now: DateTime<Utc>,
) -> baton_api::storage::Result<firing::FireReport> {
    let effects = baton_api::actions::Effects {
        vault: baton_api::crypto::Vault::new(None).expect("vault"),
        chain_depth_limit: baton_api::actions::DEFAULT_CHAIN_DEPTH_LIMIT,
    };
    firing::fire_due(pool, now, &effects).await
}

const WAIT: Duration = Duration::from_secs(60);

async fn event(app: &TestApp, name: &str) -> String {
    app.create_event(&bash_event(name)).await["id"]
        .as_str()
        .expect("event id")
        .to_owned()
}

async fn schedule(app: &TestApp, event_id: &str, body: Value) -> Value {
    let (status, created) = app
        .post(&format!("/api/v1/events/{event_id}/schedules"), &body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

fn id_of(schedule: &Value) -> Uuid {
    schedule["id"].as_str().expect("id").parse().expect("uuid")
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("instant")
        .with_timezone(&Utc)
}

/// Asserts the slots are consecutive seconds, each once.
fn assert_every_second_once(slots: &[DateTime<Utc>]) {
    for pair in slots.windows(2) {
        assert_eq!(
            (pair[1] - pair[0]).num_seconds(),
            1,
            "a slot is missing or fired twice around {}: {slots:?}",
            pair[0]
        );
    }
}

#[tokio::test]
async fn schedules_crud_and_validation() {
    let app = spawn_app().await;
    let event_id = event(&app, "sched-crud").await;
    let created = schedule(
        &app,
        &event_id,
        json!({"cron": "0 */5 * * * *", "timezone": "Europe/Paris", "input": {"k": 1}, "jitter_seconds": 5}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["event_id"], json!(event_id));
    assert_eq!(created["missed"], "last");
    assert_eq!(created["max_catch_up"], 100);
    assert_eq!(created["paused"], false);
    assert_eq!(created["input"], json!({"k": 1}));
    let runs = created["next_runs"].as_array().expect("next_runs");
    assert_eq!(runs.len(), 5, "{created}");
    let mut previous = None;
    for run in runs {
        let text = run.as_str().unwrap();
        let at = DateTime::parse_from_rfc3339(text).expect("RFC 3339");
        assert!(
            text.ends_with("+01:00") || text.ends_with("+02:00"),
            "{text}"
        );
        assert_eq!(at.timestamp() % 300, 0, "{text}");
        if let Some(p) = previous {
            assert_eq!(at.timestamp() - p, 300);
        }
        previous = Some(at.timestamp());
    }
    assert!((0..=5).contains(&created["jitter_offset_seconds"].as_i64().unwrap()));

    let (status, got) = app.get(&format!("/api/v1/schedules/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["next_runs"], created["next_runs"]);
    let other = event(&app, "sched-crud-other").await;
    schedule(&app, &other, json!({"interval_seconds": 3600})).await;
    let (_, all) = app.get("/api/v1/schedules").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    let (_, mine) = app
        .get(&format!("/api/v1/schedules?event_id={event_id}"))
        .await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
    assert_eq!(mine["items"][0]["id"], json!(id));

    // PATCH switches to an interval (cron dropped), re-validated, next runs recomputed.
    let (status, patched) = app
        .patch(
            &format!("/api/v1/schedules/{id}"),
            &json!({"interval_seconds": 7200, "timezone": "America/New_York"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert!(patched.get("cron").is_none(), "{patched}");
    assert_eq!(patched["revision"], 2);
    let runs: Vec<i64> = patched["next_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            DateTime::parse_from_rfc3339(r.as_str().unwrap())
                .unwrap()
                .timestamp()
        })
        .collect();
    assert!(runs.windows(2).all(|w| w[1] - w[0] == 7200), "{patched}");
    let (status, bad_patch) = app
        .patch(
            &format!("/api/v1/schedules/{id}"),
            &json!({"timezone": "Nowhere/Land"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad_patch["error"]["field"], "timezone");

    // 422 naming the field.
    for (body, field) in [
        (json!({"cron": "not a cron"}), "cron"),
        (json!({"cron": "* * * *"}), "cron"),
        (json!({}), "cron"),
        (json!({"cron": "* * * * *", "interval_seconds": 5}), "cron"),
        (json!({"interval_seconds": 0}), "interval_seconds"),
        (
            json!({"interval_seconds": 10, "timezone": "Mars/Base"}),
            "timezone",
        ),
        (
            json!({"interval_seconds": 10, "start_at": "2030-01-02T00:00:00Z", "end_at": "2030-01-01T00:00:00Z"}),
            "end_at",
        ),
        (json!({"interval_seconds": 10, "missed": "some"}), "missed"),
        (
            json!({"interval_seconds": 10, "max_catch_up": 0}),
            "max_catch_up",
        ),
        (
            json!({"interval_seconds": 10, "jitter_seconds": -1}),
            "jitter_seconds",
        ),
        (json!({"interval_seconds": 10, "color": "red"}), "color"),
    ] {
        let (status, answer) = app
            .post(&format!("/api/v1/events/{event_id}/schedules"), &body)
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} → {answer}"
        );
        assert_eq!(answer["error"]["field"], field, "{body} → {answer}");
    }
    let (status, _) = app
        .post(
            &format!("/api/v1/events/{}/schedules", Uuid::now_v7()),
            &json!({"interval_seconds": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Roles: viewers read, operators pause, admins define.
    let viewer = app.token(baton_api::model::Role::Viewer).await;
    let operator = app.token(baton_api::model::Role::Operator).await;
    let (status, _) = baton_tests::send(
        app.request_as(
            &viewer,
            reqwest::Method::POST,
            &format!("/api/v1/events/{event_id}/schedules"),
        )
        .json(&json!({"interval_seconds": 10})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = baton_tests::send(app.request_as(
        &viewer,
        reqwest::Method::GET,
        &format!("/api/v1/schedules/{id}"),
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, paused) = baton_tests::send(app.request_as(
        &operator,
        reqwest::Method::POST,
        &format!("/api/v1/schedules/{id}/pause"),
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(paused["paused"], true);
    let (status, resumed) = app
        .post(&format!("/api/v1/schedules/{id}/resume"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resumed["paused"], false);

    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE target_type = 'schedule' AND target_id = $1",
    )
    .bind(&id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(audited, 4, "create, update, pause, resume");

    let (status, _) = app.delete(&format!("/api/v1/schedules/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, gone) = app.get(&format!("/api/v1/schedules/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(gone["error"]["code"], "schedule_not_found");
    app.stop().await;
}

#[tokio::test]
async fn a_schedule_every_second_fires_jobs_that_carry_it() {
    let app = spawn_app().await;
    let event_id = event(&app, "sched-every-second").await;
    let created = schedule(
        &app,
        &event_id,
        json!({"interval_seconds": 1, "input": {"from": "schedule"}}),
    )
    .await;
    let id = id_of(&created);
    let page = eventually(WAIT, "three scheduled jobs", || async {
        let (_, page) = app.get(&format!("/api/v1/jobs?schedule_id={id}")).await;
        (page["items"].as_array().map_or(0, Vec::len) >= 3).then_some(page)
    })
    .await;
    for item in page["items"].as_array().unwrap() {
        assert_eq!(item["schedule_id"], json!(id.to_string()));
        let (_, job) = app
            .get(&format!("/api/v1/jobs/{}", item["id"].as_str().unwrap()))
            .await;
        assert_eq!(job["schedule_id"], json!(id.to_string()));
        assert_eq!(job["input"], json!({"from": "schedule"}));
        let scheduled_for = utc(job["scheduled_for"].as_str().expect("scheduled_for"));
        let created_at = utc(job["created_at"].as_str().unwrap());
        assert!(created_at >= scheduled_for, "{job}");
        // Woken by its due time, not by a poll (generous for a loaded test machine).
        assert!(
            created_at - scheduled_for < chrono::Duration::seconds(2),
            "late fire: {job}"
        );
    }
    // Other jobs do not match the filter.
    app.run_event(&event_id, &json!({})).await;
    let (_, filtered) = app.get(&format!("/api/v1/jobs?schedule_id={id}")).await;
    assert!(
        filtered["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["schedule_id"] == json!(id.to_string()))
    );
    let (status, bad) = app.get("/api/v1/jobs?schedule_id=nope").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad["error"]["field"], "schedule_id");
    assert_every_second_once(&fired_slots(&app.pool, id).await);
    // The lag of every fire is a histogram at /metrics.
    let text = app
        .anonymous(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let fires: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("baton_schedule_lag_seconds_count "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no baton_schedule_lag_seconds in {text}"));
    assert!(fires >= 3.0, "{fires} fires counted");
    assert!(
        text.contains("baton_schedule_lag_seconds_bucket{le=\"0.05\"}"),
        "{text}"
    );
    app.stop().await;
}

#[tokio::test]
async fn two_replicas_fire_every_slot_exactly_once_when_one_stops() {
    let a = spawn_app().await;
    let b = spawn_replica(a.database_url.clone(), |_| {}).await;
    let event_id = event(&a, "sched-two-replicas").await;
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(id_of(
            &schedule(
                &a,
                &event_id,
                json!({"interval_seconds": 1, "missed": "all"}),
            )
            .await,
        ));
    }
    let count = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE schedule_id IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    eventually(WAIT, "both replicas firing for a few seconds", || {
        let pool = a.pool.clone();
        async move { (count(pool).await >= 8 * 4).then_some(()) }
    })
    .await;
    // One replica stops mid-way: the other keeps every schedule going, without a lease.
    let pool = b.pool.clone();
    a.stop().await;
    let at_stop = count(pool.clone()).await;
    eventually(WAIT, "the surviving replica firing on", || {
        let pool = pool.clone();
        async move { (count(pool).await >= at_stop + 8 * 4).then_some(()) }
    })
    .await;
    for id in &ids {
        let (status, _) = b
            .post(&format!("/api/v1/schedules/{id}/pause"), &json!({}))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    for id in &ids {
        let slots = fired_slots(&pool, *id).await;
        assert!(slots.len() >= 6, "{id}: {slots:?}");
        assert_every_second_once(&slots);
        // None missing from the first slot to the last one the schedule advanced past.
        let next: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT next_fire_at FROM schedules WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            next.unwrap() - *slots.last().unwrap(),
            chrono::Duration::seconds(1)
        );
    }
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE schedule_id IS NOT NULL
         GROUP BY schedule_id, scheduled_for HAVING count(*) > 1) d",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(duplicates, 0);
    b.stop().await;
}

/// Puts a paused schedule `slots_behind` slots of `interval` behind, the latest `late`
/// seconds ago, and resumes it (through SQL, as if no replica had run meanwhile).
async fn fall_behind(pool: &PgPool, id: Uuid, interval: i64, slots_behind: i64, late: i64) {
    sqlx::query(
        "UPDATE schedules
         SET anchor_at = date_trunc('second', now()) - make_interval(secs => $2 * $3 + $4),
             next_fire_at = date_trunc('second', now()) - make_interval(secs => $2 * $3 + $4),
             next_due_at = date_trunc('second', now()) - make_interval(secs => $2 * $3 + $4),
             paused = false
         WHERE id = $1",
    )
    .bind(id)
    .bind(interval as f64)
    .bind((slots_behind - 1) as f64)
    .bind(late as f64)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('baton_schedules', '')")
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn catch_up_after_an_outage_follows_the_missed_mode() {
    let app = spawn_app().await;
    let event_id = event(&app, "sched-catch-up").await;
    let interval = 300;
    let mut by_mode = Vec::new();
    for mode in ["none", "last", "all"] {
        let created = schedule(
            &app,
            &event_id,
            json!({"interval_seconds": interval, "missed": mode, "max_catch_up": 5, "paused": true}),
        )
        .await;
        by_mode.push((mode, id_of(&created)));
    }
    // 11 slots passed, the latest 90 s ago (more than a minute late: missed even for `none`).
    for (_, id) in &by_mode {
        fall_behind(&app.pool, *id, interval, 11, 90).await;
    }
    for (mode, id) in &by_mode {
        let anchor: DateTime<Utc> =
            sqlx::query_scalar("SELECT anchor_at FROM schedules WHERE id = $1")
                .bind(id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        let step = chrono::Duration::seconds(interval);
        // Evaluated once: the schedule moves to the first slot after now.
        eventually(WAIT, "the schedule to be evaluated", || async {
            let next: Option<DateTime<Utc>> =
                sqlx::query_scalar("SELECT next_fire_at FROM schedules WHERE id = $1")
                    .bind(id)
                    .fetch_one(&app.pool)
                    .await
                    .unwrap();
            (next == Some(anchor + step * 11)).then_some(())
        })
        .await;
        let slots = fired_slots(&app.pool, *id).await;
        let expected: Vec<DateTime<Utc>> = match *mode {
            "none" => vec![],
            "last" => vec![anchor + step * 10],
            _ => (6..=10).map(|k| anchor + step * k).collect(),
        };
        assert_eq!(slots, expected, "missed: {mode}");
    }
    app.stop().await;
}

#[tokio::test]
async fn pause_resume_and_edit_fire_each_slot_once() {
    let app = spawn_app().await;
    let event_id = event(&app, "sched-pause-edit").await;
    let control = id_of(&schedule(&app, &event_id, json!({"interval_seconds": 1})).await);
    let subject = id_of(
        &schedule(
            &app,
            &event_id,
            json!({"interval_seconds": 1, "missed": "last", "input": {"v": 1}}),
        )
        .await,
    );
    let pool = app.pool.clone();
    let fired = |id: Uuid| {
        let pool = pool.clone();
        async move { fired_slots(&pool, id).await.len() }
    };
    eventually(WAIT, "the subject firing", || async {
        (fired(subject).await >= 2).then_some(())
    })
    .await;
    let (status, _) = app
        .post(&format!("/api/v1/schedules/{subject}/pause"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let at_pause = fired(subject).await;
    let control_at_pause = fired(control).await;
    // While the control schedule fires three more times, the paused one fires nothing.
    eventually(WAIT, "the control schedule firing on", || async {
        (fired(control).await >= control_at_pause + 3).then_some(())
    })
    .await;
    assert_eq!(fired(subject).await, at_pause, "a paused schedule fired");
    let before_resume = fired_slots(&app.pool, subject).await;
    let (status, resumed) = app
        .post(&format!("/api/v1/schedules/{subject}/resume"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    eventually(WAIT, "the resumed schedule firing", || async {
        (fired(subject).await >= at_pause + 3).then_some(())
    })
    .await;
    // `missed: last`: of the slots that passed while paused, only the latest fired.
    let after_resume = fired_slots(&app.pool, subject).await;
    let first_after = after_resume[before_resume.len()];
    let gap = (first_after - *before_resume.last().unwrap()).num_seconds();
    assert!(
        gap >= 3,
        "slots passed while paused fired: {after_resume:?}"
    );
    assert_every_second_once(&after_resume[before_resume.len()..]);

    // Edit: every second by cron instead, new input. No slot fires twice, none is skipped.
    let before_edit = fired(subject).await;
    let (status, edited) = app
        .patch(
            &format!("/api/v1/schedules/{subject}"),
            &json!({"cron": "* * * * * *", "input": {"v": 2}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{edited}");
    eventually(WAIT, "the edited schedule firing", || async {
        (fired(subject).await >= before_edit + 3).then_some(())
    })
    .await;
    let slots = fired_slots(&app.pool, subject).await;
    assert_every_second_once(&slots[before_resume.len()..]);
    let inputs: Vec<Value> = sqlx::query_scalar(
        "SELECT input FROM jobs WHERE schedule_id = $1 ORDER BY scheduled_for DESC LIMIT 1",
    )
    .bind(subject)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(inputs, vec![json!({"v": 2})]);
    app.stop().await;
}

#[tokio::test]
async fn dst_days_fire_once_through_the_firing_transaction_with_an_injected_clock() {
    let app = spawn_app().await;
    let event_id = event(&app, "sched-dst").await;
    let paris = id_of(
        &schedule(
            &app,
            &event_id,
            json!({"cron": "30 2 * * *", "timezone": "Europe/Paris", "paused": true}),
        )
        .await,
    );
    let new_york = id_of(
        &schedule(
            &app,
            &event_id,
            json!({"cron": "@hourly", "timezone": "America/New_York", "missed": "all", "paused": true}),
        )
        .await,
    );
    // No firing loop from here on: the test drives time.
    let url = app.database_url.clone();
    app.stop().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    let start = |id: Uuid, at: &str| {
        let pool = pool.clone();
        let at = utc(at);
        async move {
            sqlx::query(
                "UPDATE schedules SET next_fire_at = $2, next_due_at = $2, paused = false WHERE id = $1",
            )
            .bind(id)
            .bind(at)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    // Paris, fall back (25 October 2026): 02:30 happens twice; it fires once.
    start(paris, "2026-10-25T02:30:00+02:00").await;
    for now in [
        "2026-10-25T02:30:00.010+02:00",
        "2026-10-25T02:30:00.020+02:00",
        "2026-10-25T02:30:00.010+01:00",
        "2026-10-26T02:30:00.010+01:00",
    ] {
        // Twice at each instant, concurrently: still one job per slot.
        let (a, b) = tokio::join!(fire_due(&pool, utc(now)), fire_due(&pool, utc(now)));
        a.unwrap();
        b.unwrap();
    }
    assert_eq!(
        fired_slots(&pool, paris).await,
        vec![
            utc("2026-10-25T02:30:00+02:00"),
            utc("2026-10-26T02:30:00+01:00")
        ]
    );
    // Paris, spring forward (29 March 2027): 02:30 does not exist; it fires once at 03:00.
    sqlx::query("DELETE FROM jobs WHERE schedule_id = $1")
        .bind(paris)
        .execute(&pool)
        .await
        .unwrap();
    start(paris, "2027-03-27T02:30:00+01:00").await;
    for now in [
        "2027-03-27T02:30:01+01:00",
        "2027-03-28T03:00:01+02:00",
        "2027-03-28T04:00:00+02:00",
        "2027-03-29T02:30:01+02:00",
    ] {
        fire_due(&pool, utc(now)).await.unwrap();
    }
    assert_eq!(
        fired_slots(&pool, paris).await,
        vec![
            utc("2027-03-27T02:30:00+01:00"),
            utc("2027-03-28T03:00:00+02:00"),
            utc("2027-03-29T02:30:00+02:00"),
        ]
    );
    // New York, hourly with `missed: all`, evaluated once after both DST nights (2026).
    start(new_york, "2026-11-01T00:00:00-04:00").await;
    fire_due(&pool, utc("2026-11-01T04:00:00.5-05:00"))
        .await
        .unwrap();
    assert_eq!(
        fired_slots(&pool, new_york).await,
        vec![
            utc("2026-11-01T00:00:00-04:00"),
            utc("2026-11-01T01:00:00-04:00"),
            // 01:00 EST repeats 01:00 EDT: not fired again.
            utc("2026-11-01T02:00:00-05:00"),
            utc("2026-11-01T03:00:00-05:00"),
            utc("2026-11-01T04:00:00-05:00"),
        ]
    );
    sqlx::query("DELETE FROM jobs WHERE schedule_id = $1")
        .bind(new_york)
        .execute(&pool)
        .await
        .unwrap();
    start(new_york, "2027-03-14T00:00:00-05:00").await;
    fire_due(&pool, utc("2027-03-14T04:00:00.5-04:00"))
        .await
        .unwrap();
    assert_eq!(
        fired_slots(&pool, new_york).await,
        vec![
            utc("2027-03-14T00:00:00-05:00"),
            utc("2027-03-14T01:00:00-05:00"),
            // 02:00 does not exist: 03:00 EDT follows 01:00 EST.
            utc("2027-03-14T03:00:00-04:00"),
            utc("2027-03-14T04:00:00-04:00"),
        ]
    );
}

#[tokio::test]
async fn openapi_documents_the_schedule_routes_and_job_fields() {
    let app = spawn_app().await;
    let (status, spec) = app.get("/api/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let paths = spec["paths"].as_object().expect("paths");
    for (path, methods) in [
        ("/api/v1/events/{id}/schedules", &["post"][..]),
        ("/api/v1/schedules", &["get"][..]),
        ("/api/v1/schedules/{id}", &["get", "patch", "delete"][..]),
        ("/api/v1/schedules/{id}/pause", &["post"][..]),
        ("/api/v1/schedules/{id}/resume", &["post"][..]),
    ] {
        for method in methods {
            assert!(
                paths[path][method].is_object(),
                "{method} {path} undocumented"
            );
        }
    }
    let schemas = &spec["components"]["schemas"];
    for field in [
        "cron",
        "interval_seconds",
        "timezone",
        "missed",
        "max_catch_up",
        "jitter_seconds",
    ] {
        assert!(
            schemas["ScheduleFields"]["properties"][field].is_object(),
            "{field}: {}",
            schemas["ScheduleFields"]
        );
    }
    for schema in ["Job", "JobSummary"] {
        for field in ["schedule_id", "scheduled_for"] {
            assert!(
                schemas[schema]["properties"][field].is_object(),
                "{schema}.{field}"
            );
        }
    }
    let list_params = spec["paths"]["/api/v1/jobs"]["get"]["parameters"]
        .as_array()
        .expect("parameters");
    assert!(list_params.iter().any(|p| p["name"] == "schedule_id"));
    app.stop().await;
}
