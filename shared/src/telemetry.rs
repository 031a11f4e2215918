//! `tracing` set-up shared by both binaries: `RUST_LOG` filters, `--log-format` picks the shape,
//! and OpenTelemetry traces are exported over OTLP when the standard environment asks for them
//! (see [`TracesConfig::from_env`]). With traces on, every log line written inside a span
//! carries that span's `trace_id` and `span_id`.
//!
//! Trace context crosses process boundaries as W3C `traceparent`/`tracestate`: from a client's
//! gRPC metadata ([`remote_parent`]), through the store and the link ([`TraceContext`]), to
//! webhook headers ([`TraceContext::headers`]).

mod context;
mod logs;

pub use context::{TraceContext, remote_parent};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// At most this long is spent exporting the last spans on exit.
pub const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// For `--help`: how traces are turned on.
pub const TRACES_HELP: &str = "Traces: OpenTelemetry over OTLP (gRPC or HTTP), off unless \
OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set or \
OTEL_TRACES_EXPORTER=otlp; OTEL_TRACES_EXPORTER=none or OTEL_SDK_DISABLED=true turn them \
off. OTEL_EXPORTER_OTLP_PROTOCOL is grpc (port 4317) or http/protobuf (port 4318, the \
default); OTEL_EXPORTER_OTLP_COMPRESSION only gzip; other values are errors. The standard OTEL_EXPORTER_OTLP_*, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, \
OTEL_TRACES_SAMPLER(_ARG) and OTEL_BSP_* variables apply (docs/observability.md).";

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Whether and how traces are exported, read from the OpenTelemetry environment variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TracesConfig {
    /// Nothing is exported and no OpenTelemetry span is built.
    Off,
    /// Spans go to an OTLP exporter; the exporter itself reads the endpoint, protocol,
    /// headers, timeout and compression variables, and the SDK the sampler, resource and
    /// batch (`OTEL_BSP_*`) ones.
    Otlp,
}

impl TracesConfig {
    /// The rule: `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn traces off;
    /// `OTEL_TRACES_EXPORTER=otlp` turns them on; otherwise they are on exactly when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set and not
    /// empty. Any other exporter name is an error naming the variable.
    pub fn from_env() -> Result<Self, String> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
    }

    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(Self::Off);
        }
        match var("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase()) {
            Some(exporter) if exporter == "none" => Ok(Self::Off),
            Some(exporter) if exporter == "otlp" => Ok(Self::Otlp),
            Some(other) => Err(format!(
                "OTEL_TRACES_EXPORTER={other} is not supported (otlp or none)"
            )),
            None if var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some() =>
            {
                Ok(Self::Otlp)
            }
            None => Ok(Self::Off),
        }
        .and_then(|config| {
            if config == Self::Otlp {
                check_exporter_values(&var)?;
            }
            Ok(config)
        })
    }
}

/// The exporter (opentelemetry-otlp 0.33) only logs a warning for a protocol or compression
/// it does not know and then exports with its default (`http/protobuf`, uncompressed): an
/// endpoint on a gRPC port with a mistyped protocol would export nowhere, silently. So a
/// value it would ignore is a configuration error here, naming the variable.
fn check_exporter_values(var: &impl Fn(&str) -> Option<String>) -> Result<(), String> {
    const KNOWN: [(&str, &[&str]); 4] = [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", &["grpc", "http/protobuf"]),
        (
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            &["grpc", "http/protobuf"],
        ),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", &["gzip"]),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", &["gzip"]),
    ];
    for (name, allowed) in KNOWN {
        if let Some(value) = var(name)
            && !allowed.contains(&value.trim())
        {
            return Err(format!(
                "{name}={value} is not supported (one of: {})",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

/// Holds the trace pipeline; [`Telemetry::shutdown`] exports what is still buffered.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn traces_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports buffered spans and stops the exporter, within [`SHUTDOWN_TIMEOUT`]: an
    /// unreachable collector does not hold up the exit.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || {
                provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
            })
            .await;
        }
    }
}

/// Installs the global subscriber, writing logs to stderr (`RUST_LOG` overrides
/// `default_filter`), and, when [`TracesConfig::from_env`] says so, an OTLP trace pipeline
/// for `service_name` (unless `OTEL_SERVICE_NAME` or `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES` names it). Call inside the tokio runtime. The error is a
/// one-line configuration problem.
pub fn init(
    format: LogFormat,
    default_filter: &str,
    service_name: &'static str,
) -> Result<Telemetry, String> {
    let provider = match TracesConfig::from_env()? {
        TracesConfig::Off => None,
        TracesConfig::Otlp => Some(provider(service_name)?),
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Each layer has its own filter: RUST_LOG chooses what is logged, never what is traced,
    // so `RUST_LOG=warn` does not silently empty the traces (and drop the trace context
    // stored with each conversation).
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("listen-pusher"))
            .with_filter(traced_spans())
    });
    let traced = provider.is_some();
    tracing_subscriber::registry()
        .with(otel)
        .with(logs::layer(format, traced).with_filter(filter))
        .init();
    Ok(Telemetry { provider })
}

/// What the trace pipeline records: this project's spans and their events, at info.
fn traced_spans() -> tracing_subscriber::filter::Targets {
    use tracing::Level;
    tracing_subscriber::filter::Targets::new()
        .with_target("listen_svc", Level::INFO)
        .with_target("pusher_svc", Level::INFO)
        .with_target("shared", Level::INFO)
}

fn provider(service_name: &'static str) -> Result<SdkTracerProvider, String> {
    // The HTTP exporter's reqwest client takes rustls' process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .build()
        .map_err(|e| format!("OTLP trace exporter: {e}"))?;
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !named_by_env {
        resource = resource.with_service_name(service_name);
    }
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build())
}

#[cfg(test)]
mod tests {
    use super::TracesConfig;

    fn config(vars: &[(&str, &str)]) -> Result<TracesConfig, String> {
        TracesConfig::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn traces_are_off_unless_an_endpoint_or_the_exporter_asks() {
        assert_eq!(config(&[]), Ok(TracesConfig::Off));
        assert_eq!(
            config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")]),
            Ok(TracesConfig::Otlp)
        );
        assert_eq!(
            config(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces"
            )]),
            Ok(TracesConfig::Otlp)
        );
        assert_eq!(
            config(&[("OTEL_TRACES_EXPORTER", "otlp")]),
            Ok(TracesConfig::Otlp)
        );
    }

    #[test]
    fn a_protocol_or_compression_the_exporter_would_ignore_is_an_error() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
        for (name, value) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ] {
            assert_eq!(config(&[endpoint, (name, value)]), Ok(TracesConfig::Otlp));
        }
        let error = config(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).unwrap_err();
        assert!(
            error.contains("OTEL_EXPORTER_OTLP_PROTOCOL=http/json"),
            "{error}"
        );
        let error =
            config(&[endpoint, ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd")]).unwrap_err();
        assert!(
            error.contains("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION=zstd"),
            "{error}"
        );
        // With traces off, the exporter's variables are not read.
        assert_eq!(
            config(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
            Ok(TracesConfig::Off)
        );
    }

    #[test]
    fn none_and_sdk_disabled_win_over_an_endpoint() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
        assert_eq!(
            config(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]),
            Ok(TracesConfig::Off)
        );
        assert_eq!(
            config(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")]),
            Ok(TracesConfig::Off)
        );
    }

    #[test]
    fn an_unsupported_exporter_is_named() {
        let error = config(&[("OTEL_TRACES_EXPORTER", "zipkin")]).unwrap_err();
        assert!(error.contains("OTEL_TRACES_EXPORTER=zipkin"), "{error}");
    }
}
