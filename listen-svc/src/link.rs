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
//! 3. claims PROCESSING rows from the store in fair order (uids take turns, interactive
//!    before bulk, every 8th claim bulk first: `store::queue`), only as many as there are
//!    free slots on lanes that take work (so work beyond them stays queued in the store),
//!    and gives each to the lane with the fewest pending (ties: round-robin);
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
//!
//! Its parts: [`lanes`] decides which lane holds what (pure), [`stream`] opens streams and
//! holds their halves, [`work`] runs the store I/O, [`error`] says why a lane failed, and
//! [`handle`] is everyone else's side. This file is the owner task: its loop and handlers.

mod error;
mod handle;
mod handoff;
mod lanes;
mod pending;
mod series;
mod state;
mod stream;
mod target;
#[cfg(test)]
mod tests;
mod work;

pub(crate) use handle::{EndpointSnapshot, LinkHandle, LinkSnapshot, SettledHook, Transcripts};
pub(crate) use handoff::Slot;
pub(crate) use state::Policy;
pub use target::Target;

use crate::store::{Claimed, ConversationStore, Lease, StoreError};
use error::{Closed, LinkError};
use handoff::Handoff;
use lanes::Lanes;
use opentelemetry::KeyValue;
use pending::{AckAction, Ignored};
use series::EndpointSeries;
use shared::backoff::Backoff;
use shared::grpc::health::{HealthReporter, ServingStatus};
use shared::proto::listen::v1::{LINK_HEALTH_NAME, LinkState as Wire};
use shared::proto::pusher::v1::{
    Heartbeat, LinkResponse, ProcessConversation, link_request, link_response,
};
use shared::telemetry::TraceContext;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use stream::{Incoming, Opened, Sent, StreamEnd, Streams};
use target::Resolver;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tracing::{Span, debug, info, info_span, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use work::Work;

/// Delay before re-trying a send the stream buffer had no room for.
const REQUEUE_DELAY: Duration = Duration::from_millis(50);
/// Delay before re-sending an entry whose outcome could not be written.
const SETTLE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How often the queue gauges are read from the store's counters.
const QUEUE_REPORT_INTERVAL: Duration = Duration::from_secs(5);
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
    /// Its files are read again while the link runs; each new connection uses those in use.
    pub tls: Option<Arc<shared::tls::ClientTls>>,
    /// Compression of the messages sent to pusher (pusher's answers are decompressed
    /// whatever it picks).
    pub compression: shared::compression::SendCompression,
}

/// Starts the link task. It runs until `shutdown` turns true, then releases its leases.
pub(crate) fn spawn(
    config: LinkConfig,
    store: Arc<dyn ConversationStore>,
    health: HealthReporter,
    on_settled: SettledHook,
    shutdown: watch::Receiver<bool>,
) -> (LinkHandle, tokio::task::JoinHandle<()>) {
    let wake = Arc::new(Notify::new());
    let handoff = Arc::new(Handoff::new(Lease {
        owner: config.instance_id.clone(),
        lease_ms: config.lease_ttl.as_millis() as i64,
    }));
    let (status_tx, status_rx) = watch::channel(LinkSnapshot::initial());
    let transcripts = Arc::new(Transcripts::new(config.transcript_buffer));
    let (events_tx, events_rx) =
        mpsc::channel(config.max_endpoints * (config.max_in_flight + 1) + 16);
    let mut lanes = Lanes::new(
        config.max_endpoints,
        config.max_in_flight,
        config.attempts,
        EndpointSeries::install(),
    );
    if let Target::Url { url, endpoint } = &config.target {
        lanes.add(endpoint.clone(), url.clone());
    }
    let link = Link {
        dns: Dns {
            resolver: Resolver::for_target(&config.target, config.connect_timeout).map(Arc::new),
            timeout: config.connect_timeout,
            resolving: false,
            last_resolve: None,
            events: events_tx.clone(),
        },
        work: Work {
            store,
            owner: config.instance_id.clone(),
            lease_ttl: config.lease_ttl,
            on_settled,
            events: events_tx.clone(),
            more_work: true,
            claiming: None,
            drained: false,
            claims: 0,
        },
        config: Arc::new(config),
        lanes,
        streams: Streams::default(),
        status: Status {
            health,
            tx: status_tx,
            serving: None,
            last_error: String::new(),
            acks_ignored: 0,
        },
        wake: Arc::clone(&wake),
        handoff: Arc::clone(&handoff),
        set_aside: 0,
        transcripts: Arc::clone(&transcripts),
        events_tx,
        events_rx,
        shutdown,
        epoch: 0,
        heartbeat_seq: 0,
    };
    let task = tokio::spawn(link.run());
    (
        LinkHandle {
            wake,
            handoff,
            status: status_rx,
            transcripts,
        },
        task,
    )
}

/// What the link's own tasks report back.
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
        result: Result<Box<Opened>, LinkError>,
    },
    Resolved(Result<Vec<SocketAddr>, LinkError>),
}

/// The owner task's state.
struct Link {
    config: Arc<LinkConfig>,
    lanes: Lanes,
    streams: Streams,
    work: Work,
    dns: Dns,
    status: Status,
    wake: Arc<Notify>,
    /// Window slots set aside for Submits to fill (claim at submit).
    handoff: Arc<Handoff>,
    /// Slots set aside whose rows have not arrived: open in `handoff`, or held by a Submit.
    set_aside: usize,
    transcripts: Arc<Transcripts>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    shutdown: watch::Receiver<bool>,
    /// Streams opened so far, on all lanes (each stream's Hello carries its own).
    epoch: u64,
    heartbeat_seq: u64,
}

/// Looking up a `dns:` target, one lookup at a time, in its own task.
struct Dns {
    /// `None` for a URL target.
    resolver: Option<Arc<Resolver>>,
    timeout: Duration,
    /// A lookup is out.
    resolving: bool,
    last_resolve: Option<Instant>,
    events: mpsc::Sender<Event>,
}

impl Dns {
    fn start(&mut self) {
        let Some(resolver) = &self.resolver else {
            return;
        };
        if self.resolving {
            return;
        }
        self.resolving = true;
        self.last_resolve = Some(Instant::now());
        let (resolver, events) = (Arc::clone(resolver), self.events.clone());
        let timeout = self.timeout;
        tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, resolver.resolve()).await {
                Ok(result) => result,
                Err(_) => Err(format!("DNS lookup took longer than {timeout:?}")),
            };
            let _ = events
                .send(Event::Resolved(result.map_err(LinkError::Resolve)))
                .await;
        });
    }

    /// A failed lane triggers a fresh lookup (its pod may have moved), at most every
    /// [`MIN_RERESOLVE`].
    fn after_failure(&mut self) {
        if self
            .last_resolve
            .is_none_or(|at| at.elapsed() >= MIN_RERESOLVE)
        {
            self.start();
        }
    }

    /// With no endpoint known (pusher has no ready pod yet, or DNS failed), lookups repeat
    /// every [`MIN_RERESOLVE`] rather than every resolve interval.
    fn retry_at(&self, no_lanes: bool) -> Option<Instant> {
        if self.resolver.is_none() || self.resolving || !no_lanes {
            return None;
        }
        self.last_resolve.map(|at| at + MIN_RERESOLVE)
    }
}

/// What the link shows: the health service, the gauges and the [`LinkSnapshot`].
struct Status {
    health: HealthReporter,
    tx: watch::Sender<LinkSnapshot>,
    /// What the link health service last reported.
    serving: Option<bool>,
    last_error: String,
    acks_ignored: u64,
}

impl Status {
    async fn publish(&mut self, lanes: &Lanes) {
        let state = lanes.state();
        let connected = state == Wire::Connected;
        self.serving(connected).await;
        let pending = lanes.pending_total();
        metrics::gauge!("listen_link_state").set(state as i32 as f64);
        metrics::gauge!("listen_link_up").set(if connected { 1.0 } else { 0.0 });
        metrics::gauge!("listen_link_pending").set(pending as f64);
        metrics::gauge!("listen_link_pending_capacity").set(lanes.capacity() as f64);
        metrics::gauge!("listen_link_endpoints").set(lanes.len() as f64);
        for lane in lanes.iter() {
            let wire = lane.state.to_wire();
            lane.metrics.state.set(wire as i32 as f64);
            lane.metrics
                .up
                .set(if wire == Wire::Connected { 1.0 } else { 0.0 });
            lane.metrics.pending.set(lane.pending.len() as f64);
        }
        let endpoints: Vec<EndpointSnapshot> = lanes.iter().map(|l| l.snapshot()).collect();
        let snapshot = LinkSnapshot {
            state,
            pending,
            reconnects: endpoints.iter().map(|e| e.reconnects).sum(),
            consecutive_failures: endpoints
                .iter()
                .map(|e| e.consecutive_failures)
                .min()
                .unwrap_or(0),
            last_error: self.last_error.clone(),
            acks_ignored: self.acks_ignored,
            transcripts_dropped: 0, // filled in by LinkHandle::snapshot
            endpoints,
        };
        self.tx.send_replace(snapshot);
    }

    async fn serving(&mut self, connected: bool) {
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

impl Link {
    async fn run(mut self) {
        // A restart under the same identity: the previous process's leases are ours to give up.
        match self.work.release().await {
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
        let mut queue_report = tokio::time::interval(QUEUE_REPORT_INTERVAL);
        queue_report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resolve = tokio::time::interval(self.config.resolve_interval);
        resolve.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let dns = self.dns.resolver.is_some();
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            self.start_connects();
            self.flush();
            self.status.publish(&self.lanes).await;
            let timer = self.next_timer();
            let forwarding = self.lanes.iter().any(|l| l.takes_work());
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => break,
                Some((epoch, incoming)) = self.streams.next(), if !self.streams.is_empty() => {
                    self.on_incoming(epoch, incoming);
                }
                Some(event) = self.events_rx.recv() => self.on_event(event),
                _ = self.wake.notified() => self.work.more_work = true,
                _ = self.handoff.ready.notified() => self.on_handed_over(),
                // Wakes the loop; flush sends what is buffered.
                _ = self.transcripts.ready.notified(), if forwarding => {}
                _ = sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => self.on_timer(),
                _ = heartbeat.tick() => self.heartbeat(),
                _ = queue_report.tick() => self.work.report_queue(),
                _ = maintenance.tick() => {
                    self.work.renew(self.lanes.ids());
                    // Rows whose owner died become claimable when their lease expires, and
                    // go before new Submits.
                    self.work.more_work = true;
                    self.work.drained = false;
                }
                _ = resolve.tick(), if dns => self.dns.start(),
            }
        }
        self.status.serving(false).await;
        // Conversations submitted from now on are queued; those already written claimed at
        // submit are released below with every other lease of this instance.
        self.handoff.close();
        // Dropping the streams ends them; pusher keeps their results for whoever asks next.
        self.streams.clear();
        self.lanes.clear();
        match tokio::time::timeout(Duration::from_secs(5), self.work.release()).await {
            Ok(Ok(n)) => info!(released = n, "link stopped; leases released"),
            Ok(Err(error)) => {
                warn!(%error, "link stopped; could not release leases, they will expire")
            }
            Err(_) => warn!("link stopped; releasing leases timed out, they will expire"),
        }
    }

    /// Opens a stream, in its own task, on every lane whose state machine asks for one.
    fn start_connects(&mut self) {
        for lane in self.lanes.iter_mut() {
            if !lane.wants_connect() {
                continue;
            }
            lane.opening = true;
            self.epoch += 1;
            let (config, events) = (Arc::clone(&self.config), self.events_tx.clone());
            let (endpoint, uri, epoch) = (lane.endpoint.clone(), lane.uri.clone(), self.epoch);
            tokio::spawn(async move {
                let result = stream::open_stream(&config, &uri, epoch)
                    .await
                    .map(Box::new);
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

    fn on_opened(&mut self, endpoint: String, epoch: u64, result: Result<Box<Opened>, LinkError>) {
        let Some(i) = self.lanes.opening(&endpoint) else {
            return; // The endpoint left meanwhile; dropping the stream closes it.
        };
        self.lanes[i].opening = false;
        let opened = match result {
            Ok(opened) if !self.lanes[i].retiring => opened,
            Ok(_) => return,
            Err(error) => return self.lane_failed(i, error),
        };
        let welcome = self.streams.insert(epoch, *opened);
        let lane = &mut self.lanes[i];
        let pusher_id = welcome.pusher_id;
        let replayed = lane.connected(epoch, pusher_id.clone(), Instant::now());
        info!(endpoint = %lane.endpoint, epoch, %pusher_id, replayed, "link connected");
        self.work.more_work = true;
    }

    fn on_incoming(&mut self, epoch: u64, incoming: Incoming) {
        let Some(i) = self.lanes.by_epoch(epoch) else {
            self.streams.remove(epoch);
            return;
        };
        if let Incoming::Message(response) = incoming {
            if let Some(conn) = &mut self.lanes[i].conn {
                conn.last_heard = Instant::now();
            }
            return self.on_response(i, response);
        }
        if let Some(end) = incoming.end(self.lanes[i].draining()) {
            self.end_stream(i, end);
        }
    }

    /// Closes lane `i`'s stream and moves its state machine on.
    fn end_stream(&mut self, i: usize, end: StreamEnd) {
        if let Some(conn) = self.lanes[i].conn.take() {
            self.streams.remove(conn.epoch);
        }
        match end {
            StreamEnd::Drained => {
                let lane = &mut self.lanes[i];
                info!(endpoint = %lane.endpoint, "draining pusher closed the stream; reconnecting to replay what is left");
                lane.drained();
            }
            StreamEnd::Failed(error) => self.lane_failed(i, error),
        }
    }

    fn lane_failed(&mut self, i: usize, error: LinkError) {
        let now = Instant::now();
        let lane = &mut self.lanes[i];
        lane.failed(
            &error,
            now,
            &self.config.policy,
            shared::backoff::random_unit(),
        );
        warn!(
            endpoint = %lane.endpoint,
            reason = %error,
            kind = error.reason().as_str(),
            failures = lane.consecutive_failures,
            next = ?lane.state.to_wire(),
            retry_in_ms = lane.state.deadline().map(|d| d.saturating_duration_since(now).as_millis() as u64),
            "link to pusher failed"
        );
        self.status.last_error = error.to_string();
        // Its pod may have been replaced by one at another address.
        self.dns.after_failure();
    }

    /// New addresses join as lanes; lanes whose address is gone retire. A failed or empty
    /// lookup changes nothing (the known endpoints are the best guess).
    fn on_resolved(&mut self, result: Result<Vec<SocketAddr>, LinkError>) {
        self.dns.resolving = false;
        let addrs = match result {
            Ok(addrs) => addrs,
            Err(error) => {
                warn!(%error, endpoints = self.lanes.len(), "looking up pusher failed; keeping the endpoints known");
                if self.lanes.is_empty() {
                    self.status.last_error = error.to_string();
                }
                return;
            }
        };
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let changes = self.lanes.reconcile(addrs, scheme);
        if let Some(resolved) = changes.truncated_from {
            warn!(
                resolved,
                max = self.config.max_endpoints,
                "pusher resolves to more addresses than --max-pusher-endpoints; using the first"
            );
        }
        for (endpoint, pending) in changes.retired {
            info!(%endpoint, pending, "pusher endpoint left DNS; its work moves to the others");
        }
        for endpoint in changes.returned {
            info!(%endpoint, "pusher endpoint is back in DNS");
        }
        for endpoint in changes.joined {
            info!(%endpoint, "pusher endpoint joined");
        }
    }

    /// Moves work, sends what is due, drops finished lanes and claims more if there is room.
    fn flush(&mut self) {
        let now = Instant::now();
        for (from, count) in self.lanes.rebalance(now) {
            info!(%from, count, "moving pending conversations to other pusher endpoints");
        }
        self.forward_transcripts();
        for i in 0..self.lanes.len() {
            if let Err(error) = self.send_due(i, now) {
                self.end_stream(i, StreamEnd::Failed(error));
            }
        }
        // Not while slots are promised (a claim out, or Submits holding set-aside slots):
        // their rows were counted against the free slots of the lanes as they were.
        if self.lanes.iter().any(|l| l.retiring) {
            self.set_aside -= self.handoff.revoke();
        }
        let promised = self.work.claiming.is_some() || self.set_aside > 0;
        for lane in self.lanes.drop_retired(promised) {
            if let Some(conn) = &lane.conn {
                self.streams.remove(conn.epoch);
            }
            info!(endpoint = %lane.endpoint, "pusher endpoint dropped");
        }
        self.fill_windows();
    }

    /// Fills free window slots: from the store when it may hold work (a claim, after taking
    /// back the slots set aside, so no slot is promised twice), and, once the store is
    /// drained ([`Work::drained`]), sets what the claim does not hold aside for Submits to
    /// fill with their conversations (claim at submit). Set-aside slots stay open while a
    /// claim is out (see [`Work::claim`]); Submits only skip the queue when it is empty (the
    /// store checks), so nothing is overtaken.
    fn fill_windows(&mut self) {
        let room = self.lanes.room();
        if (self.work.more_work && self.work.claiming.is_none())
            || !self.work.drained
            || self.set_aside + self.work.claiming.unwrap_or(0) > room
        {
            self.set_aside -= self.handoff.revoke();
        }
        self.work.claim(room.saturating_sub(self.set_aside));
        if self.work.drained {
            let more = room.saturating_sub(self.set_aside + self.work.claiming.unwrap_or(0));
            self.handoff.open(more);
            self.set_aside += more;
        }
    }

    /// Places the conversations Submits wrote leased to this instance.
    fn on_handed_over(&mut self) {
        let rows = self.handoff.take();
        self.set_aside = self.set_aside.saturating_sub(rows.len());
        work::count_claims("submit", rows.len());
        work::record_waits(&rows);
        let now = Instant::now();
        for row in rows {
            self.place_claimed(row, now);
        }
    }

    /// Puts a claimed row in a window and refuses it at once if it can never be sent.
    fn place_claimed(&mut self, row: Claimed, now: Instant) {
        debug!(conversation_id = %row.id, generation = row.generation, "claimed");
        let id = row.id.clone();
        if !self.lanes.place(row, now) {
            // Cannot happen: claims and set-aside slots never exceed the free slots, and
            // lanes are not dropped while slots are promised. The row keeps its lease until
            // it expires, and is then claimed again.
            warn!(conversation_id = %id, "no pending window has room for a claimed conversation");
            return;
        }
        self.refuse_if_unsendable(&id);
    }

    /// Sends what is due on lane `i`; an error means its stream is closed.
    fn send_due(&mut self, i: usize, now: Instant) -> Result<(), LinkError> {
        let lane = &mut self.lanes[i];
        if !lane.sends() {
            return Ok(());
        }
        let Some(epoch) = lane.conn.as_ref().map(|c| c.epoch) else {
            return Ok(());
        };
        for id in lane.pending.due(now) {
            let replayed = lane.pending.get(&id).is_some_and(|e| e.replayed);
            let Some(mut request) = lane.pending.mark_sent(&id, epoch, now) else {
                continue;
            };
            let _span = send_span(&mut request, &lane.endpoint, replayed).entered();
            debug!(conversation_id = %id, attempt = request.attempt, endpoint = %lane.endpoint, "sending to pusher");
            lane.metrics.sent.increment(1);
            if request.attempt > 1 {
                lane.metrics.resent.increment(1);
            }
            match self
                .streams
                .send(epoch, link_request::Msg::Process(request))
            {
                Sent::Queued => {}
                Sent::Full => lane.pending.unsend(&id, now + REQUEUE_DELAY),
                Sent::Closed => {
                    lane.pending.unsend(&id, now);
                    return Err(Closed::Outbound.into());
                }
            }
        }
        Ok(())
    }

    /// Live transcripts go to the first lane taking work (one lane, so they stay in order
    /// while it lives); with none they wait in their bounded buffer.
    fn forward_transcripts(&mut self) {
        let Some(i) = self.lanes.iter().position(|l| l.takes_work()) else {
            return;
        };
        let Some(epoch) = self.lanes[i].conn.as_ref().map(|c| c.epoch) else {
            return;
        };
        for batch in self.transcripts.take() {
            match self
                .streams
                .send(epoch, link_request::Msg::Transcript(batch))
            {
                Sent::Queued => {}
                // Best-effort: a full stream buffer drops the batch.
                Sent::Full => self.transcripts.count_dropped(),
                Sent::Closed => {
                    return self.end_stream(i, StreamEnd::Failed(Closed::Outbound.into()));
                }
            }
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
                self.end_stream(i, StreamEnd::Failed(LinkError::Silent(silence_limit)));
                continue;
            }
            let ping = link_request::Msg::Heartbeat(Heartbeat {
                seq: self.heartbeat_seq,
            });
            if let Sent::Closed = self.streams.send(conn.epoch, ping) {
                self.end_stream(i, StreamEnd::Failed(Closed::Outbound.into()));
            }
        }
    }

    /// The earliest moment something is due: a lane's reconnect or probe, an ack deadline or
    /// send on a live stream, or another lookup when none found an endpoint yet.
    fn next_timer(&self) -> Option<Instant> {
        let lookup = self.dns.retry_at(self.lanes.is_empty());
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

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self
            .dns
            .retry_at(self.lanes.is_empty())
            .is_some_and(|at| at <= now)
        {
            self.dns.start();
        }
        for lane in self.lanes.iter_mut() {
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
                    self.work.fail(id, generation, reason, attempts);
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
                    } => self.work.complete(id, generation, processed, attempts),
                    AckAction::Fail {
                        generation,
                        reason,
                        attempts,
                    } => self.work.fail(id, generation, reason, attempts),
                    AckAction::Resend { at } => {
                        debug!(conversation_id = %id, attempt, retry_in_ms = at.saturating_duration_since(now).as_millis() as u64, "retryable failure; re-sending later");
                    }
                    AckAction::Ignore(why) => {
                        self.status.acks_ignored += 1;
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

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Claimed { limit, result } => {
                self.work.claiming = None;
                match result {
                    Ok(claimed) => {
                        // A wake while the claim was out (work committed after its scan)
                        // has set more_work again; a full claim means there may be more.
                        self.work.more_work |= claimed.len() >= limit;
                        self.work.drained = claimed.len() < limit;
                        let now = Instant::now();
                        for row in claimed {
                            self.place_claimed(row, now);
                        }
                    }
                    Err(error) => {
                        // Retried on the next wake-up or maintenance tick.
                        self.work.more_work = false;
                        self.work.drained = false;
                        warn!(%error, "claiming work from the store failed");
                        self.status.last_error = error.to_string();
                    }
                }
            }
            Event::Settled {
                id,
                outcome,
                result,
            } => self.on_settled(id, outcome, result),
            Event::Opened {
                endpoint,
                epoch,
                result,
            } => self.on_opened(endpoint, epoch, result),
            Event::Resolved(result) => self.on_resolved(result),
        }
    }

    /// Fails a just-placed conversation that is too large ever to be sent.
    fn refuse_if_unsendable(&mut self, id: &str) {
        let max = self.config.max_message_bytes;
        let Some(lane) = self.lanes.holding(id) else {
            return;
        };
        if let Some(AckAction::Fail {
            generation,
            reason,
            attempts,
        }) = lane.pending.refuse_if_larger(id, max)
        {
            warn!(conversation_id = %id, %reason, "conversation cannot be sent");
            self.work.fail(id.to_string(), generation, reason, attempts);
        }
    }

    fn on_settled(&mut self, id: String, outcome: &'static str, result: Result<bool, StoreError>) {
        let Some(lane) = self.lanes.holding(&id) else {
            return;
        };
        match result {
            Ok(true) => {
                let entry = lane.pending.remove(&id);
                let attempts = entry.as_ref().map_or(0, |e| e.attempt);
                info!(conversation_id = %id, attempts, outcome, "conversation settled");
                metrics::counter!("listen_conversations_total", "status" => outcome).increment(1);
                if let Some(finished) = entry.and_then(|e| e.request.finished_at) {
                    let finished_ms =
                        finished.seconds * 1000 + i64::from(finished.nanos) / 1_000_000;
                    let seconds = (crate::store::now_ms() - finished_ms).max(0) as f64 / 1000.0;
                    metrics::histogram!("listen_conversation_duration_seconds", "status" => outcome)
                        .record(seconds);
                }
                (self.work.on_settled)(&id);
            }
            Ok(false) => {
                lane.pending.remove(&id);
                debug!(conversation_id = %id, "outcome not written: already settled or claimed by another instance");
            }
            Err(error) => {
                warn!(conversation_id = %id, %error, "writing the outcome failed; will re-send");
                lane.pending
                    .unsettle(&id, Instant::now() + SETTLE_RETRY_DELAY);
                self.status.last_error = error.to_string();
            }
        }
    }
}

/// The span of one send, continuing the conversation's stored trace (carried in `request`,
/// which then carries the send's own context to pusher). A re-send records why as an event
/// with its attempt number: `replay` (a new stream) or `retry` (a deadline or a retryable
/// failure).
fn send_span(request: &mut ProcessConversation, endpoint: &str, replayed: bool) -> Span {
    let span = info_span!(
        "link.send",
        otel.kind = "client",
        conversation_id = %request.conversation_id,
        attempt = request.attempt,
        endpoint,
    );
    let stored = TraceContext::new(
        Some(std::mem::take(&mut request.traceparent)),
        Some(std::mem::take(&mut request.tracestate)),
    );
    stored.continue_in(&span);
    if request.attempt > 1 {
        let why = if replayed { "replay" } else { "retry" };
        span.add_event(
            why,
            vec![KeyValue::new("attempt", i64::from(request.attempt))],
        );
    }
    let sent = TraceContext::of(&span);
    request.traceparent = sent.traceparent;
    request.tracestate = sent.tracestate;
    span
}
