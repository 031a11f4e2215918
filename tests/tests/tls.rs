//! Mutual TLS between listen and pusher, with certificates generated for the test (rcgen).

use rcgen::{CertificateParams, CertifiedIssuer, DnType, KeyPair};
use std::path::PathBuf;
use std::time::Duration;
use tests::listen::{ConversationStatus, LinkState};
use tests::pki::*;
use tests::*;

#[tokio::test]
async fn listen_with_a_client_certificate_gets_through_mutual_tls() {
    let pki = Pki::new();
    let pusher = mtls_pusher(&pki).await;
    let url = format!("https://localhost:{}", pusher.addr.port());
    let listen = mtls_listen(&pki, &url).await;
    submit_and_complete(&listen, "tls").await;
}

/// One conversation for `uid`, through to COMPLETED.
async fn submit_and_complete(listen: &Service, uid: &str) {
    let client = listen_client(listen);
    let id = client
        .clone()
        .submit_conversation(talk(uid, "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    wait_one(
        &client,
        &id,
        ConversationStatus::Completed,
        Duration::from_secs(20),
    )
    .await;
}

/// Plaintext, no client certificate, or one from another CA: the link never comes up, says
/// why, and the conversation waits safely in PROCESSING.
#[tokio::test]
async fn pusher_refuses_plaintext_and_unknown_clients() {
    let pki = Pki::new();
    let pusher = mtls_pusher(&pki).await;
    let port = pusher.addr.port();
    let https = format!("https://localhost:{port}");
    let http = format!("http://127.0.0.1:{port}");
    let (ca, rogue_cert, rogue_key) = (
        pki.path("ca.pem"),
        pki.path("rogue.pem"),
        pki.path("rogue.key"),
    );
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("plaintext", vec!["--pusher-url", &http]),
        (
            "no client certificate",
            vec!["--pusher-url", &https, "--pusher-tls-ca", &ca],
        ),
        (
            "certificate from another CA",
            vec![
                "--pusher-url",
                &https,
                "--pusher-tls-ca",
                &ca,
                "--pusher-tls-cert",
                &rogue_cert,
                "--pusher-tls-key",
                &rogue_key,
            ],
        ),
    ];
    for (what, flags) in cases {
        let mut extra = flags.clone();
        extra.extend(["--degrade-after", "1000"]);
        let listen = start_listen(ListenOptions {
            pusher_port: 0,
            extra: &extra,
        })
        .await;
        let mut client = listen_client(&listen);
        let id = client
            .submit_conversation(talk("refused", "k"))
            .await
            .unwrap()
            .into_inner()
            .conversation_id;
        let status = wait_for(what, Duration::from_secs(15), || {
            let mut client = client.clone();
            async move {
                let status = link_status(&mut client).await;
                (status.consecutive_failures >= 2).then_some(status)
            }
        })
        .await;
        assert_ne!(status.state, LinkState::Connected as i32, "{what}");
        assert!(!status.last_error.is_empty(), "{what}: the link says why");
        eprintln!("{what}: {}", status.last_error);
        assert_eq!(
            status_of(&mut client, &id).await,
            ConversationStatus::Processing,
            "{what}"
        );
    }
}

#[tokio::test]
async fn tls_flags_that_do_not_fit_exit_64_naming_the_flag() {
    let pki = Pki::new();
    for (args, flag) in [
        (
            vec!["--pusher-url", "https://localhost:1"],
            "--pusher-tls-ca",
        ),
        (
            vec![
                "--pusher-url",
                "http://localhost:1",
                "--pusher-tls-ca",
                "/nonexistent.pem",
            ],
            "--pusher-tls",
        ),
        (
            vec![
                "--pusher-url",
                "https://localhost:1",
                "--pusher-tls-ca",
                "/nonexistent.pem",
            ],
            "--pusher-tls-ca",
        ),
    ] {
        let output = std::process::Command::new(binary("listen-svc"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(flag),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let key = pki.path("server.key");
    let output = std::process::Command::new(binary("pusher-svc"))
        .args(["--tls-key", &key])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--tls-cert"));
}

/// A dns: --pusher-url with --pusher-tls-ca speaks mutual TLS to each resolved address and
/// checks pusher's certificate against the DNS name (here `pusher.test`), not the address.
#[tokio::test]
async fn a_dns_target_checks_pushers_certificate_against_the_name() {
    let pki = Pki::new();
    let flags = pki.pusher_flags_with("headless");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let pusher = start_pusher(
        PusherOptions::port(free_port())
            .args(&flags)
            .tls(pki.harness_client_for("pusher.test")),
    )
    .await;
    let dns = tests::dns::TestDns::start("pusher.test", &["127.0.0.1".parse().unwrap()]).await;
    let listen = mtls_listen(&pki, &dns.url(pusher.addr.port())).await;
    submit_and_complete(&listen, "tls-dns").await;
    let status = link_status(&mut listen_client(&listen)).await;
    assert_eq!(status.endpoints.len(), 1);
    assert_eq!(status.endpoints[0].address, pusher.addr.to_string());
}

// ---- credentials replaced while the services run ----

/// A certificate and key, PEM.
struct Issued {
    cert: String,
    key: String,
}

/// A certificate for `sans` with `serial` (below 0x80: it shows as two hex digits), valid
/// from an hour ago until `not_after`.
fn issue_serial(
    ca: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    serial: u8,
    not_after: time::OffsetDateTime,
) -> Issued {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, sans[0]);
    params.serial_number = Some(rcgen::SerialNumber::from(vec![serial]));
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = not_after;
    let cert = params.signed_by(&key, ca).unwrap();
    Issued {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn in_a_day() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(1)
}

/// A directory laid out as Kubernetes mounts a Secret: `tls.crt` and `tls.key` are symlinks
/// through `..data`, a symlink to a timestamped directory; an update writes a new directory
/// and renames a new `..data` over the old one (one atomic step), then removes the old one.
struct SecretDir {
    root: PathBuf,
    version: u32,
}

impl SecretDir {
    fn new(root: PathBuf, issued: &Issued) -> SecretDir {
        std::fs::create_dir(&root).unwrap();
        let mut dir = SecretDir { root, version: 0 };
        dir.swap(issued);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.root.join(name)).unwrap();
        }
        dir
    }

    fn swap(&mut self, issued: &Issued) {
        self.swap_raw(&issued.cert, &issued.key);
    }

    fn swap_raw(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let name = format!("..2026_01_01_00_00_{:02}.{}", self.version, self.version);
        let dir = self.root.join(&name);
        std::fs::create_dir(&dir).unwrap();
        write(&dir, "tls.crt", cert);
        write(&dir, "tls.key", key);
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.root.join("..data")).unwrap();
        if self.version > 1 {
            let old = format!(
                "..2026_01_01_00_00_{:02}.{}",
                self.version - 1,
                self.version - 1
            );
            std::fs::remove_dir_all(self.root.join(old)).unwrap();
        }
    }

    fn path(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }
}

/// The serial of the certificate a server presents to a new TLS connection (with the harness's
/// client certificate), or why the handshake failed.
async fn served_serial(pki: &Pki, addr: std::net::SocketAddr) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let read = |name: &str| std::fs::read(pki.dir.path().join(name)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read("ca.pem")) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read("client.pem"))
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(&read("client.key")).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = &stream.get_ref().1.peer_certificates().unwrap()[0];
    Ok(shared::tls::CertificateInfo::parse(leaf).unwrap().serial)
}

/// Waits until new handshakes with `server` show the certificate with `serial`.
async fn wait_served(pki: &Pki, server: &Service, serial: &str) {
    wait_for(
        format!("the server to present the certificate with serial {serial}"),
        Duration::from_secs(10),
        || async { (served_serial(pki, server.addr).await.as_deref() == Ok(serial)).then_some(()) },
    )
    .await;
}

/// Waits until `service`'s `query` metric is at least `at_least`.
async fn wait_metric(service: &Service, query: &str, at_least: f64) -> f64 {
    wait_for(
        format!("{query} >= {at_least}"),
        Duration::from_secs(10),
        || async {
            let value = service.metric(query).await;
            (value >= at_least).then_some(value)
        },
    )
    .await
}

const QUICK_RELOAD: [&str; 2] = ["--credentials-reload-interval", "200ms"];

/// A pusher whose server certificate lives in `secret`, reloading every 200 ms.
async fn reloading_pusher(pki: &Pki, secret: &SecretDir) -> Service {
    let (cert, key, ca) = (
        secret.path("tls.crt"),
        secret.path("tls.key"),
        pki.path("ca.pem"),
    );
    let mut flags = vec![
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ];
    flags.extend(QUICK_RELOAD);
    start_pusher(
        PusherOptions::port(free_port())
            .args(&flags)
            .tls(pki.harness_client()),
    )
    .await
}

/// A listen that reaches pusher at `addr` with the client certificate `cert`/`key`,
/// reloading every 200 ms.
async fn reloading_listen(pki: &Pki, addr: std::net::SocketAddr, cert: &str, key: &str) -> Service {
    let url = format!("https://localhost:{}", addr.port());
    let ca = pki.path("ca.pem");
    let mut extra = vec![
        "--pusher-url",
        &url,
        "--pusher-tls-ca",
        &ca,
        "--pusher-tls-cert",
        cert,
        "--pusher-tls-key",
        key,
        "--degrade-after",
        "1000",
    ];
    extra.extend(QUICK_RELOAD);
    start_listen(ListenOptions {
        pusher_port: 0,
        extra: &extra,
    })
    .await
}

/// Submits a conversation every 20 ms until told to stop; returns the ids, and panics on any
/// refused submission.
fn keep_submitting(
    listen: &Service,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let client = listen_client(listen);
    tokio::spawn(async move {
        let mut ids = Vec::new();
        while !*stop.borrow() {
            let id = client
                .clone()
                .submit_conversation(talk("rotating", &format!("k{}", ids.len())))
                .await
                .expect("every submission is accepted")
                .into_inner()
                .conversation_id;
            ids.push(id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ids
    })
}

/// pusher's server certificate is replaced by a Kubernetes-style Secret update and listen's
/// client certificate is rewritten in place, while conversations flow: no conversation
/// fails, the open stream is not cut, new handshakes show the new serials on both sides.
#[tokio::test]
async fn certificates_rotate_while_conversations_flow() {
    let pki = Pki::new();
    let ca = &pki.ca;
    let mut secret = SecretDir::new(
        pki.dir.path().join("pusher-secret"),
        &issue_serial(ca, &["localhost"], 0x21, in_a_day()),
    );
    let pusher = reloading_pusher(&pki, &secret).await;
    assert_eq!(served_serial(&pki, pusher.addr).await.as_deref(), Ok("21"));
    let first = issue_serial(ca, &["listen"], 0x31, in_a_day());
    write(pki.dir.path(), "listen.pem", &first.cert);
    write(pki.dir.path(), "listen.key", &first.key);
    let proxy = tests::proxy::Proxy::start(pusher.addr).await;
    let listen = reloading_listen(
        &pki,
        proxy.addr,
        &pki.path("listen.pem"),
        &pki.path("listen.key"),
    )
    .await;
    let client = listen_client(&listen);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let submitter = keep_submitting(&listen, stopped);
    let before = wait_link(&client, LinkState::Connected, Duration::from_secs(10)).await;
    let link_with =
        |serial: &str| pusher.log_lines_with(&["link established", &format!("serial {serial},")]);
    assert_eq!(link_with("31"), 1, "pusher logs the client certificate");

    // pusher: a Kubernetes Secret update.
    secret.swap(&issue_serial(ca, &["localhost"], 0x22, in_a_day()));
    wait_served(&pki, &pusher, "22").await;
    wait_metric(
        &pusher,
        "pusher_credential_reloads_total{credential=\"tls-cert\"}",
        1.0,
    )
    .await;

    // listen: the certificate, then the key, rewritten in place.
    let second = issue_serial(ca, &["listen"], 0x32, in_a_day());
    write(pki.dir.path(), "listen.pem", &second.cert);
    write(pki.dir.path(), "listen.key", &second.key);
    wait_metric(
        &listen,
        "listen_credential_reloads_total{credential=\"pusher-tls-cert\"}",
        1.0,
    )
    .await;
    let status = link_status(&mut client.clone()).await;
    assert_eq!(
        status.reconnects, before.reconnects,
        "replacing certificates does not cut the open stream"
    );
    assert_eq!(status.state, LinkState::Connected as i32);

    // A new connection (forced here) presents listen's new certificate.
    proxy.set(tests::proxy::Mode::Reset);
    wait_link(
        &client,
        LinkWait::Not(LinkState::Connected),
        Duration::from_secs(10),
    )
    .await;
    proxy.set(tests::proxy::Mode::Pass);
    wait_for(
        "pusher to see listen's new client certificate",
        Duration::from_secs(15),
        || async { (link_with("32") >= 1).then_some(()) },
    )
    .await;

    let _ = stop.send(true);
    let ids = submitter.await.unwrap();
    assert!(ids.len() >= 10, "conversations flowed: {}", ids.len());
    wait_all(
        &client,
        &ids,
        ConversationStatus::Completed,
        Duration::from_secs(60),
    )
    .await;
    for (service, query) in [
        (&pusher, "pusher_credential_reload_failures_total"),
        (&listen, "listen_credential_reload_failures_total"),
    ] {
        assert_eq!(service.metric(query).await, 0.0, "{query}");
    }
    assert!(
        listen
            .metric("listen_certificate_expiry_seconds{credential=\"pusher-tls-cert\"}")
            .await
            > 3600.0
    );
}

/// A replacement that is garbage, then one whose key is not the certificate's: pusher keeps
/// presenting the certificate it had, and reports each once (metric and one log line). A
/// valid replacement then takes over.
#[tokio::test]
async fn a_broken_replacement_keeps_the_old_certificate_and_is_reported_once() {
    let pki = Pki::new();
    let ca = &pki.ca;
    let good = issue_serial(ca, &["localhost"], 0x41, in_a_day());
    let mut secret = SecretDir::new(pki.dir.path().join("pusher-secret"), &good);
    let pusher = reloading_pusher(&pki, &secret).await;
    let failures = "pusher_credential_reload_failures_total{credential=\"tls-cert\"}";
    assert_eq!(
        pusher.metric(failures).await,
        0.0,
        "the series exists at zero"
    );

    secret.swap_raw(
        "-----BEGIN CERTIFICATE-----\nnot base64, no end\n",
        &good.key,
    );
    wait_metric(&pusher, failures, 1.0).await;
    assert_eq!(served_serial(&pki, pusher.addr).await.as_deref(), Ok("41"));

    let other = issue_serial(ca, &["localhost"], 0x42, in_a_day());
    secret.swap_raw(&other.cert, &good.key);
    wait_metric(&pusher, failures, 2.0).await;
    assert_eq!(served_serial(&pki, pusher.addr).await.as_deref(), Ok("41"));

    // The bad contents stay for several more polls (200 ms apart): no new report. This waits
    // for something not to happen, so it can only be a fixed time.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pusher.metric(failures).await, 2.0);
    let refused = |what: &str| pusher.log_lines_with(&["credential files refused", what]);
    assert_eq!(
        refused("not valid PEM: no \"-----END CERTIFICATE-----\" line"),
        1,
        "{}",
        pusher.log_text()
    );
    assert_eq!(refused("is not the key of the certificate"), 1);

    secret.swap(&issue_serial(ca, &["localhost"], 0x43, in_a_day()));
    wait_served(&pki, &pusher, "43").await;
    assert_eq!(
        pusher
            .metric("pusher_credential_reloads_total{credential=\"tls-cert\"}")
            .await,
        1.0
    );
}

/// pusher's certificate expires while it runs: new link connections fail with a message
/// naming the expiry, conversations wait, and the link recovers by itself once a valid
/// certificate is written.
#[tokio::test]
async fn an_expired_certificate_fails_the_link_naming_the_expiry_until_a_valid_one_is_written() {
    let pki = Pki::new();
    let ca = &pki.ca;
    let mut secret = SecretDir::new(
        pki.dir.path().join("pusher-secret"),
        &issue_serial(ca, &["localhost"], 0x51, in_a_day()),
    );
    let pusher = reloading_pusher(&pki, &secret).await;
    let proxy = tests::proxy::Proxy::start(pusher.addr).await;
    let listen = reloading_listen(
        &pki,
        proxy.addr,
        &pki.path("client.pem"),
        &pki.path("client.key"),
    )
    .await;
    submit_and_complete(&listen, "before").await;

    // A short-lived certificate, valid when it is loaded.
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    secret.swap(&issue_serial(ca, &["localhost"], 0x52, expires));
    wait_served(&pki, &pusher, "52").await;
    let expiry = "pusher_certificate_expiry_seconds{credential=\"tls-cert\"}";
    wait_for(
        "pusher's certificate to expire",
        Duration::from_secs(10),
        || async { (pusher.metric(expiry).await < 0.0).then_some(()) },
    )
    .await;
    assert_eq!(
        pusher.log_lines_with(&["the certificate in use has expired"]),
        1
    );
    // Certificates state times in whole seconds, and a certificate is valid through its
    // notAfter second.
    wait_for(
        "the clock to pass the certificate's notAfter second",
        Duration::from_secs(10),
        || async {
            (time::OffsetDateTime::now_utc() > expires + time::Duration::seconds(1)).then_some(())
        },
    )
    .await;

    // The open stream is not cut; a new connection is refused by listen's check.
    let mut client = listen_client(&listen);
    proxy.set(tests::proxy::Mode::Reset);
    wait_link(
        &client,
        LinkWait::Not(LinkState::Connected),
        Duration::from_secs(10),
    )
    .await;
    proxy.set(tests::proxy::Mode::Pass);
    let status = wait_for(
        "the link to say why it cannot connect",
        Duration::from_secs(15),
        || {
            let mut client = client.clone();
            async move {
                let status = link_status(&mut client).await;
                status.last_error.contains("expired").then_some(status)
            }
        },
    )
    .await;
    eprintln!("expired: {}", status.last_error);
    assert!(
        status.last_error.contains("certificate expired"),
        "{}",
        status.last_error
    );
    let id = client
        .submit_conversation(talk("during", "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    assert_eq!(
        status_of(&mut client, &id).await,
        ConversationStatus::Processing
    );

    secret.swap(&issue_serial(ca, &["localhost"], 0x53, in_a_day()));
    wait_one(
        &client,
        &id,
        ConversationStatus::Completed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(served_serial(&pki, pusher.addr).await.as_deref(), Ok("53"));
}

/// listen's own TLS port: a Secret-style update of its certificate is served to new
/// connections while the harness's connection keeps working.
#[tokio::test]
async fn listens_own_certificate_is_replaced_without_a_restart() {
    let pki = Pki::new();
    let ca = &pki.ca;
    let mut secret = SecretDir::new(
        pki.dir.path().join("listen-secret"),
        &issue_serial(ca, &["localhost"], 0x61, in_a_day()),
    );
    let (cert, key) = (secret.path("tls.crt"), secret.path("tls.key"));
    let mut extra = vec!["--tls-cert", &cert, "--tls-key", &key];
    extra.extend(QUICK_RELOAD);
    let listen = start_listen_tls(
        ListenOptions {
            pusher_port: free_port(),
            extra: &extra,
        },
        pki.harness_client(),
    )
    .await;
    assert_eq!(served_serial(&pki, listen.addr).await.as_deref(), Ok("61"));
    let mut client = listen_client(&listen);
    link_status(&mut client).await;
    secret.swap(&issue_serial(ca, &["localhost"], 0x62, in_a_day()));
    wait_served(&pki, &listen, "62").await;
    link_status(&mut client).await;
    assert_eq!(
        listen
            .metric("listen_credential_reloads_total{credential=\"tls-cert\"}")
            .await,
        1.0
    );
}
