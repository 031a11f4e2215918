//! A throwaway PostgreSQL server for tests: `initdb` into a temporary directory and
//! `postgres` on a free loopback port. Tests that need PostgreSQL start one this way; they
//! never skip. Needs the PostgreSQL server binaries (`initdb`, `postgres`) on PATH or in
//! /usr/lib/postgresql/*/bin. As root (CI, sessions), the server runs as the `postgres` user,
//! since `initdb` refuses root.
//!
//! A watchdog shell stops the server when the test process exits, however it exits, so no
//! server outlives its tests, even the process-wide [`shared`] one.
//!
//! [`TestPostgres::start_tls`] starts one that also speaks TLS, with certificates generated
//! for it ([`ServerTls`]); [`shared_tls`] is the process-wide one.

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
    tls: Option<ServerTls>,
    /// PostgreSQL's own durability settings (fsync, synchronous_commit, full_page_writes on),
    /// instead of the tests' fast ones that turn them off.
    durable: bool,
}

/// One server per test process, started on first use; each test takes its own database.
pub fn shared() -> &'static TestPostgres {
    static SERVER: OnceLock<TestPostgres> = OnceLock::new();
    SERVER.get_or_init(TestPostgres::start)
}

/// One TLS server per test process ([`TestPostgres::start_tls`]), started on first use.
pub fn shared_tls() -> &'static TestPostgres {
    static SERVER: OnceLock<TestPostgres> = OnceLock::new();
    SERVER.get_or_init(TestPostgres::start_tls)
}

/// The certificates of a TLS test server, generated for it (rcgen), as PEM files.
///
/// The server's certificate names only [`ServerTls::HOST_NAME`], so a URL reaches it by that
/// name with `hostaddr=127.0.0.1` (checked by `verify-full`), or by `127.0.0.1` (which
/// `verify-full` refuses and `verify-ca` accepts). Its pg_hba.conf lets
/// [`ServerTls::CERT_USER`] in over TLS with a client certificate only,
/// [`ServerTls::PASSWORD_USER`] over TLS with its password (SCRAM, as managed services do),
/// and every other role in with or without TLS.
pub struct ServerTls {
    dir: PathBuf,
}

impl ServerTls {
    /// The one name in the server's certificate.
    pub const HOST_NAME: &str = "db.test";
    /// The role that must log in with a client certificate (its common name).
    pub const CERT_USER: &str = "listen_cert";
    /// The role that must log in over TLS with [`Self::PASSWORD`] (scram-sha-256).
    pub const PASSWORD_USER: &str = "listen_password";
    pub const PASSWORD: &str = "tls-test-password";

    /// The CA that signed the server's and the client's certificates.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A CA that signed nothing the server knows.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }

    /// A client certificate for [`Self::CERT_USER`], signed by [`Self::ca`], and its key.
    pub fn client_cert(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("client.pem"), self.dir.join("client.key"))
    }

    /// A client certificate for [`Self::CERT_USER`] signed by [`Self::other_ca`], and its key.
    pub fn untrusted_client_cert(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("untrusted.pem"),
            self.dir.join("untrusted.key"),
        )
    }

    /// Writes a CA, the server's certificate and key (the key 0600, as PostgreSQL insists),
    /// the client certificates and an unrelated CA into `dir`.
    fn generate(dir: &Path) -> ServerTls {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        std::fs::create_dir_all(dir).unwrap();
        let new_ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let ca = new_ca("test PostgreSQL CA");
        let other = new_ca("unrelated CA");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        write("ca.pem", &ca.pem());
        write("other-ca.pem", &other.pem());
        let issue = |name: &str,
                     subject: &str,
                     sans: &[&str],
                     issuer: &CertifiedIssuer<'static, KeyPair>| {
            let key = KeyPair::generate().unwrap();
            let mut params =
                CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .unwrap();
            params.distinguished_name.push(DnType::CommonName, subject);
            let cert = params.signed_by(&key, issuer).unwrap();
            write(&format!("{name}.pem"), &cert.pem());
            write(&format!("{name}.key"), &key.serialize_pem())
        };
        let server_key = issue("server", Self::HOST_NAME, &[Self::HOST_NAME], &ca);
        issue("client", Self::CERT_USER, &[], &ca);
        issue("untrusted", Self::CERT_USER, &[], &other);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&server_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        ServerTls {
            dir: dir.to_path_buf(),
        }
    }

    /// The server settings that turn TLS on with these files.
    fn settings(&self) -> Vec<String> {
        let file = |name: &str| self.dir.join(name).display().to_string();
        vec![
            "ssl=on".into(),
            format!("ssl_cert_file={}", file("server.pem")),
            format!("ssl_key_file={}", file("server.key")),
            format!("ssl_ca_file={}", file("ca.pem")),
        ]
    }
}

/// A new, empty database on the process-wide server; returns its URL.
pub async fn fresh_database() -> String {
    let server = shared();
    let name = server.new_database().await;
    server.url(&name)
}

impl TestPostgres {
    /// initdb + start on a free port; panics with the reason if it cannot.
    pub fn start() -> TestPostgres {
        TestPostgres::start_with(false, false)
    }

    /// As [`Self::start`], and the server also speaks TLS, with the certificates of
    /// [`Self::tls`].
    pub fn start_tls() -> TestPostgres {
        TestPostgres::start_with(true, false)
    }

    /// As [`Self::start`], with PostgreSQL's default durability: a commit is on disk when it
    /// returns, as listen's SQLite commit is (`synchronous=FULL`). For benchmarks; the tests'
    /// servers turn fsync off for speed, which would compare a durable store with one that
    /// is not.
    pub fn start_durable() -> TestPostgres {
        TestPostgres::start_with(false, true)
    }

    fn start_with(tls: bool, durable: bool) -> TestPostgres {
        let bin = find_bin_dir();
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
            "listen-pg-{}-{}",
            std::process::id(),
            crate::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let tls = tls.then(|| ServerTls::generate(&dir.join("tls")));
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
        if tls.is_some() {
            let hba = data.join("pg_hba.conf");
            std::fs::write(
                &hba,
                format!(
                    "local all all trust\n\
                     hostssl all {cert_user} 127.0.0.1/32 cert\n\
                     hostssl all {password_user} 127.0.0.1/32 scram-sha-256\n\
                     host all all 127.0.0.1/32 trust\n",
                    cert_user = ServerTls::CERT_USER,
                    password_user = ServerTls::PASSWORD_USER,
                ),
            )
            .unwrap();
            if as_postgres {
                run(Command::new("chown").arg("postgres").arg(&hba));
            }
        }
        let mut server = TestPostgres {
            port: crate::free_port(),
            dir,
            bin,
            as_postgres,
            server: None,
            tls,
            durable,
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
        let settings: String = self
            .tls
            .iter()
            .flat_map(ServerTls::settings)
            .map(|setting| format!(" -c {setting}"))
            .collect();
        let fast = if self.durable {
            ""
        } else {
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        };
        let script = format!(
            "{run} {postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 \
             -c max_connections=300{fast}{settings} & \
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

    /// The postmaster's pid (from `postmaster.pid`): the parent of every server process.
    pub fn postmaster(&self) -> u32 {
        let file = self.dir.join("data/postmaster.pid");
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {}", file.display()))
    }

    /// The certificates of a server from [`Self::start_tls`]; panics for a plaintext one.
    pub fn tls(&self) -> &ServerTls {
        self.tls
            .as_ref()
            .expect("a server started with TestPostgres::start_tls")
    }

    /// A new, empty database on this server; returns its name. On a TLS server, the roles
    /// [`ServerTls::CERT_USER`] and [`ServerTls::PASSWORD_USER`] exist too (superusers, so
    /// they may migrate any database).
    pub async fn new_database(&self) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        self.create_database(&name).await;
        name
    }

    pub async fn create_database(&self, name: &str) {
        let (client, task) = self.session().await;
        if self.tls.is_some() {
            // Tests of one process may race to create them.
            for role in [
                format!("{} LOGIN SUPERUSER", ServerTls::CERT_USER),
                format!(
                    "{} LOGIN SUPERUSER PASSWORD '{}'",
                    ServerTls::PASSWORD_USER,
                    ServerTls::PASSWORD
                ),
            ] {
                client
                    .batch_execute(&format!(
                        "DO $$ BEGIN CREATE ROLE {role}; \
                         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
                    ))
                    .await
                    .expect("create the roles of the TLS server");
            }
        }
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = task.await;
    }

    /// A session on the `postgres` database as the superuser, and the task driving its
    /// connection. The port opens before the server accepts sessions ("the database system
    /// is starting up"), so this is what readiness is: it retries for at most 30 s.
    pub async fn session(&self) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
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
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        (client, task)
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
