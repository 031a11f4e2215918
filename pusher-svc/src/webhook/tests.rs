//! Against real HTTP receivers on loopback.

use super::*;
use ::tests::http::{Receiver, Reply};
use shared::proto::pusher::v1::Segment;
use std::time::Instant;

fn request(id: &str, text: &str) -> ProcessConversation {
    ProcessConversation {
        conversation_id: id.into(),
        uid: "u1".into(),
        attempt: 1,
        language: "en".into(),
        segments: vec![Segment {
            text: text.into(),
            speaker: "SPEAKER_0".into(),
            start: 0.0,
            end: 1.5,
            is_user: true,
        }],
        finished_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn structured() -> Structured {
    Structured {
        title: "Title".into(),
        overview: "Overview.".into(),
        action_items: vec!["I will".into()],
        category: "work".into(),
    }
}

fn webhooks(
    urls: Vec<String>,
    secret: Option<&str>,
    timeout: Duration,
    max_attempts: u32,
) -> Webhooks {
    Webhooks::new(
        WebhookConfig {
            urls,
            secret: secret.map(String::from),
            timeout,
            max_attempts,
            concurrency: 4,
        },
        crate::http::client().unwrap(),
    )
}

#[tokio::test]
async fn delivery_is_signed_and_carries_a_stable_idempotency_key() {
    let receiver = Receiver::start(vec![Reply::Status(204)]).await;
    let hooks = webhooks(
        vec![receiver.url("/hook")],
        Some("s3cret"),
        Duration::from_secs(2),
        3,
    );
    let deliveries = hooks.deliver(&request("c1", "hello"), &structured()).await;
    assert_eq!(deliveries.len(), 1);
    assert!(
        deliveries[0].delivered && deliveries[0].attempts == 1 && deliveries[0].status_code == 204,
        "{deliveries:?}"
    );
    assert_eq!(deliveries[0].error, "");

    let got = &receiver.requests()[0];
    assert_eq!((got.method.as_str(), got.path.as_str()), ("POST", "/hook"));
    // A receiver verifies the signature with nothing but the secret and what it received.
    let timestamp = got.header("x-listen-timestamp");
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"s3cret").unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&got.body);
    assert_eq!(
        got.header("x-listen-signature"),
        format!("v1={}", hex::encode(mac.finalize().into_bytes()))
    );
    let body = got.json();
    assert_eq!(body["type"], "conversation.processed");
    assert_eq!(body["conversation"]["id"], "c1");
    assert_eq!(body["conversation"]["finished_at"], "2023-11-14T22:13:20Z");
    assert_eq!(body["structured"]["action_items"][0], "I will");
    let key = got.header("idempotency-key").to_string();
    assert!(key.starts_with("c1:") && key.len() == 3 + 16, "{key}");
    assert_eq!(body["id"], key.as_str());

    // The same content from a new attempt or a new process gives the same key; new content,
    // a new key.
    let again = webhooks(
        vec![receiver.url("/hook")],
        Some("s3cret"),
        Duration::from_secs(2),
        3,
    );
    let mut resent = request("c1", "hello");
    resent.attempt = 7;
    again.deliver(&resent, &structured()).await;
    assert_eq!(receiver.requests()[1].header("idempotency-key"), key);
    assert_ne!(idempotency_key(&request("c1", "hello, edited")), key);
}

#[tokio::test]
async fn retries_stop_at_the_limit_and_never_fail_the_conversation() {
    let down = Receiver::start(vec![Reply::Status(503)]).await;
    let up = Receiver::start(vec![Reply::Status(200)]).await;
    let hooks = webhooks(
        vec![down.url("/a"), up.url("/b")],
        None,
        Duration::from_secs(2),
        3,
    );
    let deliveries = hooks.deliver(&request("c2", "hi"), &structured()).await;
    assert_eq!(down.requests().len(), 3, "exactly max_attempts");
    assert_eq!(
        (
            deliveries[0].delivered,
            deliveries[0].attempts,
            deliveries[0].status_code
        ),
        (false, 3, 503)
    );
    assert!(
        deliveries[0].error.contains("gave up after 3 attempts"),
        "{}",
        deliveries[0].error
    );
    assert!(
        deliveries[1].delivered,
        "one endpoint down does not affect another"
    );
    assert_eq!(
        up.requests()[0].header("x-listen-signature"),
        "",
        "no secret, no signature"
    );
}

#[tokio::test]
async fn a_transient_failure_is_retried_and_a_refusal_is_not() {
    let flaky = Receiver::start(vec![
        Reply::Status(500),
        Reply::Status(429),
        Reply::Status(200),
    ])
    .await;
    let refusing = Receiver::start(vec![Reply::Status(400)]).await;
    let hooks = webhooks(
        vec![flaky.url("/"), refusing.url("/")],
        None,
        Duration::from_secs(2),
        5,
    );
    let deliveries = hooks.deliver(&request("c3", "hi"), &structured()).await;
    assert_eq!((deliveries[0].delivered, deliveries[0].attempts), (true, 3));
    assert_eq!(
        (
            deliveries[1].delivered,
            deliveries[1].attempts,
            deliveries[1].status_code
        ),
        (false, 1, 400)
    );
}

#[tokio::test]
async fn a_slow_webhook_costs_no_more_than_its_timeouts() {
    let slow = Receiver::start(vec![Reply::Delay(Duration::from_secs(30), 200)]).await;
    let hooks = webhooks(vec![slow.url("/")], None, Duration::from_millis(300), 2);
    let started = Instant::now();
    let deliveries = hooks.deliver(&request("c4", "hi"), &structured()).await;
    let took = started.elapsed();
    // Two 300 ms attempts plus one backoff (200 ms ± 20 %).
    assert!(took < Duration::from_millis(1_500), "took {took:?}");
    assert!(!deliveries[0].delivered);
    assert!(
        deliveries[0].error.contains("timed out"),
        "{}",
        deliveries[0].error
    );
}

#[tokio::test]
async fn no_webhooks_means_no_deliveries() {
    let hooks = webhooks(Vec::new(), None, Duration::from_secs(1), 1);
    assert!(
        hooks
            .deliver(&request("c5", "hi"), &structured())
            .await
            .is_empty()
    );
}

#[test]
fn the_endpoint_label_is_host_and_port_without_path_query_or_credentials() {
    assert_eq!(
        endpoint_name("https://user:secret@hooks.example.com/a/b?token=x"),
        "hooks.example.com:443"
    );
    assert_eq!(
        endpoint_name("http://127.0.0.1:8080/events"),
        "127.0.0.1:8080"
    );
    assert_eq!(endpoint_name("not a url"), "invalid");
}
