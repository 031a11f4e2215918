//! Why a lane's stream failed or never opened: one variant per cause, each with the text
//! `last_error` shows, and a [`Reason`] for the `reason` label of
//! `listen_link_failures_total` (a fixed set, so the label's cardinality is bounded).

use shared::proto::pusher::v1::LinkResponse;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    /// The endpoint's URL is not one tonic can connect to.
    #[error("invalid pusher url {uri}: {detail}")]
    InvalidUrl { uri: String, detail: String },
    /// The TLS endpoint could not be set up.
    #[error("TLS configuration for {uri}: {detail}")]
    Tls { uri: String, detail: String },
    /// No connection (refused, unreachable, TLS handshake failed, timed out).
    #[error("cannot connect to pusher at {uri}: {detail}")]
    Connect { uri: String, detail: String },
    /// Connected, but pusher answered the Connect call with an error status.
    #[error("pusher refused the stream: {0}")]
    Rejected(tonic::Status),
    /// The stream opened but Hello was not answered by Welcome.
    #[error(transparent)]
    Handshake(#[from] Handshake),
    /// An established stream ended without a Draining first.
    #[error(transparent)]
    StreamClosed(#[from] Closed),
    /// Nothing heard from pusher within keepalive interval + timeout (heartbeats included).
    #[error("no message from pusher for {0:?}")]
    Silent(Duration),
    /// Looking up a `dns:` target failed or found no address.
    #[error("{0}")]
    Resolve(String),
}

/// How the Hello/Welcome handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Handshake {
    #[error("stream buffer unavailable")]
    NoBuffer,
    #[error("no welcome from pusher within {0:?}")]
    Timeout(Duration),
    #[error("pusher answered hello with {0:?}, not welcome")]
    Unexpected(Box<LinkResponse>),
    #[error("pusher closed the stream during the handshake")]
    Closed,
    #[error("handshake failed: {0}")]
    Status(tonic::Status),
}

/// How an established stream ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Closed {
    /// The inbound half ended with an error status.
    #[error("stream error: {0}")]
    Status(tonic::Status),
    /// The inbound half ended cleanly.
    #[error("pusher closed the stream")]
    ByPusher,
    /// The outbound half was closed when a message was put on it.
    #[error("stream closed")]
    Outbound,
}

/// The `reason` label of `listen_link_failures_total`: [`LinkError`]'s variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    InvalidUrl,
    Tls,
    Connect,
    Rejected,
    Handshake,
    StreamClosed,
    Silent,
    Resolve,
}

impl Reason {
    /// Every value, in label order.
    pub(crate) const ALL: [Reason; 8] = [
        Reason::InvalidUrl,
        Reason::Tls,
        Reason::Connect,
        Reason::Rejected,
        Reason::Handshake,
        Reason::StreamClosed,
        Reason::Silent,
        Reason::Resolve,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidUrl => "invalid_url",
            Reason::Tls => "tls",
            Reason::Connect => "connect",
            Reason::Rejected => "rejected",
            Reason::Handshake => "handshake",
            Reason::StreamClosed => "stream_closed",
            Reason::Silent => "silent",
            Reason::Resolve => "resolve",
        }
    }
}

impl LinkError {
    pub(crate) fn reason(&self) -> Reason {
        match self {
            LinkError::InvalidUrl { .. } => Reason::InvalidUrl,
            LinkError::Tls { .. } => Reason::Tls,
            LinkError::Connect { .. } => Reason::Connect,
            LinkError::Rejected(_) => Reason::Rejected,
            LinkError::Handshake(_) => Reason::Handshake,
            LinkError::StreamClosed(_) => Reason::StreamClosed,
            LinkError::Silent(_) => Reason::Silent,
            LinkError::Resolve(_) => Reason::Resolve,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `last_error` keeps the texts it had as plain strings (tests and operators grep them).
    #[test]
    fn display_keeps_the_texts_and_reasons_are_snake_case() {
        let uri = "http://10.0.0.1:50052".to_string();
        let cases = [
            (
                LinkError::Connect {
                    uri: uri.clone(),
                    detail: "transport error: refused".into(),
                },
                "cannot connect to pusher at http://10.0.0.1:50052: transport error: refused",
                "connect",
            ),
            (
                Handshake::Timeout(Duration::from_secs(1)).into(),
                "no welcome from pusher within 1s",
                "handshake",
            ),
            (
                Handshake::Closed.into(),
                "pusher closed the stream during the handshake",
                "handshake",
            ),
            (
                Closed::ByPusher.into(),
                "pusher closed the stream",
                "stream_closed",
            ),
            (Closed::Outbound.into(), "stream closed", "stream_closed"),
            (
                LinkError::Silent(Duration::from_secs(2)),
                "no message from pusher for 2s",
                "silent",
            ),
            (
                LinkError::Resolve("pusher.test resolved to no addresses".into()),
                "pusher.test resolved to no addresses",
                "resolve",
            ),
            (
                LinkError::InvalidUrl {
                    uri: "x".into(),
                    detail: "bad".into(),
                },
                "invalid pusher url x: bad",
                "invalid_url",
            ),
        ];
        for (error, text, reason) in cases {
            assert_eq!(error.to_string(), text);
            assert_eq!(error.reason().as_str(), reason);
        }
        assert!(
            LinkError::Rejected(tonic::Status::unavailable("full"))
                .to_string()
                .starts_with("pusher refused the stream: ")
        );
        let labels: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "invalid_url",
                "tls",
                "connect",
                "rejected",
                "handshake",
                "stream_closed",
                "silent",
                "resolve"
            ]
        );
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "ALL is in declaration order");
        }
    }
}
