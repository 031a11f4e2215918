//! Live sessions against the real listen-svc and pusher-svc binaries.

use std::time::{Duration, Instant};
use tests::listen::{
    ConversationStatus, Finish, Segments, Start, session_event::Event, session_request::Msg,
};
use tests::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// Sessions may ask for a 1 s silence timeout, abandoned ones are swept every 200 ms, and
/// unary calls time out after 1 s (which must not cut the streams).
const FAST_SESSIONS: &[&str] = &[
    "--min-conversation-timeout",
    "1s",
    "--sweep-interval",
    "200ms",
    "--request-timeout",
    "1s",
];

async fn system(extra: &[&str]) -> (Service, Service) {
    let pusher_port = free_port();
    let pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &with_defaults(FAST_SESSIONS, extra)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    })
    .await;
    (pusher, listen)
}

#[tokio::test]
async fn segments_then_finish_are_stored_processed_and_reported_to_the_session() {
    let (_pusher, listen) = system(&[]).await;
    let client = listen_client(&listen);
    let (mut session, started) = Session::start(&client, "sam", 0).await;
    assert!(!started.session_id.is_empty());
    assert_eq!(started.resumed_conversation_id, "");

    session
        .send(Msg::Segments(Segments {
            segments: vec![segment("So, the sprint planning meeting.", 0.0)],
        }))
        .await;
    let Event::ConversationStarted(conversation) = session.next().await else {
        panic!()
    };
    let id = conversation.conversation_id;
    let Event::SegmentsStored(stored) = session.next().await else {
        panic!()
    };
    assert_eq!(
        (stored.conversation_id.as_str(), stored.total_segments),
        (id.as_str(), 1)
    );
    assert_eq!(
        session
            .say(&["I will write the tickets.", "We need to fix the build."])
            .await,
        3
    );
    assert_eq!(
        status_of(&mut client.clone(), &id).await,
        ConversationStatus::InProgress
    );

    session.send(Msg::Finish(Finish {})).await;
    let Event::ProcessingStarted(processing) = session.next().await else {
        panic!()
    };
    assert_eq!(processing.conversation_id, id);
    let Event::ConversationProcessed(processed) = session.next().await else {
        panic!()
    };
    let conversation = processed.conversation.unwrap();
    assert_eq!(
        (conversation.id.as_str(), conversation.status),
        (id.as_str(), ConversationStatus::Completed as i32)
    );
    assert!(conversation.segments.is_empty(), "the client sent them");
    assert_eq!(conversation.segment_count, 3);
    assert_eq!(
        conversation.structured.unwrap().action_items,
        ["I will write the tickets", "We need to fix the build"]
    );

    // The session goes on: the next segments start a new conversation.
    session
        .send(Msg::Segments(Segments {
            segments: vec![segment("Another topic.", 0.0)],
        }))
        .await;
    let Event::ConversationStarted(next) = session.next().await else {
        panic!()
    };
    assert_ne!(next.conversation_id, id);
}

#[tokio::test]
async fn silence_finishes_the_conversation() {
    let (_pusher, listen) = system(&[]).await;
    let client = listen_client(&listen);
    let (mut session, _) = Session::start(&client, "quiet", 1).await;
    session.say(&["Let's call the vendor tomorrow."]).await;
    let said = Instant::now();
    let Event::ProcessingStarted(processing) = session.next().await else {
        panic!()
    };
    assert!(
        said.elapsed() >= Duration::from_millis(900),
        "finished after {:?}",
        said.elapsed()
    );
    let Event::ConversationProcessed(processed) = session.next().await else {
        panic!()
    };
    assert_eq!(
        processed.conversation.unwrap().id,
        processing.conversation_id
    );
}

#[tokio::test]
async fn a_conversation_without_text_is_discarded() {
    let (_pusher, listen) = system(&[]).await;
    let client = listen_client(&listen);
    let (mut session, _) = Session::start(&client, "mute", 0).await;
    session.say(&["   ", ""]).await;
    session.send(Msg::Finish(Finish {})).await;
    let Event::ConversationDiscarded(discarded) = session.next().await else {
        panic!()
    };
    assert_eq!(
        status_of(&mut client.clone(), &discarded.conversation_id).await,
        ConversationStatus::Discarded
    );
}

#[tokio::test]
async fn a_new_session_for_the_same_uid_resumes_the_unfinished_conversation() {
    let (_pusher, listen) = system(&[]).await;
    let client = listen_client(&listen);
    // The first client's connection breaks mid-conversation (it never half-closes).
    let proxy = proxy::Proxy::start(listen.addr).await;
    let through_proxy = ListenClient::new(
        tonic::transport::Endpoint::from_shared(proxy.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let (mut first, _) = Session::start(&through_proxy, "resume", 30).await;
    first.say(&["First half of the story."]).await;
    proxy.set(proxy::Mode::Reset);
    let _ = first.error().await;

    let (mut second, started) = Session::start(&client, "resume", 30).await;
    assert!(!started.resumed_conversation_id.is_empty(), "resumed");
    assert_eq!(
        second
            .say(&["Second half.", "I will remember to finish it."])
            .await,
        3
    );
    second.send(Msg::Finish(Finish {})).await;
    let Event::ProcessingStarted(processing) = second.next().await else {
        panic!()
    };
    assert_eq!(processing.conversation_id, started.resumed_conversation_id);
    let conversation = wait_one(
        &client,
        &processing.conversation_id,
        ConversationStatus::Completed,
        Duration::from_secs(20),
    )
    .await;
    let texts: Vec<String> = conversation.segments.into_iter().map(|s| s.text).collect();
    assert_eq!(
        texts,
        [
            "First half of the story.",
            "Second half.",
            "I will remember to finish it."
        ]
    );
    // A different user does not resume it.
    let (_other, other) = Session::start(&client, "someone-else", 30).await;
    assert_eq!(other.resumed_conversation_id, "");
}

/// The session's listen dies mid-conversation (SIGKILL): every acknowledged segment
/// survives, and the conversation is finished at its deadline by the sweeper of the
/// restarted instance and processed.
#[tokio::test]
async fn listen_dies_mid_conversation_and_the_sweeper_finishes_it_at_its_deadline() {
    let (_pusher, mut listen) = system(&[]).await;
    let client = listen_client(&listen);
    let (mut session, _) = Session::start(&client, "crash", 2).await;
    session
        .send(Msg::Segments(Segments {
            segments: vec![segment("We should back up the database.", 0.0)],
        }))
        .await;
    let Event::ConversationStarted(started) = session.next().await else {
        panic!()
    };
    let Event::SegmentsStored(_) = session.next().await else {
        panic!()
    };
    assert_eq!(session.say(&["I'll check the restore too."]).await, 2);
    listen.kill();
    drop(session);

    listen.restart().await;
    let client = listen_client(&listen);
    let conversation = wait_one(
        &client,
        &started.conversation_id,
        ConversationStatus::Completed,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        conversation.segments.len(),
        2,
        "every acknowledged segment survived"
    );
    let finished = conversation.finished_at.unwrap();
    let last = conversation.created_at.unwrap();
    assert!(
        finished.seconds - last.seconds >= 2,
        "finished at the deadline, not at once"
    );
    assert_eq!(
        conversation.structured.unwrap().action_items,
        [
            "We should back up the database",
            "I'll check the restore too"
        ]
    );
}

#[tokio::test]
async fn bad_session_input_gets_a_status_naming_the_field() {
    let (_pusher, listen) =
        system(&["--max-segments", "3", "--min-conversation-timeout", "10s"]).await;
    let client = listen_client(&listen);

    let mut session = Session::open(&client).await;
    session
        .send(Msg::Segments(Segments {
            segments: vec![segment("hi", 0.0)],
        }))
        .await;
    let status = session.error().await;
    assert_eq!(
        (status.code(), status.message().starts_with("start")),
        (Code::InvalidArgument, true),
        "{status:?}"
    );

    for (start, field) in [
        (
            Start {
                uid: String::new(),
                ..Default::default()
            },
            "start.uid",
        ),
        (
            Start {
                uid: "u".into(),
                conversation_timeout_s: 5,
                ..Default::default()
            },
            "start.conversation_timeout_s",
        ),
        (
            Start {
                uid: "u".into(),
                conversation_timeout_s: 100_000,
                ..Default::default()
            },
            "start.conversation_timeout_s",
        ),
    ] {
        let mut session = Session::open(&client).await;
        session.send(Msg::Start(start)).await;
        let status = session.error().await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }

    let (mut twice, _) = Session::start(&client, "u", 0).await;
    twice
        .send(Msg::Start(Start {
            uid: "u".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(twice.error().await.code(), Code::FailedPrecondition);

    let (mut long, _) = Session::start(&client, "long", 0).await;
    assert_eq!(long.say(&["one", "two"]).await, 2);
    long.send(Msg::Segments(Segments {
        segments: vec![segment("three", 0.0), segment("four", 1.0)],
    }))
    .await;
    let status = long.error().await;
    assert_eq!(
        (status.code(), status.message().starts_with("segments")),
        (Code::InvalidArgument, true),
        "{status:?}"
    );
    // What was acknowledged is still there.
    let listed = client
        .clone()
        .list_conversations(listen::ListConversationsRequest {
            uid: "long".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.conversations[0].segment_count, 2);
}

#[tokio::test]
async fn sessions_beyond_the_limit_are_refused() {
    let (_pusher, listen) = system(&["--max-sessions", "1"]).await;
    let client = listen_client(&listen);
    let (first, _) = Session::start(&client, "one", 0).await;
    let status = client
        .clone()
        .session(ReceiverStream::new(mpsc::channel(1).1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    drop(first);
    // The slot frees when the first session ends.
    wait_for("a free session slot", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            let (tx, rx) = mpsc::channel(1);
            let opened = client
                .clone()
                .session(ReceiverStream::new(rx))
                .await
                .is_ok();
            drop(tx);
            opened.then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn sigterm_ends_open_sessions_with_unavailable_and_exits() {
    let (_pusher, mut listen) = system(&[]).await;
    let client = listen_client(&listen);
    let (mut session, _) = Session::start(&client, "bye", 30).await;
    let id = {
        session
            .send(Msg::Segments(Segments {
                segments: vec![segment("Unfinished thought.", 0.0)],
            }))
            .await;
        let Event::ConversationStarted(started) = session.next().await else {
            panic!()
        };
        started.conversation_id
    };
    let Event::SegmentsStored(_) = session.next().await else {
        panic!()
    };
    let sigterm = Instant::now();
    let terminate = tokio::task::spawn_blocking(move || {
        let status = listen.terminate(Duration::from_secs(15));
        (listen, status)
    });
    let status = session.error().await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("resume"));
    let (mut listen, exit) = terminate.await.unwrap();
    assert!(exit.success(), "{exit}");
    assert!(sigterm.elapsed() < Duration::from_secs(10));
    // The conversation waits, IN_PROGRESS, for the client to come back.
    listen.restart().await;
    assert_eq!(
        status_of(&mut listen_client(&listen), &id).await,
        ConversationStatus::InProgress
    );
}

#[tokio::test]
async fn sessions_per_uid_are_bounded() {
    let (_pusher, listen) = system(&["--max-sessions-per-uid", "2"]).await;
    let client = listen_client(&listen);
    let (_a, _) = Session::start(&client, "busy", 0).await;
    let (b, _) = Session::start(&client, "busy", 0).await;
    let mut third = Session::open(&client).await;
    third
        .send(Msg::Start(Start {
            uid: "busy".into(),
            ..Default::default()
        }))
        .await;
    let status = third.error().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().starts_with("start.uid"),
        "{}",
        status.message()
    );
    let (_other, _) = Session::start(&client, "someone-else", 0).await;
    drop(b);
    wait_for("a freed slot for the uid", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            let mut session = Session::open(&client).await;
            session
                .send(Msg::Start(Start {
                    uid: "busy".into(),
                    ..Default::default()
                }))
                .await;
            matches!(session.events.message().await, Ok(Some(_))).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn a_session_outlives_the_request_timeout() {
    let (_pusher, listen) = system(&[]).await;
    let client = listen_client(&listen);
    let (mut session, _) = Session::start(&client, "long-lived", 30).await;
    // Time passing is the point here: the stream stays open across 2.5 request timeouts.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(session.say(&["Still here."]).await, 1);
}

/// The README's grpcurl heredoc, and every ghz run: Start, segments, Finish, end of input. The
/// stream stays open for the outcome and then ends OK.
#[tokio::test]
async fn a_half_closed_session_still_receives_its_outcomes_then_ends_ok() {
    let (_pusher, listen) = system(&[]).await;
    let client = listen_client(&listen);
    let (mut session, _) = Session::start(&client, "half", 0).await;
    session.say(&["We need to book the venue."]).await;
    session.send(Msg::Finish(Finish {})).await;
    // A second conversation is left IN_PROGRESS: the half-close finishes it.
    session
        .send(Msg::Segments(Segments {
            segments: vec![segment("I will send the invites.", 0.0)],
        }))
        .await;
    session.half_close();
    let events = session.rest().await;
    let processed: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            Event::ConversationProcessed(p) => p.conversation.clone(),
            _ => None,
        })
        .collect();
    let started = events
        .iter()
        .filter(|event| matches!(event, Event::ProcessingStarted(_)))
        .count();
    assert_eq!((started, processed.len()), (2, 2), "{events:?}");
    for conversation in processed {
        assert_eq!(conversation.status, ConversationStatus::Completed as i32);
        assert_eq!(conversation.segment_count, 1);
    }
}

/// With pusher away, a half-closed session waits --session-linger for outcomes, then ends OK;
/// its conversation is finished and processed once pusher returns.
#[tokio::test]
async fn a_half_closed_session_ends_ok_after_the_linger_time() {
    let pusher_port = free_port();
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &with_defaults(FAST_SESSIONS, &["--session-linger", "1s"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    })
    .await;
    let client = listen_client(&listen);
    let (mut session, _) = Session::start(&client, "patient", 0).await;
    session.say(&["Remind me to renew the passport."]).await;
    let closed = Instant::now();
    session.half_close();
    let events = session.rest().await;
    assert!(
        closed.elapsed() >= Duration::from_millis(900),
        "ended after {:?}",
        closed.elapsed()
    );
    let [Event::ProcessingStarted(processing)] = events.as_slice() else {
        panic!("expected only processing_started, got {events:?}");
    };
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    wait_one(
        &client,
        &processing.conversation_id,
        ConversationStatus::Completed,
        Duration::from_secs(20),
    )
    .await;
}

/// A client that cancels the call is not half-closing: its conversation stays in progress
/// for a new session of the same uid to resume. (grpcio's cancel() and expired deadlines
/// are checked by tests/interop/test_session.py.)
#[tokio::test]
async fn a_cancelled_session_leaves_its_conversation_to_resume() {
    let (_pusher, listen) = system(&[]).await;
    let client = listen_client(&listen);

    // Cancelled: the client drops the call (tonic sends RST_STREAM CANCEL).
    let (mut first, started) = Session::start(&client, "cancels", 30).await;
    first.say(&["The first half."]).await;
    // The response side first: hyper resets the stream (CANCEL) once both are gone, before
    // the request side could end it normally.
    let Session { tx, events } = first;
    drop(events);
    drop(tx);
    // Listen ended the session as a cancel, not as a half-close.
    wait_for(
        "listen to end the cancelled session",
        Duration::from_secs(10),
        || {
            let ended = listen.log_lines_with(&[
                "session ended",
                &started.session_id,
                "cancelled or disconnected",
            ]);
            async move { (ended == 1).then_some(()) }
        },
    )
    .await;
    let (mut second, started) = Session::start(&client, "cancels", 30).await;
    assert!(
        !started.resumed_conversation_id.is_empty(),
        "a cancelled session's conversation is resumed"
    );
    assert_eq!(second.say(&["The second half."]).await, 2);
}

/// A conversation may grow only as large as the link can send to pusher in one message:
/// beyond that a Session's Segments (and a Submit) get INVALID_ARGUMENT, and what was stored
/// is still processed.
#[tokio::test]
async fn a_conversation_never_grows_past_what_can_be_sent() {
    let (_pusher, listen) = system(&["--max-message-bytes", "65536"]).await;
    let client = listen_client(&listen);
    let (mut session, _) = Session::start(&client, "talkative", 30).await;
    let long = "words ".repeat(2_000); // 12 000 bytes
    for _ in 0..5 {
        session.say(&[&long]).await;
    }
    session
        .send(Msg::Segments(Segments {
            segments: vec![segment(&long, 0.0)],
        }))
        .await;
    let refused = session.error().await;
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("segments: the conversation would be")
            && refused.message().contains("--max-message-bytes"),
        "{}",
        refused.message()
    );

    // What was stored is whole and still goes through.
    let (mut again, started) = Session::start(&client, "talkative", 30).await;
    assert!(!started.resumed_conversation_id.is_empty());
    again.send(Msg::Finish(Finish {})).await;
    let Event::ProcessingStarted(_) = again.next().await else {
        panic!("expected processing_started")
    };
    let Event::ConversationProcessed(processed) = again.next().await else {
        panic!("expected conversation_processed")
    };
    assert_eq!(processed.conversation.unwrap().segment_count, 5);

    // A Submit is held to the same bound.
    let mut big = talk("talkative", "big");
    // 62 100 bytes of segments: within the message limit, over what can be sent on.
    let longer = "words ".repeat(2_070);
    big.segments = (0..5).map(|i| segment(&longer, i as f64)).collect();
    let refused = client.clone().submit_conversation(big).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
}
