//! Mutual TLS between listen and pusher, with certificates generated for the test (rcgen).

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tests::listen::{ConversationStatus, LinkState};
use tests::*;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, pusher's server certificate (localhost, 127.0.0.1), a client certificate it
    /// signed, and a client certificate from an unrelated CA.
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("test CA");
        let rogue = new_ca("rogue CA");
        write(dir.path(), "ca.pem", &ca.pem());
        issue(dir.path(), "server", &["localhost", "127.0.0.1"], &ca);
        // For a pusher reached through `dns://.../pusher.test:PORT` (a headless Service).
        issue(dir.path(), "headless", &["pusher.test"], &ca);
        issue(dir.path(), "client", &["listen"], &ca);
        issue(dir.path(), "rogue", &["listen"], &rogue);
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// What the harness uses to check pusher's health.
    fn harness_client(&self) -> ClientTlsConfig {
        self.harness_client_for("localhost")
    }

    fn harness_client_for(&self, domain: &str) -> ClientTlsConfig {
        let read = |name: &str| std::fs::read(self.dir.path().join(name)).unwrap();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")))
            .identity(Identity::from_pem(read("client.pem"), read("client.key")))
            .domain_name(domain)
    }

    fn pusher_flags(&self) -> Vec<String> {
        self.pusher_flags_with("server")
    }

    /// pusher's flags with the server certificate `name`.pem.
    fn pusher_flags_with(&self, name: &str) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path(&format!("{name}.pem")),
            "--tls-key".into(),
            self.path(&format!("{name}.key")),
            "--tls-client-ca".into(),
            self.path("ca.pem"),
        ]
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn issue(dir: &Path, name: &str, sans: &[&str], ca: &CertifiedIssuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, sans[0]);
    let cert = params.signed_by(&key, ca).unwrap();
    write(dir, &format!("{name}.pem"), &cert.pem());
    write(dir, &format!("{name}.key"), &key.serialize_pem());
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

async fn mtls_pusher(pki: &Pki) -> Service {
    let flags = pki.pusher_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    start_pusher(
        PusherOptions::port(free_port())
            .args(&flags)
            .tls(pki.harness_client()),
    )
    .await
}

#[tokio::test]
async fn listen_with_a_client_certificate_gets_through_mutual_tls() {
    let pki = Pki::new();
    let pusher = mtls_pusher(&pki).await;
    let url = format!("https://localhost:{}", pusher.addr.port());
    let listen = mtls_listen(&pki, &url).await;
    submit_and_complete(&listen, "tls").await;
}

/// listen with the client certificate, towards `url`.
async fn mtls_listen(pki: &Pki, url: &str) -> Service {
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    start_listen(ListenOptions {
        pusher_port: 0,
        extra: &[
            "--pusher-url",
            url,
            "--pusher-tls-ca",
            &ca,
            "--pusher-tls-cert",
            &cert,
            "--pusher-tls-key",
            &key,
        ],
    })
    .await
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
