//! Command line and environment for listen-svc.

use crate::auth::{AuthConfig, Authenticator};
use crate::link::{Attempts, LinkConfig, Policy, Target};
use crate::validate::Limits;
use shared::backoff::Backoff;
use shared::cli::parse_positive_duration;
use shared::telemetry::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// listen-svc stores conversations durably and hands them to pusher-svc for processing over
/// one long-lived gRPC stream. It never waits on pusher: work queues in the store while
/// pusher is away and flows when it returns.
///
/// Every flag can also be set through the environment variable shown.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "listen-svc", version, after_help = shared::telemetry::TRACES_HELP)]
pub struct Config {
    /// Address for the public gRPC server (listen.v1.Listen, health, reflection).
    #[arg(long, env = "LISTEN_LISTEN_ADDR", default_value = "0.0.0.0:50051")]
    pub listen_addr: SocketAddr,

    /// pusher-svc's address. http://HOST:PORT or https://HOST:PORT: one stream (to whichever
    /// pod a ClusterIP Service picks). dns:///HOST:PORT: one stream per address HOST resolves
    /// to, re-resolved every --pusher-resolve-interval; give it a headless Service,
    /// dns:///pusher-headless.NAMESPACE.svc.cluster.local:50052, so every pusher replica gets
    /// work. dns://DNS_SERVER_IP[:PORT]/HOST:PORT asks that nameserver directly.
    #[arg(
        long,
        env = "LISTEN_PUSHER_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub pusher_url: String,

    /// How often a dns: --pusher-url is looked up again (pusher replicas that appear get a
    /// stream; those that disappear hand their pending work to the others). A failing
    /// stream also triggers a lookup, at most every 5 s.
    #[arg(long, env = "LISTEN_PUSHER_RESOLVE_INTERVAL", default_value = "30s", value_parser = parse_positive_duration)]
    pub pusher_resolve_interval: Duration,

    /// Most pusher endpoints (streams) kept for a dns: --pusher-url; further addresses are
    /// ignored, with a warning. Memory: up to this times --max-in-flight pending requests.
    #[arg(long, env = "LISTEN_MAX_PUSHER_ENDPOINTS", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=1_024))]
    pub max_pusher_endpoints: u32,

    /// Conversation store: sqlite://PATH (embedded; the file and its directory are created if
    /// missing) or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (shared by several listen
    /// replicas; the schema is migrated at start-up). TLS to PostgreSQL takes libpq's URL
    /// parameters: sslmode (disable, prefer (default), require, verify-ca, verify-full),
    /// sslrootcert, sslcert, sslkey, e.g.
    /// ?sslmode=verify-full&sslrootcert=/etc/listen/pg-ca.pem.
    #[arg(
        long,
        env = "LISTEN_STORE",
        default_value = "sqlite://./data/listen.db"
    )]
    pub store: String,

    /// Conversations sent to pusher and not yet acknowledged, at most, per pusher endpoint.
    /// Further work waits, durably, in the store.
    #[arg(long, env = "LISTEN_MAX_IN_FLIGHT", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_in_flight: u32,

    /// Time pusher has to acknowledge a request (each Progress from pusher restarts it)
    /// before it is sent again.
    #[arg(long, env = "LISTEN_ACK_TIMEOUT", default_value = "120s", value_parser = parse_positive_duration)]
    pub ack_timeout: Duration,

    /// Sends per conversation per stream before it is marked FAILED (Busy answers do not
    /// count; a re-established stream grants a fresh budget).
    #[arg(long, env = "LISTEN_MAX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub max_attempts: u32,

    /// First delay between re-sends of one conversation (x1.6 per attempt, ±20 %, at most
    /// --reconnect-max).
    #[arg(long, env = "LISTEN_RETRY_INITIAL", default_value = "1s", value_parser = parse_positive_duration)]
    pub retry_initial: Duration,

    /// First reconnect delay after the link fails (x1.6 per failure, ±20 %).
    #[arg(long, env = "LISTEN_RECONNECT_INITIAL", default_value = "1s", value_parser = parse_positive_duration)]
    pub reconnect_initial: Duration,

    /// Longest reconnect or re-send delay.
    #[arg(long, env = "LISTEN_RECONNECT_MAX", default_value = "30s", value_parser = parse_positive_duration)]
    pub reconnect_max: Duration,

    /// Consecutive failed connection attempts before the link is DEGRADED.
    #[arg(long, env = "LISTEN_DEGRADE_AFTER", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub degrade_after: u32,

    /// While DEGRADED, time between probe attempts (HALF_OPEN).
    #[arg(long, env = "LISTEN_PROBE_INTERVAL", default_value = "30s", value_parser = parse_positive_duration)]
    pub probe_interval: Duration,

    /// Time allowed to open a connection and complete the Hello/Welcome handshake.
    #[arg(long, env = "LISTEN_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub connect_timeout: Duration,

    /// HTTP/2 keepalive ping interval on the link. A half-open connection is detected within
    /// --keepalive-interval + --keepalive-timeout.
    #[arg(long, env = "LISTEN_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = parse_positive_duration)]
    pub keepalive_interval: Duration,

    /// Time to wait for a keepalive ping's answer before the connection is declared dead.
    #[arg(long, env = "LISTEN_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub keepalive_timeout: Duration,

    /// Lease on each conversation this instance is sending; renewed every third of it. If
    /// this instance dies, others take its work over once the lease expires.
    #[arg(long, env = "LISTEN_LEASE_TTL", default_value = "30s", value_parser = parse_positive_duration)]
    pub lease_ttl: Duration,

    /// This instance's name as a lease owner; must be unique among replicas sharing a store
    /// and stable across restarts (default: the host name, which is the pod name in Kubernetes).
    #[arg(long, env = "LISTEN_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Most segments accepted in one conversation.
    #[arg(long, env = "LISTEN_MAX_SEGMENTS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_segments: u32,

    /// Longest segment text accepted, in bytes.
    #[arg(long, env = "LISTEN_MAX_SEGMENT_BYTES", default_value_t = 16 * 1024,
          value_parser = clap::value_parser!(u32).range(1..=16 * 1024 * 1024))]
    pub max_segment_bytes: u32,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "LISTEN_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=256 * 1024 * 1024))]
    pub max_message_bytes: u32,

    /// Live transcript batches kept for realtime forwarding while the link to pusher is down;
    /// beyond this the oldest are dropped (and counted). Conversations are not affected.
    #[arg(long, env = "LISTEN_TRANSCRIPT_BUFFER", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub transcript_buffer: u32,

    /// Open Session streams, at most; a new one beyond this gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "LISTEN_MAX_SESSIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_sessions: u32,

    /// Open Session streams per uid, at most; beyond it Start gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "LISTEN_MAX_SESSIONS_PER_UID", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_sessions_per_uid: u32,

    /// Conversations waiting in the store to be sent to pusher, at most, all uids together.
    /// Beyond it Submit and a session's Finish get RESOURCE_EXHAUSTED (with RetryInfo) and
    /// nothing is stored. The default holds a long pusher outage at a steady rate (hours at
    /// 100 conversations/s) while bounding the disk a stalled pusher can fill (about this
    /// many times the average conversation's size).
    #[arg(long, env = "LISTEN_MAX_QUEUED", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub max_queued: u64,

    /// Conversations of one uid waiting in the store to be sent to pusher, at most. Beyond it
    /// that uid's Submit and Finish get RESOURCE_EXHAUSTED (with RetryInfo); other uids are
    /// not affected. The default takes a day of one device's recordings synced at once while
    /// keeping one misbehaving client to 1 % of --max-queued.
    #[arg(long, env = "LISTEN_MAX_QUEUED_PER_UID", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub max_queued_per_uid: u64,

    /// The delay a RESOURCE_EXHAUSTED answer to a full queue asks the client to wait before
    /// trying again (its google.rpc.RetryInfo).
    #[arg(long, env = "LISTEN_QUEUE_RETRY_AFTER", default_value = "10s", value_parser = parse_positive_duration)]
    pub queue_retry_after: Duration,

    /// Lowest conversation_timeout_s a session may ask for.
    #[arg(long, env = "LISTEN_MIN_CONVERSATION_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub min_conversation_timeout: Duration,

    /// How often the sweeper finishes IN_PROGRESS conversations whose deadline passed.
    #[arg(long, env = "LISTEN_SWEEP_INTERVAL", default_value = "5s", value_parser = parse_positive_duration)]
    pub sweep_interval: Duration,

    /// On SIGTERM, time allowed for in-flight requests to finish before connections are
    /// closed. Keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "LISTEN_SHUTDOWN_GRACE", default_value = "5s", value_parser = shared::cli::parse_duration)]
    pub shutdown_grace: Duration,

    /// Address for Prometheus metrics (GET /metrics), or `off`.
    #[arg(long, env = "LISTEN_ADMIN_ADDR", default_value = "0.0.0.0:9464", value_parser = shared::metrics::parse_admin_addr)]
    pub admin_addr: shared::metrics::AdminAddr,

    /// CA (PEM) that signed pusher's certificate; required with an https:// --pusher-url, and
    /// turns TLS on for a dns: one. Read again every --credentials-reload-interval: new
    /// connections to pusher trust the new bundle.
    #[arg(long, env = "LISTEN_PUSHER_TLS_CA")]
    pub pusher_tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) presented to pusher (mutual TLS), with --pusher-tls-key. Read
    /// again every --credentials-reload-interval: new connections present the new one.
    #[arg(long, env = "LISTEN_PUSHER_TLS_CERT")]
    pub pusher_tls_cert: Option<PathBuf>,

    /// Private key (PEM) for --pusher-tls-cert. Read again with it.
    #[arg(long, env = "LISTEN_PUSHER_TLS_KEY")]
    pub pusher_tls_key: Option<PathBuf>,

    /// Name to verify pusher's certificate against, when it differs from the URL's host.
    #[arg(long, env = "LISTEN_PUSHER_TLS_DOMAIN")]
    pub pusher_tls_domain: Option<String>,

    /// Certificate chain (PEM) for listen's own public port; with --tls-key it speaks TLS only.
    /// Read again every --credentials-reload-interval: new connections get the new one.
    #[arg(long, env = "LISTEN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) for --tls-cert. Read again with it.
    #[arg(long, env = "LISTEN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// How often the credential files (--tls-*, --pusher-tls-*, --auth-jwks-file,
    /// --auth-jwt-secret-file) are read again. Changed files that parse (and whose key matches
    /// the certificate) are used at once by new connections and token checks, open
    /// connections are kept; files that do not are logged once and the previous ones stay.
    #[arg(long, env = "LISTEN_CREDENTIALS_RELOAD_INTERVAL", default_value = "30s", value_parser = parse_positive_duration)]
    pub credentials_reload_interval: Duration,

    /// HS256 secret (at least 32 bytes) for bearer tokens on the Listen API. With it, or with
    /// --auth-jwks-file, every Listen call needs `authorization: Bearer <JWT>` whose `sub` is
    /// the caller's uid. Prefer the environment variable: flags show in process listings.
    #[arg(long, env = "LISTEN_AUTH_JWT_SECRET", hide_env_values = true)]
    pub auth_jwt_secret: Option<String>,

    /// File holding the HS256 secret instead (at least 32 bytes; one trailing newline is
    /// ignored), e.g. a mounted Secret. Read again every --credentials-reload-interval.
    #[arg(
        long,
        env = "LISTEN_AUTH_JWT_SECRET_FILE",
        conflicts_with = "auth_jwt_secret"
    )]
    pub auth_jwt_secret_file: Option<PathBuf>,

    /// JWKS file (JSON) of RS256 public keys for bearer tokens. Read again every
    /// --credentials-reload-interval, so a rotated signing key is accepted without a restart.
    #[arg(long, env = "LISTEN_AUTH_JWKS_FILE")]
    pub auth_jwks_file: Option<PathBuf>,

    /// Required `iss` of bearer tokens, if set.
    #[arg(long, env = "LISTEN_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,

    /// Required `aud` of bearer tokens, if set.
    #[arg(long, env = "LISTEN_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,

    /// Scope (in `scope` or `scp`) that lets a token act for any uid: for services.
    #[arg(
        long,
        env = "LISTEN_AUTH_SERVICE_SCOPE",
        default_value = "listen:service"
    )]
    pub auth_service_scope: String,

    /// HTTP/2 streams one client connection may have open at once.
    #[arg(long, env = "LISTEN_MAX_CONCURRENT_STREAMS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_streams: u32,

    /// HTTP/2 streams a client may make this server reset for its protocol errors before its
    /// connection is closed (a guard against reset floods).
    #[arg(long, env = "LISTEN_MAX_LOCAL_ERROR_RESETS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_local_error_resets: u32,

    /// Time a unary call may take before it is cancelled (streams are not cut by it).
    #[arg(long, env = "LISTEN_REQUEST_TIMEOUT", default_value = "30s", value_parser = shared::cli::parse_positive_duration)]
    pub request_timeout: Duration,

    /// After a client half-closes a Session, time the stream stays open for the outcomes of
    /// the conversations it finished (processed, failed or discarded); then it ends with OK.
    #[arg(long, env = "LISTEN_SESSION_LINGER", default_value = "120s", value_parser = shared::cli::parse_duration)]
    pub session_linger: Duration,

    /// Most encoded bytes of conversations in one ListConversations page (a page always holds
    /// at least one), from 1024; larger than --max-message-bytes counts as that. The default
    /// stays under the 4 MiB every gRPC client accepts by default.
    #[arg(long, env = "LISTEN_MAX_PAGE_BYTES", default_value_t = 4_000_000,
          value_parser = clap::value_parser!(u32).range(1024..=256 * 1024 * 1024))]
    pub max_page_bytes: u32,

    /// Compress responses to clients that accept it: `none`, `all`, or a comma-separated list of
    /// gzip, deflate, zstd (a bare flag means all three; the client's grpc-accept-encoding
    /// order picks). Compressed requests are accepted either way (gzip, deflate, zstd).
    #[arg(long, env = "LISTEN_RESPONSE_COMPRESSION", default_value = "none",
          num_args = 0..=1, default_missing_value = "gzip,deflate,zstd",
          value_parser = shared::compression::parse_algorithms)]
    pub response_compression: shared::compression::Algorithms,

    /// Compress the messages listen sends to pusher: none, gzip, deflate or zstd. Worth it
    /// when the link crosses a network that charges for bytes; costs CPU on both sides.
    #[arg(long, env = "LISTEN_PUSHER_COMPRESSION", default_value = "none",
          value_parser = shared::compression::parse_one)]
    pub pusher_compression: shared::compression::SendCompression,

    /// Log line format (RUST_LOG sets the filter, default "info").
    #[arg(long, env = "LISTEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Where conversations are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    /// A postgres:// or postgresql:// URL.
    Postgres(String),
}

/// A configuration that clap accepted but listen cannot run with. Each message names the flag
/// to fix; `main` prints it and exits with status 64.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    PusherUrl(String),
    #[error("{0}")]
    PusherTls(String),
    #[error("{0}")]
    ServerTls(String),
    #[error("{0}")]
    Auth(String),
    #[error("--reconnect-initial and --retry-initial must not exceed --reconnect-max")]
    BackoffOrder,
    #[error("--lease-ttl must be at least 3s")]
    LeaseTtl,
    #[error("--instance-id must be 1 to 128 bytes")]
    InstanceId,
}

impl Config {
    /// Checks what clap cannot; the message names the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store_location()?;
        self.pusher_tls()?;
        self.server_tls()?;
        self.authenticator()?;
        if self.reconnect_initial > self.reconnect_max || self.retry_initial > self.reconnect_max {
            return Err(ConfigError::BackoffOrder);
        }
        if self.lease_ttl < Duration::from_secs(3) {
            return Err(ConfigError::LeaseTtl);
        }
        if let Some(id) = &self.instance_id
            && (id.trim().is_empty() || id.len() > 128)
        {
            return Err(ConfigError::InstanceId);
        }
        Ok(())
    }

    /// `--instance-id`, or the host name.
    pub(crate) fn instance_id(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            gethostname::gethostname()
                .into_string()
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("listen-{}", uuid::Uuid::now_v7()))
        })
    }

    /// Where pusher is; the error names --pusher-url.
    pub fn pusher_target(&self) -> Result<Target, ConfigError> {
        Target::parse(&self.pusher_url).map_err(ConfigError::PusherUrl)
    }

    /// TLS towards pusher: for an https:// --pusher-url (which needs --pusher-tls-ca), or a
    /// dns: one with --pusher-tls-ca (checked against the DNS name unless
    /// --pusher-tls-domain says otherwise).
    pub fn pusher_tls(&self) -> Result<Option<Arc<shared::tls::ClientTls>>, ConfigError> {
        let target = self.pusher_target()?;
        let any_tls_flag = self.pusher_tls_ca.is_some()
            || self.pusher_tls_cert.is_some()
            || self.pusher_tls_key.is_some();
        let refuse = |reason: &str| Err(ConfigError::PusherTls(reason.into()));
        let ca = match (&target, self.pusher_tls_ca.as_deref()) {
            (Target::Url { url, .. }, ca) if url.starts_with("https://") => match ca {
                Some(ca) => ca,
                None => return refuse("an https:// --pusher-url needs --pusher-tls-ca"),
            },
            (Target::Url { .. }, _) if any_tls_flag => {
                return refuse(
                    "--pusher-tls-* need an https:// or dns: --pusher-url (http:// is plaintext)",
                );
            }
            (Target::Dns { .. }, Some(ca)) => ca,
            (Target::Dns { .. }, None) if any_tls_flag => {
                return refuse("--pusher-tls-cert and --pusher-tls-key need --pusher-tls-ca");
            }
            _ => return Ok(None),
        };
        let domain = self.pusher_tls_domain.as_deref().or(target.host());
        shared::tls::ClientTls::load(
            ca,
            self.pusher_tls_cert.as_deref(),
            self.pusher_tls_key.as_deref(),
            domain,
            ["--pusher-tls-ca", "--pusher-tls-cert", "--pusher-tls-key"],
        )
        .map(Some)
        .map_err(ConfigError::PusherTls)
    }

    /// The link's settings: where pusher is, the pending window, retries, backoff, keepalive.
    pub(crate) fn link_config(&self, instance_id: String) -> Result<LinkConfig, ConfigError> {
        let reconnect = Backoff {
            initial: self.reconnect_initial,
            max: self.reconnect_max,
            ..Backoff::RECONNECT
        };
        Ok(LinkConfig {
            target: self.pusher_target()?,
            resolve_interval: self.pusher_resolve_interval,
            max_endpoints: self.max_pusher_endpoints as usize,
            instance_id,
            max_in_flight: self.max_in_flight as usize,
            attempts: Attempts {
                max_attempts: self.max_attempts,
                ack_timeout: self.ack_timeout,
                retry_backoff: Backoff {
                    initial: self.retry_initial,
                    ..reconnect
                },
            },
            policy: Policy {
                backoff: reconnect,
                degrade_after: self.degrade_after,
                probe_every: self.probe_interval,
                stable_after: Duration::from_secs(10),
            },
            connect_timeout: self.connect_timeout,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            heartbeat_interval: self.keepalive_interval,
            lease_ttl: self.lease_ttl,
            max_message_bytes: self.max_message_bytes as usize,
            transcript_buffer: self.transcript_buffer as usize,
            tls: self.pusher_tls()?,
            compression: self.pusher_compression,
        })
    }

    /// The byte bound of a list page: --max-page-bytes, at most --max-message-bytes.
    pub(crate) fn page_bytes(&self) -> usize {
        self.max_page_bytes.min(self.max_message_bytes) as usize
    }

    /// Request limits for the API and sessions.
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            max_segments: self.max_segments as usize,
            max_segment_bytes: self.max_segment_bytes as usize,
            max_conversation_bytes: (self.max_message_bytes as usize)
                .saturating_sub(crate::validate::PROCESS_OVERHEAD_BYTES),
        }
    }

    /// The admission bounds on queued conversations.
    pub(crate) fn queue_bounds(&self) -> crate::store::QueueBounds {
        crate::store::QueueBounds {
            max_queued: self.max_queued,
            max_queued_per_uid: self.max_queued_per_uid,
        }
    }

    /// Bearer-token auth, or None when it is off.
    pub(crate) fn authenticator(&self) -> Result<Option<Authenticator>, ConfigError> {
        Authenticator::from_config(&AuthConfig {
            jwt_secret: self.auth_jwt_secret.clone(),
            jwt_secret_file: self.auth_jwt_secret_file.clone(),
            jwks_file: self.auth_jwks_file.clone(),
            issuer: self.auth_issuer.clone(),
            audience: self.auth_audience.clone(),
            service_scope: self.auth_service_scope.clone(),
        })
        .map_err(ConfigError::Auth)
    }

    /// TLS for listen's own public port, if configured.
    pub fn server_tls(&self) -> Result<Option<Arc<shared::tls::ServerTls>>, ConfigError> {
        shared::tls::ServerTls::load(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            None,
            ["--tls-cert", "--tls-key", "--tls-client-ca"],
        )
        .map_err(ConfigError::ServerTls)
    }

    pub fn store_location(&self) -> Result<StoreLocation, ConfigError> {
        if let Some(path) = self.store.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(ConfigError::Store(
                    "--store sqlite:// needs a file path, e.g. sqlite://./data/listen.db".into(),
                ));
            }
            return Ok(StoreLocation::Sqlite(PathBuf::from(path)));
        }
        if self.store.starts_with("postgres://") || self.store.starts_with("postgresql://") {
            crate::store::PostgresStore::check(&self.store)
                .map_err(|e| ConfigError::Store(format!("--store: {e}")))?;
            return Ok(StoreLocation::Postgres(self.store.clone()));
        }
        Err(ConfigError::Store(format!(
            "--store {:?}: expected sqlite://PATH or postgres://USER@HOST:PORT/DB",
            self.store
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("listen-svc").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(
            config.store_location(),
            Ok(StoreLocation::Sqlite("./data/listen.db".into()))
        );
        assert_eq!(config.ack_timeout, Duration::from_secs(120));
        assert_eq!(config.max_attempts, 5);
        let pg = parse(&["--store", "postgres://listen@db:5432/listen"]);
        assert_eq!(
            pg.store_location(),
            Ok(StoreLocation::Postgres(
                "postgres://listen@db:5432/listen".into()
            ))
        );
        let tls = parse(&["--store", "postgres://listen@db/listen?sslmode=require"]);
        assert_eq!(tls.validate(), Ok(()));
    }

    #[test]
    fn bad_values_name_the_flag() {
        use ConfigError as E;
        type Case = (
            &'static [&'static str],
            &'static str,
            fn(&ConfigError) -> bool,
        );
        let cases: [Case; 13] = [
            (&["--store", "mysql://x"], "--store", |e| {
                matches!(e, E::Store(_))
            }),
            (
                &["--store", "postgres://u@h/db?sslmode=on"],
                "--store: sslmode",
                |e| matches!(e, E::Store(_)),
            ),
            (
                &[
                    "--store",
                    "postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent.pem",
                ],
                "--store: sslrootcert /nonexistent.pem: no such file",
                |e| matches!(e, E::Store(_)),
            ),
            (&["--store", "sqlite://"], "--store", |e| {
                matches!(e, E::Store(_))
            }),
            (&["--store", "postgres://u@h:notaport/db"], "--store", |e| {
                matches!(e, E::Store(_))
            }),
            (&["--pusher-url", "not a url"], "--pusher-url", |e| {
                matches!(e, E::PusherUrl(_))
            }),
            (&["--pusher-url", "ftp://host:1"], "--pusher-url", |e| {
                matches!(e, E::PusherUrl(_))
            }),
            (&["--pusher-url", "dns:///pusher"], "--pusher-url", |e| {
                matches!(e, E::PusherUrl(_))
            }),
            (
                &["--pusher-url", "http://p:1", "--pusher-tls-ca", "ca.pem"],
                "--pusher-tls",
                |e| matches!(e, E::PusherTls(_)),
            ),
            (
                &["--pusher-url", "dns:///p:1", "--pusher-tls-cert", "c.pem"],
                "--pusher-tls-ca",
                |e| matches!(e, E::PusherTls(_)),
            ),
            (&["--reconnect-initial", "1m"], "--reconnect-initial", |e| {
                matches!(e, E::BackoffOrder)
            }),
            (&["--lease-ttl", "2s"], "--lease-ttl", |e| {
                matches!(e, E::LeaseTtl)
            }),
            (&["--auth-jwt-secret", "short"], "--auth-jwt-secret", |e| {
                matches!(e, E::Auth(_))
            }),
        ];
        for (args, flag, expected) in cases {
            let error = parse(args).validate().unwrap_err();
            assert!(expected(&error), "{args:?}: {error:?}");
            assert!(error.to_string().contains(flag), "{args:?}: {error}");
        }
        assert!(Config::try_parse_from(["listen-svc", "--ack-timeout", "0s"]).is_err());
        assert!(Config::try_parse_from(["listen-svc", "--max-in-flight", "0"]).is_err());
    }

    #[test]
    fn credential_files_reload_every_30s_and_a_short_secret_file_names_its_flag() {
        let defaults = parse(&[]);
        assert_eq!(
            defaults.credentials_reload_interval,
            Duration::from_secs(30)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "too short\n").unwrap();
        let path = path.display().to_string();
        let error = parse(&["--auth-jwt-secret-file", &path])
            .validate()
            .unwrap_err();
        assert!(
            error.to_string().starts_with(&format!(
                "--auth-jwt-secret-file {path}: the secret must be at least 32 bytes (it has 9)"
            )),
            "{error}"
        );
        assert!(
            Config::try_parse_from([
                "listen-svc",
                "--auth-jwt-secret",
                "0123456789abcdef0123456789abcdef",
                "--auth-jwt-secret-file",
                &path
            ])
            .is_err(),
            "one or the other"
        );
        assert!(
            Config::try_parse_from(["listen-svc", "--credentials-reload-interval", "0s"]).is_err()
        );
    }

    #[test]
    fn compression_flags_take_algorithm_names() {
        use shared::compression::{Algorithm, Algorithms, SendCompression};
        let defaults = parse(&[]);
        assert_eq!(defaults.response_compression, Algorithms::default());
        assert_eq!(defaults.pusher_compression, SendCompression(None));
        assert_eq!(defaults.session_linger, Duration::from_secs(120));
        assert_eq!(defaults.max_page_bytes, 4_000_000);
        assert_eq!(
            parse(&["--response-compression"]).response_compression,
            Algorithms(Algorithm::ALL.to_vec()),
            "the bare flag turns on all three"
        );
        assert_eq!(
            parse(&[
                "--response-compression",
                "zstd",
                "--pusher-compression",
                "gzip"
            ])
            .pusher_compression,
            SendCompression(Some(Algorithm::Gzip))
        );
        let error = Config::try_parse_from(["listen-svc", "--pusher-compression", "brotli"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--pusher-compression") && error.contains("gzip, deflate, zstd"),
            "{error}"
        );
        assert!(Config::try_parse_from(["listen-svc", "--max-page-bytes", "10"]).is_err());
        assert_eq!(
            parse(&["--max-page-bytes", "20000000"]).page_bytes(),
            16 * 1024 * 1024,
            "a page is never larger than a message can be"
        );
        assert_eq!(
            parse(&["--response-compression", ""]).response_compression,
            Algorithms::default()
        );
        assert_eq!(
            parse(&["--response-compression", "all"]).response_compression,
            Algorithms(Algorithm::ALL.to_vec())
        );
    }
}
