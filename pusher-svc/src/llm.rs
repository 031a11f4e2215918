//! An OpenAI-compatible chat-completions structurer.
//!
//! POSTs `{url}/chat/completions` with a prompt asking for one JSON object (`title`,
//! `overview`, `action_items`, `category`, `discard`) and parses the answer strictly (serde,
//! unknown keys rejected). Failures are typed for listen:
//! - 429, 408, 5xx, timeouts and connection errors are retried here with backoff up to
//!   `max_attempts`, then reported **retryable** (listen sends the conversation again later);
//! - output that is not the expected JSON is retried the same way (models are not
//!   deterministic), then reported retryable;
//! - other 4xx (bad key, unknown model) and answers that are not chat completions at all are
//!   **permanent**: configuration errors that no retry fixes.

use crate::processor::{ProcessError, Structure, Structurer};
use serde::{Deserialize, Serialize};
use shared::backoff::Backoff;
use shared::proto::pusher::v1::{ProcessConversation, Structured};
use shared::telemetry::TraceContext;
use std::time::Duration;
use tracing::{Instrument, debug, info_span, warn};

const RETRY: Backoff = Backoff {
    initial: Duration::from_millis(500),
    multiplier: 2.0,
    jitter: 0.2,
    max: Duration::from_secs(10),
};

pub(crate) const CATEGORIES: &[&str] = &[
    "work",
    "finance",
    "health",
    "travel",
    "education",
    "family",
    "shopping",
    "other",
];

const SYSTEM_PROMPT: &str = "You structure conversation transcripts. Reply with one JSON object and \
nothing else, with exactly these keys: \"title\" (string, at most 8 words), \"overview\" \
(string, one to three sentences), \"action_items\" (array of strings: commitments and tasks \
stated in the conversation, possibly empty), \"category\" (one of: work, finance, health, \
travel, education, family, shopping, other), \"discard\" (boolean: true when the transcript \
is empty, noise, or has no meaningful content).";

#[derive(Clone, Debug)]
pub(crate) struct LlmConfig {
    /// Base URL, e.g. https://api.openai.com/v1; `/chat/completions` is appended.
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub timeout: Duration,
    pub max_attempts: u32,
}

pub(crate) struct Llm {
    client: reqwest::Client,
    endpoint: String,
    config: LlmConfig,
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: [ChatMessage<'a>; 2],
    temperature: f32,
    response_format: ResponseFormat,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    content: Option<String>,
}

/// What the model must answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Output {
    title: String,
    overview: String,
    action_items: Vec<String>,
    category: String,
    discard: bool,
}

enum Failure {
    Retryable(String),
    Permanent(String),
}

impl Llm {
    pub(crate) fn new(config: LlmConfig, client: reqwest::Client) -> Self {
        let endpoint = format!("{}/chat/completions", config.url.trim_end_matches('/'));
        Llm {
            client,
            endpoint,
            config,
        }
    }

    async fn call(&self, transcript: &str) -> Result<String, Failure> {
        let body = ChatRequest {
            model: &self.config.model,
            messages: [
                ChatMessage {
                    role: "system",
                    content: SYSTEM_PROMPT,
                },
                ChatMessage {
                    role: "user",
                    content: transcript,
                },
            ],
            temperature: 0.0,
            response_format: ResponseFormat {
                kind: "json_object",
            },
        };
        let mut post = self
            .client
            .post(&self.endpoint)
            .timeout(self.config.timeout)
            .json(&body);
        if let Some(key) = &self.config.api_key {
            post = post.bearer_auth(key);
        }
        for (name, value) in TraceContext::of(&tracing::Span::current()).headers() {
            post = post.header(name, value);
        }
        let response = post.send().await.map_err(|e| {
            let what = if e.is_timeout() {
                format!("timed out after {:?}", self.config.timeout)
            } else {
                e.to_string()
            };
            Failure::Retryable(format!("LLM request failed: {what}"))
        })?;
        let status = response.status().as_u16();
        if status == 408 || status == 429 || status >= 500 {
            return Err(Failure::Retryable(format!("LLM answered HTTP {status}")));
        }
        if !(200..300).contains(&status) {
            let detail = response.text().await.unwrap_or_default();
            let detail: String = detail.chars().take(200).collect();
            return Err(Failure::Permanent(format!(
                "LLM rejected the request: HTTP {status}: {detail}"
            )));
        }
        let chat: ChatResponse = response
            .json()
            .await
            .map_err(|e| Failure::Permanent(format!("LLM answer is not a chat completion: {e}")))?;
        chat.choices
            .into_iter()
            .next()
            .and_then(|c| c.message.content)
            .ok_or_else(|| Failure::Retryable("LLM answer has no message content".into()))
    }
}

/// Parses and checks the model's JSON.
fn parse(content: &str) -> Result<Structure, String> {
    let output: Output = serde_json::from_str(content.trim())
        .map_err(|e| format!("LLM output is not the expected JSON: {e}"))?;
    if !CATEGORIES.contains(&output.category.as_str()) {
        return Err(format!(
            "LLM output has an unknown category {:?}",
            output.category
        ));
    }
    if !output.discard && output.title.trim().is_empty() {
        return Err("LLM output has an empty title".into());
    }
    Ok(Structure {
        structured: Structured {
            title: output.title.chars().take(200).collect(),
            overview: output.overview,
            action_items: output.action_items.into_iter().take(50).collect(),
            category: output.category,
        },
        discard: output.discard,
    })
}

fn transcript(request: &ProcessConversation) -> String {
    request
        .segments
        .iter()
        .map(|s| {
            format!(
                "{}: {}",
                if s.speaker.is_empty() {
                    "SPEAKER"
                } else {
                    &s.speaker
                },
                s.text
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[async_trait::async_trait]
impl Structurer for Llm {
    async fn structure(&self, request: &ProcessConversation) -> Result<Structure, ProcessError> {
        let transcript = transcript(request);
        let mut last = String::new();
        for attempt in 1..=self.config.max_attempts.max(1) {
            let span = info_span!(
                "llm.call",
                otel.kind = "client",
                gen_ai.request.model = %self.config.model,
                attempt,
            );
            match self.call(&transcript).instrument(span).await {
                Ok(content) => match parse(&content) {
                    Ok(structure) => return Ok(structure),
                    Err(reason) => last = reason,
                },
                Err(Failure::Permanent(reason)) => {
                    warn!(%reason, "LLM structuring failed permanently");
                    return Err(ProcessError {
                        reason,
                        retryable: false,
                    });
                }
                Err(Failure::Retryable(reason)) => last = reason,
            }
            debug!(attempt, reason = %last, "LLM attempt failed");
            if attempt < self.config.max_attempts {
                tokio::time::sleep(RETRY.delay(attempt)).await;
            }
        }
        Err(ProcessError::retryable(format!(
            "{last} (after {} attempts)",
            self.config.max_attempts.max(1)
        )))
    }
}

#[cfg(test)]
mod tests;
