//! The HTTP client (one connection pool) that the LLM structurer, webhooks and transcript
//! webhooks share. A leaf: it imports no other module of the crate.

/// Builds the client. TLS is rustls with ring (installed here once), so no C/cmake build of
/// aws-lc-rs is needed.
pub(crate) fn client() -> reqwest::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("pusher-svc/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(5))
        .build()
}
