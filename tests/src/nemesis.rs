//! The nemesis: randomized, combined faults against the real binaries, with a checker.
//!
//! [`run`] starts a [`cluster::Cluster`], drives [`load`] for the run's duration while
//! [`faults`] carries out the seed's [`schedule`], heals everything, and lets [`checker`]
//! hold what the system did against what it acknowledged; [`health`] watches each listen
//! meanwhile. The `nemesis` binary is its command line.

pub mod checker;
pub mod cluster;
pub mod faults;
pub mod health;
pub mod load;
pub mod schedule;

use schedule::{Fault, Intensity, Kind, Topology};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Randomized faults against the real listen-svc and pusher-svc, with a checker.
///
/// Starts two listen replicas on one PostgreSQL (or, with --store sqlite, one listen on
/// SQLite), three pushers behind a test DNS server, a TCP fault proxy on every listen ->
/// pusher path and a webhook receiver; drives Submits and live Sessions for --duration while
/// injecting the faults the seed's schedule says; heals everything; then checks that every
/// acknowledged conversation settled with its acknowledged segments (none lost, none
/// stranded), one idempotency key per conversation's webhook deliveries, re-runs only where
/// a fault could cause them, health answered throughout, and RSS within bounds. Prints one
/// summary line; exits 1 on any violation, printing the seed and the schedule that replays
/// it.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "nemesis", version)]
pub struct Options {
    /// How long load and faults run (then everything is healed and checked).
    #[arg(long, env = "NEMESIS_DURATION", default_value = "2m", value_parser = shared::cli::parse_positive_duration)]
    pub duration: Duration,

    /// Seed of the fault schedule (and of the load's choices). Default: a random one, printed
    /// first; the same seed with the same options replays the same schedule.
    #[arg(long, env = "NEMESIS_SEED")]
    pub seed: Option<u64>,

    /// The listens' store: `postgres` (two replicas on one PostgreSQL server, started here)
    /// or `sqlite` (one listen on its own SQLite file).
    #[arg(long, env = "NEMESIS_STORE", value_enum, default_value_t = Store::Postgres)]
    pub store: Store,

    /// Fault kinds to draw from (comma-separated). `database` needs --store postgres;
    /// `clock` (libfaketime) is a fault of the PostgreSQL replicas only.
    #[arg(long, env = "NEMESIS_FAULTS", value_enum, value_delimiter = ',', default_values_t = Kind::ALL.to_vec())]
    pub faults: Vec<Kind>,

    /// Mean time between fault starts; each gap is drawn from half to one and a half times
    /// this, and a quarter of faults start together with the previous one.
    #[arg(long, env = "NEMESIS_FAULT_INTERVAL", default_value = "4s", value_parser = shared::cli::parse_positive_duration)]
    pub fault_interval: Duration,

    /// Longest a fault lasts (each lasts from 1 s to this).
    #[arg(long, env = "NEMESIS_MAX_FAULT_DURATION", default_value = "8s", value_parser = shared::cli::parse_positive_duration)]
    pub max_fault_duration: Duration,

    /// Most faults active at once.
    #[arg(long, env = "NEMESIS_MAX_CONCURRENT_FAULTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub max_concurrent_faults: u32,

    /// Concurrent Submit drivers (each: one Submit at a time, 50-300 ms apart).
    #[arg(long, env = "NEMESIS_SUBMITTERS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub submitters: u32,

    /// Concurrent live-session drivers (each: one Session at a time).
    #[arg(long, env = "NEMESIS_SESSIONS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub sessions: u32,

    /// Pusher's simulated processing time per conversation.
    #[arg(long, env = "NEMESIS_PUSHER_LATENCY", default_value = "200ms", value_parser = shared::cli::parse_duration)]
    pub pusher_latency: Duration,

    /// Directory holding the listen-svc and pusher-svc binaries to run (e.g. target/debug).
    /// Default: build them with this program's cargo and profile, next to it.
    #[arg(long, env = "NEMESIS_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,

    /// After the heal, how long every acknowledged conversation has to settle (COMPLETED,
    /// FAILED or DISCARDED) before the rest count as stranded.
    #[arg(long, env = "NEMESIS_HEAL_TIMEOUT", default_value = "120s", value_parser = shared::cli::parse_positive_duration)]
    pub heal_timeout: Duration,

    /// Longest a listen may go without answering health (SERVING, within 1 s, asked every
    /// 250 ms) while it is up: not killed, stopped, paused or restarting.
    #[arg(long, env = "NEMESIS_HEALTH_GAP", default_value = "3s", value_parser = shared::cli::parse_positive_duration)]
    pub health_gap: Duration,

    /// RSS bound: each process's RSS after the run may be at most this many times its RSS
    /// 2 s into the load (before the first fault), plus --rss-slack-mib.
    #[arg(long, env = "NEMESIS_RSS_FACTOR", default_value_t = 2.0, value_parser = parse_factor)]
    pub rss_factor: f64,

    /// RSS bound: the allowance added to --rss-factor × the RSS at the start, in MiB.
    #[arg(long, env = "NEMESIS_RSS_SLACK_MIB", default_value_t = 64)]
    pub rss_slack_mib: u64,
}

fn parse_factor(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(factor) if factor >= 1.0 && factor.is_finite() => Ok(factor),
        _ => Err(format!("{value:?} is not a number of at least 1")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    Postgres,
    Sqlite,
}

/// What a run found.
pub struct Report {
    pub seed: u64,
    pub summary: String,
    pub violations: Vec<String>,
    pub schedule: Vec<Fault>,
}

impl Report {
    /// The command line that replays this run's schedule.
    pub fn replay(&self, options: &Options) -> String {
        replay_command(self.seed, options)
    }
}

/// The command line that replays the schedule of `seed` under `options` (the schedule
/// depends on the seed, the duration, the store and the fault options, not on the seed
/// alone).
pub fn replay_command(seed: u64, options: &Options) -> String {
    let kinds: Vec<&str> = options.faults.iter().map(|k| k.name()).collect();
    let profile = if cfg!(debug_assertions) {
        ""
    } else {
        " --release"
    };
    let mut command = format!(
        "cargo run{profile} -p tests --bin nemesis -- --seed {} --duration {}s --store {} \
         --faults {} --fault-interval {}ms --max-fault-duration {}ms --max-concurrent-faults {} \
         --submitters {} --sessions {} --pusher-latency {}ms",
        seed,
        options.duration.as_secs(),
        if options.store == Store::Postgres {
            "postgres"
        } else {
            "sqlite"
        },
        kinds.join(","),
        options.fault_interval.as_millis(),
        options.max_fault_duration.as_millis(),
        options.max_concurrent_faults,
        options.submitters,
        options.sessions,
        options.pusher_latency.as_millis(),
    );
    if let Some(dir) = &options.bin_dir {
        command.push_str(&format!(" --bin-dir {}", dir.display()));
    }
    command
}

impl Options {
    pub fn topology(&self) -> Topology {
        let postgres = self.store == Store::Postgres;
        Topology {
            listens: if postgres { 2 } else { 1 },
            pushers: 3,
            postgres,
        }
    }

    pub fn intensity(&self) -> Intensity {
        Intensity {
            kinds: self.faults.clone(),
            mean_gap: self.fault_interval,
            max_fault: self.max_fault_duration,
            max_concurrent: self.max_concurrent_faults as usize,
        }
    }
}

/// A seed from the OS's randomness (std's hasher keys).
pub fn random_seed() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(std::process::id() as u64);
    hasher.finish()
}

/// One nemesis run with `seed`: start, load and faults, heal, check.
pub async fn run(options: &Options, seed: u64) -> Report {
    let duration = options.duration;
    let topology = options.topology();
    let faults = schedule::schedule(seed, duration, topology, &options.intensity());
    if faults
        .iter()
        .any(|fault| fault.kind == schedule::Kind::Clock)
    {
        // Fails now, naming the package, rather than at each clock fault mid-run.
        crate::clock::shifted_clock("+0s");
    }
    let cluster = Arc::new(
        cluster::Cluster::start(
            topology.listens,
            topology.pushers,
            topology.postgres,
            &format!("{}ms", options.pusher_latency.as_millis()),
        )
        .await,
    );
    let truth = Arc::new(load::Truth::default());
    let timeline = Arc::new(faults::Timeline::default());
    let misses = Arc::new(health::Misses::default());
    let (stop_load, load_stopped) = watch::channel(false);
    let (stop_health, health_stopped) = watch::channel(false);

    let mut monitors = tokio::task::JoinSet::new();
    for (i, addr) in cluster.listen_addrs.iter().enumerate() {
        monitors.spawn(health::monitor(
            i,
            *addr,
            Arc::clone(&misses),
            health_stopped.clone(),
        ));
    }
    let start = Instant::now();
    let clock = (start, std::time::SystemTime::now());
    let mut drivers = tokio::task::JoinSet::new();
    for task in 0..options.submitters as u64 {
        drivers.spawn(load::submitter(
            Arc::clone(&cluster),
            Arc::clone(&truth),
            task,
            seed,
            load_stopped.clone(),
        ));
    }
    for task in 0..options.sessions as u64 {
        drivers.spawn(load::sessions(
            Arc::clone(&cluster),
            Arc::clone(&truth),
            task,
            seed,
            load_stopped.clone(),
        ));
    }
    let mut nemesis = tokio::task::JoinSet::new();
    for fault in faults.clone() {
        nemesis.spawn(faults::carry_out(
            Arc::clone(&cluster),
            Arc::clone(&timeline),
            fault,
            start,
        ));
    }

    // The RSS baseline: load flowing, no fault yet.
    tokio::time::sleep_until((start + schedule::WARM_UP - Duration::from_secs(1)).into()).await;
    let before = rss(&cluster).await;

    tokio::time::sleep_until((start + duration).into()).await;
    stop_load.send_replace(true);
    let mut violations = Vec::new();
    while let Some(done) = nemesis.join_next().await {
        if let Err(error) = done {
            violations.push(format!(
                "harness: a fault could not be carried out: {}",
                first_line(error)
            ));
        }
    }
    let healed = Instant::now();
    while let Some(done) = drivers.join_next().await {
        if let Err(error) = done {
            violations.push(format!(
                "harness: a load driver failed: {}",
                first_line(error)
            ));
        }
    }
    violations.extend(truth.violations.lock().unwrap().drain(..));

    let expected = truth.conversations.lock().unwrap().clone();
    let settled = checker::settle(
        &cluster,
        expected.keys().cloned().collect(),
        healed,
        options.heal_timeout,
    )
    .await;
    stop_health.send_replace(true);
    while monitors.join_next().await.is_some() {}

    let outcomes = checker::check_outcomes(&expected, &settled, &mut violations);
    let deliveries =
        checker::check_webhooks(&cluster.webhook.requests(), &settled, &mut violations);
    let mut logs = Vec::new();
    for pusher in &cluster.pushers {
        logs.push(pusher.lock().await.log_text());
    }
    let runs = checker::runs_in_logs(&logs);
    let (distribution, duplicates) =
        checker::check_runs(&expected, &runs, &timeline, clock, &mut violations);
    let health_gap = checker::check_health(&misses, &timeline, options.health_gap, &mut violations);
    let after = rss(&cluster).await;
    for ((name, before), (_, after)) in before.iter().zip(&after) {
        checker::check_rss(
            name,
            *before,
            *after,
            options.rss_factor,
            options.rss_slack_mib * 1024,
            &mut violations,
        );
    }

    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for applied in timeline.applied.lock().unwrap().iter() {
        *by_kind.entry(applied.fault.kind.name()).or_default() += 1;
    }
    let longest_restart = timeline
        .restarts
        .lock()
        .unwrap()
        .iter()
        .max()
        .copied()
        .unwrap_or_default();
    let mut summary = format!(
        "nemesis: seed={seed} duration={}s store={:?} faults={} ({}) conversations={} (submits={} retried={} sessions={}) ",
        duration.as_secs(),
        options.store,
        by_kind.values().sum::<usize>(),
        join(&by_kind),
        expected.len(),
        truth.submits.load(Ordering::Relaxed),
        truth.submit_retries.load(Ordering::Relaxed),
        truth.sessions.load(Ordering::Relaxed),
    );
    let _ = write!(
        summary,
        "outcomes=({}) lost={} stranded={} duplicate_runs={duplicates} runs_per_conversation=({}) \
         webhook_deliveries={deliveries} longest_recovery={} longest_restart={:.1}s \
         health_checks={} longest_health_gap={:.1}s violations={}",
        join(&outcomes),
        outcomes.get("lost").unwrap_or(&0),
        outcomes.get("stranded").unwrap_or(&0),
        distribution
            .iter()
            .map(|(runs, n)| format!("{runs}:{n}"))
            .collect::<Vec<_>>()
            .join(" "),
        settled
            .recovery
            .map_or("never".to_string(), |r| format!("{:.1}s", r.as_secs_f64())),
        longest_restart.as_secs_f64(),
        misses.checks.load(Ordering::Relaxed),
        health_gap.as_secs_f64(),
        violations.len(),
    );
    Report {
        seed,
        summary,
        violations,
        schedule: faults,
    }
}

/// The first line of a task's panic (the harness's panics carry a whole log after it).
fn first_line(error: tokio::task::JoinError) -> String {
    let text = match error.try_into_panic() {
        Ok(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
        Err(error) => error.to_string(),
    };
    text.lines().next().unwrap_or_default().to_string()
}

fn join<K: std::fmt::Display, V: std::fmt::Display>(map: &BTreeMap<K, V>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// RSS of every process (KiB), by name.
async fn rss(cluster: &cluster::Cluster) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for (i, listen) in cluster.listens.iter().enumerate() {
        out.push((format!("listen{i}"), listen.lock().await.rss_kib()));
    }
    for (i, pusher) in cluster.pushers.iter().enumerate() {
        out.push((format!("pusher{i}"), pusher.lock().await.rss_kib()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_replay_command_gives_the_same_options_and_schedule() {
        let options = Options::try_parse_from([
            "nemesis",
            "--duration",
            "90s",
            "--store",
            "sqlite",
            "--faults",
            "kill,reset,dns",
            "--fault-interval",
            "1500ms",
            "--max-concurrent-faults",
            "2",
            "--submitters",
            "5",
            "--sessions",
            "0",
            "--pusher-latency",
            "50ms",
            "--bin-dir",
            "target/debug",
        ])
        .unwrap();
        let report = Report {
            seed: 42,
            summary: String::new(),
            violations: Vec::new(),
            schedule: Vec::new(),
        };
        let replay = report.replay(&options);
        let args = replay.split_once(" -- ").unwrap().1.split(' ');
        let again = Options::try_parse_from(std::iter::once("nemesis").chain(args)).unwrap();
        assert_eq!(again.seed, Some(42));
        assert_eq!(
            (again.submitters, again.sessions, again.pusher_latency),
            (5, 0, Duration::from_millis(50))
        );
        assert_eq!(again.bin_dir, options.bin_dir);
        let plan = |o: &Options| schedule::schedule(42, o.duration, o.topology(), &o.intensity());
        assert_eq!(plan(&again), plan(&options));
    }
}
