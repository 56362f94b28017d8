//! The invitation strategy end to end: InitiateMigration queues an email in
//! the outbox, the worker delivers it over SMTP (through outages and
//! restarts), CompleteMigration redeems the token with a Clerk session.

use std::time::Duration;

use identity::{
    config::{InvitationConfig, MailConfig, MailTransportConfig, VerificationConfig},
    domain::INVALID_TOKEN,
    pb::{
        self, CompleteMigrationRequest, InitiateMigrationRequest, MigrationState, initiate_migration_request::Subject,
    },
};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::common::{
    TestApp, TestDb, assert_invalid, clerk_config,
    fake_clerk::FakeClerk,
    fake_smtp::{FakeSmtp, parse, token_in},
    legacy_config, strings, test_config,
    tokens::{clerk, clerk_claims, legacy, legacy_claims, now},
};

fn config_for(db: &TestDb, fake: &FakeClerk, smtp: &FakeSmtp) -> (identity::config::Config, [String; 3]) {
    let (mut config, keys) = test_config(db);
    config.verification = VerificationConfig {
        legacy: Some(legacy_config()),
        clerk: Some(clerk_config(fake)),
        ..VerificationConfig::default()
    };
    config.invitations = InvitationConfig {
        frontend_url: url::Url::parse("https://app.example.com/").unwrap(),
        ..InvitationConfig::default()
    };
    config.mail = MailConfig {
        transport: MailTransportConfig::Smtp(SecretString::from(smtp.url())),
        from: "LeafLock <no-reply@example.com>".into(),
        poll_interval: Duration::from_millis(1000),
        max_attempts: 10,
        retry_base: Duration::from_secs(1),
        ..MailConfig::default()
    };
    (config, keys)
}

async fn spawn(db: TestDb, fake: &FakeClerk, smtp: &FakeSmtp) -> TestApp {
    let (config, keys) = config_for(&db, fake, smtp);
    TestApp::spawn_with(db, config, keys).await
}

fn by_token(token: &str) -> InitiateMigrationRequest {
    InitiateMigrationRequest {
        subject: Some(Subject::LegacyToken(token.to_owned())),
        email: String::new(),
    }
}

fn by_id(id: impl ToString) -> InitiateMigrationRequest {
    InitiateMigrationRequest {
        subject: Some(Subject::UserId(id.to_string())),
        email: String::new(),
    }
}

fn complete(migration_token: &str, clerk_token: &str) -> CompleteMigrationRequest {
    CompleteMigrationRequest {
        migration_token: migration_token.to_owned(),
        clerk_session_token: clerk_token.to_owned(),
    }
}

async fn invitation_is_emailed_and_redeemed_with_a_clerk_session(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let smtp = FakeSmtp::start().await;
    let app = spawn(db, &fake, &smtp).await;
    let ann = app.legacy_user("ann@example.com").await;
    let mut migrator = app.migration(&app.migrate_key);

    let response = migrator
        .initiate_migration(by_token(&format!("Bearer {}", legacy(legacy_claims(&ann.to_string())))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.user_id, ann.to_string());
    let expires = response.expires_at.unwrap().seconds;
    assert!((expires - (now() + 24 * 3600)).abs() < 60, "24 h by default");

    let raw = smtp.wait_for(1).await.remove(0);
    let (subject, text, html) = parse(&raw);
    assert_eq!(subject, "Upgrade Your LeafLock Account");
    assert!(text.contains("Hi ann,"));
    assert!(text.contains("This link expires in 24 hours."));
    assert!(html.contains("Multi-factor authentication"));
    let token = token_in(&raw);
    assert_eq!(token.len(), 43, "256 bits, base64url");
    // The token rides in the fragment: no server, proxy log or Referer sees it.
    assert!(text.contains(&format!("https://app.example.com/migrate#token={token}")));
    // In HTML the link is entity-escaped like every value (`/` as `&#x2f;`).
    assert!(
        html.contains(&format!("app.example.com&#x2f;migrate#token={token}")),
        "{html}"
    );

    // Only the hash is stored, and the outbox forgets the body once sent.
    let hashes = strings(&app.db, "SELECT token_hash FROM identity_migration_tokens").await;
    assert_eq!(hashes, vec![Some(hex::encode(Sha256::digest(token.as_bytes())))]);
    let mut cleared = false;
    for _ in 0..50 {
        let bodies = strings(&app.db, "SELECT body_text FROM identity_outbox").await;
        if bodies == vec![None] {
            cleared = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cleared, "sent message body still stored");

    let session = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_ann"));
    let mapping = migrator
        .complete_migration(complete(&token, &session))
        .await
        .unwrap()
        .into_inner()
        .mapping
        .unwrap();
    assert_eq!(mapping.user_id, ann.to_string());
    assert_eq!(mapping.clerk_user_id, "user_ann");
    let principal = crate::common::accepted(app.verify(&session).await);
    assert_eq!(principal.user_id, ann.to_string());
    assert_eq!(principal.migration_state(), MigrationState::Migrated);

    // Used: the same answer as for a token that never existed.
    let used = migrator
        .complete_migration(complete(&token, &session))
        .await
        .unwrap_err();
    assert_eq!(used.code(), Code::FailedPrecondition);
    assert_eq!(used.message(), INVALID_TOKEN);
    let unknown = migrator
        .complete_migration(complete("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", &session))
        .await
        .unwrap_err();
    assert_eq!(
        (unknown.code(), unknown.message()),
        (Code::FailedPrecondition, INVALID_TOKEN)
    );
    // Already migrated: no new invitation.
    let again = migrator
        .initiate_migration(by_token(&legacy(legacy_claims(&ann.to_string()))))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert!(again.message().contains("already migrated"));

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
    let actions: Vec<_> = events.iter().map(|e| (e.action.as_str(), e.outcome())).collect();
    assert!(
        actions.contains(&("migration.initiate", pb::AuditOutcome::Success)),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("migration.complete", pb::AuditOutcome::Success)),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("migration.initiate", pb::AuditOutcome::Failure)),
        "{actions:?}"
    );
    assert!(events.iter().all(|e| e.caller == "migrator"));
    assert!(events.iter().all(|e| !e.detail.contains(&token)));
    app.shutdown().await;
}

async fn a_new_invitation_supersedes_and_expiry_ends_the_old(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let smtp = FakeSmtp::start().await;
    let app = spawn(db, &fake, &smtp).await;
    let ann = app.legacy_user("ann@example.com").await;
    let bob = app.legacy_user("bob@example.com").await;
    let mut admin = app.admin();
    admin.initiate_migration(by_id(ann)).await.unwrap();
    admin.initiate_migration(by_id(ann)).await.unwrap();
    let messages = smtp.wait_for(2).await;
    let (first, second) = (token_in(&messages[0]), token_in(&messages[1]));
    assert_ne!(first, second);
    let session = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_ann"));
    let superseded = app
        .migration(&app.migrate_key)
        .complete_migration(complete(&first, &session))
        .await
        .unwrap_err();
    assert_eq!(
        (superseded.code(), superseded.message()),
        (Code::FailedPrecondition, INVALID_TOKEN)
    );

    // Expired tokens: the same answer.
    admin.initiate_migration(by_id(bob)).await.unwrap();
    let bob_token = token_in(&smtp.wait_for(3).await[2]);
    crate::common::exec(
        &app.db,
        &format!(
            "UPDATE identity_migration_tokens SET expires_at = {} WHERE user_id = '{bob}'",
            match app.db.backend {
                crate::common::Backend::Sqlite => (chrono::Utc::now().timestamp_micros() - 1_000_000).to_string(),
                crate::common::Backend::Postgres => "now() - interval '1 second'".to_owned(),
            }
        ),
    )
    .await;
    let bob_session = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_bob"));
    let expired = app
        .migration(&app.migrate_key)
        .complete_migration(complete(&bob_token, &bob_session))
        .await
        .unwrap_err();
    assert_eq!(
        (expired.code(), expired.message()),
        (Code::FailedPrecondition, INVALID_TOKEN)
    );

    app.migration(&app.migrate_key)
        .complete_migration(complete(&second, &session))
        .await
        .unwrap();
    app.shutdown().await;
}

async fn twenty_concurrent_completions_admit_exactly_one(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let smtp = FakeSmtp::start().await;
    let app = spawn(db, &fake, &smtp).await;
    let ann = app.legacy_user("ann@example.com").await;
    app.admin().initiate_migration(by_id(ann)).await.unwrap();
    let token = token_in(&smtp.wait_for(1).await[0]);
    let mut tasks = Vec::new();
    for n in 0..20 {
        let mut client = app.migration(&app.migrate_key);
        let session = clerk(
            "clerk_a",
            "ins_clerk_a",
            clerk_claims(&fake.url(), &format!("user_racer{n}")),
        );
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            client.complete_migration(complete(&token, &session)).await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => assert_eq!(
                (status.code(), status.message()),
                (Code::FailedPrecondition, INVALID_TOKEN)
            ),
        }
    }
    assert_eq!(ok, 1);
    let mappings = strings(&app.db, "SELECT clerk_user_id FROM identity_user_mappings").await;
    assert_eq!(mappings.len(), 1);
    app.shutdown().await;
}

async fn a_clerk_user_linked_elsewhere_is_already_exists(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let smtp = FakeSmtp::start().await;
    let app = spawn(db, &fake, &smtp).await;
    let ann = app.legacy_user("ann@example.com").await;
    let bob = app.legacy_user("bob@example.com").await;
    app.admin()
        .link_user(pb::LinkUserRequest {
            user_id: bob.to_string(),
            clerk_user_id: "user_shared".into(),
        })
        .await
        .unwrap();
    app.admin().initiate_migration(by_id(ann)).await.unwrap();
    let token = token_in(&smtp.wait_for(1).await[0]);
    let session = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_shared"));
    let status = app
        .migration(&app.migrate_key)
        .complete_migration(complete(&token, &session))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    // The token was not consumed by the failed attempt.
    let session = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_ann"));
    app.migration(&app.migrate_key)
        .complete_migration(complete(&token, &session))
        .await
        .unwrap();
    app.shutdown().await;
}

async fn bad_requests_and_rate_limits_are_clear(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let smtp = FakeSmtp::start().await;
    let app = spawn(db, &fake, &smtp).await;
    let ann = app.legacy_user("ann@example.com").await;
    let mut migrator = app.migration(&app.migrate_key);

    assert_invalid(
        &migrator
            .initiate_migration(InitiateMigrationRequest {
                subject: None,
                email: String::new(),
            })
            .await
            .unwrap_err(),
        "subject",
    );
    assert_invalid(
        &migrator.initiate_migration(by_token("garbage")).await.unwrap_err(),
        "legacy_token",
    );
    let clerk_token = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_ann"));
    assert_invalid(
        &migrator.initiate_migration(by_token(&clerk_token)).await.unwrap_err(),
        "legacy_token",
    );
    assert_eq!(
        migrator.initiate_migration(by_id(ann)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        app.migration(&app.verify_key)
            .initiate_migration(by_id(ann))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        app.admin()
            .initiate_migration(by_id(uuid::Uuid::new_v4()))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_invalid(
        &migrator
            .complete_migration(complete("", &clerk_token))
            .await
            .unwrap_err(),
        "migration_token",
    );
    assert_invalid(
        &migrator
            .complete_migration(complete("a b", &clerk_token))
            .await
            .unwrap_err(),
        "migration_token",
    );
    assert_invalid(
        &migrator
            .complete_migration(complete("abc", &legacy(legacy_claims(&ann.to_string()))))
            .await
            .unwrap_err(),
        "clerk_session_token",
    );

    // Three invitations per user per hour; the fourth says when to retry.
    let legacy_token = legacy(legacy_claims(&ann.to_string()));
    for _ in 0..3 {
        migrator.initiate_migration(by_token(&legacy_token)).await.unwrap();
    }
    let limited = migrator.initiate_migration(by_token(&legacy_token)).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted);
    use tonic_types::StatusExt;
    let retry = limited.get_details_retry_info().and_then(|r| r.retry_delay).unwrap();
    assert!(
        retry > Duration::from_secs(60) && retry <= Duration::from_secs(3600),
        "{retry:?}"
    );
    app.shutdown().await;
}

async fn mail_outages_and_restarts_lose_nothing(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let smtp = FakeSmtp::start().await;
    // The server first refuses connections, then fails deliveries, then recovers.
    smtp.state.refuse.store(2, std::sync::atomic::Ordering::SeqCst);
    smtp.state.fail_data.store(1, std::sync::atomic::Ordering::SeqCst);
    let app = spawn(db.share(), &fake, &smtp).await;
    let ann = app.legacy_user("ann@example.com").await;
    app.admin().initiate_migration(by_id(ann)).await.unwrap();
    let delivered = smtp.wait_for(1).await;
    assert_eq!(delivered.len(), 1);

    // Queued while the mail server is down, then the service restarts.
    let bob = app.legacy_user("bob@example.com").await;
    smtp.state.refuse.store(1_000_000, std::sync::atomic::Ordering::SeqCst);
    app.admin().initiate_migration(by_id(bob)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.shutdown().await;
    smtp.state.refuse.store(0, std::sync::atomic::Ordering::SeqCst);
    let second_smtp_run = spawn(db, &fake, &smtp).await;
    let messages = smtp.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(smtp.messages().len(), 2, "each message exactly once");
    assert!(parse(&messages[1]).1.contains("Hi bob,"));
    second_smtp_run.shutdown().await;
}

async fn replicas_never_send_a_message_twice(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let smtp = FakeSmtp::start().await;
    let other_db = db.share();
    let first = spawn(db, &fake, &smtp).await;
    let second = spawn(other_db, &fake, &smtp).await;
    for n in 0..12 {
        let user = first.legacy_user(&format!("user{n}@example.com")).await;
        first.admin().initiate_migration(by_id(user)).await.unwrap();
    }
    smtp.wait_for(12).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let messages = smtp.messages();
    assert_eq!(messages.len(), 12);
    let tokens: std::collections::HashSet<_> = messages.iter().map(|m| token_in(m)).collect();
    assert_eq!(tokens.len(), 12);
    second.shutdown().await;
    first.shutdown().await;
}

/// A slow mail server and two replicas: every message is delivered exactly
/// once, though sending them all takes longer than one message's lease.
async fn a_slow_mail_server_gets_each_message_once_from_two_replicas(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let smtp = FakeSmtp::start().await;
    // Each delivery takes most of the send timeout; twenty of them in turn
    // take longer than a message's lease (three timeouts and a margin).
    *smtp.state.data_delay.lock().unwrap() = Duration::from_millis(900);
    let spawn_replica = |db: TestDb| {
        let (mut config, keys) = config_for(&db, &fake, &smtp);
        config.mail.send_timeout = Duration::from_secs(2);
        TestApp::spawn_with(db, config, keys)
    };
    let other_db = db.share();
    let first = spawn_replica(db).await;
    let second = spawn_replica(other_db).await;
    let users = 20;
    for n in 0..users {
        let user = first.legacy_user(&format!("slow{n}@example.com")).await;
        first.admin().initiate_migration(by_id(user)).await.unwrap();
    }
    // Until the outbox is empty, then a little longer for a late duplicate.
    tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            let pending = first.storage.outbox_counts().await.unwrap().pending;
            if pending == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the outbox drains");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let messages = smtp.messages();
    let tokens: std::collections::HashSet<_> = messages.iter().map(|m| token_in(m)).collect();
    assert_eq!(tokens.len(), users, "every message delivered");
    assert_eq!(messages.len(), users, "no message delivered twice");
    second.shutdown().await;
    first.shutdown().await;
}

/// Outside development mode with no mail transport chosen, an invitation
/// is refused rather than "sent" to the log and lost.
async fn invitations_without_a_mail_transport_are_refused(db: TestDb) {
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let smtp = FakeSmtp::start().await;
    let (mut config, keys) = config_for(&db, &fake, &smtp);
    config.mail.transport = MailTransportConfig::Log;
    config.invitations.deliverable = false;
    let app = TestApp::spawn_with(db, config, keys).await;
    let ann = app.legacy_user("ann@example.com").await;
    let err = app.admin().initiate_migration(by_id(ann)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("mail transport"), "{err:?}");
    assert!(strings(&app.db, "SELECT id FROM identity_outbox").await.is_empty());
}

crate::backend_tests!(
    invitations_without_a_mail_transport_are_refused,
    invitation_is_emailed_and_redeemed_with_a_clerk_session,
    a_new_invitation_supersedes_and_expiry_ends_the_old,
    twenty_concurrent_completions_admit_exactly_one,
    a_clerk_user_linked_elsewhere_is_already_exists,
    bad_requests_and_rate_limits_are_clear,
    mail_outages_and_restarts_lose_nothing,
    replicas_never_send_a_message_twice,
    a_slow_mail_server_gets_each_message_once_from_two_replicas,
);
