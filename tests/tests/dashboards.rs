//! The Grafana dashboard and the Prometheus rules in deploy/ read only metrics the services
//! export: both real binaries (mutual TLS on the link, so the certificate gauges exist; a
//! webhook; one conversation through to COMPLETED) are scraped and every `listen_*` and
//! `pusher_*` name the files mention must be in a scrape.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};
use tests::http::{Receiver, Reply};
use tests::listen::ConversationStatus;
use tests::pki::{Pki, mtls_listen};
use tests::*;

const SETTLE: Duration = Duration::from_secs(30);

/// The files whose metric names are checked, relative to the workspace.
const FILES: &[&str] = &[
    "deploy/grafana/listen-pusher.json",
    "deploy/prometheus/rules.yml",
    "deploy/k8s/base/prometheusrule.yaml",
];

/// Every word of `text` that starts with `listen_` or `pusher_` (metric names; the files use
/// no such label or variable names).
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .filter(|word| word.starts_with("listen_") || word.starts_with("pusher_"))
        .map(str::to_string)
        .collect()
}

/// Names in a Prometheus text scrape: families (`# TYPE` lines) and series (`x_bucket`, ...).
fn exported(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(typed) => typed.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        })
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn names_are_read_from_expressions_and_scrapes() {
    assert_eq!(
        metric_names(r#"sum by (le) (rate(listen_x_seconds_bucket{a="b"}[5m])) / pusher_y"#),
        BTreeSet::from(["listen_x_seconds_bucket".into(), "pusher_y".into()])
    );
    assert_eq!(
        exported("# TYPE listen_h histogram\nlisten_h_bucket{le=\"1\"} 0\nlisten_g 1\n"),
        BTreeSet::from([
            "listen_h".into(),
            "listen_h_bucket".into(),
            "listen_g".into()
        ])
    );
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_rules_use_is_exported() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut used = BTreeSet::new();
    for file in FILES {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{file} names no metric");
        used.extend(names);
    }

    let pki = Pki::new();
    let hook = Receiver::start(vec![Reply::Status(200)]).await;
    let mut flags = pki.pusher_flags();
    flags.extend(["--webhook".to_string(), hook.url("/events")]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let pusher = start_pusher(
        PusherOptions::port(free_port())
            .args(&flags)
            .tls(pki.harness_client()),
    )
    .await;
    let listen = mtls_listen(&pki, &format!("https://localhost:{}", pusher.addr.port())).await;
    let client = listen_client(&listen);
    let id = client
        .clone()
        .submit_conversation(talk("metrics", "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    wait_one(&client, &id, ConversationStatus::Completed, SETTLE).await;

    // Gauges are set on their own schedules (link status, the store census): poll until
    // every name is there or the deadline passes, then name what is missing.
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut scraped = exported(&listen.metrics().await);
        scraped.extend(exported(&pusher.metrics().await));
        let missing: Vec<&String> = used.difference(&scraped).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics used in {FILES:?} but exported by neither service: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
