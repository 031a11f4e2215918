//! `loadgen`: a ghz-like load generator for listen-svc, pusher-svc and the echo baseline.
//!
//! `loadgen --target 127.0.0.1:50051 --rpc submit --concurrency 50 --requests 20000`
//! prints requests/s, latency percentiles, errors by status code, and its own CPU use (so a
//! saturated load generator is visible). `--json` prints one JSON object instead. Every run
//! is bounded: by `--requests` and by `--duration` (default 60 s), whichever ends first.
//! `--rpc pg-queue` runs the textbook PostgreSQL work queue instead ([`pg_queue`]).

// Modules live in a folder named after the binary: a file directly in src/bin is a binary.
#[path = "loadgen/pg_queue.rs"]
mod pg_queue;

use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tests::{listen, pusher};
use tonic::transport::Endpoint;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rpc {
    Submit,
    Process,
    Health,
    /// No gRPC: P7's baseline, a work queue in PostgreSQL ([`pg_queue`]).
    PgQueue,
}

struct Args {
    /// `--target`, repeatable: workers take the targets in turn.
    targets: Vec<String>,
    /// `--postgres-url`, for `--rpc pg-queue`.
    postgres_url: String,
    /// `--max-in-flight`: pg-queue's pending window (listen's flag and default).
    max_in_flight: usize,
    rpc: Rpc,
    concurrency: usize,
    requests: u64,
    duration: Duration,
    payload: usize,
    connections: usize,
    json: bool,
}

const USAGE: &str =
    "usage: loadgen --target HOST:PORT [--target HOST:PORT ...] --rpc submit|process|health \
    [--concurrency 50] [--requests N] [--duration 60s] [--payload 1024] [--connections 1] [--json]
       loadgen --rpc pg-queue --postgres-url URL [--max-in-flight 512] [--concurrency 50] ...

A ghz-like load generator for listen-svc (submit: SubmitConversation), pusher-svc (process:
the unary Process) and either's health check. Workers share --connections HTTP/2 connections
per target and take the targets in turn; they stop at --requests or --duration, whichever
comes first. --payload is the bytes of speech per conversation. Prints rps, latency
quantiles, errors by status code and its own CPU use; --json for one JSON object.

pg-queue is the textbook PostgreSQL work queue, with no gRPC: --concurrency producers
INSERT the conversations into the table loadgen_queue (dropped and created anew), one
claimer takes up to the free slots of a --max-in-flight window with SELECT ... FOR UPDATE
SKIP LOCKED and marks them processing, and 16 workers complete each with a 200-byte
result. rps is conversations from the first INSERT to the last completion; the latencies
are INSERT -> completed.";

fn usage(error: &str) -> ! {
    eprintln!("error: {error}\n\n{USAGE}");
    std::process::exit(64)
}

fn parse() -> Args {
    let mut args = Args {
        targets: Vec::new(),
        postgres_url: String::new(),
        max_in_flight: 512,
        rpc: Rpc::Submit,
        concurrency: 50,
        requests: u64::MAX,
        duration: Duration::from_secs(60),
        payload: 1024,
        connections: 1,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--target" => args.targets.push(value()),
            "--postgres-url" => args.postgres_url = value(),
            "--max-in-flight" => {
                args.max_in_flight = value()
                    .parse()
                    .unwrap_or_else(|_| usage("bad --max-in-flight"))
            }
            "--rpc" => {
                args.rpc = match value().as_str() {
                    "submit" => Rpc::Submit,
                    "process" => Rpc::Process,
                    "health" => Rpc::Health,
                    "pg-queue" => Rpc::PgQueue,
                    other => usage(&format!("unknown --rpc {other}")),
                }
            }
            "--concurrency" => {
                args.concurrency = value()
                    .parse()
                    .unwrap_or_else(|_| usage("bad --concurrency"))
            }
            "--requests" => {
                args.requests = value().parse().unwrap_or_else(|_| usage("bad --requests"))
            }
            "--duration" => args.duration = humantime_like(&value()),
            "--payload" => {
                args.payload = value().parse().unwrap_or_else(|_| usage("bad --payload"))
            }
            "--connections" => {
                args.connections = value()
                    .parse()
                    .unwrap_or_else(|_| usage("bad --connections"))
            }
            "--json" => args.json = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if args.rpc == Rpc::PgQueue {
        if args.postgres_url.is_empty() {
            usage("--rpc pg-queue needs --postgres-url");
        }
    } else if args.targets.is_empty() {
        usage("--target is required");
    }
    if args.concurrency == 0 || args.connections == 0 || args.max_in_flight == 0 {
        usage("--concurrency, --connections and --max-in-flight must be at least 1");
    }
    args
}

fn humantime_like(value: &str) -> Duration {
    shared::cli::parse_duration(value).unwrap_or_else(|e| usage(&format!("bad --duration: {e}")))
}

/// What one run measured.
pub struct Report {
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
    /// User + system CPU of this process over the run.
    pub cpu_seconds: f64,
}

#[tokio::main]
async fn main() {
    let args = parse();
    let report = match args.rpc {
        Rpc::PgQueue => pg_queue::run(&args).await,
        _ => run(&args).await,
    };
    let target = match args.rpc {
        Rpc::PgQueue => args.postgres_url.clone(),
        _ => args.targets.join(","),
    };
    let mut latencies = report.latencies.clone();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let rps = report.ok as f64 / report.elapsed.as_secs_f64();
    let cpu = 100.0 * report.cpu_seconds / report.elapsed.as_secs_f64();
    if args.json {
        println!(
            "{}",
            json!({
                "rpc": format!("{:?}", args.rpc).to_lowercase(), "target": target, "concurrency": args.concurrency,
                "ok": report.ok, "errors": report.errors, "seconds": report.elapsed.as_secs_f64(), "rps": rps,
                "p50_ms": ms(pct(0.50)), "p90_ms": ms(pct(0.90)), "p99_ms": ms(pct(0.99)), "max_ms": ms(latencies.last().copied().unwrap_or_default()),
                "loadgen_cpu_percent": cpu, "cpu_seconds": report.cpu_seconds,
            })
        );
    } else {
        println!(
            "{:?} x{} on {}: {} ok in {:.2}s = {:.0} rps | p50 {:.2} ms p90 {:.2} ms p99 {:.2} ms max {:.2} ms | errors {:?} | loadgen CPU {:.0}%",
            args.rpc,
            args.concurrency,
            target,
            report.ok,
            report.elapsed.as_secs_f64(),
            rps,
            ms(pct(0.50)),
            ms(pct(0.90)),
            ms(pct(0.99)),
            ms(latencies.last().copied().unwrap_or_default()),
            report.errors,
            cpu
        );
    }
}

async fn run(args: &Args) -> Report {
    // Target-major order, so that consecutive workers take the targets in turn.
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        for target in &args.targets {
            let channel = Endpoint::from_shared(format!("http://{target}"))
                .unwrap_or_else(|e| usage(&format!("bad --target: {e}")))
                .tcp_nodelay(true)
                .connect()
                .await
                .unwrap_or_else(|e| {
                    eprintln!("error: cannot connect to {target}: {e}");
                    std::process::exit(1)
                });
            channels.push(channel);
        }
    }
    let tickets = Arc::new(AtomicU64::new(0));
    let run_id = std::process::id();
    let text = transcript(args.payload);
    let cpu_before = tests::cpu::own_seconds();
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..args.concurrency {
        let channel = channels[worker % channels.len()].clone();
        let (tickets, text, rpc, limit) =
            (Arc::clone(&tickets), text.clone(), args.rpc, args.requests);
        workers.spawn(async move {
            let mut listen = listen::listen_client::ListenClient::new(channel.clone());
            let mut pusher = pusher::pusher_client::PusherClient::new(channel.clone());
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let mut latencies = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let n = tickets.fetch_add(1, Ordering::Relaxed);
                if n >= limit || Instant::now() >= deadline {
                    return (latencies, errors);
                }
                let sent = Instant::now();
                let result = match rpc {
                    Rpc::Submit => listen
                        .submit_conversation(listen::SubmitConversationRequest {
                            uid: format!("load-{worker}"),
                            idempotency_key: format!("{run_id}-{n}"),
                            language: "en".into(),
                            segments: vec![listen::Segment {
                                text: text.clone(),
                                speaker: "SPEAKER_0".into(),
                                start: 0.0,
                                end: 1.0,
                                is_user: true,
                            }],
                            priority: 0,
                        })
                        .await
                        .map(|_| ()),
                    Rpc::Process => pusher
                        .process(pusher::ProcessConversation {
                            conversation_id: format!("load-{run_id}-{n}"),
                            attempt: 1,
                            segments: vec![pusher::Segment {
                                text: text.clone(),
                                ..Default::default()
                            }],
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    Rpc::Health => health
                        .check(tonic_health::pb::HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .map(|_| ()),
                    Rpc::PgQueue => unreachable!("pg-queue runs in pg_queue::run"),
                };
                match result {
                    Ok(()) => latencies.push(sent.elapsed()),
                    Err(status) => *errors.entry(format!("{:?}", status.code())).or_default() += 1,
                }
            }
        });
    }
    let mut report = Report {
        ok: 0,
        errors: BTreeMap::new(),
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        cpu_seconds: 0.0,
    };
    while let Some(done) = workers.join_next().await {
        let (latencies, errors) = done.expect("worker");
        report.ok += latencies.len() as u64;
        report.latencies.extend(latencies);
        for (code, count) in errors {
            *report.errors.entry(code).or_default() += count;
        }
    }
    report.elapsed = started.elapsed();
    report.cpu_seconds = tests::cpu::own_seconds() - cpu_before;
    report
}

/// `bytes` of plausible speech (sentences with commitments and a topic), so that pusher
/// structures it into a COMPLETED conversation rather than discarding it as noise.
pub(crate) fn transcript(bytes: usize) -> String {
    const SPEECH: &str = "We need to review the quarterly budget before the meeting on Friday. \
        I will send the updated report to the finance team tomorrow morning. \
        Let's make sure the travel costs are in the spreadsheet too. ";
    let mut text = SPEECH.repeat(bytes / SPEECH.len() + 1);
    text.truncate(bytes);
    text
}
