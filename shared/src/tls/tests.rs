use super::*;
use crate::reload::Outcome;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A certificate for localhost with `serial`, valid until `not_after`: (cert PEM, key PEM).
    fn issue(&self, serial: u64, not_after: time::OffsetDateTime) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.serial_number = Some(serial.into());
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.0).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn in_a_day() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(1)
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).unwrap();
    }

    fn write_pair(&self, name: &str, (cert, key): &(String, String)) {
        self.write(&format!("{name}.pem"), cert);
        self.write(&format!("{name}.key"), key);
    }
}

const FLAGS: [&str; 3] = ["--tls-cert", "--tls-key", "--tls-client-ca"];

fn server(files: &Files) -> Arc<ServerTls> {
    ServerTls::load(
        Some(&files.path("server.pem")),
        Some(&files.path("server.key")),
        Some(&files.path("ca.pem")),
        FLAGS,
    )
    .unwrap()
    .unwrap()
}

fn serial_of(der: &[u8]) -> String {
    CertificateInfo::parse(der).unwrap().serial
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused_and_the_old_pair_stays() {
    let files = Files::new();
    let ca = Ca::new("ca");
    files.write("ca.pem", &ca.0.pem());
    files.write_pair("server", &ca.issue(1, in_a_day()));
    let tls = server(&files);
    let first = tls.cert.current();

    let (_, other_key) = ca.issue(2, in_a_day());
    files.write("server.key", &other_key);
    assert_eq!(tls.cert.poll(SystemTime::now()), Outcome::Unsettled);
    let Outcome::Refused { reason } = tls.cert.poll(SystemTime::now()) else {
        panic!("a mismatched key is refused");
    };
    assert!(
        reason.contains("--tls-key") && reason.contains("is not the key of the certificate"),
        "{reason}"
    );
    assert!(Arc::ptr_eq(&first, &tls.cert.current()));

    files.write("server.pem", "garbage");
    assert_eq!(tls.cert.poll(SystemTime::now()), Outcome::Unsettled);
    let Outcome::Refused { reason } = tls.cert.poll(SystemTime::now()) else {
        panic!("garbage is refused");
    };
    assert!(reason.contains("--tls-cert"), "{reason}");
}

/// A writer that replaces the certificate, then the key (not atomically), is caught in
/// between by a poll: nothing is reported, and the next poll takes the new pair.
#[test]
fn a_certificate_and_key_replaced_one_after_the_other_are_not_reported() {
    let files = Files::new();
    let ca = Ca::new("ca");
    files.write("ca.pem", &ca.0.pem());
    files.write_pair("server", &ca.issue(1, in_a_day()));
    let tls = server(&files);
    let (cert, key) = ca.issue(2, in_a_day());
    files.write("server.pem", &cert);
    assert_eq!(tls.cert.poll(SystemTime::now()), Outcome::Unsettled);
    files.write("server.key", &key);
    let outcome = tls.cert.poll(SystemTime::now());
    assert!(matches!(outcome, Outcome::Reloaded { .. }), "{outcome:?}");
    assert_eq!(serial_of(&tls.cert.current().cert[0]), "02");
}

#[test]
fn an_expired_certificate_is_accepted_at_start_but_refused_as_a_replacement() {
    let files = Files::new();
    let ca = Ca::new("ca");
    files.write("ca.pem", &ca.0.pem());
    let yesterday = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    files.write_pair("server", &ca.issue(1, yesterday));
    let tls = server(&files);
    files.write_pair("server", &ca.issue(2, yesterday));
    assert_eq!(tls.cert.poll(SystemTime::now()), Outcome::Unsettled);
    let Outcome::Refused { reason } = tls.cert.poll(SystemTime::now()) else {
        panic!("an expired replacement is refused");
    };
    assert!(reason.contains("the certificate expired at"), "{reason}");
    files.write_pair("server", &ca.issue(3, in_a_day()));
    assert!(matches!(
        tls.cert.poll(SystemTime::now()),
        Outcome::Reloaded { .. }
    ));
}

#[test]
fn flags_that_do_not_fit_are_named() {
    let files = Files::new();
    let error = ServerTls::load(None, Some(&files.path("k")), None, FLAGS)
        .err()
        .unwrap();
    assert!(
        error.contains("--tls-cert and --tls-key go together"),
        "{error}"
    );
    let error = ServerTls::load(None, None, Some(&files.path("ca")), FLAGS)
        .err()
        .unwrap();
    assert!(error.contains("--tls-client-ca needs"), "{error}");
    files.write("ca.pem", "not a certificate");
    let error = ClientTls::load(&files.path("ca.pem"), None, None, None, FLAGS)
        .err()
        .unwrap();
    assert!(
        error.starts_with(&format!("--tls-cert {}: ", files.path("ca.pem").display())),
        "{error}"
    );
}

/// A real server and client over loopback: after the server's certificate and the client's
/// certificate are replaced, a new connection shows both new serials, and the connection
/// opened before keeps working with the old ones.
#[tokio::test]
async fn new_handshakes_use_replaced_credentials_and_open_connections_keep_theirs() {
    let files = Files::new();
    let ca = Ca::new("ca");
    files.write("ca.pem", &ca.0.pem());
    files.write_pair("server", &ca.issue(1, in_a_day()));
    files.write_pair("client", &ca.issue(11, in_a_day()));
    let server = server(&files);
    let client = ClientTls::load(
        &files.path("ca.pem"),
        Some(&files.path("client.pem")),
        Some(&files.path("client.key")),
        Some("localhost"),
        ["--ca", "--cert", "--key"],
    )
    .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = server.incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    // Echoes, after a first line naming the client certificate's serial.
    tokio::spawn(async move {
        while let Some(Ok(mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                let peer = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
                let line = format!("{}\n", serial_of(&peer));
                stream.write_all(line.as_bytes()).await.unwrap();
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let uri: Uri = format!("http://{addr}").parse().unwrap();
    let connect = |client: &Arc<ClientTls>| {
        let mut connector = client.connector();
        let uri = uri.clone();
        async move {
            use tonic::codegen::Service;
            let mut stream = connector.call(uri).await.unwrap().into_inner();
            let server_serial = serial_of(&stream.get_ref().1.peer_certificates().unwrap()[0]);
            assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let mut line = [0u8; 3];
            stream.read_exact(&mut line).await.unwrap();
            let client_serial = String::from_utf8_lossy(&line[..2]).to_string();
            (stream, server_serial, client_serial)
        }
    };

    let (mut old, server_serial, client_serial) = connect(&client).await;
    assert_eq!(
        (server_serial.as_str(), client_serial.as_str()),
        ("01", "0b")
    );

    files.write_pair("server", &ca.issue(2, in_a_day()));
    files.write_pair("client", &ca.issue(12, in_a_day()));
    assert!(matches!(
        server.cert.poll(SystemTime::now()),
        Outcome::Reloaded { .. }
    ));
    assert!(matches!(
        client.cert.as_ref().unwrap().poll(SystemTime::now()),
        Outcome::Reloaded { .. }
    ));
    let (_new, server_serial, client_serial) = connect(&client).await;
    assert_eq!(
        (server_serial.as_str(), client_serial.as_str()),
        ("02", "0c")
    );

    old.write_all(b"still here").await.unwrap();
    let mut echo = [0u8; 10];
    old.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"still here");
}
