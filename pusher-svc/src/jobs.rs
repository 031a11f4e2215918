//! The job registry: at most one job per conversation, a concurrency limit, a bounded
//! admission queue, and a bounded result cache.
//!
//! - A request for a conversation whose job is running **attaches** to it: every requester
//!   gets the Ack, each with its own attempt number.
//! - A request for a conversation processed recently is answered from the **result cache**
//!   ([`cache`]: at most `cache_size` entries, each kept for `cache_ttl`; oldest evicted
//!   first). Only successes are cached: a failure is worth trying again.
//! - At most `max_concurrency` jobs process at once (a semaphore of that many slots); up to
//!   `max_queued` more wait for a slot. Beyond that [`Jobs::submit`] answers
//!   [`Admission::Busy`] and does not take the request.
//! - Jobs do not belong to a stream: a dropped stream does not cancel them, and their result
//!   lands in the cache for the replay.
//! - While a job runs (or waits for a slot), every requester on a stream receives `Progress`
//!   each `progress_interval`.
//! - Each job event (started, attached, cached, busy, succeeded, failed) is a [`JobEvent`],
//!   counted once by [`JobStats::record`] in its field and its metric; every `Ack` is built by
//!   `Outcome::ack`.

mod cache;

use crate::processor::{ProcessError, Processor};
use cache::ResultCache;
use shared::proto::pusher::v1::{
    Ack, Failed, LinkResponse, ProcessConversation, Processed, Progress, ack, link_response,
};
use shared::telemetry::TraceContext;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{Instrument, debug, info_span, warn};

/// The outbound half of one Connect stream.
pub(crate) type StreamTx = mpsc::Sender<Result<LinkResponse, tonic::Status>>;

/// How long a finished job waits on a slow stream to take its Ack before giving up on it
/// (listen's ack deadline then re-sends, and the cache answers).
const ACK_SEND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub(crate) struct JobsConfig {
    pub max_concurrency: usize,
    pub max_queued: usize,
    pub cache_size: usize,
    pub cache_ttl: Duration,
    pub progress_interval: Duration,
    pub busy_retry_after: Duration,
}

/// Who is waiting for a job's outcome.
pub(crate) enum Requester {
    Stream {
        tx: StreamTx,
        attempt: u32,
    },
    Unary {
        tx: oneshot::Sender<Ack>,
        attempt: u32,
    },
}

impl Requester {
    fn attempt(&self) -> u32 {
        match self {
            Requester::Stream { attempt, .. } | Requester::Unary { attempt, .. } => *attempt,
        }
    }

    /// Delivers at once without waiting (cache hits, from the read loop).
    fn deliver_now(self, id: &str, outcome: Outcome) {
        let ack = outcome.ack(id, self.attempt());
        match self {
            Requester::Stream { tx, .. } => {
                if tx
                    .try_send(stream_message(link_response::Msg::Ack(ack)))
                    .is_err()
                {
                    // Listen re-sends when its ack deadline passes; the cache answers again.
                    debug!(conversation_id = %id, "stream full or closed; cached ack not delivered");
                }
            }
            Requester::Unary { tx, .. } => {
                let _ = tx.send(ack);
            }
        }
    }

    /// Delivers from a job task, waiting at most [`ACK_SEND_TIMEOUT`] for a slow stream.
    async fn deliver(self, id: &str, outcome: Outcome) {
        let ack = outcome.ack(id, self.attempt());
        match self {
            Requester::Stream { tx, .. } => {
                let message = stream_message(link_response::Msg::Ack(ack));
                match tokio::time::timeout(ACK_SEND_TIMEOUT, tx.send(message)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => debug!("stream closed before the ack; the result stays cached"),
                    Err(_) => warn!("stream did not take the ack in time; the result stays cached"),
                }
            }
            Requester::Unary { tx, .. } => {
                let _ = tx.send(ack);
            }
        }
    }
}

/// What happened to a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// A new job started for it.
    Started,
    /// It joined the job already running for the same conversation.
    Attached,
    /// Answered at once from the result cache.
    Cached,
    /// Not taken: too many jobs. Ask again after `retry_after`.
    Busy { retry_after: Duration },
}

/// One thing that happened to a request or a job, recorded by [`JobStats::record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JobEvent {
    Started,
    Attached,
    Cached,
    Busy,
    Succeeded,
    Failed,
}

/// Counters for tests and status; each mirrors a metric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct JobStats {
    pub started: u64,
    pub attached: u64,
    pub cached: u64,
    pub busy: u64,
    pub succeeded: u64,
    pub failed: u64,
}

impl JobStats {
    /// The one place a job event is counted: its field here and its metric.
    fn record(&mut self, event: JobEvent) {
        let (count, counter) = match event {
            JobEvent::Started => (
                &mut self.started,
                metrics::counter!("pusher_jobs_started_total"),
            ),
            JobEvent::Attached => (
                &mut self.attached,
                metrics::counter!("pusher_jobs_attached_total"),
            ),
            JobEvent::Cached => (
                &mut self.cached,
                metrics::counter!("pusher_jobs_cached_total"),
            ),
            JobEvent::Busy => (&mut self.busy, metrics::counter!("pusher_jobs_busy_total")),
            JobEvent::Succeeded => (
                &mut self.succeeded,
                metrics::counter!("pusher_jobs_total", "result" => "succeeded"),
            ),
            JobEvent::Failed => (
                &mut self.failed,
                metrics::counter!("pusher_jobs_total", "result" => "failed"),
            ),
        };
        *count += 1;
        counter.increment(1);
    }
}

pub(crate) struct Jobs {
    config: JobsConfig,
    processor: Arc<dyn Processor>,
    slots: Arc<Semaphore>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Who waits on each running (or queued) job; at most `max_concurrency + max_queued`.
    running: HashMap<String, Vec<Requester>>,
    cache: ResultCache,
    stats: JobStats,
}

impl State {
    /// Records `event` and publishes the running-jobs gauge, which follows `running`: change
    /// `running` first.
    fn record(&mut self, event: JobEvent) {
        self.stats.record(event);
        metrics::gauge!("pusher_jobs_running").set(self.running.len() as f64);
    }
}

impl Jobs {
    pub(crate) fn new(config: JobsConfig, processor: Arc<dyn Processor>) -> Arc<Self> {
        Arc::new(Jobs {
            slots: Arc::new(Semaphore::new(config.max_concurrency)),
            state: Mutex::new(State {
                cache: ResultCache::new(config.cache_size, config.cache_ttl),
                ..State::default()
            }),
            config,
            processor,
        })
    }

    #[cfg(test)]
    pub(crate) fn stats(&self) -> JobStats {
        self.lock().stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock is a bug elsewhere; the state itself stays valid.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits a request. Never waits: the caller is a stream's read loop.
    pub(crate) fn submit(
        self: &Arc<Self>,
        request: ProcessConversation,
        requester: Requester,
    ) -> Admission {
        let id = request.conversation_id.clone();
        let mut state = self.lock();
        if let Some(processed) = state.cache.get(&id, Instant::now()) {
            state.record(JobEvent::Cached);
            drop(state);
            requester.deliver_now(&id, Outcome::Processed(processed));
            return Admission::Cached;
        }
        if let Some(requesters) = state.running.get_mut(&id) {
            requesters.push(requester);
            state.record(JobEvent::Attached);
            return Admission::Attached;
        }
        if state.running.len() >= self.config.max_concurrency + self.config.max_queued {
            state.record(JobEvent::Busy);
            return Admission::Busy {
                retry_after: self.config.busy_retry_after,
            };
        }
        state.running.insert(id.clone(), vec![requester]);
        state.record(JobEvent::Started);
        drop(state);

        let span = info_span!(
            "job",
            otel.name = "pusher.job",
            otel.kind = "consumer",
            conversation_id = %id,
            attempt = request.attempt,
        );
        TraceContext::new(
            Some(request.traceparent.clone()),
            Some(request.tracestate.clone()),
        )
        .continue_in(&span);
        tokio::spawn(Arc::clone(self).run(request).instrument(span));
        Admission::Started
    }

    async fn run(self: Arc<Self>, request: ProcessConversation) {
        let id = request.conversation_id.clone();
        let started = Instant::now();
        let work = async {
            // The semaphore is never closed, so acquire only fails if it were; treat as retryable.
            let Ok(_slot) = self.slots.acquire().await else {
                return Err(ProcessError::retryable("pusher is shutting down"));
            };
            self.processor.process(&request).await
        };
        tokio::pin!(work);
        let mut progress = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.progress_interval,
            self.config.progress_interval,
        );
        let result = loop {
            tokio::select! {
                result = &mut work => break result,
                _ = progress.tick() => self.send_progress(&id),
            }
        };

        let outcome = match result {
            Ok(processed) => Outcome::Processed(processed),
            Err(error) => Outcome::Failed(error),
        };
        let requesters = {
            let mut state = self.lock();
            let requesters = state.running.remove(&id).unwrap_or_default();
            if let Outcome::Processed(processed) = &outcome {
                state
                    .cache
                    .insert(id.clone(), processed.clone(), Instant::now());
            }
            state.record(outcome.event());
            requesters
        };
        metrics::histogram!("pusher_processing_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match &outcome {
            Outcome::Processed(_) => debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                requesters = requesters.len(),
                "processed"
            ),
            Outcome::Failed(error) => {
                warn!(reason = %error.reason, retryable = error.retryable, "processing failed")
            }
        }
        for requester in requesters {
            requester.deliver(&id, outcome.clone()).await;
        }
    }

    fn send_progress(&self, id: &str) {
        let state = self.lock();
        for requester in state.running.get(id).into_iter().flatten() {
            if let Requester::Stream { tx, attempt } = requester {
                let progress = Progress {
                    conversation_id: id.to_string(),
                    attempt: *attempt,
                };
                // Progress is advisory: a full or closed stream simply misses one.
                let _ = tx.try_send(stream_message(link_response::Msg::Progress(progress)));
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Outcome {
    Processed(Processed),
    Failed(ProcessError),
}

impl Outcome {
    /// The event that records this outcome.
    fn event(&self) -> JobEvent {
        match self {
            Outcome::Processed(_) => JobEvent::Succeeded,
            Outcome::Failed(_) => JobEvent::Failed,
        }
    }

    /// The Ack for a requester that sent `attempt`: the one place pusher builds an `Ack`.
    fn ack(self, id: &str, attempt: u32) -> Ack {
        Ack {
            conversation_id: id.to_string(),
            attempt,
            outcome: Some(match self {
                Outcome::Processed(processed) => ack::Outcome::Processed(processed),
                Outcome::Failed(error) => ack::Outcome::Failed(Failed {
                    reason: error.reason,
                    retryable: error.retryable,
                }),
            }),
        }
    }
}

/// A message for the outbound half of a Connect stream.
fn stream_message(msg: link_response::Msg) -> Result<LinkResponse, tonic::Status> {
    Ok(LinkResponse { msg: Some(msg) })
}

#[cfg(test)]
mod tests;
