//! Logs and traces, set up once per process.
//!
//! Logs go to stderr, as text or JSON lines. With `otlp_endpoint` set, spans also go to an
//! OTLP/HTTP collector: the spans patchflow opens under [`TRACE_TARGET`] (a task's submit, the
//! agent, each model request and tool call), the Temporal SDK plugin's own (a workflow, each
//! activity, each client call), and warnings and errors as events of the span they happen in.
//! One task is one trace: the gateway's submit span reaches the workflow through the
//! Temporal headers, and an agent process through `TRACEPARENT` ([`traceparent`],
//! [`remote_parent`]).
//!
//! The spans under [`TRACE_TARGET`] never reach the log lines, so turning tracing on does not
//! change what a log says.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use patchflow_core::config::LogFormat;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, Registry};

pub use patchflow_core::TRACE_TARGET;

/// The variable an agent process reads its parent span from (W3C Trace Context).
pub const TRACEPARENT: &str = "TRACEPARENT";

/// What [`init`] traces, when it does.
pub struct Tracing<'a, G> {
    /// The process's `service.name` (`patchflow-worker`, `patchflow-agent`, …).
    pub service: &'a str,
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`), or a full
    /// `…/v1/traces` URL; `None` traces nothing.
    pub endpoint: Option<&'a str>,
    /// How span ids are made (a Temporal worker needs replay-safe ones).
    pub ids: G,
}

impl<'a> Tracing<'a, RandomIdGenerator> {
    /// Traces of `service` to `endpoint` (none without one), with random span ids.
    pub fn new(service: &'a str, endpoint: Option<&'a str>) -> Self {
        Tracing {
            service,
            endpoint,
            ids: RandomIdGenerator::default(),
        }
    }
}

impl<'a, G> Tracing<'a, G> {
    /// The same, with span ids from `ids`.
    pub fn with_ids<H: IdGenerator>(self, ids: H) -> Tracing<'a, H> {
        Tracing {
            service: self.service,
            endpoint: self.endpoint,
            ids,
        }
    }
}

/// Holds the trace exporter; [`Telemetry::shutdown`] (or dropping it) sends what is left.
#[must_use = "dropping it stops the trace exporter"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans not sent yet and stops the exporter (a no-op without one).
    pub fn shutdown(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }

    /// Whether spans are exported.
    pub fn tracing(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The OTLP traces URL of `endpoint`: a collector's base URL gains `/v1/traces`, as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` does; one that names the path already is kept.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Logging to stderr, as text or JSON lines (`log_format`; `RUST_LOG` overrides
/// `default_filter`), and with an endpoint, traces. A collector that cannot be set up costs
/// the traces, never the process: it says so on stderr and logs on.
pub fn init<G: IdGenerator + 'static>(
    log_format: LogFormat,
    default_filter: &str,
    tracing: Tracing<'_, G>,
) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter))
        .add_directive(
            format!("{TRACE_TARGET}=off")
                .parse()
                .unwrap_or_else(|_| LevelFilter::OFF.into()),
        );
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![match log_format {
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
        LogFormat::Text => fmt.with_filter(filter).boxed(),
    }];
    let mut error = None;
    let provider = tracing.endpoint.and_then(|endpoint| {
        match provider(endpoint, tracing.service, tracing.ids) {
            Ok(p) => Some(p),
            Err(e) => {
                error = Some(format!("traces to {endpoint} are off: {e}"));
                None
            }
        }
    });
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let spans = Targets::new()
            .with_target(TRACE_TARGET, LevelFilter::INFO)
            .with_default(LevelFilter::WARN);
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("patchflow"))
                .with_filter(spans)
                .boxed(),
        );
    }
    let _ = tracing_subscriber::registry().with(layers).try_init();
    if let Some(e) = error {
        tracing::warn!("{e}");
    }
    Telemetry { provider }
}

fn provider<G: IdGenerator + 'static>(
    endpoint: &str,
    service: &str,
    ids: G,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(ids)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build())
}

/// The current span as a W3C `traceparent` value, for a process started under it; `None`
/// when nothing is traced.
pub fn traceparent() -> Option<String> {
    let cx = opentelemetry::Context::current();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

pub use patchflow_core::trace::remote_parent;

/// The process-wide span an agent run goes under: a child of `TRACEPARENT` when the runner
/// set one.
pub fn agent_span(task_id: &str) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::info_span!(target: TRACE_TARGET, "agent", task_id = %task_id);
    if let Some(cx) = remote_parent(std::env::var(TRACEPARENT).ok().as_deref()) {
        let _ = span.set_parent(cx);
    }
    span
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_collector_base_url_gains_the_traces_path_once() {
        assert_eq!(
            traces_url("http://c:4318"),
            "http://c:4318/v1/traces".to_string()
        );
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    #[test]
    fn nothing_traced_gives_no_traceparent() {
        assert_eq!(traceparent(), None);
    }
}
