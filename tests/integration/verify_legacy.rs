//! VerifyToken with legacy HS JWTs, and RevokeToken.

use std::time::Duration;

use identity::{
    config::VerificationConfig,
    pb::{self, AuthMethod, MigrationState, RejectionReason as R, RevokeTokenRequest, revoke_token_request::Target},
};
use jsonwebtoken::Algorithm;
use serde_json::json;
use tonic::Code;

use crate::common::{
    TestApp, TestDb, accepted, legacy_config, rejected,
    tokens::{self, LEGACY_SECRET, legacy, legacy_claims, now},
};

fn legacy_only() -> VerificationConfig {
    VerificationConfig {
        legacy: Some(legacy_config()),
        ..VerificationConfig::default()
    }
}

async fn valid_legacy_token_resolves_to_its_user(db: TestDb) {
    let app = TestApp::spawn_verifying(db, legacy_only()).await;
    let id = app.legacy_user("ann@example.com").await;
    let token = legacy(legacy_claims(&id.to_string()));
    let principal = accepted(app.verify(&token).await);
    assert_eq!(principal.user_id, id.to_string());
    assert_eq!(principal.auth_method(), AuthMethod::LegacyJwt);
    assert_eq!(principal.email, "ann@example.com");
    assert_eq!(principal.migration_state(), MigrationState::LegacyOnly);
    assert!(principal.expires_at.unwrap().seconds > now());
    // With the Bearer prefix and stray whitespace, and again from the cache.
    accepted(app.verify(&format!("Bearer {token}\n")).await);
    accepted(app.verify(&token).await);
    app.shutdown().await;
}

async fn the_token_cache_may_be_small_or_off(db: TestDb) {
    for size in [0, 2] {
        let mut config = legacy_only();
        config.token_cache_size = size;
        let app = TestApp::spawn_verifying(db.share(), config).await;
        let ann = app.legacy_user(&format!("ann{size}@example.com")).await;
        let bob = app.legacy_user(&format!("bob{size}@example.com")).await;
        let tokens: Vec<(String, String)> = (0..10)
            .map(|i| {
                let user = if i % 2 == 0 { ann } else { bob }.to_string();
                let mut claims = legacy_claims(&user);
                claims["jti"] = json!(format!("t{i}"));
                (legacy(claims), user)
            })
            .collect();
        // Twice over: evicted or never cached, every token still verifies to its own user.
        for _ in 0..2 {
            for (token, user) in &tokens {
                assert_eq!(&accepted(app.verify(token).await).user_id, user, "cache size {size}");
            }
        }
        app.shutdown().await;
    }
    drop(db);
}

async fn every_legacy_rejection_has_its_reason(db: TestDb) {
    let mut config = legacy_only();
    config.legacy.as_mut().unwrap().issuer = Some("leaflock".into());
    let app = TestApp::spawn_verifying(db, config).await;
    let id = app.legacy_user("ann@example.com").await.to_string();
    let base = |extra: serde_json::Value| {
        let mut claims = legacy_claims(&id);
        claims["iss"] = json!("leaflock");
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        claims
    };
    accepted(app.verify(&legacy(base(json!({})))).await);
    // Expiry within the 5 s leeway passes; beyond it does not.
    accepted(app.verify(&legacy(base(json!({"exp": now() - 2})))).await);
    assert_eq!(
        rejected(app.verify(&legacy(base(json!({"exp": now() - 60})))).await),
        R::Expired
    );
    assert_eq!(
        rejected(app.verify(&legacy(base(json!({"nbf": now() + 120})))).await),
        R::NotYetValid
    );
    assert_eq!(
        rejected(
            app.verify(&tokens::legacy_with(Algorithm::HS256, b"wrong", base(json!({}))))
                .await
        ),
        R::BadSignature
    );
    assert_eq!(
        rejected(app.verify(&legacy(base(json!({"iss": "someone-else"})))).await),
        R::Issuer
    );
    assert_eq!(
        rejected(
            app.verify(&legacy(base(json!({"sub": uuid::Uuid::new_v4().to_string()}))))
                .await
        ),
        R::UserNotFound
    );
    assert_eq!(
        rejected(app.verify(&legacy(base(json!({"sub": "admin"})))).await),
        R::Malformed
    );
    let mut no_exp = base(json!({}));
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(rejected(app.verify(&legacy(no_exp)).await), R::Malformed);
    // HS512 when HS256 is configured.
    assert_eq!(
        rejected(
            app.verify(&tokens::legacy_with(
                Algorithm::HS512,
                LEGACY_SECRET.as_bytes(),
                base(json!({}))
            ))
            .await
        ),
        R::AlgorithmNotAllowed
    );
    // The caller's expected audience.
    let with_aud = legacy(base(json!({"aud": ["billing", "search"]})));
    accepted(app.verify_for(&with_aud, "search").await);
    assert_eq!(rejected(app.verify_for(&with_aud, "payments").await), R::Audience);
    assert_eq!(
        rejected(app.verify_for(&legacy(base(json!({}))), "payments").await),
        R::Audience
    );
    // Garbage and oversized tokens.
    for garbage in ["x", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30", &"A".repeat(9000)] {
        assert_eq!(rejected(app.verify(garbage).await), R::Malformed, "{garbage:.20}");
    }
    let empty = app
        .identity(&app.verify_key)
        .verify_token(pb::VerifyTokenRequest {
            token: "  ".into(),
            expected_audience: String::new(),
        })
        .await
        .unwrap_err();
    crate::common::assert_invalid(&empty, "token");
    app.shutdown().await;
}

async fn configured_audience_is_required(db: TestDb) {
    let mut config = legacy_only();
    config.legacy.as_mut().unwrap().audience = Some("leaflock-api".into());
    let app = TestApp::spawn_verifying(db, config).await;
    let id = app.legacy_user("ann@example.com").await.to_string();
    let mut claims = legacy_claims(&id);
    assert_eq!(
        rejected(app.verify(&legacy(claims.clone())).await),
        R::Malformed,
        "aud missing"
    );
    claims["aud"] = json!("other");
    assert_eq!(rejected(app.verify(&legacy(claims.clone())).await), R::Audience);
    claims["aud"] = json!("leaflock-api");
    accepted(app.verify(&legacy(claims)).await);
    app.shutdown().await;
}

async fn revoked_tokens_stop_verifying_everywhere(db: TestDb) {
    let second_db = db.share();
    let app = TestApp::spawn_verifying(db, legacy_only()).await;
    let (mut config, keys) = crate::common::test_config(&second_db);
    config.verification = legacy_only();
    let other = TestApp::spawn_with(second_db, config, keys).await;
    let id = app.legacy_user("ann@example.com").await.to_string();

    // By the token itself, on behalf of its user (verify scope suffices).
    let with_jti = legacy(legacy_claims(&id));
    let mut no_jti_claims = legacy_claims(&id);
    no_jti_claims.as_object_mut().unwrap().remove("jti");
    let without_jti = legacy(no_jti_claims);
    accepted(other.verify(&with_jti).await);
    for token in [&with_jti, &without_jti] {
        let response = app
            .identity(&app.verify_key)
            .revoke_token(RevokeTokenRequest {
                target: Some(Target::Token(token.clone())),
                expires_at: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(response.expires_at.unwrap().seconds > now());
        assert_eq!(rejected(app.verify(token).await), R::Revoked);
    }
    // Revoking twice is fine.
    app.identity(&app.verify_key)
        .revoke_token(RevokeTokenRequest {
            target: Some(Target::Token(with_jti.clone())),
            expires_at: None,
        })
        .await
        .unwrap();
    // The other replica picks it up within the refresh interval (1 s in tests), cached or not.
    let mut seen = false;
    for _ in 0..50 {
        if matches!(
            other.verify(&with_jti).await,
            pb::verify_token_response::Result::Rejection(_)
        ) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "other replica never saw the revocation");
    assert_eq!(rejected(other.verify(&without_jti).await), R::Revoked);

    // By jti: admin only.
    let token = legacy(json!({"sub": id, "exp": now() + 600, "jti": "jti-42"}));
    accepted(app.verify(&token).await);
    let denied = app
        .identity(&app.verify_key)
        .revoke_token(RevokeTokenRequest {
            target: Some(Target::Jti("jti-42".into())),
            expires_at: None,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    app.identity(&app.admin_key)
        .revoke_token(RevokeTokenRequest {
            target: Some(Target::Jti("jti-42".into())),
            expires_at: None,
        })
        .await
        .unwrap();
    assert_eq!(rejected(app.verify(&token).await), R::Revoked);

    // Bad targets are the caller's mistake.
    let mut client = app.identity(&app.admin_key);
    for (target, field) in [
        (Some(Target::Token("garbage".into())), "token"),
        (
            Some(Target::Token(tokens::legacy_with(
                Algorithm::HS256,
                b"wrong",
                legacy_claims(&id),
            ))),
            "token",
        ),
        (Some(Target::Jti(String::new())), "jti"),
        (None, "target"),
    ] {
        let status = client
            .revoke_token(RevokeTokenRequest {
                target,
                expires_at: None,
            })
            .await
            .unwrap_err();
        crate::common::assert_invalid(&status, field);
    }
    let past = prost_types::Timestamp {
        seconds: now() - 10,
        nanos: 0,
    };
    let status = client
        .revoke_token(RevokeTokenRequest {
            target: Some(Target::Jti("j".into())),
            expires_at: Some(past),
        })
        .await
        .unwrap_err();
    crate::common::assert_invalid(&status, "expires_at");

    let events = app
        .admin()
        .list_audit_events(pb::ListAuditEventsRequest {
            action: "token.revoke".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.outcome() == pb::AuditOutcome::Success)
            .count(),
        4
    );
    assert!(
        events.iter().all(|e| !e.detail.contains(&with_jti)),
        "the token is never recorded"
    );
    other.shutdown().await;
    app.shutdown().await;
}

async fn legacy_tokens_of_migrated_users_can_be_refused(db: TestDb) {
    let mut config = legacy_only();
    config.reject_legacy_after_migration = true;
    let app = TestApp::spawn_verifying(db, config).await;
    let id = app.legacy_user("ann@example.com").await;
    let token = legacy(legacy_claims(&id.to_string()));
    accepted(app.verify(&token).await);
    app.admin()
        .link_user(pb::LinkUserRequest {
            user_id: id.to_string(),
            clerk_user_id: "user_ann".into(),
        })
        .await
        .unwrap();
    // The link invalidates this replica's cache at once.
    assert_eq!(rejected(app.verify(&token).await), R::LegacyAfterMigration);
    app.shutdown().await;
}

async fn nothing_configured_means_method_disabled(db: TestDb) {
    let app = TestApp::spawn_verifying(db, VerificationConfig::default()).await;
    let id = app.legacy_user("ann@example.com").await;
    assert_eq!(
        rejected(app.verify(&legacy(legacy_claims(&id.to_string()))).await),
        R::MethodDisabled
    );
    app.shutdown().await;
}

async fn hostile_tokens_never_yield_a_principal(db: TestDb) {
    use rand::{Rng, SeedableRng};
    let app = TestApp::spawn_verifying(db, legacy_only()).await;
    let id = app.legacy_user("ann@example.com").await;
    let good = legacy(legacy_claims(&id.to_string()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ {}:,\"\x00\xff";
    for round in 0..400 {
        let mut bytes = good.as_bytes().to_vec();
        match round % 4 {
            // Flip characters.
            0 => {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] = alphabet[rng.random_range(0..alphabet.len())];
                }
            }
            // Truncate.
            1 => bytes.truncate(rng.random_range(0..bytes.len())),
            // Random bytes.
            2 => bytes = (0..rng.random_range(0..300)).map(|_| rng.random()).collect(),
            // Splice another segment in.
            _ => bytes.extend_from_slice(b".eyJzdWIiOiJ4In0"),
        }
        let token = String::from_utf8_lossy(&bytes).into_owned();
        if token == good || token.trim().is_empty() {
            continue;
        }
        match app
            .identity(&app.verify_key)
            .verify_token(pb::VerifyTokenRequest {
                token,
                expected_audience: String::new(),
            })
            .await
        {
            Ok(response) => assert!(
                matches!(
                    response.into_inner().result,
                    Some(pb::verify_token_response::Result::Rejection(_))
                ),
                "round {round} yielded a principal"
            ),
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "round {round}: {status:?}"),
        }
    }
    app.shutdown().await;
}

crate::backend_tests!(
    valid_legacy_token_resolves_to_its_user,
    the_token_cache_may_be_small_or_off,
    every_legacy_rejection_has_its_reason,
    configured_audience_is_required,
    revoked_tokens_stop_verifying_everywhere,
    legacy_tokens_of_migrated_users_can_be_refused,
    nothing_configured_means_method_disabled,
    hostile_tokens_never_yield_a_principal,
);
