use super::*;
use crate::grpc::Loopback;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{FileDescriptorSet, descriptor_proto};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const LISTEN: &str = "listen/v1/listen.proto";
const PUSHER: &str = "pusher/v1/pusher.proto";
const TIMESTAMP: &str = "google/protobuf/timestamp.proto";

/// A loopback server with the reflection services our servers run.
async fn start() -> Loopback {
    let (v1, v1alpha) = crate::grpc::reflection(&["listen.v1.Listen"]).unwrap();
    let router = crate::grpc::server_builder(Default::default())
        .add_service(v1)
        .add_service(v1alpha);
    Loopback::serve(router).await
}

/// One open reflection stream, of either version; requests and answers are written as v1.
struct Session<Req, Resp> {
    requests: mpsc::Sender<Req>,
    responses: Streaming<Resp>,
}

async fn open_v1(channel: &Channel) -> Session<ServerReflectionRequest, ServerReflectionResponse> {
    let (requests, rx) = mpsc::channel(1);
    let responses = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    Session {
        requests,
        responses,
    }
}

async fn open_v1alpha(
    channel: &Channel,
) -> Session<v1alpha::ServerReflectionRequest, v1alpha::ServerReflectionResponse> {
    let (requests, rx) = mpsc::channel(1);
    let responses = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    Session {
        requests,
        responses,
    }
}

impl<Req: Message + Default, Resp: Message + Default> Session<Req, Resp> {
    async fn next(&mut self) -> Result<Option<ServerReflectionResponse>, Status> {
        let response = tokio::time::timeout(Duration::from_secs(5), self.responses.next())
            .await
            .expect("an answer within 5 s");
        response.transpose()?.map(|r| transcode(&r)).transpose()
    }

    async fn send(&mut self, message_request: Option<MessageRequest>) {
        let request = ServerReflectionRequest {
            host: "example".into(),
            message_request,
        };
        self.requests
            .send(transcode(&request).unwrap())
            .await
            .unwrap();
    }

    async fn ask(&mut self, request: MessageRequest) -> MessageResponse {
        self.send(Some(request.clone())).await;
        let response = self.next().await.unwrap().expect("the stream stays open");
        assert_eq!(response.valid_host, "example");
        assert_eq!(
            response.original_request.unwrap().message_request,
            Some(request)
        );
        response.message_response.unwrap()
    }

    async fn files(&mut self, request: MessageRequest) -> Vec<String> {
        match self.ask(request).await {
            MessageResponse::FileDescriptorResponse(files) => (files.file_descriptor_proto.iter())
                .map(|encoded| {
                    FileDescriptorProto::decode(encoded.as_slice())
                        .unwrap()
                        .name()
                        .to_string()
                })
                .collect(),
            other => panic!("expected files, got {other:?}"),
        }
    }

    async fn services(&mut self) -> Vec<String> {
        match self.ask(MessageRequest::ListServices(String::new())).await {
            MessageResponse::ListServicesResponse(list) => {
                let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
                names.sort();
                names
            }
            other => panic!("expected services, got {other:?}"),
        }
    }

    /// Asks `request`, expects NOT_FOUND naming `name`.
    async fn not_found(&mut self, request: MessageRequest, name: &str) {
        match self.ask(request).await {
            MessageResponse::ErrorResponse(error) => {
                assert_eq!(error.error_code, Code::NotFound as i32);
                assert!(error.error_message.contains(name), "{error:?}");
            }
            other => panic!("expected NOT_FOUND, got {other:?}"),
        }
    }
}

fn symbol(name: &str) -> MessageRequest {
    MessageRequest::FileContainingSymbol(name.to_string())
}

fn file(name: &str) -> MessageRequest {
    MessageRequest::FileByFilename(name.to_string())
}

fn extension(containing_type: &str, extension_number: i32) -> MessageRequest {
    MessageRequest::FileContainingExtension(ExtensionRequest {
        containing_type: containing_type.to_string(),
        extension_number,
    })
}

fn extension_numbers(message: &str) -> MessageRequest {
    MessageRequest::AllExtensionNumbersOfType(message.to_string())
}

#[tokio::test]
async fn both_versions_list_only_the_configured_services() {
    let server = start().await;
    let want = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "listen.v1.Listen",
    ];
    assert_eq!(open_v1(&server.channel).await.services().await, want);
    assert_eq!(open_v1alpha(&server.channel).await.services().await, want);
}

#[tokio::test]
async fn every_listed_service_is_described_by_both_versions() {
    let server = start().await;
    let mut v1 = open_v1(&server.channel).await;
    let mut v1alpha = open_v1alpha(&server.channel).await;
    for service in v1.services().await {
        assert!(!v1.files(symbol(&service)).await.is_empty(), "{service}");
        assert!(
            !v1alpha.files(symbol(&service)).await.is_empty(),
            "{service}"
        );
    }
}

#[tokio::test]
async fn every_name_a_file_declares_finds_that_file() {
    let server = start().await;
    for name in [
        "listen.v1.Listen",
        "listen.v1.Listen.SubmitConversation",
        "listen.v1.Conversation",
        "listen.v1.SessionRequest.start",
        "listen.v1.SessionRequest.msg",
        "listen.v1.ConversationStatus",
        // Enum values are siblings of their enum.
        "listen.v1.CONVERSATION_STATUS_COMPLETED",
    ] {
        // A fresh stream each time, so the file is not left out as already sent.
        let files = open_v1(&server.channel).await.files(symbol(name)).await;
        assert_eq!(files[0], LISTEN, "{name}");
    }
    for name in [
        "grpc.health.v1.HealthCheckResponse.ServingStatus",
        "grpc.health.v1.HealthCheckResponse.SERVICE_UNKNOWN",
    ] {
        let files = open_v1alpha(&server.channel)
            .await
            .files(symbol(name))
            .await;
        // tonic-health's descriptor set names the file without its directory.
        assert_eq!(files, ["health.proto"], "{name}");
    }
    let files = open_v1(&server.channel)
        .await
        .files(symbol("google.protobuf.Timestamp"))
        .await;
    assert_eq!(files, [TIMESTAMP]);
}

#[tokio::test]
async fn an_unknown_name_is_answered_inside_the_stream_which_goes_on_in_v1() {
    let server = start().await;
    let mut session = open_v1(&server.channel).await;
    session
        .not_found(symbol("no.such.Message"), "no.such.Message")
        .await;
    session
        .not_found(file("no/such/file.proto"), "no/such/file.proto")
        .await;
    session
        .not_found(
            extension("listen.v1.Conversation", 100),
            "listen.v1.Conversation",
        )
        .await;
    session
        .not_found(extension_numbers("no.such.Message"), "no.such.Message")
        .await;
    assert_eq!(session.files(symbol("listen.v1.Listen")).await[0], LISTEN);
}

#[tokio::test]
async fn an_unknown_name_is_answered_inside_the_stream_which_goes_on_in_v1alpha() {
    let server = start().await;
    let mut session = open_v1alpha(&server.channel).await;
    session
        .not_found(symbol("no.such.Message"), "no.such.Message")
        .await;
    assert_eq!(session.files(symbol("listen.v1.Listen")).await[0], LISTEN);
    session
        .not_found(file("no/such/file.proto"), "no/such/file.proto")
        .await;
    assert_eq!(session.services().await.len(), 4);
}

#[tokio::test]
async fn a_file_comes_with_the_imports_not_yet_sent_on_its_stream() {
    let server = start().await;
    let mut session = open_v1(&server.channel).await;
    assert_eq!(session.files(file(LISTEN)).await, [LISTEN, TIMESTAMP]);
    // timestamp.proto went out with listen.proto: only the requested file comes again.
    assert_eq!(session.files(symbol("pusher.v1.Pusher")).await, [PUSHER]);
    assert_eq!(session.files(file(LISTEN)).await, [LISTEN]);
    // Each stream starts afresh.
    let mut other = open_v1alpha(&server.channel).await;
    assert_eq!(
        other.files(symbol("listen.v1.Listen")).await,
        [LISTEN, TIMESTAMP]
    );
}

#[tokio::test]
async fn files_are_served_byte_for_byte() {
    let server = start().await;
    let served = match open_v1(&server.channel).await.ask(file(LISTEN)).await {
        MessageResponse::FileDescriptorResponse(files) => files.file_descriptor_proto,
        other => panic!("{other:?}"),
    };
    let registered = EncodedFileSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .unwrap()
        .file;
    for encoded in served {
        assert!(registered.contains(&encoded));
    }
}

#[tokio::test]
async fn a_known_message_nothing_extends_has_no_extension_numbers() {
    let server = start().await;
    let answer = open_v1(&server.channel)
        .await
        .ask(extension_numbers("listen.v1.Conversation"))
        .await;
    assert_eq!(
        answer,
        MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
            base_type_name: "listen.v1.Conversation".into(),
            extension_number: vec![],
        })
    );
}

/// `test/base.proto`: `message Base { extensions 100 to 199; }`.
/// `test/ext.proto`, importing it: `extend Base { int32 flag = 100; }` and
/// `message Holder { message Inner {} extend Base { string tag = 101; } }`.
fn extension_descriptors() -> Vec<u8> {
    let base = FileDescriptorProto {
        name: Some("test/base.proto".into()),
        package: Some("test".into()),
        syntax: Some("proto2".into()),
        message_type: vec![DescriptorProto {
            name: Some("Base".into()),
            extension_range: vec![descriptor_proto::ExtensionRange {
                start: Some(100),
                end: Some(200),
                options: None,
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let extension = |name: &str, number: i32, kind: Type| FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(kind as i32),
        extendee: Some(".test.Base".into()),
        ..Default::default()
    };
    let ext = FileDescriptorProto {
        name: Some("test/ext.proto".into()),
        package: Some("test".into()),
        syntax: Some("proto2".into()),
        dependency: vec!["test/base.proto".into()],
        extension: vec![extension("flag", 100, Type::Int32)],
        message_type: vec![DescriptorProto {
            name: Some("Holder".into()),
            nested_type: vec![DescriptorProto {
                name: Some("Inner".into()),
                ..Default::default()
            }],
            extension: vec![extension("tag", 101, Type::String)],
            ..Default::default()
        }],
        ..Default::default()
    };
    FileDescriptorSet {
        file: vec![base, ext],
    }
    .encode_to_vec()
}

#[tokio::test]
async fn extensions_are_found_by_number_and_listed_per_message() {
    let descriptors = extension_descriptors();
    let (v1, _) = servers(&[], &[&descriptors]).unwrap();
    let server =
        Loopback::serve(crate::grpc::server_builder(Default::default()).add_service(v1)).await;
    let mut session = open_v1(&server.channel).await;
    assert_eq!(
        session.files(extension("test.Base", 101)).await,
        ["test/ext.proto", "test/base.proto"]
    );
    assert_eq!(
        session.ask(extension_numbers("test.Base")).await,
        MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
            base_type_name: "test.Base".into(),
            extension_number: vec![100, 101],
        })
    );
    session
        .not_found(extension("test.Base", 102), "test.Base")
        .await;
    for name in ["test.flag", "test.Holder.tag", "test.Holder.Inner"] {
        assert_eq!(
            session.files(symbol(name)).await,
            ["test/ext.proto"],
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_request_asking_nothing_ends_the_stream_with_invalid_argument() {
    let server = start().await;
    let mut session = open_v1(&server.channel).await;
    session.send(None).await;
    let error = session.next().await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
}

#[test]
fn a_listed_service_that_no_file_declares_is_refused_at_start() {
    let error = crate::grpc::reflection(&["no.such.Service"]).unwrap_err();
    assert!(matches!(error, Error::UndeclaredService(name) if name == "no.such.Service"));
}
