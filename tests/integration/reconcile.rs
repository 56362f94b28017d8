//! ReconcileMappings against a fake Clerk serving 2,000 users: every drift
//! kind planted, 429 and 5xx answers injected, and a restart in the middle.

use std::{collections::HashMap, time::Duration};

use identity::pb::{self, BulkJobState, ReconcileMappingsRequest};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::common::{
    TestApp, TestDb, crash_and_wait_out_leases,
    fake_clerk::{FakeClerk, fake_user},
    run_to_end, spawn_for_jobs,
};

async fn link(app: &TestApp, user: &str, clerk_id: &str) {
    app.admin()
        .link_user(pb::LinkUserRequest {
            user_id: user.to_owned(),
            clerk_user_id: clerk_id.to_owned(),
        })
        .await
        .unwrap();
}

async fn mapping_of(app: &TestApp, user: &str) -> Option<String> {
    app.admin()
        .get_mapping(pb::GetMappingRequest {
            lookup: Some(pb::get_mapping_request::Lookup::UserId(user.to_owned())),
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().mapping)
        .map(|m| m.clerk_user_id)
}

fn drift(progress: &pb::ReconcileProgress) -> HashMap<String, (i64, i64, Vec<String>)> {
    progress
        .drift
        .iter()
        .map(|d| (d.kind.clone(), (d.count, d.fixed, d.clerk_user_ids.clone())))
        .collect()
}

async fn every_drift_kind_is_found_through_faults_and_a_restart(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = spawn_for_jobs(db, &fake).await;
    let ann = app.legacy_user("ann@example.com").await.to_string();
    let bob = app.legacy_user("bob@example.com").await.to_string();
    let cat = app.legacy_user("cat@example.com").await.to_string();
    let dan = app.legacy_user("dan@example.com").await.to_string();
    link(&app, &ann, "user_ann").await;
    link(&app, &bob, "user_gone").await;
    link(&app, &cat, "user_cat").await;
    {
        let mut directory = fake.state.directory.lock().unwrap();
        for n in 0..1995 {
            directory.push(fake_user(
                &format!("user_fill{n:04}"),
                None,
                &format!("fill{n}@example.com"),
            ));
        }
        // Mapped to ann already, yet another Clerk user claims her by external_id.
        directory.push(fake_user("user_ann", None, "ann@example.com"));
        directory.push(fake_user("user_claimsann", Some(&ann), "someone@example.com"));
        // cat's email in Clerk is not the one on record.
        directory.push(fake_user("user_cat", None, "cat.new@example.com"));
        // external_id names nobody.
        directory.push(fake_user(
            "user_stranger",
            Some(&uuid::Uuid::new_v4().to_string()),
            "x@example.com",
        ));
        // dan has a Clerk account with his id, but no mapping.
        directory.push(fake_user("user_dan", Some(&dan), "dan@example.com"));
        // user_gone (bob's) is not in Clerk any more.
    }
    *fake.state.throttle_at.lock().unwrap() = vec![2];
    *fake.state.error_at.lock().unwrap() = vec![4, 5];

    let mut stream = app
        .admin()
        .reconcile_mappings(ReconcileMappingsRequest {
            fix: true,
            page_size: 100,
            max_requests_per_second: 5.0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    let job_id = first.job_id.clone();
    // One pass at a time.
    let busy = app
        .admin()
        .reconcile_mappings(ReconcileMappingsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition);
    assert!(busy.message().contains(&job_id), "{busy:?}");
    loop {
        let progress = stream.next().await.unwrap().unwrap();
        assert_eq!(progress.state(), BulkJobState::Running, "{progress:?}");
        if progress.clerk_users_seen >= 600 {
            break;
        }
    }
    // The server stops mid-pass; the pass resumes from where it was saved.
    let db = crash_and_wait_out_leases(app).await;
    let app = spawn_for_jobs(db, &fake).await;
    let mut stream = app
        .admin()
        .reconcile_mappings(ReconcileMappingsRequest {
            resume_job_id: job_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let last = run_to_end(&mut stream).await;
    assert_eq!(last.state(), BulkJobState::Completed, "{last:?}");
    assert_eq!(last.clerk_users_seen, 2000, "every Clerk user once, across the restart");
    let found = drift(&last);
    let one = |kind: &str, id: &str, fixed: i64| {
        assert_eq!(found[kind], (1, fixed, vec![id.to_owned()]), "{kind}: {found:?}");
    };
    one("external_id_mapped_elsewhere", "user_claimsann", 0);
    one("clerk_user_missing", "user_gone", 1);
    one("external_id_unknown", "user_stranger", 0);
    one("email_mismatch", "user_cat", 0);
    one("missing_mapping", "user_dan", 1);
    assert_eq!(found["invalid_clerk_user_id"], (0, 0, vec![]));
    assert_eq!(found.len(), 6);
    // The injected 429 and 5xx answers were met and retried.
    use std::sync::atomic::Ordering::SeqCst;
    assert!(fake.state.api_requests.load(SeqCst) >= fake.state.list_requests.load(SeqCst) + 3);

    // The safe repairs, and nothing else.
    assert_eq!(mapping_of(&app, &dan).await.as_deref(), Some("user_dan"));
    assert_eq!(mapping_of(&app, &bob).await, None);
    assert_eq!(mapping_of(&app, &ann).await.as_deref(), Some("user_ann"));
    assert_eq!(mapping_of(&app, &cat).await.as_deref(), Some("user_cat"));

    // The last pass in the stats.
    let stats = app
        .admin()
        .get_migration_stats(pb::GetMigrationStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let summary = stats.last_reconciliation.unwrap();
    assert_eq!(summary.job_id, job_id);
    assert_eq!(summary.state(), BulkJobState::Completed);
    assert_eq!(drift(&summary), found);

    // The dashboard shows the same pass, by counts only.
    let origin = format!("http://{}", app.metrics_addr.expect("HTTP listener"));
    let mut events = reqwest::get(format!("{origin}/dashboard/events?window=1h"))
        .await
        .unwrap();
    let mut buffer = String::new();
    let snapshot: serde_json::Value = loop {
        if let Some(data) = buffer
            .split("\n\n")
            .filter(|_| buffer.contains("\n\n"))
            .find_map(|block| block.lines().find_map(|l| l.strip_prefix("data:")))
        {
            break serde_json::from_str(data.trim()).unwrap();
        }
        let chunk = tokio::time::timeout(Duration::from_secs(30), events.chunk())
            .await
            .expect("a dashboard event within 30 s")
            .unwrap()
            .expect("the stream stays open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    };
    let shown = &snapshot["clerk_sync"]["reconciliation"];
    assert_eq!(shown["1 state"], "completed", "{snapshot}");
    let found_missing = &found["missing_mapping"];
    assert_eq!(
        shown["5 missing_mapping"],
        format!("{} found, {} fixed", found_missing.0, found_missing.1),
        "{snapshot}"
    );
    assert!(
        shown
            .as_object()
            .unwrap()
            .values()
            .all(|v| !v.to_string().contains("user_")),
        "no Clerk ids on the dashboard: {shown}"
    );

    // A dry run finds what is left and changes nothing.
    let mut stream = app
        .admin()
        .reconcile_mappings(ReconcileMappingsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut dry = None;
    while let Some(progress) = stream.next().await {
        dry = Some(progress.unwrap());
    }
    let dry = dry.unwrap();
    assert_eq!(dry.state(), BulkJobState::Completed, "{dry:?}");
    let left = drift(&dry);
    assert_eq!(left["missing_mapping"].0, 0);
    assert_eq!(left["clerk_user_missing"].0, 0);
    assert_eq!(left["external_id_mapped_elsewhere"].0, 1);
    assert_eq!(left["email_mismatch"].0, 1);
    app.shutdown().await;
}

async fn clerk_users_with_malformed_ids_are_reported_not_skipped(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = spawn_for_jobs(db, &fake).await;
    let dan = app.legacy_user("dan@example.com").await.to_string();
    let hostile = format!("user_\u{1b}[31mred\n{}", "x".repeat(300));
    {
        let mut directory = fake.state.directory.lock().unwrap();
        // Would fill dan's missing mapping if its id were one.
        directory.push(fake_user("user_bad-id", Some(&dan), "dan@example.com"));
        directory.push(fake_user(&hostile, None, "h@example.com"));
        directory.push(fake_user("", None, "empty@example.com"));
        // The pass goes on past them.
        directory.push(fake_user(
            "user_stranger",
            Some(&uuid::Uuid::new_v4().to_string()),
            "x@example.com",
        ));
    }
    let mut stream = app
        .admin()
        .reconcile_mappings(ReconcileMappingsRequest {
            fix: true,
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let last = run_to_end(&mut stream).await;
    assert_eq!(last.state(), BulkJobState::Completed, "{last:?}");
    assert_eq!(last.clerk_users_seen, 4);
    let found = drift(&last);
    let (count, fixed, ids) = &found["invalid_clerk_user_id"];
    assert_eq!((*count, *fixed), (3, 0), "{found:?}");
    assert_eq!(ids[0], "user_bad-id");
    assert!(ids[1].starts_with("user_\\u{1b}[31mred\\nxxx"), "{:?}", ids[1]);
    assert_eq!(ids[1].chars().count(), 128, "{:?}", ids[1]);
    assert!(ids.iter().all(|id| !id.chars().any(char::is_control)), "{ids:?}");
    assert_eq!(ids[2], "");
    assert_eq!(found["external_id_unknown"].0, 1, "{found:?}");
    assert_eq!(found["missing_mapping"].0, 0, "{found:?}");
    // Nothing was linked to a Clerk id this service does not accept.
    assert_eq!(mapping_of(&app, &dan).await, None);

    // The same counts in the stats, and the kind among the drift gauges.
    let stats = app
        .admin()
        .get_migration_stats(pb::GetMigrationStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(drift(&stats.last_reconciliation.unwrap()), found);
    let origin = format!("http://{}", app.metrics_addr.expect("HTTP listener"));
    let metrics = reqwest::get(format!("{origin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("identity_reconcile_drift{kind=\"invalid_clerk_user_id\"}"),
        "{metrics}"
    );
    app.shutdown().await;
}

crate::backend_tests!(
    every_drift_kind_is_found_through_faults_and_a_restart,
    clerk_users_with_malformed_ids_are_reported_not_skipped
);
