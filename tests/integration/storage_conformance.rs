//! The storage conformance suite: every operation of the `Storage` trait,
//! run against SQLite and PostgreSQL alike.

use std::sync::Arc;

use chrono::{Duration as ChronoDuration, Utc};
use identity::{
    domain::{AuditOutcome, ClerkUserId, Email, UserId},
    storage::{
        AuditQuery, BulkCounters, BulkJobRecord, BulkJobState, Conflict, InvitationCounts, MappingKey, NewAuditEvent,
        NewInvitation, NewLegacyUser, NewOutboxMessage, OutboxCounts, Storage, StorageError, UserKey, UserKeys,
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

async fn revocations_are_read_incrementally_by_change_time(db: TestDb) {
    use identity::{storage::NewRevocation, verification::RevocationList};
    let storage = db.storage().await;
    let revoke = |jti: &str, expires_at| {
        let storage = storage.clone();
        let revocation = NewRevocation {
            jti: Some(jti.into()),
            token_hash: None,
            user_id: None,
            expires_at,
        };
        async move {
            storage
                .revoke_token(&revocation, &audit("token.revoke", None))
                .await
                .unwrap()
        }
    };
    let hour = Utc::now() + ChronoDuration::hours(1);
    let two_hours = Utc::now() + ChronoDuration::hours(2);
    for n in 0..20 {
        revoke(&format!("old{n}"), hour).await;
    }
    revoke("gone", Utc::now() - ChronoDuration::minutes(1)).await;
    let all = storage.revocations_changed_since(None, Utc::now()).await.unwrap();
    assert_eq!(all.records.len(), 20, "every unexpired revocation");
    let quiet = storage
        .revocations_changed_since(Some(all.as_of), Utc::now())
        .await
        .unwrap();
    assert!(quiet.records.is_empty(), "{:?}", quiet.records);
    assert!(quiet.as_of >= all.as_of);

    // A new revocation and a re-revocation with a later expiry are read;
    // the 19 untouched ones are not.
    revoke("new", hour).await;
    revoke("old0", two_hours).await;
    revoke("old1", Utc::now() + ChronoDuration::minutes(5)).await;
    let changed = storage
        .revocations_changed_since(Some(quiet.as_of), Utc::now())
        .await
        .unwrap();
    let mut seen: Vec<_> = changed
        .records
        .iter()
        .map(|r| (r.jti.clone().unwrap(), r.expires_at.timestamp()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("new".to_owned(), hour.timestamp()),
            ("old0".to_owned(), two_hours.timestamp()),
            ("old1".to_owned(), hour.timestamp()),
        ],
        "re-revoking keeps the later expiry"
    );

    // The in-memory list: a full read at start, then only what changed
    // (with no overlap, so that rows written a moment ago count as old).
    let list = RevocationList::with_overlap(storage.clone(), std::time::Duration::ZERO);
    let start = list.full_reload().await.unwrap();
    assert_eq!((start.read, start.full, start.held), (21, true, 21));
    revoke("later", hour).await;
    let tick = list.reload().await.unwrap();
    assert!(!tick.full);
    assert_eq!(tick.read, 1, "a tick reads what changed, not all: {tick:?}");
    assert_eq!(tick.held, 22);
    let digest = [0u8; 32];
    for jti in ["later", "new", "old5"] {
        assert!(list.is_revoked(Some(jti), &digest), "{jti}");
    }
    assert!(!list.is_revoked(Some("gone"), &digest));
    assert!(!list.is_revoked(Some("never"), &digest));
    // Pruning by expiry keeps the entry a re-revocation extended.
    assert_eq!(list.prune(Utc::now() + ChronoDuration::minutes(90)), 21);
    assert!(list.is_revoked(Some("old0"), &digest));
    assert!(!list.is_revoked(Some("old5"), &digest));
    assert_eq!(list.len(), 1);
}

/// Many keys in one statement find what one key at a time finds, in the
/// service's directory and in the application's table.
async fn users_are_found_many_at_a_time(db: TestDb) {
    with_app_users(&db).await;
    let storage = db.storage().await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(insert(storage.as_ref(), &format!("dir{n}@example.com"), Some("$2b$10$x")).await);
        ids.push(app_user(&db, &format!("app{n}@example.com")).await);
    }
    let mut clerk_ids = Vec::new();
    for (n, id) in ids.iter().enumerate().filter(|(n, _)| n % 3 != 0) {
        let clerk_id = clerk(&format!("user_batch{n}"));
        storage
            .link_user(*id, &clerk_id, &audit("user.link", Some(*id)))
            .await
            .unwrap();
        clerk_ids.push((clerk_id, *id));
    }
    let one_at_a_time = |key: UserKey| {
        let storage = storage.clone();
        async move { storage.find_user(&key).await.unwrap().unwrap() }
    };

    let mut asked = ids.clone();
    asked.push(UserId::new_random());
    asked.push(ids[0]);
    let mut found = storage.find_users(&UserKeys::Ids(asked)).await.unwrap();
    found.sort_by_key(|u| u.id);
    let mut expected = Vec::new();
    for id in &ids {
        expected.push(one_at_a_time(UserKey::Id(*id)).await);
    }
    expected.sort_by_key(|u| u.id);
    assert_eq!(found, expected, "each known id once, unknown ids left out");

    let mut asked: Vec<ClerkUserId> = clerk_ids.iter().map(|(c, _)| c.clone()).collect();
    asked.push(clerk("user_nobody"));
    let found = storage.find_users(&UserKeys::ClerkUserIds(asked)).await.unwrap();
    assert_eq!(found.len(), clerk_ids.len());
    for (clerk_id, id) in &clerk_ids {
        let user = found
            .iter()
            .find(|u| u.clerk_user_id.as_deref() == Some(clerk_id.as_str()))
            .unwrap_or_else(|| panic!("{clerk_id} not found"));
        assert_eq!(user.id, *id);
        assert_eq!(*user, one_at_a_time(UserKey::ClerkUserId(clerk_id.clone())).await);
    }
    assert!(storage.find_users(&UserKeys::Ids(Vec::new())).await.unwrap().is_empty());
    assert!(
        storage
            .find_users(&UserKeys::ClerkUserIds(Vec::new()))
            .await
            .unwrap()
            .is_empty()
    );
}

/// Concurrent misses of the user cache are loaded in batches; every caller
/// gets its own user, whatever batch it joined.
async fn concurrent_cache_misses_each_get_their_own_user(db: TestDb) {
    with_app_users(&db).await;
    let storage = db.storage().await;
    let cache = identity::domain::UserCache::new(storage.clone(), std::time::Duration::from_secs(60));
    let mut users = Vec::new();
    for n in 0..40 {
        let id = if n % 2 == 0 {
            insert(storage.as_ref(), &format!("c{n}@example.com"), None).await
        } else {
            app_user(&db, &format!("c{n}@example.com")).await
        };
        let clerk_id = clerk(&format!("user_cache{n}"));
        storage
            .link_user(id, &clerk_id, &audit("user.link", Some(id)))
            .await
            .unwrap();
        users.push((id, clerk_id));
    }
    let lookups = users.iter().flat_map(|(id, clerk_id)| {
        let (cache_a, cache_b) = (cache.clone(), cache.clone());
        let (id, clerk_id) = (*id, clerk_id.clone());
        [
            tokio::spawn(async move { (id, cache_a.by_id(id).await.unwrap().map(|u| u.id)) }),
            tokio::spawn(async move { (id, cache_b.by_clerk(&clerk_id).await.unwrap().map(|u| u.id)) }),
        ]
    });
    let unknown = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.by_clerk(&clerk("user_unknown")).await.unwrap().is_none() })
    };
    for lookup in lookups.collect::<Vec<_>>() {
        let (asked, got) = lookup.await.unwrap();
        assert_eq!(got, Some(asked));
    }
    assert!(unknown.await.unwrap());
}

/// The seed application's `users` table, whatever the layout the suite runs.
async fn with_app_users(db: &TestDb) {
    use crate::common::{Backend, Layout, SEED_POSTGRES, SEED_SQLITE, exec};
    if db.layout == Layout::Empty {
        let seed = match db.backend {
            Backend::Sqlite => SEED_SQLITE,
            Backend::Postgres => SEED_POSTGRES,
        };
        exec(db, seed).await;
    }
}

/// A user of the application's own table, written as the application writes it.
async fn app_user(db: &TestDb, email: &str) -> UserId {
    let id = UserId::new_random();
    crate::common::exec(
        db,
        &format!("INSERT INTO users (id, email, password_hash) VALUES ('{id}', '{email}', '$2b$10$x')"),
    )
    .await;
    id
}

async fn emails_fold_the_same_on_both_backends(db: TestDb) {
    with_app_users(&db).await;
    let storage = db.storage().await;
    let asa = app_user(&db, "ÅSA@Example.com").await;
    let emile = insert(storage.as_ref(), "ÉMILE@Example.com", None).await;
    let kim = insert(storage.as_ref(), "kim@example.com", None).await;
    let find = |email: &'static str| {
        let storage = storage.clone();
        async move {
            storage
                .find_user(&UserKey::Email(Email::parse("e", email).unwrap()))
                .await
                .unwrap()
                .map(|u| u.id)
        }
    };
    // ASCII letters fold, in the application's table and in the service's directory...
    assert_eq!(find("Åsa@EXAMPLE.COM").await, Some(asa));
    assert_eq!(find("ÉMILE@example.COM").await, Some(emile));
    // ...and nothing else does: these are other addresses, on both backends.
    assert_eq!(find("åsa@example.com").await, None);
    assert_eq!(find("émile@example.com").await, None);
    assert_eq!(find("\u{212A}im@example.com").await, None, "the Kelvin sign is not a K");
    assert_eq!(find("kim@EXAMPLE.com").await, Some(kim));

    // Another address may be added, and is found as itself.
    let asa_lower = insert(storage.as_ref(), "åsa@example.com", None).await;
    assert_eq!(find("åsa@Example.COM").await, Some(asa_lower));
    assert_eq!(find("ÅSA@example.com").await, Some(asa));
    let taken = storage
        .insert_legacy_user(&NewLegacyUser {
            id: UserId::new_random(),
            email: Email::parse("e", "Åsa@example.com").unwrap(),
            password_hash: None,
        })
        .await;
    assert!(
        matches!(taken, Err(StorageError::Conflict(Conflict::UserExists))),
        "{taken:?}"
    );

    // Provisioning keeps an address nobody has, and leaves out one somebody has.
    let provision = |clerk_id: &'static str, email: &'static str| {
        let storage = storage.clone();
        async move {
            storage
                .provision_clerk_user(
                    &clerk(clerk_id),
                    Some(&Email::parse("e", email).unwrap()),
                    &audit("user.provision", None),
                )
                .await
                .unwrap()
                .email
        }
    };
    assert_eq!(
        provision("user_emile", "émile@example.com").await.as_deref(),
        Some("émile@example.com")
    );
    assert_eq!(provision("user_asa", "ÅSA@EXAMPLE.com").await, None);
    assert_eq!(provision("user_asa2", "åSA@example.COM").await, None);
    assert_eq!(
        provision("user_ola", "ÖLA@example.com").await.as_deref(),
        Some("ÖLA@example.com")
    );
    assert_eq!(
        provision("user_ola2", "öla@example.com").await.as_deref(),
        Some("öla@example.com")
    );
    assert_eq!(provision("user_ola3", "ÖLA@EXAMPLE.COM").await, None);
    assert_eq!(provision("user_kim", "KIM@example.com").await, None);
}

async fn an_email_several_users_share_finds_the_same_user(db: TestDb) {
    with_app_users(&db).await;
    let storage = db.storage().await;
    // The application's unique key is case-sensitive, so it may hold both.
    // Inserted larger id first, with one creation time: only the tie-break decides.
    let big = UserId::from_uuid(uuid::Uuid::from_u128(u128::MAX >> 1));
    let small = UserId::from_uuid(uuid::Uuid::from_u128(1));
    for (id, email) in [(big, "Dup@example.com"), (small, "dup@example.com")] {
        crate::common::exec(
            &db,
            &format!(
                "INSERT INTO users (id, email, password_hash, created_at, updated_at)
                 VALUES ('{id}', '{email}', 'x', '2024-01-02 03:04:05', '2024-01-02 03:04:05')"
            ),
        )
        .await;
    }
    let found = storage
        .find_user(&UserKey::Email(Email::parse("e", "DUP@example.com").unwrap()))
        .await
        .unwrap()
        .map(|u| u.id);
    assert_eq!(found, Some(small), "the smallest id breaks a tie, on both backends");
    // An older row wins over the tie-break.
    let older = UserId::from_uuid(uuid::Uuid::from_u128(u128::MAX >> 2));
    crate::common::exec(
        &db,
        &format!(
            "INSERT INTO users (id, email, password_hash, created_at, updated_at)
             VALUES ('{older}', 'DUP@example.com', 'x', '2023-01-02 03:04:05', '2023-01-02 03:04:05')"
        ),
    )
    .await;
    let found = storage
        .find_user(&UserKey::Email(Email::parse("e", "dup@EXAMPLE.com").unwrap()))
        .await
        .unwrap()
        .map(|u| u.id);
    assert_eq!(found, Some(older));
}

async fn mapping_conflicts_name_the_side_that_is_taken(db: TestDb) {
    use identity::storage::{NewInvitation, NewOutboxMessage};
    let storage = db.storage().await;
    let ann = insert(storage.as_ref(), "ann@example.com", None).await;
    let bob = insert(storage.as_ref(), "bob@example.com", None).await;
    let carl = insert(storage.as_ref(), "carl@example.com", None).await;

    // Ten Clerk users race for one legacy user: one wins, the others are told the user is linked.
    let mut tasks = Vec::new();
    for n in 0..10 {
        let storage: Arc<dyn Storage> = storage.clone();
        tasks.push(tokio::spawn(async move {
            storage
                .link_user(ann, &clerk(&format!("user_race{n}")), &audit("user.link", Some(ann)))
                .await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StorageError::Conflict(Conflict::UserAlreadyLinked)) => {}
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }
    assert_eq!(ok, 1);
    let ann_clerk = storage
        .find_mapping(&MappingKey::UserId(ann))
        .await
        .unwrap()
        .unwrap()
        .clerk_user_id;

    let taken = storage.link_user(bob, &ann_clerk, &audit("user.link", Some(bob))).await;
    assert!(
        matches!(taken, Err(StorageError::Conflict(Conflict::ClerkUserTaken))),
        "{taken:?}"
    );
    // Both sides taken: the user's own link is what is reported.
    let both = storage.link_user(ann, &ann_clerk, &audit("user.link", Some(ann))).await;
    assert!(
        matches!(both, Err(StorageError::Conflict(Conflict::UserAlreadyLinked))),
        "{both:?}"
    );
    // A provisioned user is linked to its Clerk user already.
    let provisioned = storage
        .provision_clerk_user(&clerk("user_p"), None, &audit("user.provision", None))
        .await
        .unwrap();
    let again = storage
        .link_user(provisioned.id, &clerk("user_q"), &audit("user.link", None))
        .await;
    assert!(
        matches!(again, Err(StorageError::Conflict(Conflict::UserAlreadyLinked))),
        "{again:?}"
    );
    let provision_taken = storage
        .provision_clerk_user(&ann_clerk, None, &audit("user.provision", None))
        .await;
    assert!(
        matches!(provision_taken, Err(StorageError::Conflict(Conflict::ClerkUserTaken))),
        "{provision_taken:?}"
    );

    // Redeeming an invitation reports the same conflicts.
    let invite = |user: UserId, hash: &str| NewInvitation {
        user_id: user,
        token_hash: hash.to_owned(),
        expires_at: Utc::now() + ChronoDuration::hours(1),
        email: NewOutboxMessage {
            kind: "invitation".into(),
            user_id: Some(user),
            recipient: "x@example.com".into(),
            subject: "s".into(),
            body_text: "t".into(),
            body_html: "h".into(),
        },
        email_supplied_by: None,
    };
    storage
        .create_invitation(&invite(bob, &"b".repeat(64)), &audit("invitation.create", Some(bob)))
        .await
        .unwrap();
    storage
        .create_invitation(&invite(carl, &"c".repeat(64)), &audit("invitation.create", Some(carl)))
        .await
        .unwrap();
    let clerk_taken = storage
        .redeem_invitation(
            &"b".repeat(64),
            &ann_clerk,
            Utc::now(),
            &audit("invitation.redeem", None),
        )
        .await;
    assert!(
        matches!(clerk_taken, Err(StorageError::Conflict(Conflict::ClerkUserTaken))),
        "{clerk_taken:?}"
    );
    storage
        .link_user(carl, &clerk("user_carl"), &audit("user.link", Some(carl)))
        .await
        .unwrap();
    let user_linked = storage
        .redeem_invitation(
            &"c".repeat(64),
            &clerk("user_c2"),
            Utc::now(),
            &audit("invitation.redeem", None),
        )
        .await;
    assert!(
        matches!(user_linked, Err(StorageError::Conflict(Conflict::UserAlreadyLinked))),
        "{user_linked:?}"
    );
    // Nothing that failed wrote a mapping.
    for id in ["user_q", "user_c2"] {
        assert!(
            storage
                .find_mapping(&MappingKey::ClerkUserId(clerk(id)))
                .await
                .unwrap()
                .is_none()
        );
    }
    assert!(storage.find_mapping(&MappingKey::UserId(bob)).await.unwrap().is_none());
}

async fn concurrent_first_sightings_sharing_an_email_are_clean(db: TestDb) {
    let storage = db.storage().await;
    let mut tasks = Vec::new();
    for n in 0..12 {
        let storage: Arc<dyn Storage> = storage.clone();
        tasks.push(tokio::spawn(async move {
            let email = Email::parse(
                "e",
                if n % 2 == 0 {
                    "Eve@Example.com"
                } else {
                    "eve@example.COM"
                },
            )
            .unwrap();
            storage
                .provision_clerk_user(
                    &clerk(&format!("user_eve{n}")),
                    Some(&email),
                    &audit("user.provision", None),
                )
                .await
        }));
    }
    let mut with_email = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(user) => with_email += usize::from(user.email.is_some()),
            Err(other) => panic!("provisioning with a shared email failed: {other:?}"),
        }
    }
    assert_eq!(
        with_email, 1,
        "one user holds the address; the others are created without it"
    );
    assert!(
        storage
            .find_user(&UserKey::Email(Email::parse("e", "EVE@example.com").unwrap()))
            .await
            .unwrap()
            .is_some()
    );
    // A legacy import of the same address meets a clean conflict.
    let import = storage
        .insert_legacy_user(&NewLegacyUser {
            id: UserId::new_random(),
            email: Email::parse("e", "eve@EXAMPLE.com").unwrap(),
            password_hash: None,
        })
        .await;
    assert!(
        matches!(import, Err(StorageError::Conflict(Conflict::UserExists))),
        "{import:?}"
    );
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

/// An application table with soft delete (LeafLock's layout, reduced):
/// `members(id, deleted_at)` holding `n` live users, and the service
/// mapped onto it. `None` when PostgreSQL is unreachable outside CI.
async fn members(backend: crate::common::Backend, n: usize) -> Option<(TestDb, Arc<dyn Storage>, Vec<UserId>)> {
    use identity::storage::{DatabaseOptions, UsersTableConfig};

    use crate::common::{Backend, exec};
    let db = TestDb::bare(backend).await?;
    exec(
        &db,
        match backend {
            Backend::Sqlite => "CREATE TABLE members (id TEXT PRIMARY KEY, deleted_at TEXT)",
            Backend::Postgres => "CREATE TABLE members (id UUID PRIMARY KEY, deleted_at TIMESTAMPTZ)",
        },
    )
    .await;
    let ids: Vec<UserId> = (0..n).map(|_| UserId::new_random()).collect();
    for id in &ids {
        exec(&db, &format!("INSERT INTO members (id) VALUES ('{id}')")).await;
    }
    let mut users = UsersTableConfig {
        table: identity::storage::Ident::parse("members", true).unwrap(),
        table_explicit: true,
        ..UsersTableConfig::default()
    };
    for (variable, value) in [
        ("IDENTITY_USERS_EMAIL_COLUMN", ""),
        ("IDENTITY_USERS_PASSWORD_HASH_COLUMN", ""),
        ("IDENTITY_USERS_CREATED_AT_COLUMN", ""),
        ("IDENTITY_USERS_DELETED_AT_COLUMN", "deleted_at"),
        ("IDENTITY_USERS_CLERK_ID_COLUMN", ""),
    ] {
        users.set_column(variable, value).unwrap();
    }
    let options = DatabaseOptions {
        users,
        ..DatabaseOptions::default()
    };
    let storage = identity::storage::connect(&db.url, &options, true).await.unwrap();
    Some((db, storage, ids))
}

/// The application soft-deletes a member.
async fn soft_delete_member(db: &TestDb, id: UserId) {
    use crate::common::{Backend, exec};
    let now = match db.backend {
        Backend::Sqlite => "datetime('now')",
        Backend::Postgres => "now()",
    };
    exec(db, &format!("UPDATE members SET deleted_at = {now} WHERE id = '{id}'")).await;
}

/// Counts over an application table with soft delete: a linked user the
/// application deletes, softly or not, is no longer a user, so it is not
/// counted as migrated either.
async fn deleted_application_users_are_not_counted(backend: crate::common::Backend) {
    use identity::storage::UserCounts;
    let Some((db, storage, ids)) = members(backend, 3).await else {
        return;
    };
    let counts = |legacy_only, migrated| UserCounts {
        legacy_only,
        migrated,
        clerk_native: 0,
    };
    for (n, id) in ids[..2].iter().enumerate() {
        storage
            .link_user(*id, &clerk(&format!("user_{n}")), &audit("user.link", Some(*id)))
            .await
            .unwrap();
    }
    assert_eq!(storage.user_counts().await.unwrap(), counts(1, 2));
    soft_delete_member(&db, ids[1]).await;
    assert_eq!(storage.user_counts().await.unwrap(), counts(1, 1), "soft-deleted");
    crate::common::exec(&db, &format!("DELETE FROM members WHERE id = '{}'", ids[0])).await;
    assert_eq!(storage.user_counts().await.unwrap(), counts(1, 0), "deleted");
}

#[tokio::test]
async fn deleted_application_users_are_not_counted_sqlite() {
    deleted_application_users_are_not_counted(crate::common::Backend::Sqlite).await;
}

#[tokio::test]
async fn deleted_application_users_are_not_counted_postgres() {
    deleted_application_users_are_not_counted(crate::common::Backend::Postgres).await;
}

/// Readiness over an application table with soft delete: activity outlives
/// the user, and a user the application deleted after signing in (softly or
/// not) is no longer active, nor would `clerk_only` lock it out.
async fn readiness_leaves_deleted_application_users_out(backend: crate::common::Backend) {
    use identity::storage::{AuthFlush, Readiness};
    let Some((db, storage, ids)) = members(backend, 4).await else {
        return;
    };
    let (ann, bob, cid, dan) = (ids[0], ids[1], ids[2], ids[3]);
    // ann, bob and cid signed in with legacy tokens only, unlinked; dan is
    // linked and used a legacy token after moving.
    storage
        .link_user(dan, &clerk("user_dan"), &audit("user.link", Some(dan)))
        .await
        .unwrap();
    let day = Utc::now().timestamp() / 86_400;
    let flush = AuthFlush {
        activity: vec![
            (ann, day, 2, 0, 0),
            (bob, day, 1, 0, 0),
            (cid, day, 1, 0, 0),
            (dan, day, 3, 1, 2),
        ],
        ..AuthFlush::default()
    };
    storage.flush_auth_stats(&flush).await.unwrap();
    let readiness = |active_users, legacy_only_unlinked, legacy_verifications_by_migrated| Readiness {
        active_users,
        legacy_only_unlinked,
        legacy_verifications_by_migrated,
    };
    assert_eq!(storage.readiness(day).await.unwrap(), readiness(4, 3, 2));
    soft_delete_member(&db, bob).await;
    assert_eq!(
        storage.readiness(day).await.unwrap(),
        readiness(3, 2, 2),
        "bob soft-deleted"
    );
    crate::common::exec(&db, &format!("DELETE FROM members WHERE id = '{cid}'")).await;
    assert_eq!(storage.readiness(day).await.unwrap(), readiness(2, 1, 2), "cid deleted");
    soft_delete_member(&db, dan).await;
    assert_eq!(
        storage.readiness(day).await.unwrap(),
        readiness(1, 1, 0),
        "dan soft-deleted, linked"
    );
}

#[tokio::test]
async fn readiness_leaves_deleted_application_users_out_sqlite() {
    readiness_leaves_deleted_application_users_out(crate::common::Backend::Sqlite).await;
}

#[tokio::test]
async fn readiness_leaves_deleted_application_users_out_postgres() {
    readiness_leaves_deleted_application_users_out(crate::common::Backend::Postgres).await;
}

/// Readiness counts the active users that are still users, whatever the
/// layout: the service's directory and the application's `users` table
/// (its rows deleted outright, the seed having no soft delete); an id that
/// names nobody (a user deleted from wherever it was) is left out.
async fn readiness_counts_only_users_that_still_exist(db: TestDb) {
    use identity::storage::{AuthFlush, Readiness};
    with_app_users(&db).await;
    let storage = db.storage().await;
    let ann = insert(storage.as_ref(), "ann@example.com", None).await;
    let bob = app_user(&db, "bob@example.com").await;
    let cid = app_user(&db, "cid@example.com").await;
    storage
        .link_user(cid, &clerk("user_cid"), &audit("user.link", Some(cid)))
        .await
        .unwrap();
    let ghost = UserId::new_random();
    let day = Utc::now().timestamp() / 86_400;
    let flush = AuthFlush {
        activity: vec![
            (ann, day, 2, 0, 0),
            (bob, day, 1, 0, 0),
            (cid, day, 1, 1, 1),
            (ghost, day, 4, 0, 0),
        ],
        ..AuthFlush::default()
    };
    storage.flush_auth_stats(&flush).await.unwrap();
    let readiness = |active_users, legacy_only_unlinked, legacy_verifications_by_migrated| Readiness {
        active_users,
        legacy_only_unlinked,
        legacy_verifications_by_migrated,
    };
    assert_eq!(
        storage.readiness(day).await.unwrap(),
        readiness(3, 2, 1),
        "ghost is nobody"
    );
    crate::common::exec(&db, &format!("DELETE FROM users WHERE id = '{bob}'")).await;
    assert_eq!(storage.readiness(day).await.unwrap(), readiness(2, 1, 1), "bob deleted");
    crate::common::exec(&db, &format!("DELETE FROM users WHERE id = '{cid}'")).await;
    assert_eq!(
        storage.readiness(day).await.unwrap(),
        readiness(1, 1, 0),
        "cid deleted, linked"
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
    // The dashboard's chart: per minute and method, successes apart.
    storage
        .flush_auth_stats(&AuthFlush {
            counts: vec![
                (bucket - 60, "legacy_jwt".into(), "expired".into(), 1),
                (bucket - 60, "legacy_jwt".into(), "success".into(), 4),
                (bucket, "clerk".into(), "success".into(), 2),
            ],
            ..AuthFlush::default()
        })
        .await
        .unwrap();
    let series = storage.auth_series(bucket - 3600).await.unwrap();
    let points: Vec<_> = series
        .iter()
        .map(|p| (p.bucket, p.method.as_str(), p.attempts, p.successes))
        .collect();
    assert_eq!(
        points,
        vec![
            (bucket - 60, "legacy_jwt", 5, 4),
            (bucket, "clerk", 2, 2),
            (bucket, "legacy_jwt", 6, 6),
        ],
        "oldest first, the two-hour-old minute left out"
    );
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

fn clerk_event(
    id: &str,
    event_type: &str,
    version: Option<i64>,
    change: identity::storage::ClerkChange,
) -> identity::storage::ClerkEvent {
    identity::storage::ClerkEvent {
        id: id.into(),
        event_type: event_type.into(),
        occurred_at: Some(Utc::now()),
        version,
        change,
        caller: "suite".into(),
    }
}

fn clerk_user_change(
    id: &str,
    external_id: Option<String>,
    email: Option<&str>,
    unmapped: identity::config::UnmappedPolicy,
) -> identity::storage::ClerkChange {
    identity::storage::ClerkChange::User {
        clerk_user_id: clerk(id),
        external_id,
        verified_email: email.map(|e| Email::parse("email", e).unwrap()),
        unmapped,
    }
}

async fn clerk_events_apply_once_in_order_with_their_audit(db: TestDb) {
    use identity::{
        config::UnmappedPolicy::{Provision, Reject},
        storage::{ClerkChange, ClerkEventOutcome as O},
    };
    let storage = db.storage().await;
    let ann = insert(storage.as_ref(), "ann@example.com", None).await;
    let bob = insert(storage.as_ref(), "bob@example.com", None).await;
    let apply = |event| {
        let storage = storage.clone();
        async move { storage.apply_clerk_event(&event).await.unwrap() }
    };
    // external_id names a known user: linked, audited with the event id.
    let created = clerk_event(
        "msg_1",
        "user.created",
        Some(100),
        clerk_user_change("user_a", Some(ann.to_string()), None, Reject),
    );
    let result = apply(created.clone()).await;
    assert_eq!(result.outcome, O::Applied, "{result:?}");
    assert_eq!(result.clerk_user_ids, vec!["user_a".to_owned()]);
    let mapped = storage
        .find_user(&UserKey::ClerkUserId(clerk("user_a")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mapped.id, ann);
    let events = storage
        .list_audit(&AuditQuery {
            action: Some("clerk.user.created".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert!(events[0].detail.contains("msg_1"), "{:?}", events[0]);
    // The same delivery again changes nothing.
    assert_eq!(apply(created).await.outcome, O::Duplicate);
    assert_eq!(audit_count(storage.as_ref(), "clerk.user.created").await, 1);

    // A newer email reaches the directory; an older event does not overwrite it.
    let newer = clerk_event(
        "msg_2",
        "user.updated",
        Some(300),
        clerk_user_change("user_a", Some(ann.to_string()), Some("ann.new@example.com"), Reject),
    );
    assert_eq!(apply(newer).await.outcome, O::Applied);
    let older = clerk_event(
        "msg_3",
        "user.updated",
        Some(200),
        clerk_user_change("user_a", Some(ann.to_string()), Some("ann.old@example.com"), Reject),
    );
    assert_eq!(apply(older).await.outcome, O::Stale);
    let ann_now = storage.find_user(&UserKey::Id(ann)).await.unwrap().unwrap();
    assert_eq!(ann_now.email.as_deref(), Some("ann.new@example.com"));

    // An external_id that would move the mapping is a recorded conflict.
    let moved = clerk_event(
        "msg_4",
        "user.updated",
        Some(400),
        clerk_user_change("user_a", Some(bob.to_string()), None, Reject),
    );
    assert_eq!(apply(moved).await.outcome, O::Conflict);
    let conflicts = storage
        .list_audit(&AuditQuery {
            action: Some("clerk.user.updated".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        conflicts
            .iter()
            .any(|e| e.outcome == AuditOutcome::Failure && e.detail.contains("msg_4"))
    );
    assert_eq!(
        storage
            .find_user(&UserKey::ClerkUserId(clerk("user_a")))
            .await
            .unwrap()
            .unwrap()
            .id,
        ann
    );

    // The unmapped policy: provision, or leave it.
    let provisioned = apply(clerk_event(
        "msg_5",
        "user.created",
        Some(1),
        clerk_user_change("user_new", None, Some("new@example.com"), Provision),
    ))
    .await;
    assert_eq!(provisioned.outcome, O::Applied);
    let native = storage
        .find_user(&UserKey::ClerkUserId(clerk("user_new")))
        .await
        .unwrap()
        .unwrap();
    assert!(native.clerk_native);
    assert_eq!(native.email.as_deref(), Some("new@example.com"));
    assert_eq!(
        apply(clerk_event(
            "msg_6",
            "user.created",
            Some(1),
            clerk_user_change("user_rej", Some("not-a-user".into()), None, Reject)
        ))
        .await
        .outcome,
        O::Unchanged
    );
    assert!(
        storage
            .find_user(&UserKey::ClerkUserId(clerk("user_rej")))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        apply(clerk_event("msg_7", "organization.created", None, ClerkChange::Ignored))
            .await
            .outcome,
        O::Ignored
    );

    // A deletion removes the mapping, refuses the Clerk user, and is final.
    let until = Utc::now() + ChronoDuration::hours(24);
    let deleted = apply(clerk_event(
        "msg_8",
        "user.deleted",
        Some(identity::storage::DELETED_VERSION),
        ClerkChange::UserDeleted {
            clerk_user_id: clerk("user_a"),
            refuse_until: until,
        },
    ))
    .await;
    assert_eq!(deleted.outcome, O::Applied);
    assert_eq!(deleted.users, vec![ann]);
    assert_eq!(
        deleted.revocation.as_ref().unwrap().clerk_user_id.as_deref(),
        Some("user_a")
    );
    assert!(storage.find_mapping(&MappingKey::UserId(ann)).await.unwrap().is_none());
    assert!(storage.user_was_unlinked(ann).await.unwrap());
    assert!(!storage.user_was_unlinked(bob).await.unwrap());
    let late = clerk_event(
        "msg_9",
        "user.updated",
        Some(500),
        clerk_user_change("user_a", Some(ann.to_string()), None, Reject),
    );
    assert_eq!(apply(late).await.outcome, O::Stale);
    assert!(storage.find_mapping(&MappingKey::UserId(ann)).await.unwrap().is_none());

    // An ended session is refused like a revoked token, read incrementally too.
    let ended = apply(clerk_event(
        "msg_10",
        "session.revoked",
        None,
        ClerkChange::SessionEnded {
            session_id: "sess_1".into(),
            refuse_until: until,
        },
    ))
    .await;
    assert_eq!(ended.outcome, O::Applied);
    let changes = storage.revocations_changed_since(None, Utc::now()).await.unwrap();
    assert!(
        changes
            .records
            .iter()
            .any(|r| r.session_id.as_deref() == Some("sess_1") && r.jti.is_none())
    );
    assert!(
        changes
            .records
            .iter()
            .any(|r| r.clerk_user_id.as_deref() == Some("user_a"))
    );
    assert_eq!(audit_count(storage.as_ref(), "clerk.session.revoked").await, 1);
}

async fn concurrent_deliveries_of_one_event_apply_once(db: TestDb) {
    use identity::storage::{ClerkChange, ClerkEventOutcome as O};
    let replicas = [db.storage().await, db.storage().await];
    let until = Utc::now() + ChronoDuration::hours(1);
    let event = clerk_event(
        "msg_once",
        "session.ended",
        None,
        ClerkChange::SessionEnded {
            session_id: "sess_once".into(),
            refuse_until: until,
        },
    );
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let storage = replicas[n % 2].clone();
            let event = event.clone();
            tokio::spawn(async move { storage.apply_clerk_event(&event).await.unwrap().outcome })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    assert_eq!(outcomes.iter().filter(|o| **o == O::Applied).count(), 1, "{outcomes:?}");
    assert_eq!(
        outcomes.iter().filter(|o| **o == O::Duplicate).count(),
        7,
        "{outcomes:?}"
    );
    assert_eq!(audit_count(replicas[0].as_ref(), "clerk.session.ended").await, 1);
}

async fn old_clerk_events_are_purged_but_each_objects_newest_version_stays(db: TestDb) {
    use identity::{
        config::UnmappedPolicy::Reject,
        storage::{ClerkChange, ClerkEventOutcome as O, DELETED_VERSION},
    };
    let storage = db.storage().await;
    let apply = |event| {
        let storage = storage.clone();
        async move { storage.apply_clerk_event(&event).await.unwrap().outcome }
    };
    let user = |id: &str, version: i64, object: &str| {
        clerk_event(
            id,
            "user.updated",
            Some(version),
            clerk_user_change(object, None, None, Reject),
        )
    };
    let until = Utc::now() + ChronoDuration::hours(1);
    let session = |id: &str| {
        clerk_event(
            id,
            "session.ended",
            None,
            ClerkChange::SessionEnded {
                session_id: "sess_old".into(),
                refuse_until: until,
            },
        )
    };
    let deleted = clerk_event(
        "old_deleted",
        "user.deleted",
        Some(DELETED_VERSION),
        ClerkChange::UserDeleted {
            clerk_user_id: clerk("user_gone"),
            refuse_until: until,
        },
    );
    let ignored = clerk_event("old_ignored", "organization.created", None, ClerkChange::Ignored);

    // Past the retention: three versions of user_a (one of them applied late),
    // a deleted user_gone, an ended session, an ignored type.
    assert_eq!(apply(user("old_a100", 100, "user_a")).await, O::Unchanged);
    assert_eq!(apply(user("old_a300", 300, "user_a")).await, O::Unchanged);
    assert_eq!(apply(user("old_a200", 200, "user_a")).await, O::Stale);
    assert_eq!(apply(user("old_gone100", 100, "user_gone")).await, O::Unchanged);
    assert_eq!(apply(deleted.clone()).await, O::Applied);
    assert_eq!(apply(session("old_session")).await, O::Applied);
    assert_eq!(apply(ignored.clone()).await, O::Ignored);
    // Both backends stamp `received_at` with this machine's clock.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let cutoff = Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    // Within the retention: an older version of user_b, then its newest.
    assert_eq!(apply(user("new_b10", 10, "user_b")).await, O::Unchanged);
    assert_eq!(apply(user("new_b20", 20, "user_b")).await, O::Unchanged);

    // Bounded batches: old_a100, old_a200, old_gone100, old_session and
    // old_ignored go; old_a300 and old_deleted (their objects' newest) stay.
    assert_eq!(storage.purge_clerk_events(cutoff, 2).await.unwrap(), 2);
    assert_eq!(storage.purge_clerk_events(cutoff, 2).await.unwrap(), 2);
    assert_eq!(storage.purge_clerk_events(cutoff, 2).await.unwrap(), 1);
    assert_eq!(storage.purge_clerk_events(cutoff, 2).await.unwrap(), 0);
    // The domain's loop finds nothing left either.
    assert_eq!(
        identity::webhooks::purge_events(storage.as_ref(), cutoff, 1)
            .await
            .unwrap(),
        0
    );

    // Kept ids are still duplicates, recent and old alike.
    assert_eq!(apply(user("new_b10", 10, "user_b")).await, O::Duplicate);
    assert_eq!(apply(user("new_b20", 20, "user_b")).await, O::Duplicate);
    assert_eq!(apply(user("old_a300", 300, "user_a")).await, O::Duplicate);
    assert_eq!(apply(deleted).await, O::Duplicate);
    // A purged id is recorded again, and still ordered by the kept newest version.
    assert_eq!(apply(user("old_a100", 100, "user_a")).await, O::Stale);
    assert_eq!(apply(user("old_gone100", 100, "user_gone")).await, O::Stale);
    assert_eq!(apply(user("old_a200", 200, "user_a")).await, O::Stale);
    assert_eq!(apply(ignored).await, O::Ignored);
    assert_eq!(apply(user("next_a400", 400, "user_a")).await, O::Unchanged);

    // Later: everything before now goes but the newest version of each object.
    let now = Utc::now() + ChronoDuration::seconds(1);
    let purged = identity::webhooks::purge_events(storage.as_ref(), now, 1)
        .await
        .unwrap();
    // new_b10, old_a300, old_a100, old_gone100, old_a200, old_ignored.
    assert_eq!(purged, 6);
    for (id, version, object) in [("next_a400", 400, "user_a"), ("new_b20", 20, "user_b")] {
        assert_eq!(apply(user(id, version, object)).await, O::Duplicate, "{id}");
    }
    assert_eq!(apply(user("late_b15", 15, "user_b")).await, O::Stale);
    assert_eq!(apply(user("late_gone", 900, "user_gone")).await, O::Stale);
}

/// A new reconciliation pass (fixing) leased to `owner`.
fn reconcile_job(owner: &str) -> identity::storage::ReconcileJobRecord {
    identity::storage::ReconcileJobRecord {
        id: uuid::Uuid::new_v4(),
        state: BulkJobState::Running,
        fix: true,
        params: "{}".into(),
        cursor: None,
        summary: "{}".into(),
        started_by: "suite".into(),
        lease_owner: Some(owner.into()),
        lease_until: None,
        started_at: Utc::now(),
        finished_at: None,
    }
}

/// Both kinds of job share one lease, through the kind-generic calls.
async fn every_kind_of_job_is_leased_alike(db: TestDb) {
    use identity::storage::{JobLease, LeasedJob};
    let storage = db.storage().await;
    let now = Utc::now();
    let lease = now + ChronoDuration::seconds(30);
    let bulk = bulk_job(storage.as_ref(), "runner-a", lease).await;
    let reconcile = reconcile_job("runner-a");
    storage
        .create_reconcile_job(&reconcile, lease, &audit("reconcile.start", None))
        .await
        .unwrap();
    let held = JobLease {
        held: true,
        cancel_requested: false,
    };
    let later = now + ChronoDuration::seconds(31);
    let relet = later + ChronoDuration::seconds(30);
    for (job, id) in [(LeasedJob::Bulk, bulk), (LeasedJob::Reconcile, reconcile.id)] {
        assert_eq!(
            storage.renew_lease(job, id, "runner-a", lease).await.unwrap(),
            held,
            "{job:?}"
        );
        assert!(
            !storage.claim_job(job, id, "runner-b", now, lease).await.unwrap(),
            "{job:?}"
        );
        assert!(
            storage.claim_job(job, id, "runner-b", later, relet).await.unwrap(),
            "{job:?}"
        );
        assert!(
            !storage.renew_lease(job, id, "runner-a", relet).await.unwrap().held,
            "{job:?}"
        );
        assert_eq!(
            storage.renew_lease(job, id, "runner-b", relet).await.unwrap(),
            held,
            "{job:?}"
        );
    }
}

async fn a_reconcile_job_is_leased_and_one_runs_at_a_time(db: TestDb) {
    let storage = db.storage().await;
    let first = reconcile_job("a");
    let lease = Utc::now() + ChronoDuration::seconds(30);
    storage
        .create_reconcile_job(&first, lease, &audit("reconcile.start", None))
        .await
        .unwrap();
    match storage
        .create_reconcile_job(&reconcile_job("b"), lease, &audit("reconcile.start", None))
        .await
    {
        Err(StorageError::Conflict(Conflict::ReconcileRunning)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(storage.running_reconcile_job().await.unwrap().unwrap().id, first.id);
    // Held: nobody else claims it, and only its owner writes.
    assert!(
        !storage
            .claim_reconcile_job(first.id, "b", Utc::now(), lease)
            .await
            .unwrap()
    );
    assert!(
        storage
            .save_reconcile_progress(first.id, "a", "{\"offset\":500}", "{\"x\":1}", lease)
            .await
            .unwrap()
    );
    assert!(
        !storage
            .save_reconcile_progress(first.id, "b", "{}", "{}", lease)
            .await
            .unwrap()
    );
    // Its lease lapses: another runner takes it over, the first is out.
    let later = Utc::now() + ChronoDuration::seconds(60);
    assert!(
        storage
            .claim_reconcile_job(first.id, "b", later, later + ChronoDuration::seconds(30))
            .await
            .unwrap()
    );
    assert!(!storage.renew_reconcile_lease(first.id, "a", later).await.unwrap());
    assert!(
        storage
            .renew_reconcile_lease(first.id, "b", later + ChronoDuration::seconds(30))
            .await
            .unwrap()
    );
    let stored = storage.get_reconcile_job(first.id).await.unwrap().unwrap();
    assert_eq!(stored.cursor.as_deref(), Some("{\"offset\":500}"));
    assert_eq!(stored.lease_owner.as_deref(), Some("b"));
    assert!(
        !storage
            .finish_reconcile_job(
                first.id,
                "a",
                BulkJobState::Completed,
                "{}",
                &audit("reconcile.finish", None)
            )
            .await
            .unwrap()
    );
    assert!(
        storage
            .finish_reconcile_job(
                first.id,
                "b",
                BulkJobState::Completed,
                "{\"done\":true}",
                &audit("reconcile.finish", None)
            )
            .await
            .unwrap()
    );
    let latest = storage.latest_reconcile_job().await.unwrap().unwrap();
    assert_eq!(
        (latest.id, latest.state, latest.summary.as_str()),
        (first.id, BulkJobState::Completed, "{\"done\":true}")
    );
    assert!(latest.finished_at.is_some());
    assert!(storage.running_reconcile_job().await.unwrap().is_none());
    assert_eq!(audit_count(storage.as_ref(), "reconcile.finish").await, 1);

    // Mappings page in Clerk id order.
    for (n, id) in ["user_c", "user_a", "user_b"].iter().enumerate() {
        let user = insert(storage.as_ref(), &format!("m{n}@example.com"), None).await;
        storage
            .link_user(user, &clerk(id), &audit("user.link", Some(user)))
            .await
            .unwrap();
    }
    let first_page = storage.mappings_after(None, 2).await.unwrap();
    let ids: Vec<_> = first_page.iter().map(|m| m.clerk_user_id.to_string()).collect();
    assert_eq!(ids, ["user_a", "user_b"]);
    let rest = storage
        .mappings_after(Some(&first_page[1].clerk_user_id), 2)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].clerk_user_id.as_str(), "user_c");
}

crate::backend_tests!(
    users_are_found_many_at_a_time,
    concurrent_cache_misses_each_get_their_own_user,
    clerk_events_apply_once_in_order_with_their_audit,
    concurrent_deliveries_of_one_event_apply_once,
    old_clerk_events_are_purged_but_each_objects_newest_version_stays,
    a_reconcile_job_is_leased_and_one_runs_at_a_time,
    every_kind_of_job_is_leased_alike,
    outbox_and_invitation_counts_stay_exact,
    a_bulk_job_is_claimed_by_one_runner_at_a_time,
    only_the_lease_owner_writes_to_a_bulk_job,
    cancelling_a_bulk_job_without_a_live_runner_ends_it,
    user_counts_stay_exact_through_every_change,
    auth_figures_add_up_across_flushes,
    readiness_counts_only_users_that_still_exist,
    provisioning_creates_one_clerk_native_user,
    revocations_are_idempotent_listed_and_purged,
    revoking_again_keeps_the_later_expiry,
    revocations_are_read_incrementally_by_change_time,
    emails_fold_the_same_on_both_backends,
    mapping_conflicts_name_the_side_that_is_taken,
    an_email_several_users_share_finds_the_same_user,
    concurrent_first_sightings_sharing_an_email_are_clean,
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
