//! The link's store I/O: claims, outcome writes and lease renewals. Each runs as its own
//! task and reports back to the owner as an [`Event`], so a slow store never stalls a stream.
//! At most one claim is out at a time, and each pending entry has at most one outcome write
//! out.

use super::{Event, SettledHook};
use crate::store::{ClaimOrder, Claimed, ConversationStore, Now, Priority, StoreError, now_ms};
use crate::wire::completion_of;
use shared::proto::pusher::v1::Processed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

/// Leases renewed per store write.
const RENEW_SLICE: usize = 256;
/// Most rows claimed from the store in one go.
const CLAIM_BATCH: usize = 256;

/// Store I/O: claims, outcome writes and leases, each in its own task reporting back as an
/// [`Event`], so a slow store never stalls a stream.
pub(super) struct Work {
    pub store: Arc<dyn ConversationStore>,
    pub owner: String,
    pub lease_ttl: Duration,
    pub on_settled: SettledHook,
    pub events: mpsc::Sender<Event>,
    /// The store may hold claimable rows.
    pub more_work: bool,
    /// The limit of the outstanding claim (at most one at a time): window slots held for its
    /// rows.
    pub claiming: Option<usize>,
    /// A claim came back short of its limit since the link started or last looked for
    /// expired leases: the store holds nothing claimable beyond what its queue counters
    /// count, which Submits check. Only then are slots set aside for claim at submit
    /// (released and expired rows are claimable but not counted; they go first).
    pub drained: bool,
    /// Claims made so far: every `BULK_EVERY`th takes bulk work first.
    pub claims: u64,
}

impl Work {
    /// Gives up every lease this instance holds; `Ok(n)` rows released.
    pub(super) async fn release(&self) -> Result<u64, StoreError> {
        self.store.release(&self.owner).await
    }

    /// Claims up to `free` rows (at most a batch), unless a claim is out or there is nothing
    /// to claim.
    pub(super) fn claim(&mut self, free: usize) {
        if !self.more_work || self.claiming.is_some() || free == 0 {
            return;
        }
        // Set again by a wake that arrives while this claim is out, so work committed after
        // the claim's scan is not left for the next maintenance tick.
        self.more_work = false;
        // Drained, a claim takes half the room at most and leaves the rest set aside for
        // Submits while it is out: were every slot held, each Submit meanwhile would be
        // queued and wake the link for another claim, and a link that once started claiming
        // would never stop (measured on PostgreSQL: every conversation through the queue
        // lock, 0.15x the rate). With a backlog, it takes what it can.
        let limit = if self.drained {
            (free / 2).max(1)
        } else {
            free
        }
        .min(CLAIM_BATCH);
        self.claiming = Some(limit);
        let order = ClaimOrder::for_claim(self.claims);
        self.claims += 1;
        let (store, events) = (Arc::clone(&self.store), self.events.clone());
        let owner = self.owner.clone();
        let lease_ms = self.lease_ttl.as_millis() as i64;
        tokio::spawn(async move {
            let result = store
                .claim(&owner, Now::Store, lease_ms, limit, order)
                .await;
            if let Ok(claimed) = &result {
                count_claims("queue", claimed.len());
                record_waits(claimed);
            }
            let _ = events.send(Event::Claimed { limit, result }).await;
        });
    }

    /// Sets the queue gauges from the store's counters (the same on every replica of a
    /// PostgreSQL store: they count the shared queue).
    pub(super) fn report_queue(&self) {
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            match store.queue_stats(Now::Store).await {
                Ok(stats) => {
                    for (priority, stats) in Priority::ALL.into_iter().zip(stats) {
                        let label = priority.label();
                        metrics::gauge!("listen_queued_conversations", "priority" => label)
                            .set(stats.queued as f64);
                        metrics::gauge!("listen_queue_oldest_age_seconds", "priority" => label)
                            .set(stats.oldest_age_ms as f64 / 1e3);
                    }
                }
                Err(error) => warn!(%error, "reading the queue's counters failed"),
            }
        });
    }

    /// Writes an outcome in its own task and reports back.
    pub(super) fn settle(
        &self,
        id: String,
        outcome: &'static str,
        write: impl Future<Output = Result<bool, StoreError>> + Send + 'static,
    ) {
        let events = self.events.clone();
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

    pub(super) fn complete(
        &self,
        id: String,
        generation: i64,
        processed: Processed,
        attempts: u32,
    ) {
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

    pub(super) fn fail(&self, id: String, generation: i64, reason: String, attempts: u32) {
        warn!(conversation_id = %id, attempts, %reason, "conversation failed");
        let store = Arc::clone(&self.store);
        self.settle(id.clone(), "failed", async move {
            store.fail(&id, generation, &reason, attempts).await
        });
    }

    /// Renews the leases of `ids` (what the windows hold: a backlog of queued rows costs
    /// nothing here).
    pub(super) fn renew(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let store = Arc::clone(&self.store);
        let owner = self.owner.clone();
        let lease_ms = self.lease_ttl.as_millis() as i64;
        tokio::spawn(async move {
            // In slices, so a renewal never holds the store's writer for long (a full
            // window on every endpoint is 16 384 rows with the defaults).
            for ids in ids.chunks(RENEW_SLICE) {
                if let Err(error) = store
                    .renew(&owner, ids.to_vec(), Now::Store, lease_ms)
                    .await
                {
                    warn!(%error, "renewing leases failed");
                    return;
                }
            }
        });
    }
}

/// How the link got a row into a window: `submit` (written leased by its Submit, taken from
/// memory) or `queue` (a claim from the store).
pub(super) fn count_claims(via: &'static str, claimed: usize) {
    if claimed > 0 {
        metrics::counter!("listen_link_claimed_total", "via" => via).increment(claimed as u64);
    }
}

/// Time from PROCESSING to the first claim, per priority, for rows claimed the first time.
pub(super) fn record_waits(claimed: &[Claimed]) {
    for row in claimed {
        if let Some(waited_ms) = row.waited_ms {
            metrics::histogram!("listen_queue_wait_seconds", "priority" => row.priority.label())
                .record(waited_ms as f64 / 1e3);
        }
    }
}
