//! A worker the api refuses for its protocol version says why in its log and exits with status
//! 78 (`EX_CONFIG`) instead of reconnecting forever: only upgrading one side can help.

use std::io::Read as _;
use std::process::Stdio;
use std::time::Duration;

use baton_tests::spawn_app;

use crate::support::WorkerProcess;

#[tokio::test]
async fn a_worker_with_an_unsupported_protocol_logs_the_refusal_and_exits_78() {
    let app = spawn_app().await;
    let unsupported = (baton_proto::PROTOCOL_VERSION + 1).to_string();
    let mut worker = WorkerProcess::start_with_env(
        &app,
        &app.grpc_address,
        1,
        &[
            "--allow-local",
            "--no-container",
            "--protocol-version",
            &unsupported,
        ],
        &[("RUST_LOG", "info")],
        Stdio::piped(),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = worker.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused worker kept running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut log = String::new();
    worker
        .child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut log)
        .expect("read the log");
    assert_eq!(
        status.code(),
        Some(i32::from(baton_worker::EXIT_REFUSED)),
        "{log}"
    );
    assert!(
        log.contains("the api refused this worker's protocol version"),
        "{log}"
    );
    assert!(
        log.contains("upgrade the api replicas before the workers"),
        "{log}"
    );
    // One attempt, not a reconnection loop.
    assert!(!log.contains("reconnecting"), "{log}");
}
