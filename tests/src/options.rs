//! Start options: how the harness starts pusher-svc and listen-svc for a test, with the
//! flags that keep tests quick unless the test sets them itself.

use crate::processes::{Service, free_port};
use std::net::SocketAddr;
use tonic::transport::ClientTlsConfig;

/// How [`start_pusher`] starts a pusher-svc: where it listens, its extra flags and
/// environment, and the TLS the harness reaches it with.
#[derive(Clone, Debug)]
pub struct PusherOptions {
    pub addr: SocketAddr,
    /// Extra flags; an --admin-addr here replaces the harness's free port.
    pub args: Vec<String>,
    /// Environment variables (secrets that have no flag).
    pub envs: Vec<(String, String)>,
    /// Set for a pusher speaking TLS: the harness's health checks use it.
    pub client_tls: Option<ClientTlsConfig>,
}

impl PusherOptions {
    /// A plaintext pusher on 127.0.0.1:`port`, default flags.
    pub fn port(port: u16) -> PusherOptions {
        PusherOptions::at(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// A plaintext pusher on `addr` (127.0.0.2, ...: Linux routes all of 127.0.0.0/8 to the
    /// loopback interface), default flags.
    pub fn at(addr: SocketAddr) -> PusherOptions {
        PusherOptions {
            addr,
            args: Vec::new(),
            envs: Vec::new(),
            client_tls: None,
        }
    }

    /// Adds flags (`--flag value` pairs).
    pub fn args(mut self, args: &[&str]) -> PusherOptions {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Adds environment variables.
    pub fn envs(mut self, envs: &[(&str, &str)]) -> PusherOptions {
        self.envs
            .extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// A pusher speaking TLS (its flags say so); the harness reaches it with `client_tls`.
    pub fn tls(mut self, client_tls: ClientTlsConfig) -> PusherOptions {
        self.client_tls = Some(client_tls);
        self
    }
}

/// Starts pusher-svc as `options` say, and waits for it to be healthy.
pub async fn start_pusher(options: PusherOptions) -> Service {
    let dir = tempfile::tempdir().unwrap();
    let extra: Vec<&str> = options.args.iter().map(String::as_str).collect();
    let mut args = vec!["--listen-addr".to_string(), options.addr.to_string()];
    args.extend(with_defaults(
        &["--admin-addr", &format!("127.0.0.1:{}", free_port())],
        &extra,
    ));
    let mut service = Service::new("pusher-svc", options.addr, args, dir, "pusher.log");
    service.envs = options.envs;
    service.client_tls = options.client_tls;
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

/// Starts listen-svc as `options` say, and waits for it to be healthy: pointed at pusher on
/// `pusher_port`, with its own SQLite store, instance id "listen-test" and [`FAST_LINK`],
/// each unless `extra` names it.
pub async fn start_listen(options: ListenOptions<'_>) -> Service {
    launch_listen(options, None, Vec::new()).await
}

/// [`start_listen`], with environment variables (a shifted clock, say).
pub async fn start_listen_with_env(
    options: ListenOptions<'_>,
    envs: Vec<(String, String)>,
) -> Service {
    launch_listen(options, None, envs).await
}

/// [`start_listen`] for a listen whose own port speaks TLS (its flags say so); the harness
/// reaches it with `client_tls`.
pub async fn start_listen_tls(options: ListenOptions<'_>, client_tls: ClientTlsConfig) -> Service {
    launch_listen(options, Some(client_tls), Vec::new()).await
}

async fn launch_listen(
    options: ListenOptions<'_>,
    client_tls: Option<ClientTlsConfig>,
    envs: Vec<(String, String)>,
) -> Service {
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
    let mut service = Service::new("listen-svc", addr, args, dir, "listen.log");
    service.envs = envs;
    service.client_tls = client_tls;
    service.launch().await
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
