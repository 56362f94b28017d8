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
        let update = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(update.status(), ServingStatus::NotServing);
    }
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
        // The symbol of a message resolves to its file, documented.
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "identity.v1.LinkUserRequest".into(),
            )),
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
            "{response:?}"
        );
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

crate::backend_tests!(
    serving_for_the_server_and_each_service,
    reflection_lists_every_service_in_both_versions
);
