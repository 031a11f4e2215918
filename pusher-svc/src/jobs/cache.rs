//! Recent successful results, so a re-sent conversation is answered without processing it
//! again.
//!
//! Bounds, enforced in [`ResultCache::insert`] and [`ResultCache::get`]: at most `capacity`
//! entries, each kept for `ttl`; the oldest entry leaves first. A capacity of 0 keeps
//! nothing. Each entry has exactly one record in the insertion order, so that queue holds at
//! most `capacity` records too.

use shared::proto::pusher::v1::Processed;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Recent successful results, bounded by count and age. Oldest first out.
#[derive(Default)]
pub(super) struct ResultCache {
    capacity: usize,
    ttl: Duration,
    entries: HashMap<String, (Processed, Instant)>,
    /// Insertion order, oldest first: one `(id, inserted)` record per entry.
    order: VecDeque<(String, Instant)>,
}

impl ResultCache {
    pub(super) fn new(capacity: usize, ttl: Duration) -> Self {
        ResultCache {
            capacity,
            ttl,
            ..Default::default()
        }
    }

    /// The result for `id`, if one was inserted less than `ttl` before `now`.
    pub(super) fn get(&mut self, id: &str, now: Instant) -> Option<Processed> {
        self.expire(now);
        self.entries.get(id).map(|(processed, _)| processed.clone())
    }

    /// Keeps `processed` for `id` from `now`, replacing (and refreshing) an earlier result,
    /// and evicts the oldest entries beyond `capacity`.
    pub(super) fn insert(&mut self, id: String, processed: Processed, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        self.expire(now);
        if self.entries.insert(id.clone(), (processed, now)).is_some() {
            // A replaced entry gives up its old place in the order.
            self.order.retain(|(queued, _)| *queued != id);
        }
        self.order.push_back((id, now));
        while self.entries.len() > self.capacity {
            self.pop_oldest();
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) >= self.ttl)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((id, _)) = self.order.pop_front() {
            self.entries.remove(&id);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::proto::pusher::v1::Structured;

    fn processed(title: &str) -> Processed {
        Processed {
            structured: Some(Structured {
                title: title.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn cache_is_bounded_by_size_and_age() {
        let mut cache = ResultCache::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        let s = processed;
        cache.insert("a".into(), s("a"), t0);
        cache.insert("b".into(), s("b"), t0 + Duration::from_secs(1));
        cache.insert("c".into(), s("c"), t0 + Duration::from_secs(2));
        assert_eq!(cache.len(), 2, "oldest evicted at capacity");
        assert!(cache.get("a", t0 + Duration::from_secs(2)).is_none());
        assert_eq!(
            cache
                .get("b", t0 + Duration::from_secs(2))
                .unwrap()
                .structured
                .unwrap()
                .title,
            "b"
        );
        assert!(
            cache.get("b", t0 + Duration::from_secs(11)).is_none(),
            "expired"
        );
        assert!(cache.get("c", t0 + Duration::from_secs(11)).is_some());
        // Re-inserting a key refreshes it rather than leaving it to expire early.
        cache.insert("c".into(), s("c2"), t0 + Duration::from_secs(11));
        assert_eq!(
            cache
                .get("c", t0 + Duration::from_secs(20))
                .unwrap()
                .structured
                .unwrap()
                .title,
            "c2"
        );
        let mut disabled = ResultCache::new(0, Duration::from_secs(10));
        disabled.insert("a".into(), s("a"), t0);
        assert!(disabled.get("a", t0).is_none());
    }

    #[test]
    fn replacing_an_entry_keeps_one_order_record_and_evicts_by_the_newest_insert() {
        let mut cache = ResultCache::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        for second in 0..100 {
            cache.insert("a".into(), processed("a"), t0 + Duration::from_secs(second));
        }
        assert_eq!((cache.len(), cache.order.len()), (1, 1));
        let t = t0 + Duration::from_secs(100);
        cache.insert("b".into(), processed("b"), t);
        cache.insert("a".into(), processed("a2"), t + Duration::from_secs(1));
        cache.insert("c".into(), processed("c"), t + Duration::from_secs(2));
        // "a" was refreshed after "b", so "b" is the oldest and leaves first.
        assert!(cache.get("b", t + Duration::from_secs(2)).is_none());
        assert!(cache.get("a", t + Duration::from_secs(2)).is_some());
        assert_eq!(cache.order.len(), 2);
    }
}
