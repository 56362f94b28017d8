//! Prometheus text exposition on its own HTTP port (`IDENTITY_METRICS_ADDR`),
//! and the gRPC layer that counts requests by service, method and code.

use std::{
    net::SocketAddr,
    sync::OnceLock,
    task::{Context, Poll},
    time::Instant,
};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide recorder (installed once; later servers in the same
/// process, as in tests, share it).
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ])
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            ::metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// Drains recorded histogram samples into their buckets every few seconds;
/// without it samples pile up between scrapes (memory grows with traffic).
pub async fn run_upkeep(mut stop: watch::Receiver<bool>) {
    let Some(handle) = handle() else { return };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => handle.run_upkeep(),
            _ = stop.changed() => return,
        }
    }
}

/// Serves `GET /metrics` until `stop` flips; returns the bound address.
pub async fn serve(addr: SocketAddr, mut stop: watch::Receiver<bool>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            let body = handle().map(|h| h.render()).unwrap_or_default();
            ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
        }),
    );
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.changed().await;
        };
        if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %err, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

/// Counts gRPC requests and their latency by service, method and status
/// code, and runs each in a span that continues the caller's trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        let path = request.uri().path().to_owned();
        let started = Instant::now();
        let span = crate::telemetry::rpc_span(&path, request.headers());
        let future = self.inner.call(request);
        let record_span = span.clone();
        Box::pin(async move {
            let response = future.await?;
            let mut parts = path.trim_start_matches('/').splitn(2, '/');
            let service = parts.next().unwrap_or_default().to_owned();
            let method = parts.next().unwrap_or_default().to_owned();
            // Trailers-only responses (errors) carry the status in the headers;
            // others report it in trailers, after the body: counted as OK here.
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(|c| format!("{:?}", tonic::Code::from_i32(c)))
                .unwrap_or_else(|| "Ok".to_owned());
            record_span.record("rpc.grpc.status_code", code.as_str());
            ::metrics::counter!("identity_grpc_requests_total", "service" => service.clone(), "method" => method.clone(), "code" => code)
                .increment(1);
            ::metrics::histogram!("identity_grpc_request_duration_seconds", "service" => service, "method" => method)
                .record(started.elapsed().as_secs_f64());
            Ok(response)
        }
        .instrument(span))
    }
}
