//! Connections to PostgreSQL, over TLS (rustls with ring, as for gRPC) as the URL's `sslmode`
//! says, with libpq's meanings (the "SSL Mode Descriptions" table of libpq's documentation):
//!
//! | sslmode | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | if the server accepts it; else, or if the handshake fails, plaintext | not checked; with `sslrootcert`, its chain is |
//! | `require` | always | not checked; with `sslrootcert`, its chain is (as `verify-ca`) |
//! | `verify-ca` | always | signed by a CA in `sslrootcert` |
//! | `verify-full` | always | signed by a CA in `sslrootcert`, and issued for the host name |
//!
//! `sslcert` + `sslkey` present a client certificate in any mode that uses TLS. Unlike libpq,
//! listen reads no file it was not given (no `~/.postgresql/root.crt`), and a file it was given
//! must exist in every mode that uses TLS (libpq ignores a missing `sslrootcert` under
//! `require`, which would turn the check off because of a typo).

use super::url::{SslMode, SslParams, Verify, split_ssl_params};
use deadpool_postgres::{PoolError, TimeoutType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, RootCertStore};
use std::error::Error as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_postgres::config::Host;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::warn;

/// Where and how to connect: the URL without its TLS parameters, and the TLS to use.
pub(crate) struct Endpoint {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) connector: Connector,
}

impl Endpoint {
    /// Reads a `postgres://` URL and the certificate files it names. The error says what is
    /// wrong, naming the URL parameter; it never holds the password.
    pub(crate) fn from_url(url: &str) -> Result<Endpoint, String> {
        let (url, ssl) = split_ssl_params(url)?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("invalid PostgreSQL URL: {}", chain(&e)))?;
        config.ssl_mode(match ssl.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            // Verification is the rustls verifier's part; tokio-postgres only insists on TLS.
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        let tls = match ssl.verify() {
            None => None,
            Some(verify) => Some(MakeRustlsConnect::new(client_config(&ssl, verify)?)),
        };
        let servers = servers(&config);
        Ok(Endpoint {
            config,
            connector: Connector(Arc::new(Inner { ssl, tls, servers })),
        })
    }
}

/// Opens the pool's connections (TLS as configured, and libpq's fallback to plaintext under
/// `prefer`), and puts connection failures into words. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Connector(Arc<Inner>);

struct Inner {
    ssl: SslParams,
    /// None under `sslmode=disable`.
    tls: Option<MakeRustlsConnect>,
    /// `HOST:PORT`, for messages.
    servers: String,
}

type Connected = (tokio_postgres::Client, JoinHandle<()>);
type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Connected, tokio_postgres::Error>> + Send + 'a>>;

impl deadpool_postgres::Connect for Connector {
    fn connect(&self, config: &tokio_postgres::Config) -> ConnectFuture<'_> {
        let config = config.clone();
        Box::pin(async move {
            let Some(tls) = self.0.tls.clone() else {
                let (client, connection) = config.connect(NoTls).await?;
                return Ok((client, drive(connection)));
            };
            match config.connect(tls).await {
                Ok((client, connection)) => Ok((client, drive(connection))),
                // libpq: "prefer: first try an SSL connection; if that fails, try a non-SSL
                // connection". (A server that refuses TLS is already plaintext here.)
                Err(error) if self.0.ssl.mode == SslMode::Prefer && is_handshake_error(&error) => {
                    warn!(
                        servers = %self.0.servers,
                        reason = %self.explain_connect(&error),
                        "TLS handshake with PostgreSQL failed; sslmode=prefer connects without TLS"
                    );
                    let mut plain = config;
                    plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
                    let (client, connection) = plain.connect(NoTls).await?;
                    Ok((client, drive(connection)))
                }
                Err(error) => Err(error),
            }
        })
    }
}

/// Runs a connection until it ends (the pool drops the client, or the server goes away).
fn drive<T>(connection: T) -> JoinHandle<()>
where
    T: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            warn!(%error, "PostgreSQL connection ended");
        }
    })
}

impl Connector {
    /// Why the pool has no connection, in words: the server refusing TLS, the certificate
    /// check that failed and why, the server's own message, or a timeout.
    pub(crate) fn explain(&self, error: &PoolError) -> String {
        match error {
            PoolError::Backend(error) => self.explain_connect(error),
            PoolError::Timeout(TimeoutType::Create) => format!(
                "no connection to the PostgreSQL server at {} in time",
                self.0.servers
            ),
            other => other.to_string(),
        }
    }

    fn explain_connect(&self, error: &tokio_postgres::Error) -> String {
        if let Some(db) = error.as_db_error() {
            // The server's refusal (pg_hba.conf, authentication, a missing database).
            return format!("{}: {}", db.code().code(), db.message());
        }
        let Inner { ssl, servers, .. } = &*self.0;
        if is_handshake_error(error)
            && error.source().map(ToString::to_string).as_deref()
                == Some("server does not support TLS")
        {
            return format!(
                "the PostgreSQL server at {servers} does not accept TLS, and sslmode={} needs it",
                ssl.mode.as_str()
            );
        }
        match find_rustls_error(error) {
            Some(tls) => format!(
                "TLS with the PostgreSQL server at {servers}: {}",
                self.explain_tls(tls)
            ),
            None => format!("PostgreSQL server at {servers}: {}", chain(error)),
        }
    }

    fn explain_tls(&self, error: &rustls::Error) -> String {
        let ssl = &self.0.ssl;
        let show = |path: &Option<PathBuf>| {
            path.as_deref()
                .map_or_else(|| "(none)".to_string(), |p| p.display().to_string())
        };
        match error {
            rustls::Error::InvalidCertificate(reason) => {
                format!(
                    "certificate verify failed: {}",
                    self.explain_certificate(reason)
                )
            }
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
                "the server requires a client certificate: give sslcert and sslkey".into()
            }
            rustls::Error::AlertReceived(
                alert @ (AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied),
            ) => format!(
                "the server refused the client certificate sslcert {} (TLS alert {alert:?})",
                show(&ssl.cert)
            ),
            other => format!("handshake failed: {other}"),
        }
    }

    fn explain_certificate(&self, reason: &CertificateError) -> String {
        let root = self
            .0
            .ssl
            .root_cert
            .as_deref()
            .map_or_else(String::new, |p| p.display().to_string());
        match reason {
            CertificateError::UnknownIssuer => format!(
                "the server's certificate is not trusted: no CA in sslrootcert {root} signed it"
            ),
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => format!(
                "the server's certificate is not valid for the host name {} (sslmode=verify-full \
                 checks it); it is for {}",
                expected.to_str(),
                presented
                    .iter()
                    .map(|name| bare_name(name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            CertificateError::NotValidForName => format!(
                "the server's certificate is not valid for the host name in the URL ({}; \
                 sslmode=verify-full checks it)",
                self.0.servers
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet".into()
            }
            CertificateError::BadSignature => "the server's certificate has a bad signature".into(),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "the server's certificate is not one for a TLS server".into()
            }
            other => format!("the server's certificate is refused: {other}"),
        }
    }
}

/// `db.test` from rustls' `DnsName("db.test")` (and an address from `IpAddress(...)`).
fn bare_name(presented: &str) -> &str {
    presented
        .split_once('(')
        .and_then(|(_, inner)| inner.strip_suffix(')'))
        .map_or(presented, |inner| inner.trim_matches('"'))
}

/// tokio-postgres' error for a failed TLS set-up (the server refusing TLS, or the handshake).
/// Its kind is not public; its text is.
fn is_handshake_error(error: &tokio_postgres::Error) -> bool {
    error.to_string() == "error performing TLS handshake"
}

/// The rustls error somewhere in `error`'s causes (tokio-rustls wraps it in an io::Error, whose
/// `source` skips it).
fn find_rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = error.source();
    }
    None
}

/// An error and its causes, as one line. (tokio-postgres' own text leaves the cause out.)
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// `HOST:PORT` of every host in the URL, for messages.
fn servers(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rustls client set-up for `ssl`, reading its files.
fn client_config(ssl: &SslParams, verify: Verify) -> Result<ClientConfig, String> {
    let provider = Arc::new(ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (verify, &ssl.root_cert) {
        (Verify::Nothing, _) => Arc::new(AnyCertificate(Arc::clone(&provider))),
        (Verify::Chain, Some(root)) => Arc::new(AnyHostName(webpki(root, &provider)?)),
        (Verify::ChainAndName, Some(root)) => webpki(root, &provider)?,
        (Verify::Chain | Verify::ChainAndName, None) => {
            return Err("certificate verification needs sslrootcert".into());
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&ssl.cert, &ssl.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certificates("sslcert", cert)?;
            let bytes = read_file("sslkey", key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
                format!(
                    "sslkey {}: no private key in it (PEM: PKCS#8, PKCS#1 or SEC1; an encrypted \
                     key is not supported)",
                    key.display()
                )
            })?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                format!(
                    "sslcert {} with sslkey {}: {e}",
                    cert.display(),
                    key.display()
                )
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    // What libpq 17 offers; servers before 17 ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// A verifier of the chain and host name against the CAs in `root`.
fn webpki(
    root: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) =
        roots.add_parsable_certificates(read_certificates("sslrootcert", root)?);
    if added == 0 {
        return Err(format!(
            "sslrootcert {}: no usable CA certificate in it",
            root.display()
        ));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| format!("sslrootcert {}: {e}", root.display()))
}

fn read_certificates(parameter: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_file(parameter, path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{parameter} {}: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{parameter} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certificates)
}

fn read_file(parameter: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        let reason = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
            _ => e.to_string(),
        };
        format!("{parameter} {}: {reason}", path.display())
    })
}

/// Accepts any server certificate: `prefer` and `require` without `sslrootcert`, where libpq
/// encrypts without authenticating the server. The handshake signature is still checked
/// against the presented certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Checks the chain but not the host name: `verify-ca` (and `prefer`/`require` with
/// `sslrootcert`). rustls checks the chain before the name, so a name error means the chain
/// passed.
#[derive(Debug)]
struct AnyHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
