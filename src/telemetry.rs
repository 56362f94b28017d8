//! Logs and traces. Logs are human-readable by default, JSON with
//! `IDENTITY_LOG_FORMAT=json`; inside an RPC every line carries the trace id
//! whenever there is one. Traces go to an OTLP collector when the standard
//! `OTEL_EXPORTER_OTLP_*` variables name one (`OTEL_SDK_DISABLED=true` turns
//! them off), sampled per `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`;
//! an incoming W3C `traceparent` continues the caller's trace. Without export
//! and without a `traceparent` an RPC builds no span at all: the default
//! configuration pays nothing for tracing. Nothing logs or records a token or
//! a secret.

use std::{cell::Cell, io::IsTerminal, sync::Arc};

use opentelemetry::{
    Context, KeyValue,
    trace::{SpanKind, TraceContextExt, TraceId, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{
        IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracerProvider, ShouldSample,
        TracerProviderBuilder,
    },
};
use tracing::field::{Field, Visit};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    field::{MakeVisitor, VisitFmt, VisitOutput},
    filter::Targets,
    fmt,
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

use crate::config::{LogFormat, TraceConfig};

/// The target of the one span per RPC that is exported; the OpenTelemetry
/// layer sees nothing else, so handler spans and events never start traces
/// of their own.
const EXPORTED_TARGET: &str = "identity::rpc";

thread_local! {
    /// The trace id [`RpcTracing`] sampled a new root span with, handed to the
    /// SDK when it builds that span on the same thread, so that the exported
    /// trace id is the one the ratio sampler decided on.
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

/// The OpenTelemetry layer: exports the RPC spans of [`RpcTracing`] only.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    // Only what an RPC span is for: no source location, target, thread or
    // busy/idle attributes (the same file, module and worker names on every
    // span, and two clock reads at every poll of the call).
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("identity"))
        .with_location(false)
        .with_target(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target(EXPORTED_TARGET, tracing::Level::INFO))
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

/// Human-readable logs: tracing-subscriber's full format, the RPC span's
/// fields as [`LoggedFields`] has them.
fn text_layer<S>() -> fmt::Layer<S, LoggedFields>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fmt::layer().with_target(true).fmt_fields(LoggedFields::default())
}

/// The fields of an RPC span that only the exported span needs: its name and
/// kind (for the OpenTelemetry layer), the RPC system and service (the
/// method's path says them). A log line shows `rpc{rpc.method=… trace_id=…}`,
/// and a sampled span is not formatted for them at all.
const EXPORT_ONLY_FIELDS: [&str; 4] = ["otel.name", "otel.kind", "rpc.system", "rpc.service"];

/// tracing-subscriber's text field formatter, skipping [`EXPORT_ONLY_FIELDS`].
#[derive(Debug, Default)]
struct LoggedFields(fmt::format::DefaultFields);

impl<'a> MakeVisitor<fmt::format::Writer<'a>> for LoggedFields {
    type Visitor = Logged<<fmt::format::DefaultFields as MakeVisitor<fmt::format::Writer<'a>>>::Visitor>;

    fn make_visitor(&self, target: fmt::format::Writer<'a>) -> Self::Visitor {
        Logged(self.0.make_visitor(target))
    }
}

/// A field visitor that passes every field on except [`EXPORT_ONLY_FIELDS`].
struct Logged<V>(V);

impl<V: Visit> Logged<V> {
    fn logged(field: &Field) -> bool {
        !EXPORT_ONLY_FIELDS.contains(&field.name())
    }
}

impl<V: Visit> Visit for Logged<V> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if Self::logged(field) {
            self.0.record_debug(field, value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if Self::logged(field) {
            self.0.record_str(field, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if Self::logged(field) {
            self.0.record_i64(field, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if Self::logged(field) {
            self.0.record_u64(field, value);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if Self::logged(field) {
            self.0.record_bool(field, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if Self::logged(field) {
            self.0.record_error(field, value);
        }
    }
}

impl<V: VisitOutput<std::fmt::Result>> VisitOutput<std::fmt::Result> for Logged<V> {
    fn finish(self) -> std::fmt::Result {
        self.0.finish()
    }
}

impl<V: VisitFmt> VisitFmt for Logged<V> {
    fn writer(&mut self) -> &mut dyn std::fmt::Write {
        self.0.writer()
    }
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

/// Installs the global subscriber (a second call, as in tests, is a no-op).
pub fn init(format: LogFormat, level: &str, traces: &TraceConfig) -> Result<TelemetryGuard, String> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = if traces.otlp {
        Some(otlp_provider(traces.sampler.clone())?)
    } else {
        None
    };
    let installed = match &provider {
        // The level filter is global: disabled spans and events cost nothing.
        None => Registry::default()
            .with(filter)
            .with(fmt_layer(format))
            .try_init()
            .is_ok(),
        // Export does not depend on the log level, nor the log level on export.
        Some(provider) => Registry::default()
            .with(fmt_layer(format).with_filter(filter))
            .with(otel_layer(provider))
            .try_init()
            .is_ok(),
    };
    Ok(TelemetryGuard {
        provider: installed.then_some(provider).flatten(),
    })
}

/// Logs only (tests, commands that do not serve).
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = Registry::default().with(filter).with(fmt_layer(format)).try_init();
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
///   is one), an unsampled one is treated as if nothing were exported.
#[derive(Debug, Clone, Default)]
pub struct RpcTracing {
    sampler: Option<Arc<Sampler>>,
}

/// One RPC span; `$target` decides whether the OpenTelemetry layer sees it.
macro_rules! rpc_span {
    ($target:expr, $name:expr, $service:expr, $method:expr) => {
        tracing::info_span!(
            target: $target,
            "rpc",
            otel.name = %$name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %$service,
            rpc.method = %$method,
            trace_id = tracing::field::Empty,
        )
    };
}

impl RpcTracing {
    /// Per the configuration: spans are exported only with OTLP on.
    pub fn new(traces: &TraceConfig) -> Self {
        Self {
            sampler: traces.otlp.then(|| Arc::new(traces.sampler.clone())),
        }
    }

    /// The span of one RPC, named after its path. Only the path, the status
    /// code and the outcome are recorded, and the trace id whenever there is
    /// one, so that every log line inside carries it.
    pub fn span(&self, path: &str, headers: &http::HeaderMap) -> tracing::Span {
        let remote = remote_context(headers);
        let remote_trace = remote.as_ref().map(|cx| cx.span().span_context().trace_id());
        let name = path.trim_start_matches('/');
        let (service, method) = name.split_once('/').unwrap_or((name, ""));
        let Some(sampler) = &self.sampler else {
            return remote_trace.map_or_else(tracing::Span::none, |id| log_span(name, service, method, id));
        };
        let parent = remote.unwrap_or_default();
        let trace_id = remote_trace.unwrap_or_else(|| RandomIdGenerator::default().new_trace_id());
        let decision = sampler
            .should_sample(Some(&parent), trace_id, name, &SpanKind::Server, &[], &[])
            .decision;
        if decision != SamplingDecision::RecordAndSample {
            return remote_trace.map_or_else(tracing::Span::none, |id| log_span(name, service, method, id));
        }
        let span = rpc_span!(EXPORTED_TARGET, name, service, method);
        if span.is_disabled() {
            return span;
        }
        if remote_trace.is_some() {
            let _ = span.set_parent(parent);
        } else {
            SAMPLED_TRACE_ID.with(|next| next.set(Some(trace_id)));
        }
        // Builds the OpenTelemetry span now, on this thread, with that trace id.
        let built = span.context().span().span_context().trace_id();
        SAMPLED_TRACE_ID.with(|next| next.set(None));
        let logged = if built == TraceId::INVALID { trace_id } else { built };
        record_trace_id(&span, logged);
        span
    }
}

/// Ends the exported span of an RPC with its gRPC status code (an integer,
/// per OpenTelemetry's RPC conventions) and the handler's outcome, when there
/// is one. These go to the exported span only: the call is over, so no log
/// line will show them, and the log layer is not asked to format them.
/// The tracing span itself closes only when every child span has closed too,
/// and a child may outlive the call: sqlx's SQLite worker thread holds the
/// current span of the commands it runs. Without this, such an RPC would be
/// exported late, or never.
pub fn end_rpc(span: &tracing::Span, code: tonic::Code, outcome: Option<Outcome>) {
    if span.metadata().is_some_and(|m| m.target() == EXPORTED_TARGET) {
        let cx = span.context();
        let exported = cx.span();
        exported.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
        if let Some(Outcome(outcome)) = outcome {
            exported.set_attribute(KeyValue::new("outcome", outcome));
        }
        exported.end();
    }
}

/// A span that only logs: the OpenTelemetry layer never sees its target.
fn log_span(name: &str, service: &str, method: &str, trace_id: TraceId) -> tracing::Span {
    let span = rpc_span!("identity::telemetry", name, service, method);
    if !span.is_disabled() {
        record_trace_id(&span, trace_id);
    }
    span
}

/// Records the trace id on an RPC span, as the 32 lowercase hex digits of
/// W3C trace context (written straight from its bytes: `{:032x}` of a u128
/// costs more than the rest of the record).
fn record_trace_id(span: &tracing::Span, trace_id: TraceId) {
    let mut hex = [0u8; 32];
    if hex::encode_to_slice(trace_id.to_bytes(), &mut hex).is_ok()
        && let Ok(hex) = std::str::from_utf8(&hex)
    {
        span.record("trace_id", tracing::field::display(hex));
    }
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
            let span = log_span(
                "identity.v1.IdentityService/VerifyToken",
                "identity.v1.IdentityService",
                "VerifyToken",
                trace_id,
            );
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
        for exported_only in EXPORT_ONLY_FIELDS {
            assert!(!logged.contains(exported_only), "{exported_only} in {logged}");
        }
    }
}
