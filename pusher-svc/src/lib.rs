//! pusher-svc: processes conversations for listen-svc.
//!
//! Data flow: listen opens a Connect stream ([`service`]) and sends `ProcessConversation`
//! requests; each is admitted into the job registry ([`jobs`]), which runs it through the
//! [`processor`] (the built-in [`structurer`] or an [`llm`], then [`webhook`]s) under a
//! concurrency limit and answers with an `Ack` on every stream that asked for it. Results are
//! cached so re-sends are cheap.
//!
//! Modules, from the edge inwards (each imports only modules below it in this list):
//! - [`config`]: flags and their checks;
//! - [`service`]: `pusher.v1.Pusher`, the Connect read loops and unary Process;
//! - [`error`]: every refusal as `PusherError`, and the one place it becomes a gRPC status;
//! - [`transcripts`]: forwards live transcript batches to their webhooks;
//! - [`jobs`]: the job registry, its result cache and its counters;
//! - [`structurer`] and [`llm`]: the two `Structurer` implementations;
//! - [`processor`]: the `Processor` and `Structurer` traits, their result types, and the
//!   pipeline (structure, then [`webhook`]);
//! - [`webhook`]: signed delivery of results to integrations;
//! - [`http`]: the shared HTTP client (used by `run` to build the three above).
#![forbid(unsafe_code)]

mod config;
mod error;
mod http;
mod jobs;
mod llm;
mod processor;
mod service;
mod structurer;
mod transcripts;
mod webhook;

pub use config::Config;

use jobs::{Jobs, JobsConfig};
use shared::compression::Compressible;
use shared::grpc::health::ServingStatus;
use shared::proto::pusher::v1::{SERVICE_NAME, pusher_server::PusherServer};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

/// Serves pusher on `listener` until `shutdown` resolves, then drains: health turns
/// NOT_SERVING, every stream is told `Draining`, and running jobs get `shutdown_grace` to
/// finish and deliver their acks.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    declare_metrics();
    let pusher_id = config
        .pusher_id
        .clone()
        .unwrap_or_else(|| gethostname_or("pusher"));
    let client = http::client()?;
    let structurer: Arc<dyn processor::Structurer> = match &config.llm_url {
        Some(url) => {
            info!(%url, model = %config.llm_model, "structuring with an LLM");
            Arc::new(llm::Llm::new(
                llm::LlmConfig {
                    url: url.clone(),
                    model: config.llm_model.clone(),
                    api_key: Config::llm_api_key(),
                    timeout: config.llm_timeout,
                    max_attempts: config.llm_max_attempts,
                },
                client.clone(),
            ))
        }
        None => Arc::new(structurer::Builtin {
            simulated_latency: config.simulated_latency,
        }),
    };
    let webhooks = webhook::Webhooks::new(
        webhook::WebhookConfig {
            urls: config.webhook_urls().map_err(anyhow::Error::msg)?,
            secret: config.webhook_secret.clone(),
            timeout: config.webhook_timeout,
            max_attempts: config.webhook_max_attempts,
            concurrency: config.webhook_concurrency as usize,
        },
        client.clone(),
    );
    let processor: Arc<dyn processor::Processor> = Arc::new(processor::Pipeline {
        structurer,
        webhooks,
    });
    let forwarder = transcripts::Forwarder::new(
        config.transcript_webhooks.clone(),
        config.webhook_timeout,
        client,
    );
    let jobs = Jobs::new(
        JobsConfig {
            max_concurrency: config.max_concurrency as usize,
            max_queued: config.max_queued as usize,
            cache_size: config.result_cache_size as usize,
            cache_ttl: config.result_cache_ttl,
            progress_interval: config.progress_interval,
            busy_retry_after: config.busy_retry_after,
        },
        processor,
    );
    let (drain_tx, drain_rx) = watch::channel(false);
    let service = service::PusherService {
        jobs,
        forwarder,
        pusher_id: pusher_id.clone(),
        max_concurrency: config.max_concurrency,
        stream_buffer: 1024,
        max_segments: config.max_segments as usize,
        draining: drain_rx,
    };

    let (health_reporter, health_service) = shared::grpc::health::health_reporter();
    health_reporter
        .set_serving::<PusherServer<service::PusherService>>()
        .await;
    let (reflection_v1, reflection_v1alpha) = shared::grpc::reflection(&[SERVICE_NAME])?;
    let respond = &config.response_compression;
    let pusher = PusherServer::new(service)
        .max_decoding_message_size(config.max_message_bytes as usize)
        .max_encoding_message_size(config.max_message_bytes as usize)
        .with_compression(respond);

    let addr = listener.local_addr()?;
    info!(
        %addr,
        %pusher_id,
        max_concurrency = config.max_concurrency,
        response_compression = %config.response_compression,
        "pusher-svc serving"
    );

    let mut builder = shared::grpc::server_builder(shared::grpc::ServerLimits {
        max_concurrent_streams: config.max_concurrent_streams,
        max_local_error_reset_streams: config.max_local_error_resets as usize,
        request_timeout: config.request_timeout,
    });
    let tls = config.server_tls().map_err(anyhow::Error::msg)?;
    let mut reloader = shared::reload::Reloader::new("pusher");
    if let Some(tls) = &tls {
        info!(mutual = tls.mutual(), "gRPC port speaks TLS");
        tls.watch(&mut reloader);
    }
    let reloading = reloader.spawn(config.credentials_reload_interval);
    let router = builder
        .add_service(health_service.with_compression(respond))
        .add_service(reflection_v1.with_compression(respond))
        .add_service(reflection_v1alpha.with_compression(respond))
        .add_service(pusher);
    let grace = config.shutdown_grace;
    let drain = async move {
        shutdown.await;
        info!(?grace, "draining");
        health_reporter
            .set_not_serving::<PusherServer<service::PusherService>>()
            .await;
        health_reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        // Watchers have seen NOT_SERVING; their open calls must not hold the shutdown.
        health_reporter.end_watches();
        let _ = drain_tx.send(true);
    };
    let served = match &tls {
        Some(tls) => shared::grpc::serve_tls(router, listener, tls, drain, grace).await,
        None => shared::grpc::serve(router, listener, drain, grace).await,
    };
    reloading.abort();
    served?;
    info!("pusher-svc stopped");
    Ok(())
}

fn gethostname_or(fallback: &str) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.to_string())
}

/// The counters that alerts and the dashboard read exist at 0 from the start, rather than
/// from their first event (an absent series makes `rate()` and alert rules silent).
fn declare_metrics() {
    for result in ["succeeded", "failed"] {
        metrics::counter!("pusher_jobs_total", "result" => result).increment(0);
    }
    metrics::counter!("pusher_jobs_busy_total").increment(0);
    for result in ["delivered", "gave_up"] {
        metrics::counter!("pusher_webhook_deliveries_total", "result" => result).increment(0);
    }
}
