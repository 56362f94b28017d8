//! Traces: each sampled RPC is one exported span that continues the caller's
//! W3C trace, records the status and the outcome and never the token;
//! `OTEL_TRACES_SAMPLER` decides which RPCs are sampled; log lines inside an
//! RPC carry the trace id whenever one exists, and without export nor a
//! caller's trace no span is built at all (checked with the SDK's in-memory
//! exporter and captured JSON logs; the real binary's JSON logs are checked in
//! `cli.rs`).

use std::sync::{Arc, Mutex};

use identity::{
    config::{TraceConfig, VerificationConfig},
    pb,
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{InMemorySpanExporter, Sampler, SdkTracerProvider, SpanData},
};
use tracing_subscriber::{Layer, filter::LevelFilter, layer::SubscriberExt};

use crate::common::{
    Backend, TestApp, TestDb, legacy_config,
    tokens::{legacy, legacy_claims},
};

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_SPAN: &str = "b7ad6b7169203331";
const VERIFY_SPAN: &str = "identity.v1.IdentityService/VerifyToken";

/// JSON log lines written by the fmt layer, kept in memory.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON log line"))
            .collect()
    }

    /// The trace ids on the span list of the line with this message.
    fn trace_ids_of(&self, message: &str) -> Vec<String> {
        let lines = self.lines();
        let line = lines
            .iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in {lines:?}"));
        line["spans"]
            .as_array()
            .map(|spans| {
                spans
                    .iter()
                    .filter_map(|s| s["trace_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The JSON log format of `identity serve`, into `logs`.
fn json_logs<S>(logs: &Logs) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let writer = logs.clone();
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(true)
        .with_writer(move || writer.clone())
}

/// A server on SQLite whose RPC spans go, as in `identity serve`, to a JSON
/// log (info) and, when `sampler` is set, to an in-memory exporter.
struct Traced {
    app: TestApp,
    exporter: InMemorySpanExporter,
    provider: Option<SdkTracerProvider>,
    logs: Logs,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Traced {
    /// Must run on a current-thread runtime: the server's tasks then run on
    /// this thread, under this thread's subscriber.
    async fn spawn(sampler: Option<Sampler>) -> Self {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let exporter = InMemorySpanExporter::default();
        let logs = Logs::default();
        let provider = sampler.clone().map(|sampler| {
            identity::telemetry::tracer_provider_builder(sampler)
                .with_simple_exporter(exporter.clone())
                .build()
        });
        let guard = tracing::subscriber::set_default(
            tracing_subscriber::registry()
                .with(LevelFilter::INFO)
                .with(json_logs(&logs)),
        );
        let db = TestDb::new(Backend::Sqlite).await.unwrap();
        let (mut config, keys) = crate::common::test_config(&db);
        config.verification = VerificationConfig {
            legacy: Some(legacy_config()),
            ..Default::default()
        };
        config.traces = match sampler {
            Some(sampler) => TraceConfig {
                otlp: true,
                sampler,
                tracer: provider.as_ref().map(identity::telemetry::rpc_tracer),
            },
            None => TraceConfig::default(),
        };
        let app = TestApp::spawn_with(db, config, keys).await;
        Self {
            app,
            exporter,
            provider,
            logs,
            _guard: guard,
        }
    }

    async fn verify(&self, token: &str, traceparent: Option<&str>) -> pb::verify_token_response::Result {
        let mut request = tonic::Request::new(pb::VerifyTokenRequest {
            token: token.to_owned(),
            expected_audience: String::new(),
        });
        if let Some(traceparent) = traceparent {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.parse().unwrap());
        }
        let response = self.app.identity(&self.app.verify_key).verify_token(request).await;
        response.unwrap().into_inner().result.unwrap()
    }

    /// SetAuthMode logs "auth mode changed" inside the RPC.
    async fn set_auth_mode(&self, mode: pb::AuthMode, traceparent: Option<&str>) {
        let mut request = tonic::Request::new(pb::SetAuthModeRequest { mode: mode as i32 });
        if let Some(traceparent) = traceparent {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.parse().unwrap());
        }
        self.app.admin().set_auth_mode(request).await.unwrap();
    }

    /// Stops the server (every RPC span has ended then) and returns the exported spans.
    async fn finish(self) -> (Vec<SpanData>, Logs) {
        self.app.shutdown().await;
        if let Some(provider) = &self.provider {
            provider.force_flush().unwrap();
        }
        (self.exporter.get_finished_spans().unwrap(), self.logs)
    }
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<std::borrow::Cow<'a, str>> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str())
}

fn names(spans: &[SpanData]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_ref()).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn rpc_spans_continue_the_callers_trace_without_the_token() {
    // The default sampler, parentbased_always_on.
    let traced = Traced::spawn(Some(TraceConfig::default().sampler)).await;
    let user = traced.app.legacy_user("ann@example.com").await;
    let token = legacy(legacy_claims(&user.to_string()));
    let result = traced
        .verify(&token, Some(&format!("00-{TRACE_ID}-{PARENT_SPAN}-01")))
        .await;
    assert!(matches!(result, pb::verify_token_response::Result::Principal(_)));
    let (spans, _) = traced.finish().await;

    assert_eq!(names(&spans), [VERIFY_SPAN], "one span per RPC, nothing else");
    let rpc = &spans[0];
    assert_eq!(rpc.span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(rpc.parent_span_id.to_string(), PARENT_SPAN);
    assert_eq!(rpc.span_kind, opentelemetry::trace::SpanKind::Server);
    // An integer, as OpenTelemetry's RPC semantic conventions define it (0: OK).
    assert_eq!(attribute(rpc, "rpc.grpc.status_code").as_deref(), Some("0"));
    assert_eq!(attribute(rpc, "outcome").as_deref(), Some("accepted"));
    // What an RPC span is for, and nothing the same on every span (source
    // location, target, thread, busy/idle time).
    let mut keys: Vec<_> = rpc.attributes.iter().map(|kv| kv.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "outcome",
            "rpc.grpc.status_code",
            "rpc.method",
            "rpc.service",
            "rpc.system"
        ]
    );
    for kv in &rpc.attributes {
        assert!(!kv.value.as_str().contains(&token), "the token leaked into {}", kv.key);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn sampled_requests_export_one_span_per_rpc() {
    let traced = Traced::spawn(Some(Sampler::AlwaysOn)).await;
    let user = traced.app.legacy_user("bob@example.com").await;
    let token = legacy(legacy_claims(&user.to_string()));
    const CALLS: usize = 25;
    for _ in 0..CALLS {
        traced.verify(&token, None).await;
    }
    let rejected = traced.verify("not-a-token", None).await;
    assert!(matches!(rejected, pb::verify_token_response::Result::Rejection(_)));
    let (spans, _) = traced.finish().await;

    assert_eq!(spans.len(), CALLS + 1, "{:?}", names(&spans));
    assert!(spans.iter().all(|s| s.name == VERIFY_SPAN), "{:?}", names(&spans));
    let traces: std::collections::HashSet<_> = spans.iter().map(|s| s.span_context.trace_id()).collect();
    assert_eq!(
        traces.len(),
        CALLS + 1,
        "each RPC without a caller's trace starts its own"
    );
    assert!(
        spans
            .iter()
            .all(|s| s.parent_span_id == opentelemetry::trace::SpanId::INVALID)
    );
    assert!(spans.iter().all(|s| s.span_context.is_sampled()));
    let outcomes: Vec<_> = spans.iter().filter_map(|s| attribute(s, "outcome")).collect();
    assert_eq!(outcomes.iter().filter(|o| *o == "accepted").count(), CALLS);
    assert_eq!(outcomes.iter().filter(|o| *o == "malformed").count(), 1, "{outcomes:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_parent_based_ratio_sampler_follows_the_caller_and_samples_roots_by_ratio() {
    // Ratio 0: no trace this service starts is sampled; callers' decisions stand.
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.0)));
    let traced = Traced::spawn(Some(sampler)).await;
    let user = traced.app.legacy_user("cy@example.com").await;
    let token = legacy(legacy_claims(&user.to_string()));
    for _ in 0..10 {
        traced.verify(&token, None).await;
    }
    let unsampled = "4bf92f3577b34da6a3ce929d0e0e4736";
    traced
        .verify(&token, Some(&format!("00-{unsampled}-00f067aa0ba902b7-00")))
        .await;
    traced
        .verify(&token, Some(&format!("00-{TRACE_ID}-{PARENT_SPAN}-01")))
        .await;
    // An unsampled RPC still logs the caller's trace id.
    traced
        .set_auth_mode(
            pb::AuthMode::ClerkOnly,
            Some(&format!("00-{unsampled}-00f067aa0ba902b7-00")),
        )
        .await;
    let (spans, logs) = traced.finish().await;

    assert_eq!(names(&spans), [VERIFY_SPAN], "only the caller's sampled trace");
    assert_eq!(spans[0].span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(spans[0].parent_span_id.to_string(), PARENT_SPAN);
    assert_eq!(logs.trace_ids_of("auth mode changed"), [unsampled]);
}

#[tokio::test(flavor = "current_thread")]
async fn the_ratio_sampler_exports_every_rpc_it_decides_to_sample() {
    // The service decides on a trace id before any span exists; the SDK must
    // build the span with that id, or it samples again on another one and
    // about a quarter of the RPCs are exported instead of a half.
    let traced = Traced::spawn(Some(Sampler::TraceIdRatioBased(0.5))).await;
    let user = traced.app.legacy_user("di@example.com").await;
    let token = legacy(legacy_claims(&user.to_string()));
    const CALLS: usize = 200;
    for _ in 0..CALLS {
        traced.verify(&token, None).await;
    }
    let (spans, _) = traced.finish().await;

    // Binomial(200, 0.5): outside 70..=130 with a probability under 1e-4.
    assert!(
        (70..=130).contains(&spans.len()),
        "{} of {CALLS} RPCs exported at ratio 0.5",
        spans.len()
    );
    assert!(
        spans
            .iter()
            .all(|s| s.span_context.is_sampled() && s.name == VERIFY_SPAN)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn logs_inside_a_sampled_rpc_carry_the_exported_trace_id() {
    let traced = Traced::spawn(Some(Sampler::TraceIdRatioBased(1.0))).await;
    // SetAuthMode writes in a SQLite transaction, whose worker thread keeps
    // the RPC's child span after the call: the RPC span must still end.
    traced.set_auth_mode(pb::AuthMode::LegacyOnly, None).await;
    let (spans, logs) = traced.finish().await;

    let rpc = spans
        .iter()
        .find(|s| s.name == "identity.v1.MigrationService/SetAuthMode")
        .unwrap_or_else(|| panic!("no SetAuthMode span in {:?}", names(&spans)));
    assert_eq!(
        logs.trace_ids_of("auth mode changed"),
        [rpc.span_context.trace_id().to_string()],
        "the log names the trace that was exported"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn without_export_only_a_callers_trace_makes_an_rpc_span() {
    let traced = Traced::spawn(None).await;
    traced.set_auth_mode(pb::AuthMode::ClerkOnly, None).await;
    traced
        .set_auth_mode(pb::AuthMode::Dual, Some(&format!("00-{TRACE_ID}-{PARENT_SPAN}-01")))
        .await;
    let (spans, logs) = traced.finish().await;

    assert!(spans.is_empty());
    let lines = logs.lines();
    let changes: Vec<_> = lines.iter().filter(|l| l["message"] == "auth mode changed").collect();
    assert_eq!(changes.len(), 2, "{lines:?}");
    let rpc_spans = |line: &serde_json::Value| {
        line["spans"]
            .as_array()
            .map(|spans| spans.iter().filter(|s| s["name"] == "rpc").cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert!(
        rpc_spans(changes[0]).is_empty(),
        "no trace, no RPC span: {}",
        changes[0]
    );
    let traced_rpc = rpc_spans(changes[1]);
    assert_eq!(traced_rpc.len(), 1, "{}", changes[1]);
    assert_eq!(traced_rpc[0]["trace_id"], TRACE_ID);
    assert_eq!(traced_rpc[0]["rpc.method"], "SetAuthMode");
}
