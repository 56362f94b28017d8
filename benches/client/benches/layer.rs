//! An axum endpoint behind `identity_client::AuthLayer` against the same
//! endpoint verifying the legacy HS256 JWT in-process with jsonwebtoken
//! (what a team would write instead).
//!
//! `cargo bench -p identity-client-bench --bench layer`
//!
//! - `in_process_jsonwebtoken`: an axum middleware decodes and validates the
//!   token (HS256, exp) and hands the claims to the handler.
//! - `layer_cached`: `AuthLayer::http` with the default verdict cache, the
//!   same token every request (the cache's hit path).
//! - `layer_uncached`: the cache off, so every request is a VerifyToken call
//!   over loopback gRPC to a stub service that answers at once: the client's
//!   and the network's share of a call, without the service's own
//!   verification (see benches/RESULTS.md for the service's).
//!
//! Each request goes through the whole axum router (`oneshot`), body and
//! all, on a multi-threaded tokio runtime.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    convert::Infallible,
    future::{Ready, ready},
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Extension, Router,
    body::Body,
    extract::Request,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use identity_client::{AuthLayer, CacheOptions, IdentityClient, Principal, pb};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use tower::ServiceExt;

const SECRET: &[u8] = b"legacy-bench-secret-0123456789abcdef";
const USER: &str = "6f1c2b9e-8a43-4f0e-9d57-0c8f3b1a2d44";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn token() -> String {
    let claims = serde_json::json!({
        "sub": USER, "exp": now() + 3600, "iat": now(), "jti": "6d3b0a4e-2f7e-4a49-8d0c-3f1b9b8e7a11",
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

#[derive(Clone, Deserialize)]
struct Claims {
    sub: String,
}

/// What a team would write instead of the layer.
async fn verify_in_process(mut request: Request, next: Next) -> Response {
    let key = DecodingKey::from_secret(SECRET);
    let validation = Validation::new(Algorithm::HS256);
    let token = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token.map(|t| jsonwebtoken::decode::<Claims>(t, &key, &validation)) {
        Some(Ok(data)) => {
            request.extensions_mut().insert(data.claims);
            next.run(request).await
        }
        _ => http::StatusCode::UNAUTHORIZED.into_response(),
    }
}

fn in_process_app() -> Router {
    Router::new()
        .route("/me", get(|Extension(c): Extension<Claims>| async move { c.sub }))
        .layer(middleware::from_fn(verify_in_process))
}

fn layer_app(client: IdentityClient) -> Router {
    Router::new()
        .route("/me", get(|p: Principal| async move { p.user_id }))
        .layer(AuthLayer::http(client))
}

/// A stub `identity.v1.IdentityService` whose VerifyToken accepts at once.
#[derive(Clone)]
struct StubIdentity;

struct Accept;

impl tonic::server::UnaryService<pb::VerifyTokenRequest> for Accept {
    type Response = pb::VerifyTokenResponse;
    type Future = Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, _: tonic::Request<pb::VerifyTokenRequest>) -> Self::Future {
        ready(Ok(tonic::Response::new(pb::VerifyTokenResponse {
            result: Some(pb::verify_token_response::Result::Principal(pb::Principal {
                user_id: USER.to_owned(),
                auth_method: pb::AuthMethod::LegacyJwt.into(),
                email: "ann@example.com".to_owned(),
                migration_state: pb::MigrationState::LegacyOnly.into(),
                expires_at: Some(prost_types::Timestamp {
                    seconds: (now() + 3600) as i64,
                    nanos: 0,
                }),
                ..Default::default()
            })),
        })))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for StubIdentity {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<pb::VerifyTokenResponse, pb::VerifyTokenRequest>::default();
            Ok(tonic::server::Grpc::new(codec).unary(Accept, request).await)
        })
    }
}

impl tonic::server::NamedService for StubIdentity {
    const NAME: &'static str = "identity.v1.IdentityService";
}

async fn stub_service() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(StubIdentity)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

async fn hit(app: &Router, token: &str) {
    let request = http::Request::get("/me")
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
    assert_eq!(body.len(), USER.len());
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let token = token();
    let (cached, uncached) = runtime.block_on(async {
        let addr = stub_service().await;
        let url = format!("http://{addr}");
        let cached = IdentityClient::builder("idk_bench")
            .endpoint(url.clone())
            .cache(CacheOptions::default())
            .connect()
            .await
            .unwrap();
        let uncached = IdentityClient::builder("idk_bench")
            .endpoint(url)
            .connect()
            .await
            .unwrap();
        (layer_app(cached), layer_app(uncached))
    });
    let in_process = in_process_app();
    runtime.block_on(async {
        hit(&in_process, &token).await;
        hit(&cached, &token).await;
        hit(&uncached, &token).await;
    });
    println!(
        "configuration: legacy HS256 token ({} bytes), CacheOptions::default() (10,000 entries, 5 s staleness), \
         tokio multi-thread runtime with 2 workers, one request at a time through Router::oneshot",
        token.len()
    );

    let mut group = c.benchmark_group("axum_endpoint");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("in_process_jsonwebtoken", |b| {
        b.to_async(&runtime).iter(|| hit(&in_process, &token))
    });
    group.bench_function("layer_cached", |b| b.to_async(&runtime).iter(|| hit(&cached, &token)));
    group.bench_function("layer_uncached", |b| {
        b.to_async(&runtime).iter(|| hit(&uncached, &token))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
