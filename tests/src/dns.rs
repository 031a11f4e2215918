//! A tiny authoritative DNS server on loopback UDP, for `--pusher-url dns://ADDR/NAME:PORT`:
//! it answers A queries for one name with a list of IPv4 addresses the test can change at
//! any time (TTL 0), NODATA for other types of that name, NXDOMAIN for other names.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::UdpSocket;

pub struct TestDns {
    pub addr: SocketAddr,
    name: String,
    answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    queries: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TestDns {
    /// Serves `name` (e.g. `pusher.test`) with `addrs` on 127.0.0.1, an ephemeral port.
    pub async fn start(name: &str, addrs: &[Ipv4Addr]) -> TestDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().unwrap();
        let answers = Arc::new(Mutex::new(addrs.to_vec()));
        let queries = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(
            socket,
            name.to_ascii_lowercase(),
            Arc::clone(&answers),
            Arc::clone(&queries),
        ));
        TestDns {
            addr,
            name: name.to_string(),
            answers,
            queries,
            task,
        }
    }

    /// The `--pusher-url` that resolves through this server.
    pub fn url(&self, port: u16) -> String {
        format!("dns://{}/{}:{port}", self.addr, self.name)
    }

    /// What the name resolves to from now on.
    pub fn set(&self, addrs: &[Ipv4Addr]) {
        *self.answers.lock().unwrap() = addrs.to_vec();
    }

    /// Queries answered so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    socket: UdpSocket,
    name: String,
    answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    queries: Arc<AtomicU64>,
) {
    let mut buf = [0u8; 512];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let addrs = answers.lock().unwrap().clone();
        if let Some(reply) = answer(&buf[..n], &name, &addrs) {
            queries.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

/// The reply to one query, or `None` for a packet that is not a query we understand.
pub fn answer(query: &[u8], name: &str, addrs: &[Ipv4Addr]) -> Option<Vec<u8>> {
    const A: u16 = 1;
    if query.len() < 12 || query[2] & 0x80 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // no compression in questions
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let question = query.get(12..question_end)?;
    let asked = labels.join(".");

    let known = asked == name;
    let records: &[Ipv4Addr] = if known && qtype == A { addrs } else { &[] };
    let rcode: u16 = if known { 0 } else { 3 };
    // QR, the query's opcode and RD, AA, RA, rcode.
    let flags =
        0x8000 | (u16::from_be_bytes([query[2], query[3]]) & 0x7900) | 0x0400 | 0x0080 | rcode;
    let mut reply = Vec::with_capacity(question_end + 16 * records.len());
    reply.extend_from_slice(&query[0..2]);
    reply.extend_from_slice(&flags.to_be_bytes());
    reply.extend_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&(records.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    for ip in records {
        reply.extend_from_slice(&[0xC0, 0x0C]); // the name: a pointer to the question's
        reply.extend_from_slice(&A.to_be_bytes());
        reply.extend_from_slice(&1u16.to_be_bytes()); // IN
        reply.extend_from_slice(&0u32.to_be_bytes()); // TTL
        reply.extend_from_slice(&4u16.to_be_bytes());
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}
