//! Health, reflection and the server set-up every server of ours shares.
//!
//! - [`health`]: `grpc.health.v1.Health`, whose Watch follows the protocol on unknown names.
//! - [`reflection`]: `grpc.reflection.v1` and `v1alpha`, answering unknown names inside the
//!   stream and sending files with their imports.
//!
//! Both replace tonic-health's and tonic-reflection's services, which deviate from the gRPC
//! protocols there; each module says how.

pub mod health;
pub mod reflection;

/// Services every server lists besides its own: health and reflection.
const COMMON_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Reflection services (v1, and v1alpha for grpcurl 1.8 and grpcio) that list only
/// `services` plus health and reflection, and describe our protos, health and reflection
/// (with the files they import).
pub fn reflection(services: &[&str]) -> Result<reflection::Servers, reflection::Error> {
    let listed: Vec<&str> = services.iter().copied().chain(COMMON_SERVICES).collect();
    reflection::servers(
        &listed,
        &[
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ],
    )
}

/// Limits applied to every server of ours. tonic leaves several of them unlimited by default.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 streams a peer may make us reset for its errors before the connection is closed
    /// (tonic otherwise passes no limit).
    pub max_local_error_reset_streams: usize,
    /// Time a handler has to produce its response (unary calls; streaming handlers answer at
    /// once and are not cut by it). Clients may ask for less with grpc-timeout.
    pub request_timeout: std::time::Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_concurrent_streams: 1024,
            max_local_error_reset_streams: 1024,
            request_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// A tonic server builder with our limits and keepalive applied.
pub fn server_builder(limits: ServerLimits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .timeout(limits.request_timeout)
        .http2_max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
        // Detects dead peers on long-lived streams from the server side too.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and lets
/// open connections finish for at most `grace` before dropping them.
///
/// The bound matters: tonic's graceful shutdown waits for every connection to close, and an
/// idle client connection can keep it waiting indefinitely (hyperium/hyper#4170). Whatever
/// must happen before connections are closed (health NOT_SERVING, telling streams to
/// drain) belongs inside `shutdown`.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: std::time::Duration,
) -> Result<(), tonic::transport::Error> {
    serve_incoming(router, tcp_incoming(listener), shutdown, grace).await
}

/// [`serve`] speaking TLS with `tls`, whose credentials may be replaced while it serves
/// (each handshake takes those in use at that moment).
pub async fn serve_tls(
    router: tonic::transport::server::Router,
    listener: tokio::net::TcpListener,
    tls: &std::sync::Arc<crate::tls::ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: std::time::Duration,
) -> Result<(), tonic::transport::Error> {
    serve_incoming(
        router,
        tls.incoming(tcp_incoming(listener)),
        shutdown,
        grace,
    )
    .await
}

/// Accepted sockets with our options. The builder's tcp_nodelay/tcp_keepalive do not apply
/// to an incoming stream we hand over, so they are set here (without nodelay, small
/// responses wait on Nagle + delayed ACK: ~40 ms).
fn tcp_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)))
}

async fn serve_incoming<I, IO>(
    router: tonic::transport::server::Router,
    incoming: I,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: std::time::Duration,
) -> Result<(), tonic::transport::Error>
where
    I: tokio_stream::Stream<Item = std::io::Result<IO>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
{
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));
    tokio::select! {
        result = &mut server => return joined(result),
        () = shutdown => {}
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => joined(result),
        Err(_) => {
            tracing::warn!(
                ?grace,
                "connections still open after the shutdown grace; closing them"
            );
            server.abort();
            Ok(())
        }
    }
}

fn joined(
    result: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), tonic::transport::Error> {
    match result {
        Ok(result) => result,
        // The server task only ends by returning; a panic inside it is re-raised here.
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

/// A real server on 127.0.0.1:0 for tests, stopped when dropped.
#[cfg(test)]
pub(crate) struct Loopback {
    pub(crate) channel: tonic::transport::Channel,
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[cfg(test)]
impl Loopback {
    pub(crate) async fn serve(router: tonic::transport::server::Router) -> Loopback {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shutdown = async {
            let _ = stopped.await;
        };
        tokio::spawn(serve(
            router,
            listener,
            shutdown,
            std::time::Duration::from_secs(1),
        ));
        // The listener is bound, so connecting does not race the server task.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Loopback {
            channel,
            _stop: stop,
        }
    }
}
