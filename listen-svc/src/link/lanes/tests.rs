use super::*;
use crate::link::error::{Closed, Reason};
use crate::link::pending::EntryState;
use shared::backoff::Backoff;
use std::time::Duration;

const ATTEMPTS: Attempts = Attempts {
    max_attempts: 3,
    ack_timeout: Duration::from_secs(10),
    retry_backoff: Backoff {
        initial: Duration::from_secs(1),
        multiplier: 2.0,
        jitter: 0.0,
        max: Duration::from_secs(30),
    },
};

const POLICY: Policy = Policy {
    backoff: Backoff::RECONNECT,
    degrade_after: 5,
    probe_every: Duration::from_secs(30),
    stable_after: Duration::from_secs(10),
};

/// `n` lanes (`10.0.0.1:1`, ...), none connected; windows of `capacity`; at most 4 lanes.
fn lanes(n: usize, capacity: usize) -> Lanes {
    let mut lanes = Lanes::new(4, capacity, ATTEMPTS, Arc::new(EndpointSeries::default()));
    for k in 1..=n {
        let endpoint = format!("10.0.0.{k}:1");
        lanes.add(endpoint.clone(), format!("http://{endpoint}"));
    }
    lanes
}

fn connect_all(lanes: &mut Lanes, now: Instant) {
    for i in 0..lanes.len() {
        lanes[i].connected(i as u64 + 1, format!("pusher-{i}"), now);
    }
}

fn claimed(id: &str) -> Claimed {
    Claimed {
        id: id.into(),
        uid: "u".into(),
        language: "en".into(),
        segments: Vec::new(),
        finished_at_ms: None,
        generation: 1,
        attempts: 0,
        priority: crate::store::Priority::Interactive,
        waited_ms: None,
        trace: Default::default(),
    }
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn pending_of(lanes: &Lanes) -> Vec<usize> {
    lanes.iter().map(|l| l.pending.len()).collect()
}

#[test]
fn the_least_loaded_lane_takes_work_and_ties_go_round_robin() {
    let now = Instant::now();
    let mut lanes = lanes(3, 4);
    assert_eq!(lanes.room(), 0, "no stream, no room");
    assert_eq!(lanes.pick(), None);
    connect_all(&mut lanes, now);
    assert_eq!(lanes.room(), 12);
    let picks: Vec<usize> = (0..6)
        .map(|k| {
            let i = lanes.pick().unwrap();
            assert!(lanes[i].pending.insert(claimed(&format!("c{k}")), now));
            i
        })
        .collect();
    assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    // Fewest pending first, whatever the round-robin says.
    lanes[1].pending.remove("c1");
    lanes[1].pending.remove("c4");
    assert_eq!(lanes.pick(), Some(1));
}

#[test]
fn draining_retiring_and_full_lanes_take_no_work() {
    let now = Instant::now();
    let mut lanes = lanes(3, 1);
    connect_all(&mut lanes, now);
    lanes[0].conn.as_mut().unwrap().draining = true;
    lanes[1].retiring = true;
    assert!(!lanes[0].takes_work() && !lanes[0].sends());
    assert!(!lanes[1].takes_work() && lanes[1].sends());
    assert_eq!(lanes.room(), 1);
    assert!(lanes.place(claimed("a"), now));
    assert_eq!(pending_of(&lanes), [0, 0, 1]);
    assert_eq!(lanes.room(), 0);
    assert_eq!(lanes.pick(), None, "the only lane taking work is full");
}

#[test]
fn a_row_already_held_stays_in_its_window_and_placing_falls_back_to_any_room() {
    let now = Instant::now();
    let mut lanes = lanes(2, 2);
    connect_all(&mut lanes, now);
    assert!(lanes.place(claimed("a"), now));
    let holder = lanes.iter().position(|l| l.pending.contains("a")).unwrap();
    // Re-claimed (its lease lapsed): the same window takes the new generation.
    let mut again = claimed("a");
    again.generation = 2;
    assert!(lanes.place(again, now));
    assert_eq!(lanes.pending_total(), 1);
    assert_eq!(lanes[holder].pending.get("a").unwrap().generation, 2);

    // Lanes changed while a claim was out (no lane takes work now): any window with room.
    for i in 0..2 {
        lanes[i].conn = None;
    }
    assert!(lanes.place(claimed("b"), now));
    assert!(lanes.place(claimed("c"), now));
    assert!(lanes.place(claimed("d"), now));
    assert!(!lanes.place(claimed("e"), now), "every window is full");
    assert_eq!(pending_of(&lanes), [2, 2]);
}

#[tokio::test(start_paused = true)]
async fn work_on_a_failed_lane_moves_with_a_fresh_budget() {
    let t0 = Instant::now();
    let mut lanes = lanes(2, 4);
    connect_all(&mut lanes, t0);
    for id in ["a", "b", "c"] {
        assert!(lanes[0].pending.insert(claimed(id), t0));
        lanes[0].pending.mark_sent(id, 1, t0).unwrap();
    }
    assert!(
        lanes.rebalance(t0).is_empty(),
        "a lane taking work keeps its work"
    );

    tokio::time::advance(Duration::from_secs(1)).await;
    let t1 = Instant::now();
    lanes[0].failed(&Closed::ByPusher.into(), t1, &POLICY, 0.5);
    assert_eq!(lanes.rebalance(t1), vec![("10.0.0.1:1".to_string(), 3)]);
    assert_eq!(pending_of(&lanes), [0, 3]);
    for id in ["a", "b", "c"] {
        let entry = lanes[1].pending.get(id).unwrap();
        assert_eq!(entry.budget_used, 0, "fresh budget");
        assert_eq!(entry.attempt, 1, "attempt numbers carry on");
        assert_eq!(entry.state, EntryState::Waiting { at: t1 }, "due at once");
    }
}

#[test]
fn moves_stop_at_the_room_there_is() {
    let now = Instant::now();
    let mut lanes = lanes(2, 2);
    connect_all(&mut lanes, now);
    for id in ["a", "b"] {
        assert!(lanes[0].pending.insert(claimed(id), now));
    }
    assert!(lanes[1].pending.insert(claimed("c"), now));
    lanes[0].failed(
        &LinkError::Silent(Duration::from_secs(2)),
        now,
        &POLICY,
        0.5,
    );
    assert_eq!(lanes.rebalance(now), vec![("10.0.0.1:1".to_string(), 1)]);
    assert_eq!(pending_of(&lanes), [1, 2]);
}

#[test]
fn a_draining_lane_keeps_what_is_in_flight_and_gives_up_what_waits() {
    let now = Instant::now();
    let mut lanes = lanes(2, 4);
    connect_all(&mut lanes, now);
    for id in ["sent", "waiting"] {
        assert!(lanes[0].pending.insert(claimed(id), now));
    }
    lanes[0].pending.mark_sent("sent", 1, now).unwrap();
    lanes[0].conn.as_mut().unwrap().draining = true;
    assert_eq!(lanes.rebalance(now), vec![("10.0.0.1:1".to_string(), 1)]);
    assert!(lanes[0].pending.contains("sent"), "its ack may still come");
    assert!(lanes[1].pending.contains("waiting"));

    // The draining pusher closes the stream: what it held moves too.
    lanes[0].drained();
    assert_eq!(lanes[0].state, LinkState::Connecting { failures: 0 });
    assert_eq!(lanes.rebalance(now), vec![("10.0.0.1:1".to_string(), 1)]);
    assert_eq!(pending_of(&lanes), [0, 2]);
}

#[test]
fn with_one_lane_work_waits_for_its_next_stream() {
    let now = Instant::now();
    let mut lanes = lanes(1, 4);
    connect_all(&mut lanes, now);
    assert!(lanes.place(claimed("a"), now));
    lanes[0].pending.mark_sent("a", 1, now).unwrap();
    lanes[0].failed(&Closed::Outbound.into(), now, &POLICY, 0.5);
    assert!(lanes.rebalance(now).is_empty());
    assert_eq!(lanes[0].connected(2, "p".into(), now), 1, "replayed");
    assert_eq!(lanes[0].pending.get("a").unwrap().budget_used, 0);
}

#[test]
fn a_dns_answer_adds_retires_and_brings_back_lanes_within_the_bound() {
    let now = Instant::now();
    let mut lanes = lanes(0, 4);
    let changes = lanes.reconcile(addrs(&["10.0.0.1:1", "10.0.0.2:1"]), "http");
    assert_eq!(changes.joined, ["10.0.0.1:1", "10.0.0.2:1"]);
    assert_eq!(lanes[1].uri, "http://10.0.0.2:1");
    connect_all(&mut lanes, now);
    assert!(lanes[0].pending.insert(claimed("a"), now));

    // 10.0.0.1 leaves: it retires (no new work) and keeps its window until that moves.
    let changes = lanes.reconcile(addrs(&["10.0.0.2:1", "10.0.0.3:1"]), "https");
    assert_eq!(changes.retired, [("10.0.0.1:1".to_string(), 1)]);
    assert_eq!(changes.joined, ["10.0.0.3:1"]);
    assert_eq!(lanes[2].uri, "https://10.0.0.3:1");
    assert!(lanes[0].retiring && !lanes[0].takes_work());
    assert!(!lanes[0].wants_connect());
    assert!(
        lanes.drop_retired(false).is_empty(),
        "its window is not empty"
    );

    // Back in DNS before it was dropped.
    let changes = lanes.reconcile(addrs(&["10.0.0.1:1", "10.0.0.2:1"]), "http");
    assert_eq!(changes.returned, ["10.0.0.1:1"]);
    assert_eq!(changes.retired, [("10.0.0.3:1".to_string(), 0)]);
    assert!(lanes[0].takes_work());

    // Retiring lanes count towards the bound (4) until dropped; the answer is truncated.
    let changes = lanes.reconcile(
        addrs(&[
            "10.0.0.4:1",
            "10.0.0.5:1",
            "10.0.0.6:1",
            "10.0.0.7:1",
            "10.0.0.8:1",
        ]),
        "http",
    );
    assert_eq!(changes.truncated_from, Some(5));
    assert_eq!(changes.joined, ["10.0.0.4:1"]);
    assert_eq!(lanes.len(), 4);
}

#[test]
fn retired_lanes_are_dropped_once_empty_and_never_while_a_claim_is_out() {
    let now = Instant::now();
    let mut lanes = lanes(3, 4);
    connect_all(&mut lanes, now);
    assert!(lanes[0].pending.insert(claimed("a"), now));
    lanes.reconcile(addrs(&["10.0.0.3:1"]), "http");
    lanes[1].opening = true;
    assert!(lanes.drop_retired(true).is_empty(), "a claim is out");
    assert!(
        lanes.drop_retired(false).is_empty(),
        "one holds work, one has a connect out"
    );
    lanes[1].opening = false;
    let gone: Vec<String> = lanes
        .drop_retired(false)
        .into_iter()
        .map(|l| l.endpoint)
        .collect();
    assert_eq!(gone, ["10.0.0.2:1"]);
    // The retiring lane's work moves; then it goes too.
    assert_eq!(lanes.rebalance(now), vec![("10.0.0.1:1".to_string(), 1)]);
    assert_eq!(lanes.drop_retired(false).len(), 1);
    assert_eq!(lanes.len(), 1);
    assert!(lanes.holding("a").is_some());
}

#[test]
fn failures_are_counted_by_reason_and_reconnects_from_the_second_stream() {
    let now = Instant::now();
    let mut lanes = lanes(1, 4);
    let error = LinkError::Connect {
        uri: "http://10.0.0.1:1".into(),
        detail: "refused".into(),
    };
    lanes[0].failed(&error, now, &POLICY, 0.5);
    let lane = &lanes[0];
    assert_eq!(lane.metrics.failures[Reason::Connect as usize].get(), 1);
    assert_eq!(
        lane.metrics.failures.iter().map(|c| c.get()).sum::<u64>(),
        1
    );
    assert!(matches!(lane.state, LinkState::Backoff { failures: 1, .. }));
    let snapshot = lane.snapshot();
    assert_eq!(snapshot.last_error, error.to_string());
    assert_eq!(snapshot.consecutive_failures, 1);

    lanes[0].connected(1, "p".into(), now);
    assert_eq!(
        lanes[0].snapshot().reconnects,
        0,
        "the first stream is no reconnect"
    );
    assert_eq!(lanes[0].consecutive_failures, 0);
    lanes[0].drained();
    lanes[0].connected(2, "p".into(), now);
    assert_eq!(lanes[0].snapshot().reconnects, 1);
    assert_eq!(lanes[0].metrics.reconnects.get(), 1);
}

#[test]
fn the_link_is_as_alive_as_its_most_alive_lane() {
    let now = Instant::now();
    let mut lanes = lanes(2, 1);
    assert_eq!(lanes.state(), Wire::Connecting);
    lanes[1].connected(1, "p".into(), now);
    assert_eq!(lanes.state(), Wire::Connected);
    lanes[0].failed(&Closed::ByPusher.into(), now, &POLICY, 0.5);
    assert_eq!(lanes.state(), Wire::Connected, "one lane up is enough");
    lanes[1].failed(&Closed::ByPusher.into(), now, &POLICY, 0.5);
    assert_eq!(lanes.state(), Wire::Backoff);
    assert_eq!(
        Lanes::new(1, 1, ATTEMPTS, Arc::new(EndpointSeries::default())).state(),
        Wire::Connecting
    );
}
