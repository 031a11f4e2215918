//! The pending map: conversations claimed by this instance and not yet settled.
//!
//! Bounded by `capacity` (`--max-in-flight`): [`Pending::insert`] refuses beyond it, and the
//! link only claims as many rows from the store as there are free slots, so work beyond the
//! bound simply stays queued in the store. Nothing is ever evicted.
//!
//! Per entry:
//! - `attempt` is the wire attempt: it increases with every send, across streams, and acks
//!   are matched against it.
//! - `budget_used` counts sends against `max_attempts`. [`Pending::replay`] resets it, so
//!   every re-established stream gives each conversation a fresh budget. `Busy` refunds the
//!   send it answers.
//! - An entry is `InFlight` (sent, waiting for its ack until `deadline`, which `Progress`
//!   extends), `Waiting` (to be sent at `at`), or `Settling` (outcome known, store write under
//!   way; further acks are duplicates).
//!
//! Pure apart from the clock, which is passed in.

use super::Attempts;
use crate::store::Claimed;
use shared::proto::pusher::v1::{Ack, ProcessConversation, Processed, Segment, ack};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Entry {
    pub request: Arc<ProcessConversation>,
    pub generation: i64,
    pub attempt: u32,
    pub budget_used: u32,
    pub state: EntryState,
    /// Made due again by a new stream's replay (rather than a retry); cleared by a send.
    pub replayed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EntryState {
    InFlight {
        epoch: u64,
        sent_at: Instant,
        deadline: Instant,
    },
    Waiting {
        at: Instant,
    },
    Settling,
}

/// What to do about an ack.
#[derive(Debug, PartialEq)]
pub(crate) enum AckAction {
    /// Write the processed outcome (COMPLETED, or DISCARDED if pusher says so).
    Complete {
        generation: i64,
        processed: Processed,
        attempts: u32,
    },
    /// Write FAILED with this reason.
    Fail {
        generation: i64,
        reason: String,
        attempts: u32,
    },
    /// Retryable failure within budget; re-sent at `at`.
    Resend { at: Instant },
    /// Not for a pending conversation, or for an attempt other than the one in flight.
    Ignore(Ignored),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ignored {
    /// Nothing pending under that id (already settled: a late or duplicate ack).
    Unknown,
    /// The outcome is already being written.
    Duplicate,
    /// For an attempt other than the latest send.
    Stale,
}

pub(crate) struct Pending {
    entries: HashMap<String, Entry>,
    capacity: usize,
    attempts: Attempts,
}

impl Pending {
    pub(crate) fn new(capacity: usize, attempts: Attempts) -> Self {
        Pending {
            entries: HashMap::with_capacity(capacity),
            capacity,
            attempts,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn free_slots(&self) -> usize {
        self.capacity.saturating_sub(self.entries.len())
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Adds a claimed conversation, due to be sent `now`. Returns false when full. A
    /// conversation already pending (its lease was re-claimed) takes the new generation.
    pub(crate) fn insert(&mut self, claimed: Claimed, now: Instant) -> bool {
        if let Some(entry) = self.entries.get_mut(&claimed.id) {
            entry.generation = claimed.generation;
            return true;
        }
        if self.entries.len() >= self.capacity {
            return false;
        }
        let request = ProcessConversation {
            conversation_id: claimed.id.clone(),
            uid: claimed.uid,
            attempt: 0,
            language: claimed.language,
            segments: claimed
                .segments
                .into_iter()
                .map(|s| Segment {
                    text: s.text,
                    speaker: s.speaker,
                    start: s.start,
                    end: s.end,
                    is_user: s.is_user,
                })
                .collect(),
            finished_at: claimed.finished_at_ms.map(crate::wire::timestamp),
            // The stored context; each send replaces it with its own span's.
            traceparent: claimed.trace.traceparent,
            tracestate: claimed.trace.tracestate,
        };
        self.entries.insert(
            claimed.id,
            Entry {
                request: Arc::new(request),
                generation: claimed.generation,
                attempt: claimed.attempts,
                budget_used: 0,
                state: EntryState::Waiting { at: now },
                replayed: false,
            },
        );
        true
    }

    /// A request larger than `max_bytes` can never be sent: the stream would be reset on it,
    /// and every replay would reset it again. Such an entry is settled at once as a
    /// permanent failure; returns that failure, or None for a request that fits.
    pub(crate) fn refuse_if_larger(&mut self, id: &str, max_bytes: usize) -> Option<AckAction> {
        let entry = self.entries.get_mut(id)?;
        let len = prost::Message::encoded_len(entry.request.as_ref());
        if len <= max_bytes || entry.state == EntryState::Settling {
            return None;
        }
        entry.state = EntryState::Settling;
        Some(AckAction::Fail {
            generation: entry.generation,
            reason: format!(
                "the conversation is {len} bytes to send to pusher, more than --max-message-bytes \
                 ({max_bytes}); raise it on listen and pusher, then RetryConversation"
            ),
            attempts: entry.attempt,
        })
    }

    /// Ids due to be sent at `now`.
    pub(crate) fn due(&self, now: Instant) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, e)| matches!(e.state, EntryState::Waiting { at } if at <= now))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Records a send on stream `epoch` and returns the request to put on the wire.
    pub(crate) fn mark_sent(
        &mut self,
        id: &str,
        epoch: u64,
        now: Instant,
    ) -> Option<ProcessConversation> {
        let entry = self.entries.get_mut(id)?;
        entry.attempt += 1;
        entry.budget_used += 1;
        entry.replayed = false;
        entry.state = EntryState::InFlight {
            epoch,
            sent_at: now,
            deadline: now + self.attempts.ack_timeout,
        };
        let mut request = (*entry.request).clone();
        request.attempt = entry.attempt;
        Some(request)
    }

    /// The send could not be queued on the stream (its buffer was full): try again at `at`
    /// without spending budget.
    pub(crate) fn unsend(&mut self, id: &str, at: Instant) {
        if let Some(entry) = self.entries.get_mut(id) {
            entry.budget_used = entry.budget_used.saturating_sub(1);
            entry.state = EntryState::Waiting { at };
        }
    }

    /// When the attempt in flight was sent, if `attempt` is it (for ack latency).
    pub(crate) fn sent_at(&self, id: &str, attempt: u32) -> Option<Instant> {
        match self.entries.get(id) {
            Some(Entry {
                attempt: current,
                state: EntryState::InFlight { sent_at, .. },
                ..
            }) if *current == attempt => Some(*sent_at),
            _ => None,
        }
    }

    /// `Progress` for the attempt in flight pushes its deadline out by a full ack timeout.
    pub(crate) fn progress(&mut self, id: &str, attempt: u32, now: Instant) -> bool {
        match self.entries.get_mut(id) {
            Some(Entry {
                attempt: current,
                state: EntryState::InFlight { deadline, .. },
                ..
            }) if *current == attempt => {
                *deadline = now + self.attempts.ack_timeout;
                true
            }
            _ => false,
        }
    }

    /// `Busy`: pusher did not take the attempt. Re-send after `retry_after`; not an attempt.
    pub(crate) fn busy(
        &mut self,
        id: &str,
        attempt: u32,
        retry_after: Duration,
        now: Instant,
    ) -> bool {
        match self.entries.get_mut(id) {
            Some(entry)
                if entry.attempt == attempt
                    && matches!(entry.state, EntryState::InFlight { .. }) =>
            {
                entry.budget_used = entry.budget_used.saturating_sub(1);
                entry.state = EntryState::Waiting {
                    at: now + retry_after,
                };
                true
            }
            _ => false,
        }
    }

    /// Decides what an ack means. A `processed` outcome is accepted for any attempt of a
    /// pending conversation (pusher is idempotent, so any attempt's result is the result);
    /// a failure only for the attempt in flight, so a stale failure never fails a newer try.
    pub(crate) fn ack(&mut self, ack: Ack, now: Instant) -> AckAction {
        let Some(entry) = self.entries.get_mut(&ack.conversation_id) else {
            return AckAction::Ignore(Ignored::Unknown);
        };
        if entry.state == EntryState::Settling {
            return AckAction::Ignore(Ignored::Duplicate);
        }
        match ack.outcome {
            Some(ack::Outcome::Processed(processed))
                if ack.attempt <= entry.attempt && ack.attempt > 0 =>
            {
                entry.state = EntryState::Settling;
                AckAction::Complete {
                    generation: entry.generation,
                    processed,
                    attempts: entry.attempt,
                }
            }
            Some(ack::Outcome::Failed(failed))
                if ack.attempt == entry.attempt
                    && matches!(entry.state, EntryState::InFlight { .. }) =>
            {
                if !failed.retryable || entry.budget_used >= self.attempts.max_attempts {
                    entry.state = EntryState::Settling;
                    let reason = if failed.retryable {
                        format!(
                            "{} (gave up after {} attempts)",
                            failed.reason, entry.budget_used
                        )
                    } else {
                        failed.reason
                    };
                    AckAction::Fail {
                        generation: entry.generation,
                        reason,
                        attempts: entry.attempt,
                    }
                } else {
                    let at = now + self.attempts.retry_backoff.delay(entry.budget_used);
                    entry.state = EntryState::Waiting { at };
                    AckAction::Resend { at }
                }
            }
            _ => AckAction::Ignore(Ignored::Stale),
        }
    }

    /// Handles in-flight entries whose ack deadline passed: each is re-sent after a backoff,
    /// or, with its budget spent, returned for failing.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<(String, AckAction)> {
        let mut exhausted = Vec::new();
        for (id, entry) in &mut self.entries {
            let EntryState::InFlight { deadline, .. } = entry.state else {
                continue;
            };
            if deadline > now {
                continue;
            }
            if entry.budget_used >= self.attempts.max_attempts {
                entry.state = EntryState::Settling;
                let reason = format!(
                    "no ack from pusher within {:?} after {} attempts",
                    self.attempts.ack_timeout, entry.budget_used
                );
                exhausted.push((
                    id.clone(),
                    AckAction::Fail {
                        generation: entry.generation,
                        reason,
                        attempts: entry.attempt,
                    },
                ));
            } else {
                entry.state = EntryState::Waiting {
                    at: now + self.attempts.retry_backoff.delay(entry.budget_used),
                };
            }
        }
        exhausted
    }

    /// A new stream is up: every unsettled entry is due now with a fresh budget.
    pub(crate) fn replay(&mut self, now: Instant) -> usize {
        let mut count = 0;
        for entry in self.entries.values_mut() {
            entry.budget_used = 0;
            if entry.state != EntryState::Settling {
                entry.replayed = entry.attempt > 0;
                entry.state = EntryState::Waiting { at: now };
                count += 1;
            }
        }
        count
    }

    /// The store write for a settled entry failed: send again at `at` (pusher answers from
    /// its cache) so the outcome is written later.
    pub(crate) fn unsettle(&mut self, id: &str, at: Instant) {
        if let Some(entry) = self.entries.get_mut(id) {
            entry.state = EntryState::Waiting { at };
        }
    }

    pub(crate) fn remove(&mut self, id: &str) -> Option<Entry> {
        self.entries.remove(id)
    }

    /// The earliest ack deadline, and send time if `sending` (a stream that takes no new
    /// sends, such as a draining one, only waits for deadlines), for the link's timer.
    pub(crate) fn next_timer(&self, sending: bool) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| match e.state {
                EntryState::InFlight { deadline, .. } => Some(deadline),
                EntryState::Waiting { at } if sending => Some(at),
                EntryState::Waiting { .. } | EntryState::Settling => None,
            })
            .min()
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.entries.contains_key(id)
    }

    /// The conversations in this window (whatever their state): the rows whose leases the
    /// link keeps alive.
    pub(crate) fn ids(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// Takes up to `limit` entries off this window to hand to another stream: those waiting
    /// to be sent, and also those in flight when `in_flight` (their stream is gone). Entries
    /// whose outcome is being written stay.
    pub(crate) fn take_movable(&mut self, limit: usize, in_flight: bool) -> Vec<(String, Entry)> {
        self.entries
            .extract_if(|_, e| match e.state {
                EntryState::Waiting { .. } => true,
                EntryState::InFlight { .. } => in_flight,
                EntryState::Settling => false,
            })
            .take(limit)
            .collect()
    }

    /// Takes over an entry from another stream's window, due `now` with a fresh budget (as
    /// on a replay); its attempt numbers carry on. Returns it back when this window is full.
    pub(crate) fn adopt(
        &mut self,
        id: String,
        mut entry: Entry,
        now: Instant,
    ) -> Result<(), Entry> {
        if self.entries.len() >= self.capacity {
            return Err(entry);
        }
        entry.budget_used = 0;
        entry.state = EntryState::Waiting { at: now };
        self.entries.insert(id, entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
