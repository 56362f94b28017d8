//! Clerk's webhooks against the running server: deliveries signed with the
//! real scheme (the `standardwebhooks` signer, Svix's header names),
//! refusals that change nothing, duplicates and order, two replicas at
//! once, and deletions and ended sessions refused on every replica.

use std::time::Duration;

use identity::{
    config::{ClerkWebhookConfig, UnmappedPolicy, VerificationConfig},
    pb::{self, RejectionReason as R},
};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::common::{
    Backend, TestApp, TestDb, accepted, clerk_config,
    fake_clerk::FakeClerk,
    legacy_config, rejected, strings,
    tcp_proxy::TcpProxy,
    test_config,
    tokens::{clerk, clerk_claims, now},
};

/// The secret in force, and the one it replaces during a rotation.
pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const WRONG_SECRET: &str = "whsec_dGhpcyBpcyBub3QgdGhlIHNlY3JldCEhIQ==";

async fn spawn(db: TestDb, fake: &FakeClerk, policy: UnmappedPolicy) -> TestApp {
    let (mut config, keys) = test_config(&db);
    let mut clerk = clerk_config(fake);
    clerk.unmapped_policy = policy;
    config.verification = VerificationConfig {
        legacy: Some(legacy_config()),
        clerk: Some(clerk),
        ..VerificationConfig::default()
    };
    config.clerk_webhook = Some(ClerkWebhookConfig {
        secrets: vec![
            SecretString::from(OLD_SECRET.to_owned()),
            SecretString::from(SECRET.to_owned()),
        ],
    });
    TestApp::spawn_with(db, config, keys).await
}

fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    standardwebhooks::Webhook::new(secret)
        .unwrap()
        .sign(id, timestamp, body)
        .unwrap()
}

/// Posts `body` with Svix's headers; returns the status and the answer.
async fn post(app: &TestApp, headers: &[(&str, String)], body: Vec<u8>) -> (u16, String) {
    let url = format!("http://{}/webhooks/clerk", app.metrics_addr.expect("HTTP listener"));
    let mut request = reqwest::Client::new().post(url).body(body);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// A delivery signed with `secret` now.
async fn deliver_with(app: &TestApp, secret: &str, id: &str, body: &Value) -> (u16, String) {
    let body = body.to_string().into_bytes();
    let ts = now();
    let signature = sign(secret, id, ts, &body);
    post(
        app,
        &[
            ("svix-id", id.to_owned()),
            ("svix-timestamp", ts.to_string()),
            ("svix-signature", signature),
        ],
        body,
    )
    .await
}

pub(crate) async fn deliver(app: &TestApp, id: &str, body: &Value) -> (u16, String) {
    deliver_with(app, SECRET, id, body).await
}

pub(crate) fn user_event(kind: &str, clerk_id: &str, external_id: Option<&str>, email: &str, updated_at: i64) -> Value {
    json!({
        "type": kind,
        "object": "event",
        "timestamp": chrono::Utc::now().timestamp_millis(),
        "data": {
            "id": clerk_id,
            "object": "user",
            "external_id": external_id,
            "primary_email_address_id": "idn_1",
            "email_addresses": [{"id": "idn_1", "email_address": email, "verification": {"status": "verified"}}],
            "created_at": 1_700_000_000_000_i64,
            "updated_at": updated_at,
        }
    })
}

pub(crate) fn deleted_event(clerk_id: &str) -> Value {
    json!({"type": "user.deleted", "object": "event", "timestamp": chrono::Utc::now().timestamp_millis(),
           "data": {"id": clerk_id, "object": "user", "deleted": true}})
}

pub(crate) fn session_event(kind: &str, session_id: &str, clerk_id: &str) -> Value {
    json!({"type": kind, "object": "event", "timestamp": chrono::Utc::now().timestamp_millis(),
           "data": {"id": session_id, "object": "session", "user_id": clerk_id, "status": "revoked"}})
}

/// A counter's value on the server's `/metrics` (0 when absent).
async fn metric(app: &TestApp, sample: &str) -> f64 {
    let url = format!("http://{}/metrics", app.metrics_addr.unwrap());
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn recorded(app: &TestApp) -> Vec<Option<String>> {
    strings(&app.db, "SELECT svix_id FROM identity_webhook_events ORDER BY svix_id").await
}

pub(crate) async fn mapping_of(app: &TestApp, clerk_id: &str) -> Option<pb::UserMapping> {
    app.admin()
        .get_mapping(pb::GetMappingRequest {
            lookup: Some(pb::get_mapping_request::Lookup::ClerkUserId(clerk_id.into())),
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().mapping)
}

async fn signatures_are_checked_and_refusals_change_nothing(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = spawn(db, &fake, UnmappedPolicy::Reject).await;
    let ann = app.legacy_user("ann@example.com").await.to_string();
    let body = user_event("user.created", "user_ann", Some(&ann), "ann@example.com", 1000);
    let raw = body.to_string().into_bytes();
    let ts = now();
    let headers = |id: &str, ts: i64, signature: String| {
        vec![
            ("svix-id", id.to_owned()),
            ("svix-timestamp", ts.to_string()),
            ("svix-signature", signature),
        ]
    };
    let bad_signatures = metric(&app, "identity_webhook_signature_failures_total").await;
    let rejected_bad = metric(&app, "identity_webhook_rejections_total{reason=\"bad_signature\"}").await;

    // A wrong secret, a stale timestamp, a tampered body: 401, nothing recorded.
    let wrong = sign(WRONG_SECRET, "msg_w", ts, &raw);
    assert_eq!(post(&app, &headers("msg_w", ts, wrong), raw.clone()).await.0, 401);
    let stale_ts = ts - 600;
    let stale = sign(SECRET, "msg_s", stale_ts, &raw);
    assert_eq!(post(&app, &headers("msg_s", stale_ts, stale), raw.clone()).await.0, 401);
    // A timestamp at the end of i64's range: refused like any stale one.
    for extreme in [i64::MIN, i64::MAX] {
        let signature = sign(SECRET, "msg_x", extreme, &raw);
        assert_eq!(
            post(&app, &headers("msg_x", extreme, signature), raw.clone()).await.0,
            401
        );
    }
    let signed = sign(SECRET, "msg_t", ts, &raw);
    let tampered = body
        .to_string()
        .replace("ann@example.com", "eve@example.com")
        .into_bytes();
    assert_eq!(post(&app, &headers("msg_t", ts, signed), tampered).await.0, 401);
    // Missing headers; a signed body that is not an event: 400.
    assert_eq!(post(&app, &[("svix-id", "msg_m".to_owned())], raw.clone()).await.0, 400);
    let garbage = b"{\"type\": 42}".to_vec();
    let garbage_sig = sign(SECRET, "msg_g", ts, &garbage);
    assert_eq!(post(&app, &headers("msg_g", ts, garbage_sig), garbage).await.0, 400);
    // Over the limit: 413, refused before it is read whole.
    let huge = vec![b' '; identity::webhooks::MAX_BODY_BYTES + 1];
    let huge_sig = sign(SECRET, "msg_h", ts, &huge);
    assert_eq!(post(&app, &headers("msg_h", ts, huge_sig), huge).await.0, 413);
    assert!(recorded(&app).await.is_empty());
    assert!(mapping_of(&app, "user_ann").await.is_none());
    assert!(metric(&app, "identity_webhook_signature_failures_total").await >= bad_signatures + 5.0);
    assert!(metric(&app, "identity_webhook_rejections_total{reason=\"bad_signature\"}").await >= rejected_bad + 2.0);
    assert!(metric(&app, "identity_webhook_rejections_total{reason=\"too_large\"}").await >= 1.0);
    assert!(metric(&app, "identity_webhook_rejections_total{reason=\"malformed\"}").await >= 1.0);

    // A second signature in the header: any valid one is enough.
    let good = sign(SECRET, "msg_ok", ts, &raw);
    let both = format!("{} {good}", sign(WRONG_SECRET, "msg_ok", ts, &raw));
    let (status, answer) = post(&app, &headers("msg_ok", ts, both), raw.clone()).await;
    assert_eq!((status, answer.as_str()), (200, "applied"));
    assert_eq!(mapping_of(&app, "user_ann").await.unwrap().user_id, ann);
    // The secret being rotated out still verifies.
    let (status, _) = deliver_with(
        &app,
        OLD_SECRET,
        "msg_old",
        &user_event("user.updated", "user_ann", Some(&ann), "ann@example.com", 2000),
    )
    .await;
    assert_eq!(status, 200);
    // Unknown types: 2xx, so Svix does not retry them.
    let (status, answer) = deliver(
        &app,
        "msg_org",
        &json!({"type": "organization.created", "data": {"id": "org_1"}}),
    )
    .await;
    assert_eq!((status, answer.as_str()), (200, "ignored"));
    assert_eq!(recorded(&app).await.len(), 3);
    assert!(
        metric(
            &app,
            "identity_webhook_events_total{type=\"other\",outcome=\"ignored\"}"
        )
        .await
            >= 1.0
    );
    app.shutdown().await;
}

async fn duplicates_and_older_events_change_nothing(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let other_db = db.share();
    let app = spawn(db, &fake, UnmappedPolicy::Provision).await;
    let replica = spawn(other_db, &fake, UnmappedPolicy::Provision).await;
    let bob = app.legacy_user("bob@example.com").await.to_string();
    let carol = app.legacy_user("carol@example.com").await.to_string();

    // The same delivery reaching two replicas at the same moment: processed once.
    let created = user_event("user.created", "user_bob", Some(&bob), "bob@example.com", 1000);
    let (first, second) = tokio::join!(deliver(&app, "msg_1", &created), deliver(&replica, "msg_1", &created));
    let mut answers = [first.1, second.1];
    answers.sort();
    assert_eq!((first.0, second.0), (200, 200));
    assert_eq!(answers, ["applied".to_owned(), "duplicate".to_owned()]);
    // And again later, to either.
    assert_eq!(deliver(&replica, "msg_1", &created).await.1, "duplicate");
    assert_eq!(mapping_of(&app, "user_bob").await.unwrap().user_id, bob);
    let audited = strings(
        &app.db,
        "SELECT detail FROM identity_audit_events WHERE action = 'clerk.user.created'",
    )
    .await;
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert!(audited[0].as_deref().unwrap().contains("msg_1"));

    // Out of order: the newer update first, then an older one, which is not applied.
    let newer = user_event("user.updated", "user_bob", Some(&carol), "bob@example.com", 3000);
    assert_eq!(deliver(&app, "msg_3", &newer).await.1, "conflict");
    let older = user_event("user.updated", "user_bob", Some(&bob), "bob.old@example.com", 2000);
    assert_eq!(deliver(&replica, "msg_2", &older).await.1, "stale");
    // The conflict moved nothing and is audited as a failure with the event id.
    assert_eq!(mapping_of(&app, "user_bob").await.unwrap().user_id, bob);
    let failures = strings(
        &app.db,
        "SELECT detail FROM identity_audit_events WHERE action = 'clerk.user.updated' AND outcome = 'failure'",
    )
    .await;
    assert_eq!(failures.len(), 1);
    assert!(failures[0].as_deref().unwrap().contains("msg_3"));
    let outcomes = strings(&app.db, "SELECT outcome FROM identity_webhook_events ORDER BY svix_id").await;
    assert_eq!(
        outcomes,
        ["applied", "stale", "conflict"].map(|o| Some(o.to_owned())).to_vec()
    );
    replica.shutdown().await;
    app.shutdown().await;
}

/// Polls VerifyToken on `app` until the token is refused as revoked.
pub(crate) async fn refused_within_bound(app: &TestApp, token: &str) {
    // The documented bound is the revocation reload interval (1 s in these
    // tests); the loop gives it ample room and fails past it.
    for _ in 0..100 {
        // (Before the refusal arrives, an expired cache entry may already
        // find the mapping gone: refused too, but the refusal is awaited.)
        if let pb::verify_token_response::Result::Rejection(r) = app.verify(token).await
            && r.reason() == R::Revoked
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the token was still accepted on the other replica");
}

async fn deletions_and_ended_sessions_are_refused_on_every_replica(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let other_db = db.share();
    let app = spawn(db, &fake, UnmappedPolicy::Provision).await;
    let replica = spawn(other_db, &fake, UnmappedPolicy::Provision).await;
    let dan = app.legacy_user("dan@example.com").await.to_string();
    let iss = fake.url();
    assert_eq!(
        deliver(
            &app,
            "msg_dan",
            &user_event("user.created", "user_dan", Some(&dan), "dan@example.com", 1000)
        )
        .await
        .1,
        "applied"
    );
    // Tokens that verified a moment before on both replicas (so they are cached).
    let dan_token = clerk("clerk_a", "ins_clerk_a", clerk_claims(&iss, "user_dan"));
    let mut eve_claims = clerk_claims(&iss, "user_eve");
    eve_claims["sid"] = json!("sess_eve1");
    let eve_token = clerk("clerk_a", "ins_clerk_a", eve_claims);
    let mut eve_other = clerk_claims(&iss, "user_eve");
    eve_other["sid"] = json!("sess_eve2");
    let eve_other = clerk("clerk_a", "ins_clerk_a", eve_other);
    for server in [&app, &replica] {
        for _ in 0..2 {
            assert_eq!(accepted(server.verify(&dan_token).await).user_id, dan);
            accepted(server.verify(&eve_token).await);
        }
    }

    // user.deleted: refused at once where it arrived, within the bound on the other.
    assert_eq!(deliver(&app, "msg_del", &deleted_event("user_dan")).await.1, "applied");
    assert_eq!(rejected(app.verify(&dan_token).await), R::Revoked);
    refused_within_bound(&replica, &dan_token).await;
    assert!(mapping_of(&app, "user_dan").await.is_none());
    // Not re-provisioned by a late token or a late event.
    assert_eq!(
        deliver(
            &replica,
            "msg_late",
            &user_event("user.updated", "user_dan", Some(&dan), "dan@example.com", 5000)
        )
        .await
        .1,
        "stale"
    );
    assert!(mapping_of(&app, "user_dan").await.is_none());

    // session.revoked: that session only.
    assert_eq!(
        deliver(
            &replica,
            "msg_sess",
            &session_event("session.revoked", "sess_eve1", "user_eve")
        )
        .await
        .1,
        "applied"
    );
    assert_eq!(rejected(replica.verify(&eve_token).await), R::Revoked);
    refused_within_bound(&app, &eve_token).await;
    accepted(app.verify(&eve_other).await);
    accepted(replica.verify(&eve_other).await);
    for kind in ["session.ended", "session.removed"] {
        assert_eq!(
            deliver(
                &app,
                &format!("msg_{kind}"),
                &session_event(kind, "sess_eve2", "user_eve")
            )
            .await
            .1,
            "applied"
        );
    }
    assert_eq!(rejected(app.verify(&eve_other).await), R::Revoked);
    refused_within_bound(&replica, &eve_other).await;
    replica.shutdown().await;
    app.shutdown().await;
}

crate::backend_tests!(
    signatures_are_checked_and_refusals_change_nothing,
    duplicates_and_older_events_change_nothing,
    deletions_and_ended_sessions_are_refused_on_every_replica,
);

/// PostgreSQL goes away while a delivery arrives: 503, nothing recorded;
/// Svix's retry after it comes back is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_failed_on_our_side_succeeds_when_retried() {
    crate::common::init_logs();
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let target: url::Url = db.url.parse().unwrap();
    let server_addr = tokio::net::lookup_host((target.host_str().unwrap(), target.port().unwrap_or(5432)))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = TcpProxy::start(server_addr).await;
    let mut via_proxy = target.clone();
    via_proxy.set_host(Some("127.0.0.1")).unwrap();
    via_proxy.set_port(Some(proxy.addr.port())).unwrap();
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let (mut config, keys) = test_config(&db);
    config.database.acquire_timeout = Duration::from_secs(2);
    let mut clerk_cfg = clerk_config(&fake);
    clerk_cfg.unmapped_policy = UnmappedPolicy::Reject;
    config.verification.clerk = Some(clerk_cfg);
    config.clerk_webhook = Some(ClerkWebhookConfig {
        secrets: vec![SecretString::from(SECRET.to_owned())],
    });
    let app = TestApp::spawn_connecting(db, config, keys, via_proxy.as_str()).await;
    let fay = app.legacy_user("fay@example.com").await.to_string();
    let event = user_event("user.created", "user_fay", Some(&fay), "fay@example.com", 1000);

    proxy.set_down(true);
    let (status, _) = deliver(&app, "msg_retry", &event).await;
    assert!(status >= 500, "answered {status} during the outage");
    proxy.set_down(false);
    // Svix delivers the same message again later.
    let mut answer = (0, String::new());
    for _ in 0..50 {
        answer = deliver(&app, "msg_retry", &event).await;
        if answer.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!((answer.0, answer.1.as_str()), (200, "applied"));
    assert_eq!(mapping_of(&app, "user_fay").await.unwrap().user_id, fay);
    drop(proxy);
    app.shutdown().await;
}
