//! Several listen replicas on one PostgreSQL database, and a database that goes away: the
//! real binaries, a real PostgreSQL server (started by the test), SIGKILL.

use std::time::{Duration, Instant};
use tests::listen::{ConversationStatus, LinkState};
use tests::postgres::{TestPostgres, fresh_database};
use tests::*;
use tonic::Code;

/// Runs of one conversation in pusher's JSON log.
fn runs(pusher: &Service, id: &str) -> usize {
    pusher.log_lines_with(&["\"message\":\"processed\"", id])
}

/// A pusher with `extra` flags, logging JSON (for [`runs`]), and its port.
async fn json_pusher(extra: &[&str]) -> (Service, u16) {
    let port = free_port();
    let args: Vec<&str> = extra
        .iter()
        .copied()
        .chain(["--log-format", "json"])
        .collect();
    (
        start_pusher(PusherOptions::port(port).args(&args)).await,
        port,
    )
}

/// A listen replica `id` on the database at `url`, with a 3 s lease and a pending window of
/// `max_in_flight`.
async fn replica(url: &str, pusher_port: u16, id: &str, max_in_flight: &str) -> Service {
    start_listen(ListenOptions {
        pusher_port,
        extra: &[
            "--store",
            url,
            "--instance-id",
            id,
            "--lease-ttl",
            "3s",
            "--max-in-flight",
            max_in_flight,
        ],
    })
    .await
}

/// Two replicas share a database; one is SIGKILLed with work in flight. The survivor claims
/// the dead one's rows once their leases expire and completes every conversation; each is
/// processed to completion once, apart from what was in flight at the kill.
#[tokio::test]
async fn survivor_takes_over_a_killed_replicas_work_within_the_lease() {
    const IN_FLIGHT: usize = 16;
    let url = fresh_database().await;
    let (pusher, pusher_port) = json_pusher(&["--simulated-latency", "300ms"]).await;
    let mut a = replica(&url, pusher_port, "listen-a", "16").await;
    let b = replica(&url, pusher_port, "listen-b", "16").await;
    let (client_a, client_b) = (listen_client(&a), listen_client(&b));

    let mut ids = submit_many(&client_a, "replicas-a", 150).await;
    ids.extend(submit_many(&client_b, "replicas-b", 50).await);
    wait_for(
        "replica a to have work in flight",
        Duration::from_secs(10),
        || {
            let mut client = client_a.clone();
            async move { (link_status(&mut client).await.pending > 0).then_some(()) }
        },
    )
    .await;
    a.kill();
    let killed = Instant::now();

    // Everything is readable and completes through the survivor.
    let done = wait_all(
        &client_b,
        &ids,
        ConversationStatus::Completed,
        Duration::from_secs(60),
    )
    .await;
    eprintln!(
        "all 200 completed {:?} after the kill (lease 3 s)",
        killed.elapsed()
    );
    assert_eq!(done.len(), 200);
    let status = link_status(&mut client_b.clone()).await;
    assert_eq!((status.pending, status.queued), (0, 0));

    let processed: usize = ids.iter().map(|id| runs(&pusher, id)).sum();
    assert!(ids.iter().all(|id| runs(&pusher, id) >= 1));
    let duplicates = processed - ids.len();
    eprintln!("{duplicates} duplicate runs");
    assert!(
        duplicates <= IN_FLIGHT,
        "{duplicates} duplicates > {IN_FLIGHT} in flight at the kill"
    );
}

/// Two live replicas claim from one queue at the same time (SKIP LOCKED): no conversation is
/// sent twice or processed twice.
#[tokio::test]
async fn two_live_replicas_never_send_a_conversation_twice() {
    let url = fresh_database().await;
    let (pusher, pusher_port) = json_pusher(&["--simulated-latency", "50ms"]).await;
    let mut replicas = Vec::new();
    for id in ["listen-a", "listen-b"] {
        replicas.push(replica(&url, pusher_port, id, "8").await);
    }
    let client = listen_client(&replicas[0]);
    let ids = submit_many(&client, "shared", 200).await;
    let done = wait_all(
        &client,
        &ids,
        ConversationStatus::Completed,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        done.iter().all(|c| c.attempts == 1),
        "no conversation was sent twice"
    );
    assert!(
        ids.iter().all(|id| runs(&pusher, id) == 1),
        "each processed exactly once"
    );
    for replica in &replicas {
        let status = link_status(&mut listen_client(replica)).await;
        assert_eq!(
            (status.state, status.pending),
            (LinkState::Connected as i32, 0)
        );
    }
}

/// Work that takes longer than the lease stays with the replica doing it: the link renews
/// the leases of what its window holds, so the other replica never claims it. (Pusher
/// would join a duplicate to the running job, so the test counts sends, not runs.)
#[tokio::test]
async fn renewed_leases_keep_slow_work_with_its_replica() {
    // More than one renewal slice (256 rows per store write).
    const WORK: usize = 300;
    let url = fresh_database().await;
    let (pusher, pusher_port) =
        json_pusher(&["--simulated-latency", "5s", "--max-concurrency", "300"]).await;
    // A's window is full with the work, so only B could claim an expired lease.
    let a = replica(&url, pusher_port, "listen-a", "300").await;
    let client = listen_client(&a);
    let ids = submit_many(&client, "slow", WORK).await;
    wait_for("A to hold all the work", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move { (link_status(&mut client).await.pending == WORK as u32).then_some(()) }
    })
    .await;
    let b = replica(&url, pusher_port, "listen-b", "300").await;

    let done = wait_all(
        &client,
        &ids,
        ConversationStatus::Completed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done.len(), WORK);
    assert_eq!(
        b.metric("listen_link_sent_total").await,
        0.0,
        "B claimed work whose lease A kept renewing"
    );
    assert_eq!(a.metric("listen_link_sent_total").await, WORK as f64);
    assert!(ids.iter().all(|id| runs(&pusher, id) == 1));
}

/// The database stops: Submit fails with UNAVAILABLE (never "succeeds" with nothing
/// written), health stays answerable, and listen recovers by itself when the database is
/// back; work accepted before the outage completes.
#[tokio::test]
async fn stopped_database_gives_unavailable_then_recovers_by_itself() {
    let mut database = TestPostgres::start();
    database.create_database("listen").await;
    let url = database.url("listen");
    let pusher_port = free_port();
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &["--store", &url],
    })
    .await;
    let mut client = listen_client(&listen);
    let before = client
        .submit_conversation(talk("outage", "before"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    wait_one(
        &client,
        &before,
        ConversationStatus::Completed,
        Duration::from_secs(20),
    )
    .await;
    let queued = client
        .submit_conversation(talk("outage", "queued"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;

    database.stop();
    let started = Instant::now();
    let status = client
        .submit_conversation(talk("outage", "during"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "failed in {:?}",
        started.elapsed()
    );
    let status = client
        .get_conversation(listen::GetConversationRequest {
            conversation_id: before.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        listen.health("").await.is_some(),
        "listen itself still answers"
    );

    database.launch();
    let during = wait_for("submit to work again", Duration::from_secs(30), || {
        let mut client = client.clone();
        async move {
            client
                .submit_conversation(talk("outage", "during"))
                .await
                .ok()
                .map(|r| r.into_inner().conversation_id)
        }
    })
    .await;
    wait_all(
        &client,
        &[queued, during],
        ConversationStatus::Completed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        count_listed(&client, "outage", ConversationStatus::Completed).await,
        3,
        "nothing written twice or lost"
    );
}

/// One replica's wall clock is two hours ahead (libfaketime). Leases and session deadlines
/// are judged by the database's clock, so while the other replica works, the shifted one
/// takes none of its live leases and finishes no live conversation early; when the other is
/// killed, the shifted one takes its work over within the lease, as any replica would.
#[tokio::test]
async fn a_replica_whose_clock_is_hours_ahead_takes_no_live_lease_and_ends_no_live_session() {
    const WORK: usize = 60;
    let url = fresh_database().await;
    let (pusher, pusher_port) =
        json_pusher(&["--simulated-latency", "4s", "--max-concurrency", "200"]).await;
    let mut a = replica(&url, pusher_port, "listen-a", "100").await;
    let client_a = listen_client(&a);
    let ids = submit_many(&client_a, "steady", WORK).await;
    wait_for("A to hold all the work", Duration::from_secs(10), || {
        let mut client = client_a.clone();
        async move { (link_status(&mut client).await.pending == WORK as u32).then_some(()) }
    })
    .await;
    // A live conversation on A, 30 s from its deadline.
    let live = live_conversation_on(&client_a, "talker").await;

    let b = start_listen_with_env(
        ListenOptions {
            pusher_port,
            extra: &[
                "--store",
                &url,
                "--instance-id",
                "listen-b-ahead",
                "--lease-ttl",
                "3s",
                "--max-in-flight",
                "100",
                "--sweep-interval",
                "200ms",
            ],
        },
        tests::clock::shifted_clock("+2h"),
    )
    .await;
    let client_b = listen_client(&b);
    // The shift took: what B stamps is two hours ahead.
    let probe = client_b
        .clone()
        .submit_conversation(talk("probe", "clock"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let created = client_b
        .clone()
        .get_conversation(listen::GetConversationRequest {
            conversation_id: probe.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .created_at
        .unwrap()
        .seconds;
    let ahead = created - now_s();
    assert!(
        (7_000..7_400).contains(&ahead),
        "B's clock is {ahead} s ahead"
    );

    let done = wait_all(
        &client_a,
        &ids,
        ConversationStatus::Completed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done.len(), WORK);
    let b_sent = b.metric("listen_link_sent_total").await;
    assert!(
        b_sent <= 1.0,
        "B sent {b_sent}: at most its own probe, none of A's live work"
    );
    assert!(ids.iter().all(|id| runs(&pusher, id) == 1));
    assert_eq!(
        status_of(&mut client_a.clone(), &live).await,
        ConversationStatus::InProgress,
        "B's sweeper left A's live conversation alone"
    );

    // A dies with work in flight: B takes it over within the lease. (B is live too and may
    // claim some of the new work itself; what counts is that A holds some when it dies.)
    let more = submit_many(&client_a, "orphaned", 20).await;
    wait_for(
        "all the new work in flight, some of it on A",
        Duration::from_secs(10),
        || {
            let (mut a, mut b) = (client_a.clone(), client_b.clone());
            async move {
                let (on_a, on_b) = (
                    link_status(&mut a).await.pending,
                    link_status(&mut b).await.pending,
                );
                (on_a >= 1 && on_a + on_b == 20).then_some(())
            }
        },
    )
    .await;
    let b_sent = b.metric("listen_link_sent_total").await;
    a.kill();
    let killed = Instant::now();
    wait_for("B to take A's work over", Duration::from_secs(20), || {
        let b = &b;
        async move { (b.metric("listen_link_sent_total").await > b_sent).then_some(()) }
    })
    .await;
    let taken_after = killed.elapsed();
    eprintln!("B took A's work over {taken_after:?} after the kill (lease 3 s)");
    assert!(
        taken_after < Duration::from_secs(8),
        "taken over {taken_after:?} after the kill (lease 3 s)"
    );
    let done = wait_all(
        &client_b,
        &more,
        ConversationStatus::Completed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done.len(), more.len());
}

/// Opens a Session on `client` for `uid`, stores one segment (timeout 30 s) and leaves the
/// session open; returns the conversation's id.
async fn live_conversation_on(client: &ListenClient, uid: &str) -> String {
    use tests::listen::{
        Segments, SessionRequest, Start, session_event::Event, session_request::Msg,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for msg in [
        Msg::Start(Start {
            uid: uid.into(),
            language: "en".into(),
            conversation_timeout_s: 30,
        }),
        Msg::Segments(Segments {
            segments: vec![segment("Still talking.", 0.0)],
        }),
    ] {
        tx.send(SessionRequest { msg: Some(msg) }).await.unwrap();
    }
    let mut events = client
        .clone()
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    loop {
        let event = events.message().await.unwrap().unwrap().event.unwrap();
        if let Event::SegmentsStored(stored) = event {
            // The session stays open (neither cancelled nor half-closed) for the test's life.
            tokio::spawn(async move {
                let _keep = (tx, events);
                std::future::pending::<()>().await;
            });
            return stored.conversation_id;
        }
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
