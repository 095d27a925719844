//! TLS: with `BATON_TLS_CERT` / `BATON_TLS_KEY` the REST API and the worker service both serve
//! TLS (certificates from a throwaway CA made by the test); workers verify the api's
//! certificate against `BATON_API_CA` and refuse one their CA did not sign.

use std::process::Stdio;

use baton_tests::pki::TestPki;
use baton_tests::spawn_app_with;
use serde_json::json;

use crate::support::{InProcessWorker, LogLines, WorkerProcess, local_event, wait_finished};

#[tokio::test]
async fn rest_and_worker_service_serve_tls_and_workers_verify_the_certificate() {
    let pki = TestPki::generate();
    let mut app = spawn_app_with(|c| {
        c.tls_cert = Some(pki.cert.clone());
        c.tls_key = Some(pki.key.clone());
    })
    .await;
    assert!(app.address.starts_with("https://"), "{}", app.address);
    assert!(
        app.grpc_address.starts_with("https://"),
        "{}",
        app.grpc_address
    );
    app.client = pki.client();

    // REST over TLS, verified against the test CA.
    let (status, body) = app.get("/api/v1/events").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    // A client that does not trust the CA is refused by its own verification...
    let untrusted = reqwest::Client::new()
        .get(format!("{}/healthz", app.address))
        .send()
        .await;
    assert!(untrusted.is_err(), "an untrusted certificate was accepted");
    // ... and plain HTTP on the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!(
            "{}/healthz",
            app.address.replacen("https://", "http://", 1)
        ))
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.as_ref().is_ok_and(|r| r.status().is_success()),
        "plain HTTP was served: {plain:?}"
    );

    // A worker trusting the CA runs a job over the TLS worker service.
    let worker = InProcessWorker::start_with(&app, 1, |c| c.api_ca = Some(pki.ca.clone())).await;
    let event = local_event(&app, "over-tls", "bash", "echo secure").await;
    let job = app.run_event(&event, &json!({})).await;
    let done = wait_finished(&app, &job).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    worker.stop().await;

    // A worker trusting another CA refuses the api's certificate and says so.
    let other_ca = pki.other_ca.display().to_string();
    let mut refused = WorkerProcess::start_with_env(
        &app,
        &app.grpc_address,
        1,
        &["--allow-local", "--no-container", "--api-ca", &other_ca],
        &[("RUST_LOG", "warn")],
        Stdio::piped(),
    )
    .await;
    let log = LogLines::read(refused.child.stderr.take().expect("stderr"));
    let line = log
        .wait_for("a refused session", |l| {
            l.contains("cannot open a session with the api")
        })
        .await;
    assert!(
        line.to_lowercase().contains("certificate") || line.contains("UnknownIssuer"),
        "the reason is not the certificate: {line}"
    );
}

#[tokio::test]
async fn a_certificate_without_its_key_is_refused_at_start_naming_the_setting() {
    let pki = TestPki::generate();
    let mut config = baton_api::ApiConfig::new(baton_tests::test_database().await);
    config.tls_cert = Some(pki.cert.clone());
    let Err(e) = baton_api::Api::start(config).await else {
        panic!("an api started with a certificate and no key");
    };
    assert!(e.to_string().contains("BATON_TLS_KEY"), "{e:#}");
    let mut config = baton_api::ApiConfig::new(baton_tests::test_database().await);
    config.tls_cert = Some(pki.cert.clone());
    config.tls_key = Some(pki.other_ca.clone());
    let Err(e) = baton_api::Api::start(config).await else {
        panic!("an api started with a key that is not a key");
    };
    assert!(format!("{e:#}").contains("BATON_TLS_KEY"), "{e:#}");
}
