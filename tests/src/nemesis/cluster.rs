//! The cluster under test: listen replicas (on one PostgreSQL, or one listen on SQLite),
//! pushers behind a DNS name, a fault proxy on every listen -> pusher path, and a webhook
//! receiver that records every delivery.
//!
//! Each listen resolves the pusher name through its own DNS server to its own three proxies
//! (127.0.0.1, .2, .3 on a port of its own), each forwarding to one pusher: a fault on one
//! path touches only that listen and that pusher. DNS membership is shared: a pusher that
//! leaves, leaves every listen's answer.

use crate::dns::TestDns;
use crate::http::{Receiver, Reply};
use crate::postgres::TestPostgres;
use crate::proxy::Proxy;
use crate::{ListenClient, ListenOptions, PusherOptions, Service, free_port, start_listen};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex as StdMutex;
use tokio::sync::{Mutex, RwLock, watch};

const PUSHER_NAME: &str = "pusher.nemesis";

/// Listen's flags in the cluster: short leases, sweeps and keepalives, so that faults are
/// noticed and healed within seconds rather than the production defaults' minutes.
const LISTEN_FLAGS: &[&str] = &[
    "--pusher-resolve-interval",
    "500ms",
    "--lease-ttl",
    "3s",
    "--sweep-interval",
    "500ms",
    "--min-conversation-timeout",
    "1s",
    "--keepalive-interval",
    "2s",
    "--keepalive-timeout",
    "2s",
    "--ack-timeout",
    "15s",
    "--max-in-flight",
    "32",
    "--shutdown-grace",
    "3s",
    "--session-linger",
    "10s",
    "--request-timeout",
    "5s",
];

pub struct Cluster {
    pub listens: Vec<Mutex<Service>>,
    pub listen_addrs: Vec<SocketAddr>,
    pub pushers: Vec<Mutex<Service>>,
    /// `proxies[listen][pusher]`.
    pub proxies: Vec<Vec<Proxy>>,
    pub webhook: Receiver,
    postgres: Option<Mutex<TestPostgres>>,
    /// One per listen.
    dns: Vec<TestDns>,
    dns_out: StdMutex<BTreeSet<usize>>,
    proxy_ips: Vec<Ipv4Addr>,
    /// Whether PostgreSQL is up (always true on SQLite).
    database_up: watch::Sender<bool>,
    /// Held (shared) by each listen start, (exclusive) by a database stop: a listen exits at
    /// start when its store is unreachable, so the two never overlap.
    starting: RwLock<()>,
}

impl Cluster {
    /// Starts everything and waits until each process is healthy.
    pub async fn start(
        listens: usize,
        pushers: usize,
        postgres: bool,
        pusher_latency: &str,
    ) -> Cluster {
        let webhook = Receiver::start(vec![Reply::Status(200)]).await;
        let database = if postgres {
            let server = tokio::task::spawn_blocking(TestPostgres::start)
                .await
                .expect("start PostgreSQL");
            server.create_database("listen").await;
            Some(server)
        } else {
            None
        };
        let mut pusher_services = Vec::new();
        for i in 0..pushers {
            let options = PusherOptions::port(free_port()).args(&[
                "--simulated-latency",
                pusher_latency,
                "--log-format",
                "json",
                "--webhook",
                &webhook.url("/hooks"),
                "--shutdown-grace",
                "3s",
                "--progress-interval",
                "1s",
                "--pusher-id",
                &format!("pusher{i}"),
            ]);
            pusher_services.push(crate::start_pusher(options).await);
        }
        let proxy_ips: Vec<Ipv4Addr> = (0..pushers)
            .map(|i| Ipv4Addr::new(127, 0, 0, i as u8 + 1))
            .collect();
        let (mut listen_services, mut proxies, mut dns) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..listens {
            let port = free_port();
            let mut row = Vec::new();
            for (ip, pusher) in proxy_ips.iter().zip(&pusher_services) {
                row.push(
                    Proxy::start_at(SocketAddr::new((*ip).into(), port), vec![pusher.addr]).await,
                );
            }
            proxies.push(row);
            let server = TestDns::start(PUSHER_NAME, &proxy_ips).await;
            let url = server.url(port);
            dns.push(server);
            let store = database.as_ref().map(|db| db.url("listen"));
            let instance = format!("listen{i}");
            let mut extra = vec!["--pusher-url", &url, "--instance-id", &instance];
            if let Some(store) = &store {
                extra.extend(["--store", store]);
            }
            extra.extend(LISTEN_FLAGS);
            listen_services.push(
                start_listen(ListenOptions {
                    pusher_port: 0,
                    extra: &extra,
                })
                .await,
            );
        }
        Cluster {
            listen_addrs: listen_services.iter().map(|s| s.addr).collect(),
            listens: listen_services.into_iter().map(Mutex::new).collect(),
            pushers: pusher_services.into_iter().map(Mutex::new).collect(),
            proxies,
            webhook,
            postgres: database.map(Mutex::new),
            dns,
            dns_out: StdMutex::new(BTreeSet::new()),
            proxy_ips,
            database_up: watch::channel(true).0,
            starting: RwLock::new(()),
        }
    }

    /// A client of listen `i` (connects lazily; fine while it is down).
    pub fn client(&self, i: usize) -> ListenClient {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.listen_addrs[i]))
                .expect("listen url")
                .connect_timeout(std::time::Duration::from_secs(2));
        ListenClient::new(endpoint.connect_lazy())
    }

    /// Takes pusher `i` out of (`leave`) or back into DNS, for every listen.
    pub fn set_in_dns(&self, i: usize, leave: bool) {
        let mut out = self.dns_out.lock().unwrap();
        if leave {
            out.insert(i);
        } else {
            out.remove(&i);
        }
        let answer: Vec<Ipv4Addr> = self
            .proxy_ips
            .iter()
            .enumerate()
            .filter(|(i, _)| !out.contains(i))
            .map(|(_, ip)| *ip)
            .collect();
        for server in &self.dns {
            server.set(&answer);
        }
    }

    /// Stops PostgreSQL (fast shutdown), once no listen is starting.
    pub async fn stop_database(&self) {
        let Some(database) = &self.postgres else {
            return;
        };
        let _no_starts = self.starting.write().await;
        // Marked down under the database's lock, as start marks it up: the last to hold it
        // says what is true.
        let mut database = database.lock().await;
        self.database_up.send_replace(false);
        tokio::task::block_in_place(|| database.stop());
    }

    /// Starts PostgreSQL again on the same data and port.
    pub async fn start_database(&self) {
        let Some(database) = &self.postgres else {
            return;
        };
        let mut database = database.lock().await;
        tokio::task::block_in_place(|| database.launch());
        // Up means accepting sessions: a listen started before exits.
        let (session, task) = database.session().await;
        drop(session);
        let _ = task.await;
        self.database_up.send_replace(true);
    }

    /// Restarts listen `i` (with `envs`), once its store is reachable.
    pub async fn restart_listen(&self, i: usize, envs: Vec<(String, String)>) {
        loop {
            let guard = self.starting.read().await;
            if *self.database_up.borrow() {
                self.listens[i].lock().await.restart_with_env(envs).await;
                drop(guard);
                return;
            }
            drop(guard);
            let mut up = self.database_up.subscribe();
            let _ = up.wait_for(|up| *up).await;
        }
    }
}
