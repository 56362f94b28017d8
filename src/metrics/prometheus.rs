//! Prometheus text exposition on its own HTTP port (`IDENTITY_METRICS_ADDR`),
//! and the gRPC layer that counts requests by service, method and code.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, OnceLock, RwLock},
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

/// Paths beyond this many distinct ones are counted as `unknown`: a client
/// sending made-up method names cannot grow the metric families.
const MAX_PATHS: usize = 256;

/// The metric handles of one gRPC path, registered on its first call.
struct PathMetrics {
    service: String,
    method: String,
    duration: ::metrics::Histogram,
    /// By status code (0-16), registered on first use.
    codes: [OnceLock<::metrics::Counter>; 17],
}

impl PathMetrics {
    fn new(service: &str, method: &str) -> Self {
        Self {
            service: service.to_owned(),
            method: method.to_owned(),
            duration: ::metrics::histogram!(
                "identity_grpc_request_duration_seconds",
                "service" => service.to_owned(),
                "method" => method.to_owned()
            ),
            codes: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn count(&self, code: tonic::Code) {
        let slot = usize::try_from(code as i32).unwrap_or(2).min(16);
        self.codes[slot]
            .get_or_init(|| {
                ::metrics::counter!(
                    "identity_grpc_requests_total",
                    "service" => self.service.clone(),
                    "method" => self.method.clone(),
                    "code" => format!("{code:?}")
                )
            })
            .increment(1);
    }
}

/// Handles by request path, shared by every connection.
#[derive(Default)]
struct PathRegistry {
    paths: RwLock<HashMap<String, Arc<PathMetrics>>>,
    unknown: OnceLock<Arc<PathMetrics>>,
}

impl PathRegistry {
    fn get(&self, path: &str) -> Arc<PathMetrics> {
        if let Some(found) = self.paths.read().unwrap_or_else(|p| p.into_inner()).get(path) {
            return found.clone();
        }
        let mut paths = self.paths.write().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = paths.get(path) {
            return found.clone();
        }
        if paths.len() >= MAX_PATHS {
            return self
                .unknown
                .get_or_init(|| Arc::new(PathMetrics::new("unknown", "unknown")))
                .clone();
        }
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
        let metrics = Arc::new(PathMetrics::new(service, method));
        paths.insert(path.to_owned(), metrics.clone());
        metrics
    }
}

/// Counts gRPC requests and their latency by service, method and status
/// code, and runs each in a span that continues the caller's trace.
#[derive(Clone, Default)]
pub struct GrpcMetricsLayer {
    registry: Arc<PathRegistry>,
}

impl std::fmt::Debug for GrpcMetricsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcMetricsLayer")
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            registry: self.registry.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    registry: Arc<PathRegistry>,
}

impl<S> std::fmt::Debug for GrpcMetrics<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcMetrics")
    }
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
        let metrics = self.registry.get(request.uri().path());
        let started = Instant::now();
        let span = crate::telemetry::rpc_span(request.uri().path(), request.headers());
        let future = self.inner.call(request);
        let record_span = span.clone();
        Box::pin(
            async move {
                let response = future.await?;
                // Trailers-only responses (errors) carry the status in the headers;
                // others report it in trailers, after the body: counted as OK here.
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                if !record_span.is_disabled() {
                    record_span.record("rpc.grpc.status_code", format!("{code:?}").as_str());
                }
                metrics.count(code);
                metrics.duration.record(started.elapsed().as_secs_f64());
                Ok(response)
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_paths_share_one_unknown_entry() {
        let registry = PathRegistry::default();
        let first = registry.get("/identity.v1.IdentityService/VerifyToken");
        assert_eq!(
            (first.service.as_str(), first.method.as_str()),
            ("identity.v1.IdentityService", "VerifyToken")
        );
        assert!(Arc::ptr_eq(
            &first,
            &registry.get("/identity.v1.IdentityService/VerifyToken")
        ));
        for i in 0..MAX_PATHS * 2 {
            registry.get(&format!("/x.Y/M{i}"));
        }
        assert_eq!(registry.paths.read().unwrap().len(), MAX_PATHS);
        let overflow = registry.get("/x.Y/another");
        assert_eq!(overflow.service, "unknown");
        assert!(Arc::ptr_eq(
            &first,
            &registry.get("/identity.v1.IdentityService/VerifyToken")
        ));
    }
}
