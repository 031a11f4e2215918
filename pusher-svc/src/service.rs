//! `pusher.v1.Pusher`: the Connect stream listen holds open, and unary Process.
//!
//! Each Connect stream gets a read loop that never waits on processing: it admits each
//! request into [`Jobs`] and answers `Busy` when jobs are saturated. The only thing it ever
//! waits on is the stream's own outbound buffer (`stream_buffer` messages), that is, on the
//! peer reading. On shutdown every stream is told `Draining` and its read loop ends.
//!
//! Every refusal is a [`PusherError`], returned through [`reject`] (logged and counted once);
//! nothing here builds a `Status` itself.

use crate::error::{PusherError, reject};
use crate::jobs::{Admission, Jobs, Requester, StreamTx};
use crate::transcripts::Forwarder;
use shared::proto::pusher::v1::{
    Ack, Busy, Draining, Heartbeat, LinkRequest, LinkResponse, ProcessConversation, Welcome,
    link_request, link_response, pusher_server::Pusher,
};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn_span};

pub(crate) struct PusherService {
    pub jobs: Arc<Jobs>,
    pub forwarder: Arc<Forwarder>,
    pub pusher_id: String,
    pub max_concurrency: u32,
    pub stream_buffer: usize,
    pub max_segments: usize,
    /// Flips to `true` on shutdown.
    pub draining: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Pusher for PusherService {
    type ConnectStream = ReceiverStream<Result<LinkResponse, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<LinkRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        // Which certificate listen presented (mutual TLS), so a rotation can be followed.
        let client_certificate = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .and_then(|cert| shared::tls::CertificateInfo::parse(&cert).ok())
            .map(|cert| cert.to_string());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(self.stream_buffer);
        let stream = StreamLoop {
            jobs: Arc::clone(&self.jobs),
            forwarder: Arc::clone(&self.forwarder),
            tx,
            welcome: Welcome {
                pusher_id: self.pusher_id.clone(),
                max_concurrency: self.max_concurrency,
            },
            max_segments: self.max_segments,
            draining: self.draining.clone(),
            client_certificate,
        };
        tokio::spawn(
            stream
                .run(inbound)
                .instrument(info_span!("link_stream", %peer)),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn process(
        &self,
        request: Request<ProcessConversation>,
    ) -> Result<Response<Ack>, Status> {
        self.process_one(request.into_inner())
            .await
            .map(Response::new)
            .map_err(reject)
    }
}

impl PusherService {
    /// Unary Process: the same job registry as the stream, answered when the job ends.
    async fn process_one(&self, request: ProcessConversation) -> Result<Ack, PusherError> {
        validate(&request, self.max_segments)?;
        if *self.draining.borrow() {
            return Err(PusherError::Draining);
        }
        let (tx, rx) = oneshot::channel();
        let attempt = request.attempt;
        match self.jobs.submit(request, Requester::Unary { tx, attempt }) {
            Admission::Busy { retry_after } => Err(PusherError::Busy { retry_after }),
            _ => rx.await.map_err(|_| PusherError::NoResult),
        }
    }
}

/// Checks a request before it becomes a job. Names the offending field.
fn validate(request: &ProcessConversation, max_segments: usize) -> Result<(), PusherError> {
    if request.conversation_id.trim().is_empty() {
        return Err(PusherError::invalid("conversation_id", "must not be empty"));
    }
    if request.segments.len() > max_segments {
        return Err(PusherError::invalid(
            "segments",
            format!(
                "{} segments exceeds the limit of {max_segments}",
                request.segments.len()
            ),
        ));
    }
    Ok(())
}

struct StreamLoop {
    jobs: Arc<Jobs>,
    forwarder: Arc<Forwarder>,
    tx: StreamTx,
    welcome: Welcome,
    max_segments: usize,
    draining: watch::Receiver<bool>,
    /// The certificate listen presented (mutual TLS), for the log line that opens the link.
    client_certificate: Option<String>,
}

impl StreamLoop {
    async fn run(mut self, mut inbound: Streaming<LinkRequest>) {
        metrics::gauge!("pusher_streams_open").increment(1.0);
        self.serve(&mut inbound).await;
        metrics::gauge!("pusher_streams_open").decrement(1.0);
    }

    async fn serve(&mut self, inbound: &mut Streaming<LinkRequest>) {
        let mut greeted = false;
        loop {
            let message = tokio::select! {
                message = inbound.message() => message,
                _ = wait_for_drain(&mut self.draining) => {
                    info!("draining: telling listen to reconnect elsewhere");
                    self.send(link_response::Msg::Draining(Draining {})).await;
                    return;
                }
            };
            let request = match message {
                Ok(Some(LinkRequest { msg: Some(msg) })) => msg,
                Ok(Some(LinkRequest { msg: None })) => continue,
                Ok(None) => {
                    debug!("listen closed the stream");
                    return;
                }
                Err(status) => {
                    debug!(%status, "stream ended");
                    return;
                }
            };
            match request {
                link_request::Msg::Hello(hello) => {
                    info!(
                        instance_id = %hello.instance_id,
                        epoch = hello.epoch,
                        client_certificate = self.client_certificate.as_deref(),
                        "link established"
                    );
                    greeted = true;
                    self.send(link_response::Msg::Welcome(self.welcome.clone()))
                        .await;
                }
                link_request::Msg::Transcript(batch) => self.forwarder.forward(batch),
                link_request::Msg::Heartbeat(Heartbeat { seq }) => {
                    self.send(link_response::Msg::Heartbeat(Heartbeat { seq }))
                        .await;
                }
                link_request::Msg::Process(process) => {
                    if !greeted {
                        let _ = self.tx.send(Err(reject(PusherError::NotGreeted))).await;
                        return;
                    }
                    self.admit(process).await;
                }
            }
        }
    }

    async fn admit(&self, process: ProcessConversation) {
        if let Err(error) = validate(&process, self.max_segments) {
            // Listen checks requests before sending them, so this is a client bug: logged and
            // counted, and not answered (the client's ack deadline re-sends it).
            let _ = warn_span!("link_request", conversation_id = %process.conversation_id)
                .in_scope(|| reject(error));
            return;
        }
        let (id, attempt) = (process.conversation_id.clone(), process.attempt);
        if *self.draining.borrow() {
            self.send(link_response::Msg::Busy(Busy {
                conversation_id: id,
                attempt,
                retry_after_ms: 1_000,
            }))
            .await;
            return;
        }
        let requester = Requester::Stream {
            tx: self.tx.clone(),
            attempt,
        };
        if let Admission::Busy { retry_after } = self.jobs.submit(process, requester) {
            let retry_after_ms = u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX);
            self.send(link_response::Msg::Busy(Busy {
                conversation_id: id,
                attempt,
                retry_after_ms,
            }))
            .await;
        }
    }

    /// Waits only for listen to read (HTTP/2 flow control); a closed stream is ignored.
    async fn send(&self, msg: link_response::Msg) {
        let _ = self.tx.send(Ok(LinkResponse { msg: Some(msg) })).await;
    }
}

async fn wait_for_drain(draining: &mut watch::Receiver<bool>) {
    if draining.wait_for(|d| *d).await.is_err() {
        // The sender is gone only when the server is gone; nothing to wait for.
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::proto::pusher::v1::Segment;

    #[test]
    fn validate_names_the_offending_field() {
        let request = |id: &str, segments: usize| ProcessConversation {
            conversation_id: id.into(),
            segments: vec![Segment::default(); segments],
            ..Default::default()
        };
        assert_eq!(validate(&request("c1", 3), 3), Ok(()));
        for (request, message) in [
            (request(" ", 0), "conversation_id: must not be empty"),
            (
                request("c1", 4),
                "segments: 4 segments exceeds the limit of 3",
            ),
        ] {
            assert_eq!(
                validate(&request, 3).map_err(|error| error.to_string()),
                Err(message.to_string())
            );
        }
    }
}
