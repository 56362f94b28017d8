//! The local verdict cache: hits skip the service, nothing is served past
//! `exp` or past the staleness bound, garbage cannot evict good entries.

use std::time::{Duration, SystemTime};

use identity_client::{CacheOptions, IdentityClient, RejectionReason};

use crate::common::{TestApp, legacy_for};

async fn cached(app: &TestApp, options: CacheOptions) -> IdentityClient {
    IdentityClient::builder(app.verify_key.clone())
        .endpoint(app.url.clone())
        .cache(options)
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_do_not_call_the_service() {
    let app = TestApp::spawn().await;
    let ann = app.legacy_user("ann@example.com").await;
    let client = cached(&app, CacheOptions::default().max_staleness(Duration::from_secs(600))).await;
    let token = legacy_for(&ann, 3600);

    let before = app.verify_calls().await;
    for _ in 0..20 {
        assert_eq!(client.verify_token(&token).await.unwrap().user_id, ann.to_string());
    }
    assert_eq!(app.verify_calls().await - before, 1, "one call, nineteen hits");

    // Another audience is another question.
    let _ = client.verify_token_for_audience(&token, "billing").await;
    assert_eq!(app.verify_calls().await - before, 2);

    // Rejections are cached too, but in their own small cache: a flood of
    // garbage does not push the good token out.
    for i in 0..200 {
        let err = client.verify_token(&format!("garbage-{i}")).await.unwrap_err();
        assert_eq!(err.rejection(), Some(RejectionReason::Malformed));
    }
    let after_flood = app.verify_calls().await;
    assert_eq!(after_flood - before, 202);
    client.verify_token(&token).await.unwrap();
    assert_eq!(
        app.verify_calls().await,
        after_flood,
        "the good entry survived the flood"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_verdict_outlives_the_token() {
    let app = TestApp::spawn().await;
    let ann = app.legacy_user("ann@example.com").await;
    let client = cached(&app, CacheOptions::default().max_staleness(Duration::from_secs(600))).await;
    let token = legacy_for(&ann, 2);

    let exp = client.verify_token(&token).await.unwrap().expires_at.unwrap();
    client.verify_token(&token).await.unwrap();
    // Wait until the token's exp has passed (JWT exp has one-second grain).
    while SystemTime::now() <= exp + Duration::from_millis(100) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past exp the cache answers nothing: the service is asked again (and
    // decides, with its own clock-skew leeway).
    let before = app.verify_calls().await;
    let again = client.verify_token(&token).await;
    assert_eq!(app.verify_calls().await - before, 1, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_is_seen_within_the_staleness_bound() {
    let app = TestApp::spawn().await;
    let ann = app.legacy_user("ann@example.com").await;
    let staleness = Duration::from_secs(1);
    let client = cached(&app, CacheOptions::default().max_staleness(staleness)).await;
    let token = legacy_for(&ann, 3600);
    client.verify_token(&token).await.unwrap();

    // Another caller revokes the token; this one may serve its cached
    // verdict for at most `staleness`.
    app.client(&app.admin_key).await.revoke_token(&token).await.unwrap();
    tokio::time::sleep(staleness + Duration::from_millis(200)).await;
    let err = client.verify_token(&token).await.unwrap_err();
    assert_eq!(err.rejection(), Some(RejectionReason::Revoked), "{err}");

    // Revoking through the caching client itself takes effect at once.
    let token = legacy_for(&ann, 3600);
    let admin = IdentityClient::builder(app.admin_key.clone())
        .endpoint(app.url.clone())
        .cache(CacheOptions::default().max_staleness(Duration::from_secs(600)))
        .connect()
        .await
        .unwrap();
    admin.verify_token(&token).await.unwrap();
    admin.revoke_token(&token).await.unwrap();
    let err = admin.verify_token(&token).await.unwrap_err();
    assert_eq!(err.rejection(), Some(RejectionReason::Revoked), "{err}");
}
