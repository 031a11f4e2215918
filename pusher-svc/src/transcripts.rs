//! Realtime forwarding: live transcript batches from listen are POSTed, best-effort, to
//! every `--transcript-webhook`. One attempt each, with the webhook timeout; at most
//! `MAX_IN_FLIGHT` posts at once, and a batch that finds them all busy is dropped (and
//! counted). Nothing here is retried or acknowledged: the conversation itself travels the
//! durable path.

use serde::Serialize;
use shared::proto::pusher::v1::TranscriptBatch;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing::debug;

const MAX_IN_FLIGHT: usize = 64;

pub(crate) struct Forwarder {
    client: reqwest::Client,
    urls: Vec<String>,
    timeout: Duration,
    slots: Arc<Semaphore>,
    dropped: AtomicU64,
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
        for url in &self.urls {
            let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                metrics::counter!("pusher_transcripts_dropped_total").increment(1);
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                debug!(%url, dropped, "transcript forwarding saturated; batch dropped");
                continue;
            };
            let post = self
                .client
                .post(url)
                .timeout(self.timeout)
                .header("content-type", "application/json")
                .body(body.clone());
            let (url, forwarder) = (url.clone(), Arc::clone(self));
            tokio::spawn(async move {
                let _slot = slot;
                match post.send().await {
                    Ok(response) if response.status().is_success() => {}
                    Ok(response) => {
                        forwarder.dropped.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("pusher_transcripts_dropped_total").increment(1);
                        debug!(%url, status = response.status().as_u16(), "transcript webhook refused a batch");
                    }
                    Err(error) => {
                        forwarder.dropped.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("pusher_transcripts_dropped_total").increment(1);
                        debug!(%url, %error, "transcript webhook unreachable");
                    }
                }
            });
        }
    }
}
