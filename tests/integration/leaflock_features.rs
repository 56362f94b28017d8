//! The features added after the LeafLock suite (leaflock.rs), run against
//! LeafLock's own layout on PostgreSQL rather than the seed's: encrypted
//! emails (nothing readable), soft delete by `deleted_at`, HS512 session
//! tokens naming the user in `user_id`, and the mirror column switched off.
//!
//! - Gateways: a real Envoy (ext_authz) and a real nginx (forward-auth) in
//!   front of an echoing upstream.
//! - Clerk webhooks: `external_id` links, deletions, and what an email can
//!   and cannot do when the application's emails are unreadable.
//! - The dashboard: its stream shows GetMigrationStats' figures, and those
//!   figures leave soft-deleted users out, cutover readiness included.

use std::time::Duration;

use identity::{
    config::{ClerkWebhookConfig, Config, UnmappedPolicy},
    domain::{Email, UserId},
    pb::{self, GetMigrationStatsRequest, LinkUserRequest, RejectionReason, StatsWindow},
    storage::NewLegacyUser,
};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::{
    common::{
        Backend, TestApp, TestDb, accepted, exec,
        fake_clerk::FakeClerk,
        gateway::{Gateway, Upstream, envoy_binary, gateway_config, http_client, nginx_binary},
        init_logs, rejected, strings,
        tokens::{clerk, clerk_claims},
    },
    dashboard::Events,
    gateway_envoy::{Setup, bearer, envoy_config},
    gateway_nginx::{forward_auth, nginx_config},
    leaflock::{LEAFLOCK, app_insert, leaflock_token, leaflock_users, leaflock_verification, users_schema},
    webhooks::{SECRET, deleted_event, deliver, mapping_of, refused_within_bound, user_event},
};

/// LeafLock's users for one test: rows its own INSERT wrote, `gone`
/// soft-deleted by it before the service starts.
struct Users {
    ann: UserId,
    bob: UserId,
    cid: UserId,
    dan: UserId,
    gone: UserId,
}

/// A LeafLock database on PostgreSQL with [`Users`]; `None` when PostgreSQL
/// is unreachable outside CI.
async fn leaflock_db() -> Option<(TestDb, Users)> {
    let db = TestDb::bare(Backend::Postgres).await?;
    exec(&db, LEAFLOCK).await;
    let users = Users {
        ann: UserId::new_random(),
        bob: UserId::new_random(),
        cid: UserId::new_random(),
        dan: UserId::new_random(),
        gone: UserId::new_random(),
    };
    for id in [users.ann, users.bob, users.cid, users.dan, users.gone] {
        exec(&db, &app_insert(id)).await;
    }
    soft_delete(&db, users.gone).await;
    Some((db, users))
}

/// LeafLock's own soft delete.
async fn soft_delete(db: &TestDb, id: UserId) {
    exec(db, &format!("UPDATE users SET deleted_at = NOW() WHERE id = '{id}'")).await;
}

/// Every row of LeafLock's `users`, as text (to show it was not written).
async fn users_rows(db: &TestDb) -> Vec<Option<String>> {
    strings(db, "SELECT u::text FROM users u ORDER BY id").await
}

/// The service configured as a LeafLock operator would, with a gateway key
/// and the webhook secret; `adjust` changes the rest.
async fn spawn(db: TestDb, fake: &FakeClerk, adjust: impl FnOnce(&mut Config)) -> (TestApp, String) {
    let (mut config, keys, gateway_key) = gateway_config(&db);
    config.verification = leaflock_verification(fake);
    config.database.users = leaflock_users();
    config.clerk_webhook = Some(ClerkWebhookConfig {
        secrets: vec![SecretString::from(SECRET.to_owned())],
    });
    adjust(&mut config);
    (TestApp::spawn_with(db, config, keys).await, gateway_key)
}

async fn link(app: &TestApp, user: UserId, clerk_user_id: &str) {
    app.admin()
        .link_user(LinkUserRequest {
            user_id: user.to_string(),
            clerk_user_id: clerk_user_id.into(),
        })
        .await
        .unwrap();
}

// --- Gateways -------------------------------------------------------------

/// The service on LeafLock's layout with the gateway suites' upstream.
async fn gateway_setup() -> Option<(Setup, Users)> {
    init_logs();
    let (db, users) = leaflock_db().await?;
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let (app, gateway_key) = spawn(db, &fake, |_| {}).await;
    Some((
        Setup {
            app,
            fake,
            upstream: Upstream::start().await,
            gateway_key,
            client: http_client(),
        },
        users,
    ))
}

/// What the upstream must see of one user, whichever token proved it.
fn assert_identity(echo: &crate::common::gateway::Echo, user: UserId, method: &str, state: &str, clerk: Option<&str>) {
    let identity = echo.identity();
    assert_eq!(
        identity.get("x-identity-user-id"),
        Some(&user.to_string()),
        "{identity:?}"
    );
    assert_eq!(
        identity.get("x-identity-auth-method").map(String::as_str),
        Some(method),
        "{identity:?}"
    );
    assert_eq!(
        identity.get("x-identity-migration-state").map(String::as_str),
        Some(state),
        "{identity:?}"
    );
    assert_eq!(
        identity.get("x-identity-clerk-user-id").map(String::as_str),
        clerk,
        "{identity:?}"
    );
    // LeafLock's emails are encrypted: there is none to pass on.
    assert!(!identity.contains_key("x-identity-email"), "{identity:?}");
}

/// Polls through `gateway` until `token` is refused, and returns the
/// refusal's `WWW-Authenticate` (the user cache holds a user 200 ms here).
async fn refused_soon(setup: &Setup, gateway: &Gateway, token: &str) -> String {
    for _ in 0..100 {
        let response = setup.get(&gateway.url("/"), Some(token), &[]).await;
        if response.status() == 401 {
            return response.headers()["www-authenticate"].to_str().unwrap().to_owned();
        }
        assert_eq!(response.status(), 200, "{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the token was never refused:\n{}", gateway.log());
}

fn user_not_found(www: &str) {
    assert_eq!(
        www,
        "Bearer error=\"invalid_token\", error_description=\"user_not_found\""
    );
}

/// LeafLock's tokens and its users' Clerk tokens through `gateway`.
async fn leaflock_through(setup: &Setup, gateway: &Gateway, users: &Users) {
    let before = users_rows(&setup.app.db).await;

    // A live user's LeafLock session token: allowed, the upstream gets its
    // identity (and never the client's own copy of it).
    let ann_token = bearer(&leaflock_token(users.ann));
    let echo = setup
        .passes(
            gateway,
            "/notes?page=2",
            Some(&ann_token),
            &[("x-identity-user-id", &users.gone.to_string())],
        )
        .await;
    assert_eq!(echo.path, "/notes?page=2");
    assert_identity(&echo, users.ann, "legacy_jwt", "legacy_only", None);

    // A soft-deleted user's token is refused, the upstream not reached.
    let (www, _) = setup
        .refused(gateway, "/", Some(&bearer(&leaflock_token(users.gone))))
        .await;
    user_not_found(&www);

    // The seed's shape (`sub`, HS256) is not a LeafLock token.
    let seed_shaped = crate::common::tokens::legacy(crate::common::tokens::legacy_claims(&users.ann.to_string()));
    setup.refused(gateway, "/", Some(&bearer(&seed_shaped))).await;

    // A linked user: its legacy and its Clerk token are one principal.
    link(&setup.app, users.bob, "user_bob").await;
    let bob_legacy = bearer(&leaflock_token(users.bob));
    let bob_clerk = bearer(&setup.clerk_token("user_bob"));
    let by_legacy = setup.passes(gateway, "/", Some(&bob_legacy), &[]).await;
    assert_identity(&by_legacy, users.bob, "legacy_jwt", "migrated", Some("user_bob"));
    let by_clerk = setup.passes(gateway, "/", Some(&bob_clerk), &[]).await;
    assert_identity(&by_clerk, users.bob, "clerk", "migrated", Some("user_bob"));
    assert_eq!(by_clerk.header("x-identity-org-id"), Some("org_9"));
    assert_eq!(by_clerk.header("x-identity-session-id"), Some("sess_2abc"));

    // A user who signed in with Clerk before being linked: provisioned
    // first, then merged into the LeafLock user by the link.
    let cid_clerk = bearer(&setup.clerk_token("user_cid"));
    let provisional = setup.passes(gateway, "/", Some(&cid_clerk), &[]).await;
    let provisional_id = provisional.header("x-identity-user-id").unwrap().to_owned();
    assert_ne!(provisional_id, users.cid.to_string());
    assert_eq!(provisional.header("x-identity-migration-state"), Some("clerk_native"));
    link(&setup.app, users.cid, "user_cid").await;
    let merged = setup.passes(gateway, "/", Some(&cid_clerk), &[]).await;
    assert_identity(&merged, users.cid, "clerk", "migrated", Some("user_cid"));
    let by_legacy = setup
        .passes(gateway, "/", Some(&bearer(&leaflock_token(users.cid))), &[])
        .await;
    assert_eq!(
        by_legacy.header("x-identity-user-id"),
        Some(users.cid.to_string().as_str())
    );

    // Clerk-only routes take bob's Clerk token, not his LeafLock one.
    let (www, _) = setup.refused(gateway, "/clerk-only/report", Some(&bob_legacy)).await;
    assert!(www.contains("method_disabled"), "{www}");
    let echo = setup.passes(gateway, "/clerk-only/report", Some(&bob_clerk), &[]).await;
    assert_eq!(echo.header("x-identity-user-id"), Some(users.bob.to_string().as_str()));

    // The service wrote nothing into LeafLock's table.
    assert_eq!(users_rows(&setup.app.db).await, before);

    // LeafLock soft-deletes bob while both his tokens are in use: both are
    // refused, the Clerk one too (it is not provisioned anew).
    soft_delete(&setup.app.db, users.bob).await;
    user_not_found(&refused_soon(setup, gateway, &bob_legacy).await);
    user_not_found(&refused_soon(setup, gateway, &bob_clerk).await);
    // Others are unaffected.
    let echo = setup.passes(gateway, "/", Some(&ann_token), &[]).await;
    assert_eq!(echo.header("x-identity-user-id"), Some(users.ann.to_string().as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaflock_tokens_through_envoy() {
    let Some(envoy) = envoy_binary() else { return };
    let Some((setup, users)) = gateway_setup().await else {
        return;
    };
    let gateway = Gateway::envoy(&envoy, &envoy_config(&setup)).await;
    leaflock_through(&setup, &gateway, &users).await;
    // Envoy passes the service's reason on in the body.
    let response = setup
        .get(&gateway.url("/"), Some(&bearer(&leaflock_token(users.gone))), &[])
        .await;
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["reason"], "user_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaflock_tokens_through_nginx() {
    let Some(nginx) = nginx_binary() else { return };
    let Some((setup, users)) = gateway_setup().await else {
        return;
    };
    let gateway = Gateway::nginx(&nginx, |port| nginx_config(&setup, port)).await;
    leaflock_through(&setup, &gateway, &users).await;
    // /forward-auth itself answers the soft-deleted user with the reason.
    let response = forward_auth(
        &setup,
        "",
        Some(&bearer(&leaflock_token(users.gone))),
        Some(&setup.gateway_key),
    )
    .await;
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["reason"], "user_not_found");
}

// --- Clerk webhooks ---------------------------------------------------------

/// What the service recorded of a delivery: its outcome and detail.
async fn recorded(app: &TestApp, svix_id: &str) -> (String, String) {
    let rows = strings(
        &app.db,
        &format!("SELECT outcome || ' | ' || detail FROM identity_webhook_events WHERE svix_id = '{svix_id}'"),
    )
    .await;
    let row = rows.into_iter().next().flatten().expect("the delivery is recorded");
    let (outcome, detail) = row.split_once(" | ").unwrap();
    (outcome.to_owned(), detail.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaflock_clerk_webhooks_link_delete_and_match_emails() {
    init_logs();
    let Some((db, users)) = leaflock_db().await else {
        return;
    };
    let schema = users_schema(&db).await;
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let (app, gateway_key) = spawn(db, &fake, |_| {}).await;
    let before = users_rows(&app.db).await;
    let iss = fake.url();
    let token = |clerk_id: &str| clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, clerk_id));

    // user.created naming a LeafLock user in external_id links it, as on
    // the seed's layout: its Clerk tokens are that user, migrated.
    let ann = users.ann.to_string();
    let created = user_event("user.created", "user_ann", Some(&ann), "ann@example.com", 1000);
    assert_eq!(deliver(&app, "msg_ann", &created).await, (200, "applied".to_owned()));
    assert_eq!(mapping_of(&app, "user_ann").await.unwrap().user_id, ann);
    let (outcome, detail) = recorded(&app, "msg_ann").await;
    assert_eq!(outcome, "applied");
    assert!(
        detail.contains(&format!("linked user {ann} to user_ann by external_id")),
        "{detail}"
    );
    let principal = accepted(app.verify(&token("user_ann")).await);
    assert_eq!(principal.user_id, ann);
    assert!(!principal.new_to_application);
    assert_eq!(principal.migration_state(), pb::MigrationState::Migrated);
    let legacy = accepted(app.verify(&leaflock_token(users.ann)).await);
    assert_eq!(
        (legacy.user_id, legacy.clerk_user_id),
        (ann.clone(), "user_ann".to_owned())
    );
    assert_eq!(principal.email, "", "the link alone brings no email");
    // A second delivery of the same event changes nothing.
    assert_eq!(deliver(&app, "msg_ann", &created).await.1, "duplicate");

    // An external_id naming a soft-deleted LeafLock user links nothing: the
    // deleted account is not revived; the policy (provision) gives the
    // Clerk user an account of its own, and the detail says why.
    let gone = users.gone.to_string();
    let event = user_event("user.created", "user_gone", Some(&gone), "gone@example.com", 1000);
    assert_eq!(deliver(&app, "msg_gone", &event).await.1, "applied");
    let (outcome, detail) = recorded(&app, "msg_gone").await;
    assert_eq!(outcome, "applied");
    assert!(
        detail.contains("names no known user") && detail.contains("provisioned"),
        "{detail}"
    );
    let fresh = accepted(app.verify(&token("user_gone")).await);
    assert_ne!(fresh.user_id, gone);
    assert!(fresh.new_to_application);
    assert_eq!(
        rejected(app.verify(&leaflock_token(users.gone)).await),
        RejectionReason::UserNotFound
    );

    // Emails. LeafLock's are encrypted, so the service cannot read them:
    // (1) link_by_email cannot be configured at all (start-up names the
    // variable), so a Clerk user is never linked to a LeafLock user by email.
    let cfg_db = app.db.share();
    let (mut refused, _, _) = gateway_config(&cfg_db);
    refused.verification = leaflock_verification(&fake);
    if let Some(clerk) = refused.verification.clerk.as_mut() {
        clerk.unmapped_policy = UnmappedPolicy::LinkByEmail;
    }
    refused.database.users = leaflock_users();
    refused.clerk_webhook = Some(ClerkWebhookConfig {
        secrets: vec![SecretString::from(SECRET.to_owned())],
    });
    let storage = identity::storage::connect(&cfg_db.url, &refused.database, true)
        .await
        .unwrap();
    let err = identity::server::start_with_storage(refused, storage)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("IDENTITY_UNMAPPED_CLERK_USER") && err.contains("link_by_email"),
        "{err}"
    );
    // (2) An email the service was given for a LeafLock user (an export,
    // `identity import-users`) is that user's: a new Clerk user with that
    // address is neither linked to it (policy provision) nor given it.
    app.storage
        .insert_legacy_user(&NewLegacyUser {
            id: users.cid,
            email: Email::parse("email", "cid@example.com").unwrap(),
            password_hash: None,
        })
        .await
        .unwrap();
    let event = user_event("user.created", "user_c2", None, "CID@example.com", 1000);
    assert_eq!(deliver(&app, "msg_c2", &event).await.1, "applied");
    let c2 = accepted(app.verify(&token("user_c2")).await);
    assert_ne!(c2.user_id, users.cid.to_string());
    assert!(c2.new_to_application);
    assert_eq!(c2.email, "", "the address stays cid's");
    let cid = accepted(app.verify(&leaflock_token(users.cid)).await);
    assert_eq!(
        (cid.email.as_str(), cid.clerk_user_id.as_str()),
        ("cid@example.com", "")
    );
    // (3) An address nobody has goes with the provisioned user.
    let event = user_event("user.created", "user_new", None, "new@example.com", 1000);
    assert_eq!(deliver(&app, "msg_new", &event).await.1, "applied");
    assert_eq!(accepted(app.verify(&token("user_new")).await).email, "new@example.com");
    // (4) A linked LeafLock user's verified email reaches the service's own
    // record of it (LeafLock's columns are never written).
    let updated = user_event("user.updated", "user_ann", Some(&ann), "Ann@Example.com", 2000);
    assert_eq!(deliver(&app, "msg_ann2", &updated).await.1, "applied");
    let principal = accepted(app.verify(&token("user_ann")).await);
    assert_eq!(
        (principal.user_id.as_str(), principal.email.as_str()),
        (ann.as_str(), "Ann@Example.com")
    );

    // user.deleted: ann's Clerk tokens are refused at once, here and at
    // the gateway; her LeafLock account is hers again, unlinked.
    let ann_session = token("user_ann");
    assert_eq!(
        deliver(&app, "msg_ann_del", &deleted_event("user_ann")).await.1,
        "applied"
    );
    assert_eq!(rejected(app.verify(&ann_session).await), RejectionReason::Revoked);
    refused_within_bound(&app, &ann_session).await;
    let response = http_client()
        .post(format!("http://{}/forward-auth", app.metrics_addr.unwrap()))
        .header("authorization", bearer(&ann_session))
        .header(identity::gateway::GATEWAY_KEY_HEADER, &gateway_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["reason"], "revoked");
    assert!(mapping_of(&app, "user_ann").await.is_none());
    let legacy = accepted(app.verify(&leaflock_token(users.ann)).await);
    assert_eq!(legacy.user_id, ann);
    assert_eq!(legacy.migration_state(), pb::MigrationState::LegacyOnly);
    // A late user.updated does not bring the link back.
    let late = user_event("user.updated", "user_ann", Some(&ann), "ann@example.com", 3000);
    assert_eq!(deliver(&app, "msg_ann3", &late).await.1, "stale");
    assert!(mapping_of(&app, "user_ann").await.is_none());

    // LeafLock's table: same shape, same rows.
    assert_eq!(users_schema(&app.db).await, schema);
    assert_eq!(users_rows(&app.db).await, before);
    app.shutdown().await;
}

// --- The dashboard ----------------------------------------------------------

/// GetMigrationStats for the dashboard's default window (the last hour).
async fn stats(app: &TestApp) -> pb::MigrationStats {
    app.migration(&app.verify_key)
        .get_migration_stats(GetMigrationStatsRequest {
            window: StatsWindow::LastHour as i32,
            readiness_days: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
}

/// GetMigrationStats' figures under the names the dashboard's stream uses.
fn as_streamed(s: &pb::MigrationStats) -> Value {
    let readiness = s.readiness.unwrap();
    let invitations = s.invitations.unwrap();
    json!({
        "users": {
            "total": s.total_users, "legacy_only": s.legacy_users, "migrated": s.migrated_users,
            "clerk_native": s.clerk_native_users, "migrated_ratio": s.migrated_ratio,
        },
        "auth": {
            "attempts": s.auth_attempts, "successes": s.auth_successes, "rejections": s.auth_rejections,
            "errors": s.auth_errors, "success_rate": s.success_rate, "error_rate": s.error_rate,
        },
        "methods": s.methods.iter().map(|m| json!({
            "method": m.method, "attempts": m.attempts, "successes": m.successes, "errors": m.errors,
            "rejections": m.rejections.iter().map(|r| json!({"reason": r.reason, "count": r.count})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "invitations": {
            "sent": invitations.sent, "pending": invitations.pending, "completed": invitations.redeemed,
            "expired": invitations.expired,
        },
        "readiness": {
            "days": readiness.days, "active_users": readiness.active_users,
            "would_be_locked_out": readiness.would_be_locked_out,
            "legacy_verifications_by_migrated": readiness.legacy_verifications_by_migrated_users,
        },
    })
}

/// The same keys of a streamed snapshot.
fn streamed_part(data: &Value, like: &Value) -> Value {
    match (data, like) {
        (Value::Object(data), Value::Object(like)) => Value::Object(
            like.iter()
                .map(|(k, v)| (k.clone(), streamed_part(data.get(k).unwrap_or(&Value::Null), v)))
                .collect(),
        ),
        (Value::Array(data), Value::Array(like)) if data.len() == like.len() => {
            Value::Array(data.iter().zip(like).map(|(d, l)| streamed_part(d, l)).collect())
        }
        (data, _) => data.clone(),
    }
}

/// Reads the stream until a snapshot shows what GetMigrationStats says and
/// those figures are `settled` (the two are computed a moment apart, and
/// verifications reach the shared figures within a flush); returns them.
async fn stream_matches_stats(app: &TestApp, settled: impl Fn(&pb::MigrationStats) -> bool) -> pb::MigrationStats {
    let url = format!("http://{}/dashboard/events", app.metrics_addr.unwrap());
    let Ok(mut events) = Events::open(&url).await else {
        panic!("the dashboard's stream did not open")
    };
    let mut last = (Value::Null, Value::Null);
    for _ in 0..30 {
        let (name, data) = events.next().await;
        assert_eq!(name, "snapshot", "{data}");
        let s = stats(app).await;
        let wanted = as_streamed(&s);
        let shown = streamed_part(&data, &wanted);
        if settled(&s) && crate::dashboard::same(&shown, &wanted) {
            return s;
        }
        last = (shown, wanted);
    }
    panic!(
        "the stream never showed the expected GetMigrationStats figures:\nshown:  {}\nstats:  {}",
        last.0, last.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaflock_dashboard_shows_the_stats_without_soft_deleted_users() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    init_logs();
    let Some((db, users)) = leaflock_db().await else {
        return;
    };
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let (app, _) = spawn(db, &fake, |_| {}).await;
    // LeafLock keeps signing users up and soft-deleting them meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = crate::leaflock::application(&app.db, stop.clone(), writes.clone());
    let iss = fake.url();
    let token = |clerk_id: &str| clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, clerk_id));

    // ann, bob, cid and dan are LeafLock's live users; none has moved yet.
    let users_of = |s: &pb::MigrationStats| (s.total_users, s.legacy_users, s.migrated_users, s.clerk_native_users);
    let first = stream_matches_stats(&app, |s| users_of(s) == (4, 4, 0, 0)).await;
    assert_eq!(users_of(&first), (4, 4, 0, 0));

    // ann signs in with LeafLock; the soft-deleted user's token is refused.
    accepted(app.verify(&leaflock_token(users.ann)).await);
    assert_eq!(
        rejected(app.verify(&leaflock_token(users.gone)).await),
        RejectionReason::UserNotFound
    );
    // bob moves to Clerk and still uses his LeafLock token too.
    link(&app, users.bob, "user_bob").await;
    accepted(app.verify(&token("user_bob")).await);
    accepted(app.verify(&leaflock_token(users.bob)).await);
    // A newcomer signs up with Clerk.
    assert!(accepted(app.verify(&token("user_new")).await).new_to_application);
    // cid moves to Clerk, then LeafLock deletes cid's account: cid is no
    // longer a user, migrated or not.
    link(&app, users.cid, "user_cid").await;
    soft_delete(&app.db, users.cid).await;

    // ann and dan legacy only, bob migrated, one Clerk-native user; cid
    // and gone deleted. Five verifications, one refused; ann would be
    // locked out, and bob used his LeafLock token after moving.
    let expected = |s: &pb::MigrationStats| {
        let readiness = s.readiness.unwrap_or_default();
        users_of(s) == (4, 2, 1, 1)
            && (s.auth_attempts, s.auth_successes, s.auth_rejections) == (5, 4, 1)
            && (
                readiness.would_be_locked_out,
                readiness.legacy_verifications_by_migrated_users,
            ) == (1, 1)
    };
    let now = stream_matches_stats(&app, expected).await;
    assert_eq!(users_of(&now), (4, 2, 1, 1));
    assert!((now.migrated_ratio - 0.5).abs() < 1e-9, "{now:?}");

    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    assert!(writes.load(Ordering::SeqCst) > 0);
    app.shutdown().await;
}

/// GetMigrationStats' cutover readiness over `days` (each look-back is
/// cached apart, so a look-back not asked for before reads the database).
async fn readiness(app: &TestApp, days: u32) -> (i64, i64, i64) {
    let r = app
        .migration(&app.verify_key)
        .get_migration_stats(GetMigrationStatsRequest {
            window: StatsWindow::LastHour as i32,
            readiness_days: days,
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
        .readiness
        .unwrap();
    (
        r.active_users,
        r.would_be_locked_out,
        r.legacy_verifications_by_migrated_users,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaflock_readiness_leaves_soft_deleted_users_out() {
    init_logs();
    let Some((db, users)) = leaflock_db().await else {
        return;
    };
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let (app, _) = spawn(db, &fake, |_| {}).await;
    // ann and dan sign in with LeafLock only; bob moves to Clerk and still
    // uses his LeafLock token.
    accepted(app.verify(&leaflock_token(users.ann)).await);
    accepted(app.verify(&leaflock_token(users.dan)).await);
    link(&app, users.bob, "user_bob").await;
    accepted(app.verify(&leaflock_token(users.bob)).await);
    // (active, would be locked out, legacy verifications by migrated users)
    assert_eq!(readiness(&app, 7).await, (3, 2, 1));

    // LeafLock soft-deletes dan and bob after they signed in: they are no
    // longer users, so clerk_only would lock out ann alone.
    soft_delete(&app.db, users.dan).await;
    soft_delete(&app.db, users.bob).await;
    assert_eq!(readiness(&app, 14).await, (1, 1, 0));
    app.shutdown().await;
}
