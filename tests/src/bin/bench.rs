//! `bench`: the benchmark scenarios of BENCHMARKS.md, measured in one run against the real
//! binaries on loopback, with a bare tonic echo server as the baseline for ratios.
//!
//! `cargo run --release -p tests --bin bench` (about 3 minutes on 2 cores), or `-- --smoke`
//! for a seconds-long run that only checks every scenario works (CI runs that; no timing is
//! asserted), or `-- --only P1,P3` for some scenarios; `-- --help` lists the options.
//! Prints a markdown table. Every throughput row also gives the CPU each process spent per
//! request or conversation ([`tests::cpu`]).
//!
//! P7's PostgreSQL server is `tests::postgres::TestPostgres::start_durable` (fsync on).

use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tests::cpu::{Counted, Meter};
use tests::listen::{self, SessionRequest, Start, session_request::Msg};
use tests::nats::{SyncInterval, TestNats};
use tests::postgres::TestPostgres;
use tests::*;
use tokio_stream::wrappers::ReceiverStream;

struct Sizes {
    submit_requests: u64,
    /// P2, per condition and round.
    probe_health: u64,
    probe_requests: u64,
    probe_rounds: usize,
    e2e: u64,
    replay: u64,
    in_flight: u64,
    sessions: usize,
    /// P8: uid A's backlog, and the other uids' trickle (uids x conversations each).
    backlog: usize,
    trickle_uids: usize,
    trickle_each: usize,
}

const FULL: Sizes = Sizes {
    submit_requests: 20_000,
    probe_health: 30_000,
    probe_requests: 10_000,
    probe_rounds: 3,
    e2e: 20_000,
    replay: 100_000,
    in_flight: 1_000,
    sessions: 500,
    backlog: 20_000,
    trickle_uids: 10,
    trickle_each: 25,
};
const SMOKE: Sizes = Sizes {
    submit_requests: 300,
    probe_health: 100,
    probe_requests: 100,
    probe_rounds: 1,
    e2e: 300,
    replay: 500,
    in_flight: 50,
    sessions: 20,
    backlog: 300,
    trickle_uids: 2,
    trickle_each: 3,
};

fn loadgen(target: SocketAddr, rpc: &str, concurrency: usize, requests: u64) -> Value {
    run_loadgen(
        &["--target", &target.to_string(), "--rpc", rpc],
        concurrency,
        requests,
    )
}

/// loadgen with `args` (its targets and --rpc), `concurrency` workers and `requests`; its
/// JSON report.
fn run_loadgen(args: &[&str], concurrency: usize, requests: u64) -> Value {
    let output = Command::new(binary("loadgen"))
        .args(args)
        .args([
            "--concurrency",
            &concurrency.to_string(),
            "--requests",
            &requests.to_string(),
            "--duration",
            "300s",
            "--json",
        ])
        .output()
        .expect("run loadgen");
    assert!(
        output.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("loadgen JSON")
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

fn describe(v: &Value) -> String {
    format!(
        "{:.0} rps, p50 {:.2} ms, p99 {:.2} ms, errors {}, loadgen CPU {:.0}%",
        f(v, "rps"),
        f(v, "p50_ms"),
        f(v, "p99_ms"),
        v["errors"],
        f(v, "loadgen_cpu_percent")
    )
}

/// Submit -> COMPLETED (or DISCARDED) per conversation of loadgen's uids, from the stored
/// created_at and completed_at.
async fn completion_latencies(client: &ListenClient) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for worker in 0..50 {
        let mut token = String::new();
        loop {
            let page = client
                .clone()
                .list_conversations(listen::ListConversationsRequest {
                    uid: format!("load-{worker}"),
                    status: 0,
                    page_size: 500,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .expect("list")
                .into_inner();
            latencies.extend(page.conversations.iter().filter_map(completion_latency));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    latencies
}

/// A conversation's Submit -> COMPLETED, from its stored timestamps (ms resolution).
fn completion_latency(c: &listen::Conversation) -> Option<Duration> {
    let (created, completed) = (c.created_at.as_ref()?, c.completed_at.as_ref()?);
    let ms = |t: &prost_types::Timestamp| t.seconds as f64 * 1e3 + f64::from(t.nanos) / 1e6;
    Some(Duration::from_secs_f64(
        (ms(completed) - ms(created)).max(0.0) / 1e3,
    ))
}

/// P8's trickle: `uids` uids each submitting `each` conversations, one every 200 ms, while
/// whatever else runs; waits until all are COMPLETED and returns their Submit -> COMPLETED,
/// sorted.
async fn trickle(client: &ListenClient, uids: usize, each: usize) -> Vec<Duration> {
    let mut tasks = tokio::task::JoinSet::new();
    for u in 0..uids {
        let mut client = client.clone();
        tasks.spawn(async move {
            let mut ids = Vec::new();
            let mut pace = tokio::time::interval(Duration::from_millis(200));
            for i in 0..each {
                pace.tick().await;
                let request = talk(&format!("trickle-{u}"), &format!("trickle-{u}-{i}"));
                let response = client.submit_conversation(request).await.expect("submit");
                ids.push(response.into_inner().conversation_id);
            }
            ids
        });
    }
    let mut ids = Vec::new();
    while let Some(done) = tasks.join_next().await {
        ids.extend(done.expect("trickle task"));
    }
    let done = wait_all(
        client,
        &ids,
        listen::ConversationStatus::Completed,
        Duration::from_secs(600),
    )
    .await;
    let mut latencies: Vec<Duration> = done.iter().filter_map(completion_latency).collect();
    latencies.sort();
    latencies
}

/// " = 1.04x P3", or a note when P3 did not run (`--only` without it).
fn vs_p3(rate: f64, p3_rate: f64, target: Option<&str>) -> String {
    vs("P3", rate, p3_rate, target)
}

/// " = 1.04x {name}", or a note when either side was not measured (`--only` without its
/// scenario: its rate is NaN).
fn vs(name: &str, rate: f64, base: f64, target: Option<&str>) -> String {
    let target = target.map(|t| format!(" ({t})")).unwrap_or_default();
    if base.is_nan() || rate.is_nan() {
        format!(" (no ratio vs {name}: a scenario did not run; add it to --only){target}")
    } else {
        format!(" = {:.2}x {name}{target}", rate / base)
    }
}

/// P7's end to end, like P3's, through `replicas` (listen replicas on one database, all
/// linked to `pusher`): `conversations` Submits spread over them, until every replica's link
/// has drained. Returns the rate and the row's text.
async fn postgres_end_to_end(
    replicas: &[(&str, Service)],
    pusher: &Service,
    server: &TestPostgres,
    conversations: u64,
) -> (f64, String) {
    let clients: Vec<ListenClient> = replicas.iter().map(|(_, l)| listen_client(l)).collect();
    for client in &clients {
        wait_link(
            client,
            listen::LinkState::Connected,
            Duration::from_secs(30),
        )
        .await;
    }
    let targets: Vec<String> = replicas.iter().map(|(_, l)| l.addr.to_string()).collect();
    let mut args = vec!["--rpc", "submit"];
    for target in &targets {
        args.extend(["--target", target]);
    }
    let meter = Meter::start(
        replicas
            .iter()
            .map(|(name, l)| (name.to_string(), Counted::Process(l.pid())))
            .chain([
                ("pusher".to_string(), Counted::Process(pusher.pid())),
                ("postgres".to_string(), Counted::Tree(server.postmaster())),
            ]),
    );
    let started = Instant::now();
    let submitted = run_loadgen(&args, 50, conversations);
    let mut total = started.elapsed();
    for client in &clients {
        total += wait_drained(client, Duration::from_secs(600), |_| {}).await;
    }
    let cpu = meter.stop().with("loadgen", f(&submitted, "cpu_seconds"));
    let rate = conversations as f64 / total.as_secs_f64();
    // How each replica's link got its work: written claimed by Submit, or claimed from the
    // queue (the path with the queue lock).
    let mut paths = Vec::new();
    for (name, listen) in replicas {
        let at_submit = listen
            .metric("listen_link_claimed_total{via=\"submit\"}")
            .await;
        let queued = listen
            .metric("listen_link_claimed_total{via=\"queue\"}")
            .await;
        paths.push(format!(
            "{name} {} at submit, {} from the queue",
            at_submit as u64, queued as u64
        ));
    }
    let busy = pusher.metric("pusher_jobs_busy_total").await;
    // One database: any replica lists every conversation.
    let mut latencies = completion_latencies(&clients[0]).await;
    latencies.sort();
    let text = format!(
        "{conversations} conversations in {:.2}s = {rate:.0}/s; Submit -> COMPLETED p50 {:.1} ms, p99 {:.1} ms (stored timestamps, ms resolution); Submit side {}; claimed: {}; pusher Busy answers {busy:.0}; {}",
        total.as_secs_f64(),
        quantile_ms(&latencies, 0.5),
        quantile_ms(&latencies, 0.99),
        describe(&submitted),
        paths.join(", "),
        cpu.per(conversations, "conversation"),
    );
    (rate, text)
}

fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

const USAGE: &str = "\
usage: cargo run --release -p tests --bin bench -- [--smoke] [--only P1,P2,...]

Runs the benchmark scenarios of BENCHMARKS.md against the real binaries (built first, in this
program's profile) and prints a markdown table. The full run takes minutes.

  --smoke        tiny counts: a seconds-long run that checks every scenario works (no timing)
  --only LIST    only these scenarios, comma-separated: P1, P2, P3, P4, P5, P6, P7, P8, NATS
  -h, --help     this text";

struct Args {
    smoke: bool,
    /// `--only`: the scenarios to run (all when absent).
    only: Option<Vec<String>>,
}

fn parse_args() -> Args {
    let mut args = Args {
        smoke: false,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--smoke" => args.smoke = true,
            "--only" => {
                let list = it.next().unwrap_or_else(|| usage("--only needs a value"));
                args.only = Some(list.split(',').map(str::to_string).collect());
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    args
}

fn usage(error: &str) -> ! {
    eprintln!("error: {error}\n\n{USAGE}");
    std::process::exit(64)
}

#[tokio::main]
async fn main() {
    let Args { smoke, only } = parse_args();
    let want = |scenario: &str| {
        only.as_ref()
            .is_none_or(|o| o.iter().any(|s| s == scenario))
    };
    let sizes = if smoke { SMOKE } else { FULL };
    set_log_filter("warn");
    build_bench();
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |name: &str, value: String| {
        println!("{name}: {value}");
        rows.push((name.to_string(), value));
    };

    // P1: durable Submit vs a bare echo, c=50, 1 KiB.
    let mut echo_rps = f64::NAN;
    if want("P1") {
        let echo_addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let echo = start_binary(
            "echo",
            echo_addr,
            vec!["--listen-addr".into(), echo_addr.to_string()],
        )
        .await;
        let meter = Meter::start([("echo", Counted::Process(echo.pid()))]);
        let base = loadgen(echo.addr, "submit", 50, sizes.submit_requests);
        let base_cpu = meter.stop().with("loadgen", f(&base, "cpu_seconds"));
        echo_rps = f(&base, "rps");
        let listen = start_listen(ListenOptions {
            pusher_port: free_port(),
            extra: &[],
        })
        .await;
        let meter = Meter::start([("listen", Counted::Process(listen.pid()))]);
        let submit = loadgen(listen.addr, "submit", 50, sizes.submit_requests);
        let submit_cpu = meter.stop().with("loadgen", f(&submit, "cpu_seconds"));
        row(
            "P1 echo baseline (Submit, no work)",
            format!(
                "{}; {}",
                describe(&base),
                base_cpu.per(sizes.submit_requests, "request")
            ),
        );
        row(
            "P1 Submit, SQLite durable",
            format!(
                "{}; {}",
                describe(&submit),
                submit_cpu.per(sizes.submit_requests, "request")
            ),
        );
        row(
            "P1 ratio vs echo",
            format!(
                "{:.2}x rps, {:.2}x p99 (targets: >= 0.7x rps, <= 1.5x p99)",
                f(&submit, "rps") / f(&base, "rps"),
                f(&submit, "p99_ms") / f(&base, "p99_ms")
            ),
        );
        drop(listen);
        drop(echo);
    }

    // P2: listen's responsiveness with pusher up, down, and slow. Each condition gets a fresh
    // listen (and pusher) so only the pusher differs, and the conditions rotate over rounds;
    // a condition's figure is its round with the median p99 (sub-millisecond p99s
    // move with the scheduler, so one short run per condition said little).
    if want("P2") {
        const CONDITIONS: [&str; 3] = ["up", "down", "slow (5 s jobs)"];
        let mut runs: [Vec<(Value, Value)>; 3] = Default::default();
        for round in 0..sizes.probe_rounds {
            // Each round starts with the next condition, so each takes each place in the
            // order once (what ran just before a measurement moves its figures).
            for condition in (0..3).map(|i| (i + round) % 3) {
                let pusher_port = free_port();
                let _pusher = match condition {
                    0 => Some(start_pusher(PusherOptions::port(pusher_port)).await),
                    // Down: nothing listens on the port; the link stays in backoff.
                    1 => None,
                    _ => Some(
                        start_pusher(
                            PusherOptions::port(pusher_port).args(&["--simulated-latency", "5s"]),
                        )
                        .await,
                    ),
                };
                let listen = start_listen(ListenOptions {
                    pusher_port,
                    extra: &[],
                })
                .await;
                if condition != 1 {
                    wait_link(
                        &listen_client(&listen),
                        listen::LinkState::Connected,
                        Duration::from_secs(10),
                    )
                    .await;
                }
                runs[condition].push((
                    loadgen(listen.addr, "health", 10, sizes.probe_health),
                    loadgen(listen.addr, "submit", 10, sizes.probe_requests),
                ));
            }
        }
        let p99 = |v: &Value| f(v, "p99_ms");
        let median = |runs: &[(Value, Value)], pick: fn(&(Value, Value)) -> &Value| {
            let mut sorted: Vec<&Value> = runs.iter().map(pick).collect();
            sorted.sort_by(|a, b| p99(a).total_cmp(&p99(b)));
            let all: Vec<String> = runs
                .iter()
                .map(|r| format!("{:.2}", p99(pick(r))))
                .collect();
            (sorted[sorted.len() / 2].clone(), all.join(" / "))
        };
        let mut medians = Vec::new();
        for (name, runs) in CONDITIONS.iter().zip(&runs) {
            let (health, health_all) = median(runs, |r| &r.0);
            let (submit, submit_all) = median(runs, |r| &r.1);
            row(
                &format!("P2 pusher {name}: health"),
                format!("{} (p99 by round: {health_all} ms)", describe(&health)),
            );
            row(
                &format!("P2 pusher {name}: Submit"),
                format!("{} (p99 by round: {submit_all} ms)", describe(&submit)),
            );
            medians.push((p99(&health), p99(&submit)));
        }
        let (up, down, slow) = (medians[0], medians[1], medians[2]);
        row(
            "P2 median p99 ratio vs pusher up (target <= 1.2x)",
            format!(
                "down: health {:.2}x, Submit {:.2}x; slow: health {:.2}x, Submit {:.2}x",
                down.0 / up.0,
                down.1 / up.1,
                slow.0 / up.0,
                slow.1 / up.1,
            ),
        );
    }

    // P3: end to end with the built-in structurer: submitted -> COMPLETED.
    let mut e2e_rate = f64::NAN;
    if want("P3") {
        let pusher_port = free_port();
        let pusher = start_pusher(PusherOptions::port(pusher_port)).await;
        let listen = start_listen(ListenOptions {
            pusher_port,
            extra: &["--max-in-flight", "512"],
        })
        .await;
        let client = listen_client(&listen);
        let meter = Meter::start([
            ("listen", Counted::Process(listen.pid())),
            ("pusher", Counted::Process(pusher.pid())),
        ]);
        let started = Instant::now();
        let submitted = loadgen(listen.addr, "submit", 50, sizes.e2e);
        let total =
            started.elapsed() + wait_drained(&client, Duration::from_secs(600), |_| {}).await;
        let cpu = meter.stop().with("loadgen", f(&submitted, "cpu_seconds"));
        e2e_rate = sizes.e2e as f64 / total.as_secs_f64();
        let mut latencies = completion_latencies(&client).await;
        latencies.sort();
        row(
            "P3 end-to-end (Submit -> COMPLETED, built-in structurer, no simulated latency)",
            format!(
                "{} conversations in {:.2}s = {e2e_rate:.0}/s (target >= 12 000/s); Submit -> COMPLETED p50 {:.1} ms, p99 {:.1} ms (stored timestamps, ms resolution); Submit side {}; {}",
                sizes.e2e,
                total.as_secs_f64(),
                quantile_ms(&latencies, 0.5),
                quantile_ms(&latencies, 0.99),
                describe(&submitted),
                cpu.per(sizes.e2e, "conversation"),
            ),
        );
        drop(listen);
    }

    // Reference: a NATS JetStream work queue, same count, payload and in-flight window; once
    // fsyncing every write (durable, as a Submit is), once on the server's default 2-minute
    // sync (not durable). The client runs in this process.
    let mut durable_nats_rate = f64::NAN;
    if want("NATS") {
        for sync in [SyncInterval::Always, SyncInterval::Default] {
            let nats = TestNats::start(sync).await;
            let meter = Meter::start([
                ("nats-server", Counted::Process(nats.pid())),
                ("bench (client)", Counted::Process(std::process::id())),
            ]);
            let handoff = nats.workqueue_handoff(sizes.e2e, 50, 1024).await;
            let cpu = meter.stop();
            let rate = sizes.e2e as f64 / handoff.elapsed.as_secs_f64();
            let storage = match sync {
                SyncInterval::Always => {
                    durable_nats_rate = rate;
                    "durable: file storage, sync_interval always (fsync per write)"
                }
                SyncInterval::Default => {
                    "not durable: file storage, default sync_interval (fsync every 2 minutes)"
                }
            };
            row(
                &format!(
                    "Reference: NATS JetStream work queue, {storage}; PubAck per publish, pull consumer, ack each, 50 in flight"
                ),
                format!(
                    "{} messages in {:.2}s = {rate:.0}/s{}; publish -> delivered p50 {:.1} ms, p99 {:.1} ms; {}",
                    sizes.e2e,
                    handoff.elapsed.as_secs_f64(),
                    vs_p3(rate, e2e_rate, None),
                    handoff.quantile(0.5).as_secs_f64() * 1e3,
                    handoff.quantile(0.99).as_secs_f64() * 1e3,
                    cpu.per(sizes.e2e, "message"),
                ),
            );
        }
    }
    if want("P3") {
        row(
            "P3 ratios",
            format!(
                "P3 rate{}; P3 rate{}",
                vs("P1 echo rps", e2e_rate, echo_rps, Some("target >= 0.35x")),
                vs(
                    "durable JetStream",
                    e2e_rate,
                    durable_nats_rate,
                    Some("target >= 4x")
                ),
            ),
        );
    }

    // P7: P3 on PostgreSQL (fsync on), against the textbook PostgreSQL work queue on the same
    // server, with one listen replica and with two on one database. Each in a fresh database.
    if want("P7") {
        let server = TestPostgres::start_durable();
        let url = server.url(&server.new_database().await);
        let meter = Meter::start([("postgres", Counted::Tree(server.postmaster()))]);
        let queue = run_loadgen(
            &[
                "--rpc",
                "pg-queue",
                "--postgres-url",
                &url,
                "--max-in-flight",
                "512",
            ],
            50,
            sizes.e2e,
        );
        // loadgen's connections (67) start and end inside the reading: their backends' start-up
        // is counted here, while listen's pool connects before its readings.
        let cpu = meter
            .stop()
            .with("loadgen (producers and workers)", f(&queue, "cpu_seconds"));
        let baseline = f(&queue, "rps");
        row(
            "P7 baseline: PostgreSQL work queue (INSERT per conversation, c=50; claim of the free slots of a 512 window with FOR UPDATE SKIP LOCKED; an UPDATE per completion, 16 connections)",
            format!(
                "{} conversations in {:.2}s = {baseline:.0}/s (first INSERT to last completion); INSERT -> completed p50 {:.1} ms, p99 {:.1} ms, errors {}; {}",
                queue["ok"],
                f(&queue, "seconds"),
                f(&queue, "p50_ms"),
                f(&queue, "p99_ms"),
                queue["errors"],
                cpu.per(sizes.e2e, "conversation"),
            ),
        );

        let pusher_port = free_port();
        let pusher = start_pusher(PusherOptions::port(pusher_port)).await;
        let mut rates = Vec::new();
        for names in [&["listen"][..], &["listen a", "listen b"]] {
            let url = server.url(&server.new_database().await);
            let mut replicas = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let instance = format!("listen-{i}");
                let listen = start_listen(ListenOptions {
                    pusher_port,
                    extra: &[
                        "--store",
                        &url,
                        "--instance-id",
                        &instance,
                        "--max-in-flight",
                        "512",
                    ],
                })
                .await;
                replicas.push((*name, listen));
            }
            let (rate, text) = postgres_end_to_end(&replicas, &pusher, &server, sizes.e2e).await;
            row(
                &format!(
                    "P7 end-to-end on PostgreSQL (fsync on), {} listen replica{} on one database, one pusher",
                    names.len(),
                    if names.len() == 1 { "" } else { "s" }
                ),
                text,
            );
            rates.push(rate);
        }
        row(
            "P7 ratios",
            format!(
                "one replica{}; two replicas{}; two{}",
                vs("baseline", rates[0], baseline, Some("target >= 1.0x")),
                vs("baseline", rates[1], baseline, Some("target >= 1.0x")),
                vs("one", rates[1], rates[0], Some("target >= 1.0x")),
            ),
        );
    }

    // P6: P3 again through a dns: URL with three pushers (127.0.0.1-3): what one stream per
    // pusher costs, and how the work spreads.
    if want("P6") {
        let pusher_port = free_port();
        let mut pushers = Vec::new();
        for last in 1..=3u8 {
            let addr = std::net::SocketAddr::from(([127, 0, 0, last], pusher_port));
            pushers.push(start_pusher(PusherOptions::at(addr)).await);
        }
        let ips: Vec<std::net::Ipv4Addr> = (1..=3).map(|i| [127, 0, 0, i].into()).collect();
        let dns = tests::dns::TestDns::start("pusher.bench", &ips).await;
        let url = dns.url(pusher_port);
        let listen = start_listen(ListenOptions {
            pusher_port: 0,
            extra: &["--pusher-url", &url, "--max-in-flight", "512"],
        })
        .await;
        let client = listen_client(&listen);
        wait_endpoints_connected(&client, &ips, pusher_port).await;
        let meter = Meter::start(
            [("listen".to_string(), Counted::Process(listen.pid()))]
                .into_iter()
                .chain(pushers.iter().enumerate().map(|(i, pusher)| {
                    (format!("pusher {}", i + 1), Counted::Process(pusher.pid()))
                })),
        );
        let started = Instant::now();
        let submitted = loadgen(listen.addr, "submit", 50, sizes.e2e);
        let total =
            started.elapsed() + wait_drained(&client, Duration::from_secs(600), |_| {}).await;
        let cpu = meter.stop().with("loadgen", f(&submitted, "cpu_seconds"));
        let rate = sizes.e2e as f64 / total.as_secs_f64();
        let mut shares = Vec::new();
        for pusher in &pushers {
            shares.push(pusher.metric("pusher_jobs_started_total").await as u64);
        }
        row(
            "P6 end-to-end, three pushers behind dns:",
            format!(
                "{} conversations in {:.2}s = {rate:.0}/s{}; per pusher {shares:?}; Submit side {}; {}",
                sizes.e2e,
                total.as_secs_f64(),
                vs_p3(rate, e2e_rate, None),
                describe(&submitted),
                cpu.per(sizes.e2e, "conversation"),
            ),
        );
        drop(listen);
    }

    // P4: replay after an outage: drain rate and listen's memory.
    if want("P4") {
        let pusher_port = free_port();
        let listen = start_listen(ListenOptions {
            pusher_port,
            extra: &["--max-in-flight", "512"],
        })
        .await;
        let client = listen_client(&listen);
        let rss_before = listen.rss_kib();
        loadgen(listen.addr, "submit", 50, sizes.replay);
        let rss_queued = listen.rss_kib();
        let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
        let mut rss_peak = rss_queued;
        let drain = wait_drained(&client, Duration::from_secs(900), |_| {
            rss_peak = rss_peak.max(listen.rss_kib());
        })
        .await;
        let drain_rate = sizes.replay as f64 / drain.as_secs_f64();
        row(
            "P4 replay after outage",
            format!(
                "{} queued drained in {:.2}s = {drain_rate:.0}/s{}; listen RSS {} MiB before, {} MiB queued, {} MiB peak during, {} MiB after",
                sizes.replay,
                drain.as_secs_f64(),
                vs_p3(drain_rate, e2e_rate, Some("target >= 0.8x")),
                rss_before / 1024,
                rss_queued / 1024,
                rss_peak / 1024,
                listen.rss_kib() / 1024
            ),
        );
        drop(listen);
    }

    // P5: memory per in-flight conversation and per session; the pending bound.
    if want("P5") {
        let pusher_port = free_port();
        let _pusher = start_pusher(PusherOptions::port(pusher_port).args(&[
            "--simulated-latency",
            "600s",
            "--max-concurrency",
            "100000",
            "--max-queued",
            "100000",
        ]))
        .await;
        let bound = sizes.in_flight.to_string();
        let listen = start_listen(ListenOptions {
            pusher_port,
            extra: &["--max-in-flight", &bound],
        })
        .await;
        let mut client = listen_client(&listen);
        // Baseline once the link is up, so its own start-up is not counted as in-flight memory.
        wait_link(
            &client,
            listen::LinkState::Connected,
            Duration::from_secs(30),
        )
        .await;
        let rss_idle = listen.rss_kib();
        loadgen(listen.addr, "submit", 50, sizes.in_flight * 3);
        let status = wait_for("pending at its bound", Duration::from_secs(60), || {
            let mut client = client.clone();
            async move {
                let status = link_status(&mut client).await;
                (status.pending as u64 == sizes.in_flight).then_some(status)
            }
        })
        .await;
        let rss_full = listen.rss_kib();
        row(
            "P5 in flight",
            format!(
                "pending {} (bound {}), queued {}: {:.1} KiB per in-flight conversation (1 KiB of text each)",
                status.pending,
                sizes.in_flight,
                status.queued,
                (rss_full.saturating_sub(rss_idle)) as f64 / sizes.in_flight as f64
            ),
        );
        let rss_before_sessions = listen.rss_kib();
        let mut open = Vec::new();
        for i in 0..sizes.sessions {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(SessionRequest {
                msg: Some(Msg::Start(Start {
                    uid: format!("s{i}"),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            let mut events = client
                .session(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            events.message().await.unwrap();
            open.push((tx, events));
        }
        row(
            "P5 sessions",
            format!(
                "{} idle sessions: {:.1} KiB each",
                sizes.sessions,
                (listen.rss_kib().saturating_sub(rss_before_sessions)) as f64
                    / sizes.sessions as f64
            ),
        );
        drop(open);
        let _ = listen::GetLinkStatusRequest {};
    }

    // P8: fairness. Other uids submit at a trickle, with and without uid A's backlog
    // queued ahead of them; pusher takes 50 ms per conversation (64 at once), so the
    // backlog takes seconds to drain. Their Submit -> COMPLETED should not grow with it.
    if want("P8") {
        let per_uid = sizes.backlog.to_string();
        let mut figures = Vec::new();
        for backlog in [0, sizes.backlog] {
            let pusher_port = free_port();
            let _pusher = start_pusher(
                PusherOptions::port(pusher_port).args(&["--simulated-latency", "50ms"]),
            )
            .await;
            let listen = start_listen(ListenOptions {
                pusher_port,
                extra: &["--max-queued-per-uid", &per_uid],
            })
            .await;
            let client = listen_client(&listen);
            submit_many(&client, "backlog", backlog).await;
            let queued_before = link_status(&mut client.clone()).await.queued;
            let latencies = trickle(&client, sizes.trickle_uids, sizes.trickle_each).await;
            let backlog_left = link_status(&mut client.clone()).await.queued;
            figures.push(format!(
                "backlog {backlog} ({queued_before} queued when the trickle began, {backlog_left} when it had all completed): p50 {:.0} ms, p99 {:.0} ms",
                quantile_ms(&latencies, 0.5),
                quantile_ms(&latencies, 0.99)
            ));
            drop(listen);
        }
        row(
            &format!(
                "P8 fairness: {} uids x {} conversations at 5/s each, Submit -> COMPLETED, pusher 50 ms per conversation",
                sizes.trickle_uids, sizes.trickle_each
            ),
            figures.join("; "),
        );
    }

    println!("\n| scenario | result |\n|---|---|");
    for (name, value) in rows {
        println!("| {name} | {value} |");
    }
}
