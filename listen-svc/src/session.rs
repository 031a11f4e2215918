//! Live sessions: `listen.v1.Listen/Session`.
//!
//! A session starts with `Start`, then streams `Segments`; each `Segments` message is
//! committed to the store before the next message is read, and acknowledged with
//! `SegmentsStored`. The current conversation finishes on `Finish`, after
//! `conversation_timeout_s` of silence, or, once the session is gone, at its deadline (by a
//! sweeper, on any instance) unless a new session for the same uid resumes it first.
//!
//! [`Sessions`] bounds the number of open sessions (`--max-sessions`; beyond it a new
//! session gets RESOURCE_EXHAUSTED) and routes each processed or failed outcome to the
//! session that finished the conversation, if it is still connected. Each session's event
//! buffer holds `EVENT_BUFFER` events: the session's own events wait for the client to read;
//! a routed outcome that finds the buffer full is dropped (it stays readable with
//! GetConversation).

use crate::auth::Caller;
use crate::error::{ApiError, reject};
use crate::link::LinkHandle;
use crate::store::{ConversationStore, NewLive, Status as Lifecycle, now_ms};
use crate::validate::{Limits, MAX_ID_BYTES, validate_language, validate_segments, validate_text};
use crate::wire::{to_proto, transcript_batch};
use shared::proto::listen::v1::{
    ConversationDiscarded, ConversationFailed, ConversationProcessed, ConversationStarted,
    ProcessingStarted, SegmentsStored, SessionEvent, SessionRequest, SessionStarted, Start,
    session_event::Event, session_request::Msg,
};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

/// Events buffered per session.
pub(crate) const EVENT_BUFFER: usize = 64;
const DEFAULT_TIMEOUT_S: u32 = 120;
const MAX_TIMEOUT_S: u32 = 3600;
/// Time a client has to send Start after opening the stream.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) type EventTx = mpsc::Sender<Result<SessionEvent, Status>>;

/// Open sessions and the conversations they are waiting on.
pub(crate) struct Sessions {
    max_sessions: usize,
    max_per_uid: usize,
    store: Arc<dyn ConversationStore>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    open: usize,
    /// Open sessions per uid (entries removed at zero, so bounded by `open`).
    per_uid: HashMap<String, usize>,
    waiting: HashMap<String, EventTx>,
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
    pub(crate) fn new(
        max_sessions: usize,
        max_per_uid: usize,
        store: Arc<dyn ConversationStore>,
    ) -> Arc<Self> {
        Arc::new(Sessions {
            max_sessions,
            max_per_uid,
            store,
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

    fn wait_for(&self, conversation_id: &str, tx: &EventTx) {
        self.lock()
            .waiting
            .insert(conversation_id.to_string(), tx.clone());
    }

    fn forget(&self, conversation_ids: &HashSet<String>) {
        let mut state = self.lock();
        for id in conversation_ids {
            state.waiting.remove(id);
        }
    }

    /// The link settled `conversation_id`: tell the session waiting for it, if any. Never
    /// waits (called from the link).
    pub(crate) fn settled(self: &Arc<Self>, conversation_id: &str) {
        let Some(tx) = self.lock().waiting.remove(conversation_id) else {
            return;
        };
        let store = Arc::clone(&self.store);
        let id = conversation_id.to_string();
        tokio::spawn(async move {
            let event = match store.get(&id).await {
                Ok(Some(c)) if c.status == Lifecycle::Completed => {
                    Event::ConversationProcessed(ConversationProcessed {
                        conversation: Some(to_proto(c)),
                    })
                }
                Ok(Some(c)) if c.status == Lifecycle::Failed => {
                    Event::ConversationFailed(ConversationFailed {
                        conversation_id: id.clone(),
                        reason: c.last_error.unwrap_or_default(),
                    })
                }
                Ok(_) => return,
                Err(error) => {
                    debug!(conversation_id = %id, %error, "cannot read the outcome for its session");
                    return;
                }
            };
            if tx
                .try_send(Ok(SessionEvent { event: Some(event) }))
                .is_err()
            {
                debug!(conversation_id = %id, "session gone or not reading; outcome not pushed");
            }
        });
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
    pub shutdown: watch::Receiver<bool>,
}

/// The conversation a session is feeding.
struct Current {
    id: String,
    segments: usize,
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
    let end = session.serve(&mut inbound).await;
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
        let resumable = match ctx.store.find_resumable(&uid, now_ms()).await {
            Ok(resumable) => resumable,
            Err(error) => return Err((tx, error.into())),
        };
        let session_id = uuid::Uuid::now_v7().to_string();
        let current = resumable.map(|r| Current {
            deadline: Instant::now()
                + Duration::from_millis(r.deadline_ms.saturating_sub(now_ms()).max(0) as u64),
            segments: r.segment_count as usize,
            id: r.id,
        });
        info!(%session_id, %uid, resumed = current.as_ref().map(|c| c.id.as_str()), "session started");
        let session = Session {
            ctx,
            tx,
            session_id: session_id.clone(),
            uid,
            language: start.language,
            timeout,
            current,
            watched: HashSet::new(),
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

    async fn serve(&mut self, inbound: &mut Streaming<SessionRequest>) -> Result<(), ApiError> {
        let mut shutdown = self.ctx.shutdown.clone();
        loop {
            let deadline = self.current.as_ref().map(|c| c.deadline);
            let message = tokio::select! {
                message = inbound.message() => message,
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    debug!(uid = %self.uid, "silence timeout");
                    self.finish().await?;
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
                })) => self.finish().await?,
                Ok(Some(SessionRequest {
                    msg: Some(Msg::Start(_)),
                })) => {
                    return Err(ApiError::OutOfOrder {
                        field: "start",
                        reason: "a session is started once; open a new stream",
                    });
                }
                Ok(Some(SessionRequest { msg: None })) => {}
                // The client is gone: the conversation stays IN_PROGRESS until its deadline.
                Ok(None) | Err(_) => return Ok(()),
            }
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
        for _ in 0..2 {
            if self.current.is_none() {
                let id = uuid::Uuid::now_v7().to_string();
                let new = NewLive {
                    id: id.clone(),
                    uid: self.uid.clone(),
                    language: self.language.clone(),
                    timeout_ms: self.timeout.as_millis() as i64,
                    now_ms: now_ms(),
                };
                self.ctx.store.start_conversation(new).await?;
                self.current = Some(Current {
                    id: id.clone(),
                    segments: 0,
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
                .append_segments(&current.id, segments.clone(), now_ms())
                .await?;
            match stored {
                Some(total) => {
                    current.segments = total as usize;
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

    async fn finish(&mut self) -> Result<(), ApiError> {
        let Some(current) = self.current.take() else {
            return Ok(());
        };
        let id = current.id;
        let finished = self.ctx.store.finish(&id, now_ms()).await?;
        match finished {
            Some(Lifecycle::Processing) => {
                self.ctx.sessions.wait_for(&id, &self.tx);
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
