//! Command line and environment for pusher-svc.

use shared::cli::{parse_duration, parse_positive_duration};
use shared::telemetry::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// pusher-svc turns finished conversations into structured results (title, overview, action
/// items, category) for listen-svc, which sends them over one long-lived Connect stream.
///
/// Every flag can also be set through the environment variable shown.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "pusher-svc", version, after_help = shared::telemetry::TRACES_HELP)]
pub struct Config {
    /// Address for the gRPC server (pusher.v1.Pusher, health, reflection).
    #[arg(long, env = "PUSHER_LISTEN_ADDR", default_value = "0.0.0.0:50052")]
    pub listen_addr: SocketAddr,

    /// Jobs processed at once. Further jobs wait in a queue of `--max-queued`.
    #[arg(long, env = "PUSHER_MAX_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrency: u32,

    /// Jobs that may wait for a processing slot; beyond this, requests are answered Busy
    /// (listen re-sends later without spending an attempt).
    #[arg(long, env = "PUSHER_MAX_QUEUED", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_queued: u32,

    /// Results kept to answer duplicate requests without processing again (0 disables).
    #[arg(long, env = "PUSHER_RESULT_CACHE_SIZE", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub result_cache_size: u32,

    /// How long a cached result is kept, e.g. 10m.
    #[arg(long, env = "PUSHER_RESULT_CACHE_TTL", default_value = "10m", value_parser = parse_positive_duration)]
    pub result_cache_ttl: Duration,

    /// Interval between Progress messages for a running job; keep it well under listen's
    /// --ack-timeout.
    #[arg(long, env = "PUSHER_PROGRESS_INTERVAL", default_value = "5s", value_parser = parse_positive_duration)]
    pub progress_interval: Duration,

    /// Delay suggested to listen in a Busy answer.
    #[arg(long, env = "PUSHER_BUSY_RETRY_AFTER", default_value = "1s", value_parser = parse_positive_duration)]
    pub busy_retry_after: Duration,

    /// Added to every job before structuring, to stand in for an LLM call in demos and load
    /// tests. 0s (the default) in production.
    #[arg(long, env = "PUSHER_SIMULATED_LATENCY", default_value = "0s", value_parser = parse_duration)]
    pub simulated_latency: Duration,

    /// Most segments accepted in one conversation.
    #[arg(long, env = "PUSHER_MAX_SEGMENTS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_segments: u32,

    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "PUSHER_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=256 * 1024 * 1024))]
    pub max_message_bytes: u32,

    /// On SIGTERM, time allowed for streams and running jobs to finish before exiting.
    #[arg(long, env = "PUSHER_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Name reported to listen in Welcome and in logs (default: the host name).
    #[arg(long, env = "PUSHER_ID")]
    pub pusher_id: Option<String>,

    /// Webhook told about each processed conversation (repeatable; in the environment,
    /// comma-separated).
    #[arg(long = "webhook", env = "PUSHER_WEBHOOKS", value_delimiter = ',')]
    pub webhooks: Vec<String>,

    /// File with more webhook URLs, one per line (blank lines and # comments ignored).
    #[arg(long, env = "PUSHER_WEBHOOK_FILE")]
    pub webhook_file: Option<PathBuf>,

    /// Secret for the X-Listen-Signature header: v1=hex(HMAC-SHA256(secret, "{timestamp}.{body}")).
    /// Without it, deliveries are unsigned.
    #[arg(long, env = "PUSHER_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Time allowed for one webhook attempt (and for each transcript webhook post).
    #[arg(long, env = "PUSHER_WEBHOOK_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub webhook_timeout: Duration,

    /// Attempts per webhook delivery (5xx, 408, 429 and timeouts are retried with backoff).
    #[arg(long, env = "PUSHER_WEBHOOK_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=20))]
    pub webhook_max_attempts: u32,

    /// Deliveries in progress to one webhook endpoint, at most.
    #[arg(long, env = "PUSHER_WEBHOOK_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub webhook_concurrency: u32,

    /// Webhook receiving live transcript batches as sessions stream them (repeatable;
    /// best-effort: one attempt, no retries).
    #[arg(
        long = "transcript-webhook",
        env = "PUSHER_TRANSCRIPT_WEBHOOKS",
        value_delimiter = ','
    )]
    pub transcript_webhooks: Vec<String>,

    /// Base URL of an OpenAI-compatible API (e.g. https://api.openai.com/v1) to structure
    /// conversations with an LLM instead of the built-in structurer. The API key is read from
    /// the PUSHER_LLM_API_KEY environment variable only (never a flag, so it stays out of
    /// process listings).
    #[arg(long, env = "PUSHER_LLM_URL")]
    pub llm_url: Option<String>,

    /// Model name sent to the LLM API.
    #[arg(long, env = "PUSHER_LLM_MODEL", default_value = "gpt-4o-mini")]
    pub llm_model: String,

    /// Time allowed for one LLM call.
    #[arg(long, env = "PUSHER_LLM_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub llm_timeout: Duration,

    /// Calls per conversation before the failure goes back to listen (which retries later).
    #[arg(long, env = "PUSHER_LLM_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=20))]
    pub llm_max_attempts: u32,

    /// Address for Prometheus metrics (GET /metrics), or `off`.
    #[arg(long, env = "PUSHER_ADMIN_ADDR", default_value = "0.0.0.0:9465", value_parser = shared::metrics::parse_admin_addr)]
    pub admin_addr: shared::metrics::AdminAddr,

    /// Server certificate chain (PEM). With --tls-key, the gRPC port speaks TLS only. Read
    /// again every --credentials-reload-interval: new connections get the new certificate.
    #[arg(long, env = "PUSHER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key for --tls-cert (PEM). Read again with it.
    #[arg(long, env = "PUSHER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) that must have signed every client's certificate: mutual TLS. Clients without
    /// such a certificate, and plaintext clients, are refused. Read again every
    /// --credentials-reload-interval.
    #[arg(long, env = "PUSHER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// How often the TLS files are read again. Changed files that parse (and whose key
    /// matches the certificate) are used for new connections at once, open ones are kept;
    /// files that do not are logged once and the previous ones stay in use.
    #[arg(long, env = "PUSHER_CREDENTIALS_RELOAD_INTERVAL", default_value = "30s", value_parser = parse_positive_duration)]
    pub credentials_reload_interval: Duration,

    /// HTTP/2 streams one client connection may have open at once.
    #[arg(long, env = "PUSHER_MAX_CONCURRENT_STREAMS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_streams: u32,

    /// HTTP/2 streams a client may make this server reset for its protocol errors before its
    /// connection is closed (a guard against reset floods).
    #[arg(long, env = "PUSHER_MAX_LOCAL_ERROR_RESETS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_local_error_resets: u32,

    /// Time a unary call may take before it is cancelled (streams are not cut by it).
    #[arg(long, env = "PUSHER_REQUEST_TIMEOUT", default_value = "5m", value_parser = shared::cli::parse_positive_duration)]
    pub request_timeout: Duration,

    /// Compress responses (acks on Connect, Process results) to clients that accept it:
    /// `none`, `all`, or a comma-separated list of gzip, deflate, zstd (a bare flag means all three;
    /// the client's grpc-accept-encoding order picks). Compressed requests are accepted
    /// either way (gzip, deflate, zstd).
    #[arg(long, env = "PUSHER_RESPONSE_COMPRESSION", default_value = "none",
          num_args = 0..=1, default_missing_value = "gzip,deflate,zstd",
          value_parser = shared::compression::parse_algorithms)]
    pub response_compression: shared::compression::Algorithms,

    /// Log line format (RUST_LOG sets the filter, default "info").
    #[arg(long, env = "PUSHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// Checks what clap cannot; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        self.server_tls()?;
        self.webhook_urls()?;
        for url in &self.transcript_webhooks {
            check_url("--transcript-webhook", url)?;
        }
        if let Some(url) = &self.llm_url {
            check_url("--llm-url", url)?;
            if self.llm_model.trim().is_empty() {
                return Err("--llm-model must not be empty".into());
            }
        }
        Ok(())
    }

    /// --webhook URLs plus those in --webhook-file, checked.
    pub fn webhook_urls(&self) -> Result<Vec<String>, String> {
        let mut urls = self.webhooks.clone();
        if let Some(path) = &self.webhook_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--webhook-file {}: {e}", path.display()))?;
            urls.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        for url in &urls {
            check_url("--webhook", url)?;
        }
        Ok(urls)
    }

    /// TLS for the gRPC port, if configured: the files read now, to be watched for changes.
    pub fn server_tls(&self) -> Result<Option<Arc<shared::tls::ServerTls>>, String> {
        shared::tls::ServerTls::load(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
            ["--tls-cert", "--tls-key", "--tls-client-ca"],
        )
    }

    /// The LLM API key, from the environment only.
    pub fn llm_api_key() -> Option<String> {
        std::env::var("PUSHER_LLM_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
    }
}

fn check_url(flag: &str, url: &str) -> Result<(), String> {
    match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => {
            Ok(())
        }
        Ok(_) => Err(format!(
            "{flag} {url:?}: expected an http:// or https:// URL"
        )),
        Err(e) => Err(format!("{flag} {url:?} is not a URL: {e}")),
    }
}
