//! Fault injection against the real listen-svc binary: the real pusher-svc (or, where the
//! real one cannot produce the fault, the controllable fake), a TCP fault proxy between
//! them, SIGKILL and restarts. Every property is read back through listen's public API.
//! Timeouts are shortened with flags; defaults are not touched.

use std::time::{Duration, Instant};
use tests::fake_pusher::{Behaviour, FakePusher, POISON};
use tests::listen::{ConversationStatus, LinkState};
use tests::proxy::{Mode, Proxy};
use tests::*;

/// Quick failure detection for fault tests: 1 s keepalive + 1 s timeout, 1 s handshake.
const FAST_DETECT: &[&str] = &[
    "--keepalive-interval",
    "1s",
    "--keepalive-timeout",
    "1s",
    "--connect-timeout",
    "1s",
];

async fn listen_to(url: &str, extra: &[&str]) -> Service {
    let mut args = vec!["--pusher-url".to_string(), url.to_string()];
    args.extend(with_defaults(FAST_DETECT, extra));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start_listen(ListenOptions {
        pusher_port: 0,
        extra: &args,
    })
    .await
}

async fn get(client: &ListenClient, id: &str) -> listen::Conversation {
    client
        .clone()
        .get_conversation(listen::GetConversationRequest {
            conversation_id: id.to_string(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner()
}

/// Runs of one conversation in pusher's JSON log.
fn runs(pusher: &Service, id: &str) -> usize {
    pusher.log_lines_with(&["\"message\":\"processed\"", id])
}

/// 1. Pusher is SIGKILLed at random points with 200 conversations in flight and restarted:
/// every one completes, none is stranded, and duplicates stay within what was in flight.
#[tokio::test]
async fn pusher_sigkill_at_random_points_loses_nothing() {
    const IN_FLIGHT: u32 = 32;
    const KILLS: usize = 3;
    let pusher_port = free_port();
    let mut pusher = start_pusher(PusherOptions::port(pusher_port).args(&[
        "--simulated-latency",
        "200ms",
        "--log-format",
        "json",
    ]))
    .await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[FAST_DETECT, &["--max-in-flight", "32"]].concat(),
    })
    .await;
    let client = listen_client(&listen);
    let ids = submit_many(&client, "kill", 200).await;

    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(100 + fastrand(600))).await;
        pusher.kill();
        tokio::time::sleep(Duration::from_millis(100 + fastrand(300))).await;
        pusher.restart().await;
    }
    let done = wait_all(
        &client,
        &ids,
        ConversationStatus::Completed,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(done.len(), 200);
    let status = link_status(&mut client.clone()).await;
    assert_eq!((status.pending, status.queued), (0, 0), "nothing stranded");

    let resends: u32 = done.iter().map(|c| c.attempts - 1).sum();
    let processed: usize = ids.iter().map(|id| runs(&pusher, id)).sum();
    let duplicates = processed - 200;
    eprintln!("kills {KILLS}: {resends} re-sends, {duplicates} duplicate runs in pusher");
    assert!(ids.iter().all(|id| runs(&pusher, id) >= 1));
    assert!(
        resends as usize <= KILLS * IN_FLIGHT as usize,
        "{resends} re-sends"
    );
    assert!(
        duplicates <= KILLS * IN_FLIGHT as usize,
        "{duplicates} duplicates"
    );
}

/// 2. The ack is lost (pusher -> listen blackholed after the request went through, long
/// enough for listen to give the connection up), then the network heals: the conversation
/// completes, and pusher ran the job once even though listen sent it again (the result cache
/// answered).
#[tokio::test]
async fn lost_ack_is_recovered_from_the_result_cache() {
    let pusher =
        start_pusher(PusherOptions::port(free_port()).args(&["--log-format", "json"])).await;
    let proxy = Proxy::start(pusher.addr).await;
    let listen = listen_to(&proxy.url(), &[]).await;
    let client = listen_client(&listen);
    wait_link(&client, LinkState::Connected, Duration::from_secs(10)).await;

    proxy.set(Mode::BLACKHOLE_DOWNSTREAM);
    let id = client
        .clone()
        .submit_conversation(talk("ack", "lost"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    wait_for("pusher to process it", Duration::from_secs(10), || async {
        (runs(&pusher, &id) == 1).then_some(())
    })
    .await;
    // Listen notices the silent stream and gives it up.
    wait_link(
        &client,
        LinkWait::Not(LinkState::Connected),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        get(&client, &id).await.status,
        ConversationStatus::Processing as i32
    );

    proxy.set(Mode::Pass);
    let conversation = wait_one(
        &client,
        &id,
        ConversationStatus::Completed,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        conversation.attempts >= 2,
        "re-sent after the loss: {}",
        conversation.attempts
    );
    assert_eq!(
        runs(&pusher, &id),
        1,
        "pusher ran the job once; the re-send was answered from its cache"
    );
}

/// 3. A half-open connection (both directions blackholed, nothing closed) is detected within
/// keepalive interval + timeout; listen reconnects when the network heals and replays.
#[tokio::test]
async fn half_open_connection_is_detected_and_replayed() {
    let pusher =
        start_pusher(PusherOptions::port(free_port()).args(&["--simulated-latency", "300ms"]))
            .await;
    let proxy = Proxy::start(pusher.addr).await;
    let listen = listen_to(&proxy.url(), &[]).await;
    let client = listen_client(&listen);
    wait_link(&client, LinkState::Connected, Duration::from_secs(10)).await;

    proxy.set(Mode::BLACKHOLE);
    let blackholed = Instant::now();
    let ids = submit_many(&client, "halfopen", 10).await;
    wait_link(
        &client,
        LinkWait::Not(LinkState::Connected),
        Duration::from_secs(15),
    )
    .await;
    let detected = blackholed.elapsed();
    eprintln!("half-open connection detected after {detected:?} (keepalive 1 s + 1 s)");
    // 1 s interval + 1 s timeout, plus one heartbeat tick and polling slack.
    assert!(
        detected <= Duration::from_secs(4),
        "detected after {detected:?}"
    );
    assert_eq!(
        link_status(&mut client.clone()).await.pending,
        10,
        "work kept pending, not dropped"
    );

    proxy.set(Mode::Pass);
    wait_all(
        &client,
        &ids,
        ConversationStatus::Completed,
        Duration::from_secs(30),
    )
    .await;
    let status = wait_link(&client, LinkState::Connected, Duration::from_secs(10)).await;
    assert!(status.reconnects >= 1);
}

/// 4. Pusher unreachable for a while (connections accepted but never answered, the worst
/// case for a caller that waits): Submit and health stay fast, pending never exceeds
/// max_in_flight, and everything queued completes once pusher is back.
#[tokio::test]
async fn pusher_down_never_slows_listen_and_queued_work_completes() {
    let pusher = start_pusher(PusherOptions::port(free_port())).await;
    let proxy = Proxy::start(pusher.addr).await;
    // Fast keepalive so the outage is noticed in ~2 s, but the default 5 s connect timeout:
    // reconnects then hang in the handshake, and a Submit that waited on pusher would take 5 s.
    let url = proxy.url();
    let listen = start_listen(ListenOptions {
        pusher_port: 0,
        extra: &[
            "--pusher-url",
            &url,
            "--max-in-flight",
            "8",
            "--keepalive-interval",
            "1s",
            "--keepalive-timeout",
            "1s",
        ],
    })
    .await;
    let client = listen_client(&listen);
    wait_link(&client, LinkState::Connected, Duration::from_secs(10)).await;

    let before = latencies(&client, &listen, "up", 100).await;
    proxy.set(Mode::BLACKHOLE);
    // Measure while listen knows pusher is gone, not just while bytes are in flight.
    wait_link(
        &client,
        LinkWait::Not(LinkState::Connected),
        Duration::from_secs(10),
    )
    .await;
    let during = latencies(&client, &listen, "down", 300).await;
    eprintln!(
        "p99 submit {:?} -> {:?}, health {:?} -> {:?} (pusher up -> down)",
        before.submit_p99, during.submit_p99, before.health_p99, during.health_p99
    );
    assert!(
        during.max_pending <= 8,
        "pending {} > max_in_flight",
        during.max_pending
    );
    // "No call waits on pusher": the slowest is far below the 5 s connect timeout.
    assert!(
        during.worst < Duration::from_secs(1),
        "a call took {:?} while pusher was down",
        during.worst
    );

    proxy.set(Mode::Pass);
    let status = wait_for("queue drained", Duration::from_secs(60), || {
        let mut client = client.clone();
        async move {
            let status = link_status(&mut client).await;
            (status.state == LinkState::Connected as i32
                && status.queued == 0
                && status.pending == 0)
                .then_some(status)
        }
    })
    .await;
    assert!(status.reconnects >= 1);
    assert_eq!(
        count_listed(&client, "down", ConversationStatus::Completed).await,
        300
    );
    assert_eq!(
        count_listed(&client, "up", ConversationStatus::Completed).await,
        100
    );
}

struct Latencies {
    submit_p99: Duration,
    health_p99: Duration,
    worst: Duration,
    max_pending: u32,
}

async fn latencies(client: &ListenClient, listen: &Service, uid: &str, n: usize) -> Latencies {
    let mut client = client.clone();
    let (mut submit, mut health, mut max_pending) = (Vec::new(), Vec::new(), 0);
    for i in 0..n {
        let started = Instant::now();
        client
            .submit_conversation(talk(uid, &format!("{uid}-{i}")))
            .await
            .expect("submit");
        submit.push(started.elapsed());
        let started = Instant::now();
        assert!(listen.health("").await.is_some());
        health.push(started.elapsed());
        if i % 10 == 0 {
            max_pending = max_pending.max(link_status(&mut client).await.pending);
        }
    }
    let worst = submit
        .iter()
        .chain(&health)
        .copied()
        .max()
        .unwrap_or_default();
    Latencies {
        submit_p99: p99(&mut submit),
        health_p99: p99(&mut health),
        worst,
        max_pending,
    }
}

fn p99(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// 5a. A job slower than the ack timeout that reports Progress is never re-sent.
#[tokio::test]
async fn slow_job_with_progress_is_not_resent() {
    let fake = FakePusher::start(Behaviour::Slow {
        ack_after: Some(Duration::from_secs(3)),
        progress_every: Some(Duration::from_millis(300)),
    })
    .await;
    let listen = listen_to(&fake.url(), &["--ack-timeout", "1s"]).await;
    let client = listen_client(&listen);
    let id = client
        .clone()
        .submit_conversation(talk("slow", "p"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let conversation = wait_one(
        &client,
        &id,
        ConversationStatus::Completed,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(conversation.attempts, 1);
    assert_eq!(
        fake.attempts(&id),
        vec![1],
        "a 3 s job under a 1 s ack timeout, kept alive by Progress"
    );
}

/// 5b. Without Progress, exactly max_attempts sends happen, then the conversation FAILS with
/// a reason; RetryConversation brings it to COMPLETED once pusher behaves.
#[tokio::test]
async fn silent_job_is_resent_max_attempts_times_then_failed_and_retry_completes_it() {
    let fake = FakePusher::start(Behaviour::Slow {
        ack_after: None,
        progress_every: None,
    })
    .await;
    let listen = listen_to(
        &fake.url(),
        &["--ack-timeout", "500ms", "--max-attempts", "3"],
    )
    .await;
    let client = listen_client(&listen);
    let id = client
        .clone()
        .submit_conversation(talk("silent", "s"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;

    let failed = wait_one(
        &client,
        &id,
        ConversationStatus::Failed,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(
        fake.attempts(&id),
        vec![1, 2, 3],
        "exactly max_attempts sends"
    );
    assert_eq!(failed.attempts, 3);
    assert!(
        failed.last_error.contains("no ack") && failed.last_error.contains("3 attempts"),
        "{}",
        failed.last_error
    );

    fake.set(Behaviour::Normal);
    let retried = client
        .clone()
        .retry_conversation(listen::RetryConversationRequest {
            conversation_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (retried.status, retried.last_error.as_str()),
        (ConversationStatus::Processing as i32, "")
    );
    let done = wait_one(
        &client,
        &id,
        ConversationStatus::Completed,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(
        done.structured.unwrap().title,
        format!("fake result for {id}")
    );
    assert_eq!(fake.attempts(&id), vec![1, 2, 3, 4]);
}

/// 6. A poison conversation (always fails, not retryable) is FAILED at once and does not
/// hold up the others.
#[tokio::test]
async fn poison_conversation_fails_at_once_without_blocking_others() {
    let fake = FakePusher::start(Behaviour::Normal).await;
    let listen = listen_to(&fake.url(), &["--max-in-flight", "4"]).await;
    let client = listen_client(&listen);
    let mut poison = talk("poison", "bad");
    poison.segments[0].text = format!("{POISON} pill");
    let bad = client
        .clone()
        .submit_conversation(poison)
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let good = submit_many(&client, "poison-neighbours", 40).await;

    let failed = wait_one(
        &client,
        &bad,
        ConversationStatus::Failed,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(failed.attempts, 1, "not retried");
    assert!(
        failed.last_error.contains("poison"),
        "{}",
        failed.last_error
    );
    assert_eq!(fake.attempts(&bad), vec![1]);
    wait_all(
        &client,
        &good,
        ConversationStatus::Completed,
        Duration::from_secs(20),
    )
    .await;
}

/// 7. A reset storm (connections reset every few hundred ms): reconnects follow the backoff
/// rather than a tight loop, and no conversation is lost.
#[tokio::test]
async fn reset_storm_backs_off_and_loses_nothing() {
    let pusher = start_pusher(PusherOptions::port(free_port())).await;
    let proxy = Proxy::start(pusher.addr).await;
    // Stay in Backoff (no Degraded) to see the curve: 100 ms, x1.6, at most 2 s.
    let listen = listen_to(
        &proxy.url(),
        &["--reconnect-max", "2s", "--degrade-after", "1000"],
    )
    .await;
    let client = listen_client(&listen);
    wait_link(&client, LinkState::Connected, Duration::from_secs(10)).await;

    let before = proxy.accepted();
    let storm = Instant::now();
    let mut ids = Vec::new();
    let mut round = 0;
    while storm.elapsed() < Duration::from_secs(5) {
        proxy.set(Mode::Reset);
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.set(Mode::Pass);
        ids.extend(
            submit_many(&client, "storm", 5)
                .await
                .into_iter()
                .map(|id| (round, id)),
        );
        round += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let attempts = proxy.accepted() - before;
    eprintln!("reset storm: {round} resets in 5 s, {attempts} connection attempts");
    // Backoff 0.1, 0.16, 0.26, 0.41, 0.66, 1.05, 1.68, 2, 2 ... s sums past 5 s within ~9
    // attempts; allow jitter and the successful reconnects. A tight loop would make hundreds.
    assert!(attempts <= 15, "{attempts} connection attempts in 5 s");

    let ids: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
    wait_all(
        &client,
        &ids,
        ConversationStatus::Completed,
        Duration::from_secs(30),
    )
    .await;
    assert!(link_status(&mut client.clone()).await.reconnects >= 1);
}

/// 8. Recovery herd: 5 000 queued while pusher is down, then it returns with a small job
/// limit. In-flight stays bounded, pusher's Busy pushback loses nothing, all complete.
#[tokio::test]
async fn recovery_herd_of_5000_drains_bounded_and_complete() {
    let pusher_port = free_port();
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &["--max-in-flight", "64"],
    })
    .await;
    let client = listen_client(&listen);
    submit_many(&client, "herd", 5000).await;
    let status = link_status(&mut client.clone()).await;
    assert_eq!((status.pending, status.queued), (0, 5000));

    let _pusher = start_pusher(PusherOptions::port(pusher_port).args(&[
        "--max-concurrency",
        "4",
        "--max-queued",
        "8",
        "--busy-retry-after",
        "50ms",
    ]))
    .await;
    let mut max_pending = 0;
    let drained = wait_drained(&client, Duration::from_secs(120), |status| {
        max_pending = max_pending.max(status.pending);
        assert!(
            status.pending <= 64,
            "pending {} > max_in_flight",
            status.pending
        );
    })
    .await;
    eprintln!("herd of 5000 drained in {drained:?}, max pending {max_pending}");
    assert_eq!(
        count_listed(&client, "herd", ConversationStatus::Completed).await,
        5000
    );
    assert_eq!(
        count_listed(&client, "herd", ConversationStatus::Failed).await,
        0
    );
}

/// 9. A stale ack (a permanent failure for an older attempt, arriving on the new stream after
/// a reconnect) does not touch the conversation.
#[tokio::test]
async fn stale_ack_after_reconnect_changes_nothing() {
    let fake = FakePusher::start(Behaviour::Slow {
        ack_after: None,
        progress_every: None,
    })
    .await;
    let proxy = Proxy::start(fake.addr).await;
    let listen = listen_to(&proxy.url(), &[]).await;
    let client = listen_client(&listen);
    let id = client
        .clone()
        .submit_conversation(talk("stale", "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    wait_for("attempt 1 to arrive", Duration::from_secs(10), || async {
        (fake.attempts(&id) == [1]).then_some(())
    })
    .await;

    fake.send_stale_ack_on_connect(&id, 1);
    fake.set(Behaviour::Normal);
    proxy.set(Mode::Reset);
    wait_link(
        &client,
        LinkWait::Not(LinkState::Connected),
        Duration::from_secs(10),
    )
    .await;
    proxy.set(Mode::Pass);

    let conversation = wait_one(
        &client,
        &id,
        ConversationStatus::Completed,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(conversation.last_error, "");
    assert_eq!(fake.attempts(&id), vec![1, 2]);
    assert!(fake.streams() >= 2);
    let status = link_status(&mut client.clone()).await;
    assert!(
        status.acks_ignored >= 1,
        "the stale ack is counted: {status:?}"
    );
}

/// 10. After enough failures the link is DEGRADED, probes on schedule (HALF_OPEN), and
/// returns to CONNECTED when pusher comes back.
#[tokio::test]
async fn degraded_probes_half_open_and_recovers() {
    let pusher = start_pusher(PusherOptions::port(free_port())).await;
    let proxy = Proxy::start(pusher.addr).await;
    proxy.set(Mode::BLACKHOLE); // connections open but the handshake never completes
    let listen = listen_to(
        &proxy.url(),
        &[
            "--degrade-after",
            "3",
            "--probe-interval",
            "1s",
            "--connect-timeout",
            "500ms",
        ],
    )
    .await;
    let client = listen_client(&listen);
    let id = client
        .clone()
        .submit_conversation(talk("degraded", "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;

    let degraded = wait_link(&client, LinkState::Degraded, Duration::from_secs(20)).await;
    assert!(degraded.consecutive_failures >= 3, "{degraded:?}");
    assert!(!degraded.last_error.is_empty());
    wait_link(&client, LinkState::HalfOpen, Duration::from_secs(5)).await;
    wait_link(&client, LinkState::Degraded, Duration::from_secs(5)).await;

    // Probes on schedule: one per 1 s cooldown + 0.5 s attempt.
    let (before, watch) = (proxy.accepted(), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let probes = proxy.accepted() - before;
    eprintln!("{probes} probes in {:?}", watch.elapsed());
    assert!((1..=3).contains(&probes), "{probes} probes in 3 s");

    proxy.set(Mode::Pass);
    wait_link(&client, LinkState::Connected, Duration::from_secs(5)).await;
    wait_one(
        &client,
        &id,
        ConversationStatus::Completed,
        Duration::from_secs(10),
    )
    .await;
}

fn fastrand(below: u64) -> u64 {
    (shared::backoff::random_unit() * below as f64) as u64
}

/// Listen is SIGKILLed with work pending and queued, and restarted on the same store under
/// the same instance id: it releases its old leases and finishes everything.
#[tokio::test]
async fn listen_sigkill_with_work_in_flight_resumes_on_restart() {
    let pusher_port = free_port();
    let _pusher =
        start_pusher(PusherOptions::port(pusher_port).args(&["--simulated-latency", "500ms"]))
            .await;
    let mut listen = start_listen(ListenOptions {
        pusher_port,
        extra: &["--max-in-flight", "16"],
    })
    .await;
    let client = listen_client(&listen);
    let ids = submit_many(&client, "crash", 200).await;
    wait_for("work in flight", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move { (link_status(&mut client).await.pending > 0).then_some(()) }
    })
    .await;
    listen.kill();
    listen.restart().await;
    let client = listen_client(&listen);
    // Well within the 30 s lease: the restart released the old leases rather than waiting.
    let done = wait_all(
        &client,
        &ids,
        ConversationStatus::Completed,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done.len(), 200);
}

/// A slow, jittery network that fragments every write: the link still delivers everything,
/// once each.
#[tokio::test]
async fn slow_fragmented_network_still_delivers_everything() {
    let pusher = start_pusher(PusherOptions::port(free_port())).await;
    let proxy = Proxy::start(pusher.addr).await;
    proxy.set(Mode::Latency {
        base: Duration::from_millis(20),
        jitter: Duration::from_millis(15),
    });
    let listen = listen_to(&proxy.url(), &[]).await;
    let client = listen_client(&listen);
    let slow = submit_many(&client, "slow-net", 30).await;
    wait_all(
        &client,
        &slow,
        ConversationStatus::Completed,
        Duration::from_secs(30),
    )
    .await;

    proxy.set(Mode::Slice(7));
    let sliced = submit_many(&client, "sliced-net", 30).await;
    let done = wait_all(
        &client,
        &sliced,
        ConversationStatus::Completed,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        done.iter()
            .chain(
                &wait_all(
                    &client,
                    &slow,
                    ConversationStatus::Completed,
                    Duration::from_secs(1)
                )
                .await
            )
            .all(|c| c.attempts == 1)
    );
    assert_eq!(
        link_status(&mut client.clone()).await.reconnects,
        0,
        "no fault, no reconnect"
    );
}

/// Refused connections (nothing listening) are retried with backoff; the link connects as
/// soon as connections are accepted again.
#[tokio::test]
async fn refused_connections_back_off_then_connect() {
    let pusher = start_pusher(PusherOptions::port(free_port())).await;
    let proxy = Proxy::start(pusher.addr).await;
    proxy.set(Mode::Refuse);
    let listen = listen_to(&proxy.url(), &["--degrade-after", "1000"]).await;
    let client = listen_client(&listen);
    let id = client
        .clone()
        .submit_conversation(talk("refused", "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let status = wait_for("backoff after refusals", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            let status = link_status(&mut client).await;
            (status.consecutive_failures >= 3).then_some(status)
        }
    })
    .await;
    assert!(
        status.last_error.contains("cannot connect"),
        "{}",
        status.last_error
    );
    assert_eq!(proxy.accepted(), 0, "refused, not accepted");
    proxy.set(Mode::Pass);
    wait_one(
        &client,
        &id,
        ConversationStatus::Completed,
        Duration::from_secs(10),
    )
    .await;
}
