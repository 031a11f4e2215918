//! A throwaway PKI for TLS tests (rcgen): a CA, pusher's server certificates, listen's client
//! certificate and one from an unrelated CA, and the flags that start each service with them.

use crate::options::{ListenOptions, PusherOptions, start_listen, start_pusher};
use crate::processes::{Service, free_port};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

pub struct Pki {
    pub dir: tempfile::TempDir,
    /// The CA that signed everything but the rogue certificate, to issue more.
    pub ca: CertifiedIssuer<'static, KeyPair>,
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

impl Pki {
    /// A CA, pusher's server certificate (localhost, 127.0.0.1), a client certificate it
    /// signed, and a client certificate from an unrelated CA.
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("test CA");
        let rogue = new_ca("rogue CA");
        write(dir.path(), "ca.pem", &ca.pem());
        issue(dir.path(), "server", &["localhost", "127.0.0.1"], &ca);
        // For a pusher reached through `dns://.../pusher.test:PORT` (a headless Service).
        issue(dir.path(), "headless", &["pusher.test"], &ca);
        issue(dir.path(), "client", &["listen"], &ca);
        issue(dir.path(), "rogue", &["listen"], &rogue);
        Pki { dir, ca }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// What the harness uses to check pusher's health.
    pub fn harness_client(&self) -> ClientTlsConfig {
        self.harness_client_for("localhost")
    }

    pub fn harness_client_for(&self, domain: &str) -> ClientTlsConfig {
        let read = |name: &str| std::fs::read(self.dir.path().join(name)).unwrap();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")))
            .identity(Identity::from_pem(read("client.pem"), read("client.key")))
            .domain_name(domain)
    }

    pub fn pusher_flags(&self) -> Vec<String> {
        self.pusher_flags_with("server")
    }

    /// pusher's flags with the server certificate `name`.pem.
    pub fn pusher_flags_with(&self, name: &str) -> Vec<String> {
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

pub fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

pub fn issue(dir: &Path, name: &str, sans: &[&str], ca: &CertifiedIssuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, sans[0]);
    let cert = params.signed_by(&key, ca).unwrap();
    write(dir, &format!("{name}.pem"), &cert.pem());
    write(dir, &format!("{name}.key"), &key.serialize_pem());
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

pub async fn mtls_pusher(pki: &Pki) -> Service {
    let flags = pki.pusher_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    start_pusher(
        PusherOptions::port(free_port())
            .args(&flags)
            .tls(pki.harness_client()),
    )
    .await
}

/// listen with the client certificate, towards `url`.
pub async fn mtls_listen(pki: &Pki, url: &str) -> Service {
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
