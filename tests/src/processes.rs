//! Service processes: start a workspace binary on a loopback port, wait for it through gRPC
//! health (never by sleeping), stop it with SIGKILL or SIGTERM, restart it on the same port
//! and store, and read its log and memory. Also builds the services for the demo and bench.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How long the harness waits for a process to become healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes [`binary`] take the service binaries from `dir` from now on (a program told which
/// build to run, such as the nemesis's `--bin-dir`). Only the first call counts.
pub fn set_bin_dir(dir: PathBuf) {
    let _ = BIN_DIR.set(dir);
}

/// Path of a workspace binary: in the directory [`set_bin_dir`] named, else built next to
/// the running test executable.
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = BIN_DIR.get() {
        let path = dir.join(name);
        assert!(path.exists(), "{} is missing", path.display());
        return path;
    }
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

/// One running service process. Killed on drop; its log is printed if the test failed.
pub struct Service {
    name: &'static str,
    args: Vec<String>,
    /// Environment variables set for the process (secrets that have no flag).
    pub(crate) envs: Vec<(String, String)>,
    pub addr: SocketAddr,
    /// Where its /metrics is served.
    pub admin: SocketAddr,
    /// TLS the harness uses to reach it (health checks), if it speaks TLS.
    pub client_tls: Option<ClientTlsConfig>,
    log: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Service {
    /// A service not started yet, logging to `log_name` in `dir` (kept while it lives).
    pub(crate) fn new(
        name: &'static str,
        addr: SocketAddr,
        args: Vec<String>,
        dir: tempfile::TempDir,
        log_name: &str,
    ) -> Service {
        Service {
            name,
            admin: admin_of(&args),
            args,
            envs: Vec::new(),
            client_tls: None,
            addr,
            log: dir.path().join(log_name),
            child: None,
            _dir: dir,
        }
    }

    /// Starts the process and waits until it is healthy.
    pub(crate) async fn launch(mut self) -> Service {
        self.start_process();
        self.wait_healthy("").await;
        self
    }

    fn start_process(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(binary(self.name));
        // Traces are the test's to configure: none of the runner's OpenTelemetry settings.
        for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("OTEL_")) {
            command.env_remove(name);
        }
        let child = command
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

    /// SIGSTOP: the process stays, frozen (a long GC pause, a throttled container).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Service::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
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

    /// Starts the process again with the same arguments and `envs` in place of the
    /// environment it had (a shifted clock on, or off).
    pub async fn restart_with_env(&mut self, envs: Vec<(String, String)>) {
        self.envs = envs;
        self.restart().await;
    }

    /// Whether the process is running (started, and not stopped by the harness).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
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

    /// Log lines containing every one of `needles`.
    pub fn log_lines_with(&self, needles: &[&str]) -> usize {
        self.log_text()
            .lines()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .count()
    }

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

/// Starts any workspace binary serving gRPC health on `addr`, and waits until it is healthy.
pub async fn start_binary(name: &'static str, addr: SocketAddr, args: Vec<String>) -> Service {
    let dir = tempfile::tempdir().unwrap();
    Service::new(name, addr, args, dir, &format!("{name}.log"))
        .launch()
        .await
}

/// The --admin-addr among `args`.
fn admin_of(args: &[String]) -> SocketAddr {
    args.iter()
        .position(|a| a == "--admin-addr")
        .and_then(|i| args.get(i + 1))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())
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

/// Builds listen-svc and pusher-svc with the cargo running this program, in its profile, so a
/// `cargo run -p tests --bin ...` finds them next to itself. Returns that directory.
///
/// Cargo's own progress goes to the terminal. The child cargo does not inherit what
/// `cargo run` set for this package (`is_per_package_env`): ring's build script tracks
/// `CARGO_MANIFEST_DIR`, so with it ring, rustls, tonic and everything above them would be
/// rebuilt on every switch between the demo and a plain `cargo build` or `cargo test`.
pub fn build_services() -> PathBuf {
    build(
        "listen-svc and pusher-svc",
        &["-p", "listen-svc", "-p", "pusher-svc"],
    )
}

/// As [`build_services`], and the benchmark's own tools (the echo baseline and loadgen),
/// which `cargo run --bin bench` does not build.
pub fn build_bench() -> PathBuf {
    build(
        "listen-svc, pusher-svc, echo and loadgen",
        &[
            "-p",
            "listen-svc",
            "-p",
            "pusher-svc",
            "-p",
            "tests",
            // --bin selects among all the packages given: name every binary.
            "--bin",
            "listen-svc",
            "--bin",
            "pusher-svc",
            "--bin",
            "echo",
            "--bin",
            "loadgen",
        ],
    )
}

fn build(what: &str, packages: &[&str]) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut build = Command::new(cargo);
    build
        .arg("build")
        .args(packages)
        .arg("--manifest-path")
        .arg(&manifest);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    for (key, _) in std::env::vars_os() {
        if is_per_package_env(&key) {
            build.env_remove(key);
        }
    }
    println!("building {what} (cargo's progress follows) ...");
    let status = build.status().expect("run cargo build");
    if !status.success() {
        eprintln!("error: building {what} failed");
        std::process::exit(1);
    }
    std::env::current_exe()
        .expect("current_exe")
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

/// Whether `key` is one of the variables cargo sets for the package it runs or builds (as
/// opposed to the user's own configuration, such as `CARGO_HOME` or `CARGO_TARGET_DIR`).
fn is_per_package_env(key: &OsStr) -> bool {
    const SET_FOR_A_PACKAGE: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    let Some(key) = key.to_str() else {
        return false;
    };
    SET_FOR_A_PACKAGE.contains(&key)
        || key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_EXE_")
}

#[cfg(test)]
mod tests {
    use super::is_per_package_env;
    use std::ffi::OsStr;

    #[test]
    fn per_package_variables_are_told_from_the_users_configuration() {
        for key in [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_BIN_EXE_listen-svc",
        ] {
            assert!(is_per_package_env(OsStr::new(key)), "{key}");
        }
        for key in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "CARGO_PROFILE_DEV_OPT_LEVEL",
            "CARGO_TERM_COLOR",
            "RUSTFLAGS",
            "PATH",
        ] {
            assert!(!is_per_package_env(OsStr::new(key)), "{key}");
        }
    }
}
