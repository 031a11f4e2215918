//! Live sessions: `listen.v1.Listen/Session`.
//!
//! A session starts with `Start`, then streams `Segments`; each `Segments` message is
//! committed to the store before the next message is read, and acknowledged with
//! `SegmentsStored`. The current conversation finishes on `Finish`, after
//! `conversation_timeout_s` of silence, or, once the session is gone, at its deadline (by a
//! sweeper, on any instance) unless a new session for the same uid resumes it first.
//!
//! A `Finish` (or a half-close) beyond the queue bounds (`--max-queued*`) ends the session
//! with RESOURCE_EXHAUSTED and RetryInfo, leaving the conversation IN_PROGRESS for a new
//! session to resume; a finish by silence is queued whatever the bounds.
//!
//! When the client half-closes, the conversation still IN_PROGRESS is finished as if `Finish`
//! had been sent, and the stream stays open until every conversation the session finished
//! has had its outcome event (processed, failed or discarded), or `--session-linger` has
//! passed; then it ends with OK. A client that cancels instead leaves its conversation to
//! the deadline.
//!
//! [`Sessions`] bounds the number of open sessions (`--max-sessions`; beyond it a new
//! session gets RESOURCE_EXHAUSTED) and tells the session that finished a conversation when
//! the link settles it, if that session is still connected. The session then reads the
//! outcome and sends it. Each session's event buffer holds `EVENT_BUFFER` events and its
//! events wait for the client to read. Its queue of settled ids holds `OUTCOME_BUFFER`; an id
//! that finds it full is dropped. The outcome stays readable with GetConversation, and a
//! lingering session finds it by reading the store again every `RECHECK_INTERVAL`.

use crate::auth::Caller;
use crate::error::{ApiError, reject};
use crate::link::LinkHandle;
use crate::store::{Admission, ConversationStore, NewLive, Now, QueueBounds, Status as Lifecycle};
use crate::validate::{
    Limits, MAX_ID_BYTES, validate_conversation_bytes, validate_language, validate_segments,
    validate_text,
};
use crate::wire::{View, to_proto_in, transcript_batch};
use shared::proto::listen::v1::{
    ConversationDiscarded, ConversationFailed, ConversationProcessed, ConversationStarted,
    ProcessingStarted, SegmentsStored, SessionEvent, SessionRequest, SessionStarted, Start,
    session_event::Event, session_request::Msg,
};
use shared::telemetry::TraceContext;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tonic::{Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

/// Events buffered per session.
pub(crate) const EVENT_BUFFER: usize = 64;
/// Settled conversation ids queued for a session to report.
const OUTCOME_BUFFER: usize = 64;
/// While a half-closed session lingers, how often it reads the store for outcomes whose
/// notice it may have missed.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_TIMEOUT_S: u32 = 120;
const MAX_TIMEOUT_S: u32 = 3600;
/// After the request stream ends, how long to watch for the response stream being dropped
/// too (a cancel, not a half-close). The drop follows the reset within the same process, so
/// this is slack for a busy scheduler, not a network round trip.
const CANCEL_SETTLE: Duration = Duration::from_millis(100);
/// Time a client has to send Start after opening the stream.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) type EventTx = mpsc::Sender<Result<SessionEvent, Status>>;
/// Where the registry tells a session that one of its conversations settled.
type OutcomeTx = mpsc::Sender<String>;

/// Open sessions and the conversations they are waiting on.
pub(crate) struct Sessions {
    max_sessions: usize,
    max_per_uid: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    open: usize,
    /// Open sessions per uid (entries removed at zero, so bounded by `open`).
    per_uid: HashMap<String, usize>,
    /// Settled-conversation notices, by conversation id (entries removed when routed or when
    /// their session ends, so bounded by the conversations open sessions finished).
    waiting: HashMap<String, OutcomeTx>,
}

/// Holds one of a uid's session slots; frees it when dropped.
struct UidSlot {
    sessions: Arc<Sessions>,
    uid: String,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut state = self.sessions.lock();
        if let Some(open) = state.per_uid.get_mut(&self.uid) {
            *open -= 1;
            if *open == 0 {
                state.per_uid.remove(&self.uid);
            }
        }
    }
}

/// Holds a session slot; frees it when dropped.
pub(crate) struct Slot(Arc<Sessions>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.open -= 1;
        metrics::gauge!("listen_sessions_open").set(state.open as f64);
    }
}

impl Sessions {
    pub(crate) fn new(max_sessions: usize, max_per_uid: usize) -> Arc<Self> {
        Arc::new(Sessions {
            max_sessions,
            max_per_uid,
            state: Mutex::default(),
        })
    }

    /// Counts a session against its uid, or RESOURCE_EXHAUSTED beyond `--max-sessions-per-uid`.
    fn enter_uid(self: &Arc<Self>, uid: &str) -> Result<UidSlot, ApiError> {
        let mut state = self.lock();
        let open = state.per_uid.entry(uid.to_string()).or_default();
        if *open >= self.max_per_uid {
            return Err(ApiError::Exhausted(format!(
                "start.uid: {uid} already has {} open sessions, the limit (--max-sessions-per-uid)",
                self.max_per_uid
            )));
        }
        *open += 1;
        Ok(UidSlot {
            sessions: Arc::clone(self),
            uid: uid.to_string(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a session slot, or RESOURCE_EXHAUSTED when all are taken.
    pub(crate) fn enter(self: &Arc<Self>) -> Result<Slot, ApiError> {
        let mut state = self.lock();
        if state.open >= self.max_sessions {
            warn!(
                max_sessions = self.max_sessions,
                "session refused: at --max-sessions"
            );
            return Err(ApiError::Exhausted(format!(
                "listen has {} open sessions, its limit (--max-sessions); retry later",
                self.max_sessions
            )));
        }
        state.open += 1;
        metrics::gauge!("listen_sessions_open").set(state.open as f64);
        Ok(Slot(Arc::clone(self)))
    }

    fn wait_for(&self, conversation_id: &str, tx: &OutcomeTx) {
        self.lock()
            .waiting
            .insert(conversation_id.to_string(), tx.clone());
    }

    fn forget<'a>(&self, conversation_ids: impl IntoIterator<Item = &'a String>) {
        let mut state = self.lock();
        for id in conversation_ids {
            state.waiting.remove(id);
        }
    }

    /// The link settled `conversation_id`: tell the session waiting for it, if any. Never
    /// waits (called from the link); a session whose notices are full misses this one.
    pub(crate) fn settled(&self, conversation_id: &str) {
        let Some(tx) = self.lock().waiting.remove(conversation_id) else {
            return;
        };
        if tx.try_send(conversation_id.to_string()).is_err() {
            debug!(%conversation_id, "session gone or not reading; outcome not pushed");
        }
    }
}

/// The event that tells a session how conversation `id` ended; `None` while it has not.
async fn outcome_event(store: &dyn ConversationStore, id: &str) -> Option<Event> {
    let conversation = match store.get(id).await {
        Ok(Some(conversation)) => conversation,
        Ok(None) => return None,
        Err(error) => {
            debug!(conversation_id = %id, %error, "cannot read the outcome for its session");
            return None;
        }
    };
    let id = id.to_string();
    match conversation.status {
        Lifecycle::Completed => Some(Event::ConversationProcessed(ConversationProcessed {
            // The client sent the segments; the event carries the rest (BASIC view).
            conversation: Some(to_proto_in(View::Basic, conversation)),
        })),
        Lifecycle::Failed => Some(Event::ConversationFailed(ConversationFailed {
            conversation_id: id,
            reason: conversation.last_error.unwrap_or_default(),
        })),
        Lifecycle::Discarded => Some(Event::ConversationDiscarded(ConversationDiscarded {
            conversation_id: id,
        })),
        Lifecycle::InProgress | Lifecycle::Processing => None,
    }
}

/// Everything a session needs.
#[derive(Clone)]
pub(crate) struct Context {
    pub store: Arc<dyn ConversationStore>,
    pub link: LinkHandle,
    pub sessions: Arc<Sessions>,
    pub limits: Limits,
    pub min_timeout: Duration,
    /// After a half-close, the longest the stream waits for outcomes (`--session-linger`).
    pub linger: Duration,
    pub shutdown: watch::Receiver<bool>,
    /// Bounds an explicit Finish (or a half-close) is held to (`--max-queued*`).
    pub queue_bounds: QueueBounds,
    /// The delay a refused Finish asks for (`--queue-retry-after`).
    pub queue_retry_after: Duration,
}

/// How a session's inbound side ended.
enum Inbound {
    /// The client half-closed: it sends nothing more but still reads.
    HalfClosed,
    /// The client cancelled or the connection broke.
    Gone,
}

/// The conversation a session is feeding.
struct Current {
    id: String,
    segments: usize,
    /// Encoded bytes of its segments so far.
    bytes: usize,
    deadline: Instant,
}

/// Runs one session until the client closes it, an error ends it, or listen shuts down.
pub(crate) async fn run(
    ctx: Context,
    caller: Caller,
    mut inbound: Streaming<SessionRequest>,
    tx: EventTx,
    _slot: Slot,
) {
    let start = match tokio::time::timeout(START_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(SessionRequest {
            msg: Some(Msg::Start(start)),
        }))) => start,
        Ok(Ok(Some(_))) => {
            return fail(
                &tx,
                ApiError::invalid("start", "the first message of a session must be start"),
            )
            .await;
        }
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            return fail(&tx, ApiError::TooSlow("no start message within 30 s")).await;
        }
    };
    let mut session = match Session::begin(ctx, &caller, start, tx).await {
        Ok(session) => session,
        Err((tx, error)) => return fail(&tx, error).await,
    };
    let (how, end) = match session.serve(&mut inbound).await {
        Ok(Inbound::HalfClosed) => ("half-closed", session.linger().await),
        Ok(Inbound::Gone) => ("cancelled or disconnected", Ok(())),
        Err(error) => ("refused", Err(error)),
    };
    info!(session_id = %session.session_id, uid = %session.uid, how, "session ended");
    session.ctx.sessions.forget(&session.watched);
    if let Err(error) = end {
        fail(&session.tx, error).await;
    }
}

/// Ends the session with `error`'s status.
async fn fail(tx: &EventTx, error: ApiError) {
    let _ = tx.send(Err(reject(error))).await;
}

struct Session {
    ctx: Context,
    tx: EventTx,
    session_id: String,
    uid: String,
    language: String,
    timeout: Duration,
    current: Option<Current>,
    /// Conversations this session finished and waits on for outcomes.
    watched: HashSet<String>,
    /// Notices of settled conversations (the registry holds clones of `notices`).
    notices: OutcomeTx,
    outcomes: mpsc::Receiver<String>,
    _uid_slot: UidSlot,
}

impl Session {
    async fn begin(
        ctx: Context,
        caller: &Caller,
        start: Start,
        tx: EventTx,
    ) -> Result<Session, (EventTx, ApiError)> {
        let checked = (|| {
            let uid = validate_text("start.uid", &start.uid, MAX_ID_BYTES)?.to_string();
            let timeout_s = match start.conversation_timeout_s {
                0 => DEFAULT_TIMEOUT_S,
                s => s,
            };
            let min = ctx.min_timeout.as_secs().max(1) as u32;
            if !(min..=MAX_TIMEOUT_S).contains(&timeout_s) {
                return Err(ApiError::invalid(
                    "start.conversation_timeout_s",
                    format!("{timeout_s} is outside {min}..={MAX_TIMEOUT_S} seconds"),
                ));
            }
            validate_language("start.language", &start.language)?;
            Ok((uid, Duration::from_secs(timeout_s.into())))
        })();
        let (uid, timeout) = match checked {
            Ok(ok) => ok,
            Err(error) => return Err((tx, error)),
        };
        if let Err(error) = caller.require("start.uid", &uid) {
            return Err((tx, error));
        }
        let uid_slot = match ctx.sessions.enter_uid(&uid) {
            Ok(slot) => slot,
            Err(error) => return Err((tx, error)),
        };
        let resumable = match ctx.store.find_resumable(&uid, Now::Store).await {
            Ok(resumable) => resumable,
            Err(error) => return Err((tx, error.into())),
        };
        let session_id = uuid::Uuid::now_v7().to_string();
        let current = resumable.map(|r| Current {
            deadline: Instant::now() + Duration::from_millis(r.remaining_ms.max(0) as u64),
            segments: r.segment_count as usize,
            bytes: r.segment_bytes.max(0) as usize,
            id: r.id,
        });
        info!(%session_id, %uid, resumed = current.as_ref().map(|c| c.id.as_str()), "session started");
        let (notices, outcomes) = mpsc::channel(OUTCOME_BUFFER);
        let session = Session {
            ctx,
            tx,
            session_id: session_id.clone(),
            uid,
            language: start.language,
            timeout,
            current,
            watched: HashSet::new(),
            notices,
            outcomes,
            _uid_slot: uid_slot,
        };
        let resumed_conversation_id = session
            .current
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default();
        session
            .send(Event::SessionStarted(SessionStarted {
                session_id,
                resumed_conversation_id,
            }))
            .await;
        Ok(session)
    }

    async fn serve(
        &mut self,
        inbound: &mut Streaming<SessionRequest>,
    ) -> Result<Inbound, ApiError> {
        let mut shutdown = self.ctx.shutdown.clone();
        loop {
            let deadline = self.current.as_ref().map(|c| c.deadline);
            let message = tokio::select! {
                message = inbound.message() => message,
                Some(id) = self.outcomes.recv() => {
                    self.report(&id).await;
                    continue;
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    debug!(uid = %self.uid, "silence timeout");
                    // Nobody asked: it is queued whatever the bounds.
                    self.finish(Admission::Always).await?;
                    continue;
                }
                () = stopping(&mut shutdown) => {
                    return Err(ApiError::ShuttingDown(
                        "listen is shutting down; reconnect with the same uid to resume the conversation",
                    ));
                }
            };
            match message {
                Ok(Some(SessionRequest {
                    msg: Some(Msg::Segments(batch)),
                })) => self.append(batch.segments).await?,
                Ok(Some(SessionRequest {
                    msg: Some(Msg::Finish(_)),
                })) => self.finish(self.bounded()).await?,
                Ok(Some(SessionRequest {
                    msg: Some(Msg::Start(_)),
                })) => {
                    return Err(ApiError::OutOfOrder {
                        field: "start",
                        reason: "a session is started once; open a new stream",
                    });
                }
                Ok(Some(SessionRequest { msg: None })) => {}
                Ok(None) => return Ok(self.half_closed_or_cancelled().await),
                // The client is gone: the conversation stays IN_PROGRESS until its deadline.
                Err(_) => return Ok(Inbound::Gone),
            }
        }
    }

    /// Tells a half-close from a cancel. tonic reports a client's cancel (RST_STREAM CANCEL:
    /// grpcio's `cancel()`, an expired deadline) as the end of the request stream, exactly
    /// like a half-close (tonic `codec/decode.rs`). The same reset also drops our response
    /// stream, so a client that cancelled stops reading at once, while one that half-closed
    /// still reads: wait briefly for the former.
    async fn half_closed_or_cancelled(&self) -> Inbound {
        match tokio::time::timeout(CANCEL_SETTLE, self.tx.closed()).await {
            Ok(()) => Inbound::Gone,
            Err(_) => Inbound::HalfClosed,
        }
    }

    /// After a half-close: finishes the current conversation, then waits until every
    /// conversation this session finished has had its outcome event, the linger time has
    /// passed, or the client stops reading.
    async fn linger(&mut self) -> Result<(), ApiError> {
        self.finish(self.bounded()).await?;
        let until = Instant::now() + self.ctx.linger;
        let mut shutdown = self.ctx.shutdown.clone();
        let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.watched.is_empty() {
            tokio::select! {
                Some(id) = self.outcomes.recv() => self.report(&id).await,
                _ = recheck.tick() => {
                    let watched: Vec<String> = self.watched.iter().cloned().collect();
                    for id in watched {
                        self.report(&id).await;
                    }
                }
                () = sleep_until(until) => {
                    debug!(uid = %self.uid, waiting = self.watched.len(), "session linger over");
                    break;
                }
                () = self.tx.closed() => break,
                () = stopping(&mut shutdown) => {
                    return Err(ApiError::ShuttingDown(
                        "listen is shutting down; outcomes stay readable with GetConversation",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sends conversation `id`'s outcome if it has one, and stops waiting for it.
    async fn report(&mut self, id: &str) {
        if !self.watched.contains(id) {
            return;
        }
        match outcome_event(self.ctx.store.as_ref(), id).await {
            Some(event) => {
                self.watched.remove(id);
                self.ctx.sessions.forget([&id.to_string()]);
                self.send(event).await;
            }
            // Not settled after all (or unreadable just now): wait for the next notice.
            None => self.ctx.sessions.wait_for(id, &self.notices),
        }
    }

    async fn append(
        &mut self,
        segments: Vec<shared::proto::listen::v1::Segment>,
    ) -> Result<(), ApiError> {
        if segments.is_empty() {
            return Ok(());
        }
        let already = self.current.as_ref().map_or(0, |c| c.segments);
        validate_segments("segments", &segments, self.ctx.limits, already)?;
        let already_bytes = self.current.as_ref().map_or(0, |c| c.bytes);
        let bytes =
            validate_conversation_bytes("segments", &segments, self.ctx.limits, already_bytes)?;
        for _ in 0..2 {
            if self.current.is_none() {
                let id = uuid::Uuid::now_v7().to_string();
                let new = NewLive {
                    id: id.clone(),
                    uid: self.uid.clone(),
                    language: self.language.clone(),
                    timeout_ms: self.timeout.as_millis() as i64,
                    now: Now::Store,
                    trace: TraceContext::of(&tracing::Span::current()),
                };
                self.ctx
                    .store
                    .start_conversation(new)
                    .instrument(info_span!("store.commit", db.operation = "start_conversation", conversation_id = %id))
                    .await?;
                self.current = Some(Current {
                    id: id.clone(),
                    segments: 0,
                    bytes: 0,
                    deadline: Instant::now() + self.timeout,
                });
                self.send(Event::ConversationStarted(ConversationStarted {
                    conversation_id: id,
                }))
                .await;
            }
            let Some(current) = self.current.as_mut() else {
                continue;
            };
            let stored = self
                .ctx
                .store
                .append_segments(&current.id, segments.clone(), Now::Store)
                .await?;
            match stored {
                Some(total) => {
                    current.segments = total as usize;
                    current.bytes = bytes;
                    current.deadline = Instant::now() + self.timeout;
                    self.ctx.link.forward_transcript(transcript_batch(
                        &self.session_id,
                        &self.uid,
                        &current.id,
                        &segments,
                    ));
                    let event = SegmentsStored {
                        conversation_id: current.id.clone(),
                        total_segments: total,
                    };
                    self.send(Event::SegmentsStored(event)).await;
                    return Ok(());
                }
                // Finished meanwhile (a sweeper after a long pause): start a new conversation.
                None => self.current = None,
            }
        }
        Err(ApiError::Internal("could not store segments"))
    }

    /// What a client's Finish is held to.
    fn bounded(&self) -> Admission {
        Admission::Bounded(self.ctx.queue_bounds)
    }

    /// Finishes the current conversation. Refused by `admission` (RESOURCE_EXHAUSTED, which
    /// ends the session), it stays IN_PROGRESS and current, for a new session to resume.
    async fn finish(&mut self, admission: Admission) -> Result<(), ApiError> {
        let Some(current) = self.current.as_ref() else {
            return Ok(());
        };
        let id = current.id.clone();
        let finished = self
            .ctx
            .store
            .finish(&id, Now::Store, admission)
            .await?
            .map_err(|full| ApiError::finish_refused(&id, full, self.ctx.queue_retry_after))?;
        self.current = None;
        match finished {
            Some(Lifecycle::Processing) => {
                self.ctx.sessions.wait_for(&id, &self.notices);
                self.watched.insert(id.clone());
                self.ctx.link.wake();
                self.send(Event::ProcessingStarted(ProcessingStarted {
                    conversation_id: id,
                }))
                .await;
            }
            Some(_) => {
                self.send(Event::ConversationDiscarded(ConversationDiscarded {
                    conversation_id: id,
                }))
                .await
            }
            // Already finished by a sweeper; its outcome is readable with GetConversation.
            None => {}
        }
        Ok(())
    }

    async fn send(&self, event: Event) {
        // Waits for the client to read (bounded buffer); a gone client is noticed on read.
        let _ = self.tx.send(Ok(SessionEvent { event: Some(event) })).await;
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone). Holds no `watch::Ref` across
/// an await, so the caller stays `Send`.
pub(crate) async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await.map(|_| ());
}

#[cfg(test)]
mod tests;
