//! Optional OpenTelemetry trace export of `twopc serve` (`--otlp-endpoint`).
//!
//! Off by default. When an endpoint is configured, [`layer`] builds a
//! `tracing-opentelemetry` layer that turns the coordinator's `tracing` spans (`enlist`,
//! `commit`, `abort`, `resolve`, each with a `tx_id` field, and the events logged inside
//! them) into OpenTelemetry spans, and an OTLP/gRPC exporter (tonic) that sends them to a
//! collector with `service.name` = `--otlp-service-name`. The stderr log is a separate
//! layer with its own filter and is unchanged by any of this.
//!
//! **Never in the way of transactions.** Finished spans go into a bounded queue
//! ([`MAX_QUEUE_SIZE`]) drained by the SDK's batch span processor on a thread of its own;
//! when the queue is full, spans are dropped, never waited for. The exporter's gRPC
//! connection is made lazily on the tokio runtime and every export is bounded by
//! [`EXPORT_TIMEOUT`], so an unreachable or slow collector costs dropped spans and a
//! logged error, not latency. Exporter errors are logged by the SDK (targets
//! `opentelemetry_sdk` and `opentelemetry_otlp`) on stderr; they are never fatal.
//!
//! **Shutdown.** [`OtelGuard::shutdown`] flushes the queue and stops the processor,
//! waiting at most [`SHUTDOWN_TIMEOUT`]; `main` calls it after the server has stopped
//! (SIGTERM, Ctrl-C or an error), so the last transactions' spans are not lost.
//!
//! What is exported is chosen by [`export_filter`]: spans and events at `INFO` and above
//! of the `twopc` crates, never those of the gRPC, HTTP/2 or OpenTelemetry libraries
//! themselves (the exporter's own traffic must not produce more spans to export).

use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{SpanExporter, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use tonic::transport::ClientTlsConfig;
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::filter::{Filtered, LevelFilter, Targets};
use tracing_subscriber::{Layer, Registry};

/// Most finished spans waiting for export; past it new spans are dropped.
pub const MAX_QUEUE_SIZE: usize = 4096;
/// Most spans in one export request.
pub const MAX_EXPORT_BATCH_SIZE: usize = 512;
/// How often queued spans are exported.
pub const SCHEDULED_DELAY: Duration = Duration::from_secs(2);
/// Bound on one export request to the collector.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the final flush at exit.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The export layer as installed on the [`Registry`]: OpenTelemetry behind
/// [`export_filter`].
pub type OtelLayer = Filtered<OpenTelemetryLayer<Registry, SdkTracer>, Targets, Registry>;

/// Keeps the tracer provider; [`shutdown`](Self::shutdown) flushes it.
#[derive(Debug)]
pub struct OtelGuard {
    provider: SdkTracerProvider,
    endpoint: String,
}

/// The spans and events that are exported: `INFO` and above of the `twopc` crates.
pub fn export_filter() -> Targets {
    Targets::new()
        .with_target("twopc", LevelFilter::INFO)
        .with_target("twopc_coordinator", LevelFilter::INFO)
}

/// Builds the exporter, the batch processor and the tracing layer for `endpoint`
/// (an `http://` or `https://` URL, already validated by the configuration). An
/// `https://` collector's certificate is checked against the system's CA certificates.
///
/// Must be called inside the tokio runtime that will drive the exporter's connection
/// (the connection itself is only attempted at the first export, so an unreachable
/// collector does not fail this).
pub fn layer(endpoint: &str, service_name: &str) -> anyhow::Result<(OtelLayer, OtelGuard)> {
    let mut builder = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT);
    if endpoint.starts_with("https://") {
        builder = builder.with_tls_config(ClientTlsConfig::new().with_native_roots());
    }
    let exporter = builder
        .build()
        .with_context(|| format!("cannot set up trace export to {endpoint} (--otlp-endpoint)"))?;
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(MAX_QUEUE_SIZE)
                .with_max_export_batch_size(MAX_EXPORT_BATCH_SIZE)
                .with_scheduled_delay(SCHEDULED_DELAY)
                .build(),
        )
        .build();
    let resource = Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("twopc");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(export_filter());
    Ok((
        layer,
        OtelGuard {
            provider,
            endpoint: endpoint.to_string(),
        },
    ))
}

impl OtelGuard {
    /// Exports what is still queued and stops the exporter, waiting at most
    /// [`SHUTDOWN_TIMEOUT`]. Blocks the calling thread: call it outside async code, while
    /// the runtime that drives the exporter is still alive. Failures are logged only.
    pub fn shutdown(self) {
        match self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            Ok(()) => tracing::debug!(endpoint = %self.endpoint, "trace export flushed"),
            Err(e) => tracing::warn!(
                endpoint = %self.endpoint,
                error = %e,
                "trace export: final flush failed; the last spans may be lost"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plaintext_and_tls_endpoints_build_without_a_collector() {
        for endpoint in ["http://127.0.0.1:1", "https://collector.invalid:4317"] {
            let (_layer, guard) = layer(endpoint, "test").expect(endpoint);
            // Nothing was queued: shutting down has nothing to send and returns at once.
            tokio::task::spawn_blocking(move || guard.shutdown())
                .await
                .expect("shutdown");
        }
    }

    #[test]
    fn only_the_twopc_crates_are_exported() {
        let f = export_filter();
        assert!(f.would_enable("twopc_coordinator::service", &tracing::Level::INFO));
        assert!(f.would_enable("twopc", &tracing::Level::WARN));
        assert!(!f.would_enable("twopc_coordinator::runtime", &tracing::Level::DEBUG));
        for other in [
            "tonic",
            "h2",
            "hyper",
            "opentelemetry_sdk",
            "opentelemetry-otlp",
        ] {
            assert!(!f.would_enable(other, &tracing::Level::ERROR), "{other}");
        }
    }
}
