//! Credential files read again while the process runs: certificates, keys, CA bundles, JWKS.
//!
//! A [`Reloadable`] is a set of files parsed together into one value (a certificate chain and
//! its key into a `CertifiedKey`). A [`Reloader`] task reads every registered set each
//! `--credentials-reload-interval` and compares the bytes with those in use. The paths are
//! opened afresh each time, following symlinks, so every way of replacing a file is seen: an
//! in-place write, a rename over it, or Kubernetes' swap of a mounted Secret's `..data`
//! symlink to a new directory. Polling, not inotify: it sees all of these the same way,
//! including on volumes where file events do not arrive.
//!
//! New contents that parse are in use at once: the next handshake or token check takes them;
//! connections already open keep what they started with. New contents that do not parse,
//! whose key does not match the certificate, or whose certificate has already expired are
//! refused and the value in use stays. A refusal is reported (one warning, one count of
//! `*_credential_reload_failures_total`) once the same contents have been read on two polls
//! in a row, so a writer that replaces the certificate and then the key is not reported for
//! the moment in between; and it is reported once per distinct contents, not on every poll.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// The files of one set as read on a poll, for its parse function.
pub struct Contents<'a> {
    files: &'a [(&'static str, PathBuf)],
    bytes: &'a [Vec<u8>],
}

impl Contents<'_> {
    /// The bytes of file `i` (in the order the set was declared).
    pub fn bytes(&self, i: usize) -> &[u8] {
        &self.bytes[i]
    }

    /// "--flag PATH" of file `i`, for messages.
    pub fn name(&self, i: usize) -> String {
        let (flag, path) = &self.files[i];
        format!("{flag} {}", path.display())
    }
}

/// What a parse function makes of a set's files.
pub struct Loaded<T> {
    pub value: T,
    /// When the certificate in it stops being valid (the leaf's, or a bundle's earliest).
    pub not_after: Option<SystemTime>,
    /// One line for the logs: what was loaded (a certificate's subject and serial, say).
    pub summary: String,
}

type Parse<T> = Box<dyn Fn(&Contents) -> Result<Loaded<T>, String> + Send + Sync>;

/// A value parsed from a set of files, replaced when the files change (see the module docs).
pub struct Reloadable<T> {
    /// The flags naming the files, and the files.
    files: Vec<(&'static str, PathBuf)>,
    parse: Parse<T>,
    current: RwLock<Arc<T>>,
    /// Bumped on every replacement, so what is built from the value can tell it is stale.
    generation: AtomicU64,
    state: Mutex<State>,
}

struct State {
    /// The bytes of the files in use.
    applied: Vec<Vec<u8>>,
    not_after: Option<SystemTime>,
    summary: String,
    /// The last contents read that differ from `applied` and were refused.
    refused: Option<Refused>,
    /// Whether the expiry of the certificate in use has been logged.
    expiry_logged: bool,
}

struct Refused {
    /// The bytes read, or why they could not be read.
    contents: Result<Vec<Vec<u8>>, String>,
    reason: String,
    reported: bool,
}

/// What one poll of a set found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The files hold what is in use.
    Unchanged,
    /// New contents are in use from now on.
    Reloaded { summary: String },
    /// New contents were refused; they are reported if the next poll reads them again.
    Unsettled,
    /// Refused contents read on two polls in a row: to be reported, now and only now.
    Refused { reason: String },
    /// Refused contents already reported.
    StillRefused,
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Reads and parses the files now. An error names the flag and the file; at start-up it
    /// is a configuration error. A certificate that has already expired is accepted here
    /// (with a warning when the reloader starts): refusing to start would not bring a
    /// valid one.
    pub fn load(
        files: Vec<(&'static str, PathBuf)>,
        parse: impl Fn(&Contents) -> Result<Loaded<T>, String> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, String> {
        assert!(!files.is_empty(), "a credential has at least one file");
        let bytes = read(&files)?;
        let loaded = parse(&Contents {
            files: &files,
            bytes: &bytes,
        })?;
        Ok(Arc::new(Reloadable {
            current: RwLock::new(Arc::new(loaded.value)),
            generation: AtomicU64::new(0),
            state: Mutex::new(State {
                applied: bytes,
                not_after: loaded.not_after,
                summary: loaded.summary,
                refused: None,
                expiry_logged: false,
            }),
            files,
            parse: Box::new(parse),
        }))
    }

    /// The value in use.
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Changes each time the value is replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the files again and replaces the value if they changed and parse (see
    /// [`Outcome`]). `now` judges whether a new certificate has already expired.
    pub fn poll(&self, now: SystemTime) -> Outcome {
        let read = read(&self.files);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if read.as_ref().is_ok_and(|bytes| *bytes == state.applied) {
            state.refused = None;
            return Outcome::Unchanged;
        }
        if let Some(refused) = &mut state.refused
            && refused.contents == read
        {
            if refused.reported {
                return Outcome::StillRefused;
            }
            refused.reported = true;
            return Outcome::Refused {
                reason: refused.reason.clone(),
            };
        }
        let (contents, reason) = match read {
            Ok(bytes) => match self.parse_new(&bytes, now) {
                Ok(loaded) => {
                    *self.current.write().unwrap_or_else(|p| p.into_inner()) =
                        Arc::new(loaded.value);
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    *state = State {
                        applied: bytes,
                        not_after: loaded.not_after,
                        summary: loaded.summary.clone(),
                        refused: None,
                        expiry_logged: false,
                    };
                    return Outcome::Reloaded {
                        summary: loaded.summary,
                    };
                }
                Err(reason) => (Ok(bytes), reason),
            },
            Err(reason) => (Err(reason.clone()), reason),
        };
        state.refused = Some(Refused {
            contents,
            reason,
            reported: false,
        });
        Outcome::Unsettled
    }

    /// Parses new contents, refusing a certificate that has already expired: the one in use
    /// is no worse.
    fn parse_new(&self, bytes: &[Vec<u8>], now: SystemTime) -> Result<Loaded<T>, String> {
        let loaded = (self.parse)(&Contents {
            files: &self.files,
            bytes,
        })?;
        match loaded.not_after {
            Some(not_after) if not_after <= now => Err(format!(
                "{}: the certificate expired at {}",
                self.describe(),
                humantime::format_rfc3339_seconds(not_after)
            )),
            _ => Ok(loaded),
        }
    }

    /// "--flag PATH, --flag PATH": the files, for messages.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|(flag, path)| format!("{flag} {}", path.display()))
            .collect();
        names.join(", ")
    }
}

fn read(files: &[(&'static str, PathBuf)]) -> Result<Vec<Vec<u8>>, String> {
    files
        .iter()
        .map(|(flag, path)| read_file(flag, path))
        .collect()
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// What the reloader needs of a [`Reloadable`], whatever its value.
trait Watched: Send + Sync {
    /// The `credential` label: the first file's flag without its dashes.
    fn label(&self) -> &'static str;
    fn describe(&self) -> String;
    fn poll(&self, now: SystemTime) -> Outcome;
    /// When the certificate in use expires, and whether that is news to log.
    fn expiry(&self, now: SystemTime) -> Option<(SystemTime, bool)>;
    fn summary(&self) -> String;
}

impl<T: Send + Sync + 'static> Watched for Reloadable<T> {
    fn label(&self) -> &'static str {
        self.files[0].0.trim_start_matches('-')
    }

    fn describe(&self) -> String {
        Reloadable::describe(self)
    }

    fn poll(&self, now: SystemTime) -> Outcome {
        Reloadable::poll(self, now)
    }

    fn expiry(&self, now: SystemTime) -> Option<(SystemTime, bool)> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let not_after = state.not_after?;
        let news = not_after <= now && !state.expiry_logged;
        if news {
            state.expiry_logged = true;
        }
        Some((not_after, news))
    }

    fn summary(&self) -> String {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .summary
            .clone()
    }
}

/// Polls every registered [`Reloadable`], logs what changed or was refused, and keeps the
/// metrics: `{prefix}_credential_reloads_total{credential}`,
/// `{prefix}_credential_reload_failures_total{credential}` and
/// `{prefix}_certificate_expiry_seconds{credential}` (negative once expired).
pub struct Reloader {
    prefix: &'static str,
    watched: Vec<Arc<dyn Watched>>,
}

impl Reloader {
    /// `prefix`: the service's metric prefix (`listen`, `pusher`).
    pub fn new(prefix: &'static str) -> Reloader {
        Reloader {
            prefix,
            watched: Vec::new(),
        }
    }

    /// Adds a set to every poll; its counters start at zero so alerts can see them.
    pub fn watch<T: Send + Sync + 'static>(&mut self, reloadable: &Arc<Reloadable<T>>) {
        let watched: Arc<dyn Watched> = reloadable.clone();
        let credential = watched.label();
        metrics::counter!(self.name("credential_reloads_total"), "credential" => credential)
            .increment(0);
        metrics::counter!(self.name("credential_reload_failures_total"), "credential" => credential)
            .increment(0);
        info!(
            credential,
            files = %watched.describe(),
            loaded = %watched.summary(),
            "credential files loaded; watching them for changes"
        );
        self.watched.push(watched);
    }

    /// Polls every `interval` until the returned task is aborted (at once when nothing is
    /// watched). Reading files is done off the async threads.
    pub fn spawn(self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let reloader = Arc::new(self);
        tokio::spawn(async move {
            if reloader.watched.is_empty() {
                return;
            }
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let reloader = Arc::clone(&reloader);
                let polled =
                    tokio::task::spawn_blocking(move || reloader.poll_all(SystemTime::now()));
                if let Err(error) = polled.await {
                    warn!(%error, "credential reload poll failed");
                }
            }
        })
    }

    /// One poll of every set: replaces, logs, counts, and sets the expiry gauges.
    pub fn poll_all(&self, now: SystemTime) {
        for watched in &self.watched {
            let credential = watched.label();
            match watched.poll(now) {
                Outcome::Unchanged | Outcome::Unsettled | Outcome::StillRefused => {}
                Outcome::Reloaded { summary } => {
                    info!(credential, files = %watched.describe(), loaded = %summary, "credential files reloaded; new connections use them");
                    metrics::counter!(self.name("credential_reloads_total"), "credential" => credential)
                        .increment(1);
                }
                Outcome::Refused { reason } => {
                    warn!(credential, %reason, "credential files refused; the ones loaded before stay in use");
                    metrics::counter!(self.name("credential_reload_failures_total"), "credential" => credential)
                        .increment(1);
                }
            }
            if let Some((not_after, news)) = watched.expiry(now) {
                let seconds = match not_after.duration_since(now) {
                    Ok(left) => left.as_secs_f64(),
                    Err(past) => -past.duration().as_secs_f64(),
                };
                metrics::gauge!(self.name("certificate_expiry_seconds"), "credential" => credential)
                    .set(seconds);
                if news {
                    warn!(
                        credential,
                        files = %watched.describe(),
                        expired_at = %humantime::format_rfc3339_seconds(not_after),
                        "the certificate in use has expired; new connections fail until a valid file is written"
                    );
                }
            }
        }
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.prefix)
    }
}

#[cfg(test)]
mod tests;
