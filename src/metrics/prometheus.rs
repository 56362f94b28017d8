//! Prometheus text exposition (`GET /metrics` on the HTTP listener, see [`crate::http`]),
//! and the gRPC layer that counts requests by service, method and code.
//!
//! Figures counted on every call (gRPC requests, verifications) are kept in
//! per-thread counters and written out at scrape time; the occasional ones
//! (gauges, JWKS fetches) go through the `metrics` crate's recorder.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, OnceLock, RwLock},
    task::{Context, Poll},
    time::Instant,
};

use super::{
    AuthRecorder,
    auth::{LATENCY_BOUNDS_US, record_latency},
    per_thread::PerThreadCounters,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide recorder (installed once; later servers in the same
/// process, as in tests, share it).
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            ::metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// Prometheus text format, written family by family.
#[derive(Debug, Default)]
pub struct Text(String);

impl Text {
    pub fn family(&mut self, name: &str, kind: &str) {
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.0, " {value}");
    }

    /// A histogram over [`LATENCY_BOUNDS_US`] from per-slot counts.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], slots: &[u64], sum_nanos: u64) {
        let mut cumulative = 0u64;
        for (bound, n) in LATENCY_BOUNDS_US.iter().zip(slots) {
            cumulative += n;
            let le = if *bound == u64::MAX {
                "+Inf".to_owned()
            } else {
                (*bound as f64 / 1e6).to_string()
            };
            let _ = write!(self.0, "{name}_bucket");
            self.labels(labels, Some(&le));
            let _ = writeln!(self.0, " {cumulative}");
        }
        let _ = write!(self.0, "{name}_sum");
        self.labels(labels, None);
        let _ = writeln!(self.0, " {}", sum_nanos as f64 / 1e9);
        let _ = write!(self.0, "{name}_count");
        self.labels(labels, None);
        let _ = writeln!(self.0, " {cumulative}");
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
        for (i, (key, value)) in all.enumerate() {
            self.0.push(if i == 0 { '{' } else { ',' });
            let _ = write!(self.0, "{key}=\"");
            for c in value.chars() {
                match c {
                    '\\' => self.0.push_str("\\\\"),
                    '"' => self.0.push_str("\\\""),
                    '\n' => self.0.push_str("\\n"),
                    c => self.0.push(c),
                }
            }
            self.0.push('"');
        }
        if !labels.is_empty() || le.is_some() {
            self.0.push('}');
        }
    }
}

/// What `/metrics` shows: the recorder's figures, then the per-call ones of this server.
#[derive(Debug, Clone)]
pub struct Exposition {
    pub auth: Arc<AuthRecorder>,
    pub grpc: GrpcMetricsLayer,
    pub verifier: crate::verification::Verifier,
    pub gateway: Arc<crate::gateway::GatewayRecorder>,
}

impl Exposition {
    pub fn render(&self) -> String {
        let mut text = Text(handle().map(|h| h.render()).unwrap_or_default());
        self.auth.render_prometheus(&mut text);
        let cache = self.verifier.token_cache_usage();
        text.family("identity_token_cache_entries", "gauge");
        text.sample("identity_token_cache_entries", &[], cache.entries);
        text.family("identity_token_cache_capacity", "gauge");
        text.sample("identity_token_cache_capacity", &[], cache.capacity);
        if let Some(usable) = self.verifier.clerk_keys_usable() {
            text.family("identity_clerk_keys_usable", "gauge");
            text.sample("identity_clerk_keys_usable", &[], u64::from(usable));
        }
        if let Some(age) = self.verifier.clerk_key_age() {
            text.family("identity_jwks_key_age_seconds", "gauge");
            text.sample("identity_jwks_key_age_seconds", &[], age.as_secs());
        }
        self.gateway.render_prometheus(&mut text);
        self.grpc.registry.render(&mut text);
        text.0
    }
}

/// `GET /metrics`: the Prometheus exposition, for the HTTP listener.
pub fn router(exposition: Exposition) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = exposition.render();
            async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
        }),
    )
}

/// Paths beyond this many distinct ones are counted as `unknown`: a client
/// sending made-up method names cannot grow the metric families.
const MAX_PATHS: usize = 256;

/// Where each figure of a path lives in its per-thread cells.
const CODES: usize = 17;
const PATH_CELLS: usize = CODES + LATENCY_BOUNDS_US.len() + 1;
const SUM_NANOS: usize = PATH_CELLS - 1;

/// The figures of one gRPC path: requests by status code, and latency.
struct PathMetrics {
    service: String,
    method: String,
    cells: PerThreadCounters<PATH_CELLS>,
}

impl PathMetrics {
    fn new(service: &str, method: &str) -> Self {
        Self {
            service: service.to_owned(),
            method: method.to_owned(),
            cells: PerThreadCounters::default(),
        }
    }

    fn record(&self, code: tonic::Code, elapsed: std::time::Duration) {
        self.cells
            .add(usize::try_from(code as i32).unwrap_or(2).min(CODES - 1), 1);
        record_latency(&self.cells, CODES, SUM_NANOS, elapsed);
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

    fn render(&self, out: &mut Text) {
        let mut all: Vec<_> = self
            .paths
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.extend(self.unknown.get().cloned());
        let totals: Vec<_> = all.iter().map(|p| p.cells.sum()).collect();
        out.family("identity_grpc_requests_total", "counter");
        for (path, cells) in all.iter().zip(&totals) {
            for (code, n) in cells[..CODES].iter().enumerate() {
                if *n > 0 {
                    let code = format!("{:?}", tonic::Code::from_i32(code as i32));
                    let labels = [
                        ("service", path.service.as_str()),
                        ("method", path.method.as_str()),
                        ("code", &code),
                    ];
                    out.sample("identity_grpc_requests_total", &labels, *n);
                }
            }
        }
        out.family("identity_grpc_request_duration_seconds", "histogram");
        for (path, cells) in all.iter().zip(&totals) {
            let labels = [("service", path.service.as_str()), ("method", path.method.as_str())];
            out.histogram(
                "identity_grpc_request_duration_seconds",
                &labels,
                &cells[CODES..SUM_NANOS],
                cells[SUM_NANOS],
            );
        }
    }
}

/// Counts gRPC requests and their latency by service, method and status
/// code, and runs each in a span that continues the caller's trace.
#[derive(Clone, Default)]
pub struct GrpcMetricsLayer {
    registry: Arc<PathRegistry>,
    tracing: crate::telemetry::RpcTracing,
}

impl GrpcMetricsLayer {
    /// Counts every RPC and gives each the span `tracing` builds.
    pub fn new(tracing: crate::telemetry::RpcTracing) -> Self {
        Self {
            registry: Arc::default(),
            tracing,
        }
    }
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
            tracing: self.tracing.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    registry: Arc<PathRegistry>,
    tracing: crate::telemetry::RpcTracing,
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
        let crate::telemetry::RpcSpan { log, exported } = self.tracing.span(request.uri().path(), request.headers());
        let future = self.inner.call(request);
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
                if let Some(exported) = exported {
                    let outcome = response.extensions().get::<crate::telemetry::Outcome>().copied();
                    exported.end(code, outcome);
                }
                metrics.record(code, started.elapsed());
                Ok(response)
            }
            .instrument(log),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_escapes_labels_and_accumulates_buckets() {
        let mut text = Text::default();
        text.sample("c_total", &[("path", "a\"b\\c\nd")], 7);
        let mut slots = [0u64; LATENCY_BOUNDS_US.len()];
        slots[0] = 2; // <= 50 µs
        slots[2] = 1; // <= 250 µs
        text.histogram("h_seconds", &[("m", "x")], &slots, 1_500_000);
        let out = text.0;
        assert!(out.starts_with("c_total{path=\"a\\\"b\\\\c\\nd\"} 7\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{m=\"x\",le=\"0.00005\"} 2\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{m=\"x\",le=\"0.0001\"} 2\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{m=\"x\",le=\"0.00025\"} 3\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{m=\"x\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("h_seconds_sum{m=\"x\"} 0.0015\n"), "{out}");
        assert!(out.contains("h_seconds_count{m=\"x\"} 3\n"), "{out}");
    }

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
