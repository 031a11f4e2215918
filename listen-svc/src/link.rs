//! The link to pusher: one task owns every stream, every pending window and every state
//! machine.
//!
//! Everyone else talks to it through a [`LinkHandle`]: `wake()` after committing new work
//! (never waits), and a `watch` snapshot for status. The link keeps one *lane* per pusher
//! endpoint: one endpoint for an `http(s)://` URL, one per resolved address for a `dns:`
//! URL ([`target`]), re-resolved every `resolve_interval`. Each lane has its own stream,
//! [`state`] machine (backoff, degraded, half-open) and bounded [`pending`] window. The task:
//!
//! 1. opens a Connect stream (Hello -> Welcome) on each lane whose state machine says so,
//!    each in its own task, so a slow endpoint never holds up the others;
//! 2. on every established stream, replays that lane's window with a fresh retry budget;
//! 3. claims PROCESSING rows from the store, only as many as there are free slots on lanes
//!    that take work (so work beyond them stays queued in the store), and gives each to the
//!    lane with the fewest pending (ties: round-robin);
//! 4. moves work off lanes that cannot send it (stream down, draining, endpoint gone from
//!    DNS) onto lanes that can, when there are any; a conversation is in one window at a time;
//! 5. matches Ack / Progress / Busy to the lane's window, writes outcomes to the store with
//!    the fencing generation it claimed under (store writes run as their own tasks and report
//!    back, so a slow store never stalls a stream), and re-sends on ack deadlines;
//! 6. renews its leases, and releases them on shutdown so another instance can take over.
//!
//! Bounds: each window holds `max_in_flight`, and there are at most `max_endpoints` lanes.
//! Each stream's outbound buffer holds `2 × max_in_flight + 64` messages (a full buffer
//! re-queues the send shortly, no attempt spent). Internal events hold
//! `max_endpoints × (max_in_flight + 1) + 16` (each pending entry has at most one store write
//! outstanding, plus one claim, one lookup and one connect per lane), and their senders wait
//! rather than drop.

mod pending;
mod series;
mod state;
mod target;

pub(crate) use state::Policy;
pub use target::Target;

use crate::store::{Claimed, ConversationStore, StoreError, now_ms};
use crate::wire::completion_of;
use pending::{AckAction, Ignored, Pending};
use series::{EndpointSeries, LaneMetrics};
use shared::backoff::Backoff;
use shared::proto::listen::v1::{LINK_HEALTH_NAME, LinkState as Wire};
use shared::proto::pusher::v1::{
    Heartbeat, Hello, LinkRequest, LinkResponse, TranscriptBatch, Welcome, link_request,
    link_response, pusher_client::PusherClient,
};
use state::LinkState;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use target::Resolver;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt, StreamMap};
use tonic::transport::Endpoint;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{debug, info, warn};

/// Leases renewed per store write.
const RENEW_SLICE: usize = 256;
/// Most rows claimed from the store in one go.
const CLAIM_BATCH: usize = 256;
/// Delay before re-trying a send the stream buffer had no room for.
const REQUEUE_DELAY: Duration = Duration::from_millis(50);
/// Delay before re-sending an entry whose outcome could not be written.
const SETTLE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// A lane that fails triggers a fresh DNS lookup (its pod may have moved), at most this often.
const MIN_RERESOLVE: Duration = Duration::from_secs(5);

/// The retry budget per conversation and stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Attempts {
    pub max_attempts: u32,
    pub ack_timeout: Duration,
    /// Delay before re-sending after an expired deadline or a retryable failure.
    pub retry_backoff: Backoff,
}

#[derive(Clone, Debug)]
pub(crate) struct LinkConfig {
    pub target: Target,
    /// How often a `dns:` target is looked up again.
    pub resolve_interval: Duration,
    /// Most endpoints (lanes) kept; further addresses are ignored, with a warning.
    pub max_endpoints: usize,
    pub instance_id: String,
    /// Per lane.
    pub max_in_flight: usize,
    pub attempts: Attempts,
    pub policy: Policy,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// App-level heartbeat period; a stream is declared dead after
    /// `keepalive_interval + keepalive_timeout` without any message from pusher.
    pub heartbeat_interval: Duration,
    pub lease_ttl: Duration,
    pub max_message_bytes: usize,
    /// Live transcript batches buffered while the link is down (oldest dropped beyond).
    pub transcript_buffer: usize,
    /// TLS (usually mutual) towards pusher, for an https:// URL or a dns: URL with a CA.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// What the link looks like from outside: the whole, then each endpoint.
#[derive(Clone, Debug)]
pub(crate) struct LinkSnapshot {
    /// The most alive of the endpoints' states (CONNECTED if any is).
    pub state: Wire,
    pub pending: usize,
    pub reconnects: u64,
    /// The fewest among the endpoints (0 when any is connected).
    pub consecutive_failures: u32,
    pub last_error: String,
    pub acks_ignored: u64,
    pub transcripts_dropped: u64,
    pub endpoints: Vec<EndpointSnapshot>,
}

#[derive(Clone, Debug)]
pub(crate) struct EndpointSnapshot {
    pub address: String,
    pub state: Wire,
    pub pending: usize,
    pub reconnects: u64,
    pub consecutive_failures: u32,
    pub last_error: String,
    /// Its pusher said Draining: no new work goes there.
    pub draining: bool,
    /// Gone from DNS: its work moves to the others, then it is dropped.
    pub retiring: bool,
    pub pusher_id: String,
}

/// The rest of listen's way to the link task.
#[derive(Clone)]
pub(crate) struct LinkHandle {
    wake: Arc<Notify>,
    status: watch::Receiver<LinkSnapshot>,
    transcripts: Arc<Transcripts>,
}

impl LinkHandle {
    /// New work was committed: claim it. Never waits.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Forwards live segments to pusher, best-effort. Never waits.
    pub(crate) fn forward_transcript(&self, batch: TranscriptBatch) {
        self.transcripts.push(batch);
    }

    pub(crate) fn snapshot(&self) -> LinkSnapshot {
        let mut snapshot = self.status.borrow().clone();
        snapshot.transcripts_dropped = self.transcripts.dropped.load(Ordering::Relaxed);
        snapshot
    }
}

/// Live transcript batches on their way to pusher: at most `capacity`; when full (the link is
/// down or slow) the oldest is dropped and counted. Best-effort by design: the conversation
/// itself is stored and processed through the durable path whatever happens here.
pub(crate) struct Transcripts {
    capacity: usize,
    queue: std::sync::Mutex<VecDeque<TranscriptBatch>>,
    dropped: AtomicU64,
    ready: Notify,
}

impl Transcripts {
    fn new(capacity: usize) -> Self {
        Transcripts {
            capacity,
            queue: Default::default(),
            dropped: AtomicU64::new(0),
            ready: Notify::new(),
        }
    }

    fn push(&self, batch: TranscriptBatch) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= self.capacity {
            queue.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("listen_transcripts_dropped_total").increment(1);
        }
        queue.push_back(batch);
        drop(queue);
        self.ready.notify_one();
    }

    fn take(&self) -> VecDeque<TranscriptBatch> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Called with each conversation the link settled (COMPLETED or FAILED). Must not wait.
pub(crate) type SettledHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Starts the link task. It runs until `shutdown` turns true, then releases its leases.
pub(crate) fn spawn(
    config: LinkConfig,
    store: Arc<dyn ConversationStore>,
    health: HealthReporter,
    on_settled: SettledHook,
    shutdown: watch::Receiver<bool>,
) -> (LinkHandle, tokio::task::JoinHandle<()>) {
    let wake = Arc::new(Notify::new());
    let (status_tx, status_rx) = watch::channel(LinkSnapshot {
        state: Wire::Connecting,
        pending: 0,
        reconnects: 0,
        consecutive_failures: 0,
        last_error: String::new(),
        acks_ignored: 0,
        transcripts_dropped: 0,
        endpoints: Vec::new(),
    });
    let transcripts = Arc::new(Transcripts::new(config.transcript_buffer));
    let (events_tx, events_rx) =
        mpsc::channel(config.max_endpoints * (config.max_in_flight + 1) + 16);
    let resolver = Resolver::for_target(&config.target, config.connect_timeout).map(Arc::new);
    let mut link = Link {
        config: Arc::new(config),
        store,
        health,
        on_settled,
        status_tx,
        wake: Arc::clone(&wake),
        transcripts: Arc::clone(&transcripts),
        events_tx,
        events_rx,
        shutdown,
        resolver,
        resolving: false,
        last_resolve: None,
        lanes: Vec::new(),
        series: EndpointSeries::install(),
        inbound: StreamMap::new(),
        next_lane: 0,
        epoch: 0,
        heartbeat_seq: 0,
        last_error: String::new(),
        acks_ignored: 0,
        more_work: true,
        claiming: false,
        serving: None,
    };
    if let Target::Url { url, endpoint } = &link.config.target {
        let (url, endpoint) = (url.clone(), endpoint.clone());
        link.lanes
            .push(Lane::new(endpoint, url, &link.config, &link.series));
    }
    let task = tokio::spawn(link.run());
    (
        LinkHandle {
            wake,
            status: status_rx,
            transcripts,
        },
        task,
    )
}

enum Event {
    Claimed {
        limit: usize,
        result: Result<Vec<Claimed>, StoreError>,
    },
    Settled {
        id: String,
        outcome: &'static str,
        result: Result<bool, StoreError>,
    },
    Opened {
        endpoint: String,
        epoch: u64,
        result: Result<Box<Opened>, String>,
    },
    Resolved(Result<Vec<SocketAddr>, String>),
}

/// Why a stream ended.
enum StreamEnd {
    Failed(String),
    Drained,
}

/// A stream that passed the handshake.
struct Opened {
    tx: mpsc::Sender<LinkRequest>,
    inbound: tonic::Streaming<LinkResponse>,
    welcome: Welcome,
}

/// What a lane's stream yields; `End` once it is over.
enum Incoming {
    Message(LinkResponse),
    Error(tonic::Status),
    End,
}

type InboundStream = Pin<Box<dyn Stream<Item = Incoming> + Send>>;

/// An established stream (its inbound half lives in [`Link::inbound`] under `epoch`).
struct Conn {
    epoch: u64,
    tx: mpsc::Sender<LinkRequest>,
    last_heard: Instant,
    /// Its pusher said Draining.
    draining: bool,
    pusher_id: String,
}

/// One pusher endpoint: its stream, state machine and pending window.
struct Lane {
    /// `host:port` or `ip:port`; the `endpoint` metric label.
    endpoint: String,
    uri: String,
    state: LinkState,
    pending: Pending,
    conn: Option<Conn>,
    /// A connect task is out.
    opening: bool,
    /// Gone from DNS: takes no new work; dropped once its window is empty.
    retiring: bool,
    streams: u64,
    reconnects: u64,
    consecutive_failures: u32,
    last_error: String,
    metrics: LaneMetrics,
}

impl Lane {
    fn new(
        endpoint: String,
        uri: String,
        config: &LinkConfig,
        series: &Arc<EndpointSeries>,
    ) -> Self {
        Lane {
            metrics: series.add(&endpoint),
            endpoint,
            uri,
            state: LinkState::INITIAL,
            pending: Pending::new(config.max_in_flight, config.attempts),
            conn: None,
            opening: false,
            retiring: false,
            streams: 0,
            reconnects: 0,
            consecutive_failures: 0,
            last_error: String::new(),
        }
    }

    /// Claimed and moved work may be given to this lane.
    fn takes_work(&self) -> bool {
        matches!(&self.conn, Some(conn) if !conn.draining) && !self.retiring
    }

    /// Its due entries go on the wire.
    fn sends(&self) -> bool {
        matches!(&self.conn, Some(conn) if !conn.draining)
    }

    fn snapshot(&self) -> EndpointSnapshot {
        EndpointSnapshot {
            address: self.endpoint.clone(),
            state: self.state.to_wire(),
            pending: self.pending.len(),
            reconnects: self.reconnects,
            consecutive_failures: self.consecutive_failures,
            last_error: self.last_error.clone(),
            draining: self.conn.as_ref().is_some_and(|c| c.draining),
            retiring: self.retiring,
            pusher_id: self
                .conn
                .as_ref()
                .map(|c| c.pusher_id.clone())
                .unwrap_or_default(),
        }
    }
}

struct Link {
    config: Arc<LinkConfig>,
    store: Arc<dyn ConversationStore>,
    health: HealthReporter,
    on_settled: SettledHook,
    status_tx: watch::Sender<LinkSnapshot>,
    wake: Arc<Notify>,
    transcripts: Arc<Transcripts>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    shutdown: watch::Receiver<bool>,
    /// For a `dns:` target.
    resolver: Option<Arc<Resolver>>,
    /// A lookup is out.
    resolving: bool,
    last_resolve: Option<Instant>,
    lanes: Vec<Lane>,
    /// The lanes' metric series.
    series: Arc<EndpointSeries>,
    /// Every established stream's inbound half, by epoch.
    inbound: StreamMap<u64, InboundStream>,
    /// Where the round-robin among equally loaded lanes starts next.
    next_lane: usize,
    /// Streams opened so far, on all lanes (each stream's Hello carries its own).
    epoch: u64,
    heartbeat_seq: u64,
    last_error: String,
    acks_ignored: u64,
    /// The store may hold claimable rows.
    more_work: bool,
    /// A claim is outstanding (at most one at a time).
    claiming: bool,
    /// What the link health service last reported.
    serving: Option<bool>,
}

impl Link {
    async fn run(mut self) {
        // A restart under the same identity: the previous process's leases are ours to give up.
        match self.store.release(&self.config.instance_id).await {
            Ok(0) => {}
            Ok(n) => info!(
                released = n,
                "released leases held by a previous run of this instance"
            ),
            Err(error) => warn!(%error, "could not release old leases; they will expire"),
        }
        let mut maintenance = tokio::time::interval(self.config.lease_ttl / 3);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: a dns: target is looked up at once.
        let mut resolve = tokio::time::interval(self.config.resolve_interval);
        resolve.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let dns = self.resolver.is_some();
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            self.start_connects();
            self.flush();
            self.publish().await;
            let timer = self.next_timer();
            let forwarding = self.lanes.iter().any(Lane::takes_work);
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => break,
                Some((epoch, incoming)) = self.inbound.next(), if !self.inbound.is_empty() => {
                    self.on_incoming(epoch, incoming);
                }
                Some(event) = self.events_rx.recv() => self.on_event(event),
                _ = self.wake.notified() => self.more_work = true,
                // Wakes the loop; flush sends what is buffered.
                _ = self.transcripts.ready.notified(), if forwarding => {}
                _ = sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => self.on_timer(),
                _ = heartbeat.tick() => self.heartbeat(),
                _ = maintenance.tick() => {
                    self.renew_leases();
                    // Rows whose owner died become claimable when their lease expires.
                    self.more_work = true;
                }
                _ = resolve.tick(), if dns => self.resolve(),
            }
        }
        self.publish_state(false).await;
        // Dropping the streams ends them; pusher keeps their results for whoever asks next.
        self.inbound = StreamMap::new();
        self.lanes.clear();
        match tokio::time::timeout(
            Duration::from_secs(5),
            self.store.release(&self.config.instance_id),
        )
        .await
        {
            Ok(Ok(n)) => info!(released = n, "link stopped; leases released"),
            Ok(Err(error)) => {
                warn!(%error, "link stopped; could not release leases, they will expire")
            }
            Err(_) => warn!("link stopped; releasing leases timed out, they will expire"),
        }
    }

    /// Opens a stream, in its own task, on every lane whose state machine asks for one.
    fn start_connects(&mut self) {
        for lane in &mut self.lanes {
            if lane.conn.is_some() || lane.opening || lane.retiring || !lane.state.wants_connect() {
                continue;
            }
            lane.opening = true;
            self.epoch += 1;
            let (config, events) = (Arc::clone(&self.config), self.events_tx.clone());
            let (endpoint, uri, epoch) = (lane.endpoint.clone(), lane.uri.clone(), self.epoch);
            tokio::spawn(async move {
                let result = open_stream(&config, &uri, epoch).await.map(Box::new);
                let _ = events
                    .send(Event::Opened {
                        endpoint,
                        epoch,
                        result,
                    })
                    .await;
            });
        }
    }

    fn on_opened(&mut self, endpoint: String, epoch: u64, result: Result<Box<Opened>, String>) {
        let Some(i) = self
            .lanes
            .iter()
            .position(|l| l.endpoint == endpoint && l.opening)
        else {
            return; // The endpoint left meanwhile; dropping the stream closes it.
        };
        self.lanes[i].opening = false;
        let opened = match result {
            Ok(opened) if !self.lanes[i].retiring => opened,
            Ok(_) => return,
            Err(reason) => return self.lane_failed(i, reason),
        };
        let now = Instant::now();
        let lane = &mut self.lanes[i];
        lane.state = lane.state.connected(epoch, now);
        lane.consecutive_failures = 0;
        if lane.streams > 0 {
            lane.reconnects += 1;
            lane.metrics.reconnects.increment(1);
        }
        lane.streams += 1;
        let replayed = lane.pending.replay(now);
        let pusher_id = opened.welcome.pusher_id;
        info!(endpoint = %lane.endpoint, epoch, %pusher_id, replayed, "link connected");
        lane.conn = Some(Conn {
            epoch,
            tx: opened.tx,
            last_heard: now,
            draining: false,
            pusher_id,
        });
        let inbound = opened
            .inbound
            .map(|item| match item {
                Ok(message) => Incoming::Message(message),
                Err(status) => Incoming::Error(status),
            })
            .chain(tokio_stream::once(Incoming::End));
        self.inbound.insert(epoch, Box::pin(inbound));
        self.more_work = true;
    }

    fn on_incoming(&mut self, epoch: u64, incoming: Incoming) {
        let Some(i) = self
            .lanes
            .iter()
            .position(|l| l.conn.as_ref().is_some_and(|c| c.epoch == epoch))
        else {
            self.inbound.remove(&epoch);
            return;
        };
        let draining = self.lanes[i].conn.as_ref().is_some_and(|c| c.draining);
        let end = match incoming {
            Incoming::Message(response) => {
                if let Some(conn) = &mut self.lanes[i].conn {
                    conn.last_heard = Instant::now();
                }
                self.on_response(i, response);
                return;
            }
            Incoming::Error(_) | Incoming::End if draining => StreamEnd::Drained,
            Incoming::Error(status) => StreamEnd::Failed(format!("stream error: {status}")),
            Incoming::End => StreamEnd::Failed("pusher closed the stream".to_string()),
        };
        self.end_stream(i, end);
    }

    /// Closes lane `i`'s stream and moves its state machine on.
    fn end_stream(&mut self, i: usize, end: StreamEnd) {
        if let Some(conn) = self.lanes[i].conn.take() {
            self.inbound.remove(&conn.epoch);
        }
        match end {
            StreamEnd::Drained => {
                let lane = &mut self.lanes[i];
                info!(endpoint = %lane.endpoint, "draining pusher closed the stream; reconnecting to replay what is left");
                lane.state = lane.state.drained();
            }
            StreamEnd::Failed(reason) => self.lane_failed(i, reason),
        }
    }

    fn lane_failed(&mut self, i: usize, reason: String) {
        let now = Instant::now();
        let lane = &mut self.lanes[i];
        lane.consecutive_failures += 1;
        lane.metrics.failures.increment(1);
        lane.state = lane
            .state
            .failed(now, &self.config.policy, shared::backoff::random_unit());
        warn!(
            endpoint = %lane.endpoint,
            %reason,
            failures = lane.consecutive_failures,
            next = ?lane.state.to_wire(),
            retry_in_ms = lane.state.deadline().map(|d| d.saturating_duration_since(now).as_millis() as u64),
            "link to pusher failed"
        );
        lane.last_error = reason.clone();
        self.last_error = reason;
        // Its pod may have been replaced by one at another address.
        if self
            .last_resolve
            .is_none_or(|at| at.elapsed() >= MIN_RERESOLVE)
        {
            self.resolve();
        }
    }

    /// Looks the `dns:` target up again, in its own task.
    fn resolve(&mut self) {
        let Some(resolver) = &self.resolver else {
            return;
        };
        if self.resolving {
            return;
        }
        self.resolving = true;
        self.last_resolve = Some(Instant::now());
        let (resolver, events) = (Arc::clone(resolver), self.events_tx.clone());
        let timeout = self.config.connect_timeout;
        tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, resolver.resolve()).await {
                Ok(result) => result,
                Err(_) => Err(format!("DNS lookup took longer than {timeout:?}")),
            };
            let _ = events.send(Event::Resolved(result)).await;
        });
    }

    /// New addresses join as lanes; lanes whose address is gone retire. A failed or empty
    /// lookup changes nothing (the known endpoints are the best guess).
    fn on_resolved(&mut self, result: Result<Vec<SocketAddr>, String>) {
        self.resolving = false;
        let mut addrs = match result {
            Ok(addrs) => addrs,
            Err(error) => {
                warn!(%error, endpoints = self.lanes.len(), "looking up pusher failed; keeping the endpoints known");
                if self.lanes.is_empty() {
                    self.last_error = error;
                }
                return;
            }
        };
        if addrs.len() > self.config.max_endpoints {
            warn!(
                resolved = addrs.len(),
                max = self.config.max_endpoints,
                "pusher resolves to more addresses than --max-pusher-endpoints; using the first"
            );
            addrs.truncate(self.config.max_endpoints);
        }
        let wanted: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
        for lane in &mut self.lanes {
            let listed = wanted.contains(&lane.endpoint);
            if lane.retiring == listed {
                lane.retiring = !listed;
                if lane.retiring {
                    info!(endpoint = %lane.endpoint, pending = lane.pending.len(), "pusher endpoint left DNS; its work moves to the others");
                } else {
                    info!(endpoint = %lane.endpoint, "pusher endpoint is back in DNS");
                }
            }
        }
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        for endpoint in wanted {
            // Retiring lanes still count towards the bound until they are dropped.
            if self.lanes.iter().any(|l| l.endpoint == endpoint)
                || self.lanes.len() >= self.config.max_endpoints
            {
                continue;
            }
            info!(%endpoint, "pusher endpoint joined");
            let uri = format!("{scheme}://{endpoint}");
            self.lanes
                .push(Lane::new(endpoint, uri, &self.config, &self.series));
        }
    }

    /// Moves work, sends what is due, drops finished lanes and claims more if there is room.
    fn flush(&mut self) {
        let now = Instant::now();
        self.rebalance(now);
        self.forward_transcripts();
        for i in 0..self.lanes.len() {
            if let Err(reason) = self.send_due(i, now) {
                self.end_stream(i, StreamEnd::Failed(reason));
            }
        }
        self.drop_retired();
        let free = self.room();
        if self.more_work && !self.claiming && free > 0 {
            self.claiming = true;
            let limit = free.min(CLAIM_BATCH);
            let store = Arc::clone(&self.store);
            let events = self.events_tx.clone();
            let owner = self.config.instance_id.clone();
            let lease_ttl = self.config.lease_ttl.as_millis() as i64;
            tokio::spawn(async move {
                let now = now_ms();
                let result = store.claim(&owner, now, now + lease_ttl, limit).await;
                let _ = events.send(Event::Claimed { limit, result }).await;
            });
        }
    }

    /// Free pending slots on the lanes that take work: what a claim or a move may fill.
    fn room(&self) -> usize {
        self.lanes
            .iter()
            .filter(|l| l.takes_work())
            .map(|l| l.pending.free_slots())
            .sum()
    }

    /// The lane that takes the next conversation: among those taking work with a free slot,
    /// the one with the fewest pending; ties go round-robin.
    fn pick_lane(&mut self) -> Option<usize> {
        let n = self.lanes.len();
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = (self.next_lane + k) % n;
            let lane = &self.lanes[i];
            if !lane.takes_work() || lane.pending.free_slots() == 0 {
                continue;
            }
            if best.is_none_or(|b| lane.pending.len() < self.lanes[b].pending.len()) {
                best = Some(i);
            }
        }
        if let Some(i) = best {
            self.next_lane = i + 1;
        }
        best
    }

    /// Hands work that its lane cannot send (stream down, draining, endpoint retiring) to
    /// lanes that take work, as far as they have room. With one lane nothing moves: its work
    /// waits for the replay on its next stream.
    fn rebalance(&mut self, now: Instant) {
        if self.lanes.len() < 2 {
            return;
        }
        let mut room = self.room();
        for i in 0..self.lanes.len() {
            if room == 0 {
                return;
            }
            let lane = &mut self.lanes[i];
            if lane.takes_work() || lane.pending.is_empty() {
                continue;
            }
            // Sent on a stream that is gone: nobody will answer on it.
            let in_flight = lane.conn.is_none();
            let moved = lane.pending.take_movable(room, in_flight);
            if moved.is_empty() {
                continue;
            }
            info!(from = %self.lanes[i].endpoint, count = moved.len(), "moving pending conversations to other pusher endpoints");
            for (id, entry) in moved {
                let j = self
                    .pick_lane()
                    .expect("room was counted on lanes taking work");
                if let Err(entry) = self.lanes[j].pending.adopt(id.clone(), entry, now) {
                    // Cannot happen (pick_lane found a free slot); keep it where it was.
                    let _ = self.lanes[i].pending.adopt(id, entry, now);
                }
                room -= 1;
            }
        }
    }

    /// Sends what is due on lane `i`; an error means its stream is closed.
    fn send_due(&mut self, i: usize, now: Instant) -> Result<(), String> {
        let lane = &mut self.lanes[i];
        if !lane.sends() {
            return Ok(());
        }
        let Some(conn) = &lane.conn else {
            return Ok(());
        };
        for id in lane.pending.due(now) {
            let Some(request) = lane.pending.mark_sent(&id, conn.epoch, now) else {
                continue;
            };
            debug!(conversation_id = %id, attempt = request.attempt, endpoint = %lane.endpoint, "sending to pusher");
            lane.metrics.sent.increment(1);
            if request.attempt > 1 {
                lane.metrics.resent.increment(1);
            }
            match conn.tx.try_send(LinkRequest {
                msg: Some(link_request::Msg::Process(request)),
            }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    lane.pending.unsend(&id, now + REQUEUE_DELAY)
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    lane.pending.unsend(&id, now);
                    return Err("stream closed".to_string());
                }
            }
        }
        Ok(())
    }

    /// Live transcripts go to the first lane taking work (one lane, so they stay in order
    /// while it lives); with none they wait in their bounded buffer.
    fn forward_transcripts(&mut self) {
        let Some(i) = self.lanes.iter().position(Lane::takes_work) else {
            return;
        };
        let Some(conn) = &self.lanes[i].conn else {
            return;
        };
        for batch in self.transcripts.take() {
            let request = LinkRequest {
                msg: Some(link_request::Msg::Transcript(batch)),
            };
            match conn.tx.try_send(request) {
                Ok(()) => {}
                // Best-effort: a full stream buffer drops the batch.
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.transcripts.dropped.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("listen_transcripts_dropped_total").increment(1);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return self.end_stream(i, StreamEnd::Failed("stream closed".to_string()));
                }
            }
        }
    }

    /// Drops retiring lanes whose window is empty (not while a claim is out: its rows were
    /// counted against their free slots).
    fn drop_retired(&mut self) {
        if self.claiming {
            return;
        }
        let mut i = 0;
        while i < self.lanes.len() {
            let lane = &self.lanes[i];
            if !(lane.retiring && lane.pending.is_empty() && !lane.opening) {
                i += 1;
                continue;
            }
            let lane = self.lanes.remove(i);
            if let Some(conn) = lane.conn {
                self.inbound.remove(&conn.epoch);
            }
            // Dropping the lane takes its metric series off the scrape.
            info!(endpoint = %lane.endpoint, "pusher endpoint dropped");
        }
    }

    fn heartbeat(&mut self) {
        let silence_limit = self.config.keepalive_interval + self.config.keepalive_timeout;
        self.heartbeat_seq += 1;
        for i in 0..self.lanes.len() {
            let Some(conn) = &self.lanes[i].conn else {
                continue;
            };
            if conn.last_heard.elapsed() > silence_limit {
                let reason = format!("no message from pusher for {silence_limit:?}");
                self.end_stream(i, StreamEnd::Failed(reason));
                continue;
            }
            let ping = LinkRequest {
                msg: Some(link_request::Msg::Heartbeat(Heartbeat {
                    seq: self.heartbeat_seq,
                })),
            };
            if let Err(mpsc::error::TrySendError::Closed(_)) = conn.tx.try_send(ping) {
                self.end_stream(i, StreamEnd::Failed("stream closed".to_string()));
            }
        }
    }

    /// The earliest moment something is due: a lane's reconnect or probe, an ack deadline or
    /// send on a live stream, or another lookup when none found an endpoint yet.
    fn next_timer(&self) -> Option<Instant> {
        let lookup = self.lookup_retry();
        self.lanes
            .iter()
            .filter_map(|lane| match &lane.conn {
                Some(_) => lane.pending.next_timer(lane.sends()),
                None if lane.opening || lane.retiring => None,
                None => lane.state.deadline(),
            })
            .chain(lookup)
            .min()
    }

    /// With no endpoint known (pusher has no ready pod yet, or DNS failed), lookups repeat
    /// every [`MIN_RERESOLVE`] rather than every resolve interval.
    fn lookup_retry(&self) -> Option<Instant> {
        if self.resolver.is_none() || self.resolving || !self.lanes.is_empty() {
            return None;
        }
        self.last_resolve.map(|at| at + MIN_RERESOLVE)
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.lookup_retry().is_some_and(|at| at <= now) {
            self.resolve();
        }
        for i in 0..self.lanes.len() {
            let lane = &mut self.lanes[i];
            if lane.conn.is_none() {
                if !lane.opening {
                    lane.state = lane.state.timer_elapsed(now);
                }
                continue;
            }
            for (id, action) in lane.pending.expire(now) {
                if let AckAction::Fail {
                    generation,
                    reason,
                    attempts,
                } = action
                {
                    self.settle_failure(id, generation, reason, attempts);
                }
            }
        }
    }

    fn on_response(&mut self, i: usize, response: LinkResponse) {
        let now = Instant::now();
        let Some(msg) = response.msg else {
            return;
        };
        let lane = &mut self.lanes[i];
        match msg {
            link_response::Msg::Ack(ack) => {
                let (id, attempt) = (ack.conversation_id.clone(), ack.attempt);
                if let Some(sent_at) = lane.pending.sent_at(&id, attempt) {
                    lane.metrics
                        .ack_latency
                        .record(now.duration_since(sent_at).as_secs_f64());
                }
                let action = lane.pending.ack(ack, now);
                let result = match &action {
                    AckAction::Complete { .. } => 0,
                    AckAction::Fail { .. } => 1,
                    AckAction::Resend { .. } => 2,
                    AckAction::Ignore(_) => 3,
                };
                lane.metrics.acks[result].increment(1);
                match action {
                    AckAction::Complete {
                        generation,
                        processed,
                        attempts,
                    } => {
                        let store = Arc::clone(&self.store);
                        let completion = completion_of(processed);
                        let outcome = if completion.discarded {
                            "discarded"
                        } else {
                            "completed"
                        };
                        self.settle(id.clone(), outcome, async move {
                            store
                                .complete(&id, generation, completion, attempts, now_ms())
                                .await
                        });
                    }
                    AckAction::Fail {
                        generation,
                        reason,
                        attempts,
                    } => self.settle_failure(id, generation, reason, attempts),
                    AckAction::Resend { at } => {
                        debug!(conversation_id = %id, attempt, retry_in_ms = at.saturating_duration_since(now).as_millis() as u64, "retryable failure; re-sending later");
                    }
                    AckAction::Ignore(why) => {
                        self.acks_ignored += 1;
                        let why = match why {
                            Ignored::Unknown => "not pending (late or duplicate)",
                            Ignored::Duplicate => "duplicate",
                            Ignored::Stale => "stale attempt",
                        };
                        debug!(conversation_id = %id, attempt, why, "ack ignored");
                    }
                }
            }
            link_response::Msg::Progress(progress) => {
                lane.pending
                    .progress(&progress.conversation_id, progress.attempt, now);
            }
            link_response::Msg::Busy(busy) => {
                lane.metrics.busy.increment(1);
                let retry_after =
                    Duration::from_millis(u64::from(busy.retry_after_ms).clamp(10, 60_000));
                lane.pending
                    .busy(&busy.conversation_id, busy.attempt, retry_after, now);
            }
            link_response::Msg::Draining(_) => {
                info!(
                    endpoint = %lane.endpoint,
                    "pusher is draining: no new work on this stream; waiting for its in-flight acks"
                );
                if let Some(conn) = &mut lane.conn {
                    conn.draining = true;
                }
            }
            link_response::Msg::Heartbeat(_) | link_response::Msg::Welcome(_) => {}
        }
    }

    fn settle_failure(&mut self, id: String, generation: i64, reason: String, attempts: u32) {
        warn!(conversation_id = %id, attempts, %reason, "conversation failed");
        let store = Arc::clone(&self.store);
        self.settle(id.clone(), "failed", async move {
            store.fail(&id, generation, &reason, attempts).await
        });
    }

    /// Writes an outcome in its own task and reports back.
    fn settle(
        &self,
        id: String,
        outcome: &'static str,
        write: impl Future<Output = Result<bool, StoreError>> + Send + 'static,
    ) {
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = write.await;
            let _ = events
                .send(Event::Settled {
                    id,
                    outcome,
                    result,
                })
                .await;
        });
    }

    /// The lane whose window holds `id`, if any.
    fn lane_of(&mut self, id: &str) -> Option<&mut Lane> {
        self.lanes.iter_mut().find(|l| l.pending.contains(id))
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Claimed { limit, result } => {
                self.claiming = false;
                match result {
                    Ok(claimed) => {
                        self.more_work = claimed.len() >= limit;
                        let now = Instant::now();
                        for row in claimed {
                            debug!(conversation_id = %row.id, generation = row.generation, "claimed");
                            self.place(row, now);
                        }
                    }
                    Err(error) => {
                        // Retried on the next wake-up or maintenance tick.
                        self.more_work = false;
                        warn!(%error, "claiming work from the store failed");
                        self.last_error = error.to_string();
                    }
                }
            }
            Event::Settled {
                id,
                outcome,
                result,
            } => {
                let Some(lane) = self.lane_of(&id) else {
                    return;
                };
                match result {
                    Ok(true) => {
                        let attempts = lane.pending.remove(&id).map(|e| e.attempt).unwrap_or(0);
                        info!(conversation_id = %id, attempts, outcome, "conversation settled");
                        metrics::counter!("listen_conversations_total", "status" => outcome)
                            .increment(1);
                        (self.on_settled)(&id);
                    }
                    Ok(false) => {
                        lane.pending.remove(&id);
                        debug!(conversation_id = %id, "outcome not written: already settled or claimed by another instance");
                    }
                    Err(error) => {
                        warn!(conversation_id = %id, %error, "writing the outcome failed; will re-send");
                        lane.pending
                            .unsettle(&id, Instant::now() + SETTLE_RETRY_DELAY);
                        self.last_error = error.to_string();
                    }
                }
            }
            Event::Opened {
                endpoint,
                epoch,
                result,
            } => self.on_opened(endpoint, epoch, result),
            Event::Resolved(result) => self.on_resolved(result),
        }
    }

    /// Puts a claimed row in a window: the one already holding it (its lease was re-claimed),
    /// else the lane [`pick_lane`](Self::pick_lane) chooses, else (lanes changed while the
    /// claim was out) any lane with room.
    fn place(&mut self, row: Claimed, now: Instant) {
        if let Some(lane) = self.lane_of(&row.id) {
            lane.pending.insert(row, now);
            return;
        }
        let lane = self.pick_lane().or_else(|| {
            (0..self.lanes.len())
                .filter(|&i| self.lanes[i].pending.free_slots() > 0)
                .min_by_key(|&i| self.lanes[i].pending.len())
        });
        if !lane.is_some_and(|i| self.lanes[i].pending.insert(row, now)) {
            // Cannot happen: claims never exceed the free slots, and lanes are not dropped
            // while a claim is out. The row keeps its lease until this instance restarts.
            warn!("no pending window has room for a claimed conversation");
        }
    }

    fn renew_leases(&self) {
        let store = Arc::clone(&self.store);
        // The queued gauge rides on the same tick.
        let pending = self.pending_total() as u64;
        let counter = Arc::clone(&self.store);
        tokio::spawn(async move {
            if let Ok(processing) = counter.count_processing().await {
                metrics::gauge!("listen_link_queued")
                    .set(processing.saturating_sub(pending) as f64);
            }
        });
        let owner = self.config.instance_id.clone();
        let lease_ttl = self.config.lease_ttl.as_millis() as i64;
        // Only what the windows hold: a backlog of queued rows costs nothing here.
        let ids: Vec<String> = self
            .lanes
            .iter()
            .flat_map(|l| l.pending.ids().cloned())
            .collect();
        if ids.is_empty() {
            return;
        }
        tokio::spawn(async move {
            let until = now_ms() + lease_ttl;
            // In slices, so a renewal never holds the store's writer for long (a full
            // window on every endpoint is 16 384 rows with the defaults).
            for ids in ids.chunks(RENEW_SLICE) {
                if let Err(error) = store.renew(&owner, ids.to_vec(), until).await {
                    warn!(%error, "renewing leases failed");
                    return;
                }
            }
        });
    }

    fn pending_total(&self) -> usize {
        self.lanes.iter().map(|l| l.pending.len()).sum()
    }

    async fn publish(&mut self) {
        let state = aggregate(self.lanes.iter().map(|l| l.state.to_wire()));
        let connected = state == Wire::Connected;
        self.publish_state(connected).await;
        let pending = self.pending_total();
        metrics::gauge!("listen_link_state").set(state as i32 as f64);
        metrics::gauge!("listen_link_up").set(if connected { 1.0 } else { 0.0 });
        metrics::gauge!("listen_link_pending").set(pending as f64);
        metrics::gauge!("listen_link_endpoints").set(self.lanes.len() as f64);
        for lane in &self.lanes {
            let wire = lane.state.to_wire();
            lane.metrics.state.set(wire as i32 as f64);
            lane.metrics
                .up
                .set(if wire == Wire::Connected { 1.0 } else { 0.0 });
            lane.metrics.pending.set(lane.pending.len() as f64);
        }
        let snapshot = LinkSnapshot {
            state,
            pending,
            reconnects: self.lanes.iter().map(|l| l.reconnects).sum(),
            consecutive_failures: self
                .lanes
                .iter()
                .map(|l| l.consecutive_failures)
                .min()
                .unwrap_or(0),
            last_error: self.last_error.clone(),
            acks_ignored: self.acks_ignored,
            transcripts_dropped: 0, // filled in by LinkHandle::snapshot
            endpoints: self.lanes.iter().map(Lane::snapshot).collect(),
        };
        self.status_tx.send_replace(snapshot);
    }

    async fn publish_state(&mut self, connected: bool) {
        if self.serving != Some(connected) {
            self.serving = Some(connected);
            let status = if connected {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            self.health
                .set_service_status(LINK_HEALTH_NAME, status)
                .await;
        }
    }
}

/// The link's state from its lanes': the most alive one (CONNECTING before any is known).
fn aggregate(states: impl Iterator<Item = Wire>) -> Wire {
    let rank = |state: Wire| match state {
        Wire::Connected => 5,
        Wire::HalfOpen => 4,
        Wire::Connecting => 3,
        Wire::Backoff => 2,
        Wire::Degraded => 1,
        Wire::Unspecified => 0,
    };
    states.max_by_key(|s| rank(*s)).unwrap_or(Wire::Connecting)
}

/// Opens a Connect stream to `uri` and completes the Hello/Welcome handshake.
async fn open_stream(config: &LinkConfig, uri: &str, epoch: u64) -> Result<Opened, String> {
    let endpoint = Endpoint::from_shared(uri.to_string())
        .map_err(|e| format!("invalid pusher url {uri}: {e}"))?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true);
    let endpoint = match &config.tls {
        Some(tls) => endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS configuration for {uri}: {}", error_chain(&e)))?,
        None => endpoint,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to pusher at {uri}: {}", error_chain(&e)))?;
    let mut client = PusherClient::new(channel)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);

    let (tx, rx) = mpsc::channel(config.max_in_flight * 2 + 64);
    let hello = Hello {
        instance_id: config.instance_id.clone(),
        epoch,
        max_in_flight: config.max_in_flight as u32,
    };
    tx.try_send(LinkRequest {
        msg: Some(link_request::Msg::Hello(hello)),
    })
    .map_err(|_| "stream buffer unavailable".to_string())?;
    let handshake = async {
        let mut inbound = client
            .connect(ReceiverStream::new(rx))
            .await
            .map_err(|status| format!("pusher refused the stream: {status}"))?
            .into_inner();
        match inbound.message().await {
            Ok(Some(LinkResponse {
                msg: Some(link_response::Msg::Welcome(welcome)),
            })) => Ok((inbound, welcome)),
            Ok(Some(other)) => Err(format!("pusher answered hello with {other:?}, not welcome")),
            Ok(None) => Err("pusher closed the stream during the handshake".to_string()),
            Err(status) => Err(format!("handshake failed: {status}")),
        }
    };
    let (inbound, welcome) = tokio::time::timeout(config.connect_timeout, handshake)
        .await
        .map_err(|_| format!("no welcome from pusher within {:?}", config.connect_timeout))??;
    Ok(Opened {
        tx,
        inbound,
        welcome,
    })
}

/// "a: b: c" from an error and its sources (tonic's transport errors say little on top).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
