//! Webhooks: tells each configured endpoint about a processed conversation.
//!
//! Each delivery is an HTTP POST of a JSON `conversation.processed` event with:
//! - `Idempotency-Key: {conversation_id}:{revision}`: the revision is a hash of the
//!   conversation's content, so the key is the same for every re-send, on any replica, after
//!   any restart: a receiver can drop duplicates;
//! - `X-Listen-Timestamp: {unix seconds}` and, with a secret configured,
//!   `X-Listen-Signature: v1={hex HMAC-SHA256(secret, "{timestamp}.{body}")}`.
//!
//! Each attempt has a timeout; 5xx, 408, 429, timeouts and connection errors are retried with
//! jittered backoff up to `max_attempts`; other 4xx are not retried. At most `concurrency`
//! deliveries run per endpoint at once (waiting for a slot counts against the timeout). A
//! failed delivery never fails the conversation: its result is reported in the Ack.

use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use shared::backoff::Backoff;
use shared::proto::pusher::v1::{ProcessConversation, Structured, WebhookDelivery};
use shared::telemetry::TraceContext;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;
use tracing::{Instrument, Span, debug, field, info_span, warn};

const RETRY: Backoff = Backoff {
    initial: Duration::from_millis(200),
    multiplier: 2.0,
    jitter: 0.2,
    max: Duration::from_secs(5),
};

#[derive(Clone, Debug)]
pub(crate) struct WebhookConfig {
    pub urls: Vec<String>,
    pub secret: Option<String>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub concurrency: usize,
}

pub(crate) struct Webhooks {
    client: reqwest::Client,
    endpoints: Vec<Endpoint>,
    secret: Option<String>,
    timeout: Duration,
    max_attempts: u32,
}

struct Endpoint {
    url: String,
    /// `host:port` of the URL: the `endpoint` label of metrics and spans, so that no path,
    /// query or credential in a URL reaches them. Bounded by the configured URLs.
    name: String,
    slots: Arc<Semaphore>,
}

/// `host:port` of a webhook URL (the scheme's port when none is given).
pub(crate) fn endpoint_name(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or_default()
        ),
        Err(_) => "invalid".to_string(),
    }
}

/// The JSON body of a delivery.
#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    /// Stable per conversation content: `{conversation_id}:{revision}`.
    id: &'a str,
    conversation: ConversationBody<'a>,
    structured: StructuredBody<'a>,
}

#[derive(Serialize)]
struct ConversationBody<'a> {
    id: &'a str,
    uid: &'a str,
    language: &'a str,
    finished_at: Option<String>,
    segments: Vec<SegmentBody<'a>>,
}

#[derive(Serialize)]
struct SegmentBody<'a> {
    text: &'a str,
    speaker: &'a str,
    start: f64,
    end: f64,
    is_user: bool,
}

#[derive(Serialize)]
struct StructuredBody<'a> {
    title: &'a str,
    overview: &'a str,
    action_items: &'a [String],
    category: &'a str,
}

impl Webhooks {
    pub(crate) fn new(config: WebhookConfig, client: reqwest::Client) -> Self {
        Webhooks {
            endpoints: config
                .urls
                .into_iter()
                .map(|url| Endpoint {
                    name: endpoint_name(&url),
                    url,
                    slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
                })
                .collect(),
            client,
            secret: config.secret,
            timeout: config.timeout,
            max_attempts: config.max_attempts.max(1),
        }
    }

    /// Delivers to every endpoint concurrently; one result per endpoint, in configuration order.
    pub(crate) async fn deliver(
        &self,
        request: &ProcessConversation,
        structured: &Structured,
    ) -> Vec<WebhookDelivery> {
        if self.endpoints.is_empty() {
            return Vec::new();
        }
        let key = idempotency_key(request);
        let body = serde_json::to_vec(&Event {
            kind: "conversation.processed",
            id: &key,
            conversation: ConversationBody {
                id: &request.conversation_id,
                uid: &request.uid,
                language: &request.language,
                finished_at: request.finished_at.map(|t| rfc3339(t.seconds, t.nanos)),
                segments: request
                    .segments
                    .iter()
                    .map(|s| SegmentBody {
                        text: &s.text,
                        speaker: &s.speaker,
                        start: s.start,
                        end: s.end,
                        is_user: s.is_user,
                    })
                    .collect(),
            },
            structured: StructuredBody {
                title: &structured.title,
                overview: &structured.overview,
                action_items: &structured.action_items,
                category: &structured.category,
            },
        })
        .expect("serializing plain data cannot fail");
        let deliveries = self
            .endpoints
            .iter()
            .map(|endpoint| self.deliver_one(endpoint, &key, &body));
        futures_util::future::join_all(deliveries).await
    }

    async fn deliver_one(&self, endpoint: &Endpoint, key: &str, body: &[u8]) -> WebhookDelivery {
        let mut result = WebhookDelivery {
            url: endpoint.url.clone(),
            ..Default::default()
        };
        for attempt in 1..=self.max_attempts {
            result.attempts = attempt;
            metrics::counter!("pusher_webhook_attempts_total").increment(1);
            let span = info_span!(
                "webhook.attempt",
                otel.kind = "client",
                endpoint = %endpoint.name,
                attempt,
                http.request.method = "POST",
                http.response.status_code = field::Empty,
            );
            let started = Instant::now();
            let outcome = self
                .attempt(endpoint, key, body)
                .instrument(span.clone())
                .await;
            metrics::histogram!("pusher_webhook_request_duration_seconds", "endpoint" => endpoint.name.clone())
                .record(started.elapsed().as_secs_f64());
            if let Ok(status) = &outcome {
                span.record("http.response.status_code", status);
            }
            match outcome {
                Ok(status) if (200..300).contains(&status) => {
                    debug!(url = %endpoint.url, attempt, status, "webhook delivered");
                    result.delivered = true;
                    metrics::counter!("pusher_webhook_deliveries_total", "result" => "delivered")
                        .increment(1);
                    result.status_code = status.into();
                    result.error.clear();
                    return result;
                }
                Ok(status) => {
                    result.status_code = status.into();
                    result.error = format!("HTTP {status}");
                    if !(status >= 500 || status == 408 || status == 429) {
                        break; // the receiver refuses this request; repeating it will not help
                    }
                }
                Err(error) => result.error = error,
            }
            if attempt < self.max_attempts {
                tokio::time::sleep(RETRY.delay(attempt)).await;
            }
        }
        warn!(url = %endpoint.url, attempts = result.attempts, error = %result.error, "webhook gave up");
        metrics::counter!("pusher_webhook_deliveries_total", "result" => "gave_up").increment(1);
        result.error = format!(
            "gave up after {} attempts: {}",
            result.attempts, result.error
        );
        result
    }

    /// One POST within the timeout (waiting for an endpoint slot included).
    async fn attempt(&self, endpoint: &Endpoint, key: &str, body: &[u8]) -> Result<u16, String> {
        let work = async {
            let _slot = endpoint
                .slots
                .acquire()
                .await
                .map_err(|_| "endpoint closed".to_string())?;
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
                .to_string();
            let mut post = self
                .client
                .post(&endpoint.url)
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .header("x-listen-timestamp", &timestamp)
                .body(body.to_vec());
            for (name, value) in TraceContext::of(&Span::current()).headers() {
                post = post.header(name, value);
            }
            if let Some(secret) = &self.secret {
                post = post.header("x-listen-signature", signature(secret, &timestamp, body));
            }
            let response = post
                .send()
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            Ok(response.status().as_u16())
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {:?}", self.timeout)),
        }
    }
}

/// `{conversation_id}:{revision}`, the revision being the first 16 hex digits of SHA-256 over
/// the conversation's content. Attempt numbers and time play no part.
pub(crate) fn idempotency_key(request: &ProcessConversation) -> String {
    let mut hash = Sha256::new();
    for segment in &request.segments {
        hash.update(segment.text.as_bytes());
        hash.update([0]);
        hash.update(segment.speaker.as_bytes());
        hash.update([0]);
        hash.update(segment.start.to_be_bytes());
        hash.update(segment.end.to_be_bytes());
        hash.update([u8::from(segment.is_user)]);
    }
    let digest = hex::encode(hash.finalize());
    format!("{}:{}", request.conversation_id, &digest[..16])
}

/// `v1={hex HMAC-SHA256(secret, "{timestamp}.{body}")}`.
pub(crate) fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn rfc3339(seconds: i64, nanos: i32) -> String {
    prost_types::Timestamp { seconds, nanos }.to_string()
}

#[cfg(test)]
mod tests;
