//! End-to-end: the real listen-svc and pusher-svc binaries on loopback ports.

use std::time::{Duration, Instant};
use tests::listen::{ConversationStatus, LinkState};
use tests::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const SETTLE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn submitted_conversation_is_processed_to_completed() {
    let pusher_port = free_port();
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let mut client = listen_client(&listen);

    let response = client
        .submit_conversation(talk("alice", "k1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status, ConversationStatus::Processing as i32);
    let conversation = wait_one(
        &client,
        &response.conversation_id,
        ConversationStatus::Completed,
        SETTLE,
    )
    .await;
    let structured = conversation.structured.as_ref().expect("structured result");
    assert_eq!(
        structured.title,
        "The quarterly budget review with the finance team"
    );
    assert_eq!(structured.category, "finance");
    assert_eq!(
        structured.action_items,
        vec![
            "I will send the invoice summary by Friday",
            "We need to cut travel costs next quarter"
        ]
    );
    assert_eq!(conversation.attempts, 1);
    assert_eq!(conversation.segments.len(), 3);
    assert!(conversation.completed_at.is_some() && conversation.finished_at.is_some());

    let link = link_status(&mut client).await;
    assert_eq!(
        (link.state, link.pending, link.queued),
        (LinkState::Connected as i32, 0, 0)
    );
    assert_eq!(
        listen.health("listen.v1.PusherLink").await,
        Some(ServingStatus::Serving)
    );
}

#[tokio::test]
async fn resubmitting_with_the_same_key_returns_the_same_conversation() {
    let pusher_port = free_port();
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let mut client = listen_client(&listen);

    let first = client
        .submit_conversation(talk("bob", "same"))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .submit_conversation(talk("bob", "same"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.conversation_id, first.conversation_id);
    wait_one(
        &client,
        &first.conversation_id,
        ConversationStatus::Completed,
        SETTLE,
    )
    .await;
    let after = client
        .submit_conversation(talk("bob", "same"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after.conversation_id.as_str(), after.status),
        (
            first.conversation_id.as_str(),
            ConversationStatus::Completed as i32
        )
    );

    let other_user = client
        .submit_conversation(talk("carol", "same"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other_user.conversation_id, first.conversation_id);
    let listed = client
        .list_conversations(listen::ListConversationsRequest {
            uid: "bob".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.conversations.len(),
        1,
        "one conversation stored for three submits"
    );
}

#[tokio::test]
async fn a_conversation_without_text_is_discarded_and_never_sent() {
    let pusher_port = free_port();
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let mut client = listen_client(&listen);

    let mut empty = talk("dave", "");
    for segment in &mut empty.segments {
        segment.text = "   ".into();
    }
    let response = client
        .submit_conversation(empty)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status, ConversationStatus::Discarded as i32);
    let none = client
        .submit_conversation(listen::SubmitConversationRequest {
            uid: "dave".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.status, ConversationStatus::Discarded as i32);

    // A processed conversation after them proves the link ran; the discarded ones stayed put.
    let real = client
        .submit_conversation(talk("dave", ""))
        .await
        .unwrap()
        .into_inner();
    wait_all(
        &client,
        &[real.conversation_id],
        ConversationStatus::Completed,
        SETTLE,
    )
    .await;
    assert_eq!(
        status_of(&mut client, &response.conversation_id).await,
        ConversationStatus::Discarded
    );
    let conversation = client
        .get_conversation(listen::GetConversationRequest {
            conversation_id: response.conversation_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((conversation.attempts, conversation.structured), (0, None));
}

#[tokio::test]
async fn work_submitted_before_pusher_starts_completes_when_it_does() {
    let pusher_port = free_port();
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let mut client = listen_client(&listen);

    let mut ids = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        let response = client
            .submit_conversation(talk("erin", &format!("k{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "submit waited on pusher"
        );
        assert_eq!(response.status, ConversationStatus::Processing as i32);
        ids.push(response.conversation_id);
    }
    let link = link_status(&mut client).await;
    assert_ne!(link.state, LinkState::Connected as i32);
    assert_eq!(link.queued, 20);
    assert!(!link.last_error.is_empty(), "the link says why it is down");
    // Listen itself is healthy; only the link is not.
    assert_eq!(listen.health("").await, Some(ServingStatus::Serving));
    assert_eq!(
        listen.health("listen.v1.Listen").await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(
        listen.health("listen.v1.PusherLink").await,
        Some(ServingStatus::NotServing)
    );

    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    wait_all(&client, &ids, ConversationStatus::Completed, SETTLE).await;
    let link = link_status(&mut client).await;
    assert_eq!(
        (link.state, link.pending, link.queued),
        (LinkState::Connected as i32, 0, 0)
    );
    let claimed = |via: &str| format!("listen_link_claimed_total{{via=\"{via}\"}}");
    assert_eq!(
        listen.metric(&claimed("queue")).await,
        20.0,
        "queued, then claimed"
    );
    assert_eq!(listen.metric(&claimed("submit")).await, 0.0);

    // With the stream up and nothing queued, each Submit writes its conversation already
    // claimed (claim at submit). A maintenance pass that takes the free slots back for a
    // moment (every lease TTL / 3) may send one through the queue instead.
    let mut more = Vec::new();
    for i in 0..10 {
        more.push(
            client
                .submit_conversation(talk("erin", &format!("up{i}")))
                .await
                .unwrap()
                .into_inner()
                .conversation_id,
        );
    }
    wait_all(&client, &more, ConversationStatus::Completed, SETTLE).await;
    let at_submit = listen.metric(&claimed("submit")).await;
    assert!(at_submit >= 8.0, "{at_submit} of 10 claimed at submit");
    assert_eq!(
        at_submit + listen.metric(&claimed("queue")).await,
        30.0,
        "each claimed once"
    );
}

/// After a backlog and concurrent load, Submits are claimed at submit again. While rows
/// wait, new Submits are queued behind them (fair order), and each wakes the link for a
/// claim; once a claim comes back short of its limit, the link sets slots aside again and
/// keeps some open while a claim is out, so Submits skip the empty queue.
#[tokio::test]
async fn under_load_submits_go_back_to_claim_at_submit_after_a_backlog() {
    let pusher_port = free_port();
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let client = listen_client(&listen);
    let mut ids = Vec::new();
    for i in 0..100 {
        let response = client
            .clone()
            .submit_conversation(talk("gina", &format!("backlog{i}")))
            .await
            .unwrap();
        ids.push(response.into_inner().conversation_id);
    }
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    ids.extend(submit_many(&client, "gina", 1500).await);
    wait_all(
        &client,
        &ids,
        ConversationStatus::Completed,
        Duration::from_secs(60),
    )
    .await;
    let claimed = |via: &str| format!("listen_link_claimed_total{{via=\"{via}\"}}");
    let at_submit = listen.metric(&claimed("submit")).await;
    let queued = listen.metric(&claimed("queue")).await;
    assert_eq!(at_submit + queued, 1600.0, "each claimed once");
    // A maintenance pass (every lease TTL / 3) takes the slots back for a moment, which may
    // send one or two through the queue.
    let mut after = Vec::new();
    for i in 0..20 {
        let response = client
            .clone()
            .submit_conversation(talk("gina", &format!("after{i}")))
            .await
            .unwrap();
        after.push(response.into_inner().conversation_id);
    }
    wait_all(&client, &after, ConversationStatus::Completed, SETTLE).await;
    let more = listen.metric(&claimed("submit")).await - at_submit;
    assert!(
        more >= 18.0,
        "{more} of 20 claimed at submit after the load"
    );
}

#[tokio::test]
async fn pusher_killed_with_work_in_flight_then_restarted_completes_everything() {
    let pusher_port = free_port();
    // Jobs take 1 s, so SIGKILL lands with work in flight.
    let mut pusher =
        start_pusher(PusherOptions::port(pusher_port).args(&["--simulated-latency", "1s"])).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &["--max-in-flight", "16"],
    })
    .await;
    let mut client = listen_client(&listen);

    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(
            client
                .submit_conversation(talk("frank", &format!("k{i}")))
                .await
                .unwrap()
                .into_inner()
                .conversation_id,
        );
    }
    wait_for("work in flight", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move { (link_status(&mut client).await.pending > 0).then_some(()) }
    })
    .await;
    let pending = link_status(&mut client).await.pending;
    assert!(pending <= 16, "pending {pending} exceeds --max-in-flight");
    pusher.kill();

    // While pusher is gone: submits still answer at once and everything stays PROCESSING.
    wait_link(
        &client,
        LinkWait::Not(LinkState::Connected),
        Duration::from_secs(10),
    )
    .await;
    for i in 60..70 {
        let started = Instant::now();
        ids.push(
            client
                .submit_conversation(talk("frank", &format!("k{i}")))
                .await
                .unwrap()
                .into_inner()
                .conversation_id,
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "submit waited on pusher"
        );
    }
    let link = link_status(&mut client).await;
    assert!(link.pending <= 16);
    assert_eq!(
        link.pending as u64 + link.queued,
        ids.len() as u64 - completed(&client, &ids).await
    );

    pusher.restart().await;
    let done = wait_all(
        &client,
        &ids,
        ConversationStatus::Completed,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done.len(), 70);
    assert!(
        done.iter()
            .all(|c| c.structured.as_ref().is_some_and(|s| !s.title.is_empty()))
    );
    let link = link_status(&mut client).await;
    assert!(link.reconnects >= 1, "{link:?}");
    assert_eq!((link.pending, link.queued), (0, 0));
}

async fn completed(client: &ListenClient, ids: &[String]) -> u64 {
    let mut count = 0;
    for id in ids {
        if status_of(&mut client.clone(), id).await == ConversationStatus::Completed {
            count += 1;
        }
    }
    count
}

#[tokio::test]
async fn bad_input_gets_a_status_naming_the_field_and_stores_nothing() {
    let pusher_port = free_port();
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &["--max-segments", "5", "--max-segment-bytes", "64"],
    })
    .await;
    let mut client = listen_client(&listen);

    let expect =
        |result: Result<tonic::Response<listen::SubmitConversationResponse>, tonic::Status>,
         code: Code,
         field: &str| {
            let status = result.expect_err("must be rejected");
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().starts_with(field),
                "message {:?} should name {field}",
                status.message()
            );
        };
    expect(
        client.submit_conversation(talk("", "k")).await,
        Code::InvalidArgument,
        "uid",
    );
    let mut many = talk("grace", "k");
    many.segments = (0..6).map(|i| segment("hi", i as f64)).collect();
    expect(
        client.submit_conversation(many).await,
        Code::InvalidArgument,
        "segments",
    );
    let mut long = talk("grace", "k");
    long.segments[1].text = "x".repeat(65);
    expect(
        client.submit_conversation(long).await,
        Code::InvalidArgument,
        "segments[1].text",
    );
    let mut backwards = talk("grace", "k");
    backwards.segments[0].end = -1.0;
    expect(
        client.submit_conversation(backwards).await,
        Code::InvalidArgument,
        "segments[0].end",
    );

    let missing = uuid_like();
    let status = client
        .get_conversation(listen::GetConversationRequest {
            conversation_id: missing.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains(&missing));
    let status = client
        .get_conversation(listen::GetConversationRequest {
            conversation_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (
            status.code(),
            status.message().starts_with("conversation_id")
        ),
        (Code::InvalidArgument, true)
    );
    let status = client
        .retry_conversation(listen::RetryConversationRequest {
            conversation_id: missing,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .list_conversations(listen::ListConversationsRequest {
            status: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message().starts_with("status")),
        (Code::InvalidArgument, true)
    );

    // Nothing was stored for the rejected requests, and the same key still works.
    let listed = client
        .list_conversations(listen::ListConversationsRequest {
            uid: "grace".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.conversations.is_empty());
    let ok = client
        .submit_conversation(talk("grace", "k"))
        .await
        .unwrap()
        .into_inner();
    wait_one(
        &client,
        &ok.conversation_id,
        ConversationStatus::Completed,
        SETTLE,
    )
    .await;
    let status = client
        .retry_conversation(listen::RetryConversationRequest {
            conversation_id: ok.conversation_id,
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "only FAILED can be retried: {status:?}"
    );
}

/// A well-formed id that names nothing.
fn uuid_like() -> String {
    "01900000-0000-7000-8000-000000000000".to_string()
}

#[tokio::test]
async fn list_pages_through_a_users_conversations_newest_first() {
    let pusher_port = free_port();
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let mut client = listen_client(&listen);
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            client
                .submit_conversation(talk("heidi", &format!("k{i}")))
                .await
                .unwrap()
                .into_inner()
                .conversation_id,
        );
    }
    wait_all(&client, &ids, ConversationStatus::Completed, SETTLE).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_conversations(listen::ListConversationsRequest {
                uid: "heidi".into(),
                status: ConversationStatus::Completed as i32,
                page_size: 3,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.conversations.into_iter().map(|c| c.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    ids.reverse();
    assert_eq!(seen, ids);
}

#[tokio::test]
async fn reflection_lists_only_each_servers_own_services_in_v1_and_v1alpha() {
    let pusher_port = free_port();
    let pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    for (service, own) in [(&listen, "listen.v1.Listen"), (&pusher, "pusher.v1.Pusher")] {
        let mut want: Vec<String> = common.iter().map(|s| s.to_string()).collect();
        want.push(own.to_string());
        want.sort();
        assert_eq!(reflection::list_v1(service.channel()).await, want);
        assert_eq!(reflection::list_v1alpha(service.channel()).await, want);
        // Describing the service works (what grpcurl does with no .proto files).
        assert!(reflection::file_containing_v1alpha(service.channel(), own).await);
        assert!(
            reflection::file_containing_v1alpha(service.channel(), "grpc.health.v1.Health").await
        );
    }
}

#[tokio::test]
async fn health_and_reflection_answer_unknown_names_as_the_grpc_protocols_say() {
    let pusher_port = free_port();
    let pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    for (service, own, file) in [
        (&listen, "listen.v1.Listen", "listen/v1/listen.proto"),
        (&pusher, "pusher.v1.Pusher", "pusher/v1/pusher.proto"),
    ] {
        // Watch: SERVICE_UNKNOWN, and the call stays open (no NOT_FOUND).
        let mut health = tonic_health::pb::health_client::HealthClient::new(service.channel());
        let mut updates = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), updates.message())
            .await
            .unwrap()
            .unwrap()
            .expect("the watch stays open");
        assert_eq!(first.status, ServingStatus::ServiceUnknown as i32);

        // Reflection: NOT_FOUND inside the stream, which then describes the service with
        // the file it imports.
        let answers =
            reflection::symbols_on_one_v1alpha_stream(service.channel(), &["no.such.Message", own])
                .await;
        assert_eq!(answers[0], Err(5));
        assert_eq!(
            answers[1],
            Ok(vec![
                file.to_string(),
                "google/protobuf/timestamp.proto".to_string()
            ])
        );
    }
}

mod reflection {
    use tokio_stream::StreamExt;
    use tonic::transport::Channel;
    use tonic_reflection::pb::{v1, v1alpha};

    pub async fn list_v1(channel: Channel) -> Vec<String> {
        use v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(Ok(v1::ServerReflectionResponse {
            message_response: Some(MessageResponse::ListServicesResponse(list)),
            ..
        })) = responses.next().await
        else {
            panic!()
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        names
    }

    pub async fn list_v1alpha(channel: Channel) -> Vec<String> {
        use v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(Ok(v1alpha::ServerReflectionResponse {
            message_response: Some(MessageResponse::ListServicesResponse(list)),
            ..
        })) = responses.next().await
        else {
            panic!()
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        names
    }

    pub async fn file_containing_v1alpha(channel: Channel, symbol: &str) -> bool {
        use v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_string())),
        };
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        matches!(
            responses.next().await,
            Some(Ok(v1alpha::ServerReflectionResponse { message_response: Some(MessageResponse::FileDescriptorResponse(files)), .. })) if !files.file_descriptor_proto.is_empty()
        )
    }
    /// Asks for the file of each symbol in turn on one v1alpha stream: the names of the
    /// files sent, or the error_response code.
    pub async fn symbols_on_one_v1alpha_stream(
        channel: Channel,
        symbols: &[&str],
    ) -> Vec<Result<Vec<String>, i32>> {
        use prost::Message;
        use v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let (requests, rx) = tokio::sync::mpsc::channel(1);
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut answers = Vec::new();
        for symbol in symbols {
            let request = v1alpha::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_string())),
            };
            requests.send(request).await.unwrap();
            let response = responses.next().await.unwrap().unwrap();
            answers.push(match response.message_response.unwrap() {
                MessageResponse::FileDescriptorResponse(files) => Ok(files
                    .file_descriptor_proto
                    .iter()
                    .map(|encoded| {
                        prost_types::FileDescriptorProto::decode(encoded.as_slice())
                            .unwrap()
                            .name()
                            .to_string()
                    })
                    .collect()),
                MessageResponse::ErrorResponse(error) => Err(error.error_code),
                other => panic!("unexpected answer {other:?}"),
            });
        }
        answers
    }
}

#[tokio::test]
async fn pusher_process_rpc_answers_and_is_idempotent() {
    let pusher = start_pusher(PusherOptions::port(free_port())).await;
    let mut client = pusher_client(&pusher);
    let request = pusher::ProcessConversation {
        conversation_id: "debug-1".into(),
        uid: "ivan".into(),
        attempt: 1,
        segments: vec![pusher::Segment {
            text: "Let's book the flight and the hotel.".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let ack = client.process(request.clone()).await.unwrap().into_inner();
    let Some(pusher::ack::Outcome::Processed(processed)) = ack.outcome else {
        panic!("{ack:?}")
    };
    let structured = processed.structured.unwrap();
    assert_eq!(
        (structured.category.as_str(), structured.action_items.len()),
        ("travel", 1)
    );
    let again = client
        .process(pusher::ProcessConversation {
            attempt: 2,
            ..request
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.attempt, 2);
    let Some(pusher::ack::Outcome::Processed(cached)) = again.outcome else {
        panic!()
    };
    assert_eq!(cached.structured.unwrap(), structured);

    let status = client
        .process(pusher::ProcessConversation::default())
        .await
        .unwrap_err();
    assert_eq!(
        (
            status.code(),
            status.message().starts_with("conversation_id")
        ),
        (Code::InvalidArgument, true)
    );
}

#[tokio::test]
async fn listen_restarts_on_the_same_store_and_keeps_its_data() {
    let pusher_port = free_port();
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let mut listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let client = listen_client(&listen);
    let id = client
        .clone()
        .submit_conversation(talk("judy", "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    wait_one(&client, &id, ConversationStatus::Completed, SETTLE).await;

    let status = listen.terminate(Duration::from_secs(10));
    assert!(status.success(), "SIGTERM exit: {status}");
    listen.restart().await;
    let mut client = listen_client(&listen);
    assert_eq!(
        status_of(&mut client, &id).await,
        ConversationStatus::Completed
    );
    let again = client
        .submit_conversation(talk("judy", "k"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.conversation_id, id, "idempotency survives a restart");
}

// Multi-threaded: `terminate` blocks its thread while the clients' connections must still
// be driven (to read the end of the watches and close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_services_exit_cleanly_on_sigterm_with_the_link_open() {
    let pusher_port = free_port();
    let mut pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let mut listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let mut client = listen_client(&listen);
    wait_link(&client, LinkState::Connected, Duration::from_secs(10)).await;
    let _ = link_status(&mut client).await;
    // A health Watch open on each: it sees NOT_SERVING, then ends, and holds no shutdown
    // (pusher's grace is 25 s).
    let mut watches = Vec::new();
    for service in [&pusher, &listen] {
        let mut watch = tonic_health::pb::health_client::HealthClient::new(service.channel())
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(watch.message().await.unwrap().unwrap().status, 1, "SERVING");
        watches.push(watch);
    }
    let started = Instant::now();
    assert!(pusher.terminate(Duration::from_secs(10)).success());
    assert!(listen.terminate(Duration::from_secs(10)).success());
    assert!(started.elapsed() < Duration::from_secs(10));
    for mut watch in watches {
        let mut statuses = Vec::new();
        while let Ok(Some(response)) = watch.message().await {
            statuses.push(response.status);
        }
        assert_eq!(statuses, [2], "NOT_SERVING before the end");
    }
}

#[tokio::test]
async fn prometheus_metrics_are_served_and_move() {
    let pusher_port = free_port();
    let pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let mut client = listen_client(&listen);
    let id = client
        .submit_conversation(talk("metrics", "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    wait_one(&client, &id, ConversationStatus::Completed, SETTLE).await;
    let _ = client
        .get_conversation(listen::GetConversationRequest {
            conversation_id: "bad".into(),
            ..Default::default()
        })
        .await;

    // The link gauges are published by the link loop; give it its next turn.
    wait_for("link gauges", Duration::from_secs(5), || async {
        (listen.metric("listen_link_up").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        listen.metric("listen_link_state").await,
        LinkState::Connected as i32 as f64
    );
    assert_eq!(listen.metric("listen_link_sent_total").await, 1.0);
    assert_eq!(
        listen
            .metric("listen_link_acks_total{result=\"processed\"}")
            .await,
        1.0
    );
    assert_eq!(
        listen
            .metric("listen_conversations_total{status=\"processing\"}")
            .await,
        1.0
    );
    assert_eq!(
        listen
            .metric("listen_conversations_total{status=\"completed\"}")
            .await,
        1.0
    );
    assert_eq!(
        listen
            .metric("listen_rejected_requests_total{code=\"invalid_argument\"}")
            .await,
        1.0
    );
    assert_eq!(
        listen.metric("listen_link_ack_latency_seconds_count").await,
        1.0
    );
    let text = listen.metrics().await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("listen_link_ack_latency_seconds_bucket{")
                && l.contains("le=\"0.005\"")),
        "histogram buckets:\n{text}"
    );
    assert_eq!(
        listen
            .metric(&format!(
                "listen_link_sent_total{{endpoint=\"127.0.0.1:{}\"}}",
                pusher.addr.port()
            ))
            .await,
        1.0,
        "per-endpoint series are labelled"
    );

    assert_eq!(pusher.metric("pusher_jobs_started_total").await, 1.0);
    assert_eq!(
        pusher
            .metric("pusher_jobs_total{result=\"succeeded\"}")
            .await,
        1.0
    );
    assert_eq!(pusher.metric("pusher_streams_open").await, 1.0);
    assert_eq!(
        pusher
            .metric("pusher_processing_duration_seconds_count")
            .await,
        1.0
    );

    // Moving: a second conversation moves the counters.
    let id = client
        .submit_conversation(talk("metrics", "k2"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    wait_one(&client, &id, ConversationStatus::Completed, SETTLE).await;
    assert_eq!(
        pusher
            .metric("pusher_jobs_total{result=\"succeeded\"}")
            .await,
        2.0
    );
    wait_for("settled counter", Duration::from_secs(5), || async {
        (listen
            .metric("listen_conversations_total{status=\"completed\"}")
            .await
            == 2.0)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn oversized_messages_and_slow_unary_calls_get_precise_statuses() {
    let pusher_port = free_port();
    let pusher = start_pusher(PusherOptions::port(pusher_port).args(&[
        "--simulated-latency",
        "2s",
        "--request-timeout",
        "300ms",
    ]))
    .await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &["--max-message-bytes", "4096"],
    })
    .await;
    let mut client = listen_client(&listen);

    let mut big = talk("big", "k");
    big.segments[0].text = "x".repeat(8_000);
    let status = client.submit_conversation(big).await.unwrap_err();
    // tonic's code for an over-limit message (grpc-go says RESOURCE_EXHAUSTED); the message
    // names the limit.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("the limit is: 4096 bytes"),
        "{}",
        status.message()
    );
    let listed = client
        .list_conversations(listen::ListConversationsRequest {
            uid: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.conversations.is_empty(), "nothing stored");

    let started = Instant::now();
    let request = pusher::ProcessConversation {
        conversation_id: "slow-1".into(),
        attempt: 1,
        segments: vec![pusher::Segment {
            text: "I will wait.".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = pusher_client(&pusher).process(request).await.unwrap_err();
    eprintln!("request timeout: {status:?}");
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "cut at the timeout, not after the job"
    );
}
