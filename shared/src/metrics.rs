//! Prometheus metrics, served as text on `--admin-addr` at `/metrics`.
//!
//! Metric calls (`metrics::counter!` and friends) are no-ops until [`install`] runs, so unit
//! tests need no recorder.

use std::net::SocketAddr;

/// Histogram buckets in seconds: 0.5 ms to 2 min (ack latency, processing duration).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// Starts the `/metrics` HTTP listener on `addr` and installs the global recorder. Must run
/// inside the tokio runtime; fails (with the reason) if `addr` cannot be bound.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(BUCKETS)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("cannot serve metrics on --admin-addr {addr}: {e}"))
}

/// `--admin-addr`: where to serve metrics, if anywhere. (A newtype, not an `Option`, so clap
/// does not read it as "flag may be absent".)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminAddr(pub Option<SocketAddr>);

/// Parses `--admin-addr`: `host:port`, or `off` for no metrics listener.
pub fn parse_admin_addr(value: &str) -> Result<AdminAddr, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(AdminAddr(None));
    }
    value
        .parse()
        .map(|a| AdminAddr(Some(a)))
        .map_err(|e| format!("{e} (expected host:port, or off)"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn admin_addr_is_an_address_or_off() {
        assert_eq!(super::parse_admin_addr("off"), Ok(super::AdminAddr(None)));
        assert_eq!(
            super::parse_admin_addr("127.0.0.1:9464"),
            Ok(super::AdminAddr(Some("127.0.0.1:9464".parse().unwrap())))
        );
        assert!(super::parse_admin_addr("9464").is_err());
    }
}
