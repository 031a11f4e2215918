//! The TLS parameters of a `postgres://` URL, with libpq's names and meanings: `sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`.
//!
//! tokio-postgres knows only `sslmode` `disable`, `prefer` and `require`, and refuses the other
//! three parameters, so they are taken out here; every other parameter stays in the URL, in
//! its order, for tokio-postgres to read.

use std::path::PathBuf;

/// libpq's `sslmode` values that listen implements. libpq's sixth, `allow` (plaintext first,
/// TLS only if the server insists), is refused: tokio-postgres cannot do it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    /// libpq's default.
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// What is checked of the server's certificate once TLS is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Nothing: the connection is encrypted but the server is not authenticated.
    Nothing,
    /// Signed by a CA in `sslrootcert` (any host name).
    Chain,
    /// Signed by a CA in `sslrootcert` and issued for the host name connected to.
    ChainAndName,
}

const MODES: &str = "disable, prefer, require, verify-ca, verify-full";
const PARAMETERS: &str = "sslmode, sslrootcert, sslcert, sslkey";

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(format!(
                    "sslmode=allow is not supported (it tries plaintext first); use one of {MODES}"
                ));
            }
            other => return Err(format!("sslmode={other:?} is not one of {MODES}")),
        })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS parameters of a URL, checked for consistency.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SslParams {
    pub mode: SslMode,
    /// CA certificates (PEM) the server's certificate must chain to.
    pub root_cert: Option<PathBuf>,
    /// Client certificate (PEM) and its key, for servers that ask for one (`cert` in pg_hba).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl SslParams {
    /// What is verified of the server's certificate, or None when TLS is off. As in libpq,
    /// `prefer` and `require` verify the chain when a root certificate is given.
    pub(crate) fn verify(&self) -> Option<Verify> {
        match self.mode {
            SslMode::Disable => None,
            SslMode::Prefer | SslMode::Require if self.root_cert.is_none() => Some(Verify::Nothing),
            SslMode::Prefer | SslMode::Require | SslMode::VerifyCa => Some(Verify::Chain),
            SslMode::VerifyFull => Some(Verify::ChainAndName),
        }
    }
}

/// Splits `url` into the URL tokio-postgres reads (every other parameter kept, in order) and
/// its TLS parameters. Errors name the parameter. Parameter names and values are
/// percent-decoded, as tokio-postgres does; an empty path counts as not given, as in libpq.
pub(crate) fn split_ssl_params(url: &str) -> Result<(String, SslParams), String> {
    let (base, query) = match query_start(url) {
        Some(at) => (&url[..at], &url[at + 1..]),
        None => return Ok((url.to_string(), SslParams::default())),
    };
    let mut ssl = SslParams::default();
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let Some((key, value)) = pair.split_once('=') else {
            // tokio-postgres reports it ("unterminated parameter").
            kept.push(pair);
            continue;
        };
        let key = percent_decode(key, "a parameter name")?;
        if !key.starts_with("ssl") {
            kept.push(pair);
            continue;
        }
        let value = percent_decode(value, &key)?;
        let path = || (!value.is_empty()).then(|| PathBuf::from(&value));
        match key.as_str() {
            "sslmode" => ssl.mode = SslMode::parse(&value)?,
            // PostgreSQL 16's libpq: the operating system's CAs, and verify-full implied.
            "sslrootcert" if value == "system" => {
                return Err(
                    "sslrootcert=system (the system's CAs) is not supported; give the path of \
                     the CA certificates (PEM)"
                        .into(),
                );
            }
            "sslrootcert" => ssl.root_cert = path(),
            "sslcert" => ssl.cert = path(),
            "sslkey" => ssl.key = path(),
            other => {
                return Err(format!(
                    "the URL parameter {other} is not supported; the TLS parameters are {PARAMETERS}"
                ));
            }
        }
    }
    if matches!(ssl.mode, SslMode::VerifyCa | SslMode::VerifyFull) && ssl.root_cert.is_none() {
        return Err(format!(
            "sslmode={} needs sslrootcert=PATH, the CA certificates (PEM) to check the server's \
             certificate against (listen does not read ~/.postgresql/root.crt)",
            ssl.mode.as_str()
        ));
    }
    if ssl.cert.is_some() != ssl.key.is_some() {
        return Err("sslcert and sslkey go together (a client certificate and its key)".into());
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, ssl))
}

/// Where the query (`?`) starts: after the user information, as tokio-postgres reads it (the
/// user information runs to the first `@`, so a `?` in a password must be escaped).
fn query_start(url: &str) -> Option<usize> {
    let after_scheme = url.find("://").map_or(0, |at| at + 3);
    let after_userinfo = url[after_scheme..]
        .find('@')
        .map_or(after_scheme, |at| after_scheme + at + 1);
    url[after_userinfo..]
        .find('?')
        .map(|at| after_userinfo + at)
}

/// `%XX` to the byte it stands for; anything else as it is. The result must be UTF-8.
fn percent_decode(text: &str, what: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&hi), Some(&lo)) if hex(hi).is_some() && hex(lo).is_some() => {
                out.push((hex(hi).unwrap_or(0) * 16 + hex(lo).unwrap_or(0)) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{what}: not UTF-8 once percent-decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(
        mode: SslMode,
        root: Option<&str>,
        cert: Option<&str>,
        key: Option<&str>,
    ) -> SslParams {
        SslParams {
            mode,
            root_cert: root.map(PathBuf::from),
            cert: cert.map(PathBuf::from),
            key: key.map(PathBuf::from),
        }
    }

    #[test]
    fn tls_parameters_are_taken_out_and_the_rest_kept_in_order() {
        use SslMode::*;
        let cases: &[(&str, &str, SslParams)] = &[
            (
                "postgres://u:p@db:5432/listen",
                "postgres://u:p@db:5432/listen",
                SslParams::default(),
            ),
            (
                "postgres://u@db/listen?sslmode=disable",
                "postgres://u@db/listen",
                params(Disable, None, None, None),
            ),
            (
                "postgresql://u@db/listen?connect_timeout=3&sslmode=require&application_name=x",
                "postgresql://u@db/listen?connect_timeout=3&application_name=x",
                params(Require, None, None, None),
            ),
            (
                "postgres://u:p@db.example.com:5432/listen?sslmode=verify-full&sslrootcert=/etc/listen/pg-ca.pem",
                "postgres://u:p@db.example.com:5432/listen",
                params(VerifyFull, Some("/etc/listen/pg-ca.pem"), None, None),
            ),
            (
                "postgres://u@db/listen?sslmode=verify-ca&sslrootcert=ca.pem&sslcert=c.pem&sslkey=c.key&hostaddr=10.0.0.1",
                "postgres://u@db/listen?hostaddr=10.0.0.1",
                params(VerifyCa, Some("ca.pem"), Some("c.pem"), Some("c.key")),
            ),
            // Percent-decoded, as tokio-postgres decodes; an empty path is no path (libpq).
            (
                "postgres://u@db/listen?sslrootcert=%2Fetc%2Fmy%20ca.pem&sslcert=&sslkey=",
                "postgres://u@db/listen",
                params(Prefer, Some("/etc/my ca.pem"), None, None),
            ),
            (
                "postgres://u@db/listen?ssl%6Dode=require",
                "postgres://u@db/listen",
                params(Require, None, None, None),
            ),
            // A `?` in the (escaped) password and a `@`-free URL.
            (
                "postgres://u:a%3Fb@db/listen?sslmode=prefer",
                "postgres://u:a%3Fb@db/listen",
                params(Prefer, None, None, None),
            ),
            (
                "postgres://db/listen?sslmode=require&sslrootcert=ca.pem",
                "postgres://db/listen",
                params(Require, Some("ca.pem"), None, None),
            ),
            // Not ours: left for tokio-postgres to judge.
            (
                "postgres://db/listen?broken",
                "postgres://db/listen?broken",
                SslParams::default(),
            ),
            // The last value wins, as in tokio-postgres.
            (
                "postgres://db/listen?sslmode=disable&sslmode=require",
                "postgres://db/listen",
                params(Require, None, None, None),
            ),
        ];
        for (url, rest, ssl) in cases {
            assert_eq!(
                split_ssl_params(url).as_ref(),
                Ok(&(rest.to_string(), ssl.clone())),
                "{url}"
            );
        }
    }

    #[test]
    fn bad_tls_parameters_are_named() {
        let cases: &[(&str, &[&str])] = &[
            (
                "postgres://db/x?sslmode=verify",
                &[
                    "sslmode",
                    "disable, prefer, require, verify-ca, verify-full",
                ],
            ),
            ("postgres://db/x?sslmode=", &["sslmode", "verify-full"]),
            (
                "postgres://db/x?sslmode=allow",
                &["sslmode=allow", "not supported"],
            ),
            ("postgres://db/x?sslmode=verify-full", &["sslrootcert"]),
            (
                "postgres://db/x?sslmode=verify-ca&sslrootcert=",
                &["sslmode=verify-ca", "sslrootcert"],
            ),
            ("postgres://db/x?sslcert=c.pem", &["sslcert", "sslkey"]),
            ("postgres://db/x?sslkey=c.key", &["sslcert", "sslkey"]),
            (
                "postgres://db/x?sslcrl=crl.pem",
                &["sslcrl", "not supported"],
            ),
            ("postgres://db/x?sslpassword=secret", &["sslpassword"]),
            (
                "postgres://db/x?sslrootcert=system",
                &["sslrootcert=system", "not supported"],
            ),
            ("postgres://db/x?sslrootcert=%FF", &["sslrootcert", "UTF-8"]),
        ];
        for (url, needles) in cases {
            let error = split_ssl_params(url).unwrap_err();
            for needle in *needles {
                assert!(error.contains(needle), "{url}: {error}");
            }
            assert!(!error.contains("secret"), "{url}: {error}");
        }
    }

    #[test]
    fn what_is_verified_follows_libpq() {
        use SslMode::*;
        let cases = [
            (params(Disable, Some("ca.pem"), None, None), None),
            (params(Prefer, None, None, None), Some(Verify::Nothing)),
            (
                params(Prefer, Some("ca.pem"), None, None),
                Some(Verify::Chain),
            ),
            (params(Require, None, None, None), Some(Verify::Nothing)),
            // libpq: "if a root CA file exists, verify the certificate as for verify-ca".
            (
                params(Require, Some("ca.pem"), None, None),
                Some(Verify::Chain),
            ),
            (
                params(VerifyCa, Some("ca.pem"), None, None),
                Some(Verify::Chain),
            ),
            (
                params(VerifyFull, Some("ca.pem"), None, None),
                Some(Verify::ChainAndName),
            ),
        ];
        for (ssl, expected) in cases {
            assert_eq!(ssl.verify(), expected, "{ssl:?}");
        }
    }
}
