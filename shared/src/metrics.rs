//! Prometheus metrics, served as text on `--admin-addr` at `/metrics`.
//!
//! Two kinds of series:
//! - **Fixed ones** (`metrics::counter!` and friends), held by the `metrics` recorder. They
//!   are no-ops until [`install`] runs, so unit tests need no recorder.
//! - **Series whose label values come and go** (one per pusher endpoint, say), which the
//!   `metrics` recorder could never forget: their owner registers a [`Collector`] that
//!   renders what exists *now* at every scrape, so a departed value's series disappear
//!   (Prometheus marks them stale) instead of lingering as zeros for the life of the process.
//!   [`Count`], [`Level`] and [`Buckets`] are the atomic values such a collector renders.

use bytes::Bytes;
use http_body_util::Full;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Histogram buckets in seconds: 0.5 ms to 6 h. The short end is for ack latency and
/// Submits; the long end for queue waits and conversation durations during an outage or a
/// backlog, which would otherwise all land in `+Inf` exactly when their quantiles matter.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 21600.0,
];

/// Scrapes served at once; further connections wait in the listen backlog.
const MAX_SCRAPES: usize = 16;
/// A scrape must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed (after its request in progress, if any) once this old.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);
/// How often histogram samples are folded into their buckets between scrapes (bounds the
/// memory a histogram holds when nobody scrapes).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Renders series at scrape time; see the module docs.
pub trait Collector: Send + Sync {
    /// Appends complete metric families in Prometheus text format to `out`.
    fn collect(&self, out: &mut String);
}

/// Collectors by name; a new registration under a name replaces the old one.
type Collectors = Mutex<Vec<(&'static str, Arc<dyn Collector>)>>;

fn collectors() -> &'static Collectors {
    static COLLECTORS: OnceLock<Collectors> = OnceLock::new();
    COLLECTORS.get_or_init(Default::default)
}

/// Adds `collector`'s series to every scrape (replacing an earlier one of the same `name`).
pub fn register_collector(name: &'static str, collector: Arc<dyn Collector>) {
    let mut all = collectors().lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|(n, _)| *n != name);
    all.push((name, collector));
}

/// Installs the global recorder and serves `/metrics` on `addr`. Must run inside the tokio
/// runtime; fails (with the reason) if `addr` cannot be bound.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    let bind_error =
        |e: std::io::Error| format!("cannot serve metrics on --admin-addr {addr}: {e}");
    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(bind_error)?;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;

    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(serve(listener, handle));
    Ok(())
}

async fn serve(
    listener: tokio::net::TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let handle = handle.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&request, &handle)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            // A kept-alive connection is closed after a while (between requests), so an idle
            // or stuck client cannot hold a slot for ever.
            if tokio::time::timeout(MAX_CONNECTION_AGE, connection.as_mut())
                .await
                .is_err()
            {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(HEADER_TIMEOUT, connection).await;
            }
            drop(permit);
        });
    }
}

fn respond<B>(
    request: &hyper::Request<B>,
    handle: &metrics_exporter_prometheus::PrometheusHandle,
) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    if request.method() != hyper::Method::GET {
        return reply(405, "use GET /metrics\n".into());
    }
    if request.uri().path() != "/metrics" {
        return reply(404, "metrics are at /metrics\n".into());
    }
    reply(200, render(handle))
}

/// The recorder's series, then every collector's.
fn render(handle: &metrics_exporter_prometheus::PrometheusHandle) -> String {
    let mut out = handle.render();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let all: Vec<Arc<dyn Collector>> = collectors()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(_, c)| Arc::clone(c))
        .collect();
    for collector in all {
        collector.collect(&mut out);
    }
    out
}

/// A counter for a [`Collector`].
#[derive(Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn increment(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge for a [`Collector`].
#[derive(Default)]
pub struct Level(AtomicU64);

impl Level {
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A histogram for a [`Collector`], with the same buckets as the recorder's.
pub struct Buckets {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Buckets {
    /// Records one observation of `seconds`.
    pub fn record(&self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|&le| seconds <= le) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = (seconds.max(0.0) * 1e9) as u64;
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Writes one metric family in Prometheus text format: its `# TYPE` line and a sample per
/// series. Families with no series write nothing.
pub struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
    kind: &'static str,
    typed: bool,
}

impl<'a> Family<'a> {
    /// `kind`: "counter", "gauge" or "histogram".
    pub fn new(out: &'a mut String, name: &'static str, kind: &'static str) -> Self {
        Family {
            out,
            name,
            kind,
            typed: false,
        }
    }

    fn type_line(&mut self) {
        if !self.typed {
            let _ = writeln!(self.out, "# TYPE {} {}", self.name, self.kind);
            self.typed = true;
        }
    }

    /// One sample of a counter or gauge family.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) {
        self.type_line();
        let name = self.name;
        write_sample(self.out, name, "", labels, None, value);
    }

    /// One series of a histogram family: its cumulative buckets, sum and count.
    pub fn histogram(&mut self, labels: &[(&str, &str)], buckets: &Buckets) {
        self.type_line();
        let name = self.name;
        let mut cumulative = 0;
        for (le, count) in BUCKETS.iter().zip(&buckets.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let le = le.to_string();
            write_sample(
                self.out,
                name,
                "_bucket",
                labels,
                Some(&le),
                cumulative as f64,
            );
        }
        let count = buckets.count.load(Ordering::Relaxed);
        write_sample(
            self.out,
            name,
            "_bucket",
            labels,
            Some("+Inf"),
            count as f64,
        );
        let sum = buckets.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        write_sample(self.out, name, "_sum", labels, None, sum);
        write_sample(self.out, name, "_count", labels, None, count as f64);
    }
}

fn write_sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    le: Option<&str>,
    value: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
    for (i, (key, value)) in all.enumerate() {
        out.push(if i == 0 { '{' } else { ',' });
        out.push_str(key);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    if !labels.is_empty() || le.is_some() {
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
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
    use super::*;

    #[test]
    fn admin_addr_is_an_address_or_off() {
        assert_eq!(parse_admin_addr("off"), Ok(AdminAddr(None)));
        assert_eq!(
            parse_admin_addr("127.0.0.1:9464"),
            Ok(AdminAddr(Some("127.0.0.1:9464".parse().unwrap())))
        );
        assert!(parse_admin_addr("9464").is_err());
    }

    #[test]
    fn families_render_in_text_format_and_empty_ones_not_at_all() {
        let mut out = String::new();
        let mut family = Family::new(&mut out, "x_total", "counter");
        family.sample(&[("endpoint", "10.0.0.1:50052"), ("result", "a\"b")], 3.0);
        family.sample(&[], 1.5);
        Family::new(&mut out, "unused", "gauge");
        assert_eq!(
            out,
            "# TYPE x_total counter\n\
             x_total{endpoint=\"10.0.0.1:50052\",result=\"a\\\"b\"} 3\n\
             x_total 1.5\n"
        );
    }

    #[tokio::test]
    async fn metrics_are_at_get_metrics_with_the_collectors_series_and_nothing_else_answers() {
        use http_body_util::BodyExt;
        struct Fixed;
        impl Collector for Fixed {
            fn collect(&self, out: &mut String) {
                Family::new(out, "fixed_total", "counter").sample(&[], 7.0);
            }
        }
        register_collector("fixed", Arc::new(Fixed));
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let request = |method: &str, path: &str| {
            let request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap();
            respond(&request, &handle)
        };
        let ok = request("GET", "/metrics");
        assert_eq!(ok.status(), 200);
        let body = ok.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("# TYPE fixed_total counter\nfixed_total 7\n"),
            "{body}"
        );
        assert_eq!(request("GET", "/").status(), 404);
        assert_eq!(request("POST", "/metrics").status(), 405);
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let buckets = Buckets::default();
        for seconds in [0.0004, 0.003, 0.003, 500.0, 30_000.0] {
            buckets.record(seconds);
        }
        let mut out = String::new();
        Family::new(&mut out, "lat_seconds", "histogram").histogram(&[("e", "a")], &buckets);
        let line = |le: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("lat_seconds_bucket{{e=\"a\",le=\"{le}\"}}")))
                .unwrap_or_else(|| panic!("no bucket {le} in\n{out}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(line("0.0005"), "1");
        assert_eq!(line("0.001"), "1");
        assert_eq!(line("0.005"), "3");
        assert_eq!(line("120"), "3");
        assert_eq!(line("900"), "4");
        assert_eq!(line("21600"), "4", "30 000 s is above every finite bucket");
        assert_eq!(line("+Inf"), "5");
        assert!(out.contains("lat_seconds_count{e=\"a\"} 5\n"));
        assert!(
            out.contains("lat_seconds_sum{e=\"a\"} 30500.0064\n"),
            "{out}"
        );
    }
}
