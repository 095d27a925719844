//! Rolling upgrades: the api refuses a worker whose protocol version it does not support, with
//! a message saying which side to upgrade, and accepts workers from before versions were
//! announced.

use baton_api::model::Role;
use baton_proto::WorkerMsg;
use baton_proto::v1::{Hello, WorkerMessage};
use baton_tests::protocol::{ScriptedWorker, hello};
use baton_tests::spawn_app;
use uuid::Uuid;

fn first(hello: Hello) -> WorkerMessage {
    WorkerMessage {
        msg: Some(WorkerMsg::Hello(hello)),
    }
}

#[tokio::test]
async fn a_worker_newer_than_the_api_is_refused_with_a_clear_message() {
    let app = spawn_app().await;
    let token = app.token(Role::Worker).await;
    let newer = Hello {
        protocol_version: baton_proto::PROTOCOL_VERSION + 1,
        ..hello(Uuid::now_v7(), 1)
    };
    let Err(status) = ScriptedWorker::open(&app.grpc_address, &token, first(newer)).await else {
        panic!("a worker speaking a newer protocol was let in");
    };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let message = status.message();
    assert!(
        message.starts_with("unsupported worker protocol"),
        "{message}"
    );
    assert!(
        message.contains(&format!("version {}", baton_proto::PROTOCOL_VERSION + 1)),
        "{message}"
    );
    assert!(
        message.contains("upgrade the api replicas before the workers"),
        "{message}"
    );
    // Refused before it was recorded: no worker appears.
    let (_, workers) = app.get("/api/v1/workers").await;
    assert_eq!(workers.as_array().map(Vec::len), Some(0), "{workers}");
}

#[tokio::test]
async fn workers_of_this_version_and_unversioned_ones_are_welcome() {
    let app = spawn_app().await;
    let token = app.token(Role::Worker).await;
    for version in [0, baton_proto::PROTOCOL_VERSION] {
        let h = Hello {
            protocol_version: version,
            ..hello(Uuid::now_v7(), 1)
        };
        let (_worker, answer) = ScriptedWorker::open(&app.grpc_address, &token, first(h))
            .await
            .unwrap_or_else(|s| panic!("version {version} refused: {s}"));
        assert!(
            matches!(answer.msg, Some(baton_proto::ServerMsg::Welcome(_))),
            "{answer:?}"
        );
    }
}
