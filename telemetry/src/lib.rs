//! # baton-telemetry
//!
//! Logs and traces of Baton's processes (`baton-api`, `baton-worker`), set up by [`init`]:
//!
//! - **Logs** on stderr, filtered by `RUST_LOG`, as text or, with `BATON_LOG_FORMAT=json`, one
//!   flat JSON object per line carrying the fields of every enclosing span (`job.id`,
//!   `event.id`, `attempt`, `trace_id`, ...) next to the event's own ([`json`]).
//! - **Traces** exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//!   (`OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` or `http/protobuf`, the default;
//!   `OTEL_SERVICE_NAME` names the service; `BATON_TRACE_FILTER` picks the spans, by default
//!   [`DEFAULT_TRACE_FILTER`], independent of `RUST_LOG`). Without an endpoint no OpenTelemetry
//!   layer is installed at all: a span costs what a `tracing` span costs.
//! - **Trace context** in W3C `traceparent` form ([`traceparent`]): what a job carries from its
//!   enqueue to the worker's run, the script's `TRACEPARENT` and back.
#![forbid(unsafe_code)]

pub mod json;
pub mod traceparent;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use traceparent::{TraceParent, current_traceparent, link, traceparent_of};

/// How log lines are written (`BATON_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "BATON_LOG_FORMAT={other:?} is not a log format (expected `text` or `json`)"
            )),
        }
    }
}

/// Where traces go: read from the standard `OTEL_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: the collector's base URL (`http://collector:4317` for
    /// gRPC, `http://collector:4318` for HTTP; `/v1/traces` is appended for HTTP).
    pub endpoint: String,
    pub protocol: Protocol,
    /// `OTEL_SERVICE_NAME`, else the process's default (`baton-api`, `baton-worker`).
    pub service_name: String,
}

impl OtlpSettings {
    /// The settings in the environment; `None` when `OTEL_EXPORTER_OTLP_ENDPOINT` is unset or
    /// empty (no export). An unknown protocol is an error naming the variable.
    pub fn from_env(default_service: &str) -> anyhow::Result<Option<Self>> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let Some(endpoint) = var("OTEL_EXPORTER_OTLP_ENDPOINT") else {
            return Ok(None);
        };
        let protocol = match var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref().map(str::trim) {
            None | Some("http/protobuf") => Protocol::HttpBinary,
            Some("grpc") => Protocol::Grpc,
            Some(other) => anyhow::bail!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported (expected `grpc` or `http/protobuf`)"
            ),
        };
        Ok(Some(Self {
            endpoint: endpoint.trim().trim_end_matches('/').to_owned(),
            protocol,
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service.to_owned()),
        }))
    }
}

/// Which spans are exported unless `BATON_TRACE_FILTER` says otherwise.
pub const DEFAULT_TRACE_FILTER: &str = "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,reqwest=off,sqlx=off,opentelemetry=off";

/// Keeps the trace exporter alive; dropping it flushes the spans not yet sent.
#[must_use = "dropping the guard stops trace export"]
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans not yet sent (also done on drop).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        }
    }
}

/// Installs the process's global subscriber: logs on stderr (`RUST_LOG`, else
/// `default_filter`; `BATON_LOG_FORMAT`), and the OTLP trace export when configured. Call it
/// once, inside the tokio runtime (the gRPC exporter needs one).
pub fn init(default_service: &str, default_filter: &str) -> anyhow::Result<Telemetry> {
    let format: LogFormat = std::env::var("BATON_LOG_FORMAT")
        .unwrap_or_default()
        .parse()
        .map_err(anyhow::Error::msg)?;
    let otlp = OtlpSettings::from_env(default_service)?;
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(json::FlatJson)
            .boxed(),
    };
    let provider = otlp.as_ref().map(tracer_provider).transpose()?;
    // Traces have a filter of their own, so `RUST_LOG=warn` quiets the logs without losing
    // the spans; the exporter's own transport (tonic, hyper, reqwest) is never traced.
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("baton"))
            .with_filter(
                std::env::var("BATON_TRACE_FILTER")
                    .ok()
                    .and_then(|f| EnvFilter::try_new(f).ok())
                    .unwrap_or_else(|| EnvFilter::new(DEFAULT_TRACE_FILTER)),
            )
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter()))
        .with(traces)
        .try_init()
        .context("a global tracing subscriber is already installed")?;
    if let Some(settings) = &otlp {
        tracing::info!(endpoint = %settings.endpoint, protocol = ?settings.protocol,
                       service = %settings.service_name, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

use tracing_subscriber::Layer as _;

/// A tracer provider exporting to `settings` in batches.
pub fn tracer_provider(settings: &OtlpSettings) -> anyhow::Result<SdkTracerProvider> {
    let exporter = match settings.protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.endpoint.clone())
            .build(),
        _ => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", settings.endpoint))
            .build(),
    }
    .context("building the OTLP span exporter")?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(settings.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_unknown_ones_are_named() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("".parse::<LogFormat>(), Ok(LogFormat::Text));
        let e = "xml".parse::<LogFormat>().unwrap_err();
        assert!(e.contains("BATON_LOG_FORMAT"), "{e}");
    }
}
