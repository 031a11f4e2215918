//! The link to pusher: one task owns the stream, the pending map and the state machine.
//!
//! Everyone else talks to it through a [`LinkHandle`]: `wake()` after committing new work
//! (never waits), and a `watch` snapshot for status. The task:
//!
//! 1. opens a Connect stream (Hello -> Welcome) when the [`state`] machine says so, and backs
//!    off, degrades and probes when it cannot;
//! 2. on every established stream, replays all of [`pending`] with a fresh retry budget;
//! 3. claims PROCESSING rows from the store, only as many as there are free pending slots
//!    (so work beyond `max_in_flight` stays queued in the store), and sends them;
//! 4. matches Ack / Progress / Busy to pending entries, writes outcomes to the store with the
//!    fencing generation it claimed under (store writes run as their own tasks and report
//!    back, so a slow store never stalls the stream), and re-sends on ack deadlines;
//! 5. renews its leases, and releases them on shutdown so another instance can take over.
//!
//! Channels: the stream's outbound buffer holds `2 × max_in_flight + 64` messages (a full
//! buffer re-queues the send shortly, no attempt spent); internal events hold
//! `max_in_flight + 16` (each pending entry has at most one store write outstanding, plus one
//! claim), and their senders wait rather than drop.

mod pending;
mod state;

pub(crate) use state::Policy;

use crate::store::{Claimed, Completion, ConversationStore, StoreError, now_ms};
use pending::{AckAction, Ignored, Pending};
use shared::backoff::Backoff;
use shared::proto::listen::v1::{LINK_HEALTH_NAME, LinkState as Wire};
use shared::proto::pusher::v1::{
    Heartbeat, Hello, LinkRequest, LinkResponse, TranscriptBatch, Welcome, link_request,
    link_response, pusher_client::PusherClient,
};
use state::LinkState;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Endpoint;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{debug, info, warn};

/// Most rows claimed from the store in one go.
const CLAIM_BATCH: usize = 256;
/// Delay before re-trying a send the stream buffer had no room for.
const REQUEUE_DELAY: Duration = Duration::from_millis(50);
/// Delay before re-sending an entry whose outcome could not be written.
const SETTLE_RETRY_DELAY: Duration = Duration::from_secs(1);

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
    pub pusher_url: String,
    pub instance_id: String,
    pub max_in_flight: usize,
    pub attempts: Attempts,
    pub policy: Policy,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// App-level heartbeat period; the stream is declared dead after
    /// `keepalive_interval + keepalive_timeout` without any message from pusher.
    pub heartbeat_interval: Duration,
    pub lease_ttl: Duration,
    pub max_message_bytes: usize,
    /// Live transcript batches buffered while the link is down (oldest dropped beyond).
    pub transcript_buffer: usize,
    /// TLS (usually mutual) towards pusher, for an https:// URL.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// What the link looks like from outside.
#[derive(Clone, Debug)]
pub(crate) struct LinkSnapshot {
    pub state: Wire,
    pub pending: usize,
    pub reconnects: u64,
    pub consecutive_failures: u32,
    pub last_error: String,
    pub acks_ignored: u64,
    pub transcripts_dropped: u64,
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
    });
    let transcripts = Arc::new(Transcripts::new(config.transcript_buffer));
    let (events_tx, events_rx) = mpsc::channel(config.max_in_flight + 16);
    let link = Link {
        pending: Pending::new(config.max_in_flight, config.attempts),
        config,
        store,
        health,
        on_settled,
        status_tx,
        wake: Arc::clone(&wake),
        transcripts: Arc::clone(&transcripts),
        events_tx,
        events_rx,
        shutdown,
        state: LinkState::INITIAL,
        epoch: 0,
        reconnects: 0,
        consecutive_failures: 0,
        last_error: String::new(),
        acks_ignored: 0,
        more_work: true,
        claiming: false,
        draining: false,
        serving: None,
    };
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
}

/// Why a stream ended.
enum StreamEnd {
    Failed(String),
    Drained,
    Shutdown,
}

struct Stream {
    epoch: u64,
    tx: mpsc::Sender<LinkRequest>,
    inbound: Streaming<LinkResponse>,
}

struct Link {
    config: LinkConfig,
    store: Arc<dyn ConversationStore>,
    health: HealthReporter,
    on_settled: SettledHook,
    status_tx: watch::Sender<LinkSnapshot>,
    wake: Arc<Notify>,
    transcripts: Arc<Transcripts>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    shutdown: watch::Receiver<bool>,
    pending: Pending,
    state: LinkState,
    epoch: u64,
    reconnects: u64,
    consecutive_failures: u32,
    last_error: String,
    acks_ignored: u64,
    /// The store may hold claimable rows.
    more_work: bool,
    /// A claim is outstanding (at most one at a time).
    claiming: bool,
    /// The current stream's pusher said Draining.
    draining: bool,
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
        loop {
            self.publish().await;
            if *self.shutdown.borrow() {
                break;
            }
            if self.state.wants_connect() {
                let mut shutdown = self.shutdown.clone();
                let opened = tokio::select! {
                    opened = self.open_stream() => opened,
                    _ = shutdown.changed() => break,
                };
                match opened {
                    Ok((stream, welcome)) => {
                        let now = Instant::now();
                        self.state = self.state.connected(stream.epoch, now);
                        self.consecutive_failures = 0;
                        if stream.epoch > 1 {
                            self.reconnects += 1;
                            metrics::counter!("listen_link_reconnects_total").increment(1);
                        }
                        self.draining = false;
                        let replayed = self.pending.replay(now);
                        info!(epoch = stream.epoch, pusher_id = %welcome.pusher_id, replayed, "link connected");
                        self.more_work = true;
                        match self.serve(stream, &mut maintenance).await {
                            StreamEnd::Shutdown => break,
                            StreamEnd::Drained => {
                                info!(
                                    "draining pusher closed the stream; reconnecting to replay what is left"
                                );
                                self.state = self.state.drained();
                            }
                            StreamEnd::Failed(reason) => self.connection_failed(reason),
                        }
                    }
                    Err(reason) => self.connection_failed(reason),
                }
                continue;
            }
            // Backoff or Degraded: wait for the timer, still settling outcomes and renewing.
            let deadline = self.state.deadline().unwrap_or_else(Instant::now);
            tokio::select! {
                _ = sleep_until(deadline) => self.state = self.state.timer_elapsed(Instant::now()),
                Some(event) = self.events_rx.recv() => self.on_event(event),
                _ = maintenance.tick() => self.renew_leases(),
                _ = self.shutdown.changed() => break,
            }
        }
        self.publish_state(false).await;
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

    fn connection_failed(&mut self, reason: String) {
        self.consecutive_failures += 1;
        metrics::counter!("listen_link_failures_total").increment(1);
        let now = Instant::now();
        self.state = self
            .state
            .failed(now, &self.config.policy, shared::backoff::random_unit());
        warn!(
            %reason,
            failures = self.consecutive_failures,
            next = ?self.state.to_wire(),
            retry_in_ms = self.state.deadline().map(|d| d.saturating_duration_since(now).as_millis() as u64),
            "link to pusher failed"
        );
        self.last_error = reason;
    }

    async fn open_stream(&mut self) -> Result<(Stream, Welcome), String> {
        let url = &self.config.pusher_url;
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| format!("invalid pusher url {url}: {e}"))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.config.keepalive_interval)
            .keep_alive_timeout(self.config.keepalive_timeout)
            .keep_alive_while_idle(true);
        let endpoint = match &self.config.tls {
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS configuration for {url}: {}", error_chain(&e)))?,
            None => endpoint,
        };
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to pusher at {url}: {}", error_chain(&e)))?;
        let mut client = PusherClient::new(channel)
            .max_decoding_message_size(self.config.max_message_bytes)
            .max_encoding_message_size(self.config.max_message_bytes);

        self.epoch += 1;
        let (tx, rx) = mpsc::channel(self.config.max_in_flight * 2 + 64);
        let hello = Hello {
            instance_id: self.config.instance_id.clone(),
            epoch: self.epoch,
            max_in_flight: self.config.max_in_flight as u32,
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
                Ok(Some(other)) => {
                    Err(format!("pusher answered hello with {other:?}, not welcome"))
                }
                Ok(None) => Err("pusher closed the stream during the handshake".to_string()),
                Err(status) => Err(format!("handshake failed: {status}")),
            }
        };
        let (inbound, welcome) = tokio::time::timeout(self.config.connect_timeout, handshake)
            .await
            .map_err(|_| {
                format!(
                    "no welcome from pusher within {:?}",
                    self.config.connect_timeout
                )
            })??;
        Ok((
            Stream {
                epoch: self.epoch,
                tx,
                inbound,
            },
            welcome,
        ))
    }

    /// Runs one established stream until it ends.
    async fn serve(
        &mut self,
        mut stream: Stream,
        maintenance: &mut tokio::time::Interval,
    ) -> StreamEnd {
        let silence_limit = self.config.keepalive_interval + self.config.keepalive_timeout;
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut heartbeat_seq = 0u64;
        loop {
            if let Err(end) = self.flush(&stream) {
                return end;
            }
            self.publish().await;
            let timer = self.pending.next_timer();
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => return StreamEnd::Shutdown,
                message = stream.inbound.next() => match message {
                    Some(Ok(response)) => {
                        last_heard = Instant::now();
                        if let Some(end) = self.on_response(response) {
                            return end;
                        }
                    }
                                        Some(Err(_)) | None if self.draining => return StreamEnd::Drained,
                    Some(Err(status)) => return StreamEnd::Failed(format!("stream error: {status}")),
                    None => return StreamEnd::Failed("pusher closed the stream".to_string()),
                },
                Some(event) = self.events_rx.recv() => self.on_event(event),
                _ = self.wake.notified() => self.more_work = true,
                // Wakes the loop; flush sends what is buffered.
                _ = self.transcripts.ready.notified() => {}
                _ = sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => self.expire(),
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        return StreamEnd::Failed(format!("no message from pusher for {silence_limit:?}"));
                    }
                    heartbeat_seq += 1;
                    let ping = LinkRequest { msg: Some(link_request::Msg::Heartbeat(Heartbeat { seq: heartbeat_seq })) };
                    if let Err(mpsc::error::TrySendError::Closed(_)) = stream.tx.try_send(ping) {
                        return StreamEnd::Failed("stream closed".to_string());
                    }
                }
                _ = maintenance.tick() => {
                    self.renew_leases();
                    // Rows whose owner died become claimable when their lease expires.
                    self.more_work = true;
                }
            }
        }
    }

    /// Sends what is due and claims more work if there is room.
    fn flush(&mut self, stream: &Stream) -> Result<(), StreamEnd> {
        if self.draining {
            // Nothing new for a draining pusher; what is due waits for the next stream.
            return Ok(());
        }
        for batch in self.transcripts.take() {
            let request = LinkRequest {
                msg: Some(link_request::Msg::Transcript(batch)),
            };
            match stream.tx.try_send(request) {
                Ok(()) => {}
                // Best-effort: a full stream buffer drops the batch.
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.transcripts.dropped.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("listen_transcripts_dropped_total").increment(1);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err(StreamEnd::Failed("stream closed".to_string()));
                }
            }
        }
        let now = Instant::now();
        for id in self.pending.due(now) {
            let Some(request) = self.pending.mark_sent(&id, stream.epoch, now) else {
                continue;
            };
            debug!(conversation_id = %id, attempt = request.attempt, "sending to pusher");
            metrics::counter!("listen_link_sent_total").increment(1);
            if request.attempt > 1 {
                metrics::counter!("listen_link_resent_total").increment(1);
            }
            match stream.tx.try_send(LinkRequest {
                msg: Some(link_request::Msg::Process(request)),
            }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.pending.unsend(&id, now + REQUEUE_DELAY)
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.pending.unsend(&id, now);
                    return Err(StreamEnd::Failed("stream closed".to_string()));
                }
            }
        }
        let free = self.pending.free_slots();
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
        Ok(())
    }

    fn on_response(&mut self, response: LinkResponse) -> Option<StreamEnd> {
        let now = Instant::now();
        match response.msg? {
            link_response::Msg::Ack(ack) => {
                let (id, attempt) = (ack.conversation_id.clone(), ack.attempt);
                if let Some(sent_at) = self.pending.sent_at(&id, attempt) {
                    metrics::histogram!("listen_link_ack_latency_seconds")
                        .record(now.duration_since(sent_at).as_secs_f64());
                }
                let action = self.pending.ack(ack, now);
                let result = match &action {
                    AckAction::Complete { .. } => "processed",
                    AckAction::Fail { .. } => "failed",
                    AckAction::Resend { .. } => "retry",
                    AckAction::Ignore(_) => "ignored",
                };
                metrics::counter!("listen_link_acks_total", "result" => result).increment(1);
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
                self.pending
                    .progress(&progress.conversation_id, progress.attempt, now);
            }
            link_response::Msg::Busy(busy) => {
                metrics::counter!("listen_link_busy_total").increment(1);
                let retry_after =
                    Duration::from_millis(u64::from(busy.retry_after_ms).clamp(10, 60_000));
                self.pending
                    .busy(&busy.conversation_id, busy.attempt, retry_after, now);
            }
            link_response::Msg::Draining(_) => {
                info!(
                    "pusher is draining: no new work on this stream; waiting for its in-flight acks"
                );
                self.draining = true;
            }
            link_response::Msg::Heartbeat(_) | link_response::Msg::Welcome(_) => {}
        }
        None
    }

    fn expire(&mut self) {
        for (id, action) in self.pending.expire(Instant::now()) {
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
                            if !self.pending.insert(row, now) {
                                // Cannot happen: claims never exceed the free slots. The row
                                // keeps its lease and is re-claimed after it expires.
                                warn!("pending map full on claim");
                            }
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
            } => match result {
                Ok(true) => {
                    let attempts = self.pending.remove(&id).map(|e| e.attempt).unwrap_or(0);
                    info!(conversation_id = %id, attempts, outcome, "conversation settled");
                    metrics::counter!("listen_conversations_total", "status" => outcome)
                        .increment(1);
                    (self.on_settled)(&id);
                }
                Ok(false) => {
                    self.pending.remove(&id);
                    debug!(conversation_id = %id, "outcome not written: already settled or claimed by another instance");
                }
                Err(error) => {
                    warn!(conversation_id = %id, %error, "writing the outcome failed; will re-send");
                    self.pending
                        .unsettle(&id, Instant::now() + SETTLE_RETRY_DELAY);
                    self.last_error = error.to_string();
                }
            },
        }
    }

    fn renew_leases(&self) {
        let store = Arc::clone(&self.store);
        // The queued gauge rides on the same tick.
        let pending = self.pending.len() as u64;
        let counter = Arc::clone(&self.store);
        tokio::spawn(async move {
            if let Ok(processing) = counter.count_processing().await {
                metrics::gauge!("listen_link_queued")
                    .set(processing.saturating_sub(pending) as f64);
            }
        });
        let owner = self.config.instance_id.clone();
        let lease_ttl = self.config.lease_ttl.as_millis() as i64;
        tokio::spawn(async move {
            if let Err(error) = store.renew(&owner, now_ms() + lease_ttl).await {
                warn!(%error, "renewing leases failed");
            }
        });
    }

    async fn publish(&mut self) {
        let connected = matches!(self.state, LinkState::Connected { .. });
        self.publish_state(connected).await;
        metrics::gauge!("listen_link_state").set(self.state.to_wire() as i32 as f64);
        metrics::gauge!("listen_link_up").set(if connected { 1.0 } else { 0.0 });
        metrics::gauge!("listen_link_pending").set(self.pending.len() as f64);
        let snapshot = LinkSnapshot {
            state: self.state.to_wire(),
            pending: self.pending.len(),
            reconnects: self.reconnects,
            consecutive_failures: self.consecutive_failures,
            last_error: self.last_error.clone(),
            acks_ignored: self.acks_ignored,
            transcripts_dropped: 0, // filled in by LinkHandle::snapshot
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

/// Pusher's processed outcome in listen's terms.
fn completion_of(processed: shared::proto::pusher::v1::Processed) -> Completion {
    use shared::proto::listen::v1 as api;
    let s = processed.structured.unwrap_or_default();
    Completion {
        structured: api::Structured {
            title: s.title,
            overview: s.overview,
            action_items: s.action_items,
            category: s.category,
        },
        discarded: processed.discarded,
        deliveries: processed
            .deliveries
            .into_iter()
            .map(|d| api::WebhookDelivery {
                url: d.url,
                delivered: d.delivered,
                attempts: d.attempts,
                status_code: d.status_code,
                error: d.error,
            })
            .collect(),
    }
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
