//! Pusher's real work, end to end through the real binaries: webhooks (with real HTTP
//! receivers on loopback), discard, the LLM structurer (against a fake chat-completions
//! server), realtime forwarding, and graceful drain.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::time::{Duration, Instant};
use tests::http::{Receiver, Reply};
use tests::listen::{
    ConversationStatus, LinkState, Segments, SessionRequest, Start, session_event::Event,
    session_request::Msg,
};
use tests::proxy::Proxy;
use tests::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const SETTLE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn processed_conversations_are_announced_to_signed_webhooks_and_results_stored() {
    let hook = Receiver::start(vec![Reply::Status(200)]).await;
    let pusher_port = free_port();
    let _pusher = start_pusher(PusherOptions::port(pusher_port).args(&[
        "--webhook",
        &hook.url("/events"),
        "--webhook-secret",
        "whsec_test",
    ]))
    .await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let client = listen_client(&listen);
    let id = client
        .clone()
        .submit_conversation(talk("wh", "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let conversation = wait_one(&client, &id, ConversationStatus::Completed, SETTLE).await;

    assert_eq!(conversation.deliveries.len(), 1);
    let delivery = &conversation.deliveries[0];
    assert_eq!(
        (
            delivery.url.as_str(),
            delivery.delivered,
            delivery.attempts,
            delivery.status_code
        ),
        (hook.url("/events").as_str(), true, 1, 200)
    );

    let request = &hook.requests()[0];
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"whsec_test").unwrap();
    mac.update(format!("{}.", request.header("x-listen-timestamp")).as_bytes());
    mac.update(&request.body);
    assert_eq!(
        request.header("x-listen-signature"),
        format!("v1={}", hex::encode(mac.finalize().into_bytes()))
    );
    assert!(
        request
            .header("idempotency-key")
            .starts_with(&format!("{id}:"))
    );
    let body = request.json();
    assert_eq!(body["conversation"]["uid"], "wh");
    assert_eq!(
        body["structured"]["title"],
        conversation.structured.unwrap().title
    );
}

#[tokio::test]
async fn a_webhook_that_is_down_never_fails_the_conversation() {
    let hook = Receiver::start(vec![Reply::Status(503)]).await;
    let pusher_port = free_port();
    let _pusher = start_pusher(PusherOptions::port(pusher_port).args(&[
        "--webhook",
        &hook.url("/"),
        "--webhook-max-attempts",
        "2",
    ]))
    .await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let client = listen_client(&listen);
    let id = client
        .clone()
        .submit_conversation(talk("down", "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let conversation = wait_one(&client, &id, ConversationStatus::Completed, SETTLE).await;
    let delivery = &conversation.deliveries[0];
    assert_eq!(
        (delivery.delivered, delivery.attempts, delivery.status_code),
        (false, 2, 503)
    );
    assert!(delivery.error.contains("gave up"), "{}", delivery.error);
    assert_eq!(hook.requests().len(), 2);
}

#[tokio::test]
async fn noise_is_discarded_by_the_structurer_and_not_announced() {
    let hook = Receiver::start(vec![Reply::Status(200)]).await;
    let pusher_port = free_port();
    let _pusher =
        start_pusher(PusherOptions::port(pusher_port).args(&["--webhook", &hook.url("/")])).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let client = listen_client(&listen);
    let mut noise = talk("noise", "k");
    noise.segments = vec![segment("uh", 0.0), segment("hmm, okay", 1.0)];
    let id = client
        .clone()
        .submit_conversation(noise)
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let conversation = wait_one(&client, &id, ConversationStatus::Discarded, SETTLE).await;
    assert_eq!(conversation.attempts, 1, "it went through pusher");
    assert!(
        hook.requests().is_empty(),
        "a discarded conversation is not announced"
    );
}

#[tokio::test]
async fn the_llm_structurer_end_to_end() {
    let content = r#"{"title": "Quarterly budget", "overview": "Budget talk.", "action_items": ["Send the invoice summary"], "category": "finance", "discard": false}"#;
    let body = format!(
        r#"{{"choices": [{{"message": {{"role": "assistant", "content": {}}}}}]}}"#,
        serde_json::to_string(content).unwrap()
    );
    let llm = Receiver::start(vec![Reply::Status(429), Reply::Json(200, body)]).await;
    let pusher_port = free_port();
    let _pusher = start_pusher(
        PusherOptions::port(pusher_port)
            .args(&["--llm-url", &llm.url("/v1"), "--llm-model", "tiny"])
            .envs(&[("PUSHER_LLM_API_KEY", "sk-e2e")]),
    )
    .await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let client = listen_client(&listen);
    let id = client
        .clone()
        .submit_conversation(talk("llm", "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let conversation = wait_one(&client, &id, ConversationStatus::Completed, SETTLE).await;
    let structured = conversation.structured.unwrap();
    assert_eq!(
        (structured.title.as_str(), structured.category.as_str()),
        ("Quarterly budget", "finance")
    );
    let requests = llm.requests();
    assert_eq!(requests.len(), 2, "the 429 was retried");
    assert_eq!(requests[1].header("authorization"), "Bearer sk-e2e");
}

async fn start_session(
    client: &ListenClient,
    uid: &str,
) -> (
    mpsc::Sender<SessionRequest>,
    tonic::Streaming<tests::listen::SessionEvent>,
) {
    let (tx, rx) = mpsc::channel(16);
    let events = client
        .clone()
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(SessionRequest {
        msg: Some(Msg::Start(Start {
            uid: uid.into(),
            conversation_timeout_s: 30,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    (tx, events)
}

async fn say(
    tx: &mpsc::Sender<SessionRequest>,
    events: &mut tonic::Streaming<tests::listen::SessionEvent>,
    text: &str,
) {
    tx.send(SessionRequest {
        msg: Some(Msg::Segments(Segments {
            segments: vec![segment(text, 0.0)],
        })),
    })
    .await
    .unwrap();
    loop {
        let event = events.message().await.unwrap().unwrap().event.unwrap();
        if matches!(event, Event::SegmentsStored(_)) {
            return;
        }
    }
}

/// Live batches reach the transcript webhook in the order they were spoken: per session,
/// pusher posts the next batch only after the previous one was answered.
#[tokio::test]
async fn live_segments_are_forwarded_to_transcript_webhooks() {
    let realtime = Receiver::start(vec![
        Reply::Delay(Duration::from_millis(500), 200),
        Reply::Status(200),
    ])
    .await;
    let pusher_port = free_port();
    let _pusher = start_pusher(
        PusherOptions::port(pusher_port).args(&["--transcript-webhook", &realtime.url("/live")]),
    )
    .await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[],
    })
    .await;
    let client = listen_client(&listen);
    wait_link(&client, LinkState::Connected, Duration::from_secs(10)).await;
    let (tx, mut events) = start_session(&client, "live").await;
    say(&tx, &mut events, "first words").await;
    say(&tx, &mut events, "second words").await;
    let posts = wait_for("two transcript posts", Duration::from_secs(10), || async {
        let posts = realtime.requests();
        (posts.len() >= 2).then_some(posts)
    })
    .await;
    let texts: Vec<String> = posts
        .iter()
        .map(|p| {
            p.json()["segments"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(texts, ["first words", "second words"]);
    // The first is answered after 500 ms; sent in parallel, the second would arrive at once.
    assert!(
        posts[1].arrived.duration_since(posts[0].arrived) >= Duration::from_millis(500),
        "the second batch waits for the first's answer"
    );
    assert_eq!(posts[0].json()["type"], "transcript.segments");
    assert_eq!(posts[0].json()["uid"], "live");
}

#[tokio::test]
async fn realtime_buffer_drops_oldest_while_the_link_is_down_and_conversations_are_unaffected() {
    let pusher_port = free_port();
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &["--transcript-buffer", "2"],
    })
    .await;
    let client = listen_client(&listen);
    let (tx, mut events) = start_session(&client, "offline").await;
    for i in 0..5 {
        say(&tx, &mut events, &format!("I will say sentence {i} now.")).await;
    }
    let status = link_status(&mut client.clone()).await;
    assert_eq!(status.transcripts_dropped, 3, "{status:?}");
    tx.send(SessionRequest {
        msg: Some(Msg::Finish(Default::default())),
    })
    .await
    .unwrap();
    let Event::ProcessingStarted(processing) =
        events.message().await.unwrap().unwrap().event.unwrap()
    else {
        panic!()
    };
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let conversation = wait_one(
        &client,
        &processing.conversation_id,
        ConversationStatus::Completed,
        SETTLE,
    )
    .await;
    assert_eq!(
        conversation.segments.len(),
        5,
        "the durable path lost nothing"
    );
}

/// SIGTERM a pusher with 50 jobs in flight while a second one is ready behind the same
/// address: the first finishes its jobs and delivers their acks, listen moves to the second,
/// everything completes, and nothing is processed twice.
#[tokio::test]
async fn draining_pusher_finishes_its_jobs_and_listen_moves_on() {
    let mut first = start_pusher(PusherOptions::port(free_port()).args(&[
        "--simulated-latency",
        "1500ms",
        "--log-format",
        "json",
    ]))
    .await;
    let second =
        start_pusher(PusherOptions::port(free_port()).args(&["--log-format", "json"])).await;
    let proxy = Proxy::start_failover(vec![first.addr, second.addr]).await;
    let listen = start_listen(ListenOptions {
        pusher_port: 0,
        extra: &["--pusher-url", &proxy.url(), "--max-in-flight", "64"],
    })
    .await;
    let client = listen_client(&listen);
    let ids = submit_many(&client, "drain", 50).await;
    wait_for(
        "50 in flight on the first pusher",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            async move { (link_status(&mut client).await.pending == 50).then_some(()) }
        },
    )
    .await;
    let started = Instant::now();
    let terminated = tokio::task::spawn_blocking(move || {
        let status = first.terminate(Duration::from_secs(30));
        (first, status)
    });
    // Work submitted once listen knows the first is draining must not go there.
    wait_for("listen sees the drain", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            let status = link_status(&mut client).await;
            status.endpoints.iter().any(|e| e.draining).then_some(())
        }
    })
    .await;
    let more = submit_many(&client, "drain-after", 20).await;
    let (first, exit) = terminated.await.unwrap();
    assert!(exit.success(), "first pusher exit: {exit}");
    eprintln!("first pusher drained and exited in {:?}", started.elapsed());

    let all: Vec<String> = ids.iter().chain(&more).cloned().collect();
    wait_all(&client, &all, ConversationStatus::Completed, SETTLE).await;
    let runs = |id: &str| {
        first.log_lines_with(&["\"message\":\"processed\"", id])
            + second.log_lines_with(&["\"message\":\"processed\"", id])
    };
    assert!(
        all.iter().all(|id| runs(id) == 1),
        "every conversation processed exactly once"
    );
    let on_first = ids
        .iter()
        .filter(|id| first.log_lines_with(&["\"message\":\"processed\"", id]) == 1)
        .count();
    eprintln!("{on_first} of 50 in-flight jobs finished on the draining pusher");
    assert_eq!(
        on_first, 50,
        "in-flight jobs finished where they were, not re-run elsewhere"
    );
    assert!(
        more.iter()
            .all(|id| second.log_lines_with(&["\"message\":\"processed\"", id]) == 1),
        "new work went to the second"
    );
}
