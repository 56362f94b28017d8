//! Service-to-service access: API keys and scopes, request size limits.

use identity::pb::{
    GetAuthModeRequest, GetUserRequest, LinkUserRequest, ListAuditEventsRequest, SetAuthModeRequest,
    get_user_request::Lookup,
};
use tonic::Code;

use crate::common::{TestApp, TestDb};

async fn missing_or_unknown_keys_are_unauthenticated(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let id = app.legacy_user("ann@example.com").await;
    let request = || GetUserRequest {
        lookup: Some(Lookup::UserId(id.to_string())),
    };

    let mut anonymous = identity::pb::identity_service_client::IdentityServiceClient::new(app.channel.clone());
    assert_eq!(
        anonymous.get_user(request()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        app.identity("idk_not-a-real-key")
            .get_user(request())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    let mut raw = tonic::Request::new(request());
    raw.metadata_mut()
        .insert("authorization", format!("Basic {}", app.verify_key).parse().unwrap());
    let status = anonymous.get_user(raw).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // The key is never echoed back.
    assert!(!status.message().contains(&app.verify_key));

    assert!(app.identity(&app.verify_key).get_user(request()).await.is_ok());
    app.shutdown().await;
}

async fn scopes_gate_each_rpc(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let id = app.legacy_user("ann@example.com").await;
    let link = || LinkUserRequest {
        user_id: id.to_string(),
        clerk_user_id: "user_x".into(),
    };

    for key in [&app.verify_key, &app.migrate_key] {
        let mut client = app.migration(key);
        assert_eq!(
            client.link_user(link()).await.unwrap_err().code(),
            Code::PermissionDenied
        );
        assert_eq!(
            client
                .set_auth_mode(SetAuthModeRequest { mode: 2 })
                .await
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        assert_eq!(
            client
                .list_audit_events(ListAuditEventsRequest::default())
                .await
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        assert!(client.get_auth_mode(GetAuthModeRequest {}).await.is_ok());
    }
    let denied = app
        .identity(&app.migrate_key)
        .get_user(GetUserRequest {
            lookup: Some(Lookup::UserId(id.to_string())),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("verify"), "{denied:?}");
    assert!(app.admin().link_user(link()).await.is_ok());
    app.shutdown().await;
}

async fn oversized_requests_are_refused_not_internal(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let huge = format!("{}@example.com", "a".repeat(200 * 1024));
    let status = app
        .identity(&app.verify_key)
        .get_user(GetUserRequest {
            lookup: Some(Lookup::Email(huge)),
        })
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Internal);
    assert_ne!(status.code(), Code::Ok);
    // Below the limit but absurd: a clear validation error.
    let long = format!("{}@example.com", "a".repeat(1000));
    let status = app
        .identity(&app.verify_key)
        .get_user(GetUserRequest {
            lookup: Some(Lookup::Email(long)),
        })
        .await
        .unwrap_err();
    crate::common::assert_invalid(&status, "email");
    app.shutdown().await;
}

crate::backend_tests!(
    missing_or_unknown_keys_are_unauthenticated,
    scopes_gate_each_rpc,
    oversized_requests_are_refused_not_internal,
);
