//! Metrics scraping: a service's Prometheus text from its admin port, and sums over the
//! series a query selects.

use crate::processes::Service;

impl Service {
    /// GET /metrics on the admin port (plain HTTP/1.0 over a socket).
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.admin)
            .await
            .expect("admin port");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(
            response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
            "{response}"
        );
        response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }

    /// The sum of the series `query` selects, 0 if none: `name` alone selects every series of
    /// that name, `name{a="x",b="y"}` those carrying at least these labels.
    pub async fn metric(&self, query: &str) -> f64 {
        sum_series(&self.metrics().await, query)
    }
}

/// Sums the Prometheus text-format series that `query` selects (see [`Service::metric`]).
pub fn sum_series(text: &str, query: &str) -> f64 {
    let labels_of = |s: &str| -> Vec<String> {
        s.trim_end_matches('}')
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (name, wanted) = match query.split_once('{') {
        Some((name, labels)) => (name, labels_of(labels)),
        None => (query, Vec::new()),
    };
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, labels) = match series.split_once('{') {
                Some((n, labels)) => (n, labels_of(labels)),
                None => (series, Vec::new()),
            };
            (series_name == name && wanted.iter().all(|w| labels.contains(w)))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}
