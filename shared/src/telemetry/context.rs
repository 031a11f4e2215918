//! W3C trace context (`traceparent`, `tracestate`) in and out of gRPC metadata, the store, the
//! link and HTTP headers. With traces off every context is empty and nothing is carried.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// A span's W3C trace context as text, to store or send; empty strings when there is none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: String,
}

impl TraceContext {
    /// The context of `span`; empty when traces are off.
    pub fn of(span: &tracing::Span) -> Self {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
        Self {
            traceparent: carrier.remove(TRACEPARENT).unwrap_or_default(),
            tracestate: carrier.remove(TRACESTATE).unwrap_or_default(),
        }
    }

    /// Read back from storage or the wire (a missing value is empty).
    pub fn new(traceparent: Option<String>, tracestate: Option<String>) -> Self {
        Self {
            traceparent: traceparent.unwrap_or_default(),
            tracestate: tracestate.unwrap_or_default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.traceparent.is_empty()
    }

    /// Makes `span` a child of this context (a no-op when empty, invalid, or traces are off).
    pub fn continue_in(&self, span: &tracing::Span) {
        if self.is_empty() {
            return;
        }
        let carrier = HashMap::from([
            (TRACEPARENT.to_string(), self.traceparent.clone()),
            (TRACESTATE.to_string(), self.tracestate.clone()),
        ]);
        let _ = span.set_parent(TraceContextPropagator::new().extract(&carrier));
    }

    /// The HTTP headers that carry it, none when empty.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            (TRACEPARENT, &self.traceparent),
            (TRACESTATE, &self.tracestate),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| (name, value.as_str()))
    }
}

/// Makes `span` continue the caller's trace when its gRPC metadata carries a valid
/// `traceparent` (and `tracestate`); otherwise `span` stays a new root.
pub fn remote_parent(metadata: &tonic::metadata::MetadataMap, span: &tracing::Span) {
    let cx = TraceContextPropagator::new().extract(&Metadata(metadata));
    let _ = span.set_parent(cx);
}

struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        [TRACEPARENT, TRACESTATE]
            .into_iter()
            .filter(|key| self.0.contains_key(*key))
            .collect()
    }
}
