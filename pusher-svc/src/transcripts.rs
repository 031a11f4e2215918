//! Realtime forwarding: live transcript batches from listen are POSTed, best-effort, to
//! every `--transcript-webhook`. One attempt each, with the webhook timeout. Per session and
//! webhook, batches are posted one after another, in the order they came (a queue with one
//! worker); different sessions and webhooks go in parallel. At most `MAX_IN_FLIGHT` batches
//! are queued or posting at once, and a batch that finds them all taken is dropped (and
//! counted). Nothing here is retried or acknowledged: the conversation itself travels the
//! durable path.

use serde::Serialize;
use shared::proto::pusher::v1::TranscriptBatch;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

const MAX_IN_FLIGHT: usize = 64;

pub(crate) struct Forwarder {
    client: reqwest::Client,
    urls: Vec<String>,
    timeout: Duration,
    slots: Arc<Semaphore>,
    dropped: AtomicU64,
    /// (session, webhook) -> batches waiting behind the one being posted. An entry exists
    /// while its worker runs; each batch holds one of `slots`.
    queues: Mutex<HashMap<(String, String), VecDeque<Queued>>>,
}

struct Queued {
    body: bytes::Bytes,
    _slot: OwnedSemaphorePermit,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session_id: &'a str,
    uid: &'a str,
    conversation_id: &'a str,
    segments: Vec<Segment<'a>>,
}

#[derive(Serialize)]
struct Segment<'a> {
    text: &'a str,
    speaker: &'a str,
    start: f64,
    end: f64,
    is_user: bool,
}

impl Forwarder {
    pub(crate) fn new(urls: Vec<String>, timeout: Duration, client: reqwest::Client) -> Arc<Self> {
        Arc::new(Forwarder {
            client,
            urls,
            timeout,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            dropped: AtomicU64::new(0),
            queues: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `batch` to every transcript webhook in the background. Never waits.
    pub(crate) fn forward(self: &Arc<Self>, batch: TranscriptBatch) {
        if self.urls.is_empty() {
            return;
        }
        let body = serde_json::to_vec(&Body {
            kind: "transcript.segments",
            session_id: &batch.session_id,
            uid: &batch.uid,
            conversation_id: &batch.conversation_id,
            segments: batch
                .segments
                .iter()
                .map(|s| Segment {
                    text: &s.text,
                    speaker: &s.speaker,
                    start: s.start,
                    end: s.end,
                    is_user: s.is_user,
                })
                .collect(),
        })
        .expect("serializing plain data cannot fail");
        let body = bytes::Bytes::from(body);
        for url in &self.urls {
            let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                self.drop_one();
                debug!(%url, "transcript forwarding saturated; batch dropped");
                continue;
            };
            let key = (batch.session_id.clone(), url.clone());
            let queued = Queued {
                body: body.clone(),
                _slot: slot,
            };
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(waiting) = queues.get_mut(&key) {
                // Its worker is posting an earlier batch of this session; this one follows.
                waiting.push_back(queued);
                continue;
            }
            queues.insert(key.clone(), VecDeque::new());
            drop(queues);
            tokio::spawn(Arc::clone(self).post_in_order(key, queued));
        }
    }

    /// Posts `first`, then whatever queued behind it for the same session and webhook, and
    /// removes the queue once it is empty.
    async fn post_in_order(self: Arc<Self>, key: (String, String), first: Queued) {
        let mut next = Some(first);
        while let Some(queued) = next {
            self.post(&key.1, queued.body.clone()).await;
            drop(queued);
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            next = queues.get_mut(&key).and_then(VecDeque::pop_front);
            if next.is_none() {
                queues.remove(&key);
            }
        }
    }

    async fn post(&self, url: &str, body: bytes::Bytes) {
        let sent = self
            .client
            .post(url)
            .timeout(self.timeout)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => {}
            Ok(response) => {
                self.drop_one();
                debug!(%url, status = response.status().as_u16(), "transcript webhook refused a batch");
            }
            Err(error) => {
                self.drop_one();
                debug!(%url, %error, "transcript webhook unreachable");
            }
        }
    }

    fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("pusher_transcripts_dropped_total").increment(1);
    }
}
