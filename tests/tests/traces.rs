//! OpenTelemetry traces through the real binaries: a client's `traceparent` on Submit is
//! continued by listen (Submit, store commit, link sends), carried to pusher (job,
//! structuring, webhook attempts) and to the webhook's `traceparent` header, as one trace,
//! also when pusher is SIGKILLed mid-job; spans are exported over OTLP/gRPC (listen, to the
//! harness's collector) and OTLP/HTTP (pusher, to a recording HTTP server); with traces
//! switched off nothing is exported and nothing is propagated.

use std::time::Duration;
use tests::http::{Receiver, Reply};
use tests::listen::ConversationStatus;
use tests::otlp::{OtlpReceiver, ReceivedSpan, descends_from, spans_of_http};
use tests::*;

const SETTLE: Duration = Duration::from_secs(30);
/// The client's trace and span (the W3C specification's example ids).
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Submits a conversation for `uid` as a client in trace [`TRACE_ID`] would.
async fn submit_traced(listen: &Service, uid: &str) -> String {
    let mut request = tonic::Request::new(talk(uid, "traced"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CLIENT_SPAN}-01").parse().unwrap(),
    );
    request
        .metadata_mut()
        .insert("tracestate", "client=1".parse().unwrap());
    listen_client(listen)
        .submit_conversation(request)
        .await
        .unwrap()
        .into_inner()
        .conversation_id
}

fn named<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect()
}

fn one<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> &'a ReceivedSpan {
    let found = named(spans, service, name);
    assert_eq!(found.len(), 1, "one {service} {name} span in {spans:#?}");
    found[0]
}

#[tokio::test]
async fn a_traced_submit_is_one_trace_from_listen_through_pusher_to_the_webhook() {
    let otlp = OtlpReceiver::start().await;
    // pusher exports over OTLP/HTTP to a recording server; listen over gRPC to `otlp`.
    let collector = Receiver::start(vec![Reply::Status(200)]).await;
    let hook = Receiver::start(vec![Reply::Status(503), Reply::Status(200)]).await;
    let pusher_port = free_port();
    let collector_url = collector.url("");
    let _pusher = start_pusher(
        PusherOptions::port(pusher_port)
            .args(&["--webhook", &hook.url("/events")])
            .envs(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", collector_url.as_str()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ]),
    )
    .await;
    let listen = start_listen_with_env(
        ListenOptions {
            pusher_port,
            extra: &["--log-format", "json"],
        },
        otlp.env(),
    )
    .await;

    let id = submit_traced(&listen, "traced").await;
    wait_one(
        &listen_client(&listen),
        &id,
        ConversationStatus::Completed,
        SETTLE,
    )
    .await;
    let spans = wait_for("spans from listen and pusher", SETTLE, || async {
        let mut spans = otlp.spans();
        spans.extend(spans_of_http(&collector.requests()));
        // Each span is exported when it ends, in batches: wait for the last of each kind.
        let all_there = [
            ("listen-svc", "listen.v1.Listen/SubmitConversation"),
            ("listen-svc", "store.commit"),
            ("listen-svc", "link.send"),
            ("pusher-svc", "pusher.job"),
            ("pusher-svc", "structure"),
        ]
        .iter()
        .all(|(service, name)| !named(&spans, service, name).is_empty());
        let attempts = named(&spans, "pusher-svc", "webhook.attempt").len();
        (all_there && attempts == 2).then_some(spans)
    })
    .await;

    let submit = one(&spans, "listen-svc", "listen.v1.Listen/SubmitConversation");
    assert_eq!(
        (submit.trace_id.as_str(), submit.parent_span_id.as_str()),
        (TRACE_ID, CLIENT_SPAN),
        "the Submit span continues the client's trace"
    );
    assert_eq!(submit.attribute("conversation_id"), id);
    let commit = one(&spans, "listen-svc", "store.commit");
    assert!(descends_from(&spans, commit, submit));
    let send = one(&spans, "listen-svc", "link.send");
    assert_eq!(send.attribute("conversation_id"), id);
    assert!(descends_from(&spans, send, submit), "{send:#?}");

    let job = one(&spans, "pusher-svc", "pusher.job");
    assert!(
        descends_from(&spans, job, submit),
        "the pusher job descends from the Submit: {spans:#?}"
    );
    let structure = one(&spans, "pusher-svc", "structure");
    assert!(descends_from(&spans, structure, job));
    let attempts = named(&spans, "pusher-svc", "webhook.attempt");
    for attempt in &attempts {
        assert!(descends_from(&spans, attempt, job));
        assert_eq!(
            attempt.attribute("endpoint"),
            format!("127.0.0.1:{}", hook.addr.port())
        );
    }
    for span in &spans {
        assert_eq!(
            span.trace_id, TRACE_ID,
            "every span in one trace: {span:#?}"
        );
    }

    // Each webhook attempt carries its own span as the parent in `traceparent`.
    let sent: Vec<String> = hook
        .requests()
        .iter()
        .map(|r| r.header("traceparent").to_string())
        .collect();
    let mut expected: Vec<String> = attempts
        .iter()
        .map(|a| format!("00-{TRACE_ID}-{}-01", a.span_id))
        .collect();
    let mut sent_sorted = sent.clone();
    sent_sorted.sort();
    expected.sort();
    assert_eq!(sent_sorted, expected);
    assert!(
        hook.requests()
            .iter()
            .all(|r| r.header("tracestate") == "client=1")
    );

    // Logs in a span carry its ids: listen's JSON and pusher's text lines.
    let listen_log = listen.log_text();
    assert!(
        listen_log.lines().any(|l| l.starts_with("{\"trace_id\":\"")
            && l.contains(&format!("\"trace_id\":\"{TRACE_ID}\""))
            && l.contains("sending to pusher")),
        "{listen_log}"
    );
    let pusher_log = _pusher.log_text();
    assert!(
        pusher_log.contains(&format!("trace_id={TRACE_ID} span_id=")),
        "{pusher_log}"
    );
}

#[tokio::test]
async fn a_pusher_killed_mid_job_still_leaves_one_trace_with_the_replay_in_it() {
    let otlp = OtlpReceiver::start().await;
    let pusher_port = free_port();
    let env = otlp.env();
    let mut pusher = start_pusher(
        PusherOptions::port(pusher_port)
            .args(&["--simulated-latency", "2s"])
            .envs(&pairs(&env)),
    )
    .await;
    let listen = start_listen_with_env(
        ListenOptions {
            pusher_port,
            extra: &[],
        },
        env.clone(),
    )
    .await;

    let id = submit_traced(&listen, "restarted").await;
    wait_for("pusher to start the job", SETTLE, || async {
        (pusher.metric("pusher_jobs_started_total").await >= 1.0).then_some(())
    })
    .await;
    pusher.restart().await;
    wait_one(
        &listen_client(&listen),
        &id,
        ConversationStatus::Completed,
        SETTLE,
    )
    .await;

    let spans = wait_for("the job span of the restarted pusher", SETTLE, || async {
        let spans = otlp.spans();
        (!named(&spans, "pusher-svc", "pusher.job").is_empty()
            && !named(&spans, "listen-svc", "listen.v1.Listen/SubmitConversation").is_empty()
            && named(&spans, "listen-svc", "link.send").len() >= 2)
            .then_some(spans)
    })
    .await;
    let submit = one(&spans, "listen-svc", "listen.v1.Listen/SubmitConversation");
    let sends = named(&spans, "listen-svc", "link.send");
    let replay = sends
        .iter()
        .find(|s| s.events.iter().any(|(name, _)| name == "replay"))
        .unwrap_or_else(|| panic!("a link.send with a replay event: {sends:#?}"));
    let (_, event) = replay.events.iter().find(|(n, _)| n == "replay").unwrap();
    assert_eq!(event.get("attempt").map(String::as_str), Some("2"));
    assert_eq!(replay.attribute("attempt"), "2");
    let job = one(&spans, "pusher-svc", "pusher.job");
    assert_eq!(job.attribute("attempt"), "2", "the restarted pusher's job");
    assert!(descends_from(&spans, job, replay));
    assert!(descends_from(&spans, job, submit));
    for span in &spans {
        assert_eq!(
            span.trace_id, TRACE_ID,
            "every span in one trace: {span:#?}"
        );
    }
}

#[tokio::test]
async fn with_traces_off_nothing_is_exported_and_no_traceparent_is_sent() {
    let otlp = OtlpReceiver::start().await;
    let hook = Receiver::start(vec![Reply::Status(200)]).await;
    // Everything as when traces are on, but the exporter switched off: the rule says `none`
    // wins over an endpoint.
    let mut env = otlp.env();
    env.push(("OTEL_TRACES_EXPORTER".into(), "none".into()));
    let pusher_port = free_port();
    let mut pusher = start_pusher(
        PusherOptions::port(pusher_port)
            .args(&["--webhook", &hook.url("/events")])
            .envs(&pairs(&env)),
    )
    .await;
    let mut listen = start_listen_with_env(
        ListenOptions {
            pusher_port,
            extra: &[],
        },
        env,
    )
    .await;

    let id = submit_traced(&listen, "untraced").await;
    wait_one(
        &listen_client(&listen),
        &id,
        ConversationStatus::Completed,
        SETTLE,
    )
    .await;
    // A clean exit flushes whatever an exporter would still hold.
    assert!(listen.terminate(SETTLE).success());
    assert!(pusher.terminate(SETTLE).success());

    assert_eq!(otlp.spans().len(), 0, "{:#?}", otlp.spans());
    let requests = hook.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("traceparent"), "");
    assert!(!listen.log_text().contains("trace_id"));
}

#[tokio::test]
async fn a_traced_session_is_the_trace_of_its_conversations() {
    use tests::listen::{Finish, Segments, SessionRequest, Start, session_request::Msg};
    let otlp = OtlpReceiver::start().await;
    let pusher_port = free_port();
    let mut env = otlp.env();
    // Logs quiet: RUST_LOG chooses what is logged, not what is traced.
    env.push(("RUST_LOG".into(), "warn".into()));
    let _pusher = start_pusher(PusherOptions::port(pusher_port).envs(&pairs(&env))).await;
    let listen = start_listen_with_env(
        ListenOptions {
            pusher_port,
            extra: &[],
        },
        env.clone(),
    )
    .await;

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CLIENT_SPAN}-01").parse().unwrap(),
    );
    let mut events = listen_client(&listen)
        .session(request)
        .await
        .unwrap()
        .into_inner();
    for msg in [
        Msg::Start(Start {
            uid: "session".into(),
            language: "en".into(),
            conversation_timeout_s: 60,
        }),
        Msg::Segments(Segments {
            segments: vec![segment("We will ship the report on Friday.", 0.0)],
        }),
        Msg::Finish(Finish {}),
    ] {
        tx.send(SessionRequest { msg: Some(msg) }).await.unwrap();
    }
    // Half-closed: the session stays until its conversation's outcome is delivered, then ends.
    drop(tx);
    tokio::time::timeout(SETTLE, async {
        while events.message().await.unwrap().is_some() {}
    })
    .await
    .expect("the session ends within 30 s");

    let spans = wait_for("the session's and the job's spans", SETTLE, || async {
        let spans = otlp.spans();
        (!named(&spans, "listen-svc", "listen.v1.Listen/Session").is_empty()
            && !named(&spans, "listen-svc", "store.commit").is_empty()
            && !named(&spans, "pusher-svc", "pusher.job").is_empty())
        .then_some(spans)
    })
    .await;
    let session = one(&spans, "listen-svc", "listen.v1.Listen/Session");
    assert_eq!(
        (session.trace_id.as_str(), session.parent_span_id.as_str()),
        (TRACE_ID, CLIENT_SPAN)
    );
    let commit = one(&spans, "listen-svc", "store.commit");
    assert_eq!(commit.attribute("db.operation"), "start_conversation");
    assert!(descends_from(&spans, commit, session));
    let job = one(&spans, "pusher-svc", "pusher.job");
    assert!(descends_from(&spans, job, session), "{spans:#?}");
    assert_eq!(
        job.attribute("conversation_id"),
        commit.attribute("conversation_id")
    );
}
