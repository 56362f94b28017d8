//! GetUser, LinkUser, UnlinkUser and GetMapping through a real gRPC client.

use identity::pb::{
    self, GetMappingRequest, GetUserRequest, LinkUserRequest, MigrationState, UnlinkUserRequest, get_mapping_request,
    get_user_request::Lookup,
};
use tonic::Code;

use crate::common::{TestApp, TestDb, assert_invalid};

fn by(lookup: Lookup) -> GetUserRequest {
    GetUserRequest { lookup: Some(lookup) }
}

async fn get_user_by_each_key(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let id = app.legacy_user("Ann@Example.com").await;
    let mut client = app.identity(&app.verify_key);

    let user = client
        .get_user(by(Lookup::UserId(id.to_string())))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.user_id, id.to_string());
    assert_eq!(user.email, "Ann@Example.com");
    assert_eq!(user.migration_state(), MigrationState::LegacyOnly);
    assert!(user.has_legacy_password);
    assert!(user.created_at.is_some());

    let user = client
        .get_user(by(Lookup::Email("ann@example.com".into())))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.user_id, id.to_string());

    app.admin()
        .link_user(LinkUserRequest {
            user_id: id.to_string(),
            clerk_user_id: "user_2abc".into(),
        })
        .await
        .unwrap();
    let user = client
        .get_user(by(Lookup::ClerkUserId("user_2abc".into())))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.user_id, id.to_string());
    assert_eq!(user.clerk_user_id, "user_2abc");
    assert_eq!(user.migration_state(), MigrationState::Migrated);

    let missing = client
        .get_user(by(Lookup::UserId(uuid::Uuid::new_v4().to_string())))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    app.shutdown().await;
}

async fn get_user_rejects_malformed_input_naming_the_field(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut client = app.identity(&app.verify_key);
    let cases = [
        (Some(Lookup::UserId("not-a-uuid".into())), "user_id"),
        (Some(Lookup::UserId(String::new())), "user_id"),
        (Some(Lookup::ClerkUserId(String::new())), "clerk_user_id"),
        (Some(Lookup::ClerkUserId("sess_123".into())), "clerk_user_id"),
        (
            Some(Lookup::ClerkUserId("user_'; DROP TABLE users; --".into())),
            "clerk_user_id",
        ),
        (Some(Lookup::Email("not an email".into())), "email"),
        (Some(Lookup::Email("\u{0}@x.com".into())), "email"),
        (None, "lookup"),
    ];
    for (lookup, field) in cases {
        let status = client.get_user(GetUserRequest { lookup }).await.unwrap_err();
        assert_invalid(&status, field);
    }
    app.shutdown().await;
}

async fn link_unlink_and_mapping_round_trip(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let id = app.legacy_user("ann@example.com").await;
    let mut admin = app.admin();

    let mapping = admin
        .link_user(LinkUserRequest {
            user_id: id.to_string(),
            clerk_user_id: "user_ann".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mapping
        .unwrap();
    assert_eq!(mapping.user_id, id.to_string());
    assert_eq!(mapping.clerk_user_id, "user_ann");

    for lookup in [
        get_mapping_request::Lookup::UserId(id.to_string()),
        get_mapping_request::Lookup::ClerkUserId("user_ann".into()),
    ] {
        let found = app
            .migration(&app.verify_key)
            .get_mapping(GetMappingRequest { lookup: Some(lookup) })
            .await
            .unwrap()
            .into_inner()
            .mapping
            .unwrap();
        assert_eq!(found.user_id, id.to_string());
        assert_eq!(found.clerk_user_id, "user_ann");
    }

    let removed = admin
        .unlink_user(UnlinkUserRequest {
            user_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .removed
        .unwrap();
    assert_eq!(removed.clerk_user_id, "user_ann");
    let gone = admin
        .get_mapping(GetMappingRequest {
            lookup: Some(get_mapping_request::Lookup::UserId(id.to_string())),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let user = app
        .identity(&app.verify_key)
        .get_user(by(Lookup::UserId(id.to_string())))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.migration_state(), MigrationState::LegacyOnly);
    assert_eq!(user.clerk_user_id, "");

    let again = admin
        .unlink_user(UnlinkUserRequest {
            user_id: id.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    app.shutdown().await;
}

async fn link_conflicts_are_already_exists_and_unknown_users_not_found(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let ann = app.legacy_user("ann@example.com").await;
    let bob = app.legacy_user("bob@example.com").await;
    let mut admin = app.admin();
    admin
        .link_user(LinkUserRequest {
            user_id: ann.to_string(),
            clerk_user_id: "user_a".into(),
        })
        .await
        .unwrap();

    let twice = admin
        .link_user(LinkUserRequest {
            user_id: ann.to_string(),
            clerk_user_id: "user_b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::AlreadyExists);
    assert!(twice.message().contains("already linked"), "{twice:?}");
    let taken = admin
        .link_user(LinkUserRequest {
            user_id: bob.to_string(),
            clerk_user_id: "user_a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);
    let unknown = admin
        .link_user(LinkUserRequest {
            user_id: uuid::Uuid::new_v4().to_string(),
            clerk_user_id: "user_c".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    assert_invalid(
        &admin
            .link_user(LinkUserRequest {
                user_id: "x".into(),
                clerk_user_id: "user_c".into(),
            })
            .await
            .unwrap_err(),
        "user_id",
    );
    assert_invalid(
        &admin
            .link_user(LinkUserRequest {
                user_id: bob.to_string(),
                clerk_user_id: String::new(),
            })
            .await
            .unwrap_err(),
        "clerk_user_id",
    );
    assert_invalid(
        &admin
            .unlink_user(UnlinkUserRequest { user_id: "123".into() })
            .await
            .unwrap_err(),
        "user_id",
    );
    assert_invalid(
        &admin.get_mapping(GetMappingRequest { lookup: None }).await.unwrap_err(),
        "lookup",
    );

    // Failures are audited too, with the caller and the user.
    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            action: "user.link".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let failures: Vec<_> = events
        .iter()
        .filter(|e| e.outcome() == pb::AuditOutcome::Failure)
        .collect();
    assert_eq!(failures.len(), 3, "{events:?}");
    assert!(failures.iter().all(|e| e.caller == "admin"));
    assert!(
        failures
            .iter()
            .any(|e| e.user_id == bob.to_string() && e.detail.contains("already_exists"))
    );
    app.shutdown().await;
}

crate::backend_tests!(
    get_user_by_each_key,
    get_user_rejects_malformed_input_naming_the_field,
    link_unlink_and_mapping_round_trip,
    link_conflicts_are_already_exists_and_unknown_users_not_found,
);
