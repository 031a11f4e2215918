//! CPU per request: each process's user + system time (`/proc/PID/stat`) over a measured
//! run, divided by what the run did. Far steadier than rps on a shared 2-core machine; the
//! bench prints it beside every throughput row, and loadgen reports its own ([`own_seconds`]).

use std::fmt::Write;

/// Clock ticks per second of /proc's CPU times (USER_HZ: 100 on Linux, whatever the
/// kernel's own tick rate).
const TICKS_PER_SECOND: f64 = 100.0;

/// A process whose CPU a row counts.
#[derive(Clone, Copy, Debug)]
pub enum Counted {
    /// One process.
    Process(u32),
    /// A server that runs a child process per connection and per background task
    /// (PostgreSQL's postmaster), with those children.
    Tree(u32),
}

/// CPU readings taken when a measured run starts; [`Meter::stop`] takes the second.
pub struct Meter {
    counted: Vec<(String, Counted, f64)>,
}

impl Meter {
    /// Reads the CPU time of every named process now.
    pub fn start<S: Into<String>>(processes: impl IntoIterator<Item = (S, Counted)>) -> Meter {
        let counted = processes
            .into_iter()
            .map(|(name, process)| (name.into(), process, seconds(process)))
            .collect();
        Meter { counted }
    }

    /// The CPU each process spent since [`Meter::start`].
    pub fn stop(self) -> Usage {
        let spent = self
            .counted
            .into_iter()
            .map(|(name, process, before)| (name, seconds(process) - before))
            .collect();
        Usage { spent }
    }
}

/// CPU seconds per process over one measured run.
#[derive(Default)]
pub struct Usage {
    spent: Vec<(String, f64)>,
}

impl Usage {
    /// Adds a process that measured itself (loadgen's `cpu_seconds`, the bench's own client).
    pub fn with(mut self, name: &str, seconds: f64) -> Usage {
        self.spent.push((name.to_string(), seconds));
        self
    }

    /// "CPU per conversation: listen 120 µs, pusher 60 µs, loadgen 30 µs (total 210 µs)".
    pub fn per(&self, count: u64, what: &str) -> String {
        let micros = |seconds: f64| seconds * 1e6 / count.max(1) as f64;
        let mut text = format!("CPU per {what}:");
        for (i, (name, seconds)) in self.spent.iter().enumerate() {
            let separator = if i == 0 { "" } else { "," };
            let _ = write!(text, "{separator} {name} {:.0} µs", micros(*seconds));
        }
        let total: f64 = self.spent.iter().map(|(_, seconds)| seconds).sum();
        let _ = write!(text, " (total {:.0} µs)", micros(total));
        text
    }
}

/// User + system CPU seconds of this process so far (0 where there is no /proc).
pub fn own_seconds() -> f64 {
    seconds(Counted::Process(std::process::id()))
}

/// User + system CPU seconds of `process` so far.
///
/// For a tree: the root's own time and the time of the children it has reaped (its cutime
/// and cstime), plus each live child's. Read this way at both ends of a run, the difference
/// counts a child that starts or exits during the run for exactly its time in the run (an
/// exiting backend's whole life lands in cutime, and its time before the run was in the
/// first reading). Grandchildren are not walked: PostgreSQL's children do not fork.
fn seconds(process: Counted) -> f64 {
    let ticks = match process {
        Counted::Process(pid) => stat(pid).map_or(0, |s| s.own),
        Counted::Tree(root) => {
            let root_ticks = stat(root).map_or(0, |s| s.own + s.reaped);
            let children: u64 = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(stat)
                .filter(|s| s.ppid == root)
                .map(|s| s.own)
                .sum();
            root_ticks + children
        }
    };
    ticks as f64 / TICKS_PER_SECOND
}

/// The fields of `/proc/PID/stat` this module reads, in clock ticks.
struct Stat {
    ppid: u32,
    /// utime + stime.
    own: u64,
    /// cutime + cstime: the children it has waited for.
    reaped: u64,
}

/// `/proc/PID/stat`, or None once the process is gone.
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    // Fields from 3 on: state, ppid (4), ..., utime (14), stime (15), cutime (16), cstime (17).
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        ppid: u32::try_from(field(4)?).ok()?,
        own: field(14)? + field(15)?,
        reaped: field(16)? + field(17)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process_and_counts_per_request() {
        let me = stat(std::process::id()).expect("own stat");
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        let usage = Usage::default().with("a", 0.002).with("b", 0.001);
        assert_eq!(
            usage.per(10, "request"),
            "CPU per request: a 200 µs, b 100 µs (total 300 µs)"
        );
    }
}
