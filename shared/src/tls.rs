//! TLS set-up from PEM files named on the command line. Errors name the flag.

use std::path::Path;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Reads a PEM file, checking that it holds at least one PEM block.
pub fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!("{flag} {}: not a PEM file", path.display()));
    }
    Ok(bytes)
}

/// Server TLS from `cert` + `key`, requiring client certificates signed by `client_ca` when
/// given (mutual TLS). None when no certificate is configured.
pub fn server(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
    flags: [&str; 3],
) -> Result<Option<ServerTlsConfig>, String> {
    let (cert, key) = match (cert, key) {
        (None, None) if client_ca.is_none() => return Ok(None),
        (None, None) => return Err(format!("{} needs {} and {}", flags[2], flags[0], flags[1])),
        (Some(cert), Some(key)) => (cert, key),
        _ => return Err(format!("{} and {} go together", flags[0], flags[1])),
    };
    let identity = Identity::from_pem(read_pem(flags[0], cert)?, read_pem(flags[1], key)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read_pem(flags[2], ca)?));
    }
    Ok(Some(config))
}

/// Client TLS trusting `ca`, presenting `cert` + `key` when given (mutual TLS).
pub fn client(
    ca: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
    domain: Option<&str>,
    flags: [&str; 3],
) -> Result<ClientTlsConfig, String> {
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(flags[0], ca)?));
    match (cert, key) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(
                read_pem(flags[1], cert)?,
                read_pem(flags[2], key)?,
            ));
        }
        _ => return Err(format!("{} and {} go together", flags[1], flags[2])),
    }
    if let Some(domain) = domain {
        config = config.domain_name(domain);
    }
    Ok(config)
}
