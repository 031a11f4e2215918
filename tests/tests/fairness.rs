//! Fair order, priorities and admission against the real binaries, on SQLite and on
//! PostgreSQL: one uid's backlog does not delay another uid's conversations, live sessions
//! overtake bulk work, bulk work still progresses, the queue bounds refuse new work with
//! RetryInfo and store nothing, and the order holds across a restart and across replicas.
//!
//! Counts are smaller than a production backlog (debug builds on two cores): uid A's backlog
//! is `BACKLOG` conversations and pusher completes about 40 a second, so A's backlog takes
//! about 50 s to drain while each test finishes in seconds.

use std::time::{Duration, Instant};
use tests::listen::session_event::Event;
use tests::listen::session_request::Msg;
use tests::listen::{ConversationStatus, Finish, Priority};
use tests::*;
use tonic::Code;
use tonic_types::StatusExt;

/// Uid A's backlog.
const BACKLOG: usize = 2_000;
/// Uid B's conversations submitted after it.
const OTHERS: usize = 20;
/// Pusher's time per conversation; with [`IN_FLIGHT`] it completes about 40 a second.
const LATENCY: &str = "200ms";
const IN_FLIGHT: &str = "8";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The flags that put listen on this backend (a fresh PostgreSQL database each call).
    async fn store_args(self) -> Vec<String> {
        match self {
            Backend::Sqlite => Vec::new(),
            Backend::Postgres => vec!["--store".into(), tests::postgres::fresh_database().await],
        }
    }
}

/// A pusher that takes [`LATENCY`] per conversation, on `port`.
async fn slow_pusher(port: u16) -> Service {
    start_pusher(PusherOptions::port(port).args(&["--simulated-latency", LATENCY])).await
}

/// A listen on `store` (flags from [`Backend::store_args`]) with a pending window of
/// [`IN_FLIGHT`] and `extra` flags.
async fn listen_on(store: &[String], pusher_port: u16, extra: &[&str]) -> Service {
    let mut args: Vec<&str> = store.iter().map(String::as_str).collect();
    args.extend(extra);
    let args = with_defaults(&["--max-in-flight", IN_FLIGHT], &args);
    start_listen(ListenOptions {
        pusher_port,
        extra: &args.iter().map(String::as_str).collect::<Vec<_>>(),
    })
    .await
}

/// Waits until every one of `others` is COMPLETED, then checks that most of `backlog_uid`'s
/// `backlog` conversations are still waiting; returns how long the wait took.
async fn others_complete_before_the_backlog(
    client: &ListenClient,
    others: &[String],
    backlog_uid: &str,
    backlog: usize,
) -> Duration {
    let started = Instant::now();
    wait_all(
        client,
        others,
        ConversationStatus::Completed,
        Duration::from_secs(60),
    )
    .await;
    let waited = started.elapsed();
    let backlog_done = count_listed(client, backlog_uid, ConversationStatus::Completed).await;
    eprintln!(
        "all {} of the others completed in {waited:?}; {backlog_done} of {backlog_uid}'s {backlog} had",
        others.len()
    );
    assert!(
        backlog_done < backlog / 2,
        "{backlog_done} of {backlog} backlog conversations completed before the others: not fair"
    );
    waited
}

async fn a_backlog_does_not_delay_another_uid(backend: Backend) {
    let store = backend.store_args().await;
    let pusher_port = free_port();
    let _pusher = slow_pusher(pusher_port).await;
    let listen = listen_on(&store, pusher_port, &[]).await;
    let client = listen_client(&listen);

    submit_many(&client, "backlog", BACKLOG).await;
    let others = submit_many(&client, "other", OTHERS).await;
    others_complete_before_the_backlog(&client, &others, "backlog", BACKLOG).await;

    // Visibility: the backlog shows as queued interactive work with an age, and the waits
    // of claimed conversations are in the histogram.
    let status = link_status(&mut client.clone()).await;
    let interactive = &status.queues[0];
    assert_eq!(interactive.priority, Priority::Interactive as i32);
    assert!(interactive.queued > 0 && interactive.oldest_age_seconds > 0.0);
    assert_eq!(status.queued, interactive.queued + status.queues[1].queued);
    assert!(
        listen
            .metric("listen_queue_wait_seconds_count{priority=\"interactive\"}")
            .await
            >= OTHERS as f64
    );
    wait_for(
        "the queued gauge to show the backlog",
        Duration::from_secs(10),
        || async {
            (listen
                .metric("listen_queued_conversations{priority=\"interactive\"}")
                .await
                > 0.0)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn sqlite_a_backlog_does_not_delay_another_uid() {
    a_backlog_does_not_delay_another_uid(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_a_backlog_does_not_delay_another_uid() {
    a_backlog_does_not_delay_another_uid(Backend::Postgres).await;
}

/// Listen is killed with the backlog queued and restarted on the same store: the queue, its
/// tags and the virtual time are in the store, so the order stays fair.
async fn fair_order_holds_after_a_restart(backend: Backend) {
    let store = backend.store_args().await;
    let pusher_port = free_port();
    let _pusher = slow_pusher(pusher_port).await;
    let mut listen = listen_on(&store, pusher_port, &[]).await;
    let client = listen_client(&listen);
    submit_many(&client, "backlog", BACKLOG).await;
    listen.kill();
    listen.restart().await;
    let client = listen_client(&listen);
    let others = submit_many(&client, "other", OTHERS).await;
    others_complete_before_the_backlog(&client, &others, "backlog", BACKLOG).await;
}

#[tokio::test]
async fn sqlite_fair_order_holds_after_a_restart() {
    fair_order_holds_after_a_restart(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_fair_order_holds_after_a_restart() {
    fair_order_holds_after_a_restart(Backend::Postgres).await;
}

/// Two replicas claim from one PostgreSQL queue at once; the backlog arrives through one and
/// the other uid's work through the other. Their claims share the virtual time (under the
/// queue lock), so the order stays fair, nothing fails, and the counters end at zero.
#[tokio::test]
async fn two_replicas_keep_one_fair_order() {
    const BACKLOG: usize = 1_000;
    let url = tests::postgres::fresh_database().await;
    let pusher_port = free_port();
    let _pusher =
        start_pusher(PusherOptions::port(pusher_port).args(&["--simulated-latency", "100ms"]))
            .await;
    let mut replicas = Vec::new();
    for id in ["listen-a", "listen-b"] {
        let store = [
            "--store".to_string(),
            url.clone(),
            "--instance-id".into(),
            id.into(),
        ];
        replicas.push(listen_on(&store, pusher_port, &["--max-in-flight", "4"]).await);
    }
    let (a, b) = (listen_client(&replicas[0]), listen_client(&replicas[1]));
    let backlog = submit_many(&a, "backlog", BACKLOG).await;
    let others = submit_many(&b, "other", OTHERS).await;
    others_complete_before_the_backlog(&a, &others, "backlog", BACKLOG).await;
    wait_all(
        &a,
        &backlog,
        ConversationStatus::Completed,
        Duration::from_secs(120),
    )
    .await;
    for replica in &replicas {
        let status = link_status(&mut listen_client(replica)).await;
        assert_eq!(status.queued, 0);
        assert_eq!(
            replica.log_lines_with(&["claiming work from the store failed"]),
            0,
            "{}",
            replica.log_text()
        );
        assert!(
            replica.metric("listen_link_sent_total").await > 0.0,
            "both replicas claimed"
        );
    }
}

/// A bulk backlog, then a live session: its conversation is interactive and is claimed
/// before the bulk work.
async fn a_sessions_conversation_overtakes_a_bulk_backlog(backend: Backend) {
    let pusher_port = free_port();
    let _pusher = slow_pusher(pusher_port).await;
    let listen = listen_on(&backend.store_args().await, pusher_port, &[]).await;
    let client = listen_client(&listen);
    submit_many_as(&client, "importer", BACKLOG, Priority::Bulk).await;

    let started = Instant::now();
    let (mut session, _) = Session::start(&client, "person", 30).await;
    session
        .say(&["So, the launch checklist.", "I will book the venue."])
        .await;
    session.send(Msg::Finish(Finish {})).await;
    let processed = loop {
        match session.next().await {
            Event::ProcessingStarted(_) => continue,
            Event::ConversationProcessed(processed) => break processed,
            other => panic!("expected the conversation processed, got {other:?}"),
        }
    };
    let bulk_done = count_listed(&client, "importer", ConversationStatus::Completed).await;
    eprintln!(
        "the session's conversation was processed {:?} after its start; {bulk_done} of {BACKLOG} bulk had completed",
        started.elapsed()
    );
    assert!(processed.conversation.is_some());
    assert!(bulk_done < BACKLOG / 2, "{bulk_done} bulk completed first");
    let status = link_status(&mut client.clone()).await;
    assert!(status.queues[1].queued > 0 && status.queues[1].oldest_age_seconds > 0.0);
}

/// Interactive work keeps coming, yet bulk work progresses: every 8th claim takes bulk first.
async fn bulk_work_progresses_under_an_interactive_backlog(backend: Backend) {
    const BULK: usize = 10;
    let pusher_port = free_port();
    let _pusher = slow_pusher(pusher_port).await;
    let listen = listen_on(&backend.store_args().await, pusher_port, &[]).await;
    let client = listen_client(&listen);
    submit_many(&client, "backlog", BACKLOG).await;
    let bulk = submit_many_as(&client, "importer", BULK, Priority::Bulk).await;
    others_complete_before_the_backlog(&client, &bulk, "backlog", BACKLOG).await;
}

#[tokio::test]
async fn sqlite_a_sessions_conversation_overtakes_a_bulk_backlog() {
    a_sessions_conversation_overtakes_a_bulk_backlog(Backend::Sqlite).await
}

#[tokio::test]
async fn postgres_a_sessions_conversation_overtakes_a_bulk_backlog() {
    a_sessions_conversation_overtakes_a_bulk_backlog(Backend::Postgres).await
}

#[tokio::test]
async fn sqlite_bulk_work_progresses_under_an_interactive_backlog() {
    bulk_work_progresses_under_an_interactive_backlog(Backend::Sqlite).await
}

#[tokio::test]
async fn postgres_bulk_work_progresses_under_an_interactive_backlog() {
    bulk_work_progresses_under_an_interactive_backlog(Backend::Postgres).await
}

/// The queue bounds: Submit beyond them gets RESOURCE_EXHAUSTED naming the bound, with
/// RetryInfo, and nothing is stored, while an existing key is still answered; a session's
/// segments are stored but its Finish is refused and the conversation stays IN_PROGRESS for
/// a new session to resume; a conversation finished by silence is queued over the bound.
/// Once pusher drains the queue, new work is admitted again.
async fn queue_bounds_refuse_new_work_with_retry_info(backend: Backend) {
    let store = backend.store_args().await;
    // No pusher yet: nothing leaves the queue.
    let pusher_port = free_port();
    let listen = listen_on(
        &store,
        pusher_port,
        &[
            "--max-queued-per-uid",
            "3",
            "--max-queued",
            "5",
            "--queue-retry-after",
            "7s",
            "--min-conversation-timeout",
            "1s",
        ],
    )
    .await;
    let mut client = listen_client(&listen);
    let refused = |status: tonic::Status, bound: &str| {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains(bound), "{status:?}");
        assert_eq!(
            status.get_details_retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_secs(7)),
            "{status:?}"
        );
    };

    let mut a = Vec::new();
    for i in 0..3 {
        a.push(
            client
                .submit_conversation(talk("a", &format!("a-{i}")))
                .await
                .unwrap()
                .into_inner()
                .conversation_id,
        );
    }
    refused(
        client
            .submit_conversation(talk("a", "a-3"))
            .await
            .unwrap_err(),
        "(--max-queued-per-uid)",
    );
    assert_eq!(
        count_listed(&client, "a", ConversationStatus::Unspecified).await,
        3
    );
    let again = client
        .submit_conversation(talk("a", "a-0"))
        .await
        .expect("an existing key is answered over the bound")
        .into_inner();
    assert_eq!(again.conversation_id, a[0]);

    client.submit_conversation(talk("b", "b-0")).await.unwrap();
    client.submit_conversation(talk("b", "b-1")).await.unwrap();
    refused(
        client
            .submit_conversation(talk("c", "c-0"))
            .await
            .unwrap_err(),
        "(--max-queued)",
    );
    assert_eq!(
        count_listed(&client, "c", ConversationStatus::Unspecified).await,
        0
    );

    // A session: segments are stored, Finish is refused and the conversation stays.
    let (mut session, _) = Session::start(&client, "d", 3).await;
    session.say(&["Notes from the call."]).await;
    session.send(Msg::Finish(Finish {})).await;
    let status = session.error().await;
    assert!(
        status
            .message()
            .contains("stays IN_PROGRESS with its segments"),
        "a refused Finish says the segments are kept, not resent: {status:?}"
    );
    refused(status, "(--max-queued)");
    let kept = client
        .list_conversations(tests::listen::ListConversationsRequest {
            uid: "d".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .conversations;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].status, ConversationStatus::InProgress as i32);
    // A new session resumes it; at its deadline (3 s of silence) it is finished over the
    // bound, by the session or the sweeper: nobody is there to retry.
    let (_resumed, started) = Session::start(&client, "d", 3).await;
    assert_eq!(started.resumed_conversation_id, kept[0].id);
    wait_one(
        &client,
        &kept[0].id,
        ConversationStatus::Processing,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(link_status(&mut client).await.queued, 6);

    // Pusher comes; the queue drains, and new work is admitted again.
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    wait_one(
        &client,
        &kept[0].id,
        ConversationStatus::Completed,
        Duration::from_secs(30),
    )
    .await;
    wait_drained(&client, Duration::from_secs(30), |_| {}).await;
    client
        .submit_conversation(talk("c", "c-0"))
        .await
        .expect("room again");
    assert!(
        listen
            .metric("listen_rejected_requests_total{code=\"resource_exhausted\"}")
            .await
            >= 3.0
    );
}

#[tokio::test]
async fn sqlite_queue_bounds_refuse_new_work_with_retry_info() {
    queue_bounds_refuse_new_work_with_retry_info(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_queue_bounds_refuse_new_work_with_retry_info() {
    queue_bounds_refuse_new_work_with_retry_info(Backend::Postgres).await;
}
