//! Command line and environment for pusher-svc.

use shared::cli::{parse_duration, parse_positive_duration};
use shared::telemetry::LogFormat;
use std::net::SocketAddr;
use std::time::Duration;

/// pusher-svc turns finished conversations into structured results (title, overview, action
/// items, category) for listen-svc, which sends them over one long-lived Connect stream.
///
/// Every flag can also be set through the environment variable shown.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "pusher-svc", version)]
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

    /// Log line format (RUST_LOG sets the filter, default "info").
    #[arg(long, env = "PUSHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
