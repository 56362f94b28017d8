//! GetMigrationStats and StreamMigrationMetrics through a real client, on
//! two replicas sharing a database; the Prometheus endpoint.

use std::time::Duration;

use identity::{
    config::VerificationConfig,
    pb::{self, GetMigrationStatsRequest, StatsWindow, StreamMigrationMetricsRequest},
};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::common::{
    TestApp, TestDb, accepted, assert_invalid, clerk_config,
    fake_clerk::FakeClerk,
    legacy_config, rejected, test_config,
    tokens::{clerk, clerk_claims, legacy, legacy_claims, now},
};

fn verification(fake: &FakeClerk) -> VerificationConfig {
    VerificationConfig {
        legacy: Some(legacy_config()),
        clerk: Some(clerk_config(fake)),
        ..VerificationConfig::default()
    }
}

async fn stats(app: &TestApp) -> pb::MigrationStats {
    app.migration(&app.verify_key)
        .get_migration_stats(GetMigrationStatsRequest {
            window: StatsWindow::LastHour as i32,
            readiness_days: 7,
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
}

async fn stats_are_exact_and_cluster_wide(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let second_db = db.share();
    let (mut config, keys) = test_config(&db);
    config.verification = verification(&fake);
    let a = TestApp::spawn_with(db, config.clone(), keys.clone()).await;
    let b = TestApp::spawn_with(second_db, config, keys).await;

    let ann = a.legacy_user("ann@example.com").await;
    let bob = a.legacy_user("bob@example.com").await;
    a.legacy_user("cat@example.com").await;
    a.admin()
        .link_user(pb::LinkUserRequest {
            user_id: bob.to_string(),
            clerk_user_id: "user_bob".into(),
        })
        .await
        .unwrap();

    // On A: two legacy successes (ann, and bob who is migrated), one expired.
    accepted(a.verify(&legacy(legacy_claims(&ann.to_string()))).await);
    accepted(a.verify(&legacy(legacy_claims(&bob.to_string()))).await);
    let mut expired = legacy_claims(&ann.to_string());
    expired["exp"] = serde_json::json!(now() - 600);
    assert_eq!(rejected(a.verify(&legacy(expired)).await), pb::RejectionReason::Expired);
    // On B: a new Clerk user (provisioned) and garbage.
    accepted(
        b.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_new")))
            .await,
    );
    assert_eq!(rejected(b.verify("not-a-token").await), pb::RejectionReason::Malformed);

    // Each replica flushes every second; either one then shows the sum.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for app in [&a, &b] {
        let s = stats(app).await;
        assert_eq!(
            (s.total_users, s.legacy_users, s.migrated_users, s.clerk_native_users),
            (4, 2, 1, 1)
        );
        assert!((s.migrated_ratio - 0.5).abs() < 1e-9);
        assert_eq!(
            (s.auth_attempts, s.auth_successes, s.auth_rejections, s.auth_errors),
            (5, 3, 2, 0),
            "{s:?}"
        );
        assert!((s.success_rate - 0.6).abs() < 1e-9);
        let legacy_figures = s.methods.iter().find(|m| m.method == "legacy_jwt").unwrap();
        assert_eq!((legacy_figures.attempts, legacy_figures.successes), (3, 2));
        assert_eq!(
            legacy_figures.rejections,
            vec![pb::ReasonCount {
                reason: "expired".into(),
                count: 1
            }]
        );
        assert_eq!(s.methods.iter().find(|m| m.method == "clerk").unwrap().successes, 1);
        assert_eq!(
            s.methods.iter().find(|m| m.method == "unknown").unwrap().rejections[0].reason,
            "malformed"
        );
        assert!(s.latency_p50_us > 0 && s.latency_p50_us <= s.latency_p99_us);
        let readiness = s.readiness.unwrap();
        assert_eq!(readiness.days, 7);
        assert_eq!(readiness.active_users, 3, "ann, bob and the Clerk user");
        assert_eq!(
            readiness.would_be_locked_out, 1,
            "ann only uses legacy tokens and has no Clerk account"
        );
        assert_eq!(readiness.legacy_verifications_by_migrated_users, 1, "bob");
        assert_eq!(s.auth_mode(), pb::AuthMode::Dual);
    }
    b.shutdown().await;
    a.shutdown().await;
}

/// Opens StreamMigrationMetrics with the verify key.
async fn open_stream(app: &TestApp, interval_seconds: u32) -> tonic::Streaming<pb::StreamMigrationMetricsResponse> {
    try_open_stream(app, &app.verify_key, interval_seconds).await.unwrap()
}

async fn try_open_stream(
    app: &TestApp,
    key: &str,
    interval_seconds: u32,
) -> Result<tonic::Streaming<pb::StreamMigrationMetricsResponse>, tonic::Status> {
    app.migration(key)
        .stream_migration_metrics(StreamMigrationMetricsRequest {
            interval_seconds,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Opens a stream, waiting for a slot while the caller's dropped streams close on the server.
async fn open_stream_when_free(app: &TestApp) -> tonic::Streaming<pb::StreamMigrationMetricsResponse> {
    for _ in 0..100 {
        match try_open_stream(app, &app.verify_key, 3600).await {
            Ok(stream) => return stream,
            Err(status) if status.code() == Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("cannot open a stream: {status:?}"),
        }
    }
    panic!("the slots of dropped streams were never freed")
}

async fn streams_push_snapshots_and_end_cleanly(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut client = app.migration(&app.verify_key);
    // With an hour between snapshots, the first can only come at once.
    let mut hourly = open_stream(&app, 3600).await;
    let first = tokio::time::timeout(Duration::from_secs(10), hourly.next())
        .await
        .expect("first snapshot at once");
    assert!(first.unwrap().unwrap().stats.is_some());
    drop(hourly);
    let mut stream = open_stream(&app, 1).await;
    let first = stream.next().await.unwrap().unwrap().stats.unwrap();
    assert_eq!(first.total_users, 0);
    app.legacy_user("ann@example.com").await;
    let second = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.stats.unwrap().total_users, 1);

    for (request, field) in [
        (
            StreamMigrationMetricsRequest {
                interval_seconds: 3601,
                ..Default::default()
            },
            "interval_seconds",
        ),
        (
            StreamMigrationMetricsRequest {
                window: 42,
                ..Default::default()
            },
            "window",
        ),
        (
            StreamMigrationMetricsRequest {
                readiness_days: 1000,
                ..Default::default()
            },
            "readiness_days",
        ),
    ] {
        assert_invalid(&client.stream_migration_metrics(request).await.unwrap_err(), field);
    }
    let anonymous = identity::pb::migration_service_client::MigrationServiceClient::new(app.channel.clone())
        .get_migration_stats(GetMigrationStatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    // Server shutdown ends open streams.
    let db = app.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(item) = stream.next().await {
            if item.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "stream outlived the server");
    drop(db);
}

async fn a_thousand_cancelled_streams_leave_nothing_behind(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    // Warm up one stream so lazily started tasks exist before the baseline.
    {
        let mut stream = open_stream(&app, 3600).await;
        stream.next().await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = metrics.num_alive_tasks();
    // One caller may hold 8 streams: 125 rounds of 8, each round reusing
    // the slots the last one freed.
    for _ in 0..125 {
        let mut streams = Vec::new();
        for _ in 0..8 {
            let mut stream = open_stream_when_free(&app).await;
            stream.next().await.unwrap().unwrap();
            streams.push(stream);
        }
        assert!(
            metrics.num_alive_tasks() >= baseline + 8,
            "each open stream has its task"
        );
        drop(streams);
    }
    let mut alive = metrics.num_alive_tasks();
    for _ in 0..100 {
        if alive <= baseline + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        alive = metrics.num_alive_tasks();
    }
    assert!(
        alive <= baseline + 2,
        "{alive} tasks alive after cancelling 1,000 streams (baseline {baseline})"
    );
    app.shutdown().await;
}

async fn a_caller_cannot_open_unbounded_streams(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut stream = open_stream(&app, 3600).await;
        stream.next().await.unwrap().unwrap();
        held.push(stream);
    }
    let refused = try_open_stream(&app, &app.verify_key, 3600).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("8 metric streams"), "{}", refused.message());
    // Another caller has slots of its own.
    let mut other = try_open_stream(&app, &app.admin_key, 3600).await.unwrap();
    other.next().await.unwrap().unwrap();
    // Closing one stream frees its slot.
    drop(held.pop());
    let mut again = open_stream_when_free(&app).await;
    again.next().await.unwrap().unwrap();

    // Look-backs are rounded up to a few buckets, so cycling them cannot
    // defeat the readiness cache; the answer says which look-back it used.
    let mut client = app.migration(&app.verify_key);
    for (asked, used) in [
        (1, 1),
        (2, 7),
        (10, 14),
        (30, 30),
        (31, 60),
        (200, 365),
        (365, 365),
        (0, 30),
    ] {
        let stats = client
            .get_migration_stats(GetMigrationStatsRequest {
                window: StatsWindow::LastHour as i32,
                readiness_days: asked,
            })
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap();
        assert_eq!(stats.readiness.unwrap().days, used, "asked for {asked} days");
    }
    drop(held);
    app.shutdown().await;
}

async fn prometheus_endpoint_exposes_the_service(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = TestApp::spawn_verifying(db, verification(&fake)).await;
    let ann = app.legacy_user("ann@example.com").await;
    // A legacy token enters the token cache on its second sighting.
    let token = legacy(legacy_claims(&ann.to_string()));
    for _ in 0..3 {
        accepted(app.verify(&token).await);
    }
    stats(&app).await;
    let url = format!("http://{}/metrics", app.metrics_addr.expect("metrics served"));
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.text().await.unwrap();
    // Gauges are refreshed by background loops (every second in tests).
    for _ in 0..30 {
        if body.contains("identity_db_pool_connections") && body.contains("identity_outbox_messages") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        body = reqwest::get(&url).await.unwrap().text().await.unwrap();
    }
    for needle in [
        // Figures counted per call are this server's own, so exact.
        "identity_verifications_total{method=\"legacy_jwt\",outcome=\"success\"} 3\n",
        "identity_verification_duration_seconds_bucket{method=\"legacy_jwt\",le=\"+Inf\"} 3\n",
        "identity_verification_duration_seconds_count{method=\"legacy_jwt\"} 3\n",
        "identity_token_cache_requests_total{result=\"miss\"} 2\n",
        "identity_token_cache_requests_total{result=\"hit\"} 1\n",
        // Entered on its second sighting: one entry, under the default bound.
        "identity_token_cache_entries 1\n",
        "identity_token_cache_capacity 50000\n",
        "identity_grpc_requests_total{service=\"identity.v1.IdentityService\",method=\"VerifyToken\",code=\"Ok\"} 3\n",
        "identity_grpc_request_duration_seconds_bucket{service=\"identity.v1.IdentityService\",method=\"VerifyToken\",le=\"+Inf\"} 3\n",
        "identity_db_pool_connections{state=\"open\"}",
        "identity_outbox_messages{state=\"pending\"}",
    ] {
        assert!(body.contains(needle), "{needle} missing from:\n{body}");
    }
    app.shutdown().await;
}

crate::backend_tests!(
    stats_are_exact_and_cluster_wide,
    streams_push_snapshots_and_end_cleanly,
    a_thousand_cancelled_streams_leave_nothing_behind,
    a_caller_cannot_open_unbounded_streams,
    prometheus_endpoint_exposes_the_service,
);
