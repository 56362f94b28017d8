//! grpc.health.v1 and server reflection (v1 and v1alpha), without API keys.

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::common::{Backend, TestApp, TestDb};

const SERVICES: [&str; 3] = ["", "identity.v1.IdentityService", "identity.v1.MigrationService"];

async fn status_of(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> Result<ServingStatus, tonic::Status> {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status())
}

/// Polls until `service` reports `want`, for up to 10 s.
async fn wait_for(client: &mut HealthClient<tonic::transport::Channel>, service: &str, want: ServingStatus) {
    for _ in 0..100 {
        if status_of(client, service).await.ok() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{service:?} never became {want:?}; last: {:?}",
        status_of(client, service).await
    );
}

async fn serving_for_the_server_and_each_service(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut health = HealthClient::new(app.channel.clone());
    for service in SERVICES {
        wait_for(&mut health, service, ServingStatus::Serving).await;
    }
    let unknown = status_of(&mut health, "identity.v1.Nope").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let mut watch = health
        .watch(HealthCheckRequest {
            service: "identity.v1.IdentityService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    if app.db.backend == Backend::Postgres {
        // The database goes away: every service turns NOT_SERVING, and Watch says so.
        app.db.drop_postgres().await;
        for service in SERVICES {
            wait_for(&mut health, service, ServingStatus::NotServing).await;
        }
        // Liveness follows the process only: no restart loop during an outage.
        assert_eq!(
            status_of(&mut health, "liveness").await.unwrap(),
            ServingStatus::Serving
        );
        let update = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(update.status(), ServingStatus::NotServing);
    }
    app.shutdown().await;
}

/// Until the stored auth mode has been read, nothing is verified (a
/// replica must not enforce `dual` after a `clerk_only` cutover).
async fn an_unknown_auth_mode_fails_closed(db: TestDb) {
    use identity::pb::{RejectionReason, VerifyTokenRequest};
    // A stored mode this replica cannot read.
    {
        let storage = db.storage().await;
        let event = identity::storage::NewAuditEvent {
            caller: "test".into(),
            action: "auth_mode.set".into(),
            user_id: None,
            outcome: identity::domain::AuditOutcome::Success,
            detail: String::new(),
        };
        storage.put_setting("auth_mode", "clerk_only_v2", &event).await.unwrap();
    }
    let (mut config, keys) = crate::common::test_config(&db);
    config.verification.legacy = Some(crate::common::legacy_config());
    let app = TestApp::spawn_with(db, config, keys).await;
    let mut health = HealthClient::new(app.channel.clone());
    assert_eq!(
        status_of(&mut health, "identity.v1.IdentityService").await.unwrap(),
        ServingStatus::NotServing
    );
    assert_eq!(
        status_of(&mut health, "liveness").await.unwrap(),
        ServingStatus::Serving
    );
    let user = app.legacy_user("ann@example.com").await;
    let token = crate::common::tokens::legacy(crate::common::tokens::legacy_claims(&user.to_string()));
    let err = app
        .identity(&app.verify_key)
        .verify_token(VerifyTokenRequest {
            token: token.clone(),
            expected_audience: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // Once a valid mode is stored, the next refresh enables verification.
    let event = identity::storage::NewAuditEvent {
        caller: "test".into(),
        action: "auth_mode.set".into(),
        user_id: None,
        outcome: identity::domain::AuditOutcome::Success,
        detail: String::new(),
    };
    app.storage
        .put_setting("auth_mode", "clerk_only", &event)
        .await
        .unwrap();
    wait_for(&mut health, "identity.v1.IdentityService", ServingStatus::Serving).await;
    assert_eq!(
        crate::common::rejected(app.verify(&token).await),
        RejectionReason::MethodDisabled
    );
    app.shutdown().await;
}

async fn reflection_lists_every_service_in_both_versions(db: TestDb) {
    let app = TestApp::spawn(db).await;
    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new(app.channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = stream.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("{response:?}")
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        for expected in [
            "identity.v1.IdentityService",
            "identity.v1.MigrationService",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
        }
        // The symbol of a message resolves to its file, documented; so do the
        // google.rpc error details, so grpcurl decodes BadRequest.
        for symbol in [
            "identity.v1.LinkUserRequest",
            "google.rpc.BadRequest",
            "google.rpc.RetryInfo",
        ] {
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
            };
            let mut stream = client
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .unwrap()
                .into_inner();
            let response = stream.next().await.unwrap().unwrap();
            assert!(
                matches!(
                    response.message_response,
                    Some(MessageResponse::FileDescriptorResponse(_))
                ),
                "{symbol}: {response:?}"
            );
        }
    }
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new(app.channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = stream.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("{response:?}")
        };
        assert!(list.service.iter().any(|s| s.name == "identity.v1.MigrationService"));
    }
    app.shutdown().await;
}

/// Each HTTP/2 connection may open a bounded number of concurrent calls
/// (tonic's default is unbounded), announced in the server's SETTINGS.
async fn the_server_bounds_concurrent_calls_per_connection(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let addr = app.server_addr();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut announced = send.current_max_send_streams();
    for _ in 0..50 {
        if announced == 256 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        announced = send.current_max_send_streams();
    }
    assert_eq!(announced, 256, "SETTINGS_MAX_CONCURRENT_STREAMS");
    drop(send);
    driver.abort();
    app.shutdown().await;
}

crate::backend_tests!(
    serving_for_the_server_and_each_service,
    an_unknown_auth_mode_fails_closed,
    reflection_lists_every_service_in_both_versions,
    the_server_bounds_concurrent_calls_per_connection,
);
