//! The worker gRPC service: one long-lived `Session` stream per worker. Authentication (a token
//! with role `worker` in `authorization: Bearer …`) happens here; the stream's life is in
//! [`session`].

mod log_batch;
mod session;
mod writes;

use std::pin::Pin;

use baton_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use baton_proto::v1::{ServerMessage, WorkerMessage};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::AppState;
use crate::model::Role;

pub struct WorkerGrpc {
    state: AppState,
}

impl WorkerGrpc {
    pub fn server(state: AppState) -> WorkerServiceServer<Self> {
        WorkerServiceServer::new(Self { state })
            // Log batches are up to a few hundred KiB; leave room.
            .max_decoding_message_size(16 * 1024 * 1024)
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerGrpc {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <worker token>` metadata")
            })?;
        let info = crate::auth::verify(&self.state, token)
            .await
            .map_err(|e| crate::error::grpc_status(&e))?
            .ok_or_else(|| Status::unauthenticated("unknown or revoked token"))?;
        if info.role != Role::Worker {
            return Err(Status::permission_denied(format!(
                "workers need a token with role worker; {:?} has role {}",
                info.name, info.role
            )));
        }
        let stream = session::open(self.state.clone(), info, request.into_inner()).await?;
        Ok(Response::new(stream))
    }
}
