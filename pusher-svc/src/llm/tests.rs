//! Against a fake chat-completions server over real HTTP on loopback.

use super::*;
use ::tests::http::{Receiver, Reply};
use shared::proto::pusher::v1::Segment;

fn chat(content: &str) -> Reply {
    let body = serde_json::json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]
    });
    Reply::Json(200, body.to_string())
}

const GOOD: &str = r#"{"title": "Budget review", "overview": "They reviewed the budget.", "action_items": ["Send the invoice"], "category": "finance", "discard": false}"#;

fn llm(receiver: &Receiver, max_attempts: u32) -> Llm {
    Llm::new(
        LlmConfig {
            url: receiver.url("/v1/"),
            model: "test-model".into(),
            api_key: Some("sk-test".into()),
            timeout: Duration::from_millis(500),
            max_attempts,
        },
        crate::http::client().unwrap(),
    )
}

fn conversation() -> ProcessConversation {
    ProcessConversation {
        conversation_id: "c1".into(),
        segments: vec![
            Segment {
                text: "Let's review the budget.".into(),
                speaker: "ANA".into(),
                ..Default::default()
            },
            Segment {
                text: "I will send the invoice.".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

#[tokio::test]
async fn good_output_is_parsed_and_the_request_is_well_formed() {
    let server = Receiver::start(vec![chat(GOOD)]).await;
    let structure = llm(&server, 3).structure(&conversation()).await.unwrap();
    assert_eq!(structure.structured.title, "Budget review");
    assert_eq!(structure.structured.action_items, ["Send the invoice"]);
    assert_eq!(
        (structure.structured.category.as_str(), structure.discard),
        ("finance", false)
    );

    let request = &server.requests()[0];
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(request.header("authorization"), "Bearer sk-test");
    let body = request.json();
    assert_eq!(body["model"], "test-model");
    assert_eq!(body["response_format"]["type"], "json_object");
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(
        body["messages"][1]["content"],
        "ANA: Let's review the budget.\nSPEAKER: I will send the invoice."
    );
}

#[tokio::test]
async fn a_discard_verdict_is_kept() {
    let server = Receiver::start(vec![chat(
        r#"{"title": "", "overview": "", "action_items": [], "category": "other", "discard": true}"#,
    )])
    .await;
    assert!(
        llm(&server, 1)
            .structure(&conversation())
            .await
            .unwrap()
            .discard
    );
}

#[tokio::test]
async fn malformed_output_is_retried_then_reported_retryable() {
    for bad in [
        "Sure! Here is the JSON you asked for.",
        r#"{"title": "T", "overview": "O", "action_items": [], "category": "work"}"#,
        r#"{"title": "T", "overview": "O", "action_items": "none", "category": "work", "discard": false}"#,
        r#"{"title": "T", "overview": "O", "action_items": [], "category": "work", "discard": false, "mood": "happy"}"#,
        r#"{"title": "T", "overview": "O", "action_items": [], "category": "gardening", "discard": false}"#,
    ] {
        let server = Receiver::start(vec![chat(bad)]).await;
        let error = llm(&server, 2)
            .structure(&conversation())
            .await
            .unwrap_err();
        assert!(error.retryable, "{bad}: {error:?}");
        assert!(error.reason.contains("LLM output"), "{}", error.reason);
        assert_eq!(server.requests().len(), 2, "retried up to max_attempts");
    }
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried() {
    let server = Receiver::start(vec![Reply::Status(429), Reply::Status(503), chat(GOOD)]).await;
    let structure = llm(&server, 3).structure(&conversation()).await.unwrap();
    assert_eq!(structure.structured.title, "Budget review");
    assert_eq!(server.requests().len(), 3);

    let down = Receiver::start(vec![Reply::Status(500)]).await;
    let error = llm(&down, 2).structure(&conversation()).await.unwrap_err();
    assert!(
        error.retryable && error.reason.contains("HTTP 500"),
        "{error:?}"
    );
}

#[tokio::test]
async fn configuration_errors_are_permanent_and_not_retried() {
    let server = Receiver::start(vec![Reply::Json(
        401,
        r#"{"error": "invalid api key"}"#.into(),
    )])
    .await;
    let error = llm(&server, 3)
        .structure(&conversation())
        .await
        .unwrap_err();
    assert!(!error.retryable, "{error:?}");
    assert!(
        error.reason.contains("HTTP 401") && error.reason.contains("invalid api key"),
        "{}",
        error.reason
    );
    assert_eq!(server.requests().len(), 1);

    let not_chat = Receiver::start(vec![Reply::Json(200, r#"{"hello": "world"}"#.into())]).await;
    assert!(
        !llm(&not_chat, 3)
            .structure(&conversation())
            .await
            .unwrap_err()
            .retryable
    );
}

#[tokio::test]
async fn a_slow_llm_times_out_as_retryable() {
    let server = Receiver::start(vec![Reply::Delay(Duration::from_secs(10), 200)]).await;
    let error = llm(&server, 1)
        .structure(&conversation())
        .await
        .unwrap_err();
    assert!(
        error.retryable && error.reason.contains("timed out"),
        "{error:?}"
    );
}
