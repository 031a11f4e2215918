//! The stream I/O edge: opening a Connect stream (Hello -> Welcome), and the established
//! streams' two halves, held by epoch so the lanes only ever name a stream by its number.
//!
//! Bounds: each stream's outbound buffer holds `2 × max_in_flight + 64` messages; a full
//! buffer is reported to the caller ([`Sent::Full`]), which re-queues the send.

use super::LinkConfig;
use super::error::{Closed, Handshake, LinkError};
use shared::proto::pusher::v1::{
    Hello, LinkRequest, LinkResponse, Welcome, link_request, link_response,
    pusher_client::PusherClient,
};
use std::collections::HashMap;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt, StreamMap};
use tonic::transport::Endpoint;

/// A stream that passed the handshake.
pub(super) struct Opened {
    tx: mpsc::Sender<LinkRequest>,
    inbound: tonic::Streaming<LinkResponse>,
    pub(super) welcome: Welcome,
}

/// What a stream yields; `End` once it is over.
pub(super) enum Incoming {
    Message(LinkResponse),
    Error(tonic::Status),
    End,
}

impl Incoming {
    /// How the stream ended, given whether its pusher had said Draining; `None` for a
    /// message.
    pub(super) fn end(self, draining: bool) -> Option<StreamEnd> {
        match self {
            Incoming::Message(_) => None,
            Incoming::Error(_) | Incoming::End if draining => Some(StreamEnd::Drained),
            Incoming::Error(status) => Some(StreamEnd::Failed(Closed::Status(status).into())),
            Incoming::End => Some(StreamEnd::Failed(Closed::ByPusher.into())),
        }
    }
}

/// Why a stream ended.
pub(super) enum StreamEnd {
    Failed(LinkError),
    /// Its pusher said Draining first: not a failure.
    Drained,
}

/// What putting a message on a stream came to.
pub(super) enum Sent {
    Queued,
    /// The outbound buffer is full: try again shortly.
    Full,
    /// The stream is gone.
    Closed,
}

type InboundStream = Pin<Box<dyn Stream<Item = Incoming> + Send>>;

/// Every established stream's halves, by epoch.
#[derive(Default)]
pub(super) struct Streams {
    inbound: StreamMap<u64, InboundStream>,
    outbound: HashMap<u64, mpsc::Sender<LinkRequest>>,
}

impl Streams {
    /// Takes over an opened stream as `epoch`; returns pusher's Welcome.
    pub(super) fn insert(&mut self, epoch: u64, opened: Opened) -> Welcome {
        let inbound = opened
            .inbound
            .map(|item| match item {
                Ok(message) => Incoming::Message(message),
                Err(status) => Incoming::Error(status),
            })
            .chain(tokio_stream::once(Incoming::End));
        self.inbound.insert(epoch, Box::pin(inbound));
        self.outbound.insert(epoch, opened.tx);
        opened.welcome
    }

    /// Drops stream `epoch`'s halves, which ends it.
    pub(super) fn remove(&mut self, epoch: u64) {
        self.inbound.remove(&epoch);
        self.outbound.remove(&epoch);
    }

    /// Drops every stream.
    pub(super) fn clear(&mut self) {
        *self = Streams::default();
    }

    pub(super) fn is_empty(&self) -> bool {
        self.inbound.is_empty()
    }

    /// The next message (or end) from any stream. Pending forever when there is none.
    pub(super) async fn next(&mut self) -> Option<(u64, Incoming)> {
        self.inbound.next().await
    }

    /// Puts `msg` on stream `epoch` without waiting.
    pub(super) fn send(&self, epoch: u64, msg: link_request::Msg) -> Sent {
        let Some(tx) = self.outbound.get(&epoch) else {
            return Sent::Closed;
        };
        match tx.try_send(LinkRequest { msg: Some(msg) }) {
            Ok(()) => Sent::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => Sent::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => Sent::Closed,
        }
    }
}

/// Opens a Connect stream to `uri` and completes the Hello/Welcome handshake.
pub(super) async fn open_stream(
    config: &LinkConfig,
    uri: &str,
    epoch: u64,
) -> Result<Opened, LinkError> {
    let invalid_url = |e: &dyn std::error::Error| LinkError::InvalidUrl {
        uri: uri.to_string(),
        detail: e.to_string(),
    };
    // With TLS, the connector does TCP and TLS itself (taking the credentials in use now),
    // and tonic refuses an https:// URI with a connector of its own: the endpoint gets the
    // http:// form and the requests keep the https:// origin.
    let endpoint_uri = match &config.tls {
        Some(_) => uri.replacen("https://", "http://", 1),
        None => uri.to_string(),
    };
    let endpoint = Endpoint::from_shared(endpoint_uri)
        .map_err(|e| invalid_url(&e))?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true);
    let connected = match &config.tls {
        Some(tls) => {
            let origin = uri.parse().map_err(|e| LinkError::Tls {
                uri: uri.to_string(),
                detail: format!("origin: {e}"),
            })?;
            endpoint
                .origin(origin)
                .connect_with_connector(tls.connector())
                .await
        }
        None => endpoint.connect().await,
    };
    let channel = connected.map_err(|e| LinkError::Connect {
        uri: uri.to_string(),
        detail: error_chain(&e),
    })?;
    let mut client = PusherClient::new(channel)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    for algorithm in shared::compression::Algorithm::ALL {
        client = client.accept_compressed(algorithm.encoding());
    }
    if let Some(algorithm) = config.compression.0 {
        client = client.send_compressed(algorithm.encoding());
    }

    let (tx, rx) = mpsc::channel(config.max_in_flight * 2 + 64);
    let hello = Hello {
        instance_id: config.instance_id.clone(),
        epoch,
        max_in_flight: config.max_in_flight as u32,
    };
    tx.try_send(LinkRequest {
        msg: Some(link_request::Msg::Hello(hello)),
    })
    .map_err(|_| Handshake::NoBuffer)?;
    let handshake = async {
        let mut inbound = client
            .connect(ReceiverStream::new(rx))
            .await
            .map_err(LinkError::Rejected)?
            .into_inner();
        let answer = match inbound.message().await {
            Ok(Some(LinkResponse {
                msg: Some(link_response::Msg::Welcome(welcome)),
            })) => Ok((inbound, welcome)),
            Ok(Some(other)) => Err(Handshake::Unexpected(Box::new(other))),
            Ok(None) => Err(Handshake::Closed),
            Err(status) => Err(Handshake::Status(status)),
        };
        Ok::<_, LinkError>(answer?)
    };
    let (inbound, welcome) = tokio::time::timeout(config.connect_timeout, handshake)
        .await
        .map_err(|_| Handshake::Timeout(config.connect_timeout))??;
    Ok(Opened {
        tx,
        inbound,
        welcome,
    })
}

/// "a: b: c" from an error and its sources (tonic's transport errors say little on top). A
/// source that only repeats the error wrapping it (as tonic's connect errors do) is skipped.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if said != last {
            text.push_str(": ");
            text.push_str(&said);
        }
        last = said;
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chains_do_not_repeat_a_cause() {
        #[derive(Debug)]
        struct Layer(&'static str, Option<Box<Layer>>);
        impl std::fmt::Display for Layer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Layer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|l| l as _)
            }
        }
        let inner = Layer("certificate expired", None);
        let wrapped = Layer("certificate expired", Some(Box::new(inner)));
        let error = Layer("transport error", Some(Box::new(wrapped)));
        assert_eq!(
            super::error_chain(&error),
            "transport error: certificate expired"
        );
    }
}
