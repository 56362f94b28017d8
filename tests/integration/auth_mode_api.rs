//! GetAuthMode and SetAuthMode through a real gRPC client.

use identity::pb::{AuthMode, GetAuthModeRequest, ListAuditEventsRequest, SetAuthModeRequest};
use tonic::Code;

use crate::common::{TestApp, TestDb, assert_invalid, test_config};

async fn default_is_dual_and_changes_are_stored_and_audited(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut admin = app.admin();
    let initial = admin.get_auth_mode(GetAuthModeRequest {}).await.unwrap().into_inner();
    assert_eq!(initial.mode(), AuthMode::Dual);
    assert!(initial.updated_at.is_none());

    let set = admin
        .set_auth_mode(SetAuthModeRequest {
            mode: AuthMode::ClerkOnly as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.mode(), AuthMode::ClerkOnly);
    assert_eq!(set.previous_mode(), AuthMode::Dual);

    let now = app
        .migration(&app.verify_key)
        .get_auth_mode(GetAuthModeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.mode(), AuthMode::ClerkOnly);
    assert_eq!(now.updated_by, "admin");
    assert!(now.updated_at.is_some());

    let back = admin
        .set_auth_mode(SetAuthModeRequest {
            mode: AuthMode::LegacyOnly as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.previous_mode(), AuthMode::ClerkOnly);

    let events = admin
        .list_audit_events(ListAuditEventsRequest {
            action: "auth_mode.set".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 2);
    assert!(events[0].detail.contains("legacy_only"));
    assert!(events[1].detail.contains("clerk_only"));
    app.shutdown().await;
}

async fn unspecified_or_unknown_mode_is_invalid(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut admin = app.admin();
    for mode in [0, 42, -1] {
        let status = admin.set_auth_mode(SetAuthModeRequest { mode }).await.unwrap_err();
        assert_invalid(&status, "mode");
    }
    assert_eq!(
        admin
            .get_auth_mode(GetAuthModeRequest {})
            .await
            .unwrap()
            .into_inner()
            .mode(),
        AuthMode::Dual
    );
    app.shutdown().await;
}

async fn mode_set_on_one_replica_is_read_by_another(db: TestDb) {
    // Two servers on one database.
    let (config, keys) = test_config(&db);
    let second_db = db.share();
    let first = TestApp::spawn_with(db, config.clone(), keys.clone()).await;
    let second = TestApp::spawn_with(second_db, config, keys).await;
    first
        .admin()
        .set_auth_mode(SetAuthModeRequest {
            mode: AuthMode::LegacyOnly as i32,
        })
        .await
        .unwrap();
    let seen = second
        .admin()
        .get_auth_mode(GetAuthModeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.mode(), AuthMode::LegacyOnly);
    let denied = second
        .migration(&second.verify_key)
        .set_auth_mode(SetAuthModeRequest {
            mode: AuthMode::Dual as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    second.shutdown().await;
    first.shutdown().await;
}

crate::backend_tests!(
    default_is_dual_and_changes_are_stored_and_audited,
    unspecified_or_unknown_mode_is_invalid,
    mode_set_on_one_replica_is_read_by_another,
);
