//! Carrying out the schedule: each fault is applied at its time, held for its length and
//! healed, on the real processes, proxies, DNS and database. The timeline records when each
//! fault really began and ended, when each listen was down (and so excused from answering
//! health), and how long each restart took.

use super::cluster::Cluster;
use super::schedule::{Fault, Kind, Target};
use crate::proxy::Mode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a SIGTERMed process may take to drain and exit.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// A fault as it happened.
#[derive(Clone, Debug)]
pub struct Applied {
    pub fault: Fault,
    pub began: Instant,
    pub ended: Instant,
}

#[derive(Default)]
pub struct Timeline {
    pub applied: Mutex<Vec<Applied>>,
    /// Per listen: intervals it was down or frozen, from the signal until healthy again.
    pub down: Mutex<Vec<(usize, Instant, Option<Instant>)>>,
    /// How long each restart took, from the heal until the process answered health.
    pub restarts: Mutex<Vec<Duration>>,
}

impl Timeline {
    fn listen_down(&self, target: Target) {
        if let Target::Listen(i) = target {
            self.down.lock().unwrap().push((i, Instant::now(), None));
        }
    }

    fn listen_up(&self, target: Target) {
        if let Target::Listen(i) = target
            && let Some(open) = self
                .down
                .lock()
                .unwrap()
                .iter_mut()
                .rev()
                .find(|(listen, _, end)| *listen == i && end.is_none())
        {
            open.2 = Some(Instant::now());
        }
    }

    /// Whether listen `i` was down at `at`, allowing `slack` after it came back.
    pub fn was_down(&self, i: usize, at: Instant, slack: Duration) -> bool {
        self.down.lock().unwrap().iter().any(|(listen, from, to)| {
            *listen == i && *from <= at && to.is_none_or(|to| at <= to + slack)
        })
    }
}

/// Waits for `fault`'s time (from `start`), applies it, holds it, heals it.
pub async fn carry_out(
    cluster: Arc<Cluster>,
    timeline: Arc<Timeline>,
    fault: Fault,
    start: Instant,
) {
    tokio::time::sleep_until((start + fault.at).into()).await;
    let began = Instant::now();
    apply(&cluster, &timeline, &fault).await;
    tokio::time::sleep_until((began + fault.lasts).into()).await;
    let healing = Instant::now();
    heal(&cluster, &timeline, &fault).await;
    // Progress on stderr, for whoever watches a long run.
    eprintln!(
        "nemesis: {:>7.1}s {fault} (healed in {:.1}s)",
        start.elapsed().as_secs_f64(),
        healing.elapsed().as_secs_f64()
    );
    timeline.applied.lock().unwrap().push(Applied {
        fault,
        began,
        ended: Instant::now(),
    });
}

async fn apply(cluster: &Cluster, timeline: &Timeline, fault: &Fault) {
    let target = fault.target;
    match (fault.kind, target) {
        (Kind::Clock, Target::Listen(i)) => {
            timeline.listen_down(target);
            let shift = crate::clock::shifted_clock(&format!("{:+}", fault.shift_s));
            cluster.restart_listen(i, shift).await;
            timeline.listen_up(target);
        }
        (Kind::Kill | Kind::Terminate | Kind::Pause, _) => {
            timeline.listen_down(target);
            let mut process = process(cluster, target).lock().await;
            match fault.kind {
                Kind::Kill => process.kill(),
                Kind::Pause => process.pause(),
                _ => {
                    let status = tokio::task::block_in_place(|| process.terminate(DRAIN_LIMIT));
                    assert!(
                        status.success(),
                        "{target} exited with {status} after SIGTERM"
                    );
                }
            }
        }
        (
            Kind::Blackhole | Kind::Reset | Kind::Latency | Kind::Slow,
            Target::Path { listen, pusher },
        ) => {
            cluster.proxies[listen][pusher].set(match fault.kind {
                Kind::Blackhole => Mode::BLACKHOLE,
                Kind::Reset => Mode::Reset,
                Kind::Latency => Mode::Latency {
                    base: Duration::from_millis(300),
                    jitter: Duration::from_millis(200),
                },
                _ => Mode::Throttle {
                    bytes_per_second: 16 * 1024,
                },
            });
        }
        (Kind::Database, _) => cluster.stop_database().await,
        (Kind::Dns, Target::Dns(i)) => cluster.set_in_dns(i, true),
        (kind, target) => unreachable!("the schedule never puts {kind:?} on {target}"),
    }
}

async fn heal(cluster: &Cluster, timeline: &Timeline, fault: &Fault) {
    let target = fault.target;
    let healing = Instant::now();
    match (fault.kind, target) {
        (Kind::Pause, _) => {
            process(cluster, target).lock().await.resume();
            timeline.listen_up(target);
        }
        (Kind::Kill | Kind::Terminate | Kind::Clock, Target::Listen(i)) => {
            if fault.kind == Kind::Clock {
                timeline.listen_down(target);
            }
            cluster.restart_listen(i, Vec::new()).await;
            timeline.listen_up(target);
            timeline.restarts.lock().unwrap().push(healing.elapsed());
        }
        (Kind::Kill | Kind::Terminate, Target::Pusher(i)) => {
            cluster.pushers[i].lock().await.restart().await;
            timeline.restarts.lock().unwrap().push(healing.elapsed());
        }
        (
            Kind::Blackhole | Kind::Reset | Kind::Latency | Kind::Slow,
            Target::Path { listen, pusher },
        ) => {
            cluster.proxies[listen][pusher].set(Mode::Pass);
        }
        (Kind::Database, _) => cluster.start_database().await,
        (Kind::Dns, Target::Dns(i)) => cluster.set_in_dns(i, false),
        (kind, target) => unreachable!("the schedule never puts {kind:?} on {target}"),
    }
}

fn process(cluster: &Cluster, target: Target) -> &tokio::sync::Mutex<crate::Service> {
    match target {
        Target::Listen(i) => &cluster.listens[i],
        Target::Pusher(i) => &cluster.pushers[i],
        other => unreachable!("{other} is not a process"),
    }
}
