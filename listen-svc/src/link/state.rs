//! The link's connection state machine. Pure: time and randomness are arguments.
//!
//! ```text
//! Connecting --ok--> Connected --stream ends--> Backoff{failures} --delay--> Connecting
//!      \--fail--> Backoff{failures+1}, or Degraded after `degrade_after` consecutive failures
//! Degraded --probe_every--> HalfOpen (one attempt) --ok--> Connected / --fail--> Degraded
//! ```
//!
//! A stream that lived at least `stable_after` resets the failure count; one that dies sooner
//! counts as another failure, so a connection that is reset right after it opens backs off
//! just like one that cannot open at all.

use shared::backoff::Backoff;
use shared::proto::listen::v1::LinkState as Wire;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    pub backoff: Backoff,
    pub degrade_after: u32,
    pub probe_every: Duration,
    pub stable_after: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkState {
    /// Opening a stream; `failures` consecutive attempts have failed before this one.
    Connecting { failures: u32 },
    /// Stream `epoch` is established (Hello answered by Welcome).
    Connected {
        epoch: u64,
        since: Instant,
        failures_before: u32,
    },
    /// Waiting `until` before the next attempt.
    Backoff { failures: u32, until: Instant },
    /// Pusher has been unreachable since `since`; one probe at `next_probe`.
    Degraded { since: Instant, next_probe: Instant },
    /// The single probe attempt out of Degraded.
    HalfOpen { degraded_since: Instant },
}

impl LinkState {
    pub(crate) const INITIAL: LinkState = LinkState::Connecting { failures: 0 };

    /// The attempt succeeded: stream `epoch` is up.
    pub(crate) fn connected(self, epoch: u64, now: Instant) -> LinkState {
        let failures_before = match self {
            LinkState::Connecting { failures } => failures,
            LinkState::HalfOpen { .. } => 0,
            other => return other,
        };
        LinkState::Connected {
            epoch,
            since: now,
            failures_before,
        }
    }

    /// The attempt failed or the stream ended. `unit` in `[0, 1)` spreads the backoff.
    pub(crate) fn failed(self, now: Instant, policy: &Policy, unit: f64) -> LinkState {
        let failures = match self {
            LinkState::Connecting { failures } => failures + 1,
            LinkState::Connected {
                since,
                failures_before,
                ..
            } => {
                if now.duration_since(since) >= policy.stable_after {
                    1
                } else {
                    failures_before + 1
                }
            }
            LinkState::HalfOpen { degraded_since } => {
                return LinkState::Degraded {
                    since: degraded_since,
                    next_probe: now + policy.probe_every,
                };
            }
            waiting @ (LinkState::Backoff { .. } | LinkState::Degraded { .. }) => return waiting,
        };
        if failures >= policy.degrade_after {
            LinkState::Degraded {
                since: now,
                next_probe: now + policy.probe_every,
            }
        } else {
            LinkState::Backoff {
                failures,
                until: now + policy.backoff.delay_with(failures, unit),
            }
        }
    }

    /// Pusher said it is draining: reconnect now (to another replica), not a failure.
    pub(crate) fn drained(self) -> LinkState {
        match self {
            LinkState::Connected { .. } => LinkState::Connecting { failures: 0 },
            other => other,
        }
    }

    /// The state's timer fired.
    pub(crate) fn timer_elapsed(self, now: Instant) -> LinkState {
        match self {
            LinkState::Backoff { failures, until } if now >= until => {
                LinkState::Connecting { failures }
            }
            LinkState::Degraded { since, next_probe } if now >= next_probe => LinkState::HalfOpen {
                degraded_since: since,
            },
            other => other,
        }
    }

    /// When [`timer_elapsed`](Self::timer_elapsed) has something to do.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self {
            LinkState::Backoff { until, .. } => Some(*until),
            LinkState::Degraded { next_probe, .. } => Some(*next_probe),
            _ => None,
        }
    }

    /// Should a connection attempt be made now?
    pub(crate) fn wants_connect(&self) -> bool {
        matches!(
            self,
            LinkState::Connecting { .. } | LinkState::HalfOpen { .. }
        )
    }

    pub(crate) fn to_wire(self) -> Wire {
        match self {
            LinkState::Connecting { .. } => Wire::Connecting,
            LinkState::Connected { .. } => Wire::Connected,
            LinkState::Backoff { .. } => Wire::Backoff,
            LinkState::Degraded { .. } => Wire::Degraded,
            LinkState::HalfOpen { .. } => Wire::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        backoff: Backoff::RECONNECT,
        degrade_after: 5,
        probe_every: Duration::from_secs(30),
        stable_after: Duration::from_secs(10),
    };
    const MID: f64 = 0.5; // no jitter

    #[test]
    fn failures_back_off_exponentially_then_degrade() {
        let t0 = Instant::now();
        let mut state = LinkState::INITIAL;
        let mut delays = Vec::new();
        for _ in 0..4 {
            state = state.failed(t0, &POLICY, MID);
            let LinkState::Backoff { until, failures } = state else {
                panic!("{state:?}")
            };
            delays.push(until.duration_since(t0).as_secs_f64());
            assert_eq!(
                state.timer_elapsed(until - Duration::from_millis(1)),
                state,
                "not before its time"
            );
            state = state.timer_elapsed(until);
            assert_eq!(state, LinkState::Connecting { failures });
        }
        assert_eq!(delays.len(), 4);
        for (delay, want) in delays.iter().zip([1.0, 1.6, 2.56, 4.096]) {
            assert!((delay - want).abs() < 1e-6, "{delays:?}");
        }
        state = state.failed(t0, &POLICY, MID);
        assert_eq!(
            state,
            LinkState::Degraded {
                since: t0,
                next_probe: t0 + Duration::from_secs(30)
            }
        );
        assert_eq!(state.to_wire(), Wire::Degraded);
    }

    #[test]
    fn degraded_probes_on_schedule_and_recovers() {
        let t0 = Instant::now();
        let degraded = LinkState::Degraded {
            since: t0,
            next_probe: t0 + Duration::from_secs(30),
        };
        assert!(!degraded.wants_connect());
        assert_eq!(degraded.deadline(), Some(t0 + Duration::from_secs(30)));
        let probe = degraded.timer_elapsed(t0 + Duration::from_secs(30));
        assert_eq!(probe, LinkState::HalfOpen { degraded_since: t0 });
        assert!(probe.wants_connect());

        // A failed probe waits a full cooldown again, remembering when it all began.
        let t1 = t0 + Duration::from_secs(31);
        let again = probe.failed(t1, &POLICY, MID);
        assert_eq!(
            again,
            LinkState::Degraded {
                since: t0,
                next_probe: t1 + Duration::from_secs(30)
            }
        );

        // A successful probe connects with a clean slate.
        let up = probe.connected(7, t1);
        assert_eq!(
            up,
            LinkState::Connected {
                epoch: 7,
                since: t1,
                failures_before: 0
            }
        );
        let LinkState::Backoff { failures: 1, .. } =
            up.failed(t1 + Duration::from_secs(60), &POLICY, MID)
        else {
            panic!()
        };
    }

    #[test]
    fn a_stream_that_dies_young_counts_as_another_failure() {
        let t0 = Instant::now();
        let up = LinkState::Connecting { failures: 3 }.connected(1, t0);
        let LinkState::Backoff { failures, until } =
            up.failed(t0 + Duration::from_millis(300), &POLICY, MID)
        else {
            panic!()
        };
        assert_eq!(failures, 4, "reset storm: keeps backing off");
        assert!(until.duration_since(t0) > Duration::from_secs(4));
        // ... and the next young death degrades the link.
        let up = LinkState::Connecting { failures: 4 }.connected(2, t0);
        assert!(matches!(
            up.failed(t0, &POLICY, MID),
            LinkState::Degraded { .. }
        ));

        // A stream that was stable starts over at one failure.
        let up = LinkState::Connecting { failures: 4 }.connected(3, t0);
        let LinkState::Backoff { failures: 1, until } =
            up.failed(t0 + Duration::from_secs(10), &POLICY, MID)
        else {
            panic!()
        };
        assert_eq!(until, t0 + Duration::from_secs(11));
    }

    #[test]
    fn draining_reconnects_at_once_without_a_failure() {
        let t0 = Instant::now();
        let up = LinkState::Connecting { failures: 2 }.connected(1, t0);
        assert_eq!(up.drained(), LinkState::Connecting { failures: 0 });
    }

    #[test]
    fn waiting_states_ignore_stray_events() {
        let t0 = Instant::now();
        let backoff = LinkState::Backoff {
            failures: 2,
            until: t0,
        };
        assert_eq!(backoff.failed(t0, &POLICY, MID), backoff);
        assert_eq!(backoff.connected(9, t0), backoff);
        let connected = LinkState::Connected {
            epoch: 1,
            since: t0,
            failures_before: 0,
        };
        assert_eq!(
            connected.timer_elapsed(t0 + Duration::from_secs(99)),
            connected
        );
        assert_eq!(connected.deadline(), None);
    }
}
