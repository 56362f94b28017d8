//! The big-bang strategy against a fake Clerk Backend API: every user
//! created once through throttling, server errors and a crash with resume;
//! dry runs; one job at a time; cancellation.

use std::{collections::HashSet, sync::atomic::Ordering, time::Duration};

use identity::pb::{self, BulkJobState, StartBulkMigrationRequest};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::common::{
    TestApp, TestDb, assert_invalid, crash_and_wait_out_leases,
    fake_clerk::{FakeClerk, fake_user},
    run_to_end, spawn_for_jobs, strings,
};

/// Inserts `n` legacy users with bcrypt digests; returns their ids in insertion order.
async fn seed(app: &TestApp, n: usize, prefix: &str) -> Vec<identity::domain::UserId> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(app.legacy_user(&format!("{prefix}{i}@example.com")).await);
    }
    ids
}

async fn every_user_is_created_once_through_faults_and_a_crash(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = spawn_for_jobs(db, &fake).await;
    let ids = seed(&app, 500, "bulk").await;
    // Already in Clerk: two with our external id (a create whose link was lost),
    // three by email without an external id, one by email with someone else's.
    {
        let mut directory = fake.state.directory.lock().unwrap();
        directory.push(fake_user("user_pre1", Some(&ids[10].to_string()), "bulk10@example.com"));
        directory.push(fake_user("user_pre2", Some(&ids[20].to_string()), "bulk20@example.com"));
        for n in [30, 40, 50] {
            directory.push(fake_user(
                &format!("user_mail{n}"),
                None,
                &format!("BULK{n}@example.com"),
            ));
        }
        directory.push(fake_user("user_taken", Some("somebody-else"), "bulk60@example.com"));
    }
    *fake.state.throttle_at.lock().unwrap() = vec![5, 333];
    *fake.state.error_at.lock().unwrap() = vec![40, 41, 600];

    let mut admin = app.admin();
    let mut stream = admin
        .start_bulk_migration(StartBulkMigrationRequest {
            batch_size: 25,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.total, 500);
    let job_id = first.job_id.clone();
    // Another job cannot start meanwhile.
    let busy = admin
        .start_bulk_migration(StartBulkMigrationRequest::default())
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition);
    assert!(busy.message().contains(&job_id), "{busy:?}");
    loop {
        let progress = stream.next().await.unwrap().unwrap();
        if progress.processed >= 200 {
            break;
        }
    }
    // The server dies mid-run.
    let db = crash_and_wait_out_leases(app).await;

    let app = spawn_for_jobs(db, &fake).await;
    let mut stream = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest {
            resume_job_id: job_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let last = run_to_end(&mut stream).await;
    assert_eq!(last.state(), BulkJobState::Completed, "{last:?}");
    assert_eq!(last.job_id, job_id);
    assert_eq!(last.processed, 500);
    assert_eq!(last.failed, 1, "{last:?}");
    assert_eq!(
        last.created + last.linked_existing + last.skipped + last.failed,
        500,
        "{last:?}"
    );

    // In Clerk: one user per legacy user, never two with one external id.
    let directory = fake.state.directory.lock().unwrap().clone();
    let externals: Vec<String> = directory
        .iter()
        .filter_map(|u| u["external_id"].as_str().map(str::to_owned))
        .filter(|e| e != "somebody-else")
        .collect();
    let distinct: HashSet<_> = externals.iter().collect();
    assert_eq!(externals.len(), distinct.len(), "a legacy user was created twice");
    assert_eq!(distinct.len(), 499);
    assert_eq!(fake.state.creates.load(Ordering::SeqCst), 499 - 5);
    let created = directory
        .iter()
        .find(|u| u["external_id"].as_str() == Some(&ids[100].to_string()))
        .unwrap();
    assert_eq!(created["password_hasher"], "bcrypt");
    assert!(created["password_digest"].as_str().unwrap().starts_with("$2b$"));

    // Locally: everyone linked but the conflict, whose reason is kept.
    let unlinked: Vec<Option<String>> = app
        .storage
        .bulk_candidates(&identity::storage::BulkFilter::default(), None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.email)
        .collect();
    assert_eq!(unlinked, vec![Some("bulk60@example.com".to_owned())]);
    let mappings = strings(&app.db, "SELECT clerk_user_id FROM identity_user_mappings").await;
    assert_eq!(mappings.len(), 499);
    let reasons = strings(&app.db, "SELECT reason FROM identity_bulk_failures").await;
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].as_deref().unwrap().contains("another external_id"));

    let events = app
        .admin()
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    for action in ["bulk.start", "bulk.resume", "bulk.finish"] {
        assert!(events.iter().any(|e| e.action == action), "{action} not audited");
    }
    assert_eq!(events.iter().filter(|e| e.action == "user.link").count(), 499);
    app.shutdown().await;
}

async fn dry_run_reports_and_writes_nothing(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = spawn_for_jobs(db, &fake).await;
    let ids = seed(&app, 10, "dry").await;
    fake.state
        .directory
        .lock()
        .unwrap()
        .push(fake_user("user_pre", Some(&ids[3].to_string()), "dry3@example.com"));
    let mut stream = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest {
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let last = run_to_end(&mut stream).await;
    assert_eq!(last.state(), BulkJobState::Completed);
    assert!(last.dry_run);
    assert_eq!(
        (last.total, last.processed, last.created, last.linked_existing),
        (10, 10, 9, 1)
    );
    assert_eq!(fake.state.creates.load(Ordering::SeqCst), 0);
    assert!(
        strings(&app.db, "SELECT clerk_user_id FROM identity_user_mappings")
            .await
            .is_empty()
    );
    assert!(strings(&app.db, "SELECT id FROM identity_bulk_jobs").await.is_empty());

    // A filter narrows the job.
    let mut stream = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest {
            dry_run: true,
            user_ids: vec![ids[0].to_string(), ids[1].to_string()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run_to_end(&mut stream).await.total, 2);
    app.shutdown().await;
}

async fn jobs_can_be_cancelled_and_bad_requests_refused(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = spawn_for_jobs(db, &fake).await;
    seed(&app, 40, "slow").await;
    let mut admin = app.admin();
    let mut stream = admin
        .start_bulk_migration(StartBulkMigrationRequest {
            max_requests_per_second: 4.0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    let cancelled = admin
        .cancel_bulk_migration(pb::CancelBulkMigrationRequest {
            job_id: first.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // The runner stops after the user in progress: the answer may come before or after it did.
    assert!(
        matches!(cancelled.state(), BulkJobState::Running | BulkJobState::Cancelled),
        "{cancelled:?}"
    );
    let last = run_to_end(&mut stream).await;
    assert_eq!(last.state(), BulkJobState::Cancelled);
    assert!(last.processed < 40);
    let resumed = admin
        .start_bulk_migration(StartBulkMigrationRequest {
            resume_job_id: first.job_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(resumed.code(), Code::FailedPrecondition);
    // A new job may start now.
    let mut again = admin
        .start_bulk_migration(StartBulkMigrationRequest { ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run_to_end(&mut again).await.state(), BulkJobState::Completed);

    assert_eq!(
        app.migration(&app.verify_key)
            .start_bulk_migration(StartBulkMigrationRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    for (request, field) in [
        (
            StartBulkMigrationRequest {
                batch_size: 10_000,
                ..Default::default()
            },
            "batch_size",
        ),
        (
            StartBulkMigrationRequest {
                batch_size: -1,
                ..Default::default()
            },
            "batch_size",
        ),
        (
            StartBulkMigrationRequest {
                max_requests_per_second: -3.0,
                ..Default::default()
            },
            "max_requests_per_second",
        ),
        (
            StartBulkMigrationRequest {
                max_requests_per_second: f64::NAN,
                ..Default::default()
            },
            "max_requests_per_second",
        ),
        (
            StartBulkMigrationRequest {
                user_ids: vec!["nope".into()],
                ..Default::default()
            },
            "user_ids",
        ),
        (
            StartBulkMigrationRequest {
                resume_job_id: "x".into(),
                ..Default::default()
            },
            "resume_job_id",
        ),
    ] {
        assert_invalid(&admin.start_bulk_migration(request).await.unwrap_err(), field);
    }
    let unknown = admin
        .start_bulk_migration(StartBulkMigrationRequest {
            resume_job_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_invalid(
        &admin
            .cancel_bulk_migration(pb::CancelBulkMigrationRequest { job_id: "1".into() })
            .await
            .unwrap_err(),
        "job_id",
    );
    app.shutdown().await;
}

/// One runner per job: resuming the job on the replica that runs it is refused.
async fn resuming_a_job_running_here_is_refused(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = spawn_for_jobs(db, &fake).await;
    seed(&app, 30, "here").await;
    let mut admin = app.admin();
    let mut stream = admin
        .start_bulk_migration(StartBulkMigrationRequest {
            max_requests_per_second: 5.0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    let again = admin
        .start_bulk_migration(StartBulkMigrationRequest {
            resume_job_id: first.job_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    admin
        .cancel_bulk_migration(pb::CancelBulkMigrationRequest {
            job_id: first.job_id.clone(),
        })
        .await
        .unwrap();
    let last = run_to_end(&mut stream).await;
    assert_eq!(last.state(), BulkJobState::Cancelled, "{last:?}");
    assert!(last.processed <= last.total, "{last:?}");
    app.shutdown().await;
}

/// Starts a slow job and stops the server under it (a crash); returns the
/// job id and the database once the runner's lease has lapsed.
async fn job_whose_runner_died(app: TestApp) -> (String, TestDb) {
    let mut stream = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest {
            max_requests_per_second: 5.0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let job_id = stream.next().await.unwrap().unwrap().job_id;
    let db = crash_and_wait_out_leases(app).await;
    (job_id, db)
}

/// A job whose runner died can be cancelled, and a resume keeps a requested cancellation.
async fn a_job_whose_runner_died_can_be_cancelled(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = spawn_for_jobs(db, &fake).await;
    seed(&app, 30, "dead").await;

    let (job_id, db) = job_whose_runner_died(app).await;
    let app = spawn_for_jobs(db, &fake).await;
    let cancelled = app
        .admin()
        .cancel_bulk_migration(pb::CancelBulkMigrationRequest { job_id: job_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), BulkJobState::Cancelled, "{cancelled:?}");
    let resumed = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest {
            resume_job_id: job_id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(resumed.code(), Code::FailedPrecondition, "{resumed:?}");

    // Cancelled while its runner lived, which died before it noticed: resuming does not run it.
    let (job_id, db) = job_whose_runner_died(app).await;
    crate::common::exec(
        &db,
        &format!("UPDATE identity_bulk_jobs SET cancel_requested = true WHERE id = '{job_id}'"),
    )
    .await;
    let app = spawn_for_jobs(db, &fake).await;
    let resumed = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest {
            resume_job_id: job_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(resumed.code(), Code::FailedPrecondition, "{resumed:?}");
    let job = app
        .storage
        .get_bulk_job(job_id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, identity::storage::BulkJobState::Cancelled);

    // A new job can start and finish.
    let mut again = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run_to_end(&mut again).await.state(), BulkJobState::Completed);
    app.shutdown().await;
}

/// The lease holds while Clerk makes the runner wait (Retry-After longer
/// than the lease), and a runner that loses it stops at once and writes nothing.
async fn a_runner_keeps_its_lease_while_clerk_makes_it_wait(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let other_db = db.share();
    let app = spawn_for_jobs(db, &fake).await;
    seed(&app, 5, "wait").await;
    // The third Backend API request waits a minute (the client's cap) before its retry.
    *fake.state.throttle_at.lock().unwrap() = vec![3];
    fake.state.retry_after.store(60, Ordering::SeqCst);
    let mut stream = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest::default())
        .await
        .unwrap()
        .into_inner();
    let job_id = stream.next().await.unwrap().unwrap().job_id;
    tokio::time::timeout(Duration::from_secs(30), async {
        while fake.state.api_requests.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the runner reaches the throttled request");
    // Longer than the lease (2 s): without renewal it would have lapsed.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let replica = spawn_for_jobs(other_db, &fake).await;
    let taken = replica
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest {
            resume_job_id: job_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::FailedPrecondition, "{taken:?}");

    // Another replica takes the job over: the waiting runner stops long before Clerk's minute is up.
    crate::common::exec(
        &app.db,
        &format!("UPDATE identity_bulk_jobs SET lease_owner = 'another-replica' WHERE id = '{job_id}'"),
    )
    .await;
    let mut last = None;
    while let Some(progress) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the runner stops once its lease is lost")
    {
        last = Some(progress.unwrap());
    }
    let last = last.expect("a final snapshot");
    assert_eq!(last.state(), BulkJobState::Failed, "{last:?}");
    assert!(last.message.contains("lease"), "{last:?}");
    // Nothing of the stale runner overwrote the new owner's job.
    let job = app
        .storage
        .get_bulk_job(job_id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, identity::storage::BulkJobState::Running);
    assert_eq!(job.lease_owner.as_deref(), Some("another-replica"));
    replica.shutdown().await;
    app.shutdown().await;
}

/// The rule of `link_by_email`: a Clerk account that holds a legacy user's
/// email is linked only when that address is its verified primary one.
async fn bulk_links_by_email_only_a_verified_primary_address(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let app = spawn_for_jobs(db, &fake).await;
    let ids = seed(&app, 3, "claim").await;
    {
        let mut directory = fake.state.directory.lock().unwrap();
        let mut unverified = fake_user("user_unverified", None, "claim0@example.com");
        unverified["email_addresses"][0]["verification"]["status"] = "unverified".into();
        directory.push(unverified);
        let mut secondary = fake_user("user_secondary", None, "claim1@example.com");
        secondary["primary_email_address_id"] = "idn_2".into();
        secondary["email_addresses"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"id": "idn_2", "email_address": "owner@example.com", "verification": {"status": "verified"}}));
        directory.push(secondary);
        directory.push(fake_user("user_verified", None, "claim2@example.com"));
    }
    let mut stream = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest::default())
        .await
        .unwrap()
        .into_inner();
    let last = run_to_end(&mut stream).await;
    assert_eq!(last.state(), BulkJobState::Completed, "{last:?}");
    assert_eq!(
        (last.processed, last.linked_existing, last.failed, last.created),
        (3, 1, 2, 0),
        "{last:?}"
    );

    let mappings = strings(&app.db, "SELECT clerk_user_id FROM identity_user_mappings").await;
    assert_eq!(mappings, vec![Some("user_verified".to_owned())]);
    let job = app
        .storage
        .get_bulk_job(last.job_id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    let failures = app.storage.bulk_failures(job.id).await.unwrap();
    let failed: HashSet<_> = failures.iter().map(|(user, _)| *user).collect();
    assert_eq!(failed, HashSet::from([ids[0], ids[1]]));
    assert!(
        failures.iter().all(|(_, reason)| reason.contains("verified")),
        "{failures:?}"
    );
    // Nobody else's Clerk account was claimed for these users.
    let directory = fake.state.directory.lock().unwrap().clone();
    assert_eq!(directory.len(), 3);
    for id in ["user_unverified", "user_secondary"] {
        let user = directory.iter().find(|u| u["id"] == id).unwrap();
        assert!(user["external_id"].is_null(), "{user}");
    }
    app.shutdown().await;
}

async fn bulk_needs_the_backend_api(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let status = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    app.shutdown().await;
}

crate::backend_tests!(
    every_user_is_created_once_through_faults_and_a_crash,
    dry_run_reports_and_writes_nothing,
    jobs_can_be_cancelled_and_bad_requests_refused,
    bulk_needs_the_backend_api,
    resuming_a_job_running_here_is_refused,
    a_job_whose_runner_died_can_be_cancelled,
    a_runner_keeps_its_lease_while_clerk_makes_it_wait,
    bulk_links_by_email_only_a_verified_primary_address,
);
