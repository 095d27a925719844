//! `/api/v1/jobs`: listing with filters and cursors, get, cancel, logs.

use std::collections::HashSet;

use baton_api::model::LogLine;
use baton_api::storage::{logs, queue};
use baton_proto::logchunk::{self, ChunkWriter};
use baton_proto::v1::Stream;
use baton_tests::{bash_event, spawn_app};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

#[tokio::test]
async fn list_filters_and_pages_through_jobs() {
    let app = spawn_app().await;
    let a = app.create_event(&bash_event("a")).await;
    let b = app.create_event(&bash_event("b")).await;
    let (a, b) = (a["id"].as_str().expect("id"), b["id"].as_str().expect("id"));
    let mut a_jobs = Vec::new();
    for _ in 0..5 {
        a_jobs.push(app.run_event(a, &json!({})).await);
    }
    let b_job = app.run_event(b, &json!({})).await;
    let (status, _) = app
        .post(&format!("/api/v1/jobs/{b_job}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let (status, page) = app.get(&format!("/api/v1/jobs?event_id={a}")).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|j| j["id"].as_str().expect("id"))
        .collect();
    let newest_first: Vec<&str> = a_jobs.iter().rev().map(String::as_str).collect();
    assert_eq!(ids, newest_first);

    let (_, page) = app.get("/api/v1/jobs?status=cancelled").await;
    assert_eq!(page["items"].as_array().expect("items").len(), 1);
    assert_eq!(page["items"][0]["id"], b_job.as_str());
    let (_, page) = app.get(&format!("/api/v1/jobs?root_job_id={b_job}")).await;
    assert_eq!(page["items"].as_array().expect("items").len(), 1);
    let (_, page) = app.get("/api/v1/jobs?dead=true").await;
    assert_eq!(page["items"], json!([]));

    // Cursor pagination visits every job once.
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/jobs?limit=2&cursor={c}"),
            None => "/api/v1/jobs?limit=2".to_owned(),
        };
        let (status, page) = app.get(&path).await;
        assert_eq!(status, StatusCode::OK);
        for job in page["items"].as_array().expect("items") {
            assert!(seen.insert(job["id"].as_str().expect("id").to_owned()));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6);

    for (query, field) in [
        ("status=exploded", "status"),
        ("event_id=nope", "event_id"),
        ("root_job_id=1", "root_job_id"),
        ("dead=maybe", "dead"),
        ("limit=501", "limit"),
        ("limit=abc", "limit"),
        ("cursor=zzz", "cursor"),
    ] {
        let (status, err) = app.get(&format!("/api/v1/jobs?{query}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        assert_eq!(err["error"]["field"], field, "{query}: {err}");
    }
}

#[tokio::test]
async fn job_view_has_the_contract_fields() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("shape")).await;
    let job_id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({"input": {"x": 1}}))
        .await;
    let (status, job) = app.get(&format!("/api/v1/jobs/{job_id}")).await;
    assert_eq!(status, StatusCode::OK);
    for field in [
        "id",
        "event_id",
        "status",
        "attempt",
        "dead",
        "exit_code",
        "error",
        "input",
        "output",
        "condition",
        "progress",
        "parent_job_id",
        "root_job_id",
        "worker_id",
        "created_at",
        "started_at",
        "finished_at",
    ] {
        assert!(job.get(field).is_some(), "job lacks {field}: {job}");
    }
    assert_eq!(job["status"], "queued");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["dead"], false);
    assert_eq!(job["event_name"], "shape");
    let (status, err) = app.get(&format!("/api/v1/jobs/{}", Uuid::now_v7())).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("job_not_found"))
    );
}

#[tokio::test]
async fn cancel_queued_then_conflict_when_finished() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("c")).await;
    let job_id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let (status, job) = app
        .post(&format!("/api/v1/jobs/{job_id}/cancel"), &Value::Null)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["error"]["kind"], "cancelled");
    let (status, err) = app
        .post(&format!("/api/v1/jobs/{job_id}/cancel"), &Value::Null)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["error"]["code"], "job_finished");
    let (status, _) = app
        .post(
            &format!("/api/v1/jobs/{}/cancel", Uuid::now_v7()),
            &Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn logs_page_by_sequence_and_say_when_done() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("logs")).await;
    let job_id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    let id: Uuid = job_id.parse().expect("uuid");
    let line = |seq: i64| LogLine {
        seq,
        stream: if seq % 2 == 0 { "stderr" } else { "stdout" }.into(),
        text: format!("line {seq}"),
        ts: chrono::Utc::now(),
    };
    // Lines 1..=3 as a row written before migration 0005 (a JSON array), the rest as chunks.
    let legacy: Vec<LogLine> = (1..=3).map(line).collect();
    let chunk = |seqs: std::ops::RangeInclusive<i64>| {
        let mut w = ChunkWriter::default();
        for l in seqs.clone().map(line) {
            let stream = if l.stream == "stderr" {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            w.push(stream, l.ts.timestamp_millis(), &l.text);
        }
        let data = w.into_bytes();
        logs::NewChunk {
            first_seq: *seqs.start(),
            summary: logchunk::validate(&data).expect("valid"),
            data,
        }
    };
    let chunk2 = chunk(4..=5);
    let claimed = queue::claim_batch(
        &app.pool,
        &queue::ClaimRequest {
            worker_id: Uuid::now_v7(),
            executors: &["local".to_owned()],
            labels: &serde_json::Map::new(),
            limit: 1,
            lease: std::time::Duration::from_secs(60),
        },
    )
    .await
    .expect("claim");
    let token = claimed[0].lease_token;
    let mut conn = app.pool.acquire().await.expect("conn");
    let cap = 1 << 20;
    let lease = std::time::Duration::from_secs(60);
    sqlx::query(
        "INSERT INTO job_logs (job_id, first_seq, last_seq, lines, bytes) VALUES ($1, 1, 3, $2, 18)",
    )
    .bind(id)
    .bind(serde_json::to_string(&legacy).expect("json"))
    .execute(&mut *conn)
    .await
    .expect("legacy row");
    sqlx::query("UPDATE jobs SET last_log_seq = 3, log_bytes = 18 WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await
        .expect("legacy seq");
    // A re-send overlapping the stored lines: only 4 and 5 are new.
    let appended = logs::append_batch(&mut conn, id, token, &chunk(2..=5), cap, lease)
        .await
        .expect("append");
    assert_eq!((appended.new_lines, appended.stored_seq), (2, 5));
    let again = logs::append_batch(&mut conn, id, token, &chunk2, cap, lease)
        .await
        .expect("append");
    assert_eq!(
        (again.new_lines, again.stored_seq),
        (0, 5),
        "a re-sent batch is skipped"
    );
    assert!(matches!(
        logs::append_batch(&mut conn, id, token + 1, &chunk2, cap, lease).await,
        Err(baton_api::storage::StorageError::LeaseLost { .. })
    ));

    let (status, page) = app.get(&format!("/api/v1/jobs/{job_id}/logs")).await;
    assert_eq!(status, StatusCode::OK);
    let texts: Vec<&str> = page["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| l["text"].as_str().expect("text"))
        .collect();
    assert_eq!(
        texts,
        vec!["line 1", "line 2", "line 3", "line 4", "line 5"]
    );
    assert_eq!(page["lines"][1]["stream"], "stderr");
    assert_eq!(page["next"], 5);
    assert_eq!(page["done"], false, "the job is still running");

    let (_, page) = app
        .get(&format!("/api/v1/jobs/{job_id}/logs?after=2&limit=2"))
        .await;
    let seqs: Vec<i64> = page["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| l["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![3, 4]);
    assert_eq!(page["next"], 4);

    queue::complete(&mut conn, id, token, &queue::Outcome::success())
        .await
        .expect("complete");
    let (_, page) = app
        .get(&format!("/api/v1/jobs/{job_id}/logs?after=5"))
        .await;
    assert_eq!(page["lines"], json!([]));
    assert_eq!(page["next"], 5);
    assert_eq!(page["done"], true);

    let (status, err) = app
        .get(&format!("/api/v1/jobs/{job_id}/logs?after=-1"))
        .await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("after"))
    );
    let (status, _) = app
        .get(&format!("/api/v1/jobs/{}/logs", Uuid::now_v7()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn lists_leave_out_input_and_output_which_a_single_job_returns() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("big")).await;
    let ev = ev["id"].as_str().expect("id");
    let blob = "x".repeat(1 << 20);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.run_event(ev, &json!({"input": {"blob": blob}})).await);
    }
    let (status, page) = app.get("/api/v1/jobs?limit=500").await;
    assert_eq!(status, StatusCode::OK);
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 3);
    for item in items {
        let item = item.as_object().expect("object");
        assert!(
            !item.contains_key("input") && !item.contains_key("output"),
            "a list item carries no bodies: {:?}",
            item.keys().collect::<Vec<_>>()
        );
        assert_eq!(item["status"], "queued");
    }
    assert!(
        page.to_string().len() < 64 * 1024,
        "the page is small without the bodies"
    );
    let (status, job) = app.get(&format!("/api/v1/jobs/{}", ids[0])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["input"]["blob"].as_str().map(str::len), Some(1 << 20));

    // The OpenAPI document says so.
    let (_, spec) =
        baton_tests::send(app.anonymous(reqwest::Method::GET, "/api/v1/openapi.json")).await;
    let summary = &spec["components"]["schemas"]["JobSummary"]["properties"];
    assert!(
        summary["id"].is_object() && summary["status"].is_object(),
        "{summary}"
    );
    assert!(
        summary["input"].is_null() && summary["output"].is_null(),
        "{summary}"
    );
    let list = spec["paths"]["/api/v1/jobs"]["get"]["responses"]["200"].to_string();
    assert!(list.contains("JobSummary"), "{list}");
    assert!(spec["components"]["schemas"]["Job"]["properties"]["input"].is_object());
}

#[tokio::test]
async fn log_cursors_past_any_sequence_are_refused_not_overflowed() {
    let app = spawn_app().await;
    let ev = app.create_event(&bash_event("c")).await;
    let id = app
        .run_event(ev["id"].as_str().expect("id"), &json!({}))
        .await;
    for path in [
        format!("/api/v1/jobs/{id}/logs?after=9223372036854775807"),
        format!("/api/v1/jobs/{id}/logs?after=9223372036854775807&limit=10000"),
        format!("/api/v1/jobs/{id}/logs/stream?after=9223372036854775807"),
        format!("/api/v1/jobs/{id}/logs?after=99999999999999999999"),
    ] {
        let (status, err) = app.get(&path).await;
        assert_eq!(
            (status, err["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("after")),
            "{path}: {err}"
        );
    }
    let (status, err) = baton_tests::send(
        app.request(
            reqwest::Method::GET,
            &format!("/api/v1/jobs/{id}/logs/stream"),
        )
        .header("last-event-id", "9223372036854775807"),
    )
    .await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("Last-Event-ID")),
        "{err}"
    );
    // The largest accepted cursor reads an empty page.
    let (status, page) = app
        .get(&format!(
            "/api/v1/jobs/{id}/logs?after=9007199254740992&limit=10000"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["lines"], json!([]));
}
