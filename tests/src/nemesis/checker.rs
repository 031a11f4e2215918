//! The checker: after every fault is healed, reads the outcome of every acknowledged
//! conversation through listen's own API, the webhook receiver's records and the pushers'
//! logs, and holds them against the ground truth the load recorded.
//!
//! 1. every acknowledged conversation reaches COMPLETED, DISCARDED, or FAILED with a reason,
//!    within the heal timeout: none lost (NOT_FOUND), none stranded (IN_PROGRESS, PROCESSING);
//! 2. every acknowledged segment is in its conversation, in order;
//! 3. every webhook delivery of a conversation carries the same idempotency key, and every
//!    COMPLETED conversation's webhook was delivered;
//! 4. pusher runs per conversation: more than one only if a fault that can cause a re-run
//!    (one on a listen, the database, or a pusher that ran it, its DNS entry or a path to it)
//!    was active between its acknowledgement and its last run (a re-run needs a lost ack, a
//!    lost cache or a moved lease);
//! 5. each listen's health answered throughout, except while that listen was down;
//! 6. each process's RSS after the run is within a bound of before.

use super::cluster::Cluster;
use super::faults::Timeline;
use super::health::{self, Misses};
use super::load::Expected;
use super::schedule::Target;
use crate::http::Recorded;
use crate::listen::{Conversation, ConversationStatus, ConversationView, GetConversationRequest};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

/// How often unsettled conversations are read again.
const POLL: Duration = Duration::from_millis(250);

/// What became of each acknowledged conversation.
pub struct Settled {
    /// The last read of each (None: NOT_FOUND).
    pub outcomes: HashMap<String, Option<Conversation>>,
    /// From the heal until the last one settled; None if some never did.
    pub recovery: Option<Duration>,
}

fn is_settled(conversation: &Conversation) -> bool {
    [
        ConversationStatus::Completed,
        ConversationStatus::Failed,
        ConversationStatus::Discarded,
    ]
    .iter()
    .any(|s| conversation.status == *s as i32)
}

/// Reads every conversation in `ids` until each is settled or NOT_FOUND, or `timeout`
/// passes (from `healed`).
pub async fn settle(
    cluster: &Cluster,
    ids: Vec<String>,
    healed: Instant,
    timeout: Duration,
) -> Settled {
    let mut outcomes = HashMap::new();
    let mut open: Vec<String> = ids;
    let mut reader = 0;
    loop {
        let mut still = Vec::new();
        for id in open {
            reader = (reader + 1) % cluster.listen_addrs.len();
            let request = GetConversationRequest {
                conversation_id: id.clone(),
                view: ConversationView::Full as i32,
            };
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                cluster.client(reader).get_conversation(request),
            )
            .await;
            match answer {
                Ok(Ok(conversation)) => {
                    let conversation = conversation.into_inner();
                    if !is_settled(&conversation) {
                        still.push(id.clone());
                    }
                    outcomes.insert(id, Some(conversation));
                }
                Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                    outcomes.insert(id, None);
                }
                // Unavailable for now: read it again.
                _ => still.push(id),
            }
        }
        if still.is_empty() {
            return Settled {
                outcomes,
                recovery: Some(healed.elapsed()),
            };
        }
        if healed.elapsed() > timeout {
            return Settled {
                outcomes,
                recovery: None,
            };
        }
        open = still;
        tokio::time::sleep(POLL).await;
    }
}

/// Violations of checks 1 and 2, and counts of outcomes by status.
pub fn check_outcomes(
    expected: &HashMap<String, Expected>,
    settled: &Settled,
    violations: &mut Vec<String>,
) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for (id, want) in expected {
        let outcome = settled.outcomes.get(id).cloned().flatten();
        let Some(conversation) = outcome else {
            *counts.entry("lost").or_default() += 1;
            violations.push(format!("lost: {id} was acknowledged and is not found"));
            continue;
        };
        let status = ConversationStatus::try_from(conversation.status).unwrap_or_default();
        let name = match status {
            ConversationStatus::Completed => "completed",
            ConversationStatus::Failed => "failed",
            ConversationStatus::Discarded => "discarded",
            _ => "stranded",
        };
        *counts.entry(name).or_default() += 1;
        if name == "stranded" {
            violations.push(format!(
                "stranded: {id} is still {status:?} after the heal timeout"
            ));
        }
        if status == ConversationStatus::Failed && conversation.last_error.is_empty() {
            violations.push(format!("failed without a reason: {id}"));
        }
        let stored: Vec<&str> = conversation
            .segments
            .iter()
            .map(|s| s.text.as_str())
            .collect();
        if let Some(problem) = segments_problem(&want.texts, &stored, want.exact) {
            violations.push(format!("segments of {id}: {problem}"));
        }
    }
    counts
}

/// Why `stored` does not hold the acknowledged `texts` (exactly, or in order among others).
pub fn segments_problem(texts: &[String], stored: &[&str], exact: bool) -> Option<String> {
    if exact {
        return (texts != stored).then(|| format!("submitted {texts:?}, stored {stored:?}"));
    }
    let mut rest = stored.iter();
    for text in texts {
        if !rest.any(|s| s == text) {
            let why = if stored.contains(&text.as_str()) {
                "out of order"
            } else {
                "missing"
            };
            return Some(format!(
                "acknowledged segment {text:?} {why} (stored {} segments)",
                stored.len()
            ));
        }
    }
    None
}

/// Check 3: idempotency keys per conversation in the webhook deliveries (the key is
/// `<conversation id>:<revision>`), and each COMPLETED conversation announced: its stored
/// delivery says delivered (the receiver always answers 200) and the receiver has it.
/// Returns how many deliveries there were.
pub fn check_webhooks(
    requests: &[Recorded],
    settled: &Settled,
    violations: &mut Vec<String>,
) -> usize {
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for request in requests {
        let key = request.header("idempotency-key");
        let id = key.split(':').next().unwrap_or_default().to_string();
        keys.entry(id).or_default().insert(key.to_string());
    }
    for (id, keys) in &keys {
        if keys.len() > 1 {
            violations.push(format!(
                "webhook deliveries of {id} carry {} idempotency keys: {keys:?}",
                keys.len()
            ));
        }
    }
    for (id, conversation) in &settled.outcomes {
        let Some(conversation) = conversation else {
            continue;
        };
        if conversation.status != ConversationStatus::Completed as i32 {
            continue;
        }
        let delivered = conversation.deliveries.iter().all(|d| d.delivered);
        if conversation.deliveries.is_empty() || !delivered {
            violations.push(format!(
                "{id} is COMPLETED but its webhook is not delivered: {:?}",
                conversation.deliveries
            ));
        } else if !keys.contains_key(id) {
            violations.push(format!(
                "{id}: the store says its webhook was delivered; the receiver has no delivery"
            ));
        }
    }
    requests.len()
}

/// One pusher job run, from a pusher's log.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    /// Which pusher ran it (its index in the cluster).
    pub pusher: usize,
    /// When it finished, by the pusher's clock (the true one: only listens' clocks shift).
    pub at: Option<SystemTime>,
}

/// Runs per conversation, from pushers' JSON logs (a `processed` event in a `job` span),
/// `logs[i]` being pusher i's.
pub fn runs_in_logs(logs: &[String]) -> HashMap<String, Vec<Run>> {
    let mut runs: HashMap<String, Vec<Run>> = HashMap::new();
    for (pusher, log) in logs.iter().enumerate() {
        for line in log.lines() {
            if !line.contains("\"message\":\"processed\"") {
                continue;
            }
            let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(id) = event["span"]["conversation_id"].as_str() {
                let at = event["timestamp"]
                    .as_str()
                    .and_then(|t| humantime::parse_rfc3339(t).ok());
                runs.entry(id.to_string())
                    .or_default()
                    .push(Run { pusher, at });
            }
        }
    }
    runs
}

/// How long after its heal a fault can still cause a re-run: listen's ack timeout (15 s,
/// a send lost in a blackhole is re-sent after it) plus a lease (3 s) and some slack.
const RERUN_LINGER: Duration = Duration::from_secs(20);

/// Check 4: returns the distribution (runs -> conversations) and the duplicate runs.
/// `clock` pairs an Instant with the wall clock read at the same moment, to place the
/// pushers' log timestamps on the timeline.
pub fn check_runs(
    expected: &HashMap<String, Expected>,
    runs: &HashMap<String, Vec<Run>>,
    timeline: &Timeline,
    clock: (Instant, SystemTime),
    violations: &mut Vec<String>,
) -> (BTreeMap<usize, usize>, usize) {
    let applied = timeline.applied.lock().unwrap();
    let to_instant = |at: SystemTime| match at.duration_since(clock.1) {
        Ok(after) => clock.0 + after,
        Err(before) => clock.0.checked_sub(before.duration()).unwrap_or(clock.0),
    };
    let mut distribution = BTreeMap::new();
    let mut duplicates = 0;
    for (id, want) in expected {
        let mine = runs.get(id).map(Vec::as_slice).unwrap_or_default();
        let n = mine.len();
        *distribution.entry(n).or_default() += 1;
        if n <= 1 {
            continue;
        }
        duplicates += n - 1;
        // The last run; None (unbounded) if a run's time is unknown.
        let last = mine
            .iter()
            .map(|run| run.at.map(to_instant))
            .try_fold(want.acked_at, |last, at| at.map(|at| last.max(at)));
        let ran_on = |pusher: usize| mine.iter().any(|run| run.pusher == pusher);
        let excused = applied.iter().any(|fault| {
            let can_cause = match fault.fault.target {
                Target::Listen(_) | Target::Postgres => true,
                Target::Pusher(p) | Target::Dns(p) | Target::Path { pusher: p, .. } => ran_on(p),
            };
            can_cause
                && last.is_none_or(|last| fault.began <= last)
                && fault.ended + RERUN_LINGER >= want.acked_at
        });
        if !excused {
            let pushers: BTreeSet<usize> = mine.iter().map(|run| run.pusher).collect();
            violations.push(format!(
                "{id} ran {n} times (on pushers {pushers:?}) with no fault on a listen, the \
                 database or those pushers between its acknowledgement and its last run"
            ));
        }
    }
    (distribution, duplicates)
}

/// Check 5: returns the longest stretch a listen did not answer health while up.
pub fn check_health(
    misses: &Misses,
    timeline: &Timeline,
    bound: Duration,
    violations: &mut Vec<String>,
) -> Duration {
    // Slack after a restart or a SIGCONT: the harness marks it up once it answered.
    let slack = health::CHECK_TIMEOUT + health::INTERVAL;
    let mut unexcused: Vec<(usize, Instant)> = misses
        .at
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, at)| !timeline.was_down(*i, *at, slack))
        .copied()
        .collect();
    unexcused.sort();
    let mut longest = Duration::ZERO;
    let mut stretch: Option<(usize, Instant, Instant)> = None;
    let mut close = |stretch: Option<(usize, Instant, Instant)>, violations: &mut Vec<String>| {
        if let Some((i, from, to)) = stretch {
            let length = to + health::CHECK_TIMEOUT - from;
            longest = longest.max(length);
            if length > bound {
                violations.push(format!(
                    "listen{i} did not answer health for {length:?} while up"
                ));
            }
        }
    };
    for (i, at) in unexcused {
        stretch = match stretch {
            Some((j, from, to))
                if j == i && at - to <= health::INTERVAL + health::CHECK_TIMEOUT * 2 =>
            {
                Some((j, from, at))
            }
            other => {
                close(other, violations);
                Some((i, at, at))
            }
        };
    }
    close(stretch, violations);
    longest
}

/// Check 6: each RSS after (KiB) within `factor` × before + `slack_kib`.
pub fn check_rss(
    name: &str,
    before: u64,
    after: u64,
    factor: f64,
    slack_kib: u64,
    violations: &mut Vec<String>,
) {
    let bound = (before as f64 * factor) as u64 + slack_kib;
    if after > bound {
        violations.push(format!(
            "{name}: RSS {after} KiB after the run, more than {bound} KiB ({before} KiB before)"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_segments_must_be_stored_in_order() {
        let texts = vec!["a".to_string(), "b".to_string()];
        assert_eq!(segments_problem(&texts, &["a", "x", "b"], false), None);
        assert!(
            segments_problem(&texts, &["b", "a"], false)
                .unwrap()
                .contains("out of order")
        );
        assert!(
            segments_problem(&texts, &["a"], false)
                .unwrap()
                .contains("missing")
        );
        assert_eq!(segments_problem(&texts, &["a", "b"], true), None);
        assert!(segments_problem(&texts, &["a", "x", "b"], true).is_some());
    }

    #[test]
    fn runs_are_counted_from_processed_events_in_job_spans() {
        let pusher0 = [
            r#"{"timestamp":"2026-12-01T07:13:42.503783Z","level":"DEBUG","message":"processed","elapsed_ms":3,"span":{"attempt":1,"conversation_id":"c1","name":"job"}}"#,
            r#"{"timestamp":"2026-12-01T07:13:42.5Z","level":"INFO","message":"accepted","span":{"conversation_id":"c2","name":"job"}}"#,
            r#"{"timestamp":"2026-12-01T07:13:43Z","level":"DEBUG","message":"processed","span":{"conversation_id":"c3","name":"job"}}"#,
        ]
        .join("\n");
        let pusher1 = r#"{"timestamp":"t","level":"DEBUG","message":"processed","span":{"conversation_id":"c1","name":"job"}}"#;
        let runs = runs_in_logs(&[pusher0, pusher1.to_string()]);
        let c1 = &runs["c1"];
        assert_eq!(c1.len(), 2);
        assert_eq!(c1[0].pusher, 0);
        assert_eq!(
            c1[0].at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_109_222_503_783))
        );
        assert_eq!(
            c1[1],
            Run {
                pusher: 1,
                at: None
            }
        );
        assert_eq!(runs.get("c2"), None);
        assert_eq!(runs["c3"].len(), 1);
    }

    /// Misses of listen 0 every 250 ms for `length`, from `from`.
    fn misses(from: Instant, length: Duration) -> Misses {
        let misses = Misses::default();
        let mut at = from;
        while at <= from + length {
            misses.at.lock().unwrap().push((0, at));
            at += health::INTERVAL;
        }
        misses
    }

    #[test]
    fn health_misses_count_only_while_the_listen_was_up() {
        let start = Instant::now();
        let long = misses(start, Duration::from_secs(4));
        let timeline = Timeline::default();
        let mut violations = Vec::new();
        let gap = check_health(&long, &timeline, Duration::from_secs(3), &mut violations);
        assert!(gap >= Duration::from_secs(4), "{gap:?}");
        assert_eq!(violations.len(), 1, "{violations:?}");

        // The same stretch while listen 0 was down is excused; listen 1's downtime is not.
        timeline.down.lock().unwrap().push((1, start, None));
        timeline
            .down
            .lock()
            .unwrap()
            .push((0, start, Some(start + Duration::from_secs(4))));
        let mut violations = Vec::new();
        let gap = check_health(&long, &timeline, Duration::from_secs(3), &mut violations);
        assert_eq!((gap, violations.len()), (Duration::ZERO, 0));

        // A short stretch while up is within the bound.
        let short = misses(start, Duration::from_secs(1));
        let mut violations = Vec::new();
        check_health(
            &short,
            &Timeline::default(),
            Duration::from_secs(3),
            &mut violations,
        );
        assert!(violations.is_empty(), "{violations:?}");
    }

    #[test]
    fn a_rerun_needs_a_fault_that_can_cause_it_between_acknowledgement_and_last_run() {
        let clock = (Instant::now(), SystemTime::now());
        let at = |s: u64| clock.0 + Duration::from_secs(s);
        let expected = |acked: u64| Expected {
            texts: Vec::new(),
            exact: false,
            acked_at: at(acked),
        };
        let run = |pusher, s: u64| Run {
            pusher,
            at: Some(clock.1 + Duration::from_secs(s)),
        };
        let fault_on = |target, began: u64| crate::nemesis::faults::Applied {
            fault: crate::nemesis::schedule::Fault {
                at: Duration::ZERO,
                lasts: Duration::from_secs(1),
                kind: crate::nemesis::schedule::Kind::Kill,
                target,
                shift_s: 0,
            },
            began: at(began),
            ended: at(began + 1),
        };
        // Pusher 0 killed from 10 s to 11 s.
        let timeline = Timeline::default();
        timeline
            .applied
            .lock()
            .unwrap()
            .push(fault_on(Target::Pusher(0), 10));
        let check = |acked, runs: Vec<Run>| {
            let mut violations = Vec::new();
            let (distribution, duplicates) = check_runs(
                &HashMap::from([("c".to_string(), expected(acked))]),
                &HashMap::from([("c".to_string(), runs)]),
                &timeline,
                clock,
                &mut violations,
            );
            (distribution, duplicates, violations.len())
        };
        let (distribution, duplicates, violations) = check(5, vec![run(0, 9), run(1, 12)]);
        assert_eq!((distribution[&2], duplicates, violations), (1, 1, 0));
        // A fault on a pusher that never ran it excuses nothing.
        assert_eq!(check(5, vec![run(1, 9), run(2, 12)]).2, 1);
        // Nor one that began after the last run, or ended long before the acknowledgement.
        assert_eq!(check(2, vec![run(0, 4), run(1, 6)]).2, 1);
        assert_eq!(check(40, vec![run(0, 41), run(1, 45)]).2, 1);
        // Soon after it, a send lost in it may still be re-sent.
        assert_eq!(check(25, vec![run(0, 26), run(1, 41)]).2, 0);
        // A run without a timestamp may have been at any time after the acknowledgement.
        assert_eq!(
            check(
                5,
                vec![
                    run(0, 6),
                    Run {
                        pusher: 1,
                        at: None
                    }
                ]
            )
            .2,
            0
        );
        // A listen's fault can re-run anything.
        timeline
            .applied
            .lock()
            .unwrap()
            .push(fault_on(Target::Listen(1), 60));
        assert_eq!(check(62, vec![run(1, 63), run(2, 70)]).2, 0);
        assert_eq!(
            check(0, vec![run(0, 1)]).2,
            0,
            "one run is never a violation"
        );
    }

    #[test]
    fn rss_beyond_the_bound_is_a_violation() {
        let mut violations = Vec::new();
        check_rss("listen0", 10_000, 20_000 + 1024, 2.0, 1024, &mut violations);
        assert!(violations.is_empty());
        check_rss("listen0", 10_000, 20_000 + 1025, 2.0, 1024, &mut violations);
        assert_eq!(violations.len(), 1);
    }
}
