//! Shared by listen-svc and pusher-svc.
//!
//! - [`proto`]: the generated wire contract (`listen.v1`, `pusher.v1`) and its descriptor set.
//! - [`grpc`]: health and reflection as the gRPC protocols describe them, each server's
//!   limits, and serving with a bounded shutdown.
//! - [`compression`]: the request encodings every server accepts, and response compression.
//! - [`backoff`]: the jittered exponential backoff policy used for reconnects and retries.
//! - [`telemetry`]: `tracing` set-up (text or JSON).
//! - [`metrics`]: the Prometheus `/metrics` listener on `--admin-addr`.
//! - [`shutdown`]: the SIGTERM/SIGINT future handed to each service's `run()`.
//! - [`tls`]: server and client TLS from PEM files (mutual TLS between listen and pusher), read
//!   again while running.
//! - [`reload`]: credential files polled for changes and swapped in without a restart.
//! - [`cli`]: parsing helpers for flags and the exit code for bad configuration.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod cli;
pub mod compression;
pub mod grpc;
pub mod metrics;
pub mod proto;
pub mod reload;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
