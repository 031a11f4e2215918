//! Start options: how the harness starts pusher-svc and listen-svc for a test, with the
//! flags that keep tests quick unless the test sets them itself.

use crate::processes::{Service, free_port};
use std::net::SocketAddr;

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
    let mut service = Service::new("pusher-svc", addr, args, dir, "pusher.log");
    service.envs = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    service.client_tls = client_tls;
    service.launch().await
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
    Service::new("listen-svc", addr, args, dir, "listen.log")
        .launch()
        .await
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
