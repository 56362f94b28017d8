//! VerifyToken with Clerk session tokens against a fake Clerk on loopback:
//! claims, algorithm confusion, JWKS caching, rotation and outages, and the
//! policies for Clerk users seen for the first time.

use std::{sync::atomic::Ordering, time::Duration};

use identity::{
    config::{ClerkKeySource, UnmappedPolicy, VerificationConfig},
    pb::{self, AuthMethod, MigrationState, RejectionReason as R},
};
use jsonwebtoken::Algorithm;
use serde_json::json;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::common::{
    TestApp, TestDb, accepted, clerk_config,
    fake_clerk::{FakeClerk, SECRET_KEY},
    legacy_config, rejected,
    tokens::{self, clerk, clerk_claims, legacy, legacy_claims, now},
};

fn with_clerk(fake: &FakeClerk) -> VerificationConfig {
    VerificationConfig {
        legacy: Some(legacy_config()),
        clerk: Some(clerk_config(fake)),
        ..VerificationConfig::default()
    }
}

fn set(claims: &mut serde_json::Value, extra: serde_json::Value) {
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
}

async fn clerk_token_provisions_then_resolves_the_same_user(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = TestApp::spawn_verifying(db, with_clerk(&fake)).await;
    let mut claims = clerk_claims(&fake.url(), "user_new1");
    set(
        &mut claims,
        json!({"o": {"id": "org_9", "rol": "admin", "slg": "acme"}}),
    );
    let first = accepted(app.verify(&clerk("clerk_a", "ins_clerk_a", claims)).await);
    assert_eq!(first.auth_method(), AuthMethod::Clerk);
    assert_eq!(first.clerk_user_id, "user_new1");
    assert_eq!(first.session_id, "sess_2abc");
    assert_eq!(first.migration_state(), MigrationState::ClerkNative);
    let org = first.organization.clone().unwrap();
    assert_eq!(
        (org.id.as_str(), org.role.as_str(), org.slug.as_str()),
        ("org_9", "admin", "acme")
    );
    // A new token of the same user: the same internal id.
    let second = accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_new1")))
            .await,
    );
    assert_eq!(second.user_id, first.user_id);
    assert!(second.organization.is_none());

    // A linked legacy user: the Clerk token speaks for the legacy id.
    let ann = app.legacy_user("ann@example.com").await;
    app.admin()
        .link_user(pb::LinkUserRequest {
            user_id: ann.to_string(),
            clerk_user_id: "user_ann".into(),
        })
        .await
        .unwrap();
    let principal = accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_ann")))
            .await,
    );
    assert_eq!(principal.user_id, ann.to_string());
    assert_eq!(principal.migration_state(), MigrationState::Migrated);
    assert_eq!(principal.email, "ann@example.com");
    // The legacy token of the same user still works under `dual`.
    assert_eq!(
        accepted(app.verify(&legacy(legacy_claims(&ann.to_string()))).await).user_id,
        ann.to_string()
    );
    app.shutdown().await;
}

async fn every_clerk_rejection_has_its_reason(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let mut config = with_clerk(&fake);
    config.clerk.as_mut().unwrap().authorized_parties = vec!["https://app.example.com".into()];
    config.clerk.as_mut().unwrap().unmapped_policy = UnmappedPolicy::Reject;
    let app = TestApp::spawn_verifying(db, config).await;
    let ann = app.legacy_user("ann@example.com").await;
    app.admin()
        .link_user(pb::LinkUserRequest {
            user_id: ann.to_string(),
            clerk_user_id: "user_ann".into(),
        })
        .await
        .unwrap();
    let iss = fake.url();
    let token = |extra: serde_json::Value| {
        let mut claims = clerk_claims(&iss, "user_ann");
        set(&mut claims, extra);
        clerk("clerk_a", "ins_clerk_a", claims)
    };
    accepted(app.verify(&token(json!({}))).await);
    accepted(app.verify(&token(json!({"exp": now() - 2}))).await);
    assert_eq!(
        rejected(app.verify(&token(json!({"exp": now() - 30}))).await),
        R::Expired
    );
    accepted(app.verify(&token(json!({"nbf": now() + 3}))).await);
    assert_eq!(
        rejected(app.verify(&token(json!({"nbf": now() + 60}))).await),
        R::NotYetValid
    );
    assert_eq!(
        rejected(app.verify(&token(json!({"iat": now() + 60}))).await),
        R::IssuedInFuture
    );
    assert_eq!(
        rejected(
            app.verify(&token(json!({"iss": "https://other.clerk.accounts.dev"})))
                .await
        ),
        R::Issuer
    );
    assert_eq!(
        rejected(app.verify(&token(json!({"azp": "https://evil.example.com"}))).await),
        R::Audience
    );
    let mut no_azp = clerk_claims(&iss, "user_ann");
    no_azp.as_object_mut().unwrap().remove("azp");
    assert_eq!(
        rejected(app.verify(&clerk("clerk_a", "ins_clerk_a", no_azp)).await),
        R::Audience
    );
    assert_eq!(
        rejected(app.verify_for(&token(json!({})), "https://other.example.com").await),
        R::Audience
    );
    accepted(app.verify_for(&token(json!({})), "https://app.example.com").await);
    assert_eq!(
        rejected(app.verify(&token(json!({"sts": "pending"}))).await),
        R::SessionPending
    );
    assert_eq!(
        rejected(app.verify(&token(json!({"sub": "user_unmapped"}))).await),
        R::UnmappedUser
    );
    assert_eq!(
        rejected(app.verify(&token(json!({"sub": "sess_notauser"}))).await),
        R::Malformed
    );
    // Signed by a key that is not the kid's.
    assert_eq!(
        rejected(
            app.verify(&clerk("other", "ins_clerk_a", clerk_claims(&iss, "user_ann")))
                .await
        ),
        R::BadSignature
    );
    // Header checks: JWT class, token type; unknown header fields are ignored.
    let claims = clerk_claims(&iss, "user_ann");
    let header = |extra: serde_json::Value| {
        let mut h = json!({"alg": "RS256", "kid": "ins_clerk_a", "typ": "JWT"});
        set(&mut h, extra);
        h
    };
    let signed = |h| tokens::raw(h, claims.clone(), Some(("clerk_a", Algorithm::RS256)));
    accepted(
        app.verify(&signed(header(json!({"cat": "cl_B7d4PD111AAA", "x-custom": [1, 2]}))))
            .await,
    );
    accepted(app.verify(&signed(header(json!({"cat": "cl_I7d4PD111III"})))).await);
    assert_eq!(
        rejected(app.verify(&signed(header(json!({"cat": "cl_B7d4PD222AAA"})))).await),
        R::NotSessionToken
    );
    assert_eq!(
        rejected(app.verify(&signed(header(json!({"cat": "cl_B7d4PD333AAA"})))).await),
        R::NotSessionToken
    );
    assert_eq!(
        rejected(app.verify(&signed(header(json!({"typ": "at+jwt"})))).await),
        R::NotSessionToken
    );
    app.shutdown().await;
}

async fn algorithm_confusion_and_token_urls_are_refused(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = TestApp::spawn_verifying(db, with_clerk(&fake)).await;
    let ann = app.legacy_user("ann@example.com").await;
    let iss = fake.url();
    let claims = clerk_claims(&iss, "user_x");

    // alg: none, with and without a signature part.
    let none = tokens::raw(json!({"alg": "none", "typ": "JWT"}), claims.clone(), None);
    assert_eq!(rejected(app.verify(&none).await), R::AlgorithmNotAllowed);
    let none_legacy = tokens::raw(json!({"alg": "none"}), legacy_claims(&ann.to_string()), None);
    assert_eq!(rejected(app.verify(&none_legacy).await), R::AlgorithmNotAllowed);
    // HS256 for the RSA issuer, signed with the RSA public key as the HMAC secret.
    let public_pem = tokens::public_pem("clerk_a");
    let confused = tokens::legacy_with(Algorithm::HS256, public_pem.as_bytes(), claims.clone());
    assert_eq!(rejected(app.verify(&confused).await), R::AlgorithmNotAllowed);
    // Other algorithms.
    let es = tokens::raw(json!({"alg": "ES256", "kid": "ins_clerk_a"}), claims.clone(), None);
    assert_eq!(rejected(app.verify(&es).await), R::AlgorithmNotAllowed);
    let ps = tokens::raw(
        json!({"alg": "PS256", "kid": "ins_clerk_a"}),
        claims.clone(),
        Some(("clerk_a", Algorithm::PS256)),
    );
    assert_eq!(rejected(app.verify(&ps).await), R::AlgorithmNotAllowed);
    // jku / x5u / jwk headers are never followed: the token names a key set we never fetch.
    let before = fake.state.other_requests.load(Ordering::SeqCst);
    let jku = tokens::raw(
        json!({"alg": "RS256", "kid": "attacker", "jku": format!("{}/attacker/jwks.json", fake.url()),
               "x5u": format!("{}/attacker/cert", fake.url()), "jwk": tokens_jwk("other")}),
        claims,
        Some(("other", Algorithm::RS256)),
    );
    assert_eq!(rejected(app.verify(&jku).await), R::UnknownKey);
    assert_eq!(
        fake.state.other_requests.load(Ordering::SeqCst),
        before,
        "a URL from the token was fetched"
    );
    app.shutdown().await;
}

fn tokens_jwk(name: &str) -> serde_json::Value {
    crate::common::fake_clerk::jwk(name)
}

async fn rs_tokens_are_refused_by_a_legacy_only_service(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let config = VerificationConfig {
        legacy: Some(legacy_config()),
        ..VerificationConfig::default()
    };
    let app = TestApp::spawn_verifying(db, config).await;
    let token = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_a"));
    assert_eq!(rejected(app.verify(&token).await), R::AlgorithmNotAllowed);
    app.shutdown().await;
}

async fn random_kids_cannot_cause_a_fetch_storm(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = TestApp::spawn_verifying(db, with_clerk(&fake)).await;
    let iss = fake.url();
    let mut tasks = Vec::new();
    for chunk in 0..10 {
        let client = app.identity(&app.verify_key);
        let iss = iss.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            let mut unknown = 0;
            for n in 0..100 {
                let kid = format!("ins_random_{chunk}_{n}_{}", uuid::Uuid::new_v4().simple());
                let token = clerk("clerk_a", &kid, clerk_claims(&iss, "user_a"));
                let result = client
                    .verify_token(pb::VerifyTokenRequest {
                        token,
                        expected_audience: String::new(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .result
                    .unwrap();
                if rejected(result) == R::UnknownKey {
                    unknown += 1;
                }
            }
            unknown
        }));
    }
    let mut unknown = 0;
    for task in tasks {
        unknown += task.await.unwrap();
    }
    assert_eq!(unknown, 1000);
    let fetches = fake.jwks_fetches();
    assert!(fetches <= 2, "{fetches} JWKS fetches for 1,000 random kids");
    // A real token still verifies from the cached keys.
    accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_a")))
            .await,
    );
    app.shutdown().await;
}

async fn rotated_keys_are_picked_up_and_removed_keys_dropped(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let mut config = with_clerk(&fake);
    config.clerk.as_mut().unwrap().jwks_cooldown = Duration::ZERO;
    config.clerk.as_mut().unwrap().jwks_refresh = Duration::from_secs(1);
    let app = TestApp::spawn_verifying(db, config).await;
    let iss = fake.url();
    accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_a")))
            .await,
    );

    // Clerk publishes a new key: a token signed with it verifies after one refetch.
    fake.publish(&["clerk_a", "clerk_b"]);
    let before = fake.jwks_fetches();
    accepted(
        app.verify(&clerk("clerk_b", "ins_clerk_b", clerk_claims(&iss, "user_a")))
            .await,
    );
    assert!(fake.jwks_fetches() <= before + 1);

    // The old key is withdrawn: after the next refresh, its new tokens fail.
    fake.publish(&["clerk_b"]);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        rejected(
            app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_b")))
                .await
        ),
        R::UnknownKey
    );
    accepted(
        app.verify(&clerk("clerk_b", "ins_clerk_b", clerk_claims(&iss, "user_b")))
            .await,
    );
    app.shutdown().await;
}

async fn jwks_outage_serves_cached_keys_until_they_are_too_old(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let mut config = with_clerk(&fake);
    config.clerk.as_mut().unwrap().jwks_refresh = Duration::from_secs(1);
    config.clerk.as_mut().unwrap().jwks_cooldown = Duration::ZERO;
    config.clerk.as_mut().unwrap().jwks_max_staleness = Duration::from_secs(4);
    let app = TestApp::spawn_verifying(db, config).await;
    let iss = fake.url();
    accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_a")))
            .await,
    );
    fake.set_down(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Still verifying new tokens with the last good keys.
    accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_b")))
            .await,
    );
    // Beyond the maximum staleness: an outage, not a rejection.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = app
        .identity(&app.verify_key)
        .verify_token(pb::VerifyTokenRequest {
            token: clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_c")),
            expected_audience: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    // Legacy tokens are unaffected.
    let ann = app.legacy_user("ann@example.com").await;
    accepted(app.verify(&legacy(legacy_claims(&ann.to_string()))).await);
    fake.set_down(false);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_d")))
            .await,
    );
    app.shutdown().await;
}

async fn no_keys_at_all_is_unavailable_and_unhealthy(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    fake.set_down(true);
    let mut config = with_clerk(&fake);
    config.clerk.as_mut().unwrap().jwks_refresh = Duration::from_secs(1);
    config.clerk.as_mut().unwrap().jwks_cooldown = Duration::ZERO;
    let app = TestApp::spawn_verifying(db, config).await;
    let mut health = HealthClient::new(app.channel.clone());
    let status_of = |h: &mut HealthClient<_>| {
        let mut h = h.clone();
        async move {
            h.check(HealthCheckRequest {
                service: "identity.v1.ClerkKeys".into(),
            })
            .await
            .map(|r| r.into_inner().status())
        }
    };
    let mut not_serving = false;
    for _ in 0..50 {
        if status_of(&mut health).await.ok() == Some(ServingStatus::NotServing) {
            not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(not_serving);
    let token = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_a"));
    let status = app
        .identity(&app.verify_key)
        .verify_token(pb::VerifyTokenRequest {
            token: token.clone(),
            expected_audience: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(!status.message().contains(&token));
    // The whole server stays SERVING: legacy verification does not depend on Clerk.
    let overall = health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overall.status(), ServingStatus::Serving);
    fake.set_down(false);
    let mut recovered = false;
    for _ in 0..50 {
        if status_of(&mut health).await.ok() == Some(ServingStatus::Serving) {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered);
    accepted(app.verify(&token).await);
    app.shutdown().await;
}

async fn backend_api_jwks_and_pem_keys_work(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let second_db = db.share();
    // Keys from the Backend API's /v1/jwks with the secret key.
    let mut config = with_clerk(&fake);
    config.clerk.as_mut().unwrap().keys = ClerkKeySource::Jwks {
        url: url::Url::parse(&format!("{}/v1/jwks", fake.url())).unwrap(),
        bearer: Some(secrecy::SecretString::from(SECRET_KEY.to_owned())),
    };
    let app = TestApp::spawn_verifying(db, config).await;
    accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_a")))
            .await,
    );
    // A PEM key: no network at all.
    let mut config = with_clerk(&fake);
    config.clerk.as_mut().unwrap().keys = ClerkKeySource::Pem(tokens::public_pem("clerk_a"));
    fake.set_down(true);
    let offline = TestApp::spawn_verifying(second_db, config).await;
    let before = fake.jwks_fetches();
    accepted(
        offline
            .verify(&clerk("clerk_a", "whatever-kid", clerk_claims(&fake.url(), "user_a")))
            .await,
    );
    assert_eq!(
        rejected(
            offline
                .verify(&clerk("other", "ins_clerk_a", clerk_claims(&fake.url(), "user_a")))
                .await
        ),
        R::BadSignature
    );
    assert_eq!(fake.jwks_fetches(), before);
    offline.shutdown().await;
    app.shutdown().await;
}

async fn link_by_email_links_verified_addresses_only(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let mut config = with_clerk(&fake);
    config.clerk.as_mut().unwrap().unmapped_policy = UnmappedPolicy::LinkByEmail;
    let app = TestApp::spawn_verifying(db, config).await;
    let ann = app.legacy_user("ann@example.com").await;
    let bob = app.legacy_user("bob@example.com").await;
    fake.add_user("user_ann", "ANN@example.com", true);
    fake.add_user("user_bob", "bob@example.com", false);
    let iss = fake.url();

    let principal = accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_ann")))
            .await,
    );
    assert_eq!(principal.user_id, ann.to_string());
    assert_eq!(principal.migration_state(), MigrationState::Migrated);
    // Unverified email: a new user, bob's account untouched.
    let principal = accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_bob")))
            .await,
    );
    assert_ne!(principal.user_id, bob.to_string());
    assert_eq!(principal.migration_state(), MigrationState::ClerkNative);
    // Unknown to Clerk's Backend API: provisioned without email.
    let principal = accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_ghost")))
            .await,
    );
    assert_eq!(principal.email, "");
    let events = app
        .admin()
        .list_audit_events(pb::ListAuditEventsRequest {
            user_id: ann.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events
            .iter()
            .any(|e| e.action == "user.link" && e.detail.contains("verified email"))
    );
    app.shutdown().await;
}

async fn concurrent_first_sightings_create_one_user(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = TestApp::spawn_verifying(db, with_clerk(&fake)).await;
    let iss = fake.url();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut client = app.identity(&app.verify_key);
        let token = clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_racer"));
        tasks.push(tokio::spawn(async move {
            client
                .verify_token(pb::VerifyTokenRequest {
                    token,
                    expected_audience: String::new(),
                })
                .await
                .map(|r| r.into_inner().result.unwrap())
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        ids.insert(accepted(task.await.unwrap().unwrap()).user_id);
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let provisions = app
        .admin()
        .list_audit_events(pb::ListAuditEventsRequest {
            action: "user.provision".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(provisions.len(), 1);
    app.shutdown().await;
}

async fn auth_modes_gate_each_method_on_every_replica(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let second_db = db.share();
    let app = TestApp::spawn_verifying(db, with_clerk(&fake)).await;
    let (mut config, keys) = crate::common::test_config(&second_db);
    config.verification = with_clerk(&fake);
    let other = TestApp::spawn_with(second_db, config, keys).await;
    let ann = app.legacy_user("ann@example.com").await;
    let legacy_token = legacy(legacy_claims(&ann.to_string()));
    let clerk_token = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_mode"));
    for replica in [&app, &other] {
        accepted(replica.verify(&legacy_token).await);
        accepted(replica.verify(&clerk_token).await);
    }

    let set = |mode: pb::AuthMode| {
        let mut admin = app.admin();
        async move {
            admin
                .set_auth_mode(pb::SetAuthModeRequest { mode: mode as i32 })
                .await
                .unwrap()
        }
    };
    set(pb::AuthMode::ClerkOnly).await;
    // At once on the replica that was told.
    assert_eq!(rejected(app.verify(&legacy_token).await), R::MethodDisabled);
    accepted(app.verify(&clerk_token).await);
    // Within the refresh interval (1 s in tests) on the other one.
    let started = std::time::Instant::now();
    while matches!(
        other.verify(&legacy_token).await,
        pb::verify_token_response::Result::Principal(_)
    ) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the other replica kept accepting legacy tokens"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rejected(other.verify(&legacy_token).await), R::MethodDisabled);

    set(pb::AuthMode::LegacyOnly).await;
    assert_eq!(rejected(app.verify(&clerk_token).await), R::MethodDisabled);
    accepted(app.verify(&legacy_token).await);
    set(pb::AuthMode::Dual).await;
    accepted(app.verify(&clerk_token).await);
    accepted(app.verify(&legacy_token).await);
    other.shutdown().await;
    app.shutdown().await;
}

crate::backend_tests!(
    clerk_token_provisions_then_resolves_the_same_user,
    every_clerk_rejection_has_its_reason,
    algorithm_confusion_and_token_urls_are_refused,
    rs_tokens_are_refused_by_a_legacy_only_service,
    random_kids_cannot_cause_a_fetch_storm,
    rotated_keys_are_picked_up_and_removed_keys_dropped,
    jwks_outage_serves_cached_keys_until_they_are_too_old,
    no_keys_at_all_is_unavailable_and_unhealthy,
    backend_api_jwks_and_pem_keys_work,
    link_by_email_links_verified_addresses_only,
    concurrent_first_sightings_create_one_user,
    auth_modes_gate_each_method_on_every_replica,
);
