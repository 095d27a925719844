//! The scenario the product exists for, on real processes: data handed from a bash step to a
//! python step to a node step through the runtime helpers, conditions, variables, secrets.

use baton_tests::{TestApp, spawn_app};
use serde_json::{Value, json};

use crate::support::{InProcessWorker, all_lines, local_event, wait_finished};

#[tokio::test]
async fn data_flows_from_bash_to_python_to_node() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 2).await;
    data_flows(&app, &json!({"executor": "local"})).await;
    worker.stop().await;
}

/// An event running `content`, with `placement` (`{"executor": …}`, `{"server_id": …}`)
/// merged into its definition.
pub async fn placed_event(
    app: &TestApp,
    name: &str,
    runtime: &str,
    content: &str,
    placement: &Value,
) -> String {
    let mut spec = json!({"name": name, "runtime": runtime, "content": content});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), placement.as_object()) {
        spec.extend(extra.clone());
    }
    let ev = app.create_event(&spec).await;
    ev["id"].as_str().expect("id").to_owned()
}

/// The chain scenario — bash → python → node, data passed along through the helpers, a
/// condition, variables (one secret, masked in the logs) — with every step placed by
/// `placement`. A worker able to run it must be connected.
pub async fn data_flows(app: &TestApp, placement: &Value) {
    let a = placed_event(
        app,
        "a-bash",
        "bash",
        r#"source baton.sh
n=$(baton_input | python3 -c 'import json,sys; print(json.load(sys.stdin)["n"])')
baton_output "{\"n\": $((n + 1)), \"from\": \"bash\"}"
baton_set_condition true"#,
        placement,
    )
    .await;
    let b = placed_event(
        app,
        "b-python",
        "python",
        r#"import baton
data = baton.input()
meta = baton.event()
baton.set_variable("last_chain", meta["root_job_id"])
baton.output({"n": data["n"] + 1, "from": "python", "parent": meta["parent_job_id"]})"#,
        placement,
    )
    .await;
    let c = placed_event(
        app,
        "c-node",
        "node",
        r#"const baton = require("baton");
const data = baton.input();
console.log("token is", baton.getVariable("api_token"));
baton.output({ n: data.n + 1, from: "node", region: baton.getVariable("region") });"#,
        placement,
    )
    .await;
    for (from, to, trigger) in [(&a, &b, "on_condition"), (&b, &c, "on_success")] {
        let (status, body) = app
            .post(
                &format!("/api/v1/events/{from}/actions"),
                &json!({"trigger": trigger, "action": {"type": "run_event", "event_id": to}}),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    }
    for (key, body) in [
        ("region", json!({"value": "eu-west-1"})),
        ("api_token", json!({"value": "tok-123456", "secret": true})),
    ] {
        baton_tests::send(
            app.request(reqwest::Method::PUT, &format!("/api/v1/variables/{key}"))
                .json(&body),
        )
        .await;
    }
    let root = app.run_event(&a, &json!({"input": {"n": 1}})).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let chain = loop {
        let (_, chain) = app.get(&format!("/api/v1/jobs?root_job_id={root}")).await;
        let items = chain["items"].as_array().cloned().unwrap_or_default();
        if items.len() == 3 && items.iter().all(|j| j["status"] == "succeeded") {
            break items;
        }
        assert!(
            !items.iter().any(|j| j["status"] == "failed"),
            "a step failed: {chain}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "chain did not complete: {chain}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // Lists leave out input and output: read each job.
    let by_event = async |ev: &str| {
        let id = chain.iter().find(|j| j["event_id"] == ev).expect("job")["id"]
            .as_str()
            .expect("id")
            .to_owned();
        app.get(&format!("/api/v1/jobs/{id}")).await.1
    };
    let (ja, jb, jc) = (by_event(&a).await, by_event(&b).await, by_event(&c).await);
    assert_eq!(ja["output"], json!({"n": 2, "from": "bash"}));
    assert_eq!(ja["condition"], true);
    assert_eq!(jb["input"], json!({"n": 2, "from": "bash"}));
    assert_eq!(
        jb["output"],
        json!({"n": 3, "from": "python", "parent": ja["id"]})
    );
    assert_eq!(
        jc["output"],
        json!({"n": 4, "from": "node", "region": "eu-west-1"})
    );
    assert_eq!(jc["parent_job_id"], jb["id"]);
    // Written into b's own scope (events write only their own variables by default).
    let (_, var) = app
        .get(&format!("/api/v1/variables/last_chain?scope=event:{b}"))
        .await;
    assert_eq!(var["value"], root.as_str());
    let c_id = jc["id"].as_str().expect("id");
    let lines = all_lines(app, c_id).await;
    assert_eq!(
        lines[0]["text"], "token is ***",
        "secrets are masked in stored logs"
    );
    let _ = wait_finished(app, c_id).await;
}

#[tokio::test]
async fn malformed_and_oversized_output_fail_the_run_with_kind_output() {
    let app = spawn_app().await;
    let worker = InProcessWorker::start(&app, 2).await;
    let bad = local_event(
        &app,
        "bad-json",
        "bash",
        "source baton.sh; baton_output '{not json'",
    )
    .await;
    let big = local_event(
        &app,
        "too-big",
        "python",
        "import baton\nbaton.output({'blob': 'x' * 2_000_000})",
    )
    .await;
    let cond = local_event(
        &app,
        "no-condition",
        "python",
        "import baton\nbaton.set_condition(False)",
    )
    .await;
    let id = app.run_event(&bad, &json!({})).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(
        (job["status"].as_str(), job["error"]["kind"].as_str()),
        (Some("failed"), Some("output")),
        "{job}"
    );
    assert!(
        job["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("JSON"),
        "{job}"
    );
    let id = app.run_event(&big, &json!({})).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(job["error"]["kind"], "output", "{job}");
    assert!(
        job["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("limit"),
        "{job}"
    );
    assert_eq!(job["output"], serde_json::Value::Null);
    let id = app.run_event(&cond, &json!({})).await;
    let job = wait_finished(&app, &id).await;
    assert_eq!(
        (job["status"].as_str(), job["condition"].as_bool()),
        (Some("succeeded"), Some(false))
    );
    worker.stop().await;
}
