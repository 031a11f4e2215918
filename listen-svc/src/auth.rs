//! Bearer-token authentication for the public Listen API.
//!
//! When enabled (`--auth-jwt-secret` or `--auth-jwt-secret-file` for HS256 and/or
//! `--auth-jwks-file` for RS256; the files are read again while running), every
//! Listen call needs `authorization: Bearer <JWT>` with an `exp`; the token's `sub` is the
//! caller's uid, and a caller may only read or write that uid's conversations. A token whose
//! `scope` (space-separated) or `scp` (array) holds `--auth-service-scope` belongs to a service,
//! which may act for any uid. Health and reflection stay open (they are other services).
//! Missing or invalid tokens get UNAUTHENTICATED; acting for another uid, PERMISSION_DENIED.

use crate::error::ApiError;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use shared::reload::{Contents, Loaded, Reloadable, Reloader};
use std::sync::Arc;
use tracing::info;

/// Who is calling, as the interceptor established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    /// Authentication is off: anyone may act for any uid.
    Anyone,
    User(String),
    Service(String),
}

impl Caller {
    pub(crate) fn may_act_for(&self, uid: &str) -> bool {
        match self {
            Caller::Anyone | Caller::Service(_) => true,
            Caller::User(own) => own == uid,
        }
    }

    /// PERMISSION_DENIED unless the caller may act for `uid`; `field` names where uid came from.
    pub(crate) fn require(&self, field: &str, uid: &str) -> Result<(), ApiError> {
        if self.may_act_for(uid) {
            return Ok(());
        }
        let Caller::User(own) = self else {
            unreachable!("only users are limited")
        };
        Err(ApiError::PermissionDenied(format!(
            "{field}: the token's subject {own:?} may not act for uid {uid:?}"
        )))
    }

    /// The uid a plain user is limited to; None for services and when auth is off.
    pub(crate) fn own_uid(&self) -> Option<&str> {
        match self {
            Caller::User(uid) => Some(uid),
            _ => None,
        }
    }
}

/// The caller attached to a request by the interceptor. Fails closed if it is missing.
pub(crate) fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, ApiError> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(ApiError::Internal("request was not authenticated"))
}

#[derive(Clone, Debug, Default)]
pub(crate) struct AuthConfig {
    pub jwt_secret: Option<String>,
    pub jwt_secret_file: Option<std::path::PathBuf>,
    pub jwks_file: Option<std::path::PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub service_scope: String,
}

/// (kid, key) for RS256.
type Jwks = Vec<(Option<String>, DecodingKey)>;

/// The HS256 key: from the flag (fixed) or from a file (read again while running).
enum Secret {
    Fixed(Arc<DecodingKey>),
    File(Arc<Reloadable<DecodingKey>>),
}

impl Secret {
    fn current(&self) -> Arc<DecodingKey> {
        match self {
            Secret::Fixed(key) => Arc::clone(key),
            Secret::File(file) => file.current(),
        }
    }
}

pub(crate) struct Authenticator {
    hs256: Option<Secret>,
    rs256: Option<Arc<Reloadable<Jwks>>>,
    issuer: Option<String>,
    audience: Option<String>,
    service_scope: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
}

impl Authenticator {
    /// None when neither a secret nor a JWKS file is configured (auth off).
    pub(crate) fn from_config(config: &AuthConfig) -> Result<Option<Self>, String> {
        if config.jwt_secret.is_none()
            && config.jwt_secret_file.is_none()
            && config.jwks_file.is_none()
        {
            return Ok(None);
        }
        let hs256 = match (&config.jwt_secret, &config.jwt_secret_file) {
            (Some(_), Some(_)) => {
                return Err(
                    "--auth-jwt-secret and --auth-jwt-secret-file exclude each other".into(),
                );
            }
            (Some(secret), None) if secret.len() < 32 => {
                return Err("--auth-jwt-secret must be at least 32 bytes".into());
            }
            (Some(secret), None) => Some(Secret::Fixed(Arc::new(DecodingKey::from_secret(
                secret.as_bytes(),
            )))),
            (None, Some(path)) => Some(Secret::File(Reloadable::load(
                vec![("--auth-jwt-secret-file", path.clone())],
                parse_secret,
            )?)),
            (None, None) => None,
        };
        let rs256 = match &config.jwks_file {
            Some(path) => Some(Reloadable::load(
                vec![("--auth-jwks-file", path.clone())],
                parse_jwks,
            )?),
            None => None,
        };
        info!(
            hs256 = hs256.is_some(),
            rs256_keys = rs256.as_ref().map_or(0, |keys| keys.current().len()),
            "bearer-token auth enabled"
        );
        Ok(Some(Authenticator {
            hs256,
            rs256,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            service_scope: config.service_scope.clone(),
        }))
    }

    /// Registers the key files, if any, with `reloader`.
    pub(crate) fn watch(&self, reloader: &mut Reloader) {
        if let Some(Secret::File(file)) = &self.hs256 {
            reloader.watch(file);
        }
        if let Some(jwks) = &self.rs256 {
            reloader.watch(jwks);
        }
    }

    /// Checks an `authorization` header value, with the keys in use now.
    pub(crate) fn authenticate(&self, header: Option<&str>) -> Result<Caller, ApiError> {
        let header =
            header.ok_or_else(|| ApiError::Unauthenticated("a bearer token is required".into()))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::Unauthenticated("expected \"Bearer <token>\"".into()))?;
        let invalid =
            |reason: String| ApiError::Unauthenticated(format!("invalid bearer token: {reason}"));
        let head = decode_header(token).map_err(|e| invalid(token_problem(&e)))?;
        let mut validation = Validation::new(head.alg);
        validation.leeway = 30;
        // A token is not accepted before its nbf (RFC 7519 §4.1.5); jsonwebtoken does not
        // check nbf unless asked.
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let hs256 = self.hs256.as_ref().map(Secret::current);
        let rs256 = self.rs256.as_ref().map(|keys| keys.current());
        let keys: Vec<&DecodingKey> = match head.alg {
            Algorithm::HS256 => hs256.as_deref().into_iter().collect(),
            Algorithm::RS256 => rs256
                .iter()
                .flat_map(|keys| keys.iter())
                .filter(|(kid, _)| head.kid.is_none() || kid.is_none() || *kid == head.kid)
                .map(|(_, key)| key)
                .collect(),
            other => {
                return Err(invalid(format!(
                    "its algorithm {other:?} is not accepted; sign with HS256 or RS256"
                )));
            }
        };
        if keys.is_empty() {
            return Err(invalid(format!(
                "this server has no {:?} key{}; sign with the algorithm and key it is configured with",
                head.alg,
                head.kid
                    .as_deref()
                    .map(|kid| format!(" with kid {kid:?}"))
                    .unwrap_or_default()
            )));
        }
        let mut last = String::new();
        for key in keys {
            match decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    if claims.sub.trim().is_empty() {
                        return Err(invalid("its sub claim is empty; it must be the uid".into()));
                    }
                    let scopes = claims
                        .scope
                        .iter()
                        .flat_map(|s| s.split_whitespace().map(String::from))
                        .chain(claims.scp.into_iter().flatten());
                    let service = scopes.into_iter().any(|s| s == self.service_scope);
                    return Ok(if service {
                        Caller::Service(claims.sub)
                    } else {
                        Caller::User(claims.sub)
                    });
                }
                Err(error) => last = token_problem(&error),
            }
        }
        Err(invalid(last))
    }
}

fn parse_jwks(files: &Contents) -> Result<Loaded<Jwks>, String> {
    let set: JwkSet = serde_json::from_slice(files.bytes(0))
        .map_err(|e| format!("{}: not a JWKS: {e}", files.name(0)))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{}: {e}", files.name(0)))?;
        keys.push((jwk.common.key_id.clone(), key));
    }
    if keys.is_empty() {
        return Err(format!("{}: no keys", files.name(0)));
    }
    let kids: Vec<&str> = set
        .keys
        .iter()
        .map(|jwk| jwk.common.key_id.as_deref().unwrap_or("(no kid)"))
        .collect();
    Ok(Loaded {
        summary: format!("{} key(s): {}", keys.len(), kids.join(", ")),
        value: keys,
        not_after: None,
    })
}

/// An HS256 secret file: its bytes, less one trailing newline (as `echo` leaves).
fn parse_secret(files: &Contents) -> Result<Loaded<DecodingKey>, String> {
    let bytes = files.bytes(0);
    let secret = bytes
        .strip_suffix(b"\r\n")
        .or_else(|| bytes.strip_suffix(b"\n"))
        .unwrap_or(bytes);
    if secret.len() < 32 {
        return Err(format!(
            "{}: the secret must be at least 32 bytes (it has {})",
            files.name(0),
            secret.len()
        ));
    }
    Ok(Loaded {
        value: DecodingKey::from_secret(secret),
        not_after: None,
        summary: format!("{}-byte HS256 secret", secret.len()),
    })
}

/// What is wrong with a token, in words a caller can act on (jsonwebtoken's own messages
/// name its enum variants, such as `InvalidToken`).
fn token_problem(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            "it is not a JWT (three base64url parts joined by dots); send the token your identity provider issued".into()
        }
        ErrorKind::Json(error) => format!(
            "its header or claims are not what this server needs ({error}); it needs alg \
             HS256 or RS256, a sub claim (the uid) and an exp claim (seconds since 1970)"
        ),
        ErrorKind::InvalidSignature => {
            "its signature does not match any key this server has; was it signed for another service?".into()
        }
        ErrorKind::ExpiredSignature => "it has expired (its exp is in the past); get a new token".into(),
        ErrorKind::ImmatureSignature => "it is not valid yet (its nbf is in the future)".into(),
        ErrorKind::InvalidIssuer => "its iss is not the issuer this server accepts (--auth-issuer)".into(),
        ErrorKind::InvalidAudience => "its aud does not name this server (--auth-audience)".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("it has no {claim} claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("its {claim} claim has the wrong type"),
        ErrorKind::InvalidAlgorithm => "its algorithm does not match the key it names".into(),
        _ => "it cannot be verified with the keys this server has".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator() -> Authenticator {
        Authenticator::from_config(&AuthConfig {
            jwt_secret: Some("0123456789abcdef0123456789abcdef".into()),
            ..AuthConfig::default()
        })
        .unwrap()
        .unwrap()
    }

    fn refusal(header: &str) -> String {
        match authenticator().authenticate(Some(header)) {
            Err(ApiError::Unauthenticated(message)) => message,
            other => panic!("expected UNAUTHENTICATED, got {other:?}"),
        }
    }

    #[test]
    fn refusals_say_what_is_wrong_in_plain_words() {
        let not_a_jwt = refusal("Bearer not-a-token");
        assert!(
            not_a_jwt.starts_with("invalid bearer token: it is not a JWT"),
            "{not_a_jwt}"
        );
        let expired = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"sub": "u1", "exp": 1_000}),
            &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert!(refusal(&format!("Bearer {expired}")).contains("it has expired"));
        let other_key = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"sub": "u1", "exp": 4_000_000_000u64}),
            &jsonwebtoken::EncodingKey::from_secret(b"another secret, another service!"),
        )
        .unwrap();
        assert!(refusal(&format!("Bearer {other_key}")).contains("signature does not match"));
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
            )
            .unwrap()
        };
        let not_yet = sign(
            serde_json::json!({"sub": "u1", "exp": 4_000_000_000u64, "nbf": 3_999_000_000u64}),
        );
        assert!(refusal(&format!("Bearer {not_yet}")).contains("not valid yet"));
        let no_sub = refusal(&format!(
            "Bearer {}",
            sign(serde_json::json!({"exp": 4_000_000_000u64}))
        ));
        assert!(no_sub.contains("missing field `sub`"), "{no_sub}");
        for message in [not_a_jwt, refusal("Bearer a.b.c"), refusal("Bearer x.y")] {
            assert!(
                !message.contains("Invalid") && !message.contains("Error"),
                "no library type names: {message}"
            );
        }
    }
}
