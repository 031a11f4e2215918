//! Harness for end-to-end tests: starts the real `listen-svc` and `pusher-svc` binaries on
//! loopback ports, waits for them through gRPC health (never by sleeping), kills them with
//! SIGKILL or SIGTERM, and restarts them on the same port and store.
//!
//! The binaries are the ones `cargo test --workspace` builds next to the test executables
//! (`target/<profile>/`); `cargo build --workspace --bins` builds them too.
//!
//! - `processes`: [`Service`] (start, stop, restart, logs, RSS), [`binary`],
//!   [`build_services`] for the demo, [`build_bench`] for the bench.
//! - `options`: how a test starts pusher ([`PusherOptions`], [`start_pusher`]) and listen
//!   ([`ListenOptions`], [`start_listen`]).
//! - `waits`: [`wait_for`] a condition with a deadline, and the waits built on it.
//! - `metrics`: [`Service::metric`] and [`sum_series`] over a scrape of /metrics.
//! - `requests`: clients, [`talk`], and the reads tests build their checks from.
//! - `session`: a live [`Session`] stream as a test drives it.
//! - [`clock`]: a shifted wall clock for one process (libfaketime).
//! - [`cpu`]: CPU per request of each process over a measured run (the bench, loadgen).
//! - [`dns`], [`fake_pusher`], [`http`], [`nats`], [`postgres`], [`proxy`]: the test doubles and
//!   servers the scenarios put around the binaries.
#![forbid(unsafe_code)]

pub mod clock;
pub mod cpu;
pub mod dns;
pub mod fake_pusher;
pub mod http;
pub mod nats;
pub mod nemesis;
pub mod otlp;
pub mod pki;
pub mod postgres;
pub mod proxy;

mod metrics;
mod options;
mod processes;
mod requests;
mod session;
mod waits;

pub use shared::proto::listen::v1 as listen;
pub use shared::proto::pusher::v1 as pusher;

pub use metrics::sum_series;
pub use options::{
    FAST_LINK, ListenOptions, PusherOptions, start_listen, start_listen_tls, start_listen_with_env,
    start_pusher, with_defaults,
};
pub use processes::{
    START_TIMEOUT, Service, binary, build_bench, build_services, free_port, set_bin_dir,
    set_log_filter, start_binary,
};
pub use requests::{
    ListenClient, PusherClient, count_listed, link_status, listen_client, pusher_client, segment,
    status_of, submit_many, submit_many_as, talk,
};
pub use session::Session;
pub use waits::{
    LinkWait, wait_all, wait_drained, wait_endpoints_connected, wait_for, wait_for_every,
    wait_link, wait_one,
};
