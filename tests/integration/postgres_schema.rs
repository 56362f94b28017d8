//! Migrations against an existing application database on PostgreSQL, and
//! replicas migrating at the same time.

use identity::{
    domain::{AuditOutcome, ClerkUserId, UserId},
    storage::{self, DatabaseOptions, NewAuditEvent, UserKey},
};
use sqlx::Connection;

use crate::common::{Backend, TestDb};

#[tokio::test]
async fn existing_users_table_is_extended_never_rewritten() {
    let Some(db) = TestDb::bare(Backend::Postgres).await else {
        return;
    };
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // The application's table as it stands before the migration (the seed's columns).
    sqlx::raw_sql(
        "CREATE TABLE users (
             id UUID PRIMARY KEY,
             email VARCHAR(255) NOT NULL UNIQUE,
             password_hash VARCHAR(255) NOT NULL,
             failed_attempts INTEGER NOT NULL DEFAULT 0,
             created_at TIMESTAMP NOT NULL DEFAULT NOW()
         );
         INSERT INTO users (id, email, password_hash, failed_attempts) VALUES
           ('6f1c2b9e-8a43-4f0e-9d57-0c8f3b1a2d44', 'ann@example.com', '$2b$12$hash-ann', 3),
           ('7a2d3c0f-9b54-4a1f-8e68-1d903c2b3e55', 'bob@example.com', '$2b$12$hash-bob', 0);",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    // Four replicas start at once; each applies migrations.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            storage::connect(&url, &DatabaseOptions::default(), true)
                .await
                .map(|_| ())
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM identity_schema_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count() as i64;
    assert_eq!(applied, files, "each migration applied once");

    // Existing rows are untouched.
    let (hash, attempts): (String, i32) =
        sqlx::query_as("SELECT password_hash, failed_attempts FROM users WHERE email = 'ann@example.com'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(hash, "$2b$12$hash-ann");
    assert_eq!(attempts, 3);

    let storage = storage::connect(&db.url, &DatabaseOptions::default(), true)
        .await
        .unwrap();
    let ann = UserId::parse("id", "6f1c2b9e-8a43-4f0e-9d57-0c8f3b1a2d44").unwrap();
    let user = storage.find_user(&UserKey::Id(ann)).await.unwrap().unwrap();
    assert_eq!(user.email.as_deref(), Some("ann@example.com"));
    assert!(user.has_password);
    let event = NewAuditEvent {
        caller: "t".into(),
        action: "user.link".into(),
        user_id: Some(ann),
        outcome: AuditOutcome::Success,
        detail: String::new(),
    };
    storage
        .link_user(ann, &ClerkUserId::parse("c", "user_ann").unwrap(), &event)
        .await
        .unwrap();
    let linked: Option<String> = sqlx::query_scalar("SELECT clerk_user_id FROM users WHERE id = $1")
        .bind(ann.as_uuid())
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(linked.as_deref(), Some("user_ann"));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 2);
}
