//! The tower layer on a real axum app and a real tonic service.

use std::net::SocketAddr;

use axum::{Router, routing::get};
use identity_client::{AuthLayer, AuthMethod, IdentityClient, Principal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::{TestApp, clerk_for, legacy_for};

/// An axum app behind the layer: `/me` needs a principal, `/public` does
/// not, `/clerk` only takes Clerk sessions.
async fn serve_app(client: IdentityClient) -> SocketAddr {
    let protected = Router::new()
        .route("/me", get(|p: Principal| async move { p.user_id }))
        .layer(AuthLayer::http(client.clone()));
    let public = Router::new()
        .route(
            "/public",
            get(|p: Option<Principal>| async move { p.map_or("anonymous".to_owned(), |p| p.user_id) }),
        )
        .layer(AuthLayer::http(client.clone()).optional());
    let clerk_only = Router::new()
        .route("/clerk", get(|p: Principal| async move { p.user_id }))
        .layer(AuthLayer::http(client).allow_methods([AuthMethod::Clerk]));
    let app = protected.merge(public).merge(clerk_only);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A plain HTTP/1.0 GET; the status, the `WWW-Authenticate` header and the body.
async fn get_with(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, Option<String>, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: app\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let challenge = head
        .lines()
        .find_map(|l| l.strip_prefix("www-authenticate: ").map(str::to_owned));
    (status, challenge, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_route_behind_the_layer() {
    let mut app = TestApp::spawn().await;
    let ann = app.legacy_user("ann@example.com").await;
    let client = app.client(&app.verify_key).await;
    let addr = serve_app(client).await;

    let token = legacy_for(&ann, 3600);
    let (status, _, body) = get_with(addr, "/me", Some(&token)).await;
    assert_eq!((status, body.as_str()), (200, ann.to_string().as_str()));

    // A Clerk session of a user linked to Clerk reaches the handler too,
    // and passes where only Clerk sessions are allowed.
    let bob = app.legacy_user("bob@example.com").await;
    IdentityClient::connect(app.url.clone(), app.admin_key.clone())
        .await
        .unwrap()
        .link_user(&bob.to_string(), "user_2bobclerk")
        .await
        .unwrap();
    let session = clerk_for("user_2bobclerk");
    let (status, _, body) = get_with(addr, "/me", Some(&session)).await;
    assert_eq!((status, body), (200, bob.to_string()));
    let (status, _, body) = get_with(addr, "/clerk", Some(&session)).await;
    assert_eq!((status, body), (200, bob.to_string()));

    let (status, challenge, _) = get_with(addr, "/me", Some("not-a-jwt")).await;
    assert_eq!(status, 401);
    let challenge = challenge.unwrap();
    assert!(
        challenge.starts_with("Bearer error=\"invalid_token\", error_description=\""),
        "{challenge}"
    );

    let (status, challenge, _) = get_with(addr, "/me", Some(&legacy_for(&ann, -120))).await;
    assert_eq!(status, 401);
    assert!(challenge.unwrap().contains("invalid_token"));

    let (status, challenge, _) = get_with(addr, "/me", None).await;
    assert_eq!((status, challenge.as_deref()), (401, Some("Bearer")));

    // Public routes: no token is fine, a token is still verified.
    let (status, _, body) = get_with(addr, "/public", None).await;
    assert_eq!((status, body.as_str()), (200, "anonymous"));
    let (status, _, body) = get_with(addr, "/public", Some(&token)).await;
    assert_eq!((status, body), (200, ann.to_string()));
    let (status, _, _) = get_with(addr, "/public", Some("not-a-jwt")).await;
    assert_eq!(status, 401);

    // A legacy token where only Clerk sessions are allowed.
    let (status, challenge, _) = get_with(addr, "/clerk", Some(&token)).await;
    assert_eq!(status, 401);
    assert!(challenge.unwrap().contains("invalid_token"));

    // The service stops: outage, never an allow (the client has no cache).
    app.stop().await;
    let (status, _, _) = get_with(addr, "/me", Some(&token)).await;
    assert_eq!(status, 503);
    let (status, _, _) = get_with(addr, "/public", Some(&token)).await;
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_service_behind_the_layer() {
    let mut app = TestApp::spawn().await;
    let ann = app.legacy_user("ann@example.com").await;
    let client = app.client(&app.verify_key).await;

    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .layer(AuthLayer::grpc(client))
        .add_service(health)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let check = |token: Option<String>| {
        let mut health = HealthClient::new(channel.clone());
        async move {
            let mut request = tonic::Request::new(HealthCheckRequest::default());
            if let Some(token) = token {
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            health.check(request).await.map(|_| ())
        }
    };

    check(Some(legacy_for(&ann, 3600))).await.unwrap();
    let denied = check(Some("not-a-jwt".to_owned())).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);
    let denied = check(None).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);

    app.stop().await;
    let denied = check(Some(legacy_for(&ann, 3600))).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::Unavailable);
}

/// A tonic handler that answers GetUser with the caller's own principal.
#[derive(Clone)]
struct WhoAmI;

#[tonic::async_trait]
impl identity::pb::identity_service_server::IdentityService for WhoAmI {
    async fn verify_token(
        &self,
        _: tonic::Request<identity::pb::VerifyTokenRequest>,
    ) -> Result<tonic::Response<identity::pb::VerifyTokenResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn revoke_token(
        &self,
        _: tonic::Request<identity::pb::RevokeTokenRequest>,
    ) -> Result<tonic::Response<identity::pb::RevokeTokenResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn get_user(
        &self,
        request: tonic::Request<identity::pb::GetUserRequest>,
    ) -> Result<tonic::Response<identity::pb::GetUserResponse>, tonic::Status> {
        let principal = request
            .extensions()
            .get::<Principal>()
            .ok_or_else(|| tonic::Status::internal("no principal"))?;
        Ok(tonic::Response::new(identity::pb::GetUserResponse {
            user: Some(identity::pb::User {
                user_id: principal.user_id.clone(),
                email: principal.email.clone().unwrap_or_default(),
                ..Default::default()
            }),
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_handler_reads_the_principal() {
    let app = TestApp::spawn().await;
    let ann = app.legacy_user("ann@example.com").await;
    let client = app.client(&app.verify_key).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(AuthLayer::grpc(client))
            .add_service(identity::pb::identity_service_server::IdentityServiceServer::new(
                WhoAmI,
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // The end user's token travels as `authorization: Bearer`, as the
    // client sends its key: reuse the client against the protected service.
    let user = IdentityClient::connect(format!("http://{addr}"), legacy_for(&ann, 3600))
        .await
        .unwrap()
        .get_user(identity_client::pb::get_user_request::Lookup::Email(String::new()))
        .await
        .unwrap();
    assert_eq!(
        (user.user_id, user.email),
        (ann.to_string(), "ann@example.com".to_owned())
    );
}
