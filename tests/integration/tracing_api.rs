//! Traces: each RPC is a span that continues the caller's W3C trace, records
//! the outcome and never the token (checked with the SDK's in-memory
//! exporter); JSON logs carry the trace id (checked on the real binary).

use identity::{config::VerificationConfig, pb};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;

use crate::common::{
    Backend, TestApp, TestDb, legacy_config,
    tokens::{legacy, legacy_claims},
};

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_SPAN: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "current_thread")]
async fn rpc_spans_continue_the_callers_trace_without_the_token() {
    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    // The current-thread runtime keeps the server's tasks on this thread, under this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let app = TestApp::spawn_verifying(
        db,
        VerificationConfig {
            legacy: Some(legacy_config()),
            ..Default::default()
        },
    )
    .await;
    let user = app.legacy_user("ann@example.com").await;
    let token = legacy(legacy_claims(&user.to_string()));
    let mut request = tonic::Request::new(pb::VerifyTokenRequest {
        token: token.clone(),
        expected_audience: String::new(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN}-01").parse().unwrap(),
    );
    let response = app
        .identity(&app.verify_key)
        .verify_token(request)
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        response.result,
        Some(pb::verify_token_response::Result::Principal(_))
    ));
    app.shutdown().await;
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let rpc = spans
        .iter()
        .find(|s| s.name == "identity.v1.IdentityService/VerifyToken")
        .unwrap_or_else(|| panic!("no RPC span in {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>()));
    assert_eq!(rpc.span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(rpc.parent_span_id.to_string(), PARENT_SPAN);
    let status = rpc
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == "rpc.grpc.status_code")
        .unwrap();
    assert_eq!(status.value.as_str(), "Ok");
    let handler = spans
        .iter()
        .find(|s| s.name == "IdentityService/VerifyToken")
        .expect("handler span");
    assert_eq!(handler.span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(handler.parent_span_id, rpc.span_context.span_id());
    let outcome = handler
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == "outcome")
        .unwrap();
    assert_eq!(outcome.value.as_str(), "accepted");
    for span in &spans {
        for kv in &span.attributes {
            assert!(
                !kv.value.as_str().contains(&token),
                "the token leaked into span {}",
                span.name
            );
        }
    }
}
