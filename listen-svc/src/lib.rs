//! listen-svc: durable conversation ingest, linked to pusher-svc by one bidi gRPC stream.
//!
//! Data flow: a client calls [`api`] (`listen.v1.Listen`); a submitted conversation is
//! committed to the [`store`] as PROCESSING, then the [`link`] is woken. The link task claims
//! queued rows (as many as its pending map has room for), sends them to pusher over the
//! Connect stream, and writes each Ack's outcome back to the store. Pusher being slow,
//! saturated or gone never reaches the request path: work waits in the store.
//!
//! Modules, from the edge inwards (each imports only modules below it in this list):
//! - [`config`]: flags, checked into the settings of each part (`ConfigError` names the flag);
//! - `api`: the unary `listen.v1.Listen` calls; `session`: live `Session` streams and the
//!   registry that bounds them and routes outcomes; `auth`: bearer tokens; `sweeper`: finishes
//!   sessions' conversations at their deadline; `census`: counts the store by status for the
//!   metrics;
//! - `link`: the owner task of the streams to pusher (state machine, pending windows, lanes);
//! - `validate` (request limits and checks) and `wire` (stored types <-> protobuf): pure;
//! - `error`: every refusal as `ApiError`, and the one place it becomes a gRPC status;
//! - `store`: the `ConversationStore` trait, SQLite and PostgreSQL.
#![forbid(unsafe_code)]

mod api;
mod auth;
mod census;
mod config;
mod error;
#[cfg(test)]
mod fuzz;
mod link;
mod session;
mod store;
mod sweeper;
mod validate;
mod wire;

pub use config::{Config, ConfigError, StoreLocation};

use shared::compression::Compressible;
use shared::grpc::health::ServingStatus;
use shared::proto::listen::v1::{LINK_HEALTH_NAME, SERVICE_NAME, listen_server::ListenServer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use store::{ConversationStore, PostgresStore, SqliteStore};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// Serves listen on `listener` until `shutdown` resolves: opens the store, starts the link,
/// and on shutdown stops accepting, stops the link (releasing its leases) and returns.
/// `config` must have passed [`Config::validate`].
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    declare_metrics();
    let store: Arc<dyn ConversationStore> = match config.store_location()? {
        StoreLocation::Sqlite(path) => {
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path)).await??;
            Arc::new(store)
        }
        StoreLocation::Postgres(url) => Arc::new(PostgresStore::open(&url).await?),
    };
    let instance_id = config.instance_id();

    let (health_reporter, health_service) = shared::grpc::health::health_reporter();
    health_reporter
        .set_serving::<ListenServer<api::ListenService>>()
        .await;
    health_reporter
        .set_service_status(LINK_HEALTH_NAME, ServingStatus::NotServing)
        .await;

    let (stop_link, link_shutdown) = watch::channel(false);
    let link_config = config.link_config(instance_id.clone())?;
    // Every credential file is read again while listen runs (shared::reload).
    let mut reloader = shared::reload::Reloader::new("listen");
    if let Some(tls) = &link_config.tls {
        tls.watch(&mut reloader);
    }
    let sessions = session::Sessions::new(
        config.max_sessions as usize,
        config.max_sessions_per_uid as usize,
    );
    let on_settled: link::SettledHook = {
        let sessions = Arc::clone(&sessions);
        Arc::new(move |id: &str| sessions.settled(id))
    };
    let (link, link_task) = link::spawn(
        link_config,
        Arc::clone(&store),
        health_reporter.clone(),
        on_settled,
        link_shutdown.clone(),
    );
    // Sessions end themselves on shutdown (tonic would otherwise wait on their streams).
    let (stop_sessions, sessions_shutdown) = watch::channel(false);
    let census = tokio::spawn(census::run(Arc::clone(&store), link_shutdown.clone()));
    let sweeper = tokio::spawn(sweeper::run(
        Arc::clone(&store),
        link.clone(),
        config.sweep_interval,
        link_shutdown,
    ));

    let limits = config.limits();
    let service = api::ListenService {
        store: Arc::clone(&store),
        link: link.clone(),
        limits,
        pusher_url: config.pusher_url.clone(),
        max_in_flight: config.max_in_flight as usize,
        max_page_bytes: config.page_bytes(),
        sessions: session::Context {
            store,
            link,
            sessions,
            limits,
            min_timeout: config.min_conversation_timeout,
            linger: config.session_linger,
            shutdown: sessions_shutdown,
            queue_bounds: config.queue_bounds(),
            queue_retry_after: config.queue_retry_after,
        },
        queue_bounds: config.queue_bounds(),
        queue_retry_after: config.queue_retry_after,
    };
    let (reflection_v1, reflection_v1alpha) = shared::grpc::reflection(&[SERVICE_NAME])?;
    let authenticator = config.authenticator()?.map(Arc::new);
    if let Some(authenticator) = &authenticator {
        authenticator.watch(&mut reloader);
    }
    // Only the Listen service is behind the interceptor: health and reflection stay open.
    let authenticate = move |mut request: tonic::Request<()>| {
        let caller = match &authenticator {
            None => auth::Caller::Anyone,
            Some(authenticator) => authenticator
                .authenticate(
                    request
                        .metadata()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok()),
                )
                .map_err(error::reject)?,
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    };
    let listen = tonic::service::interceptor::InterceptedService::new(
        ListenServer::new(service)
            .max_decoding_message_size(config.max_message_bytes as usize)
            .max_encoding_message_size(config.max_message_bytes as usize)
            .with_compression(&config.response_compression),
        authenticate,
    );

    let addr = listener.local_addr()?;
    info!(
        %addr,
        %instance_id,
        pusher_url = %config.pusher_url,
        store = %redact(&config.store),
        response_compression = %config.response_compression,
        pusher_compression = config.pusher_compression.0.map_or("none", |a| a.name()),
        "listen-svc serving"
    );
    let mut builder = shared::grpc::server_builder(shared::grpc::ServerLimits {
        max_concurrent_streams: config.max_concurrent_streams,
        max_local_error_reset_streams: config.max_local_error_resets as usize,
        request_timeout: config.request_timeout,
    });
    let tls = config.server_tls()?;
    if let Some(tls) = &tls {
        tls.watch(&mut reloader);
    }
    let reloading = reloader.spawn(config.credentials_reload_interval);
    let respond = &config.response_compression;
    let router = builder
        .add_service(health_service.with_compression(respond))
        .add_service(reflection_v1.with_compression(respond))
        .add_service(reflection_v1alpha.with_compression(respond))
        .add_service(listen);
    let reporter = health_reporter.clone();
    let stopping = async move {
        shutdown.await;
        reporter
            .set_not_serving::<ListenServer<api::ListenService>>()
            .await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        // Watchers have seen NOT_SERVING; their open calls must not hold the shutdown.
        reporter.end_watches();
        let _ = stop_sessions.send(true);
    };
    let grace = config.shutdown_grace;
    let served = match &tls {
        Some(tls) => shared::grpc::serve_tls(router, listener, tls, stopping, grace).await,
        None => shared::grpc::serve(router, listener, stopping, grace).await,
    };
    reloading.abort();
    served?;

    let _ = stop_link.send(true);
    let _ = sweeper.await;
    let _ = census.await;
    if tokio::time::timeout(Duration::from_secs(10), link_task)
        .await
        .is_err()
    {
        warn!("link did not stop within 10s");
    }
    info!("listen-svc stopped");
    Ok(())
}

/// The store URL with any password replaced, for logs: in the user information, and in a
/// `password` parameter (libpq takes it there too).
fn redact(url: &str) -> String {
    let url = redact_userinfo(url);
    let Some((base, query)) = url.split_once('?') else {
        return url;
    };
    let query: Vec<&str> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("password", _)) => "password=***",
            _ => pair,
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The counters that alerts and the dashboard read exist at 0 from the start, rather than
/// from their first event (an absent series makes `rate()` and alert rules silent).
fn declare_metrics() {
    for status in ["processing", "completed", "failed", "discarded"] {
        metrics::counter!("listen_conversations_total", "status" => status).increment(0);
    }
    for kind in ["unavailable", "corrupt"] {
        metrics::counter!("listen_store_errors_total", "kind" => kind).increment(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted_from_store_urls() {
        assert_eq!(
            super::redact("postgres://listen:s3cret@db:5432/listen"),
            "postgres://listen:***@db:5432/listen"
        );
        assert_eq!(
            super::redact("postgres://listen@db/listen"),
            "postgres://listen@db/listen"
        );
        assert_eq!(
            super::redact("sqlite://./data/listen.db"),
            "sqlite://./data/listen.db"
        );
        assert_eq!(
            super::redact(
                "postgres://listen:s3cret@db/listen?sslmode=verify-full&sslrootcert=/ca.pem"
            ),
            "postgres://listen:***@db/listen?sslmode=verify-full&sslrootcert=/ca.pem"
        );
        assert_eq!(
            super::redact("postgres://listen@db/listen?password=s3cret&sslmode=require"),
            "postgres://listen@db/listen?password=***&sslmode=require"
        );
    }
}
