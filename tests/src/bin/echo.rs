//! `echo`: the baseline for benchmarks. A bare tonic server, same tonic version, same build
//! profile, answering `listen.v1.Listen/SubmitConversation` (same request to decode) with a
//! fixed response and no work at all, plus health. `echo --listen-addr 127.0.0.1:50060`.

use shared::proto::listen::v1 as api;
use shared::proto::listen::v1::listen_server::{Listen, ListenServer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

struct Echo;

#[tonic::async_trait]
impl Listen for Echo {
    type SessionStream = ReceiverStream<Result<api::SessionEvent, Status>>;

    async fn submit_conversation(
        &self,
        request: Request<api::SubmitConversationRequest>,
    ) -> Result<Response<api::SubmitConversationResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(api::SubmitConversationResponse {
            conversation_id: request.idempotency_key,
            status: api::ConversationStatus::Processing as i32,
        }))
    }
    async fn get_conversation(
        &self,
        _: Request<api::GetConversationRequest>,
    ) -> Result<Response<api::Conversation>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn list_conversations(
        &self,
        _: Request<api::ListConversationsRequest>,
    ) -> Result<Response<api::ListConversationsResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn retry_conversation(
        &self,
        _: Request<api::RetryConversationRequest>,
    ) -> Result<Response<api::Conversation>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_link_status(
        &self,
        _: Request<api::GetLinkStatusRequest>,
    ) -> Result<Response<api::LinkStatus>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn session(
        &self,
        _: Request<Streaming<api::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = match (args.next().as_deref(), args.next()) {
        (Some("--listen-addr"), Some(addr)) => addr,
        _ => {
            eprintln!("usage: echo --listen-addr HOST:PORT");
            std::process::exit(64)
        }
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let (_reporter, health) = shared::grpc::health::health_reporter();
    let router = shared::grpc::server_builder(Default::default())
        .add_service(health)
        .add_service(ListenServer::new(Echo));
    shared::grpc::serve(
        router,
        listener,
        shared::shutdown::signal(),
        std::time::Duration::from_secs(1),
    )
    .await?;
    Ok(())
}
