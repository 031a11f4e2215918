//! A throwaway PostgreSQL server for tests: `initdb` into a temporary directory and
//! `postgres` on a free loopback port. Tests that need PostgreSQL start one this way; they
//! never skip. Needs the PostgreSQL server binaries (`initdb`, `postgres`) on PATH or in
//! /usr/lib/postgresql/*/bin. As root (CI, sessions), the server runs as the `postgres` user,
//! since `initdb` refuses root.
//!
//! A watchdog shell stops the server when the test process exits, however it exits, so no
//! server outlives its tests, even the process-wide [`shared`] one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct TestPostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    server: Option<Child>,
}

/// One server per test process, started on first use; each test takes its own database.
pub fn shared() -> &'static TestPostgres {
    static SERVER: OnceLock<TestPostgres> = OnceLock::new();
    SERVER.get_or_init(TestPostgres::start)
}

/// A new, empty database on the process-wide server; returns its URL.
pub async fn fresh_database() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let server = shared();
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    server.create_database(&name).await;
    server.url(&name)
}

impl TestPostgres {
    /// initdb + start on a free port; panics with the reason if it cannot.
    pub fn start() -> TestPostgres {
        let bin = find_bin_dir();
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
            "listen-pg-{}-{}",
            std::process::id(),
            crate::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if as_postgres {
            run(Command::new("chown").args(["-R", "postgres"]).arg(&dir));
        }
        let data = dir.join("data");
        let mut initdb = command(as_postgres, &bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        run(&mut initdb);
        let mut server = TestPostgres {
            port: crate::free_port(),
            dir,
            bin,
            as_postgres,
            server: None,
        };
        server.launch();
        server
    }

    /// Starts (or restarts) the server process on the same data directory and port.
    pub fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.join("postgres.log")).unwrap();
        let postgres = self.bin.join("postgres");
        let data = self.dir.join("data");
        // The watchdog: runs postgres; when the test process is gone, stops it with pg_ctl
        // (runuser forks, so signalling its pid would not reach postgres) and removes the
        // data directory.
        let run = if self.as_postgres {
            "runuser -u postgres --"
        } else {
            ""
        };
        let script = format!(
            "{run} {postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 & \
             pg=$!; while kill -0 {parent} 2>/dev/null && kill -0 $pg 2>/dev/null; do sleep 0.5; done; \
             if kill -0 {parent} 2>/dev/null; then wait $pg; exit; fi; \
             {run} {pg_ctl} -D {data} stop -m immediate >/dev/null 2>&1; wait $pg; rm -rf {dir}",
            postgres = postgres.display(),
            pg_ctl = self.bin.join("pg_ctl").display(),
            data = data.display(),
            port = self.port,
            dir = self.dir.display(),
            parent = std::process::id(),
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.server = Some(child);
        self.wait_ready();
    }

    /// Stops the server (fast shutdown) and waits for it to go.
    pub fn stop(&mut self) {
        let mut pg_ctl = command(self.as_postgres, &self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "fast", "-w"]);
        run(&mut pg_ctl);
        if let Some(mut child) = self.server.take() {
            let _ = child.wait();
        }
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub async fn create_database(&self, name: &str) {
        // The port opens before the server accepts sessions ("the database system is starting
        // up"), so readiness is a real connection, within a deadline.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (client, connection) = loop {
            match tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await {
                Ok(connected) => break connected,
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!(
                    "cannot connect to the test server on port {}: {error}",
                    self.port
                ),
            }
        };
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = task.await;
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "postgres did not start on port {}:\n{}",
                self.port,
                std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if self.server.is_some() {
            self.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_bin_dir() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok())
                .map(|d| d.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates.reverse(); // newest version first
    candidates
        .into_iter()
        .chain(on_path)
        .find(|dir| {
            dir.join("initdb").exists()
                && dir.join("postgres").exists()
                && dir.join("pg_ctl").exists()
        })
        .expect(
            "PostgreSQL server binaries (initdb, postgres, pg_ctl) not found: install postgresql",
        )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn command(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
