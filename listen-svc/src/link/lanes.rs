//! The lane policy: one lane per pusher endpoint, and which of them holds each conversation.
//!
//! Pure: no I/O and no channels (a lane names its stream by epoch; the stream's halves live
//! in [`Streams`](super::stream::Streams)); the clock is passed in. It decides
//! - which lane takes a conversation ([`Lanes::pick`]: a lane taking work with a free slot,
//!   the fewest pending first, ties round-robin) and how much may be claimed ([`Lanes::room`]);
//! - what moves off a lane that cannot send it (stream down, draining, endpoint retiring) to
//!   lanes that can ([`Lanes::rebalance`]); a conversation is in one window at a time;
//! - how a DNS answer changes the lanes ([`Lanes::reconcile`]): new addresses join, missing
//!   ones retire (no new work; dropped by [`Lanes::drop_retired`] once their window is empty).
//!
//! Bound: at most `max_endpoints` lanes, retiring ones included; each window holds
//! `max_in_flight`.

use super::Attempts;
use super::error::LinkError;
use super::handle::EndpointSnapshot;
use super::pending::Pending;
use super::series::{EndpointSeries, LaneMetrics};
use super::state::{LinkState, Policy};
use crate::store::Claimed;
use shared::proto::listen::v1::LinkState as Wire;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

/// An established stream, as the policy sees it.
pub(super) struct Conn {
    pub epoch: u64,
    pub last_heard: Instant,
    /// Its pusher said Draining.
    pub draining: bool,
    pub pusher_id: String,
}

/// One pusher endpoint: its stream, state machine and pending window.
pub(super) struct Lane {
    /// `host:port` or `ip:port`; the `endpoint` metric label.
    pub endpoint: String,
    pub uri: String,
    pub state: LinkState,
    pub pending: Pending,
    pub conn: Option<Conn>,
    /// A connect task is out.
    pub opening: bool,
    /// Gone from DNS: takes no new work; dropped once its window is empty.
    pub retiring: bool,
    streams: u64,
    reconnects: u64,
    pub consecutive_failures: u32,
    last_error: String,
    pub metrics: LaneMetrics,
}

impl Lane {
    /// Claimed and moved work may be given to this lane.
    pub(super) fn takes_work(&self) -> bool {
        self.sends() && !self.retiring
    }

    /// Its due entries go on the wire.
    pub(super) fn sends(&self) -> bool {
        matches!(&self.conn, Some(conn) if !conn.draining)
    }

    pub(super) fn draining(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.draining)
    }

    /// A connect attempt should start now.
    pub(super) fn wants_connect(&self) -> bool {
        self.conn.is_none() && !self.opening && !self.retiring && self.state.wants_connect()
    }

    /// Stream `epoch` is up: every unsettled entry is due now with a fresh budget. Returns
    /// how many were replayed.
    pub(super) fn connected(&mut self, epoch: u64, pusher_id: String, now: Instant) -> usize {
        self.opening = false;
        self.state = self.state.connected(epoch, now);
        self.consecutive_failures = 0;
        if self.streams > 0 {
            self.reconnects += 1;
            self.metrics.reconnects.increment(1);
        }
        self.streams += 1;
        self.conn = Some(Conn {
            epoch,
            last_heard: now,
            draining: false,
            pusher_id,
        });
        self.pending.replay(now)
    }

    /// The stream ended or never opened: counted by reason, and the state machine backs off.
    /// `unit` in `[0, 1)` spreads the backoff.
    pub(super) fn failed(&mut self, error: &LinkError, now: Instant, policy: &Policy, unit: f64) {
        self.opening = false;
        self.conn = None;
        self.consecutive_failures += 1;
        self.metrics.failures[error.reason() as usize].increment(1);
        self.state = self.state.failed(now, policy, unit);
        self.last_error = error.to_string();
    }

    /// Its pusher drained and closed the stream: reconnect at once, not a failure.
    pub(super) fn drained(&mut self) {
        self.conn = None;
        self.state = self.state.drained();
    }

    pub(super) fn snapshot(&self) -> EndpointSnapshot {
        EndpointSnapshot {
            address: self.endpoint.clone(),
            state: self.state.to_wire(),
            pending: self.pending.len(),
            reconnects: self.reconnects,
            consecutive_failures: self.consecutive_failures,
            last_error: self.last_error.clone(),
            draining: self.draining(),
            retiring: self.retiring,
            pusher_id: self
                .conn
                .as_ref()
                .map(|c| c.pusher_id.clone())
                .unwrap_or_default(),
        }
    }
}

/// What a DNS answer changed, for the owner to log.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Reconciled {
    /// More addresses than `max_endpoints` came back: how many.
    pub truncated_from: Option<usize>,
    /// Endpoints that left DNS, with their pending counts.
    pub retired: Vec<(String, usize)>,
    /// Retiring endpoints listed again.
    pub returned: Vec<String>,
    pub joined: Vec<String>,
}

pub(super) struct Lanes {
    lanes: Vec<Lane>,
    /// Where the round-robin among equally loaded lanes starts next.
    next: usize,
    max_endpoints: usize,
    max_in_flight: usize,
    attempts: Attempts,
    /// The lanes' metric series.
    series: Arc<EndpointSeries>,
}

impl Lanes {
    pub(super) fn new(
        max_endpoints: usize,
        max_in_flight: usize,
        attempts: Attempts,
        series: Arc<EndpointSeries>,
    ) -> Self {
        Lanes {
            lanes: Vec::new(),
            next: 0,
            max_endpoints,
            max_in_flight,
            attempts,
            series,
        }
    }

    /// A lane for `endpoint`, reached at `uri`.
    pub(super) fn add(&mut self, endpoint: String, uri: String) {
        self.lanes.push(Lane {
            metrics: self.series.add(&endpoint),
            endpoint,
            uri,
            state: LinkState::INITIAL,
            pending: Pending::new(self.max_in_flight, self.attempts),
            conn: None,
            opening: false,
            retiring: false,
            streams: 0,
            reconnects: 0,
            consecutive_failures: 0,
            last_error: String::new(),
        });
    }

    pub(super) fn len(&self) -> usize {
        self.lanes.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    pub(super) fn iter(&self) -> std::slice::Iter<'_, Lane> {
        self.lanes.iter()
    }

    pub(super) fn iter_mut(&mut self) -> std::slice::IterMut<'_, Lane> {
        self.lanes.iter_mut()
    }

    pub(super) fn clear(&mut self) {
        self.lanes.clear();
    }

    /// The lane of `endpoint` with a connect out.
    pub(super) fn opening(&self, endpoint: &str) -> Option<usize> {
        self.lanes
            .iter()
            .position(|l| l.endpoint == endpoint && l.opening)
    }

    /// The lane whose stream is `epoch`.
    pub(super) fn by_epoch(&self, epoch: u64) -> Option<usize> {
        self.lanes
            .iter()
            .position(|l| l.conn.as_ref().is_some_and(|c| c.epoch == epoch))
    }

    /// The lane whose window holds `id`, if any.
    pub(super) fn holding(&mut self, id: &str) -> Option<&mut Lane> {
        self.lanes.iter_mut().find(|l| l.pending.contains(id))
    }

    /// Free pending slots on the lanes that take work: what a claim or a move may fill.
    pub(super) fn room(&self) -> usize {
        self.lanes
            .iter()
            .filter(|l| l.takes_work())
            .map(|l| l.pending.free_slots())
            .sum()
    }

    /// How many conversations the pending windows of all lanes hold at most.
    pub(super) fn capacity(&self) -> usize {
        self.lanes.len() * self.max_in_flight
    }

    pub(super) fn pending_total(&self) -> usize {
        self.lanes.iter().map(|l| l.pending.len()).sum()
    }

    /// Every conversation in a window: the rows whose leases the link keeps alive.
    pub(super) fn ids(&self) -> Vec<String> {
        self.lanes
            .iter()
            .flat_map(|l| l.pending.ids().cloned())
            .collect()
    }

    /// The link's state from its lanes': the most alive one (CONNECTING before any is known).
    pub(super) fn state(&self) -> Wire {
        let rank = |state: Wire| match state {
            Wire::Connected => 5,
            Wire::HalfOpen => 4,
            Wire::Connecting => 3,
            Wire::Backoff => 2,
            Wire::Degraded => 1,
            Wire::Unspecified => 0,
        };
        self.lanes
            .iter()
            .map(|l| l.state.to_wire())
            .max_by_key(|s| rank(*s))
            .unwrap_or(Wire::Connecting)
    }

    /// The lane that takes the next conversation: among those taking work with a free slot,
    /// the one with the fewest pending; ties go round-robin.
    pub(super) fn pick(&mut self) -> Option<usize> {
        let n = self.lanes.len();
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = (self.next + k) % n;
            let lane = &self.lanes[i];
            if !lane.takes_work() || lane.pending.free_slots() == 0 {
                continue;
            }
            if best.is_none_or(|b| lane.pending.len() < self.lanes[b].pending.len()) {
                best = Some(i);
            }
        }
        if let Some(i) = best {
            self.next = i + 1;
        }
        best
    }

    /// Puts a claimed row in a window: the one already holding it (its lease was re-claimed),
    /// else the lane [`pick`](Self::pick) chooses, else (lanes changed while the claim was
    /// out) any lane with room. False when no window had room.
    pub(super) fn place(&mut self, row: Claimed, now: Instant) -> bool {
        if let Some(lane) = self.holding(&row.id) {
            lane.pending.insert(row, now);
            return true;
        }
        let lane = self.pick().or_else(|| {
            (0..self.lanes.len())
                .filter(|&i| self.lanes[i].pending.free_slots() > 0)
                .min_by_key(|&i| self.lanes[i].pending.len())
        });
        lane.is_some_and(|i| self.lanes[i].pending.insert(row, now))
    }

    /// Hands work that its lane cannot send (stream down, draining, endpoint retiring) to
    /// lanes that take work, as far as they have room; due `now` there, with a fresh budget.
    /// With one lane nothing moves: its work waits for the replay on its next stream.
    /// Returns (from endpoint, count) per lane that gave work away.
    pub(super) fn rebalance(&mut self, now: Instant) -> Vec<(String, usize)> {
        let mut moves = Vec::new();
        if self.lanes.len() < 2 {
            return moves;
        }
        let mut room = self.room();
        for i in 0..self.lanes.len() {
            if room == 0 {
                break;
            }
            let lane = &mut self.lanes[i];
            if lane.takes_work() || lane.pending.is_empty() {
                continue;
            }
            // Sent on a stream that is gone: nobody will answer on it.
            let in_flight = lane.conn.is_none();
            let moved = lane.pending.take_movable(room, in_flight);
            if moved.is_empty() {
                continue;
            }
            moves.push((lane.endpoint.clone(), moved.len()));
            for (id, entry) in moved {
                let j = self.pick().expect("room was counted on lanes taking work");
                if let Err(entry) = self.lanes[j].pending.adopt(id.clone(), entry, now) {
                    // Cannot happen (pick found a free slot); keep it where it was.
                    let _ = self.lanes[i].pending.adopt(id, entry, now);
                }
                room -= 1;
            }
        }
        moves
    }

    /// Reconciles the lanes with a DNS answer (sorted addresses): the first `max_endpoints`
    /// are wanted; lanes not among them retire, retiring lanes among them come back, and
    /// new ones join (reached with `scheme`) while the bound allows.
    pub(super) fn reconcile(&mut self, mut addrs: Vec<SocketAddr>, scheme: &str) -> Reconciled {
        let mut changes = Reconciled::default();
        if addrs.len() > self.max_endpoints {
            changes.truncated_from = Some(addrs.len());
            addrs.truncate(self.max_endpoints);
        }
        let wanted: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
        for lane in &mut self.lanes {
            let listed = wanted.contains(&lane.endpoint);
            if lane.retiring == listed {
                lane.retiring = !listed;
                if lane.retiring {
                    changes
                        .retired
                        .push((lane.endpoint.clone(), lane.pending.len()));
                } else {
                    changes.returned.push(lane.endpoint.clone());
                }
            }
        }
        for endpoint in wanted {
            // Retiring lanes still count towards the bound until they are dropped.
            if self.lanes.iter().any(|l| l.endpoint == endpoint)
                || self.lanes.len() >= self.max_endpoints
            {
                continue;
            }
            let uri = format!("{scheme}://{endpoint}");
            changes.joined.push(endpoint.clone());
            self.add(endpoint, uri);
        }
        changes
    }

    /// Takes out retiring lanes whose window is empty and which have no connect out (not
    /// while slots are `promised`: a claim's rows or Submits' were counted against their free
    /// slots). Dropping a lane
    /// takes its metric series off the scrape.
    pub(super) fn drop_retired(&mut self, promised: bool) -> Vec<Lane> {
        if promised {
            return Vec::new();
        }
        let (gone, kept) = std::mem::take(&mut self.lanes)
            .into_iter()
            .partition(|l| l.retiring && l.pending.is_empty() && !l.opening);
        self.lanes = kept;
        gone
    }
}

impl std::ops::Index<usize> for Lanes {
    type Output = Lane;

    fn index(&self, i: usize) -> &Lane {
        &self.lanes[i]
    }
}

impl std::ops::IndexMut<usize> for Lanes {
    fn index_mut(&mut self, i: usize) -> &mut Lane {
        &mut self.lanes[i]
    }
}

#[cfg(test)]
mod tests;
