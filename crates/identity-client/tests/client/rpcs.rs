//! Every RPC of both services through the typed client, and the typed errors.

use identity_client::{
    AuthMethod, AuthMode, Error, IdentityClient, MigrationState, RejectionReason,
    pb::{self, get_mapping_request, get_user_request},
};

use crate::common::{TestApp, legacy_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_service_rpcs() {
    let app = TestApp::spawn().await;
    let ann = app.legacy_user("ann@example.com").await;
    let client = app.client(&app.admin_key).await;

    let token = legacy_for(&ann, 3600);
    let principal = client.verify_token(&token).await.unwrap();
    assert_eq!(principal.user_id, ann.to_string());
    assert_eq!(principal.auth_method, AuthMethod::LegacyJwt);
    assert_eq!(principal.migration_state, MigrationState::LegacyOnly);
    assert_eq!(principal.email.as_deref(), Some("ann@example.com"));
    assert!(principal.expires_at.is_some());

    let user = client
        .get_user(get_user_request::Lookup::UserId(ann.to_string()))
        .await
        .unwrap();
    assert_eq!(user.email, "ann@example.com");

    assert!(client.revoke_token(&token).await.unwrap().is_some());
    let err = client.verify_token(&token).await.unwrap_err();
    assert_eq!(err.rejection(), Some(RejectionReason::Revoked), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_service_rpcs() {
    let app = TestApp::spawn().await;
    let ann = app.legacy_user("ann@example.com").await;
    let client = app.client(&app.admin_key).await;

    let mapping = client.link_user(&ann.to_string(), "user_2annclerk").await.unwrap();
    assert_eq!(mapping.clerk_user_id, "user_2annclerk");
    let found = client
        .get_mapping(get_mapping_request::Lookup::ClerkUserId("user_2annclerk".into()))
        .await
        .unwrap();
    assert_eq!(found.user_id, ann.to_string());
    let removed = client.unlink_user(&ann.to_string()).await.unwrap();
    assert_eq!(removed.clerk_user_id, "user_2annclerk");
    assert!(matches!(
        client
            .get_mapping(get_mapping_request::Lookup::UserId(ann.to_string()))
            .await,
        Err(Error::NotFound { .. })
    ));

    let before = client.get_auth_mode().await.unwrap();
    assert_eq!(before.mode(), AuthMode::Dual);
    let set = client.set_auth_mode(AuthMode::LegacyOnly).await.unwrap();
    assert_eq!(
        (set.mode(), set.previous_mode()),
        (AuthMode::LegacyOnly, AuthMode::Dual)
    );
    assert_eq!(client.get_auth_mode().await.unwrap().mode(), AuthMode::LegacyOnly);

    let events = client
        .list_audit_events(pb::ListAuditEventsRequest {
            user_id: ann.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(events.events.len() >= 2, "link and unlink are audited: {events:?}");

    let stats = client
        .get_migration_stats(pb::GetMigrationStatsRequest::default())
        .await
        .unwrap();
    assert_eq!(stats.total_users, 1);
    let mut metrics = client
        .stream_migration_metrics(pb::StreamMigrationMetricsRequest {
            interval_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let first = metrics.message().await.unwrap().unwrap();
    assert_eq!(first.stats.unwrap().total_users, 1);
    drop(metrics);

    let initiated = client
        .initiate_migration(pb::InitiateMigrationRequest {
            subject: Some(pb::initiate_migration_request::Subject::UserId(ann.to_string())),
            email: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(initiated.user_id, ann.to_string());
    let completed = client
        .complete_migration("not-a-migration-token", "not-a-session")
        .await;
    match completed {
        Err(Error::InvalidArgument { fields, .. }) => assert_eq!(fields[0].field, "clerk_session_token"),
        other => panic!("{other:?}"),
    }

    // Bulk migration needs Clerk's Backend API, which this service has not
    // got: the stream is refused before it opens, as a typed error.
    let bulk = client
        .start_bulk_migration(pb::StartBulkMigrationRequest {
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&bulk, Error::Conflict { code: tonic::Code::FailedPrecondition, message } if message.contains("Backend API")),
        "{bulk:?}"
    );
    // So does a reconciliation with Clerk.
    let reconcile = client
        .reconcile_mappings(pb::ReconcileMappingsRequest::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&reconcile, Error::Conflict { code: tonic::Code::FailedPrecondition, message } if message.contains("Backend API")),
        "{reconcile:?}"
    );
    let cancel = client
        .cancel_bulk_migration("00000000-0000-4000-8000-000000000000")
        .await;
    assert!(matches!(cancel, Err(Error::NotFound { .. })), "{cancel:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_who_must_act() {
    let app = TestApp::spawn().await;
    let ann = app.legacy_user("ann@example.com").await;

    let client = app.client(&app.verify_key).await;
    let err = client.verify_token("not-a-jwt").await.unwrap_err();
    assert_eq!(err.rejection(), Some(RejectionReason::Malformed), "{err}");
    let err = client.verify_token(&legacy_for(&ann, -120)).await.unwrap_err();
    assert_eq!(err.rejection(), Some(RejectionReason::Expired), "{err}");

    let err = client.set_auth_mode(AuthMode::ClerkOnly).await.unwrap_err();
    assert!(matches!(err, Error::MissingScope { .. }), "{err:?}");
    assert!(err.is_misconfiguration());

    let wrong = app.client("idk_wrong_0123456789").await;
    let err = wrong.verify_token(&legacy_for(&ann, 60)).await.unwrap_err();
    assert!(matches!(err, Error::BadApiKey { .. }), "{err:?}");
    assert!(
        !err.to_string().contains("idk_wrong"),
        "the key stays out of errors: {err}"
    );

    let err = app
        .client(&app.admin_key)
        .await
        .get_user(get_user_request::Lookup::UserId("nope".into()))
        .await
        .unwrap_err();
    match err {
        Error::InvalidArgument { fields, .. } => assert_eq!(fields[0].field, "user_id"),
        other => panic!("{other:?}"),
    }

    let mut app = app;
    app.stop().await;
    let err = client.verify_token(&legacy_for(&ann, 60)).await.unwrap_err();
    assert!(err.is_outage(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_replicas_with_one_down() {
    let app = TestApp::spawn().await;
    let ann = app.legacy_user("ann@example.com").await;
    // Port 9 (discard) on loopback: nothing listens there.
    let client = IdentityClient::builder(app.verify_key.clone())
        .endpoints([app.url.clone(), "http://127.0.0.1:9".to_owned()])
        .connect()
        .await
        .unwrap();
    for _ in 0..20 {
        let principal = client.verify_token(&legacy_for(&ann, 3600)).await.unwrap();
        assert_eq!(principal.user_id, ann.to_string());
    }
}
