//! The benchmark's reference row: a NATS JetStream work queue on loopback, the alternative
//! an operator would weigh against the link. A throwaway `nats-server -js` (Debian's
//! `nats-server` package) with file storage in a temporary directory.

use crate::{free_port, wait_for};
use async_nats::jetstream::{self, consumer, stream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

pub struct TestNats {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
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

fn nats_server() -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
    {
        let candidate = PathBuf::from(dir).join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("nats-server not found (Debian: apt-get install nats-server); .ci/run installs it");
}

impl TestNats {
    /// Starts nats-server with JetStream on 127.0.0.1 and waits until it accepts connections.
    pub async fn start() -> TestNats {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("nats.log")).unwrap();
        let child = Command::new(nats_server())
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
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
