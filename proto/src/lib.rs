//! # baton-proto
//!
//! The protocol between Baton's workers and api replicas (`baton/v1/worker.proto`), generated
//! at build time with `protox` (a pure-Rust protobuf compiler) and `tonic-prost-build`, so no
//! system `protoc` is needed. See the `.proto` file for the semantics of each message.
#![forbid(unsafe_code)]

/// `baton.v1`: the worker service and its messages.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("baton.v1");
}

pub use v1::server_message::Msg as ServerMsg;
pub use v1::worker_message::Msg as WorkerMsg;

pub mod logchunk;
pub mod secret_ref;

pub mod version;
pub use version::{MIN_WORKER_PROTOCOL, PROTOCOL_VERSION, check_worker_protocol};
