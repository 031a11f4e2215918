//! Claim at submit: window slots the link sets aside, and the rows Submit hands over in them.
//!
//! When the store holds nothing to claim, the link sets its free pending slots aside here
//! ([`Handoff::open`]). A Submit takes one ([`Handoff::reserve`]) and asks the store to write
//! its conversation already leased to this instance; the store does so only if nothing
//! waits in the queue (so nobody is overtaken), and returns the claim, which the Submit puts
//! in its slot ([`Slot::fill`]) for the link to place. That row costs no claim write and no
//! re-read. A slot the Submit does not fill (queued instead, a duplicate, an error, a dropped
//! call) goes back to the set-aside ones when it is dropped.
//!
//! Bounds: at most the slots set aside are ever taken, so the handed-over rows waiting for the
//! link are at most the free pending slots (`max_in_flight` per endpoint). The link takes slots
//! back ([`Handoff::revoke`]) before it claims from the store, and whenever its room shrinks,
//! so the two ways of filling the windows never promise the same slot twice.

use crate::store::{Claimed, Lease};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub(crate) struct Handoff {
    /// The lease a Submit takes with a slot.
    lease: Lease,
    /// Slots set aside that no Submit holds.
    open: AtomicUsize,
    /// The link has stopped: no slot is given out any more.
    closed: AtomicBool,
    /// Claims handed over, for the link to place.
    rows: Mutex<Vec<Claimed>>,
    /// Rows were handed over.
    pub(super) ready: Notify,
}

/// A set-aside window slot held by one Submit. Dropped unfilled, it is set aside again.
pub(crate) struct Slot {
    handoff: Arc<Handoff>,
    filled: bool,
}

impl Handoff {
    pub(super) fn new(lease: Lease) -> Self {
        Handoff {
            lease,
            open: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            rows: Mutex::new(Vec::new()),
            ready: Notify::new(),
        }
    }

    /// Takes a slot, if the link set one aside. Never waits.
    pub(crate) fn reserve(self: &Arc<Self>) -> Option<Slot> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()
            .map(|_| Slot {
                handoff: Arc::clone(self),
                filled: false,
            })
    }

    /// Sets `n` more slots aside.
    pub(super) fn open(&self, n: usize) {
        if n > 0 {
            self.open.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// The link stopped: Submits queue their conversations from now on.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.open.store(0, Ordering::Release);
    }

    /// Takes back every slot no Submit holds; returns how many.
    pub(super) fn revoke(&self) -> usize {
        self.open.swap(0, Ordering::AcqRel)
    }

    /// The rows handed over since the last call.
    pub(super) fn take(&self) -> Vec<Claimed> {
        std::mem::take(&mut *self.rows.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Slot {
    /// The lease to write the conversation with.
    pub(crate) fn lease(&self) -> Lease {
        self.handoff.lease.clone()
    }

    /// Hands the conversation, written leased, to the link.
    pub(crate) fn fill(mut self, claimed: Claimed) {
        self.filled = true;
        self.handoff
            .rows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(claimed);
        self.handoff.ready.notify_one();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.filled {
            self.handoff.open.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handoff() -> Arc<Handoff> {
        Arc::new(Handoff::new(Lease {
            owner: "listen-a".into(),
            lease_ms: 30_000,
        }))
    }

    #[test]
    fn only_set_aside_slots_can_be_taken() {
        let handoff = handoff();
        assert!(handoff.reserve().is_none(), "nothing set aside yet");
        handoff.open(2);
        let a = handoff.reserve().expect("first slot");
        let _b = handoff.reserve().expect("second slot");
        assert!(handoff.reserve().is_none(), "two set aside, two taken");
        assert_eq!(a.lease().owner, "listen-a");
    }

    #[test]
    fn an_unfilled_slot_is_set_aside_again_and_revoke_takes_only_the_free_ones() {
        let handoff = handoff();
        handoff.open(3);
        let held = handoff.reserve().unwrap();
        drop(handoff.reserve().unwrap());
        assert_eq!(handoff.revoke(), 2, "the one held is not revoked");
        assert!(handoff.reserve().is_none());
        drop(held);
        assert_eq!(handoff.revoke(), 1, "a dropped slot comes back");
    }

    #[test]
    fn a_closed_handoff_gives_out_no_slot() {
        let handoff = handoff();
        handoff.open(4);
        handoff.close();
        assert!(handoff.reserve().is_none());
        handoff.open(1);
        assert!(handoff.reserve().is_none(), "closed for good");
    }

    #[test]
    fn a_filled_slot_hands_its_row_over_once_and_is_not_set_aside_again() {
        let handoff = handoff();
        handoff.open(1);
        let slot = handoff.reserve().unwrap();
        let row = Claimed {
            id: "c1".into(),
            uid: "u".into(),
            language: "en".into(),
            segments: Vec::new(),
            finished_at_ms: Some(1),
            generation: 1,
            attempts: 0,
            priority: crate::store::Priority::Interactive,
            waited_ms: Some(0),
            trace: Default::default(),
        };
        slot.fill(row.clone());
        assert_eq!(handoff.revoke(), 0, "the filled slot is used, not returned");
        assert_eq!(handoff.take(), vec![row]);
        assert!(handoff.take().is_empty());
    }
}
