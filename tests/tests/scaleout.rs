//! Scale-out: one listen keeps a stream to every pusher replica behind a DNS name.
//!
//! Three real pusher processes on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (same port), a real DNS
//! server on loopback UDP that resolves `pusher.test` to them ([`tests::dns::TestDns`]), and
//! listen started with `--pusher-url dns://DNS/pusher.test:PORT`, exactly as an operator
//! would point it at a headless Service.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tests::dns::TestDns;
use tests::listen::{ConversationStatus, LinkState};
use tests::*;

const NAME: &str = "pusher.test";
const SETTLE: Duration = Duration::from_secs(60);
const IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 0, 1),
    Ipv4Addr::new(127, 0, 0, 2),
    Ipv4Addr::new(127, 0, 0, 3),
];

async fn start_pushers(port: u16, latencies: [&str; 3]) -> Vec<Service> {
    let mut pushers = Vec::new();
    for (ip, latency) in IPS.iter().zip(latencies) {
        let addr = SocketAddr::new((*ip).into(), port);
        pushers.push(
            start_pusher(PusherOptions::at(addr).args(&[
                "--simulated-latency",
                latency,
                "--log-format",
                "json",
            ]))
            .await,
        );
    }
    pushers
}

async fn start_listen_on(dns: &TestDns, port: u16, max_in_flight: &str) -> Service {
    start_listen(ListenOptions {
        pusher_port: 0,
        extra: &[
            "--pusher-url",
            &dns.url(port),
            "--pusher-resolve-interval",
            "500ms",
            "--max-in-flight",
            max_in_flight,
        ],
    })
    .await
}

/// Conversations this pusher process finished (from its JSON log, so it works after a kill).
fn processed(pusher: &Service) -> usize {
    pusher.log_lines_with(&["\"message\":\"processed\""])
}

async fn pending_on(client: &ListenClient, address: &str) -> u32 {
    let mut client = client.clone();
    link_status(&mut client)
        .await
        .endpoints
        .iter()
        .find(|e| e.address == address)
        .map_or(0, |e| e.pending)
}

/// Work spreads over all three; SIGKILL one with work in flight and that work completes on
/// the other two while it stays dead; bring it back and it receives work again.
#[tokio::test]
async fn work_spreads_over_every_pusher_and_moves_off_a_killed_one() {
    let port = free_port();
    let mut pushers = start_pushers(port, ["100ms", "100ms", "100ms"]).await;
    let dns = TestDns::start(NAME, &IPS).await;
    let listen = start_listen_on(&dns, port, "8").await;
    let client = listen_client(&listen);
    wait_endpoints_connected(&client, &IPS, port).await;

    // 1. Spread.
    let ids = submit_many(&client, "spread", 300).await;
    wait_all(&client, &ids, ConversationStatus::Completed, SETTLE).await;
    let shares: Vec<usize> = pushers.iter().map(processed).collect();
    eprintln!("300 conversations over three pushers: {shares:?}");
    assert_eq!(shares.iter().sum::<usize>(), 300, "each processed once");
    assert!(
        shares.iter().all(|&n| n >= 60),
        "each pusher takes at least a fifth of the work (a third expected): {shares:?}"
    );
    let status = link_status(&mut client.clone()).await;
    assert_eq!(status.endpoints.len(), 3);
    assert_eq!(status.max_in_flight, 8, "per endpoint");

    // 2. SIGKILL the second pusher while it holds pending work.
    let before: Vec<usize> = pushers.iter().map(processed).collect();
    let second = format!("{}:{port}", IPS[1]);
    let submitter = {
        let client = client.clone();
        tokio::spawn(async move { submit_many(&client, "kill", 120).await })
    };
    wait_for(
        "work pending on the second",
        Duration::from_secs(10),
        || {
            let (client, second) = (client.clone(), second.clone());
            async move { (pending_on(&client, &second).await >= 4).then_some(()) }
        },
    )
    .await;
    pushers[1].kill();
    let ids = submitter.await.unwrap();
    wait_all(&client, &ids, ConversationStatus::Completed, SETTLE).await;
    let status = link_status(&mut client.clone()).await;
    let dead = status
        .endpoints
        .iter()
        .find(|e| e.address == second)
        .expect("the killed endpoint is still listed (it is still in DNS)");
    assert_ne!(
        dead.state,
        LinkState::Connected as i32,
        "everything completed while the second was down"
    );
    assert_eq!(dead.pending, 0, "its pending work moved to the others");
    assert_eq!(status.state, LinkState::Connected as i32, "the link is up");
    let after: Vec<usize> = pushers.iter().map(processed).collect();
    eprintln!("after the kill: {before:?} -> {after:?}");
    let on_second = after[1] - before[1];
    let on_others = (after[0] - before[0]) + (after[2] - before[2]);
    assert!(
        on_others + on_second >= 120 && on_others >= 120 - on_second,
        "what the second did not finish was finished by the others"
    );

    // 3. It comes back and receives work again.
    pushers[1].restart().await;
    wait_endpoints_connected(&client, &IPS, port).await;
    let ids = submit_many(&client, "back", 90).await;
    wait_all(&client, &ids, ConversationStatus::Completed, SETTLE).await;
    let started = pushers[1].metric("pusher_jobs_started_total").await;
    eprintln!("the restarted pusher took {started} of 90");
    assert!(
        started >= 18.0,
        "the restarted pusher takes at least a fifth of new work: {started}"
    );
}

/// A slow pusher among fast ones holds its pending slots longer, so the fewest-pending
/// assignment gives it less.
#[tokio::test]
async fn a_slow_pusher_receives_less_work() {
    let port = free_port();
    let pushers = start_pushers(port, ["20ms", "20ms", "600ms"]).await;
    let dns = TestDns::start(NAME, &IPS).await;
    let listen = start_listen_on(&dns, port, "4").await;
    let client = listen_client(&listen);
    wait_endpoints_connected(&client, &IPS, port).await;

    let ids = submit_many(&client, "slow", 150).await;
    wait_all(&client, &ids, ConversationStatus::Completed, SETTLE).await;
    let mut shares = Vec::new();
    for pusher in &pushers {
        shares.push(pusher.metric("pusher_jobs_started_total").await);
    }
    eprintln!("fast, fast, slow: {shares:?}");
    assert_eq!(shares.iter().sum::<f64>(), 150.0);
    assert!(
        shares[2] * 3.0 < shares[0].min(shares[1]),
        "the slow pusher gets less than a third of either fast one's share: {shares:?}"
    );
}

/// Endpoints follow DNS: a new address joins and takes work; one that left finishes what it
/// had in flight and is dropped.
#[tokio::test]
async fn endpoints_join_and_leave_with_dns() {
    let port = free_port();
    let pushers = start_pushers(port, ["3s", "20ms", "20ms"]).await;
    let dns = TestDns::start(NAME, &IPS[..1]).await;
    let listen = start_listen_on(&dns, port, "16").await;
    let client = listen_client(&listen);
    wait_endpoints_connected(&client, &IPS[..1], port).await;

    let first = submit_many(&client, "first", 10).await;
    let address = format!("{}:{port}", IPS[0]);
    wait_for("10 in flight on the first", Duration::from_secs(10), || {
        let (client, address) = (client.clone(), address.clone());
        async move { (pending_on(&client, &address).await == 10).then_some(()) }
    })
    .await;

    dns.set(&IPS[1..]);
    // The new endpoints connect while the one that left still holds its 10 (3 s each).
    let joined: Vec<String> = IPS[1..].iter().map(|ip| format!("{ip}:{port}")).collect();
    let status = wait_for(
        "the new endpoints connected",
        Duration::from_secs(20),
        || {
            let (mut client, joined) = (client.clone(), joined.clone());
            async move {
                let status = link_status(&mut client).await;
                let connected = |address: &String| {
                    status
                        .endpoints
                        .iter()
                        .any(|e| &e.address == address && e.state == LinkState::Connected as i32)
                };
                joined.iter().all(connected).then_some(status)
            }
        },
    )
    .await;
    let leaving = status
        .endpoints
        .iter()
        .find(|e| e.address == address)
        .expect("the endpoint that left is listed while it finishes its work");
    assert!(leaving.retiring, "{leaving:?}");
    assert_eq!(leaving.pending, 10);
    let sent_to_leaving = format!("listen_link_sent_total{{endpoint=\"{address}\"}}");
    assert_eq!(listen.metric(&sent_to_leaving).await, 10.0);
    let queries = dns.queries();
    assert!(queries >= 2, "listen looked the name up again: {queries}");

    // Submitted while the first is retiring: none of it goes there.
    let second = submit_many(&client, "second", 40).await;
    wait_all(&client, &first, ConversationStatus::Completed, SETTLE).await;
    wait_all(&client, &second, ConversationStatus::Completed, SETTLE).await;
    assert_eq!(
        processed(&pushers[0]),
        10,
        "the endpoint that left finished what it had in flight, and got nothing new"
    );
    assert_eq!(processed(&pushers[1]) + processed(&pushers[2]), 40);
    assert!(processed(&pushers[1]) > 0 && processed(&pushers[2]) > 0);
    let status = link_status(&mut client.clone()).await;
    assert!(
        status.endpoints.iter().all(|e| e.address != address),
        "the endpoint that left is dropped once its work is done: {:?}",
        status.endpoints
    );
    // Its metric series go with it (no zeroed series left behind for every departed pod).
    let scrape = listen.metrics().await;
    assert!(
        !scrape.contains(&format!("endpoint=\"{address}\"")),
        "series of a dropped endpoint are still scraped:\n{scrape}"
    );
    for joined in &joined {
        assert!(scrape.contains(&format!(
            "listen_link_endpoint_up{{endpoint=\"{joined}\"}} 1"
        )));
    }
}

/// Before any pusher is in DNS (no ready pod yet) work queues durably and the link keeps
/// looking; the first address that appears gets it all.
#[tokio::test]
async fn work_waits_for_the_first_pusher_to_appear_in_dns() {
    let port = free_port();
    let pusher = start_pusher(PusherOptions::at(SocketAddr::new(IPS[1].into(), port))).await;
    let dns = TestDns::start(NAME, &[]).await;
    let listen = start_listen(ListenOptions {
        pusher_port: 0,
        // Far beyond the test: only the lookups repeated while no endpoint is known count.
        extra: &[
            "--pusher-url",
            &dns.url(port),
            "--pusher-resolve-interval",
            "1h",
        ],
    })
    .await;
    let client = listen_client(&listen);
    let ids = submit_many(&client, "early", 20).await;
    let status = link_status(&mut client.clone()).await;
    assert_eq!(status.state, LinkState::Connecting as i32);
    assert!(status.endpoints.is_empty());
    wait_for(
        "the failed lookup reported",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            async move {
                let status = link_status(&mut client).await;
                (status.last_error.contains(NAME) && status.queued == 20).then_some(())
            }
        },
    )
    .await;

    dns.set(&IPS[1..2]);
    // Lookups repeat every 5 s while no endpoint is known.
    wait_all(&client, &ids, ConversationStatus::Completed, SETTLE).await;
    assert_eq!(pusher.metric("pusher_jobs_started_total").await, 20.0);
}
