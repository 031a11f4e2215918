//! The rest of listen's view of the link: a [`LinkHandle`] to wake it and forward live
//! transcripts (neither ever waits), and the [`LinkSnapshot`] it publishes after every turn.

use shared::proto::listen::v1::LinkState as Wire;
use shared::proto::pusher::v1::TranscriptBatch;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{Notify, watch};

/// What the link looks like from outside: the whole, then each endpoint.
#[derive(Clone, Debug)]
pub(crate) struct LinkSnapshot {
    /// The most alive of the endpoints' states (CONNECTED if any is).
    pub state: Wire,
    pub pending: usize,
    pub reconnects: u64,
    /// The fewest among the endpoints (0 when any is connected).
    pub consecutive_failures: u32,
    pub last_error: String,
    pub acks_ignored: u64,
    pub transcripts_dropped: u64,
    pub endpoints: Vec<EndpointSnapshot>,
}

impl LinkSnapshot {
    /// Before the link task's first turn.
    pub(super) fn initial() -> Self {
        LinkSnapshot {
            state: Wire::Connecting,
            pending: 0,
            reconnects: 0,
            consecutive_failures: 0,
            last_error: String::new(),
            acks_ignored: 0,
            transcripts_dropped: 0,
            endpoints: Vec::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct EndpointSnapshot {
    pub address: String,
    pub state: Wire,
    pub pending: usize,
    pub reconnects: u64,
    pub consecutive_failures: u32,
    pub last_error: String,
    /// Its pusher said Draining: no new work goes there.
    pub draining: bool,
    /// Gone from DNS: its work moves to the others, then it is dropped.
    pub retiring: bool,
    pub pusher_id: String,
}

/// The rest of listen's way to the link task.
#[derive(Clone)]
pub(crate) struct LinkHandle {
    pub(super) wake: Arc<Notify>,
    pub(super) handoff: Arc<super::Handoff>,
    pub(super) status: watch::Receiver<LinkSnapshot>,
    pub(super) transcripts: Arc<Transcripts>,
}

impl LinkHandle {
    /// New work was committed: claim it. Never waits.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// A window slot set aside for a conversation about to be submitted (claim at submit),
    /// if the link has one free. Never waits.
    pub(crate) fn reserve(&self) -> Option<super::Slot> {
        self.handoff.reserve()
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
    pub(super) ready: Notify,
}

impl Transcripts {
    pub(super) fn new(capacity: usize) -> Self {
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
            self.count_dropped();
        }
        queue.push_back(batch);
        drop(queue);
        self.ready.notify_one();
    }

    pub(super) fn take(&self) -> VecDeque<TranscriptBatch> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A batch was dropped: the buffer was full, or so was the stream's.
    pub(super) fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("listen_transcripts_dropped_total").increment(1);
    }
}

/// Called with each conversation the link settled (COMPLETED or FAILED). Must not wait.
pub(crate) type SettledHook = Arc<dyn Fn(&str) + Send + Sync>;
