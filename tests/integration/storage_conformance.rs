//! The storage conformance suite: every operation of the `Storage` trait,
//! run against SQLite and PostgreSQL alike.

use std::sync::Arc;

use chrono::{Duration as ChronoDuration, Utc};
use identity::{
    domain::{AuditOutcome, ClerkUserId, Email, UserId},
    storage::{
        AuditQuery, BulkCounters, BulkJobRecord, BulkJobState, Conflict, InvitationCounts, MappingKey, NewAuditEvent,
        NewInvitation, NewLegacyUser, NewOutboxMessage, OutboxCounts, Storage, StorageError, UserKey,
    },
};

use crate::common::TestDb;

fn clerk(id: &str) -> ClerkUserId {
    ClerkUserId::parse("clerk_user_id", id).unwrap()
}

fn audit(action: &str, user: Option<UserId>) -> NewAuditEvent {
    NewAuditEvent {
        caller: "suite".into(),
        action: action.into(),
        user_id: user,
        outcome: AuditOutcome::Success,
        detail: "d".into(),
    }
}

async fn insert(storage: &dyn Storage, email: &str, hash: Option<&str>) -> UserId {
    let id = UserId::new_random();
    storage
        .insert_legacy_user(&NewLegacyUser {
            id,
            email: Email::parse("email", email).unwrap(),
            password_hash: hash.map(str::to_owned),
        })
        .await
        .unwrap();
    id
}

async fn audit_count(storage: &dyn Storage, action: &str) -> usize {
    storage
        .list_audit(&AuditQuery {
            action: Some(action.into()),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .len()
}

async fn ping_answers(db: TestDb) {
    db.storage().await.ping().await.unwrap();
}

async fn users_are_found_by_id_clerk_id_and_email(db: TestDb) {
    let storage = db.storage().await;
    let id = insert(storage.as_ref(), "Ann@Example.com", Some("$2b$10$x")).await;
    let by_id = storage.find_user(&UserKey::Id(id)).await.unwrap().unwrap();
    assert_eq!(by_id.id, id);
    assert_eq!(by_id.email.as_deref(), Some("Ann@Example.com"));
    assert!(by_id.has_password);
    assert!(!by_id.clerk_native);
    assert_eq!(by_id.clerk_user_id, None);
    let by_email = storage
        .find_user(&UserKey::Email(Email::parse("e", "ann@example.COM").unwrap()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_email.id, id, "email lookups ignore case");
    assert!(
        storage
            .find_user(&UserKey::Id(UserId::new_random()))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        storage
            .find_user(&UserKey::ClerkUserId(clerk("user_nobody")))
            .await
            .unwrap()
            .is_none()
    );

    storage
        .link_user(id, &clerk("user_ann1"), &audit("user.link", Some(id)))
        .await
        .unwrap();
    let by_clerk = storage
        .find_user(&UserKey::ClerkUserId(clerk("user_ann1")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_clerk.id, id);
    assert_eq!(by_clerk.clerk_user_id.as_deref(), Some("user_ann1"));

    let no_password = insert(storage.as_ref(), "bob@example.com", None).await;
    assert!(
        !storage
            .find_user(&UserKey::Id(no_password))
            .await
            .unwrap()
            .unwrap()
            .has_password
    );
}

async fn duplicate_users_conflict(db: TestDb) {
    let storage = db.storage().await;
    let id = insert(storage.as_ref(), "ann@example.com", None).await;
    let same_id = storage
        .insert_legacy_user(&NewLegacyUser {
            id,
            email: Email::parse("e", "other@example.com").unwrap(),
            password_hash: None,
        })
        .await;
    assert!(
        matches!(same_id, Err(StorageError::Conflict(Conflict::UserExists))),
        "{same_id:?}"
    );
    let same_email = storage
        .insert_legacy_user(&NewLegacyUser {
            id: UserId::new_random(),
            email: Email::parse("e", "ANN@example.com").unwrap(),
            password_hash: None,
        })
        .await;
    assert!(
        matches!(same_email, Err(StorageError::Conflict(Conflict::UserExists))),
        "{same_email:?}"
    );
}

async fn link_writes_mapping_user_and_audit_together(db: TestDb) {
    let storage = db.storage().await;
    let id = insert(storage.as_ref(), "ann@example.com", None).await;
    let mapping = storage
        .link_user(id, &clerk("user_a"), &audit("user.link", Some(id)))
        .await
        .unwrap();
    assert_eq!(mapping.mapping.user_id, id);
    assert_eq!(mapping.mapping.clerk_user_id, clerk("user_a"));
    assert_eq!(mapping.merged_from, None);
    for key in [MappingKey::UserId(id), MappingKey::ClerkUserId(clerk("user_a"))] {
        assert_eq!(storage.find_mapping(&key).await.unwrap().unwrap().user_id, id);
    }
    assert_eq!(
        storage
            .find_user(&UserKey::Id(id))
            .await
            .unwrap()
            .unwrap()
            .clerk_user_id
            .as_deref(),
        Some("user_a")
    );
    assert_eq!(audit_count(storage.as_ref(), "user.link").await, 1);
}

async fn link_conflicts_and_missing_users_change_nothing(db: TestDb) {
    let storage = db.storage().await;
    let ann = insert(storage.as_ref(), "ann@example.com", None).await;
    let bob = insert(storage.as_ref(), "bob@example.com", None).await;
    storage
        .link_user(ann, &clerk("user_a"), &audit("user.link", Some(ann)))
        .await
        .unwrap();

    let again = storage
        .link_user(ann, &clerk("user_b"), &audit("user.link", Some(ann)))
        .await;
    assert!(
        matches!(again, Err(StorageError::Conflict(Conflict::UserAlreadyLinked))),
        "{again:?}"
    );
    let taken = storage
        .link_user(bob, &clerk("user_a"), &audit("user.link", Some(bob)))
        .await;
    assert!(
        matches!(taken, Err(StorageError::Conflict(Conflict::ClerkUserTaken))),
        "{taken:?}"
    );
    let ghost = UserId::new_random();
    let missing = storage
        .link_user(ghost, &clerk("user_c"), &audit("user.link", Some(ghost)))
        .await;
    assert!(matches!(missing, Err(StorageError::NotFound(_))), "{missing:?}");

    // Only the first link wrote anything.
    assert_eq!(audit_count(storage.as_ref(), "user.link").await, 1);
    assert!(
        storage
            .find_user(&UserKey::Id(bob))
            .await
            .unwrap()
            .unwrap()
            .clerk_user_id
            .is_none()
    );
    assert!(
        storage
            .find_mapping(&MappingKey::ClerkUserId(clerk("user_b")))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        storage
            .find_mapping(&MappingKey::ClerkUserId(clerk("user_c")))
            .await
            .unwrap()
            .is_none()
    );
}

async fn concurrent_links_of_one_clerk_user_admit_exactly_one(db: TestDb) {
    let storage = db.storage().await;
    let mut users = Vec::new();
    for n in 0..10 {
        users.push(insert(storage.as_ref(), &format!("u{n}@example.com"), None).await);
    }
    let mut tasks = Vec::new();
    for user in users {
        let storage: Arc<dyn Storage> = storage.clone();
        tasks.push(tokio::spawn(async move {
            storage
                .link_user(user, &clerk("user_shared"), &audit("user.link", Some(user)))
                .await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StorageError::Conflict(Conflict::ClerkUserTaken)) => {}
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(audit_count(storage.as_ref(), "user.link").await, 1);
}

async fn unlink_removes_both_and_is_audited(db: TestDb) {
    let storage = db.storage().await;
    let id = insert(storage.as_ref(), "ann@example.com", None).await;
    storage
        .link_user(id, &clerk("user_a"), &audit("user.link", Some(id)))
        .await
        .unwrap();
    let removed = storage.unlink_user(id, &audit("user.unlink", Some(id))).await.unwrap();
    assert_eq!(removed.clerk_user_id, clerk("user_a"));
    assert!(storage.find_mapping(&MappingKey::UserId(id)).await.unwrap().is_none());
    assert!(
        storage
            .find_user(&UserKey::Id(id))
            .await
            .unwrap()
            .unwrap()
            .clerk_user_id
            .is_none()
    );
    assert_eq!(audit_count(storage.as_ref(), "user.unlink").await, 1);

    let again = storage.unlink_user(id, &audit("user.unlink", Some(id))).await;
    assert!(matches!(again, Err(StorageError::NotFound(_))), "{again:?}");
    assert_eq!(audit_count(storage.as_ref(), "user.unlink").await, 1);
    // The Clerk id is free again.
    storage
        .link_user(id, &clerk("user_a"), &audit("user.link", Some(id)))
        .await
        .unwrap();
}

async fn settings_return_the_previous_value(db: TestDb) {
    let storage = db.storage().await;
    assert!(storage.get_setting("auth_mode").await.unwrap().is_none());
    assert!(
        storage
            .put_setting("auth_mode", "clerk_only", &audit("auth_mode.set", None))
            .await
            .unwrap()
            .is_none()
    );
    let previous = storage
        .put_setting("auth_mode", "dual", &audit("auth_mode.set", None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(previous.value, "clerk_only");
    assert_eq!(previous.updated_by, "suite");
    let current = storage.get_setting("auth_mode").await.unwrap().unwrap();
    assert_eq!(current.value, "dual");
    assert!(current.updated_at <= Utc::now() + ChronoDuration::seconds(1));
    assert_eq!(audit_count(storage.as_ref(), "auth_mode.set").await, 2);
}

async fn audit_filters_and_pages_newest_first(db: TestDb) {
    let storage = db.storage().await;
    let ann = UserId::new_random();
    let start = Utc::now() - ChronoDuration::seconds(1);
    for n in 0..5 {
        storage
            .append_audit(&audit(if n % 2 == 0 { "a.even" } else { "a.odd" }, Some(ann)))
            .await
            .unwrap();
    }
    storage
        .append_audit(&NewAuditEvent {
            outcome: AuditOutcome::Failure,
            ..audit("a.other", None)
        })
        .await
        .unwrap();

    let all = storage
        .list_audit(&AuditQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 6);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert_eq!(all[0].outcome, AuditOutcome::Failure);
    assert_eq!(all[0].user_id, None);
    assert_eq!(all[0].caller, "suite");

    let for_ann = storage
        .list_audit(&AuditQuery {
            user_id: Some(ann),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(for_ann.len(), 5);
    let even = storage
        .list_audit(&AuditQuery {
            action: Some("a.even".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(even.len(), 3);
    let page = storage
        .list_audit(&AuditQuery {
            before_id: Some(all[1].id),
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![all[2].id, all[3].id]
    );
    let in_range = storage
        .list_audit(&AuditQuery {
            since: Some(start),
            until: Some(Utc::now() + ChronoDuration::seconds(5)),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(in_range.len(), 6);
    let future = storage
        .list_audit(&AuditQuery {
            since: Some(Utc::now() + ChronoDuration::hours(1)),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(future.is_empty());
    let past = storage
        .list_audit(&AuditQuery {
            until: Some(start),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(past.is_empty());
}

async fn provisioning_creates_one_clerk_native_user(db: TestDb) {
    let storage = db.storage().await;
    let taken = insert(storage.as_ref(), "ann@example.com", None).await;
    let email = Email::parse("e", "ANN@example.com").unwrap();
    let user = storage
        .provision_clerk_user(&clerk("user_new"), Some(&email), &audit("user.provision", None))
        .await
        .unwrap();
    assert!(user.clerk_native);
    assert_eq!(user.clerk_user_id.as_deref(), Some("user_new"));
    assert_eq!(user.email, None, "an email another user has is not copied");
    assert_ne!(user.id, taken);
    let stored = storage
        .find_user(&UserKey::ClerkUserId(clerk("user_new")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored, user);
    assert_eq!(
        storage
            .find_mapping(&MappingKey::ClerkUserId(clerk("user_new")))
            .await
            .unwrap()
            .unwrap()
            .user_id,
        user.id
    );
    let again = storage
        .provision_clerk_user(&clerk("user_new"), None, &audit("user.provision", None))
        .await;
    assert!(
        matches!(again, Err(StorageError::Conflict(Conflict::ClerkUserTaken))),
        "{again:?}"
    );
    let free = Email::parse("e", "zed@example.com").unwrap();
    let zed = storage
        .provision_clerk_user(&clerk("user_zed"), Some(&free), &audit("user.provision", None))
        .await
        .unwrap();
    assert_eq!(zed.email.as_deref(), Some("zed@example.com"));
    let events = storage
        .list_audit(&AuditQuery {
            action: Some("user.provision".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].user_id, Some(zed.id), "the audit event names the new user");

    // Concurrent first sightings: exactly one user.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let storage: Arc<dyn Storage> = storage.clone();
        tasks.push(tokio::spawn(async move {
            storage
                .provision_clerk_user(&clerk("user_race"), None, &audit("user.provision", None))
                .await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StorageError::Conflict(Conflict::ClerkUserTaken)) => {}
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(ok, 1);
}

async fn revocations_are_idempotent_listed_and_purged(db: TestDb) {
    use identity::storage::NewRevocation;
    let storage = db.storage().await;
    let soon = Utc::now() + ChronoDuration::hours(1);
    let by_jti = NewRevocation {
        jti: Some("j1".into()),
        token_hash: None,
        user_id: Some(UserId::new_random()),
        expires_at: soon,
    };
    let by_hash = NewRevocation {
        jti: None,
        token_hash: Some("ab".repeat(32)),
        user_id: None,
        expires_at: soon,
    };
    let expired = NewRevocation {
        jti: Some("old".into()),
        token_hash: None,
        user_id: None,
        expires_at: Utc::now() - ChronoDuration::minutes(1),
    };
    for revocation in [&by_jti, &by_hash, &by_jti, &expired] {
        storage
            .revoke_token(revocation, &audit("token.revoke", None))
            .await
            .unwrap();
    }
    let active = storage.active_revocations(Utc::now()).await.unwrap();
    assert_eq!(active.len(), 2);
    assert!(active.iter().any(|r| r.jti.as_deref() == Some("j1")));
    assert!(
        active
            .iter()
            .any(|r| r.token_hash.as_deref() == Some("ab".repeat(32).as_str()))
    );
    assert_eq!(storage.purge_revocations(Utc::now()).await.unwrap(), 1);
    assert_eq!(storage.purge_revocations(Utc::now()).await.unwrap(), 0);
    assert_eq!(storage.active_revocations(Utc::now()).await.unwrap().len(), 2);
    assert_eq!(audit_count(storage.as_ref(), "token.revoke").await, 4);
}

async fn user_counts_stay_exact_through_every_change(db: TestDb) {
    use identity::storage::UserCounts;
    let storage = db.storage().await;
    let counts = || async { storage.user_counts().await.unwrap() };
    assert_eq!(counts().await, UserCounts::default());
    let ann = insert(storage.as_ref(), "ann@example.com", None).await;
    insert(storage.as_ref(), "bob@example.com", None).await;
    assert_eq!(
        counts().await,
        UserCounts {
            legacy_only: 2,
            migrated: 0,
            clerk_native: 0
        }
    );
    storage
        .link_user(ann, &clerk("user_ann"), &audit("user.link", Some(ann)))
        .await
        .unwrap();
    assert_eq!(
        counts().await,
        UserCounts {
            legacy_only: 1,
            migrated: 1,
            clerk_native: 0
        }
    );
    storage
        .provision_clerk_user(&clerk("user_new"), None, &audit("user.provision", None))
        .await
        .unwrap();
    assert_eq!(
        counts().await,
        UserCounts {
            legacy_only: 1,
            migrated: 1,
            clerk_native: 1
        }
    );
    storage
        .unlink_user(ann, &audit("user.unlink", Some(ann)))
        .await
        .unwrap();
    assert_eq!(
        counts().await,
        UserCounts {
            legacy_only: 2,
            migrated: 0,
            clerk_native: 1
        }
    );
    // Linking a legacy user to a provisioned Clerk user merges the two:
    // the provisional user no longer counts.
    let merged = storage
        .link_user(ann, &clerk("user_new"), &audit("user.link", Some(ann)))
        .await
        .unwrap();
    assert!(merged.merged_from.is_some());
    assert_eq!(
        counts().await,
        UserCounts {
            legacy_only: 1,
            migrated: 1,
            clerk_native: 0
        }
    );
}

async fn auth_figures_add_up_across_flushes(db: TestDb) {
    use identity::storage::AuthFlush;
    let storage = db.storage().await;
    let ann = insert(storage.as_ref(), "ann@example.com", None).await;
    let bucket = Utc::now().timestamp() / 60 * 60;
    let day = Utc::now().timestamp() / 86_400;
    let flush = AuthFlush {
        counts: vec![
            (bucket, "legacy_jwt".into(), "success".into(), 3),
            (bucket - 7200, "clerk".into(), "expired".into(), 2),
        ],
        latency: vec![(bucket, 2, 3), (bucket - 7200, 5, 2)],
        activity: vec![(ann, day, 3, 0, 0)],
    };
    storage.flush_auth_stats(&flush).await.unwrap();
    storage.flush_auth_stats(&flush).await.unwrap();
    let recent = storage.auth_totals(Some(bucket - 3600)).await.unwrap();
    assert_eq!(recent.counts, vec![("legacy_jwt".to_owned(), "success".to_owned(), 6)]);
    assert_eq!(recent.latency, vec![(2, 6)]);
    let all = storage.auth_totals(None).await.unwrap();
    assert_eq!(all.counts.iter().map(|c| c.2).sum::<i64>(), 10);
    let readiness = storage.readiness(day).await.unwrap();
    assert_eq!((readiness.active_users, readiness.legacy_only_unlinked), (1, 1));
    storage
        .link_user(ann, &clerk("user_ann"), &audit("user.link", Some(ann)))
        .await
        .unwrap();
    assert_eq!(
        storage.readiness(day).await.unwrap().legacy_only_unlinked,
        0,
        "ann can use Clerk now"
    );
    assert_eq!(storage.readiness(day + 1).await.unwrap().active_users, 0);
}

/// A running bulk job leased to `owner` until `lease_until`.
async fn bulk_job(storage: &dyn Storage, owner: &str, lease_until: chrono::DateTime<Utc>) -> uuid::Uuid {
    let job = BulkJobRecord {
        id: uuid::Uuid::new_v4(),
        state: BulkJobState::Running,
        params: "{}".into(),
        cursor: None,
        total: 10,
        counters: BulkCounters::default(),
        started_by: "suite".into(),
        cancel_requested: false,
        lease_owner: Some(owner.into()),
        lease_until: None,
        started_at: Utc::now(),
    };
    storage
        .create_bulk_job(&job, lease_until, &audit("bulk.start", None))
        .await
        .unwrap();
    job.id
}

async fn a_bulk_job_is_claimed_by_one_runner_at_a_time(db: TestDb) {
    let storage = db.storage().await;
    let now = Utc::now();
    let lease = now + ChronoDuration::seconds(30);
    let id = bulk_job(storage.as_ref(), "runner-a", lease).await;
    // While the lease holds, nobody claims the job: not even its own owner again.
    assert!(!storage.claim_bulk_job(id, "runner-a", now, lease).await.unwrap());
    assert!(!storage.claim_bulk_job(id, "runner-b", now, lease).await.unwrap());
    // Once it lapses, one claim wins.
    let later = now + ChronoDuration::seconds(31);
    let relet = later + ChronoDuration::seconds(30);
    assert!(storage.claim_bulk_job(id, "runner-b", later, relet).await.unwrap());
    assert!(!storage.claim_bulk_job(id, "runner-c", later, relet).await.unwrap());
    let job = storage.get_bulk_job(id).await.unwrap().unwrap();
    assert_eq!(job.lease_owner.as_deref(), Some("runner-b"));
    assert_eq!(job.state, BulkJobState::Running);
    // The old owner's progress no longer lands.
    let lost = storage
        .save_bulk_progress(id, "runner-a", None, &BulkCounters::default(), relet)
        .await
        .unwrap();
    assert!(!lost.held);
}

async fn cancelling_a_bulk_job_without_a_live_runner_ends_it(db: TestDb) {
    let storage = db.storage().await;
    let now = Utc::now();
    let lease = now + ChronoDuration::seconds(30);
    let id = bulk_job(storage.as_ref(), "runner-a", lease).await;
    // A live runner is asked to stop; the job runs until it does.
    let asked = storage
        .request_bulk_cancel(id, now, &audit("bulk.cancel", None))
        .await
        .unwrap();
    assert_eq!((asked.state, asked.cancel_requested), (BulkJobState::Running, true));
    // The runner died before it saw the request: whoever takes the job over still sees it.
    let later = now + ChronoDuration::seconds(31);
    assert!(
        storage
            .claim_bulk_job(id, "runner-b", later, later + ChronoDuration::seconds(30))
            .await
            .unwrap()
    );
    assert!(storage.get_bulk_job(id).await.unwrap().unwrap().cancel_requested);

    // With no live runner, cancelling ends the job, and another one can start.
    let expired = later + ChronoDuration::seconds(31);
    let ended = storage
        .request_bulk_cancel(id, expired, &audit("bulk.cancel", None))
        .await
        .unwrap();
    assert_eq!(ended.state, BulkJobState::Cancelled);
    assert_eq!(ended.lease_owner, None);
    assert!(storage.running_bulk_job().await.unwrap().is_none());
    assert!(matches!(
        storage
            .request_bulk_cancel(id, expired, &audit("bulk.cancel", None))
            .await,
        Err(StorageError::NotFound(_))
    ));
    let next = bulk_job(storage.as_ref(), "runner-c", Utc::now() + ChronoDuration::seconds(30)).await;
    assert_eq!(storage.running_bulk_job().await.unwrap().unwrap().id, next);
}

async fn only_the_lease_owner_writes_to_a_bulk_job(db: TestDb) {
    let storage = db.storage().await;
    let now = Utc::now();
    let id = bulk_job(storage.as_ref(), "runner-a", now + ChronoDuration::seconds(30)).await;
    let user = insert(storage.as_ref(), "failing@example.com", None).await;
    let done = BulkCounters {
        processed: 10,
        created: 10,
        ..BulkCounters::default()
    };
    // The lease is renewed whatever the progress, and tells of a cancellation.
    let renewed = storage
        .renew_bulk_lease(id, "runner-a", now + ChronoDuration::seconds(60))
        .await
        .unwrap();
    assert!(renewed.held && !renewed.cancel_requested);
    let job = storage.get_bulk_job(id).await.unwrap().unwrap();
    assert!(job.lease_until.unwrap() > now + ChronoDuration::seconds(59));

    // Another runner took the job over (runner-a's lease lapsed meanwhile).
    let later = now + ChronoDuration::seconds(61);
    assert!(
        storage
            .claim_bulk_job(id, "runner-b", later, later + ChronoDuration::seconds(30))
            .await
            .unwrap()
    );
    // The stale runner's writes all miss.
    assert!(
        !storage
            .renew_bulk_lease(id, "runner-a", later + ChronoDuration::seconds(90))
            .await
            .unwrap()
            .held
    );
    assert!(
        !storage
            .record_bulk_failure(id, "runner-a", user, "stale")
            .await
            .unwrap()
    );
    assert!(
        !storage
            .finish_bulk_job(
                id,
                "runner-a",
                BulkJobState::Completed,
                &done,
                &audit("bulk.finish", None)
            )
            .await
            .unwrap()
    );
    let job = storage.get_bulk_job(id).await.unwrap().unwrap();
    assert_eq!(job.state, BulkJobState::Running);
    assert_eq!(job.lease_owner.as_deref(), Some("runner-b"));
    assert_eq!(job.counters, BulkCounters::default());
    assert!(storage.bulk_failures(id).await.unwrap().is_empty());
    assert_eq!(audit_count(storage.as_ref(), "bulk.finish").await, 0);

    // The live runner's land.
    assert!(
        storage
            .record_bulk_failure(id, "runner-b", user, "no email")
            .await
            .unwrap()
    );
    assert!(
        storage
            .finish_bulk_job(
                id,
                "runner-b",
                BulkJobState::Completed,
                &done,
                &audit("bulk.finish", None)
            )
            .await
            .unwrap()
    );
    let job = storage.get_bulk_job(id).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.counters, job.lease_owner),
        (BulkJobState::Completed, done, None)
    );
    assert_eq!(
        storage.bulk_failures(id).await.unwrap(),
        vec![(user, "no email".to_owned())]
    );
    assert_eq!(audit_count(storage.as_ref(), "bulk.finish").await, 1);
    // A finished job takes no more writes, not even from its last owner.
    assert!(
        !storage
            .finish_bulk_job(id, "runner-b", BulkJobState::Failed, &done, &audit("bulk.finish", None))
            .await
            .unwrap()
    );
}

async fn invite(storage: &dyn Storage, user: UserId, hash: &str, expires_at: chrono::DateTime<Utc>) {
    storage
        .create_invitation(
            &NewInvitation {
                user_id: user,
                token_hash: hash.into(),
                expires_at,
                email: NewOutboxMessage {
                    kind: "migration_invite".into(),
                    user_id: Some(user),
                    recipient: "someone@example.com".into(),
                    subject: "s".into(),
                    body_text: "t".into(),
                    body_html: "h".into(),
                },
                email_supplied_by: None,
            },
            &audit("invitation.create", Some(user)),
        )
        .await
        .unwrap();
}

/// The outbox and invitation figures (read from running totals and partial
/// indexes, not full scans) stay exact through every change.
async fn outbox_and_invitation_counts_stay_exact(db: TestDb) {
    let storage = db.storage().await;
    let now = Utc::now();
    let counts = |pending, sent, failed| OutboxCounts { pending, sent, failed };
    assert_eq!(storage.outbox_counts().await.unwrap(), OutboxCounts::default());
    assert_eq!(
        storage.invitation_counts(now).await.unwrap(),
        InvitationCounts::default()
    );

    let ann = insert(storage.as_ref(), "ann@example.com", None).await;
    let bob = insert(storage.as_ref(), "bob@example.com", None).await;
    let cat = insert(storage.as_ref(), "cat@example.com", None).await;
    let day = ChronoDuration::days(1);
    invite(storage.as_ref(), ann, "hash-ann-1", now + day).await;
    // Supersedes ann's first invitation.
    invite(storage.as_ref(), ann, "hash-ann-2", now + day).await;
    invite(storage.as_ref(), bob, "hash-bob", now + day).await;
    invite(storage.as_ref(), cat, "hash-cat", now + ChronoDuration::hours(1)).await;
    assert_eq!(storage.outbox_counts().await.unwrap(), counts(4, 0, 0));
    assert_eq!(
        storage.invitation_counts(now).await.unwrap(),
        InvitationCounts {
            sent: 0,
            pending: 3,
            redeemed: 0,
            expired: 0,
        }
    );

    // Two sent, one given up, one retried later.
    let due = Utc::now() + ChronoDuration::seconds(1);
    let claimed = storage
        .claim_outbox("worker", due, due + ChronoDuration::minutes(1), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
    storage.outbox_sent(claimed[0].id, "worker").await.unwrap();
    storage.outbox_sent(claimed[1].id, "worker").await.unwrap();
    // Marking it sent again changes nothing.
    storage.outbox_sent(claimed[1].id, "worker").await.unwrap();
    storage
        .outbox_failed(claimed[2].id, "worker", "bounced", None)
        .await
        .unwrap();
    storage
        .outbox_failed(claimed[3].id, "worker", "busy", Some(now + day))
        .await
        .unwrap();
    assert_eq!(storage.outbox_counts().await.unwrap(), counts(1, 2, 1));

    // Bob redeems; cat's invitation expires.
    storage
        .redeem_invitation(
            "hash-bob",
            &clerk("user_bob"),
            now,
            &audit("invitation.redeem", Some(bob)),
        )
        .await
        .unwrap();
    let later = now + ChronoDuration::hours(2);
    assert_eq!(
        storage.invitation_counts(later).await.unwrap(),
        InvitationCounts {
            sent: 2,
            pending: 1,
            redeemed: 1,
            expired: 1,
        }
    );
}

async fn revoking_again_keeps_the_later_expiry(db: TestDb) {
    use identity::storage::NewRevocation;
    let storage = db.storage().await;
    let now = Utc::now();
    let revoke = |jti: Option<&str>, hash: Option<&str>, expires_at| NewRevocation {
        jti: jti.map(str::to_owned),
        token_hash: hash.map(str::to_owned),
        user_id: None,
        expires_at,
    };
    let hash = "cd".repeat(32);
    let later = now + ChronoDuration::hours(5);
    // Revoked until an hour from now, then again until later: later holds;
    // an earlier third revocation neither shortens it nor revives anything.
    for expires_at in [now + ChronoDuration::hours(1), later, now + ChronoDuration::minutes(10)] {
        for revocation in [
            revoke(Some("j-again"), None, expires_at),
            revoke(None, Some(&hash), expires_at),
        ] {
            storage
                .revoke_token(&revocation, &audit("token.revoke", None))
                .await
                .unwrap();
        }
    }
    // Past the first expiry, both are still revoked, until the later one.
    let then = now + ChronoDuration::hours(2);
    let active = storage.active_revocations(then).await.unwrap();
    let by_jti = active
        .iter()
        .find(|r| r.jti.as_deref() == Some("j-again"))
        .expect("jti still revoked");
    let by_hash = active
        .iter()
        .find(|r| r.token_hash.as_deref() == Some(hash.as_str()))
        .expect("digest still revoked");
    for record in [by_jti, by_hash] {
        assert!(
            (record.expires_at - later).num_seconds().abs() <= 1,
            "{record:?} should expire at {later}"
        );
    }
    // An expired revocation revoked again comes back to life.
    storage
        .revoke_token(
            &revoke(Some("j-old"), None, now - ChronoDuration::minutes(1)),
            &audit("token.revoke", None),
        )
        .await
        .unwrap();
    storage
        .revoke_token(&revoke(Some("j-old"), None, later), &audit("token.revoke", None))
        .await
        .unwrap();
    assert!(
        storage
            .active_revocations(now)
            .await
            .unwrap()
            .iter()
            .any(|r| r.jti.as_deref() == Some("j-old"))
    );
}

crate::backend_tests!(
    outbox_and_invitation_counts_stay_exact,
    a_bulk_job_is_claimed_by_one_runner_at_a_time,
    only_the_lease_owner_writes_to_a_bulk_job,
    cancelling_a_bulk_job_without_a_live_runner_ends_it,
    user_counts_stay_exact_through_every_change,
    auth_figures_add_up_across_flushes,
    provisioning_creates_one_clerk_native_user,
    revocations_are_idempotent_listed_and_purged,
    revoking_again_keeps_the_later_expiry,
    ping_answers,
    users_are_found_by_id_clerk_id_and_email,
    duplicate_users_conflict,
    link_writes_mapping_user_and_audit_together,
    link_conflicts_and_missing_users_change_nothing,
    concurrent_links_of_one_clerk_user_admit_exactly_one,
    unlink_removes_both_and_is_audited,
    settings_return_the_previous_value,
    audit_filters_and_pages_newest_first,
);
