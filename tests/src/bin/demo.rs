//! `cargo run -p tests --bin demo`: builds and starts both services (pusher-svc, then
//! listen-svc on the embedded SQLite store), submits a conversation, shows it go from
//! PROCESSING to COMPLETED with its structured result, and keeps both running for grpcurl
//! until Ctrl-C (or exits at once with `--exit`).

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tests::listen::{self, ConversationStatus, LinkState};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

struct Args {
    listen_addr: String,
    pusher_addr: String,
    /// Metrics endpoints (each service's `--admin-addr`), beside the service's own address.
    listen_admin_addr: String,
    pusher_admin_addr: String,
    store: String,
    latency: String,
    exit: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        listen_addr: "127.0.0.1:50051".into(),
        pusher_addr: "127.0.0.1:50052".into(),
        listen_admin_addr: String::new(),
        pusher_admin_addr: String::new(),
        store: "sqlite://./data/listen.db".into(),
        latency: "1s".into(),
        exit: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--listen-addr" => args.listen_addr = value("--listen-addr"),
            "--pusher-addr" => args.pusher_addr = value("--pusher-addr"),
            "--store" => args.store = value("--store"),
            "--latency" => args.latency = value("--latency"),
            "--exit" => args.exit = true,
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    args
}

fn usage(error: &str) -> ! {
    if !error.is_empty() {
        eprintln!("error: {error}\n");
    }
    eprintln!(
        "usage: cargo run -p tests --bin demo -- [--listen-addr 127.0.0.1:50051] [--pusher-addr 127.0.0.1:50052]\n\
         \x20                                      [--store sqlite://./data/listen.db] [--latency 1s] [--exit]\n\n\
         Starts pusher-svc and listen-svc, submits a conversation and shows it processed.\n\
         --listen-addr, --pusher-addr  where the services serve gRPC; a port of 0 picks a free one,\n\
         \x20          and then the service's metrics port (--admin-addr) is a free one too; otherwise\n\
         \x20          metrics are on the same host at 9464 (listen) and 9465 (pusher)\n\
         --latency  simulated processing time in pusher, so PROCESSING is visible (0s for none)\n\
         --exit     stop both services after the demonstration instead of waiting for Ctrl-C"
    );
    std::process::exit(if error.is_empty() { 0 } else { 64 })
}

/// Children are stopped with SIGTERM when the demo ends, however it ends.
struct Running(Vec<(&'static str, Child)>);

impl Drop for Running {
    fn drop(&mut self) {
        for (name, child) in self.0.iter_mut().rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
            // Not println!: with stdout gone (a closed pipe) it would panic here and leave
            // the remaining children running.
            let _ = writeln!(std::io::stdout(), "stopped {name}");
        }
    }
}

#[tokio::main]
async fn main() {
    let mut args = parse_args();
    args.listen_admin_addr = admin_addr_for(&args.listen_addr, 9464);
    args.pusher_admin_addr = admin_addr_for(&args.pusher_addr, 9465);
    args.listen_addr = with_free_port(&args.listen_addr);
    args.pusher_addr = with_free_port(&args.pusher_addr);
    let bin_dir = tests::build_services();
    std::fs::create_dir_all("data").expect("create ./data");

    let mut running = Running(Vec::new());
    let pusher = spawn(
        &bin_dir,
        "pusher-svc",
        &[
            "--listen-addr",
            &args.pusher_addr,
            "--admin-addr",
            &args.pusher_admin_addr,
            "--simulated-latency",
            &args.latency,
        ],
    );
    running.0.push(("pusher-svc", pusher));
    wait_serving(&mut running, &args.pusher_addr, "pusher.v1.Pusher").await;
    let pusher_url = format!("http://{}", args.pusher_addr);
    let listen = spawn(
        &bin_dir,
        "listen-svc",
        &[
            "--listen-addr",
            &args.listen_addr,
            "--admin-addr",
            &args.listen_admin_addr,
            "--pusher-url",
            &pusher_url,
            "--store",
            &args.store,
        ],
    );
    running.0.push(("listen-svc", listen));
    wait_serving(&mut running, &args.listen_addr, "listen.v1.Listen").await;
    println!(
        "pusher-svc on {} and listen-svc on {} are SERVING (logs in ./data/*.log; metrics at \
         http://{}/metrics and http://{}/metrics)\n",
        args.pusher_addr, args.listen_addr, args.pusher_admin_addr, args.listen_admin_addr
    );

    let mut client = listen::listen_client::ListenClient::new(channel(&args.listen_addr));
    let mut request = tests::talk("demo-user", &format!("demo-{}", unix_ms()));
    request.segments.push(tests::segment(
        "Let's meet again on Monday to review the numbers.",
        12.0,
    ));
    let started = Instant::now();
    let submitted = client
        .submit_conversation(request)
        .await
        .expect("SubmitConversation")
        .into_inner();
    println!(
        "SubmitConversation -> {} {:?} in {:.1} ms",
        submitted.conversation_id,
        ConversationStatus::try_from(submitted.status).unwrap_or_default(),
        started.elapsed().as_secs_f64() * 1000.0
    );

    let mut last = None;
    let conversation = loop {
        let conversation = client
            .get_conversation(listen::GetConversationRequest {
                conversation_id: submitted.conversation_id.clone(),
                ..Default::default()
            })
            .await
            .expect("GetConversation")
            .into_inner();
        let status = ConversationStatus::try_from(conversation.status).unwrap_or_default();
        if last != Some(status) {
            println!(
                "  {:>6.0} ms  {status:?}",
                started.elapsed().as_secs_f64() * 1000.0
            );
            last = Some(status);
        }
        if matches!(
            status,
            ConversationStatus::Completed | ConversationStatus::Failed
        ) {
            break conversation;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not processed within 60 s; see ./data/*.log"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let structured = conversation.structured.unwrap_or_default();
    println!("\nResult (attempts: {}):", conversation.attempts);
    println!("  title:        {}", structured.title);
    println!("  category:     {}", structured.category);
    println!("  overview:     {}", structured.overview);
    for item in &structured.action_items {
        println!("  action item:  {item}");
    }
    let link = client
        .get_link_status(listen::GetLinkStatusRequest {})
        .await
        .expect("GetLinkStatus")
        .into_inner();
    println!(
        "\nLink: {:?}, pending {}, queued {}, reconnects {}",
        LinkState::try_from(link.state).unwrap_or_default(),
        link.pending,
        link.queued,
        link.reconnects
    );
    if args.exit {
        return;
    }
    println!(
        "\nTry it with grpcurl (reflection is on):\n  grpcurl -plaintext {addr} list\n  \
         grpcurl -plaintext -d '{{\"conversation_id\":\"{id}\"}}' {addr} listen.v1.Listen/GetConversation\n  \
         grpcurl -plaintext {addr} listen.v1.Listen/GetLinkStatus\n\nCtrl-C stops both services.",
        addr = args.listen_addr,
        id = submitted.conversation_id
    );
    let _ = tokio::signal::ctrl_c().await;
    println!();
}

/// Starts `name` with its output appended to `./data/{name}.log` (appended, so a second demo
/// never truncates the log of one still running).
fn spawn(bin_dir: &Path, name: &str, args: &[&str]) -> Child {
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("data/{name}.log"))
        .expect("open log");
    let _ = writeln!(log, "--- started by the demo: {name} {}", args.join(" "));
    Command::new(bin_dir.join(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"))
}

fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("address")
        .connect_lazy()
}

async fn wait_serving(running: &mut Running, addr: &str, service: &str) {
    let starting = running.0.last().map(|(name, _)| *name).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut health = HealthClient::new(channel(addr));
    loop {
        for (name, child) in running.0.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!("error: {name} exited ({status}); the end of ./data/{name}.log:");
                for line in last_lines(&format!("data/{name}.log"), 5) {
                    eprintln!("  {line}");
                }
                if *name == starting {
                    eprintln!(
                        "(an address in use? choose others with --listen-addr/--pusher-addr, or port 0)"
                    );
                }
                std::process::exit(1);
            }
        }
        let check = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await;
        if check.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("error: {service} on {addr} not serving after 30 s");
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `n` lines of a log: what a service said before it exited.
fn last_lines(path: &str, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// A service's metrics address: on its host, at `default_port`, or a free port when the
/// service itself was given port 0 (so demos side by side do not collide).
fn admin_addr_for(service_addr: &str, default_port: u16) -> String {
    let Ok(parsed) = service_addr.parse::<std::net::SocketAddr>() else {
        usage(&format!("{service_addr} is not host:port"))
    };
    let port = if parsed.port() == 0 { 0 } else { default_port };
    with_free_port(&std::net::SocketAddr::new(parsed.ip(), port).to_string())
}

/// `host:0` becomes `host:N` with a port free right now, since listen must be told where
/// pusher is before pusher could report the port it was given.
fn with_free_port(addr: &str) -> String {
    let Ok(parsed) = addr.parse::<std::net::SocketAddr>() else {
        usage(&format!("{addr} is not host:port"))
    };
    if parsed.port() != 0 {
        return addr.to_string();
    }
    let listener = std::net::TcpListener::bind(parsed)
        .unwrap_or_else(|e| usage(&format!("cannot bind {addr}: {e}")));
    listener.local_addr().expect("local addr").to_string()
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}
