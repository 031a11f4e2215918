//! Harness for end-to-end tests: starts the real `listen-svc` and `pusher-svc` binaries on
//! loopback ports, waits for them through gRPC health (never by sleeping), kills them with
//! SIGKILL or SIGTERM, and restarts them on the same port and store.
//!
//! The binaries are the ones `cargo test --workspace` builds next to the test executables
//! (`target/<profile>/`); `cargo build --workspace --bins` builds them too.
#![forbid(unsafe_code)]

pub mod dns;
pub mod fake_pusher;
pub mod http;
pub mod nats;
pub mod postgres;
pub mod proxy;

pub use shared::proto::listen::v1 as listen;
pub use shared::proto::pusher::v1 as pusher;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How long the harness waits for a process to become healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of a workspace binary built next to the running test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> (tests) or target/<profile>/<bin> (bench) ->
    // target/<profile>/<name>
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build --workspace --bins` first)",
        path.display()
    );
    path
}

/// A free loopback port (bound and released; the kernel does not hand it out again at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Calls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One running service process. Killed on drop; its log is printed if the test failed.
pub struct Service {
    name: &'static str,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    pub addr: SocketAddr,
    /// Where its /metrics is served.
    pub admin: SocketAddr,
    /// TLS the harness uses to reach it (health checks), if it speaks TLS.
    pub client_tls: Option<tonic::transport::ClientTlsConfig>,
    log: PathBuf,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Service {
    fn spawn(name: &'static str, addr: SocketAddr, args: Vec<String>, log: PathBuf) -> Service {
        let admin = admin_of(&args);
        let mut service = Service {
            name,
            args,
            envs: Vec::new(),
            admin,
            client_tls: None,
            addr,
            log,
            child: None,
            _dir: None,
        };
        service.start_process();
        service
    }

    fn start_process(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(binary(self.name))
            .args(&self.args)
            .env("RUST_LOG", log_filter())
            .env_remove("LISTEN_STORE")
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name));
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (at most `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process again with the same arguments (same port, same store).
    pub async fn restart(&mut self) {
        self.kill();
        self.start_process();
        self.wait_healthy("").await;
    }

    /// A channel to the service.
    pub fn channel(&self) -> Channel {
        match &self.client_tls {
            None => Endpoint::from_shared(self.url())
                .unwrap()
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy(),
            Some(tls) => Endpoint::from_shared(format!("https://{}", self.addr))
                .unwrap()
                .tls_config(tls.clone())
                .unwrap()
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy(),
        }
    }

    /// Health of `service` ("" for the server as a whole), or None if unreachable.
    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        let mut client = HealthClient::new(self.channel());
        let request = HealthCheckRequest {
            service: service.to_string(),
        };
        let response = tokio::time::timeout(Duration::from_secs(2), client.check(request))
            .await
            .ok()?
            .ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }

    pub async fn wait_healthy(&mut self, service: &str) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "{} exited during start-up ({status}):\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if self.health(service).await == Some(ServingStatus::Serving) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not healthy within {START_TIMEOUT:?}:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines = std::env::var("TEST_LOG_LINES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(60);
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            eprintln!(
                "---- last lines of {} log ({}) ----",
                self.name,
                self.log.display()
            );
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Starts pusher-svc on `port` with extra flags, and waits for it to be healthy.
pub async fn start_pusher(port: u16, extra: &[&str]) -> Service {
    start_pusher_with_env(port, extra, &[]).await
}

/// [`start_pusher`] with environment variables (secrets that have no flag).
pub async fn start_pusher_with_env(port: u16, extra: &[&str], envs: &[(&str, &str)]) -> Service {
    start_pusher_full(local(port), extra, envs, None).await
}

/// [`start_pusher`] on another loopback address (127.0.0.2, ...: Linux routes all of
/// 127.0.0.0/8 to the loopback interface).
pub async fn start_pusher_at(addr: SocketAddr, extra: &[&str]) -> Service {
    start_pusher_full(addr, extra, &[], None).await
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A pusher speaking TLS; the harness reaches it with `client_tls`.
pub async fn start_pusher_tls(
    port: u16,
    extra: &[&str],
    client_tls: tonic::transport::ClientTlsConfig,
) -> Service {
    start_pusher_full(local(port), extra, &[], Some(client_tls)).await
}

async fn start_pusher_full(
    addr: SocketAddr,
    extra: &[&str],
    envs: &[(&str, &str)],
    client_tls: Option<tonic::transport::ClientTlsConfig>,
) -> Service {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--listen-addr".to_string(), addr.to_string()];
    args.extend(with_defaults(
        &["--admin-addr", &format!("127.0.0.1:{}", free_port())],
        extra,
    ));
    let log = dir.path().join("pusher.log");
    let admin = admin_of(&args);
    let envs = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut service = Service {
        name: "pusher-svc",
        args,
        envs,
        addr,
        admin,
        client_tls,
        log,
        child: None,
        _dir: Some(dir),
    };
    service.start_process();
    service.wait_healthy("").await;
    service
}

/// A listen-svc with its own SQLite store in a temporary directory.
pub struct ListenOptions<'a> {
    pub pusher_port: u16,
    pub extra: &'a [&'a str],
}

/// Flags that keep tests quick: fast reconnects. Defaults are left alone otherwise.
pub const FAST_LINK: &[&str] = &[
    "--reconnect-initial",
    "100ms",
    "--reconnect-max",
    "500ms",
    "--retry-initial",
    "100ms",
    "--probe-interval",
    "1s",
];

pub async fn start_listen(options: ListenOptions<'_>) -> Service {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let store = format!("sqlite://{}", dir.path().join("listen.db").display());
    let mut args = vec!["--listen-addr".to_string(), addr.to_string()];
    // A test that names its own --pusher-url (a proxy, a fake) gets only that one.
    if !options.extra.contains(&"--pusher-url") {
        args.extend([
            "--pusher-url".to_string(),
            format!("http://127.0.0.1:{}", options.pusher_port),
        ]);
    }
    // A test's own --store / --instance-id (PostgreSQL, several replicas) win.
    if !options.extra.contains(&"--store") {
        args.extend(["--store".to_string(), store]);
    }
    if !options.extra.contains(&"--instance-id") {
        args.extend(["--instance-id".to_string(), "listen-test".to_string()]);
    }
    let admin = format!("127.0.0.1:{}", free_port());
    let defaults: Vec<&str> = FAST_LINK
        .iter()
        .copied()
        .chain(["--admin-addr", admin.as_str()])
        .collect();
    args.extend(with_defaults(&defaults, options.extra));
    let mut service = Service::spawn("listen-svc", addr, args, dir.path().join("listen.log"));
    service._dir = Some(dir);
    service.wait_healthy("").await;
    service
}

pub type ListenClient = listen::listen_client::ListenClient<Channel>;
pub type PusherClient = pusher::pusher_client::PusherClient<Channel>;

pub fn listen_client(service: &Service) -> ListenClient {
    ListenClient::new(service.channel())
}

pub fn pusher_client(service: &Service) -> PusherClient {
    PusherClient::new(service.channel())
}

/// A conversation with some talk in it.
pub fn talk(uid: &str, key: &str) -> listen::SubmitConversationRequest {
    listen::SubmitConversationRequest {
        uid: uid.to_string(),
        idempotency_key: key.to_string(),
        language: "en".to_string(),
        segments: vec![
            segment(
                "So, the quarterly budget review with the finance team.",
                0.0,
            ),
            segment("I will send the invoice summary by Friday.", 4.0),
            segment("We need to cut travel costs next quarter.", 8.0),
        ],
    }
}

pub fn segment(text: &str, start: f64) -> listen::Segment {
    listen::Segment {
        text: text.to_string(),
        speaker: "SPEAKER_0".to_string(),
        start,
        end: start + 3.5,
        is_user: true,
    }
}

/// Reads a conversation's status.
pub async fn status_of(client: &mut ListenClient, id: &str) -> listen::ConversationStatus {
    let conversation = client
        .get_conversation(listen::GetConversationRequest {
            conversation_id: id.to_string(),
        })
        .await
        .expect("get")
        .into_inner();
    listen::ConversationStatus::try_from(conversation.status).unwrap()
}

/// Waits until every id has `status`, returning the conversations.
pub async fn wait_all(
    client: &ListenClient,
    ids: &[String],
    status: listen::ConversationStatus,
    timeout: Duration,
) -> Vec<listen::Conversation> {
    let mut done = Vec::new();
    let mut remaining: Vec<String> = ids.to_vec();
    let deadline = Instant::now() + timeout;
    while !remaining.is_empty() {
        let mut still = Vec::new();
        for id in remaining {
            let mut client = client.clone();
            let conversation = client
                .get_conversation(listen::GetConversationRequest {
                    conversation_id: id.clone(),
                })
                .await
                .expect("get")
                .into_inner();
            if conversation.status == status as i32 {
                done.push(conversation);
            } else {
                still.push(id);
            }
        }
        remaining = still;
        if !remaining.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} of {} not {status:?} after {timeout:?}",
                remaining.len(),
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    done
}

pub async fn link_status(client: &mut ListenClient) -> listen::LinkStatus {
    client
        .get_link_status(listen::GetLinkStatusRequest {})
        .await
        .expect("link status")
        .into_inner()
}

/// Waits until conversation `id` has `status`, returning it.
pub async fn wait_one(
    client: &ListenClient,
    id: &str,
    status: listen::ConversationStatus,
    timeout: Duration,
) -> listen::Conversation {
    wait_all(client, &[id.to_string()], status, timeout)
        .await
        .remove(0)
}

impl Service {
    /// Log lines containing every one of `needles`.
    pub fn log_lines_with(&self, needles: &[&str]) -> usize {
        self.log_text()
            .lines()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .count()
    }
}

/// Submits `n` conversations for `uid` with up to 16 in flight; returns their ids in order.
pub async fn submit_many(client: &ListenClient, uid: &str, n: usize) -> Vec<String> {
    let mut ids = vec![String::new(); n];
    let mut tasks = tokio::task::JoinSet::new();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..16 {
        let (client, next, uid) = (client.clone(), next.clone(), uid.to_string());
        tasks.spawn(async move {
            let mut client = client;
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return done;
                }
                let response = client
                    .submit_conversation(talk(&uid, &format!("{uid}-{i}")))
                    .await
                    .expect("submit");
                done.push((i, response.into_inner().conversation_id));
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        for (i, id) in done.expect("submit task") {
            ids[i] = id;
        }
    }
    ids
}

/// Counts `uid`'s conversations in `status` through ListConversations paging.
pub async fn count_listed(
    client: &ListenClient,
    uid: &str,
    status: listen::ConversationStatus,
) -> usize {
    let mut client = client.clone();
    let mut token = String::new();
    let mut count = 0;
    loop {
        let page = client
            .list_conversations(listen::ListConversationsRequest {
                uid: uid.to_string(),
                status: status as i32,
                page_size: 500,
                page_token: token,
            })
            .await
            .expect("list")
            .into_inner();
        count += page.conversations.len();
        if page.next_page_token.is_empty() {
            return count;
        }
        token = page.next_page_token;
    }
}

/// `overrides` (a flat list of `--flag value` pairs) plus every pair of `defaults` whose flag
/// `overrides` does not set: clap refuses a flag given twice.
pub fn with_defaults(defaults: &[&str], overrides: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    for pair in defaults.chunks(2) {
        if !overrides.contains(&pair[0]) {
            out.extend(pair.iter().map(|s| s.to_string()));
        }
    }
    out
}

/// The --admin-addr among `args`.
fn admin_of(args: &[String]) -> SocketAddr {
    args.iter()
        .position(|a| a == "--admin-addr")
        .and_then(|i| args.get(i + 1))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())
}

impl Service {
    /// GET /metrics on the admin port (plain HTTP/1.0 over a socket).
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.admin)
            .await
            .expect("admin port");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(
            response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
            "{response}"
        );
        response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }

    /// The sum of the series `query` selects, 0 if none: `name` alone selects every series of
    /// that name, `name{a="x",b="y"}` those carrying at least these labels.
    pub async fn metric(&self, query: &str) -> f64 {
        sum_series(&self.metrics().await, query)
    }
}

/// Sums the Prometheus text-format series that `query` selects (see [`Service::metric`]).
pub fn sum_series(text: &str, query: &str) -> f64 {
    let labels_of = |s: &str| -> Vec<String> {
        s.trim_end_matches('}')
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (name, wanted) = match query.split_once('{') {
        Some((name, labels)) => (name, labels_of(labels)),
        None => (query, Vec::new()),
    };
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, labels) = match series.split_once('{') {
                Some((n, labels)) => (n, labels_of(labels)),
                None => (series, Vec::new()),
            };
            (series_name == name && wanted.iter().all(|w| labels.contains(w)))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

static LOG_FILTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets RUST_LOG for every service started from now on (benchmarks want quiet services).
pub fn set_log_filter(filter: &str) {
    let _ = LOG_FILTER.set(filter.to_string());
}

/// RUST_LOG for started services: [`set_log_filter`], else $TEST_RUST_LOG, else debug for ours.
fn log_filter() -> String {
    LOG_FILTER
        .get()
        .cloned()
        .or_else(|| std::env::var("TEST_RUST_LOG").ok())
        .unwrap_or_else(|| "info,listen_svc=debug,pusher_svc=debug".into())
}

impl Service {
    /// Resident set size of the process, in KiB (Linux /proc).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Starts any workspace binary serving gRPC health on `addr`, and waits until it is healthy.
pub async fn start_binary(name: &'static str, addr: SocketAddr, args: Vec<String>) -> Service {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::spawn(name, addr, args, dir.path().join(format!("{name}.log")));
    service._dir = Some(dir);
    service.wait_healthy("").await;
    service
}

/// Builds listen-svc and pusher-svc with the cargo running this program, in its profile, so a
/// `cargo run -p tests --bin ...` finds them next to itself. Returns that directory.
pub fn build_services() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut build = Command::new(cargo);
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "listen-svc",
            "-p",
            "pusher-svc",
            "--manifest-path",
        ])
        .arg(&manifest);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    println!("building listen-svc and pusher-svc ...");
    let status = build.status().expect("run cargo build");
    if !status.success() {
        eprintln!("error: building the services failed");
        std::process::exit(1);
    }
    std::env::current_exe()
        .expect("current_exe")
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

/// Waits until listen's link lists exactly `ips` (each at `port`) as its pusher endpoints,
/// each CONNECTED.
pub async fn wait_endpoints_connected(
    client: &ListenClient,
    ips: &[std::net::Ipv4Addr],
    port: u16,
) {
    let mut wanted: Vec<String> = ips.iter().map(|ip| format!("{ip}:{port}")).collect();
    wanted.sort();
    wait_for("the endpoints connected", Duration::from_secs(20), || {
        let (mut client, wanted) = (client.clone(), wanted.clone());
        async move {
            let status = link_status(&mut client).await;
            let mut connected: Vec<String> = status
                .endpoints
                .iter()
                .filter(|e| e.state == listen::LinkState::Connected as i32)
                .map(|e| e.address.clone())
                .collect();
            connected.sort();
            (connected == wanted && status.endpoints.len() == wanted.len()).then_some(())
        }
    })
    .await;
}

/// Waits until listen's link has nothing pending or queued, calling `observe` with every
/// status it polls; returns how long that took, or panics after `timeout`.
pub async fn wait_drained(
    client: &ListenClient,
    timeout: Duration,
    observe: impl FnMut(&listen::LinkStatus),
) -> Duration {
    let started = Instant::now();
    let observe = std::cell::RefCell::new(observe);
    wait_for(
        "the link to drain (nothing pending or queued)",
        timeout,
        || {
            let (mut client, observe) = (client.clone(), &observe);
            async move {
                let status = link_status(&mut client).await;
                (observe.borrow_mut())(&status);
                (status.queued == 0 && status.pending == 0).then_some(())
            }
        },
    )
    .await;
    started.elapsed()
}

/// Waits until listen's link is CONNECTED, or panics.
pub async fn wait_link_up(client: &ListenClient) {
    wait_for(
        "the link to pusher connected",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            async move {
                (link_status(&mut client).await.state == listen::LinkState::Connected as i32)
                    .then_some(())
            }
        },
    )
    .await
}

/// Waits until listen's link has left CONNECTED (a fault was noticed), or panics naming `what`.
pub async fn wait_link_down(client: &ListenClient, what: &str, timeout: Duration) {
    wait_for(what, timeout, || {
        let mut client = client.clone();
        async move {
            (link_status(&mut client).await.state != listen::LinkState::Connected as i32)
                .then_some(())
        }
    })
    .await
}
