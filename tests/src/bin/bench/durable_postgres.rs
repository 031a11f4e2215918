//! P7's PostgreSQL server, with PostgreSQL's own defaults: fsync, synchronous_commit and
//! full_page_writes on, so a commit is on disk when it returns, as listen's SQLite commit
//! is (`synchronous=FULL`). The tests' server (`tests::postgres`) turns all three off for
//! speed, which would compare a durable store with one that is not.
//!
//! `initdb` into a temporary directory, `postgres` on a free loopback port (as the
//! `postgres` user when run as root: initdb refuses root), and a watchdog shell that stops
//! the server if the bench dies without dropping it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct DurablePostgres {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    watchdog: Child,
    databases: u32,
}

impl DurablePostgres {
    /// initdb, start, and wait until the server accepts sessions (at most 30 s).
    pub async fn start() -> DurablePostgres {
        let bin = bin_dir();
        let as_postgres = is_root();
        let dir = tempfile::tempdir().expect("temporary directory");
        let data = dir.path().join("data");
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path()));
        }
        run(as_user(as_postgres, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]));
        let port = tests::free_port();
        let runuser = if as_postgres {
            "runuser -u postgres --"
        } else {
            ""
        };
        // Polls every 0.5 s whether the bench is still there; if not, stops the server and
        // removes its files. When the server goes first (the bench's Drop), it just exits.
        let script = format!(
            "{runuser} {postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 & \
             pg=$!; while kill -0 {parent} 2>/dev/null && kill -0 $pg 2>/dev/null; do sleep 0.5; done; \
             if kill -0 {parent} 2>/dev/null; then wait $pg; exit; fi; \
             {runuser} {pg_ctl} -D {data} stop -m immediate >/dev/null 2>&1; wait $pg; rm -rf {dir}",
            postgres = bin.join("postgres").display(),
            pg_ctl = bin.join("pg_ctl").display(),
            data = data.display(),
            dir = dir.path().display(),
            parent = std::process::id(),
        );
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let server = DurablePostgres {
            port,
            dir,
            bin,
            as_postgres,
            watchdog,
            databases: 0,
        };
        let (client, connection) = server.session("postgres").await;
        drop(client);
        let _ = connection.await;
        server
    }

    /// The postmaster's pid (from postmaster.pid): the root of the server's processes.
    pub fn postmaster(&self) -> u32 {
        let file = self.dir.path().join("data/postmaster.pid");
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {}", file.display()))
    }

    /// A new, empty database; returns its URL.
    pub async fn fresh_database(&mut self) -> String {
        self.databases += 1;
        let name = format!("bench{}", self.databases);
        let (client, connection) = self.session("postgres").await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = connection.await;
        self.url(&name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A session on `database`, and the task driving its connection. The port opens before
    /// the server accepts sessions, so this retries for at most 30 s.
    async fn session(
        &self,
        database: &str,
    ) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio_postgres::connect(&self.url(database), tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    let task = tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    return (client, task);
                }
                Err(error) => assert!(
                    Instant::now() < deadline,
                    "PostgreSQL did not accept sessions on port {} within 30 s: {error}\n{}",
                    self.port,
                    std::fs::read_to_string(self.dir.path().join("postgres.log"))
                        .unwrap_or_default()
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for DurablePostgres {
    /// Fast shutdown; the watchdog then sees the server gone and exits.
    fn drop(&mut self) {
        let _ = as_user(self.as_postgres, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["stop", "-m", "fast", "-w"])
            .output();
        let _ = self.watchdog.wait();
    }
}

/// The newest /usr/lib/postgresql/*/bin holding the server binaries, else PATH's.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .collect();
    versions.sort_by_key(|dir| {
        let version = dir
            .parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok());
        std::cmp::Reverse(version)
    });
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    versions
        .into_iter()
        .chain(on_path)
        .find(|dir| {
            ["initdb", "postgres", "pg_ctl"]
                .iter()
                .all(|b| dir.join(b).exists())
        })
        .expect(
            "PostgreSQL server binaries (initdb, postgres, pg_ctl) not found: install postgresql",
        )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn as_user(as_postgres: bool, program: &Path) -> Command {
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
