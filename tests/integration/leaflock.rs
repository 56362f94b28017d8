//! The real application's database (LeafLock: emails encrypted, Argon2id
//! hashes, soft delete, `{user_id, exp, iat}` HS512 tokens) on PostgreSQL,
//! with the application writing all the while: every RPC of both services,
//! merges of identities that met late, unlink as a rollback, the seed's
//! phase-4 cleanup on a live system, and the Go implementation's tables.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use identity::{
    config::{InvitationConfig, MailConfig, MailTransportConfig, UnmappedPolicy, VerificationConfig},
    domain::{Email, UserId},
    pb::{
        self, AuthMode, GetAuthModeRequest, GetMappingRequest, GetMigrationStatsRequest, GetUserRequest,
        InitiateMigrationRequest, LinkUserRequest, ListAuditEventsRequest, RejectionReason, RevokeTokenRequest,
        SetAuthModeRequest, StartBulkMigrationRequest, UnlinkUserRequest, get_mapping_request,
        get_user_request::Lookup, initiate_migration_request::Subject, revoke_token_request::Target,
    },
    storage::{self, NewLegacyUser, UsersTableConfig},
};
use jsonwebtoken::Algorithm;
use secrecy::SecretString;
use serde_json::json;
use sqlx::Connection;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::common::{
    Backend, SEED_POSTGRES, TestApp, TestDb, accepted, clerk_config, exec,
    fake_clerk::FakeClerk,
    fake_smtp::{FakeSmtp, parse, token_in},
    legacy_config, rejected, strings, test_config,
    tokens::{LEGACY_SECRET, clerk, clerk_claims, legacy_with, now},
};

/// LeafLock's tables, written from the facts of its schema.
pub(crate) const LEAFLOCK: &str = r#"
    CREATE EXTENSION IF NOT EXISTS "uuid-ossp";
    CREATE TABLE _migrations (version TEXT PRIMARY KEY, applied_at TIMESTAMPTZ DEFAULT NOW());
    CREATE TABLE users (
        id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
        email_hash BYTEA UNIQUE NOT NULL,
        email_encrypted BYTEA NOT NULL,
        email_search_hash BYTEA UNIQUE,
        password_hash TEXT NOT NULL,
        salt BYTEA NOT NULL,
        master_key_encrypted BYTEA NOT NULL,
        public_key BYTEA, private_key_encrypted BYTEA, mfa_secret_encrypted BYTEA,
        mfa_enabled BOOLEAN DEFAULT false, mfa_backup_codes BYTEA[], mfa_backup_codes_used BYTEA[],
        created_at TIMESTAMPTZ DEFAULT NOW(), updated_at TIMESTAMPTZ DEFAULT NOW(),
        last_login TIMESTAMPTZ, failed_attempts INT DEFAULT 0, locked_until TIMESTAMPTZ,
        deleted_at TIMESTAMPTZ,
        is_admin BOOLEAN DEFAULT false, storage_used BIGINT DEFAULT 0, storage_limit BIGINT DEFAULT 5242880,
        theme_preference VARCHAR(20) DEFAULT 'system'
    );
    CREATE TABLE audit_log (id BIGSERIAL PRIMARY KEY, user_id UUID, action TEXT NOT NULL, at TIMESTAMPTZ DEFAULT NOW());
    CREATE TABLE workspaces (id UUID PRIMARY KEY DEFAULT uuid_generate_v4(), owner_id UUID REFERENCES users(id), name TEXT);
    CREATE TABLE notes (
        id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
        user_id UUID NOT NULL REFERENCES users(id),
        body_encrypted BYTEA NOT NULL
    );"#;

pub(crate) const ARGON: &str = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNo";

/// The application's own INSERT of a new user, with its own columns.
pub(crate) fn app_insert(id: UserId) -> String {
    format!(
        "INSERT INTO users (id, email_hash, email_encrypted, password_hash, salt, master_key_encrypted)
         VALUES ('{id}', sha256('{id}'::bytea), '\\x00ff', '{ARGON}', '\\x01', '\\x02')"
    )
}

/// The mapping a LeafLock operator configures.
pub(crate) fn leaflock_users() -> UsersTableConfig {
    let mut users = UsersTableConfig::default();
    for (variable, value) in [
        ("IDENTITY_USERS_EMAIL_COLUMN", ""),
        ("IDENTITY_USERS_PASSWORD_HASH_COLUMN", "password_hash"),
        ("IDENTITY_USERS_DELETED_AT_COLUMN", "deleted_at"),
        ("IDENTITY_USERS_CLERK_ID_COLUMN", ""),
    ] {
        users.set_column(variable, value).unwrap();
    }
    users
}

/// A LeafLock session token: `{user_id, exp, iat}`, HS512, nothing else.
pub(crate) fn leaflock_token(user: UserId) -> String {
    legacy_with(
        Algorithm::HS512,
        LEGACY_SECRET.as_bytes(),
        json!({"user_id": user.to_string(), "exp": now() + 3600, "iat": now()}),
    )
}

/// LeafLock's session tokens (HS512, `user_id`) and Clerk (the fake), as a
/// LeafLock operator configures them; users cached briefly, so that the
/// application's soft deletes are seen soon.
pub(crate) fn leaflock_verification(fake: &FakeClerk) -> VerificationConfig {
    let mut legacy = legacy_config();
    legacy.algorithm = Algorithm::HS512;
    legacy.user_claim = "user_id".into();
    VerificationConfig {
        legacy: Some(legacy),
        clerk: Some(clerk_config(fake)),
        user_cache_ttl: Duration::from_millis(200),
        ..VerificationConfig::default()
    }
}

fn config(db: &TestDb, fake: &FakeClerk, smtp: &FakeSmtp) -> (identity::config::Config, [String; 3]) {
    let (mut config, keys) = test_config(db);
    config.verification = leaflock_verification(fake);
    config.database.users = leaflock_users();
    config.invitations = InvitationConfig {
        frontend_url: url::Url::parse("https://app.example.com/").unwrap(),
        ..InvitationConfig::default()
    };
    config.mail = MailConfig {
        transport: MailTransportConfig::Smtp(SecretString::from(smtp.url())),
        from: "LeafLock <no-reply@example.com>".into(),
        poll_interval: Duration::from_millis(300),
        max_attempts: 10,
        retry_base: Duration::from_secs(1),
        ..MailConfig::default()
    };
    config.bulk.default_rate = 1000.0;
    (config, keys)
}

/// The shape of `users` and everything attached to it, to compare before and after.
pub(crate) async fn users_schema(db: &TestDb) -> Vec<Option<String>> {
    strings(
        db,
        "SELECT kind || ' ' || detail FROM (
             SELECT 'column' AS kind, column_name || ' ' || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '') AS detail
             FROM information_schema.columns WHERE table_name = 'users'
             UNION ALL SELECT 'constraint', conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'users'::regclass
             UNION ALL SELECT 'index', indexdef FROM pg_indexes WHERE tablename = 'users'
             UNION ALL SELECT 'trigger', tgname FROM pg_trigger WHERE tgrelid = 'users'::regclass AND NOT tgisinternal
         ) s ORDER BY 1",
    )
    .await
}

/// The application, writing as it does in production until told to stop:
/// sign-ups with its own columns, the login UPDATE, soft deletes.
pub(crate) fn application(db: &TestDb, stop: Arc<AtomicBool>, writes: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    let url = db.url.clone();
    tokio::spawn(async move {
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        while !stop.load(Ordering::SeqCst) {
            let id = UserId::new_random();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "{}; UPDATE users SET last_login = NOW(), failed_attempts = 0 WHERE id = '{id}';
                 INSERT INTO notes (user_id, body_encrypted) VALUES ('{id}', '\\xbeef');
                 UPDATE users SET deleted_at = NOW() WHERE id = '{id}'",
                app_insert(id)
            )))
            .execute(&mut conn)
            .await
            .expect("the application's own statements keep working");
            writes.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

async fn stats(app: &TestApp) -> pb::MigrationStats {
    app.admin()
        .get_migration_stats(GetMigrationStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
}

async fn audit_actions(app: &TestApp, user: UserId) -> Vec<(String, String)> {
    app.admin()
        .list_audit_events(ListAuditEventsRequest {
            user_id: user.to_string(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| (e.action, e.detail))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_on_the_application_database_while_it_keeps_writing() {
    crate::common::init_logs();
    let Some(db) = TestDb::bare(Backend::Postgres).await else {
        return;
    };
    exec(&db, LEAFLOCK).await;
    let (ann, bob, cid, gone) = (
        UserId::new_random(),
        UserId::new_random(),
        UserId::new_random(),
        UserId::new_random(),
    );
    for id in [ann, bob, cid, gone] {
        exec(&db, &app_insert(id)).await;
    }
    exec(&db, &format!("UPDATE users SET deleted_at = NOW() WHERE id = '{gone}'")).await;
    let before = users_schema(&db).await;

    let fake = FakeClerk::start(&["clerk_a"]).await;
    let smtp = FakeSmtp::start().await;
    let (cfg, keys) = config(&db, &fake, &smtp);
    let app = TestApp::spawn_with(db, cfg, keys).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = application(&app.db, stop.clone(), writes.clone());

    // The migrations changed nothing of the application's table.
    assert_eq!(users_schema(&app.db).await, before, "the users table is untouched");

    // LeafLock's own session tokens verify; a soft-deleted user is not found.
    let principal = accepted(app.verify(&leaflock_token(ann)).await);
    assert_eq!(principal.user_id, ann.to_string());
    assert_eq!(principal.email, "", "LeafLock's emails are encrypted");
    assert!(!principal.new_to_application);
    assert_eq!(
        rejected(app.verify(&leaflock_token(gone)).await),
        RejectionReason::UserNotFound
    );
    let user = app
        .identity(&app.verify_key)
        .get_user(GetUserRequest {
            lookup: Some(Lookup::UserId(ann.to_string())),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(user.has_legacy_password);
    assert!(user.created_at.is_some());

    // Revocation of a token without jti, by its digest.
    let doomed = leaflock_token(bob);
    app.identity(&app.admin_key)
        .revoke_token(RevokeTokenRequest {
            target: Some(Target::Token(doomed.clone())),
            expires_at: None,
        })
        .await
        .unwrap();
    assert_eq!(rejected(app.verify(&doomed).await), RejectionReason::Revoked);

    // An invitation needs an address the table does not show: the backend supplies it.
    let mut migrate = app.migration(&app.migrate_key);
    let no_email = migrate
        .initiate_migration(InitiateMigrationRequest {
            subject: Some(Subject::LegacyToken(leaflock_token(ann))),
            email: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(no_email.code(), Code::FailedPrecondition, "{no_email:?}");
    migrate
        .initiate_migration(InitiateMigrationRequest {
            subject: Some(Subject::LegacyToken(leaflock_token(ann))),
            email: "Ann@Example.com".into(),
        })
        .await
        .unwrap();
    let mail = smtp.wait_for(1).await;
    let (subject, _, _) = parse(&mail[0]);
    assert!(!subject.is_empty());
    assert!(
        mail[0]
            .lines()
            .any(|l| l.starts_with("To:") && l.contains("Ann@Example.com")),
        "the invitation goes to the supplied address"
    );
    assert!(
        audit_actions(&app, ann)
            .await
            .iter()
            .any(|(a, d)| a == "migration.initiate" && d.contains("supplied by caller migrator")),
        "the audit log records who supplied the address"
    );

    // Ann signed in with Clerk before migrating: she was provisioned.
    let ann_session = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_ann"));
    let provisional = accepted(app.verify(&ann_session).await);
    assert!(provisional.new_to_application);
    assert_ne!(provisional.user_id, ann.to_string());
    // Completing her invitation merges the provisional user into her.
    let mapping = migrate
        .complete_migration(pb::CompleteMigrationRequest {
            migration_token: token_in(&mail[0]),
            clerk_session_token: ann_session.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .mapping
        .unwrap();
    assert_eq!(mapping.user_id, ann.to_string());
    let merged = accepted(app.verify(&ann_session).await);
    assert_eq!(merged.user_id, ann.to_string());
    assert!(!merged.new_to_application);
    let gone_user = app
        .identity(&app.verify_key)
        .get_user(GetUserRequest {
            lookup: Some(Lookup::UserId(provisional.user_id.clone())),
        })
        .await
        .unwrap_err();
    assert_eq!(
        gone_user.code(),
        Code::NotFound,
        "the provisional user no longer resolves"
    );
    let merges: Vec<_> = audit_actions(&app, ann)
        .await
        .into_iter()
        .filter(|(a, _)| a == "user.merge")
        .collect();
    assert_eq!(merges.len(), 1, "{merges:?}");
    assert!(merges[0].1.contains(&provisional.user_id) && merges[0].1.contains(&ann.to_string()));

    // The same through an admin LinkUser.
    let cid_session = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_cid"));
    let cid_provisional = accepted(app.verify(&cid_session).await);
    app.admin()
        .link_user(LinkUserRequest {
            user_id: cid.to_string(),
            clerk_user_id: "user_cid".into(),
        })
        .await
        .unwrap();
    assert_eq!(accepted(app.verify(&cid_session).await).user_id, cid.to_string());
    assert_ne!(cid_provisional.user_id, cid.to_string());
    let by_clerk = app
        .admin()
        .get_mapping(GetMappingRequest {
            lookup: Some(get_mapping_request::Lookup::ClerkUserId("user_cid".into())),
        })
        .await
        .unwrap()
        .into_inner()
        .mapping
        .unwrap();
    assert_eq!(by_clerk.user_id, cid.to_string());

    // UnlinkUser is a rollback: refused, not re-provisioned, until linked again.
    app.admin()
        .unlink_user(UnlinkUserRequest {
            user_id: cid.to_string(),
        })
        .await
        .unwrap();
    assert_eq!(rejected(app.verify(&cid_session).await), RejectionReason::UnmappedUser);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rejected(app.verify(&cid_session).await), RejectionReason::UnmappedUser);
    app.admin()
        .link_user(LinkUserRequest {
            user_id: cid.to_string(),
            clerk_user_id: "user_cid".into(),
        })
        .await
        .unwrap();
    assert_eq!(accepted(app.verify(&cid_session).await).user_id, cid.to_string());

    // Bulk import from the application's export: the Argon2id digest reaches Clerk.
    app.storage
        .insert_legacy_user(&NewLegacyUser {
            id: bob,
            email: Email::parse("email", "bob@example.com").unwrap(),
            password_hash: Some(ARGON.into()),
        })
        .await
        .unwrap();
    let mut stream = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest {
            user_ids: vec![bob.to_string()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(progress) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .unwrap()
    {
        last = Some(progress.unwrap());
    }
    let last = last.unwrap();
    assert_eq!(last.created, 1, "{last:?}");
    let created = fake.state.directory.lock().unwrap().clone();
    let bob_in_clerk = created
        .iter()
        .find(|u| u["external_id"].as_str() == Some(&bob.to_string()))
        .expect("bob created in Clerk");
    assert_eq!(bob_in_clerk["password_hasher"], "argon2id");
    assert_eq!(bob_in_clerk["password_digest"], ARGON);

    // Stats count the application's live users, whatever it wrote meanwhile.
    let figures = stats(&app).await;
    assert_eq!(figures.migrated_users, 3, "{figures:?}");
    assert_eq!(figures.clerk_native_users, 0, "both provisional users were merged");
    assert_eq!(
        figures.legacy_users, 0,
        "ann, bob and cid migrated; the application's others are soft-deleted"
    );

    // The auth mode switches through the database.
    app.admin()
        .set_auth_mode(SetAuthModeRequest {
            mode: AuthMode::ClerkOnly as i32,
        })
        .await
        .unwrap();
    let mode = app
        .admin()
        .get_auth_mode(GetAuthModeRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mode.mode(), AuthMode::ClerkOnly);
    assert_eq!(
        rejected(app.verify(&leaflock_token(ann)).await),
        RejectionReason::MethodDisabled
    );

    // The application stops using the legacy columns, then runs the seed's phase 4.
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    assert!(writes.load(Ordering::SeqCst) > 0);
    exec(
        &app.db,
        "DROP TABLE IF EXISTS password_reset_tokens; DROP TABLE IF EXISTS jwt_blacklist;
         ALTER TABLE users DROP COLUMN IF EXISTS password_hash; ALTER TABLE users DROP COLUMN IF EXISTS failed_attempts;",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(accepted(app.verify(&ann_session).await).user_id, ann.to_string());
    let dan = accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_dan")))
            .await,
    );
    assert!(dan.new_to_application);
    let user = app
        .identity(&app.verify_key)
        .get_user(GetUserRequest {
            lookup: Some(Lookup::UserId(cid.to_string())),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(!user.has_legacy_password);
    assert_eq!(stats(&app).await.migrated_users, 3);
    let db = app.shutdown().await;

    // A restart asks for the dropped column to be emptied from the configuration.
    let (cfg, _) = config(&db, &fake, &smtp);
    let err = storage::connect(&db.url, &cfg.database, true)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("IDENTITY_USERS_PASSWORD_HASH_COLUMN") && err.contains("password_hash"),
        "{err}"
    );
    let mut fixed = cfg.database.clone();
    fixed
        .users
        .set_column("IDENTITY_USERS_PASSWORD_HASH_COLUMN", "")
        .unwrap();
    storage::connect(&db.url, &fixed, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_errors_name_the_variable_or_the_migration() {
    let Some(db) = TestDb::bare(Backend::Postgres).await else {
        return;
    };
    exec(&db, LEAFLOCK).await;
    // The seed's default `email` is not there: warned about, treated as absent.
    let mut options = storage::DatabaseOptions::default();
    let storage = storage::connect(&db.url, &options, true).await.unwrap();
    assert!(!storage.users_have_emails());
    // Named explicitly, a missing column stops start-up, naming the variable.
    options
        .users
        .set_column("IDENTITY_USERS_EMAIL_COLUMN", "email")
        .unwrap();
    let err = storage::connect(&db.url, &options, true).await.unwrap_err().to_string();
    assert!(
        err.contains("IDENTITY_USERS_EMAIL_COLUMN") && err.contains("email"),
        "{err}"
    );
    // link_by_email has nothing to match on.
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let (mut cfg, _) = test_config(&db);
    cfg.database.users = leaflock_users();
    let mut clerk_cfg = clerk_config(&fake);
    clerk_cfg.unmapped_policy = UnmappedPolicy::LinkByEmail;
    cfg.verification.clerk = Some(clerk_cfg);
    let storage = storage::connect(&db.url, &cfg.database, true).await.unwrap();
    let err = identity::server::start_with_storage(cfg, storage)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("IDENTITY_UNMAPPED_CLERK_USER") && err.contains("link_by_email"),
        "{err}"
    );

    // A failing migration names its file and the database's own message.
    let Some(clash) = TestDb::bare(Backend::Postgres).await else {
        return;
    };
    exec(&clash, "CREATE TABLE identity_users (id INTEGER PRIMARY KEY)").await;
    let err = storage::connect(&clash.url, &storage::DatabaseOptions::default(), true)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("20261202000001_service_tables.sql") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("postgres://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_implementation_tables_are_honoured() {
    crate::common::init_logs();
    let Some(db) = TestDb::bare(Backend::Postgres).await else {
        return;
    };
    exec(&db, SEED_POSTGRES).await;
    let (ann, bob) = (UserId::new_random(), UserId::new_random());
    let plaintext = "go-plaintext-migration-token-0123456789";
    exec(
        &db,
        &format!(
            "INSERT INTO users (id, email, password_hash) VALUES
               ('{ann}', 'ann@example.com', '$2b$12$hash'), ('{bob}', 'bob@example.com', '$2b$12$hash');
             INSERT INTO user_clerk_mappings (user_id, clerk_user_id) VALUES ('{ann}', 'user_ann');
             INSERT INTO user_migration_tokens (user_id, token, expires_at) VALUES ('{bob}', '{plaintext}', NOW() + interval '1 day');
             INSERT INTO jwt_blacklist (jti, user_id, expires_at) VALUES ('revoked-jti', '{bob}', NOW() + interval '1 day');"
        ),
    )
    .await;
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let smtp = FakeSmtp::start().await;
    let (mut cfg, keys) = config(&db, &fake, &smtp);
    cfg.database.users = UsersTableConfig::default();
    cfg.verification.legacy = Some(legacy_config());
    let app = TestApp::spawn_with(db, cfg, keys).await;

    // A mapping that exists only in user_clerk_mappings is honoured.
    let ann_session = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_ann"));
    assert_eq!(accepted(app.verify(&ann_session).await).user_id, ann.to_string());
    // A revocation already in jwt_blacklist is enforced.
    let revoked =
        crate::common::tokens::legacy(json!({"sub": bob.to_string(), "exp": now() + 600, "jti": "revoked-jti"}));
    assert_eq!(rejected(app.verify(&revoked).await), RejectionReason::Revoked);
    // The plaintext token is no longer in the database; the emailed link still works.
    let stored = strings(&app.db, "SELECT token FROM user_migration_tokens").await;
    assert_ne!(stored, vec![Some(plaintext.to_owned())]);
    let bob_session = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_bob"));
    app.migration(&app.migrate_key)
        .complete_migration(pb::CompleteMigrationRequest {
            migration_token: plaintext.into(),
            clerk_session_token: bob_session,
        })
        .await
        .unwrap();
    // Invitations and stats work over these tables.
    let carl = app.legacy_user("carl@example.com").await;
    app.admin()
        .initiate_migration(InitiateMigrationRequest {
            subject: Some(Subject::UserId(carl.to_string())),
            email: String::new(),
        })
        .await
        .unwrap();
    let figures = stats(&app).await;
    assert_eq!((figures.migrated_users, figures.legacy_users), (2, 1), "{figures:?}");
    // The mirror column the seed calls optional is kept in step.
    let mirrored = strings(&app.db, &format!("SELECT clerk_user_id FROM users WHERE id = '{bob}'")).await;
    assert_eq!(mirrored, vec![Some("user_bob".to_owned())]);
}

/// Rows another program wrote into a SQLite users table, in every time
/// format SQLite produces, are read; one that is no time at all is refused
/// with an error naming the column and the user (never a bare "internal").
#[tokio::test]
async fn sqlite_times_written_by_other_programs() {
    use identity::storage::UserKey;
    let db = TestDb::bare(Backend::Sqlite).await.unwrap();
    exec(&db, crate::common::SEED_SQLITE).await;
    let ids: Vec<UserId> = (0..5).map(|_| UserId::new_random()).collect();
    for (id, created) in ids.iter().zip([
        "datetime('now')",
        "'2026-11-30T12:34:56Z'",
        "'2026-11-30 12:34:56.123'",
        "1796042096",
        "'yesterday'",
    ]) {
        exec(
            &db,
            &format!("INSERT INTO users (id, email, password_hash, created_at) VALUES ('{id}', '{id}@example.com', 'x', {created})"),
        )
        .await;
    }
    let storage = db.storage().await;
    for id in &ids[..4] {
        let user = storage.find_user(&UserKey::Id(*id)).await.unwrap().unwrap();
        assert!(user.created_at.is_some(), "{id}");
    }
    let err = storage.find_user(&UserKey::Id(ids[4])).await.unwrap_err();
    let chain = identity::domain::error_chain(&err);
    assert!(
        chain.contains("created_at") && chain.contains(&ids[4].to_string()),
        "{chain}"
    );
}
