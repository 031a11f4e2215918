//! A TCP fault proxy for tests: sits between listen and pusher on loopback and does what the
//! test says, to connections already open and to new ones.
//!
//! Modes: pass; add latency (± jitter) per chunk; blackhole one or both directions (bytes are
//! held, not delivered, and nothing is closed: a half-open connection; if the network heals
//! before a peer gives up, the held bytes arrive late and in order, as TCP would deliver
//! them); reset every connection (RST via SO_LINGER 0); refuse new connections (the
//! listening socket is closed, so connects get ECONNREFUSED); slice writes into small chunks;
//! throttle to a bandwidth.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Pass,
    /// Each chunk waits `base ± jitter` before it is forwarded (order is kept).
    Latency {
        base: Duration,
        jitter: Duration,
    },
    /// Drop bytes flowing in the given directions; keep connections open.
    Blackhole {
        upstream: bool,
        downstream: bool,
    },
    /// Reset every open connection, and every new one as soon as it is accepted.
    Reset,
    /// Close the listening socket: new connections are refused. Open ones are untouched.
    Refuse,
    /// Forward in chunks of at most this many bytes, each written separately.
    Slice(usize),
    /// Forward at most this many bytes per second in each direction of each connection.
    Throttle {
        bytes_per_second: u64,
    },
}

impl Mode {
    pub const BLACKHOLE: Mode = Mode::Blackhole {
        upstream: true,
        downstream: true,
    };
    /// Pusher -> listen bytes are held (acks do not arrive); listen -> pusher still flows.
    pub const BLACKHOLE_DOWNSTREAM: Mode = Mode::Blackhole {
        upstream: false,
        downstream: true,
    };
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        Proxy::start_failover(vec![target]).await
    }

    /// Like [`Proxy::start`], but each new connection goes to the first of `targets` that
    /// accepts it: several replicas behind one address.
    pub async fn start_failover(targets: Vec<SocketAddr>) -> Proxy {
        Proxy::start_at("127.0.0.1:0".parse().unwrap(), targets).await
    }

    /// Like [`Proxy::start_failover`], listening on `bind` (127.0.0.2:PORT, say, so that
    /// several proxies share a port behind one DNS name).
    pub async fn start_at(bind: SocketAddr, targets: Vec<SocketAddr>) -> Proxy {
        let listener = TcpListener::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("proxy cannot bind {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            addr,
            Arc::new(targets),
            mode_rx,
            Arc::clone(&accepted),
        ));
        Proxy {
            addr,
            mode,
            accepted,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Connections accepted so far (each is one connection attempt by the client).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    targets: Arc<Vec<SocketAddr>>,
    mut mode: watch::Receiver<Mode>,
    accepted: Arc<AtomicU64>,
) {
    let mut listener = Some(listener);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let current = *mode.borrow_and_update();
        match (&listener, current) {
            (Some(_), Mode::Refuse) => listener = None,
            (None, m) if m != Mode::Refuse => listener = Some(rebind(addr).await),
            _ => {}
        }
        let Some(active) = &listener else {
            if mode.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            accept = active.accept() => {
                let Ok((client, _)) = accept else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                connections.spawn(connection(client, Arc::clone(&targets), mode.clone()));
            }
            changed = mode.changed() => if changed.is_err() { return },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(listener) = TcpListener::bind(addr).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("proxy cannot re-bind {addr}");
}

async fn connection(
    mut client: TcpStream,
    targets: Arc<Vec<SocketAddr>>,
    mut mode: watch::Receiver<Mode>,
) {
    if *mode.borrow() == Mode::Reset {
        reset(client);
        return;
    }
    let mut server = None;
    for target in targets.iter() {
        if let Ok(stream) = TcpStream::connect(target).await {
            server = Some(stream);
            break;
        }
    }
    let Some(mut server) = server else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    // Bytes read while their direction was blackholed, delivered in order once it heals.
    let (mut held_up, mut held_down) = (Vec::new(), Vec::new());
    loop {
        let current = *mode.borrow_and_update();
        let (hold_up, hold_down) = match current {
            Mode::Blackhole {
                upstream,
                downstream,
            } => (upstream, downstream),
            Mode::Reset => break,
            _ => (false, false),
        };
        if !hold_up
            && !held_up.is_empty()
            && !forward(&mut server, &std::mem::take(&mut held_up), current).await
        {
            break;
        }
        if !hold_down
            && !held_down.is_empty()
            && !forward(&mut client, &std::mem::take(&mut held_down), current).await
        {
            break;
        }
        // A blackholed direction is not read at all: the sender's buffers fill and its writes
        // stall, as on a partitioned network. Reads are cancel-safe.
        let chunk = tokio::select! {
            read = client.read(&mut up), if !hold_up => match read {
                Ok(n) if n > 0 => Some((true, n)),
                _ => None,
            },
            read = server.read(&mut down), if !hold_down => match read {
                Ok(n) if n > 0 => Some((false, n)),
                _ => None,
            },
            changed = mode.changed() => if changed.is_ok() { continue } else { None },
        };
        let Some((upstream, n)) = chunk else { break };
        let now = *mode.borrow();
        let (held, to, bytes) = if upstream {
            (&mut held_up, &mut server, &up[..n])
        } else {
            (&mut held_down, &mut client, &down[..n])
        };
        let blackholed = match now {
            Mode::Blackhole {
                upstream: u,
                downstream: d,
            } => {
                if upstream {
                    u
                } else {
                    d
                }
            }
            _ => false,
        };
        if blackholed {
            held.extend_from_slice(bytes);
        } else if !forward(to, bytes, now).await {
            break;
        }
    }
    reset(client);
    reset(server);
}

/// Forwards bytes as the mode says. false: the connection is done.
async fn forward(to: &mut TcpStream, bytes: &[u8], mode: Mode) -> bool {
    match mode {
        Mode::Latency { base, jitter } => {
            let spread = jitter.as_secs_f64() * (2.0 * shared::backoff::random_unit() - 1.0);
            tokio::time::sleep(Duration::from_secs_f64(
                (base.as_secs_f64() + spread).max(0.0),
            ))
            .await;
            to.write_all(bytes).await.is_ok()
        }
        Mode::Slice(size) => {
            for chunk in bytes.chunks(size.max(1)) {
                if to.write_all(chunk).await.is_err() || to.flush().await.is_err() {
                    return false;
                }
            }
            true
        }
        Mode::Throttle { bytes_per_second } => {
            // Chunks of at most a tenth of a second's worth, each after its share of time.
            let size = (bytes_per_second / 10).max(1) as usize;
            for chunk in bytes.chunks(size) {
                let share = chunk.len() as f64 / bytes_per_second.max(1) as f64;
                tokio::time::sleep(Duration::from_secs_f64(share)).await;
                if to.write_all(chunk).await.is_err() {
                    return false;
                }
            }
            true
        }
        Mode::Reset => false,
        Mode::Pass | Mode::Refuse | Mode::Blackhole { .. } => to.write_all(bytes).await.is_ok(),
    }
}

/// Closes with a TCP RST instead of a FIN.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
