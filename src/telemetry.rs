//! Logs and traces. Logs are human-readable by default, JSON with
//! `IDENTITY_LOG_FORMAT=json`; inside an RPC every line carries the trace id
//! whenever there is one. Traces go to an OTLP collector when the standard
//! `OTEL_EXPORTER_OTLP_*` variables name one (`OTEL_SDK_DISABLED=true` turns
//! them off), sampled per `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`;
//! an incoming W3C `traceparent` continues the caller's trace. A sampled RPC's
//! span is built with the OpenTelemetry SDK directly, beside a `tracing` span
//! that only carries its method and trace id into the logs. Without export and
//! without a `traceparent` an RPC builds no span at all: the default
//! configuration pays nothing for tracing. Nothing logs or records a token or
//! a secret.

use std::{cell::Cell, io::IsTerminal, sync::Arc};

use opentelemetry::{
    Context, KeyValue,
    trace::{Span as _, SpanKind, TraceContextExt, TraceId, Tracer as _, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{
        IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracer, SdkTracerProvider, ShouldSample,
        TracerProviderBuilder,
    },
};
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{LogFormat, TraceConfig};

/// The target of the RPC span in the logs.
const RPC_TARGET: &str = "identity::rpc";

thread_local! {
    /// The trace id [`RpcTracing`] sampled a new root span with, handed to the
    /// SDK when it builds that span on the same thread, so that the exported
    /// trace id is the one the ratio sampler decided on (the SDK's span
    /// builder draws a root's trace id from the id generator only).
    static SAMPLED_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Random ids, except for a root RPC span whose trace id was drawn (and
/// sampled) before the span existed.
#[derive(Debug, Default)]
struct RpcIdGenerator(RandomIdGenerator);

impl IdGenerator for RpcIdGenerator {
    fn new_trace_id(&self) -> TraceId {
        SAMPLED_TRACE_ID
            .with(Cell::take)
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> opentelemetry::trace::SpanId {
        self.0.new_span_id()
    }
}

/// A tracer provider with the given sampler and the RPC-aware id generator;
/// add an exporter and build it (the OTLP one here, an in-memory one in tests).
pub fn tracer_provider_builder(sampler: Sampler) -> TracerProviderBuilder {
    SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_id_generator(RpcIdGenerator::default())
}

/// The tracer provider exporting over OTLP/gRPC, configured from `OTEL_*` variables.
fn otlp_provider(sampler: Sampler) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the OTLP exporter: {e}"))?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "identity".to_owned());
    Ok(tracer_provider_builder(sampler)
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}

/// The fmt layer for the chosen format.
fn fmt_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    match format {
        LogFormat::Text => {
            // Colours only for a person at a terminal: log collectors
            // (`kubectl logs`, files) get plain text. On a terminal the
            // layer's default applies (colours unless `NO_COLOR` is set).
            let layer = text_layer();
            if std::io::stdout().is_terminal() {
                layer.boxed()
            } else {
                layer.with_ansi(false).boxed()
            }
        }
        // The span list carries the RPC span's trace id into every line inside it.
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .boxed(),
    }
}

/// Human-readable logs: tracing-subscriber's full format, with targets.
fn text_layer<S>() -> fmt::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fmt::layer().with_target(true)
}

/// Holds the tracer provider so spans are flushed when the process ends.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("cannot flush traces: {err}");
        }
    }
}

impl TelemetryGuard {
    /// The tracer sampled RPC spans are exported with, when OTLP export is
    /// on: for [`TraceConfig::tracer`].
    pub fn tracer(&self) -> Option<SdkTracer> {
        self.provider.as_ref().map(rpc_tracer)
    }
}

/// The tracer of RPC spans from a provider (the OTLP one, or a test's).
pub fn rpc_tracer(provider: &SdkTracerProvider) -> SdkTracer {
    provider.tracer("identity")
}

/// Installs the global subscriber (a second call, as in tests, is a no-op)
/// and, with OTLP export on, builds the tracer provider (see
/// [`TelemetryGuard::tracer`]). Export does not depend on the log level, nor
/// the log level on export: exported spans do not go through `tracing`.
pub fn init(format: LogFormat, level: &str, traces: &TraceConfig) -> Result<TelemetryGuard, String> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = if traces.otlp {
        Some(otlp_provider(traces.sampler.clone())?)
    } else {
        None
    };
    init_logging(format, level);
    Ok(TelemetryGuard { provider })
}

/// Logs only (tests, commands that do not serve). The level filter is
/// global: disabled spans and events cost nothing.
pub fn init_logging(format: LogFormat, level: &str) {
    let _ = Registry::default()
        .with(log_filter(level))
        .with(fmt_layer(format))
        .try_init();
}

/// The filter `IDENTITY_LOG_LEVEL` names, with PostgreSQL's notices (which
/// sqlx logs at INFO) shown from WARN only, unless the filter names sqlx: a
/// migration's `DROP … IF EXISTS` on a new database answers "… does not
/// exist, skipping", which reads like a fault to an operator at start-up.
fn log_filter(level: &str) -> EnvFilter {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    if level.contains("sqlx") {
        return filter;
    }
    match "sqlx::postgres::notice=warn".parse() {
        Ok(quiet) => filter.add_directive(quiet),
        Err(_) => filter,
    }
}

/// Reads W3C trace context from gRPC metadata.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The outcome of an RPC for its span (e.g. `accepted` or a rejection
/// reason), set by a handler as a response extension.
#[derive(Debug, Clone, Copy)]
pub struct Outcome(pub &'static str);

/// Builds the span of each RPC, as cheaply as the configuration allows:
///
/// - nothing exported and no incoming `traceparent`: no span at all;
/// - nothing exported, a `traceparent`: a span for the logs, holding the
///   caller's trace id;
/// - OTLP export: the configured sampler decides before any span exists; a
///   sampled RPC gets one exported span (child of the caller's span when there
///   is one) and a span for the logs with its trace id; an unsampled one is
///   treated as if nothing were exported.
#[derive(Debug, Clone, Default)]
pub struct RpcTracing {
    export: Option<Export>,
}

/// Where sampled RPC spans go, and which RPCs are sampled.
#[derive(Debug, Clone)]
struct Export {
    sampler: Arc<Sampler>,
    tracer: SdkTracer,
}

/// The spans of one RPC.
#[derive(Debug)]
pub struct RpcSpan {
    /// Entered while the RPC runs, so that its log lines carry the method and
    /// the trace id (disabled when there is no trace id or nothing is logged).
    pub log: tracing::Span,
    /// The span exported for a sampled RPC.
    pub exported: Option<ExportedRpc>,
}

/// The exported span of a sampled RPC; ended by [`ExportedRpc::end`], or when
/// dropped (a cancelled call), without a status then.
#[derive(Debug)]
pub struct ExportedRpc(opentelemetry_sdk::trace::Span);

impl RpcTracing {
    /// Per the configuration: spans are exported only with OTLP on and a
    /// tracer to export them with.
    pub fn new(traces: &TraceConfig) -> Self {
        let export = traces.tracer.clone().filter(|_| traces.otlp).map(|tracer| Export {
            sampler: Arc::new(traces.sampler.clone()),
            tracer,
        });
        Self { export }
    }

    /// The spans of one RPC, named after its path. Only the path, the status
    /// code and the outcome are recorded, and the trace id whenever there is
    /// one, so that every log line inside carries it.
    pub fn span(&self, path: &str, headers: &http::HeaderMap) -> RpcSpan {
        let remote = remote_context(headers);
        let remote_trace = remote.as_ref().map(|cx| cx.span().span_context().trace_id());
        let name = path.trim_start_matches('/');
        let (service, method) = name.split_once('/').unwrap_or((name, ""));
        let unexported = || RpcSpan {
            log: remote_trace.map_or_else(tracing::Span::none, |id| log_span(method, id)),
            exported: None,
        };
        let Some(export) = &self.export else {
            return unexported();
        };
        let parent = remote.unwrap_or_default();
        let trace_id = remote_trace.unwrap_or_else(|| RandomIdGenerator::default().new_trace_id());
        let decision = export
            .sampler
            .should_sample(Some(&parent), trace_id, name, &SpanKind::Server, &[], &[])
            .decision;
        if decision != SamplingDecision::RecordAndSample {
            return unexported();
        }
        if remote_trace.is_none() {
            SAMPLED_TRACE_ID.with(|next| next.set(Some(trace_id)));
        }
        let exported = export
            .tracer
            .span_builder(name.to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service.to_owned()),
                KeyValue::new("rpc.method", method.to_owned()),
            ])
            .start_with_context(&export.tracer, &parent);
        SAMPLED_TRACE_ID.with(|next| next.set(None));
        RpcSpan {
            log: log_span(method, exported.span_context().trace_id()),
            exported: Some(ExportedRpc(exported)),
        }
    }
}

impl ExportedRpc {
    /// Ends the exported span of an RPC with its gRPC status code (an
    /// integer, per OpenTelemetry's RPC conventions) and the handler's
    /// outcome, when there is one. It ends when the response head is ready,
    /// not with the body nor with a child span that outlives the call (sqlx's
    /// SQLite worker thread holds the current span of the commands it runs).
    pub fn end(mut self, code: tonic::Code, outcome: Option<Outcome>) {
        self.0.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
        if let Some(Outcome(outcome)) = outcome {
            self.0.set_attribute(KeyValue::new("outcome", outcome));
        }
        self.0.end();
    }
}

/// The RPC span of the logs: `rpc{rpc.method=VerifyToken trace_id=…}`, the
/// trace id as the 32 lowercase hex digits of W3C trace context (written
/// straight from its bytes: `{:032x}` of a u128 costs more than the rest).
fn log_span(method: &str, trace_id: TraceId) -> tracing::Span {
    let mut hex = [0u8; 32];
    let hex = match hex::encode_to_slice(trace_id.to_bytes(), &mut hex) {
        Ok(()) => std::str::from_utf8(&hex).unwrap_or_default(),
        Err(_) => "",
    };
    tracing::info_span!(target: RPC_TARGET, "rpc", rpc.method = %method, trace_id = %hex)
}

/// The caller's W3C trace context, when it sent a valid one.
fn remote_context(headers: &http::HeaderMap) -> Option<Context> {
    if !headers.contains_key("traceparent") {
        return None;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    cx.span().span_context().is_valid().then_some(cx)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_logs_show_an_rpc_span_by_its_method_and_trace_id() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = Registry::default().with(text_layer().with_ansi(false).with_writer(move || writer.clone()));
        let trace_id = TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap_or(TraceId::INVALID);
        tracing::subscriber::with_default(subscriber, || {
            let span = log_span("VerifyToken", trace_id);
            let _inside = span.enter();
            tracing::info!(user = "u1", count = 2, "token verified");
        });
        let logged = String::from_utf8(buffer.0.lock().map(|b| b.clone()).unwrap_or_default()).unwrap_or_default();
        assert!(
            logged.contains(
                "rpc{rpc.method=VerifyToken trace_id=0af7651916cd43dd8448eb211c80319c}: identity::telemetry::tests: token verified user=\"u1\" count=2"
            ),
            "{logged}"
        );
    }
}
