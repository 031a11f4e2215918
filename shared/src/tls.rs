//! TLS from PEM files named on the command line, read again while the process runs (see
//! [`crate::reload`]): a server's certificate, key and client CA ([`ServerTls`]), a client's
//! CA, certificate and key ([`ClientTls`]). rustls with ring. Errors name the flag.
//!
//! Each new handshake takes the credentials in use at that moment; established connections
//! keep theirs. The rustls configs are rebuilt when a file set is replaced (a generation
//! check per handshake), so nothing else needs to know about reloads.

use crate::reload::{Contents, Loaded, Reloadable, Reloader};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::Uri;

/// Handshakes in progress at once on one server; further accepted connections wait in the
/// listen backlog until one finishes.
const MAX_HANDSHAKES: usize = 256;
/// A client has this long to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections that completed their handshake and wait for the server to take them.
const READY_CONNECTIONS: usize = 64;
const ALPN_H2: &[u8] = b"h2";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's certificate and key, and the CA its clients' certificates must chain to
/// (mutual TLS) when given.
pub struct ServerTls {
    cert: Arc<Reloadable<CertifiedKey>>,
    client_ca: Option<Arc<Reloadable<Arc<dyn ClientCertVerifier>>>>,
    /// The config, built from `cert` and `client_ca`.
    built: Built<ServerConfig>,
}

impl ServerTls {
    /// Loads `cert` + `key`, and `client_ca` when given; None when no certificate is
    /// configured. `flags` name the three in errors: cert, key, client CA.
    pub fn load(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
        flags: [&'static str; 3],
    ) -> Result<Option<Arc<ServerTls>>, String> {
        let (cert, key) = match (cert, key) {
            (None, None) if client_ca.is_none() => return Ok(None),
            (None, None) => {
                return Err(format!("{} needs {} and {}", flags[2], flags[0], flags[1]));
            }
            (Some(cert), Some(key)) => (cert, key),
            _ => return Err(format!("{} and {} go together", flags[0], flags[1])),
        };
        let cert = Reloadable::load(
            vec![
                (flags[0], cert.to_path_buf()),
                (flags[1], key.to_path_buf()),
            ],
            certified_key,
        )?;
        let client_ca = client_ca
            .map(|ca| Reloadable::load(vec![(flags[2], ca.to_path_buf())], client_verifier))
            .transpose()?;
        let built = Built::new(generations(&cert, client_ca.as_ref()), || {
            build_server(&cert, client_ca.as_ref())
        });
        Ok(Some(Arc::new(ServerTls {
            cert,
            client_ca,
            built,
        })))
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    /// Registers the files with `reloader`.
    pub fn watch(&self, reloader: &mut Reloader) {
        reloader.watch(&self.cert);
        if let Some(ca) = &self.client_ca {
            reloader.watch(ca);
        }
    }

    /// The config for a new handshake: the credentials in use now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.built
            .current(generations(&self.cert, self.client_ca.as_ref()), || {
                build_server(&self.cert, self.client_ca.as_ref())
            })
    }

    /// TLS connections accepted from `tcp`, for `Router::serve_with_incoming`. Each
    /// handshake runs in its own task (at most [`MAX_HANDSHAKES`] at once, each within
    /// [`HANDSHAKE_TIMEOUT`]), so a slow or silent client never holds up the others. A failed
    /// handshake is logged at debug level and dropped. Accept errors are passed on for the
    /// server to judge. Dropping the stream stops accepting.
    pub fn incoming<S>(
        self: &Arc<Self>,
        tcp: S,
    ) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>>
    where
        S: tokio_stream::Stream<Item = std::io::Result<TcpStream>> + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel(READY_CONNECTIONS);
        tokio::spawn(accept(Arc::clone(self), tcp, tx));
        ReceiverStream::new(rx)
    }
}

type Ready = mpsc::Sender<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>>;

async fn accept<S>(tls: Arc<ServerTls>, mut tcp: S, ready: Ready)
where
    S: tokio_stream::Stream<Item = std::io::Result<TcpStream>> + Unpin,
{
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => permit.expect("the semaphore is never closed"),
            () = ready.closed() => return,
        };
        let accepted = tokio::select! {
            accepted = tcp.next() => accepted,
            () = ready.closed() => return,
        };
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                if ready.send(Err(error)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
        let ready = ready.clone();
        tokio::spawn(async move {
            let peer = stream.peer_addr().ok();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    drop(permit);
                    // A closed receiver means the server is shutting down: drop the connection.
                    let _ = ready.send(Ok(stream)).await;
                }
                Ok(Err(error)) => tracing::debug!(?peer, %error, "TLS handshake failed"),
                Err(_) => {
                    tracing::debug!(?peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out")
                }
            }
        });
    }
}

fn build_server(
    cert: &Reloadable<CertifiedKey>,
    client_ca: Option<&Arc<Reloadable<Arc<dyn ClientCertVerifier>>>>,
) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(Arc::clone(&ca.current())),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(cert.current())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// A client's trust (the CA the server's certificate must chain to) and, for mutual TLS, its
/// own certificate and key.
pub struct ClientTls {
    ca: Arc<Reloadable<Arc<WebPkiServerVerifier>>>,
    cert: Option<Arc<Reloadable<CertifiedKey>>>,
    /// The name the server's certificate must carry; the URI's host when None.
    domain: Option<String>,
    /// The config, built from `ca` and `cert`.
    built: Built<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca.describe())
            .field("cert", &self.cert.as_ref().map(|c| c.describe()))
            .field("domain", &self.domain)
            .finish()
    }
}

impl ClientTls {
    /// Loads `ca`, and `cert` + `key` when given. `flags` name the three in errors: CA,
    /// cert, key.
    pub fn load(
        ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
        domain: Option<&str>,
        flags: [&'static str; 3],
    ) -> Result<Arc<ClientTls>, String> {
        let ca = Reloadable::load(vec![(flags[0], ca.to_path_buf())], server_verifier)?;
        let cert = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(Reloadable::load(
                vec![
                    (flags[1], cert.to_path_buf()),
                    (flags[2], key.to_path_buf()),
                ],
                certified_key,
            )?),
            _ => return Err(format!("{} and {} go together", flags[1], flags[2])),
        };
        let built = Built::new(generations(&ca, cert.as_ref()), || {
            build_client(&ca, cert.as_ref())
        });
        Ok(Arc::new(ClientTls {
            ca,
            cert,
            domain: domain.map(String::from),
            built,
        }))
    }

    /// Registers the files with `reloader`.
    pub fn watch(&self, reloader: &mut Reloader) {
        reloader.watch(&self.ca);
        if let Some(cert) = &self.cert {
            reloader.watch(cert);
        }
    }

    /// The config for a new connection: the credentials in use now.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.built
            .current(generations(&self.ca, self.cert.as_ref()), || {
                build_client(&self.ca, self.cert.as_ref())
            })
    }

    /// A connector for `Endpoint::connect_with_connector`: TCP to the URI's host and port,
    /// then TLS with the credentials in use at that moment. Give the endpoint an `http://`
    /// URI (tonic refuses `https://` with a connector of its own; the TLS is done here).
    pub fn connector(self: &Arc<Self>) -> Connector {
        Connector {
            tls: Arc::clone(self),
        }
    }
}

fn build_client(
    ca: &Reloadable<Arc<WebPkiServerVerifier>>,
    cert: Option<&Arc<Reloadable<CertifiedKey>>>,
) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_webpki_verifier(Arc::clone(&ca.current()));
    let mut config = match cert {
        Some(cert) => {
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert.current())))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Every connection verifies the server's certificate in full: a resumed session would
    // skip that, and could keep connecting to a server whose certificate has expired since.
    // Connections are few (one per pusher endpoint), so resumption saves nothing worth it.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// See [`ClientTls::connector`].
#[derive(Clone)]
pub struct Connector {
    tls: Arc<ClientTls>,
}

type Connected = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tonic::codegen::Service<Uri> for Connector {
    type Response = Connected;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = std::io::Result<Connected>> + Send + 'static>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = Arc::clone(&self.tls);
        Box::pin(async move {
            let invalid =
                |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri} has no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = tls.domain.clone().unwrap_or(host);
            let name =
                ServerName::try_from(name).map_err(|e| invalid(format!("TLS server name: {e}")))?;
            let connector = tokio_rustls::TlsConnector::from(tls.config());
            let stream = connector.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// Parses a certificate chain and its private key, checking that they belong together.
fn certified_key(files: &Contents) -> Result<Loaded<CertifiedKey>, String> {
    let chain = certificates(files, 0)?;
    let key = PrivateKeyDer::from_pem_slice(files.bytes(1))
        .map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => format!(
                "{}: no private key in it (expected PEM \"-----BEGIN PRIVATE KEY-----\" or an RSA or EC key)",
                files.name(1)
            ),
            e => format!("{}: {}", files.name(1), pem_problem(&e)),
        })?;
    let key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: {e}", files.name(1)))?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(format!(
                "{} is not the key of the certificate in {}",
                files.name(1),
                files.name(0)
            ));
        }
        Err(e) => return Err(format!("{}: {e}", files.name(0))),
    }
    let leaf = CertificateInfo::parse(&certified.cert[0])
        .map_err(|e| format!("{}: {e}", files.name(0)))?;
    Ok(Loaded {
        value: certified,
        not_after: Some(leaf.not_after),
        summary: leaf.to_string(),
    })
}

/// The certificates in file `i`: at least one, each a well-formed X.509 certificate.
fn certificates(files: &Contents, i: usize) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(files.bytes(i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {}", files.name(i), pem_problem(&e)))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected PEM \"-----BEGIN CERTIFICATE-----\")",
            files.name(i)
        ));
    }
    Ok(chain)
}

/// What is wrong with a PEM file, in words (the library shows the marker as bytes).
fn pem_problem(error: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match error {
        Error::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: no \"-----END {}-----\" line",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => format!(
            "not valid PEM: malformed line {:?}",
            String::from_utf8_lossy(line)
        ),
        other => format!("not valid PEM: {other}"),
    }
}

/// A CA bundle, with the earliest expiry among its certificates.
fn roots(files: &Contents) -> Result<Loaded<Arc<RootCertStore>>, String> {
    let certs = certificates(files, 0)?;
    let mut roots = RootCertStore::empty();
    let mut earliest: Option<CertificateInfo> = None;
    for cert in &certs {
        let parsed = CertificateInfo::parse(cert).map_err(|e| format!("{}: {e}", files.name(0)))?;
        roots
            .add(cert.clone())
            .map_err(|e| format!("{}: {e}", files.name(0)))?;
        if earliest
            .as_ref()
            .is_none_or(|e| parsed.not_after < e.not_after)
        {
            earliest = Some(parsed);
        }
    }
    let earliest = earliest.expect("at least one certificate");
    Ok(Loaded {
        value: Arc::new(roots),
        not_after: Some(earliest.not_after),
        summary: format!(
            "{} CA certificate(s); first to expire: {earliest}",
            certs.len()
        ),
    })
}

fn client_verifier(files: &Contents) -> Result<Loaded<Arc<dyn ClientCertVerifier>>, String> {
    let roots = roots(files)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.value, provider())
        .build()
        .map_err(|e| format!("{}: {e}", files.name(0)))?;
    Ok(Loaded {
        value: verifier,
        not_after: roots.not_after,
        summary: roots.summary,
    })
}

fn server_verifier(files: &Contents) -> Result<Loaded<Arc<WebPkiServerVerifier>>, String> {
    let roots = roots(files)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.value, provider())
        .build()
        .map_err(|e| format!("{}: {e}", files.name(0)))?;
    Ok(Loaded {
        value: verifier,
        not_after: roots.not_after,
        summary: roots.summary,
    })
}

/// What the logs say about a certificate: subject, serial and end of validity.
pub struct CertificateInfo {
    pub subject: String,
    /// Hex, colon-separated.
    pub serial: String,
    pub not_after: SystemTime,
}

impl CertificateInfo {
    /// Parses a DER certificate.
    pub fn parse(der: &[u8]) -> Result<CertificateInfo, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let not_after = cert.validity().not_after.timestamp();
        let not_after = match u64::try_from(not_after) {
            Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            Err(_) => SystemTime::UNIX_EPOCH,
        };
        Ok(CertificateInfo {
            subject: cert.subject().to_string(),
            serial: cert.raw_serial_as_string(),
            not_after,
        })
    }
}

impl std::fmt::Display for CertificateInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "subject {:?}, serial {}, not after {}",
            self.subject,
            self.serial,
            humantime::format_rfc3339_seconds(self.not_after)
        )
    }
}

/// The file-set generations a config was built from: the first set's, and the optional
/// second's (0 when absent).
fn generations<A: Send + Sync + 'static, B: Send + Sync + 'static>(
    first: &Reloadable<A>,
    second: Option<&Arc<Reloadable<B>>>,
) -> (u64, u64) {
    (first.generation(), second.map_or(0, |s| s.generation()))
}

/// A rustls config and the generations of the file sets it was built from; rebuilt when
/// either set has been replaced since.
struct Built<C>(Mutex<((u64, u64), Arc<C>)>);

impl<C> Built<C> {
    fn new(generations: (u64, u64), build: impl FnOnce() -> Arc<C>) -> Self {
        Built(Mutex::new((generations, build())))
    }

    /// The config for `generations`, rebuilt with `build` if it was built from others.
    fn current(&self, generations: (u64, u64), build: impl FnOnce() -> Arc<C>) -> Arc<C> {
        let mut built = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if built.0 != generations {
            *built = (generations, build());
        }
        Arc::clone(&built.1)
    }
}

#[cfg(test)]
mod tests;
