//! Jittered exponential backoff, in the spirit of gRPC's connection-backoff spec.
//!
//! `delay(n) = min(initial * multiplier^(n-1), max)`, then spread by `±jitter` and capped at
//! `max` again, so no delay ever exceeds `max`. Attempts count from 1. Written here rather than
//! taken from a crate so the arithmetic is ours to test (`backoff` is unmaintained).

use std::time::Duration;

/// A backoff policy. Pure: the random spread is an argument so tests can pin it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub multiplier: f64,
    /// Fraction of the delay to spread by, each way: 0.2 means ±20 %.
    pub jitter: f64,
    pub max: Duration,
}

impl Backoff {
    /// The link's reconnect policy: 1 s, ×1.6, ±20 %, capped at 30 s.
    pub const RECONNECT: Backoff = Backoff {
        initial: Duration::from_secs(1),
        multiplier: 1.6,
        jitter: 0.2,
        max: Duration::from_secs(30),
    };

    /// The delay before attempt `attempt` (1-based), without jitter.
    pub fn base(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(1_000) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let max = self.max.as_secs_f64();
        // `min`, not `max`: the cap bounds the delay from above.
        Duration::from_secs_f64(if secs.is_finite() { secs.min(max) } else { max })
    }

    /// The delay before attempt `attempt`, spread by `unit`, a random number in `[0, 1)`.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base(attempt).as_secs_f64();
        let spread = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64((base * spread).clamp(0.0, self.max.as_secs_f64()))
    }

    /// The delay before attempt `attempt`, with a fresh random spread.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, random_unit())
    }
}

/// A random number in `[0, 1)` from a per-thread xorshift generator: enough for jitter.
pub fn random_unit() -> f64 {
    use std::cell::Cell;
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut hasher = RandomState::new().build_hasher();
            hasher.write_u64(0x9e37_79b9_7f4a_7c15);
            hasher.finish() | 1
        });
    }
    STATE.with(|state| {
        // xorshift64*: plenty for jitter.
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Backoff = Backoff::RECONNECT;

    #[test]
    fn grows_by_the_multiplier_from_the_initial_delay() {
        assert_eq!(P.base(1), Duration::from_secs(1));
        assert_eq!(P.base(2), Duration::from_secs_f64(1.6));
        assert!((P.base(3).as_secs_f64() - 2.56).abs() < 1e-9);
        assert!((P.base(5).as_secs_f64() - 6.5536).abs() < 1e-9);
    }

    #[test]
    fn attempt_zero_is_treated_as_the_first() {
        assert_eq!(P.base(0), P.base(1));
    }

    #[test]
    fn is_capped_at_max_and_never_overflows() {
        // 1.6^8 = 42.9 s > 30 s.
        assert_eq!(P.base(9), Duration::from_secs(30));
        assert_eq!(P.base(1_000), Duration::from_secs(30));
        assert_eq!(P.base(u32::MAX), Duration::from_secs(30));
        // Jitter never pushes past the cap either.
        assert_eq!(P.delay_with(50, 0.999_999), Duration::from_secs(30));
    }

    #[test]
    fn jitter_spreads_twenty_percent_each_way() {
        let low = P.delay_with(1, 0.0).as_secs_f64();
        let mid = P.delay_with(1, 0.5).as_secs_f64();
        let high = P.delay_with(1, 1.0).as_secs_f64();
        assert!((low - 0.8).abs() < 1e-9, "{low}");
        assert!((mid - 1.0).abs() < 1e-9, "{mid}");
        assert!((high - 1.2).abs() < 1e-9, "{high}");
        // Below the cap, the low end of a capped attempt is 0.8 × max.
        assert!((P.delay_with(40, 0.0).as_secs_f64() - 24.0).abs() < 1e-9);
    }

    #[test]
    fn random_delays_stay_within_the_band() {
        for attempt in 1..20 {
            let base = P.base(attempt).as_secs_f64();
            for _ in 0..200 {
                let d = P.delay(attempt).as_secs_f64();
                assert!(d >= base * 0.8 - 1e-9 && d <= (base * 1.2).min(30.0) + 1e-9);
            }
        }
    }

    #[test]
    fn random_unit_is_in_range_and_varies() {
        let samples: Vec<f64> = (0..1000).map(|_| random_unit()).collect();
        assert!(samples.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        assert!((0.4..0.6).contains(&mean), "mean {mean}");
    }
}
