//! The real link task ([`spawn`]) against the in-process fake pusher and a temporary SQLite
//! store: its logic, end to end, in milliseconds. What needs real processes (SIGKILL,
//! restarts, the real pusher) stays in the `tests` crate.

use super::*;
use crate::store::{
    Admission, Conversation, NewConversation, Priority, SqliteStore, Status as Stored, now_ms,
};
use ::tests::dns::TestDns;
use ::tests::fake_pusher::{Behaviour, FakePusher};
use ::tests::proxy::{Mode, Proxy};
use shared::proto::listen::v1 as api;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use tokio::net::{TcpListener, TcpStream};

/// Every wait gives up after this long (each normally takes milliseconds).
const PATIENCE: Duration = Duration::from_secs(10);

/// Fast everything: reconnects within 20 ms, resends within 50 ms.
fn config(target: Target, max_attempts: u32, ack_timeout: Duration) -> LinkConfig {
    let quick = |initial_ms: u64| Backoff {
        initial: Duration::from_millis(initial_ms),
        multiplier: 2.0,
        jitter: 0.0,
        max: Duration::from_millis(200),
    };
    LinkConfig {
        target,
        resolve_interval: Duration::from_millis(100),
        max_endpoints: 4,
        instance_id: "link-test".into(),
        max_in_flight: 8,
        attempts: Attempts {
            max_attempts,
            ack_timeout,
            retry_backoff: quick(50),
        },
        policy: Policy {
            backoff: quick(20),
            degrade_after: 100,
            probe_every: Duration::from_secs(1),
            stable_after: Duration::from_secs(10),
        },
        connect_timeout: Duration::from_secs(2),
        keepalive_interval: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(1),
        lease_ttl: Duration::from_secs(30),
        max_message_bytes: 4 * 1024 * 1024,
        transcript_buffer: 16,
        tls: None,
        compression: Default::default(),
    }
}

fn url_target(url: &str) -> Target {
    Target::parse(url).unwrap()
}

/// A running link over a fresh store.
struct Rig {
    store: Arc<SqliteStore>,
    link: LinkHandle,
    settled: Arc<Mutex<Vec<String>>>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn start(config: LinkConfig) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("listen.db")).unwrap());
        let settled = Arc::new(Mutex::new(Vec::new()));
        let hook: SettledHook = {
            let settled = Arc::clone(&settled);
            Arc::new(move |id: &str| settled.lock().unwrap().push(id.to_string()))
        };
        let (health, _) = shared::grpc::health::health_reporter();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (link, task) = spawn(
            config,
            Arc::clone(&store) as Arc<dyn ConversationStore>,
            health,
            hook,
            shutdown_rx,
        );
        Rig {
            store,
            link,
            settled,
            shutdown,
            task,
            _dir: dir,
        }
    }

    /// Stores a PROCESSING conversation and wakes the link, as Submit does.
    async fn submit(&self, text: &str) -> String {
        let new = conversation(text);
        let id = new.id.clone();
        self.store
            .submit(new, Admission::Always)
            .await
            .unwrap()
            .unwrap();
        self.link.wake();
        id
    }

    async fn get(&self, id: &str) -> Conversation {
        self.store.get(id).await.unwrap().unwrap()
    }

    async fn wait_status(&self, id: &str, status: Stored) -> Conversation {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let conversation = self.get(id).await;
            if conversation.status == status {
                return conversation;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never became {status:?}: {conversation:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the link's snapshot satisfies `check`.
    async fn wait_link(&self, what: &str, check: impl Fn(&LinkSnapshot) -> bool) -> LinkSnapshot {
        eventually(what, || {
            let snapshot = self.link.snapshot();
            check(&snapshot).then_some(snapshot)
        })
        .await
    }

    async fn stop(self) {
        self.shutdown.send_replace(true);
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the link stops")
            .unwrap();
    }
}

/// A new PROCESSING conversation of uid "u" saying `text`, queued (no lease).
fn conversation(text: &str) -> NewConversation {
    NewConversation {
        id: uuid::Uuid::now_v7().to_string(),
        uid: "u".into(),
        idempotency_key: None,
        language: "en".into(),
        segments: vec![api::Segment {
            text: text.into(),
            ..Default::default()
        }],
        status: Stored::Processing,
        priority: Priority::Interactive,
        now_ms: now_ms(),
        trace: Default::default(),
        lease: None,
    }
}

/// Polls `check` until it returns a value; panics after [`PATIENCE`].
async fn eventually<T>(what: &str, check: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn connected(snapshot: &LinkSnapshot) -> bool {
    snapshot.state == Wire::Connected
}

/// Claim at submit: once connected, the link sets its free window slots aside (no more than
/// the window), and a conversation written leased into one is sent from memory, with no
/// claim, and settled with the generation it was written with.
#[tokio::test]
async fn a_conversation_written_into_a_set_aside_slot_is_sent_without_a_claim() {
    let fake = FakePusher::start(Behaviour::Normal).await;
    let rig = Rig::start(config(url_target(&fake.url()), 3, Duration::from_secs(30)));
    rig.wait_link("connected", connected).await;
    let slot = eventually("a slot set aside", || rig.link.reserve()).await;
    let mut others: Vec<Slot> = std::iter::from_fn(|| rig.link.reserve()).collect();
    assert_eq!(others.len(), 7, "the window's 8 slots, no more");
    others.clear(); // dropped unfilled: set aside again

    let new = NewConversation {
        lease: Some(slot.lease()),
        ..conversation("hello")
    };
    let id = new.id.clone();
    let submitted = rig
        .store
        .submit(new, Admission::Always)
        .await
        .unwrap()
        .unwrap();
    // No wake: the row is leased to this link, so no claim could take it either.
    slot.fill(*submitted.claimed.expect("nothing queued: written claimed"));
    let done = rig.wait_status(&id, Stored::Completed).await;
    assert_eq!(done.attempts, 1);
    assert_eq!(fake.attempts(&id), [1]);
    let back: Vec<Slot> = eventually("all 8 slots set aside again", || {
        let slots: Vec<Slot> = std::iter::from_fn(|| rig.link.reserve()).collect();
        (slots.len() == 8).then_some(slots)
    })
    .await;
    drop(back);
    rig.stop().await;
}

/// A stale permanent failure (for attempt 1, arriving on the stream after a reconnect, when
/// attempt 2 is the one in flight) changes nothing and is counted.
#[tokio::test]
async fn a_stale_ack_changes_nothing_and_is_counted() {
    let fake = FakePusher::start(Behaviour::Slow {
        ack_after: None,
        progress_every: None,
    })
    .await;
    let proxy = Proxy::start(fake.addr).await;
    let rig = Rig::start(config(url_target(&proxy.url()), 3, Duration::from_secs(30)));
    let id = rig.submit("hello").await;
    eventually("attempt 1 to arrive", || {
        (fake.attempts(&id) == [1]).then_some(())
    })
    .await;

    fake.send_stale_ack_on_connect(&id, 1);
    fake.set(Behaviour::Normal);
    proxy.set(Mode::Reset);
    rig.wait_link("the reset to land", |s| {
        !s.endpoints.is_empty() && s.endpoints.iter().all(|e| e.consecutive_failures >= 1)
    })
    .await;
    proxy.set(Mode::Pass);

    let conversation = rig.wait_status(&id, Stored::Completed).await;
    assert_eq!(conversation.last_error, None);
    assert_eq!(fake.attempts(&id), [1, 2]);
    assert!(fake.streams() >= 2);
    let snapshot = rig.link.snapshot();
    assert!(snapshot.acks_ignored >= 1, "counted: {snapshot:?}");
    // The hook runs once the link hears the write landed, just after the row changes.
    eventually("the settled hook", || {
        (rig.settled.lock().unwrap().as_slice() == [id.clone()]).then_some(())
    })
    .await;
    rig.stop().await;
}

/// Work pending on a stream that breaks is re-sent on the next one with a fresh budget:
/// two attempts were spent on the first stream (the budget is 2; the stream breaks before
/// the second's deadline), yet the third goes out.
#[tokio::test]
async fn a_new_stream_replays_pending_work_with_a_fresh_budget() {
    let fake = FakePusher::start(Behaviour::Slow {
        ack_after: None,
        progress_every: None,
    })
    .await;
    let proxy = Proxy::start(fake.addr).await;
    let rig = Rig::start(config(url_target(&proxy.url()), 2, Duration::from_secs(1)));
    let id = rig.submit("hello").await;
    eventually("two attempts on the first stream", || {
        (fake.attempts(&id) == [1, 2]).then_some(())
    })
    .await;
    let streams = fake.streams();

    fake.set(Behaviour::Normal);
    proxy.set(Mode::Reset);
    rig.wait_link("the reset to land", |s| !connected(s)).await;
    proxy.set(Mode::Pass);

    let conversation = rig.wait_status(&id, Stored::Completed).await;
    assert_eq!(
        fake.attempts(&id),
        [1, 2, 3],
        "replayed once, on the new stream"
    );
    assert_eq!(conversation.attempts, 3);
    assert!(fake.streams() > streams);
    let snapshot = rig.wait_link("the link back up", connected).await;
    assert!(snapshot.reconnects >= 1, "{snapshot:?}");
    rig.stop().await;
}

/// An endpoint that leaves DNS retires: its work moves to the endpoint that joined, and the
/// retired lane is dropped once its window is empty.
#[tokio::test]
async fn a_retiring_lane_hands_its_work_to_another_endpoint() {
    let old = FakePusher::start(Behaviour::Slow {
        ack_after: None,
        progress_every: None,
    })
    .await;
    let new = FakePusher::start(Behaviour::Normal).await;
    let pair = Pair::start(&old, &new, Duration::from_secs(1)).await;
    let (rig, dns) = (&pair.rig, &pair.dns);
    let (new_ip, old_endpoint, new_endpoint) =
        (pair.second_ip, &pair.first_endpoint, &pair.second_endpoint);
    let id = pair.submit_to_first(&old).await;

    // The new endpoint is up and the old one retiring before attempt 1's ack deadline: the
    // old lane gives up the entry instead of re-sending it itself.
    dns.set(&[new_ip]);
    rig.wait_link("the old endpoint retiring, the new one connected", |s| {
        s.endpoints
            .iter()
            .any(|e| &e.address == old_endpoint && e.retiring)
            && s.endpoints
                .iter()
                .any(|e| &e.address == new_endpoint && e.state == Wire::Connected)
    })
    .await;
    let conversation = rig.wait_status(&id, Stored::Completed).await;
    assert_eq!(conversation.last_error, None);
    assert_eq!(old.attempts(&id), [1], "not re-sent where it was");
    assert_eq!(new.attempts(&id), [2], "moved, attempt numbers carrying on");
    let snapshot = rig
        .wait_link("the retired lane dropped", |s| s.endpoints.len() == 1)
        .await;
    assert_eq!(&snapshot.endpoints[0].address, new_endpoint);
    assert_ne!(&snapshot.endpoints[0].address, old_endpoint);
    assert!(!snapshot.endpoints[0].retiring);
    pair.rig.stop().await;
}

/// A pusher that drains keeps its in-flight work (its acks still come) and takes no new
/// work: that goes to the other endpoint.
#[tokio::test]
async fn a_draining_pusher_finishes_its_work_and_new_work_goes_elsewhere() {
    let draining = FakePusher::start(Behaviour::Slow {
        ack_after: Some(Duration::from_millis(500)),
        progress_every: None,
    })
    .await;
    let other = FakePusher::start(Behaviour::Normal).await;
    let pair = Pair::start(&draining, &other, Duration::from_secs(5)).await;
    let (rig, draining_endpoint) = (&pair.rig, &pair.first_endpoint);
    let in_flight = pair.submit_to_first(&draining).await;
    pair.dns.set(&[pair.first_ip, pair.second_ip]);
    rig.wait_link("both endpoints connected", |s| {
        s.endpoints.len() == 2 && s.endpoints.iter().all(|e| e.state == Wire::Connected)
    })
    .await;

    draining.drain();
    rig.wait_link("the first endpoint draining", |s| {
        s.endpoints
            .iter()
            .any(|e| &e.address == draining_endpoint && e.draining)
    })
    .await;
    let mut new_work = Vec::new();
    for _ in 0..4 {
        new_work.push(rig.submit("hello again").await);
    }
    for id in &new_work {
        rig.wait_status(id, Stored::Completed).await;
        assert_eq!(
            other.attempts(id),
            [1],
            "new work goes to the endpoint taking it"
        );
        assert!(draining.attempts(id).is_empty(), "none to the draining one");
    }
    let conversation = rig.wait_status(&in_flight, Stored::Completed).await;
    assert_eq!(conversation.last_error, None);
    assert_eq!(
        draining.attempts(&in_flight),
        [1],
        "answered where it was sent"
    );
    assert!(
        other.attempts(&in_flight).is_empty(),
        "not moved while in flight"
    );
    pair.rig.stop().await;
}

/// Two fake pushers as two endpoints of one DNS name (127.0.0.1 and 127.0.0.2 at one port),
/// with only the first in DNS at the start and the link connected to it.
struct Pair {
    rig: Rig,
    dns: TestDns,
    first_ip: Ipv4Addr,
    second_ip: Ipv4Addr,
    first_endpoint: String,
    second_endpoint: String,
}

impl Pair {
    async fn start(first: &FakePusher, second: &FakePusher, ack_timeout: Duration) -> Pair {
        let (port, first_ip, second_ip) = alias_pair(first.addr, second.addr).await;
        let dns = TestDns::start("pusher.test", &[first_ip]).await;
        let rig = Rig::start(config(
            Target::parse(&dns.url(port)).unwrap(),
            3,
            ack_timeout,
        ));
        rig.wait_link("the first endpoint", connected).await;
        let endpoint = |ip| SocketAddr::new(IpAddr::V4(ip), port).to_string();
        Pair {
            first_endpoint: endpoint(first_ip),
            second_endpoint: endpoint(second_ip),
            rig,
            dns,
            first_ip,
            second_ip,
        }
    }

    /// Submits a conversation and waits for its attempt 1 at the first endpoint.
    async fn submit_to_first(&self, first: &FakePusher) -> String {
        let id = self.rig.submit("hello").await;
        eventually("attempt 1 at the first endpoint", || {
            (first.attempts(&id) == [1]).then_some(())
        })
        .await;
        id
    }
}

/// Listeners on 127.0.0.1:PORT and 127.0.0.2:PORT (one port, as DNS answers give) that
/// forward to `first` and `second`: two endpoints of one name on loopback.
async fn alias_pair(first: SocketAddr, second: SocketAddr) -> (u16, Ipv4Addr, Ipv4Addr) {
    let (a, b) = (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2));
    for _ in 0..20 {
        let one = TcpListener::bind((a, 0)).await.unwrap();
        let port = one.local_addr().unwrap().port();
        let Ok(two) = TcpListener::bind((b, port)).await else {
            continue; // taken on the other address: try another port
        };
        tokio::spawn(forward(one, first));
        tokio::spawn(forward(two, second));
        return (port, a, b);
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

async fn forward(listener: TcpListener, to: SocketAddr) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// Nothing listening: the lane fails with a connect error, says so, and keeps trying.
#[tokio::test]
async fn an_unreachable_endpoint_fails_with_a_connect_error() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let rig = Rig::start(config(
        url_target(&format!("http://{addr}")),
        3,
        Duration::from_secs(1),
    ));
    let snapshot = rig
        .wait_link("two failed connects", |s| {
            !s.endpoints.is_empty() && s.endpoints.iter().all(|e| e.consecutive_failures >= 2)
        })
        .await;
    assert!(
        snapshot
            .last_error
            .starts_with(&format!("cannot connect to pusher at http://{addr}")),
        "{snapshot:?}"
    );
    assert_eq!(snapshot.endpoints[0].last_error, snapshot.last_error);
    assert_ne!(snapshot.state, Wire::Connected);
    rig.stop().await;
}
