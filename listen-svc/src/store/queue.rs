//! The queue's rules, written once for both backends: priorities, admission bounds and the
//! start tags of fair order.
//!
//! **Fair order** is start-time fair queueing, per priority. Each uid has a *finish tag* and
//! each priority a *virtual time* (the highest start tag claimed so far), both stored. A
//! conversation entering PROCESSING gets the start tag `max(virtual time, its uid's finish)`
//! and its uid's finish becomes that tag + 1. Claims go in (priority, start tag, queue order),
//! so a uid with N queued holds tags t..t+N while another uid's new conversation gets about
//! the virtual time, and is claimed next: its wait does not grow with N. Within a uid, tags
//! rise, so its conversations stay first-in first-out.
//!
//! **Admission** bounds the conversations waiting for their first claim, in total and per
//! uid ([`QueueBounds`]); the counts come from counters kept in the same transactions.

use super::StoreError;

/// Logs a reconciliation that corrected something (once per open).
pub(crate) fn report_reconciled(corrected: u64) {
    if corrected > 0 {
        tracing::warn!(
            corrected,
            "queue counters corrected from the rows: a listen-svc older than migration 0005 \
             wrote to this store (see docs/scheduling.md, Upgrading)"
        );
    }
}

/// The statements that recompute the queue's counters from the rows, in order; the sum of
/// their row counts is the number of corrections. The rows are the truth: the counters are
/// kept in the same transactions as the rows, so they only differ after a listen-svc older
/// than the fair queue (migration 0005) wrote rows during a rolling upgrade, or after a bug.
/// Each store runs them when it opens (on PostgreSQL under the queue lock). Standard SQL,
/// the same on both stores; their cost is bounded by the queued rows (`--max-queued`).
///
/// 1. `queued_at_ms` is set only while a row waits for its first claim: cleared elsewhere.
/// 2. Each priority's count.
/// 3. Each (uid, priority)'s count, added where missing; a new row's finish tag is one
///    past its last queued row's.
/// 4. Rows of uids with nothing queued are removed (as the claims do).
pub(crate) const RECONCILE_SQL: [&str; 4] = [
    "UPDATE conversations SET queued_at_ms = NULL \
     WHERE queued_at_ms IS NOT NULL AND (status <> 'processing' OR owner IS NOT NULL)",
    "UPDATE queue_priorities SET queued = (SELECT COUNT(*) FROM conversations c \
         WHERE c.queued_at_ms IS NOT NULL AND c.priority = queue_priorities.priority) \
     WHERE queued <> (SELECT COUNT(*) FROM conversations c \
         WHERE c.queued_at_ms IS NOT NULL AND c.priority = queue_priorities.priority)",
    "INSERT INTO queue_uids (uid, priority, queued, finish) \
     SELECT uid, priority, COUNT(*), MAX(queue_tag) + 1 FROM conversations \
     WHERE queued_at_ms IS NOT NULL GROUP BY uid, priority \
     ON CONFLICT (uid, priority) DO UPDATE SET queued = excluded.queued \
     WHERE queue_uids.queued <> excluded.queued",
    "DELETE FROM queue_uids WHERE NOT EXISTS (SELECT 1 FROM conversations c \
         WHERE c.queued_at_ms IS NOT NULL AND c.uid = queue_uids.uid \
         AND c.priority = queue_uids.priority)",
];

/// How urgently a conversation is wanted. Interactive work is claimed before bulk work;
/// bulk work still gets every [`BULK_EVERY`]th claim of each link first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Priority {
    Interactive,
    Bulk,
}

/// One claim in this many takes bulk work before interactive work, so a steady stream of
/// interactive work never stops bulk work (it gets at least about 1/8 of the claims while
/// both wait).
pub(crate) const BULK_EVERY: u64 = 8;

impl Priority {
    pub(crate) const ALL: [Priority; 2] = [Priority::Interactive, Priority::Bulk];

    /// As stored (the claim index sorts by it).
    pub(crate) fn as_i64(self) -> i64 {
        match self {
            Priority::Interactive => 0,
            Priority::Bulk => 1,
        }
    }

    pub(crate) fn from_stored(id: &str, value: i64) -> Result<Priority, StoreError> {
        match value {
            0 => Ok(Priority::Interactive),
            1 => Ok(Priority::Bulk),
            _ => Err(StoreError::Corrupt(format!("priority of {id}: {value}"))),
        }
    }

    /// The `priority` metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Bulk => "bulk",
        }
    }
}

/// Which priority a claim takes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClaimOrder {
    InteractiveFirst,
    BulkFirst,
}

impl ClaimOrder {
    /// The `n`th claim (from 0) of a link: every [`BULK_EVERY`]th takes bulk work first.
    pub(crate) fn for_claim(n: u64) -> ClaimOrder {
        if n % BULK_EVERY == BULK_EVERY - 1 {
            ClaimOrder::BulkFirst
        } else {
            ClaimOrder::InteractiveFirst
        }
    }
}

/// The most conversations waiting for their first claim: in total (`--max-queued`) and per
/// uid (`--max-queued-per-uid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct QueueBounds {
    pub max_queued: u64,
    pub max_queued_per_uid: u64,
}

/// Whether new work is held to the bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// A client asks for it (Submit, a session's Finish): refused beyond the bounds.
    Bounded(QueueBounds),
    /// Already stored and nobody to answer (a session's silence timeout, its deadline).
    Always,
}

/// A bound that refused new work; the message names its flag.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QueueFull {
    #[error("{limit} conversations are queued, listen's limit (--max-queued)")]
    Total { limit: u64 },
    #[error("uid {uid} has {limit} conversations queued, its limit (--max-queued-per-uid)")]
    Uid { uid: String, limit: u64 },
}

impl Admission {
    /// Whether one more conversation of `uid` fits, with `total` queued in all and `mine`
    /// of them the uid's.
    pub(crate) fn admit(self, uid: &str, total: u64, mine: u64) -> Result<(), QueueFull> {
        let Admission::Bounded(bounds) = self else {
            return Ok(());
        };
        if mine >= bounds.max_queued_per_uid {
            return Err(QueueFull::Uid {
                uid: uid.to_string(),
                limit: bounds.max_queued_per_uid,
            });
        }
        if total >= bounds.max_queued {
            return Err(QueueFull::Total {
                limit: bounds.max_queued,
            });
        }
        Ok(())
    }
}

/// The start tag of a uid's next conversation: after its previous one (`finish`, None when
/// the uid has nothing queued), and never before the priority's virtual time, so a uid that
/// was idle does not get ahead of the others by the turns it missed.
pub(crate) fn start_tag(vtime: i64, finish: Option<i64>) -> i64 {
    finish.map_or(vtime, |finish| finish.max(vtime))
}

/// One priority's queue, as the gauges and GetLinkStatus show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct QueueStats {
    /// Conversations waiting for their first claim.
    pub queued: u64,
    /// How long the oldest of them has waited; 0 when none.
    pub oldest_age_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_continues_after_its_previous_tag_but_never_before_the_virtual_time() {
        assert_eq!(
            start_tag(10, None),
            10,
            "a uid with nothing queued starts now"
        );
        assert_eq!(start_tag(10, Some(4)), 10, "idle turns are not saved up");
        assert_eq!(start_tag(10, Some(25)), 25, "behind its own backlog");
    }

    #[test]
    fn every_eighth_claim_takes_bulk_first() {
        let orders: Vec<ClaimOrder> = (0..16).map(ClaimOrder::for_claim).collect();
        let bulk: Vec<usize> = (0..16)
            .filter(|&i| orders[i] == ClaimOrder::BulkFirst)
            .collect();
        assert_eq!(bulk, vec![7, 15]);
    }

    #[test]
    fn the_per_uid_bound_is_checked_before_the_total_and_always_admits() {
        let bounded = Admission::Bounded(QueueBounds {
            max_queued: 10,
            max_queued_per_uid: 3,
        });
        assert_eq!(bounded.admit("a", 9, 2), Ok(()));
        assert_eq!(
            bounded.admit("a", 9, 3),
            Err(QueueFull::Uid {
                uid: "a".into(),
                limit: 3
            })
        );
        let total = bounded.admit("b", 10, 0).unwrap_err();
        assert_eq!(total, QueueFull::Total { limit: 10 });
        assert!(total.to_string().contains("--max-queued)"), "{total}");
        assert_eq!(Admission::Always.admit("a", 1_000, 1_000), Ok(()));
    }
}
