//! The load: Submits (some retried with the same idempotency key) and live Sessions
//! (segments, Finish, half-close, disconnects, resumes) spread over the listens. Every
//! acknowledgement is recorded as ground truth for the checker: a Submit's answer, a
//! Session's `segments_stored`. Every call has a deadline, so a frozen or partitioned listen
//! slows a driver down but never stops it.

use super::cluster::Cluster;
use super::schedule::Rng;
use crate::listen::{
    Finish, Priority, Segments, SessionRequest, Start, SubmitConversationRequest,
    session_event::Event, session_request::Msg,
};
use crate::{ListenClient, segment};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Deadline of each call and of each awaited session event.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a half-closed session is read before the driver gives up on it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts of one Submit (the same idempotency key each time).
const SUBMIT_ATTEMPTS: usize = 4;

/// What the system acknowledged about one conversation.
#[derive(Clone, Debug)]
pub struct Expected {
    /// Segment texts acknowledged, in the order they were sent.
    pub texts: Vec<String>,
    /// A Submit: the stored segments are exactly `texts`. A Session: `texts` are among them,
    /// in order (a send whose acknowledgement was lost may be stored too).
    pub exact: bool,
    /// The first acknowledgement.
    pub acked_at: Instant,
}

/// Ground truth, and what the drivers saw go wrong on the spot.
#[derive(Default)]
pub struct Truth {
    pub conversations: Mutex<HashMap<String, Expected>>,
    pub violations: Mutex<Vec<String>>,
    /// Submits acknowledged.
    pub submits: AtomicU64,
    /// Submits answered again for the same key (the same conversation, or a violation).
    pub submit_retries: AtomicU64,
    /// Sessions opened.
    pub sessions: AtomicU64,
}

impl Truth {
    fn acked(&self, id: &str, texts: Vec<String>, exact: bool) {
        let mut conversations = self.conversations.lock().unwrap();
        let entry = conversations
            .entry(id.to_string())
            .or_insert_with(|| Expected {
                texts: Vec::new(),
                exact,
                acked_at: Instant::now(),
            });
        entry.texts.extend(texts);
    }

    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }
}

/// Submits until `stop`, from driver `task`.
pub async fn submitter(
    cluster: Arc<Cluster>,
    truth: Arc<Truth>,
    task: u64,
    seed: u64,
    stop: watch::Receiver<bool>,
) {
    let mut rng = Rng::new(seed ^ (task << 32) ^ 0x5b);
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let texts: Vec<String> = (0..1 + rng.below(4))
            .map(|j| format!("Submit {task}-{n}, part {j}: I will send the report by Friday."))
            .collect();
        let request = SubmitConversationRequest {
            uid: format!("submit{task}-{}", n % 8),
            idempotency_key: format!("key-{task}-{n}"),
            language: "en".into(),
            segments: texts
                .iter()
                .enumerate()
                .map(|(j, text)| segment(text, 4.0 * j as f64))
                .collect(),
            // One in four is bulk, so both priorities' queues are claimed from under faults.
            priority: if rng.chance(0.25) {
                Priority::Bulk
            } else {
                Priority::Interactive
            } as i32,
        };
        let mut acked: Option<String> = None;
        let mut again_after_ack = rng.chance(0.2);
        for _ in 0..SUBMIT_ATTEMPTS {
            let mut client = cluster.client(rng.below(cluster.listen_addrs.len() as u64) as usize);
            let answer =
                tokio::time::timeout(CALL_TIMEOUT, client.submit_conversation(request.clone()))
                    .await;
            match answer {
                Ok(Ok(response)) => {
                    let id = response.into_inner().conversation_id;
                    match &acked {
                        None => {
                            truth.acked(&id, texts.clone(), true);
                            truth.submits.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(first) if *first != id => truth.violation(format!(
                            "idempotency key {}: first answered {first}, then {id}",
                            request.idempotency_key
                        )),
                        Some(_) => {
                            truth.submit_retries.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    acked.get_or_insert(id);
                    if !std::mem::take(&mut again_after_ack) {
                        break;
                    }
                }
                // Not acknowledged: try again with the same key after a client's backoff.
                _ => {
                    tokio::time::sleep(
                        rng.between(Duration::from_millis(200), Duration::from_secs(1)),
                    )
                    .await
                }
            }
        }
        tokio::time::sleep(rng.between(Duration::from_millis(50), Duration::from_millis(300)))
            .await;
    }
}

/// How a session ends.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// Finish, then half-close and read the outcome.
    Finish,
    /// Half-close at once: the conversation ends by silence; the outcome is read.
    HalfClose,
    /// Drop the call (a client gone); the next session of the uid may resume.
    Disconnect,
}

/// Live sessions until `stop`, from driver `task`.
pub async fn sessions(
    cluster: Arc<Cluster>,
    truth: Arc<Truth>,
    task: u64,
    seed: u64,
    stop: watch::Receiver<bool>,
) {
    let mut rng = Rng::new(seed ^ (task << 32) ^ 0x5e55);
    let (mut n, mut resume) = (0u64, false);
    while !*stop.borrow() {
        if !resume {
            n += 1;
        }
        let uid = format!("live{task}-{n}");
        let client = cluster.client(rng.below(cluster.listen_addrs.len() as u64) as usize);
        truth.sessions.fetch_add(1, Ordering::Relaxed);
        resume = match one_session(client, &truth, &uid, &mut rng).await {
            Some(Ending::Disconnect) => rng.chance(0.5),
            _ => false,
        };
        tokio::time::sleep(rng.between(Duration::from_millis(50), Duration::from_millis(300)))
            .await;
    }
}

/// One session of `uid`; how it ended, or None if a fault ended it first.
async fn one_session(
    mut client: ListenClient,
    truth: &Truth,
    uid: &str,
    rng: &mut Rng,
) -> Option<Ending> {
    let (tx, rx) = mpsc::channel(8);
    let send = |msg| {
        let tx = tx.clone();
        async move { tx.send(SessionRequest { msg: Some(msg) }).await.ok() }
    };
    send(Msg::Start(Start {
        uid: uid.to_string(),
        language: "en".into(),
        conversation_timeout_s: 1 + rng.below(3) as u32,
    }))
    .await?;
    let mut events = tokio::time::timeout(CALL_TIMEOUT, client.session(ReceiverStream::new(rx)))
        .await
        .ok()?
        .ok()?
        .into_inner();
    let mut next = async || -> Option<Event> {
        tokio::time::timeout(CALL_TIMEOUT, events.message())
            .await
            .ok()?
            .ok()??
            .event
    };
    while !matches!(next().await?, Event::SessionStarted(_)) {}
    let messages = 1 + rng.below(4);
    for m in 0..messages {
        let texts: Vec<String> = (0..1 + rng.below(2))
            .map(|j| format!("Live {uid}, message {m}.{j}: {}.", rng.next_u64() % 100_000))
            .collect();
        let segments = texts
            .iter()
            .enumerate()
            .map(|(j, t)| segment(t, j as f64))
            .collect();
        send(Msg::Segments(Segments { segments })).await?;
        loop {
            if let Event::SegmentsStored(stored) = next().await? {
                truth.acked(&stored.conversation_id, texts, false);
                break;
            }
        }
        if rng.chance(0.3) {
            tokio::time::sleep(
                rng.between(Duration::from_millis(100), Duration::from_millis(1500)),
            )
            .await;
        }
    }
    let ending = *rng.pick(&[Ending::Finish, Ending::HalfClose, Ending::Disconnect]);
    match ending {
        Ending::Disconnect => return Some(ending),
        Ending::Finish => send(Msg::Finish(Finish {})).await?,
        Ending::HalfClose => {}
    }
    drop(tx);
    // Read the outcomes until listen ends the call (bounded).
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Ok(Some(_)) = events.message().await {}
    })
    .await;
    drained.ok().map(|_| ending)
}
