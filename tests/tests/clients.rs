//! How the real binaries meet clients configured as deployments configure them: compressed
//! requests, response compression, list pages bounded in bytes, views, and half-close on
//! pusher's Connect. (The same behaviours are checked with Python grpcio, an independent
//! implementation, by tests/interop/.)

use std::time::Duration;
use tests::listen::{ConversationStatus, ConversationView};
use tests::pusher::{Hello, LinkRequest, ProcessConversation, link_request, link_response};
use tests::*;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const SETTLE: Duration = Duration::from_secs(30);
const ENCODINGS: [CompressionEncoding; 3] = [
    CompressionEncoding::Gzip,
    CompressionEncoding::Deflate,
    CompressionEncoding::Zstd,
];

fn encoding_of<T>(response: &tonic::Response<T>) -> Option<String> {
    response
        .metadata()
        .get("grpc-encoding")
        .map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test]
async fn compressed_requests_work_everywhere_and_responses_are_compressed_only_when_asked() {
    let pusher_port = free_port();
    let pusher = start_pusher(
        PusherOptions::port(pusher_port).args(&["--response-compression", "zstd,gzip"]),
    )
    .await;
    // The link compresses what it sends; pusher answers it compressed too.
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &["--pusher-compression", "zstd"],
    })
    .await;

    for encoding in ENCODINGS {
        let mut client = listen_client(&listen)
            .send_compressed(encoding)
            .accept_compressed(CompressionEncoding::Gzip);
        let submitted = client
            .submit_conversation(talk("zip", &format!("{encoding:?}")))
            .await
            .unwrap_or_else(|status| panic!("{encoding:?} Submit: {status:?}"));
        assert_eq!(
            encoding_of(&submitted),
            None,
            "listen compresses no response by default"
        );
        let id = submitted.into_inner().conversation_id;
        let conversation = wait_one(&client, &id, ConversationStatus::Completed, SETTLE).await;
        assert_eq!(conversation.segments.len(), 3);

        let mut pusher_client = pusher_client(&pusher)
            .send_compressed(encoding)
            .accept_compressed(CompressionEncoding::Gzip);
        let ack = pusher_client
            .process(ProcessConversation {
                conversation_id: format!("direct-{encoding:?}"),
                attempt: 1,
                segments: vec![tests::pusher::Segment {
                    text: "I will call the bank.".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|status| panic!("{encoding:?} Process: {status:?}"));
        assert_eq!(
            encoding_of(&ack),
            Some("gzip".into()),
            "pusher runs with --response-compression"
        );

        for service in [&listen, &pusher] {
            let mut health = HealthClient::new(service.channel()).send_compressed(encoding);
            let response = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap_or_else(|status| panic!("{encoding:?} health: {status:?}"));
            assert_eq!(response.into_inner().status, 1, "SERVING");
        }
    }

    // A client that accepts no compression gets plain responses from a server that would
    // compress them.
    let plain = pusher_client(&pusher)
        .process(ProcessConversation {
            conversation_id: "plain".into(),
            attempt: 1,
            segments: vec![tests::pusher::Segment {
                text: "Plain words.".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(encoding_of(&plain), None);
}

#[tokio::test]
async fn list_pages_are_bounded_in_bytes_and_continue_exactly_where_they_stopped() {
    let pusher_port = free_port();
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &["--max-page-bytes", "1000000"],
    })
    .await;
    let mut client = listen_client(&listen);
    // Five conversations of about 400 KB, then one larger than a whole page (1.2 MB).
    let big = |uid: &str, n: usize| tests::listen::SubmitConversationRequest {
        uid: uid.into(),
        segments: (0..n)
            .map(|i| segment(&format!("{i} {}", "words ".repeat(2_500)), i as f64))
            .collect(),
        ..Default::default()
    };
    let mut ids = Vec::new();
    for n in [27, 27, 27, 27, 27, 80] {
        ids.push(
            client
                .submit_conversation(big("pages", n))
                .await
                .unwrap()
                .into_inner()
                .conversation_id,
        );
    }
    ids.reverse(); // newest first

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_conversations(tests::listen::ListConversationsRequest {
                uid: "pages".into(),
                view: ConversationView::Full as i32,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        sizes.push((page.conversations.len(), prost::Message::encoded_len(&page)));
        for conversation in &page.conversations {
            assert_eq!(
                conversation.segments.len() as u32,
                conversation.segment_count
            );
            seen.push(conversation.id.clone());
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, ids, "every conversation once, newest first");
    // The 1.2 MB one is alone on its page; the others fit two to a page.
    assert_eq!(
        sizes.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [1, 2, 2, 1],
        "{sizes:?}"
    );
    for (n, bytes) in &sizes[1..] {
        assert!(*bytes <= 1_000_000, "{n} conversations in {bytes} bytes");
    }

    // The list's default view is BASIC: one page, no segments, their count.
    let basic = client
        .list_conversations(tests::listen::ListConversationsRequest {
            uid: "pages".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(basic.conversations.len(), 6);
    assert!(basic.next_page_token.is_empty());
    assert!(basic.conversations.iter().all(|c| c.segments.is_empty()));
    assert_eq!(basic.conversations[0].segment_count, 80);

    // Get defaults to FULL and can be asked for BASIC.
    let get = |view: ConversationView| tests::listen::GetConversationRequest {
        conversation_id: ids[1].clone(),
        view: view as i32,
    };
    let full = client
        .get_conversation(get(ConversationView::Unspecified))
        .await
        .unwrap();
    assert_eq!(full.into_inner().segments.len(), 27);
    let basic = client
        .get_conversation(get(ConversationView::Basic))
        .await
        .unwrap();
    assert_eq!(basic.into_inner().segments.len(), 0);

    let status = client
        .list_conversations(tests::listen::ListConversationsRequest {
            view: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("view: 7 is not a view"),
        "{}",
        status.message()
    );
    let status = client
        .list_conversations(tests::listen::ListConversationsRequest {
            page_token: "page-two".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("page_token: "),
        "{}",
        status.message()
    );
}

/// Listen half-closes Connect (it has nothing more to send): pusher still answers the work it
/// accepted, then ends the stream OK.
#[tokio::test]
async fn pusher_answers_accepted_work_after_the_client_half_closes_connect() {
    let pusher =
        start_pusher(PusherOptions::port(free_port()).args(&["--simulated-latency", "300ms"]))
            .await;
    let requests = [
        link_request::Msg::Hello(Hello {
            instance_id: "half-closer".into(),
            epoch: 1,
            max_in_flight: 4,
        }),
        link_request::Msg::Process(ProcessConversation {
            conversation_id: "c-half".into(),
            attempt: 1,
            segments: vec![tests::pusher::Segment {
                text: "We need to renew the lease.".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
    ]
    .map(|msg| LinkRequest { msg: Some(msg) });
    // The request stream ends after these two messages: a half-close.
    let mut responses = pusher_client(&pusher)
        .connect(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut acked = false;
    loop {
        let message = tokio::time::timeout(SETTLE, responses.message())
            .await
            .expect("pusher answers in time")
            .expect("the stream ends OK");
        match message.and_then(|m| m.msg) {
            Some(link_response::Msg::Ack(ack)) => {
                assert_eq!(ack.conversation_id, "c-half");
                acked = true;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(
        acked,
        "the accepted work was answered before the stream ended"
    );
}
