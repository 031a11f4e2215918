//! The fault schedule: a pure function of the seed, the run's length, the cluster's shape and
//! the fault options, so `--seed N` with the same options replays it exactly.
//!
//! Faults start at random gaps (half to one and a half times the mean gap; now and then
//! several at the same instant), last between one second and the maximum, and never
//! overlap on one resource (a process, a proxy, the database, a DNS entry), which rests
//! [`REST`] between two. At most `max_concurrent` are active at once; a drawn fault that
//! would break either rule is skipped, which the printed schedule shows by its absence.

use std::fmt;
use std::time::Duration;

/// splitmix64: a tiny, well-known seeded generator (Steele, Lea, Flood 2014), enough for a
/// schedule; not for anything secret.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is negligible for small `n`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in `[low, high]`, to the millisecond.
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let (low, high) = (
            low.as_millis() as u64,
            high.as_millis().max(low.as_millis()) as u64,
        );
        Duration::from_millis(low + self.below(high - low + 1))
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// SIGKILL a listen or a pusher; restart it when the fault ends.
    Kill,
    /// SIGSTOP a listen or a pusher; SIGCONT when the fault ends.
    Pause,
    /// SIGTERM a listen or a pusher (a drain); restart it when the fault ends.
    Terminate,
    /// A listen -> pusher proxy drops bytes both ways, keeping connections open.
    Blackhole,
    /// A listen -> pusher proxy resets every connection.
    Reset,
    /// A listen -> pusher proxy delays each chunk by 300 ms ± 200 ms.
    Latency,
    /// A listen -> pusher proxy forwards 16 KiB/s each way.
    Slow,
    /// PostgreSQL stopped; started again when the fault ends.
    Database,
    /// A pusher leaves DNS; it joins again when the fault ends.
    Dns,
    /// A PostgreSQL replica restarted with its wall clock shifted; restarted with the true
    /// clock when the fault ends.
    Clock,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Kill,
        Kind::Pause,
        Kind::Terminate,
        Kind::Blackhole,
        Kind::Reset,
        Kind::Latency,
        Kind::Slow,
        Kind::Database,
        Kind::Dns,
        Kind::Clock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::Pause => "pause",
            Kind::Terminate => "terminate",
            Kind::Blackhole => "blackhole",
            Kind::Reset => "reset",
            Kind::Latency => "latency",
            Kind::Slow => "slow",
            Kind::Database => "database",
            Kind::Dns => "dns",
            Kind::Clock => "clock",
        }
    }
}

/// What a fault acts on. Two faults never share one at the same time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Listen(usize),
    Pusher(usize),
    /// The proxy between a listen and a pusher.
    Path {
        listen: usize,
        pusher: usize,
    },
    Postgres,
    /// A pusher's entry in DNS.
    Dns(usize),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Listen(i) => write!(f, "listen{i}"),
            Target::Pusher(i) => write!(f, "pusher{i}"),
            Target::Path { listen, pusher } => write!(f, "listen{listen}->pusher{pusher}"),
            Target::Postgres => write!(f, "postgres"),
            Target::Dns(i) => write!(f, "dns:pusher{i}"),
        }
    }
}

/// One scheduled fault: from `at` (since the load started) for `lasts`.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub at: Duration,
    pub lasts: Duration,
    pub kind: Kind,
    pub target: Target,
    /// The wall-clock shift of a [`Kind::Clock`] fault, in seconds (0 otherwise).
    pub shift_s: i64,
}

impl Fault {
    pub fn end(&self) -> Duration {
        self.at + self.lasts
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>8.1}s {:>5.1}s  {:<9} {}",
            self.at.as_secs_f64(),
            self.lasts.as_secs_f64(),
            self.kind.name(),
            self.target
        )?;
        if self.kind == Kind::Clock {
            write!(f, " {:+}s", self.shift_s)?;
        }
        Ok(())
    }
}

/// The cluster the schedule is for.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    pub listens: usize,
    pub pushers: usize,
    /// Whether the listens share PostgreSQL (else each has its own SQLite file).
    pub postgres: bool,
}

/// How hard to hit it.
#[derive(Clone, Debug)]
pub struct Intensity {
    pub kinds: Vec<Kind>,
    pub mean_gap: Duration,
    pub max_fault: Duration,
    pub max_concurrent: usize,
}

/// A target rests this long between two faults, so that one's heal (a restart, a database
/// start) is done before the next one's start.
pub const REST: Duration = Duration::from_secs(1);

/// No fault starts before this, so the load is flowing and the RSS baseline is taken first.
pub const WARM_UP: Duration = Duration::from_secs(3);

/// The faults for `seed`, in order of start, all ended by `duration`.
pub fn schedule(
    seed: u64,
    duration: Duration,
    topology: Topology,
    intensity: &Intensity,
) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let kinds: Vec<Kind> = intensity
        .kinds
        .iter()
        .copied()
        .filter(|kind| !targets(*kind, topology).is_empty())
        .collect();
    let mut faults: Vec<Fault> = Vec::new();
    if kinds.is_empty() {
        return faults;
    }
    let min_fault = Duration::from_secs(1);
    let mut at = WARM_UP;
    loop {
        // Now and then several faults at the same instant.
        if !rng.chance(0.25) {
            let mean = intensity.mean_gap.as_secs_f64();
            at += Duration::from_secs_f64(mean * (0.5 + rng.unit()));
        }
        if at + min_fault > duration {
            return faults;
        }
        let kind = *rng.pick(&kinds);
        let target = *rng.pick(&targets(kind, topology));
        let lasts = rng
            .between(min_fault, intensity.max_fault)
            .min(duration - at);
        let shift_s = if kind == Kind::Clock {
            let magnitude = rng.between(Duration::from_secs(30), Duration::from_secs(7200));
            let sign = if rng.chance(0.5) { 1 } else { -1 };
            sign * magnitude.as_secs() as i64
        } else {
            0
        };
        let active: Vec<&Fault> = faults.iter().filter(|f| f.end() > at).collect();
        let busy = faults
            .iter()
            .any(|f| f.target == target && f.end() + REST > at);
        if busy || active.len() >= intensity.max_concurrent {
            continue;
        }
        faults.push(Fault {
            at,
            lasts,
            kind,
            target,
            shift_s,
        });
    }
}

/// What a fault of `kind` may act on in `topology`.
fn targets(kind: Kind, topology: Topology) -> Vec<Target> {
    let listens = 0..topology.listens;
    let pushers = 0..topology.pushers;
    match kind {
        Kind::Kill | Kind::Pause | Kind::Terminate => listens
            .map(Target::Listen)
            .chain(pushers.map(Target::Pusher))
            .collect(),
        Kind::Blackhole | Kind::Reset | Kind::Latency | Kind::Slow => listens
            .flat_map(|listen| {
                pushers
                    .clone()
                    .map(move |pusher| Target::Path { listen, pusher })
            })
            .collect(),
        Kind::Database if topology.postgres => vec![Target::Postgres],
        Kind::Dns => pushers.map(Target::Dns).collect(),
        // A lone SQLite listen has only its own clock to judge deadlines by; the shift is a
        // fault of the replicas that share PostgreSQL's clock.
        Kind::Clock if topology.postgres => listens.map(Target::Listen).collect(),
        Kind::Database | Kind::Clock => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPOLOGY: Topology = Topology {
        listens: 2,
        pushers: 3,
        postgres: true,
    };

    fn intensity() -> Intensity {
        Intensity {
            kinds: Kind::ALL.to_vec(),
            mean_gap: Duration::from_secs(2),
            max_fault: Duration::from_secs(8),
            max_concurrent: 3,
        }
    }

    #[test]
    fn splitmix64_matches_its_reference_output() {
        // The first outputs for seed 0 of the reference implementation (Vigna's splitmix64.c).
        let mut rng = Rng::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let run = |seed| schedule(seed, Duration::from_secs(600), TOPOLOGY, &intensity());
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn faults_respect_their_bounds_and_never_share_a_target() {
        let duration = Duration::from_secs(1800);
        let faults = schedule(7, duration, TOPOLOGY, &intensity());
        assert!(faults.len() > 300, "{} faults", faults.len());
        for (i, fault) in faults.iter().enumerate() {
            assert!(fault.at >= WARM_UP && fault.end() <= duration, "{fault}");
            assert!(fault.lasts >= Duration::from_secs(1), "{fault}");
            assert!(fault.lasts <= Duration::from_secs(8), "{fault}");
            let active: Vec<&Fault> = faults[..i].iter().filter(|f| f.end() > fault.at).collect();
            assert!(active.len() < 3, "more than 3 at {:?}", fault.at);
            assert!(active.iter().all(|f| f.target != fault.target), "{fault}");
            assert!(
                faults[..i]
                    .iter()
                    .all(|f| f.target != fault.target || f.end() + REST <= fault.at),
                "{fault} starts less than {REST:?} after the last fault on its target"
            );
        }
        for kind in Kind::ALL {
            assert!(faults.iter().any(|f| f.kind == kind), "no {kind:?}");
        }
        assert!(
            faults.windows(2).any(|w| w[0].at == w[1].at),
            "some faults start together"
        );
    }

    #[test]
    fn a_sqlite_cluster_gets_no_database_or_clock_faults() {
        let topology = Topology {
            listens: 1,
            pushers: 3,
            postgres: false,
        };
        let faults = schedule(7, Duration::from_secs(600), topology, &intensity());
        assert!(!faults.is_empty());
        assert!(
            faults
                .iter()
                .all(|f| !matches!(f.kind, Kind::Database | Kind::Clock))
        );
    }
}
