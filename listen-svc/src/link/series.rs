//! The per-endpoint metric series (`endpoint` label: one value per pusher address).
//!
//! Pusher pods come and go under an autoscaler, and each brings a new address. Series kept
//! by the `metrics` recorder can never be removed, so a departed pod would leave its series
//! behind for the life of the process (an `up` of 0 that alerts, and cardinality that only
//! grows). These are rendered at scrape time instead, from the lanes that exist then: a lane
//! registers its [`LaneMetrics`] when it is made, and dropping the lane drops its series.

use super::error::Reason;
use shared::metrics::{Buckets, Collector, Count, Family, Level};
use std::sync::{Arc, Mutex};

/// The `result` label of `listen_link_acks_total`, in [`LaneStats::acks`] order.
pub(super) const ACK_RESULTS: [&str; 4] = ["processed", "failed", "retry", "ignored"];

/// One endpoint's values.
pub(super) struct LaneStats {
    endpoint: String,
    pub(super) state: Level,
    pub(super) up: Level,
    pub(super) pending: Level,
    pub(super) sent: Count,
    pub(super) resent: Count,
    pub(super) busy: Count,
    pub(super) reconnects: Count,
    /// By [`Reason::ALL`] (the `reason` label).
    pub(super) failures: [Count; Reason::ALL.len()],
    /// By [`ACK_RESULTS`].
    pub(super) acks: [Count; 4],
    pub(super) ack_latency: Buckets,
}

/// The lanes whose series a scrape renders (at most `--max-pusher-endpoints`: lanes are).
#[derive(Default)]
pub(super) struct EndpointSeries {
    lanes: Mutex<Vec<Arc<LaneStats>>>,
}

impl EndpointSeries {
    /// A new set, rendered by this process's `/metrics` from now on (replacing any earlier
    /// link's).
    pub(super) fn install() -> Arc<Self> {
        let series = Arc::new(EndpointSeries::default());
        shared::metrics::register_collector(
            "listen_link_endpoints",
            Arc::clone(&series) as Arc<dyn Collector>,
        );
        series
    }

    /// Series for `endpoint`, rendered until the returned value is dropped.
    pub(super) fn add(self: &Arc<Self>, endpoint: &str) -> LaneMetrics {
        let stats = Arc::new(LaneStats {
            endpoint: endpoint.to_string(),
            state: Level::default(),
            up: Level::default(),
            pending: Level::default(),
            sent: Count::default(),
            resent: Count::default(),
            busy: Count::default(),
            reconnects: Count::default(),
            failures: Default::default(),
            acks: Default::default(),
            ack_latency: Buckets::default(),
        });
        self.lock().push(Arc::clone(&stats));
        LaneMetrics {
            stats,
            series: Arc::clone(self),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<LaneStats>>> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Collector for EndpointSeries {
    fn collect(&self, out: &mut String) {
        let lanes = self.lock().clone();
        let per_lane = |out: &mut String, name, kind, value: fn(&LaneStats) -> f64| {
            let mut family = Family::new(out, name, kind);
            for lane in &lanes {
                family.sample(&[("endpoint", &lane.endpoint)], value(lane));
            }
        };
        per_lane(out, "listen_link_endpoint_state", "gauge", |l| {
            l.state.get()
        });
        per_lane(out, "listen_link_endpoint_up", "gauge", |l| l.up.get());
        per_lane(out, "listen_link_endpoint_pending", "gauge", |l| {
            l.pending.get()
        });
        per_lane(out, "listen_link_sent_total", "counter", |l| {
            l.sent.get() as f64
        });
        per_lane(out, "listen_link_resent_total", "counter", |l| {
            l.resent.get() as f64
        });
        per_lane(out, "listen_link_busy_total", "counter", |l| {
            l.busy.get() as f64
        });
        per_lane(out, "listen_link_reconnects_total", "counter", |l| {
            l.reconnects.get() as f64
        });
        let mut failures = Family::new(out, "listen_link_failures_total", "counter");
        for lane in &lanes {
            for (reason, count) in Reason::ALL.iter().zip(&lane.failures) {
                failures.sample(
                    &[("endpoint", &lane.endpoint), ("reason", reason.as_str())],
                    count.get() as f64,
                );
            }
        }
        let mut acks = Family::new(out, "listen_link_acks_total", "counter");
        for lane in &lanes {
            for (result, count) in ACK_RESULTS.iter().zip(&lane.acks) {
                acks.sample(
                    &[("endpoint", &lane.endpoint), ("result", result)],
                    count.get() as f64,
                );
            }
        }
        let mut latency = Family::new(out, "listen_link_ack_latency_seconds", "histogram");
        for lane in &lanes {
            latency.histogram(&[("endpoint", &lane.endpoint)], &lane.ack_latency);
        }
    }
}

/// A lane's handle on its series; they leave the scrape when this is dropped.
pub(super) struct LaneMetrics {
    stats: Arc<LaneStats>,
    series: Arc<EndpointSeries>,
}

impl std::ops::Deref for LaneMetrics {
    type Target = LaneStats;

    fn deref(&self) -> &LaneStats {
        &self.stats
    }
}

impl Drop for LaneMetrics {
    fn drop(&mut self) {
        self.series
            .lock()
            .retain(|lane| !Arc::ptr_eq(lane, &self.stats));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(series: &EndpointSeries) -> String {
        let mut out = String::new();
        series.collect(&mut out);
        out
    }

    #[test]
    fn a_dropped_lane_leaves_the_scrape_and_the_others_stay() {
        let series = Arc::new(EndpointSeries::default());
        let a = series.add("10.0.0.1:50052");
        let b = series.add("10.0.0.2:50052");
        a.sent.increment(3);
        a.up.set(1.0);
        a.acks[0].increment(2);
        a.failures[Reason::Silent as usize].increment(1);
        b.ack_latency.record(0.002);

        let text = scrape(&series);
        assert!(text.contains("listen_link_sent_total{endpoint=\"10.0.0.1:50052\"} 3\n"));
        assert!(text.contains("listen_link_endpoint_up{endpoint=\"10.0.0.1:50052\"} 1\n"));
        assert!(text.contains(
            "listen_link_acks_total{endpoint=\"10.0.0.1:50052\",result=\"processed\"} 2\n"
        ));
        assert!(
            text.contains("listen_link_ack_latency_seconds_count{endpoint=\"10.0.0.2:50052\"} 1\n")
        );
        assert!(text.contains(
            "listen_link_failures_total{endpoint=\"10.0.0.1:50052\",reason=\"silent\"} 1\n"
        ));
        assert!(text.contains(
            "listen_link_failures_total{endpoint=\"10.0.0.1:50052\",reason=\"connect\"} 0\n"
        ));
        assert_eq!(
            text.matches("# TYPE listen_link_sent_total counter")
                .count(),
            1
        );

        drop(a);
        let text = scrape(&series);
        assert!(
            !text.contains("10.0.0.1"),
            "dropped lane still scraped:\n{text}"
        );
        assert!(text.contains("listen_link_sent_total{endpoint=\"10.0.0.2:50052\"} 0\n"));

        drop(b);
        assert_eq!(scrape(&series), "", "no lanes, no families");
    }
}
