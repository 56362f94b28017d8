//! The binary as an operator runs it: serve with graceful shutdown,
//! configuration errors, migrate, import-users and gen-api-key.

use std::process::{Command, Stdio};

use crate::common::{
    Backend, TestDb,
    binary::{BIN, Served, command, free_port, wait_serving},
};
use identity::{
    domain::{Email, UserId},
    storage::UserKey,
};

#[tokio::test]
async fn serve_starts_on_sqlite_and_exits_cleanly_on_sigterm() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut served = Served::start(command(&db.url));
    let serving = wait_serving(&served.addr).await;
    served.terminate();
    let mut child = served.child.take().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    // Logs go to standard output (12-factor); errors to standard error.
    let logs = served.logs_once("draining").await;
    assert!(serving, "never SERVING: {logs}");
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(logs.contains("draining"), "{logs}");
    // A pipe is not a terminal: plain text, no colour codes for a log collector.
    assert!(!logs.contains('\u{1b}'), "colour codes in piped logs: {logs:?}");
}

#[test]
fn configuration_errors_name_the_variable_and_fail() {
    let output = command("sqlite::memory:")
        .arg("serve")
        .env("IDENTITY_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&output.stderr).contains("IDENTITY_LOG_FORMAT"));

    let output = command("sqlite::memory:")
        .arg("serve")
        .env("IDENTITY_LISTEN_ADDR", "0.0.0.0:0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("IDENTITY_API_KEYS") && stderr.contains("loopback"),
        "{stderr}"
    );

    let output = command("postgres://app:hunter2@127.0.0.1:1/app")
        .arg("migrate")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!text.contains("hunter2"), "password leaked: {text}");
}

#[tokio::test]
async fn migrate_subcommand_prepares_both_databases() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let Some(db) = TestDb::new(backend).await else { continue };
        let output = command(&db.url).arg("migrate").output().unwrap();
        assert!(
            output.status.success(),
            "{backend:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // PostgreSQL's notices on a new database ("… does not exist,
        // skipping") are not an operator's concern at the default level.
        let logs = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!logs.contains("skipping"), "{backend:?}: {logs}");
        // Running it again is a no-op.
        let output = command(&db.url).arg("migrate").output().unwrap();
        assert!(output.status.success());
        let storage = identity::storage::connect(&db.url, &Default::default(), false)
            .await
            .unwrap();
        assert!(
            storage
                .find_user(&UserKey::Id(UserId::new_random()))
                .await
                .unwrap()
                .is_none()
        );
    }
}

#[tokio::test]
async fn import_users_loads_good_rows_and_reports_bad_ones_by_line() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let Some(db) = TestDb::new(backend).await else { continue };
        let dir = tempfile::tempdir().unwrap();
        let good = uuid::Uuid::new_v4();
        let also_good = uuid::Uuid::new_v4();
        let csv = dir.path().join("users.csv");
        std::fs::write(
            &csv,
            format!(
                "id,email,password_hash\n{good},ann@example.com,$2b$10$abcdefghijk\nbad-id,bob@example.com,\n{also_good},cat@example.com,\n{},ANN@example.com,\n",
                uuid::Uuid::new_v4()
            ),
        )
        .unwrap();
        let output = command(&db.url).arg("import-users").arg(&csv).output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("line 3: invalid id"), "{stdout}");
        assert!(
            stdout.contains("line 5: a user with this id or email already exists"),
            "{stdout}"
        );
        assert!(stdout.contains("imported 2 users, rejected 2 rows"), "{stdout}");

        let jsonl = dir.path().join("more.jsonl");
        let dan = uuid::Uuid::new_v4();
        std::fs::write(
            &jsonl,
            format!("{{\"id\":\"{dan}\",\"email\":\"dan@example.com\",\"password_hash\":null}}\n"),
        )
        .unwrap();
        let output = command(&db.url).arg("import-users").arg(&jsonl).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));

        let storage = identity::storage::connect(&db.url, &Default::default(), false)
            .await
            .unwrap();
        let ann = storage
            .find_user(&UserKey::Id(UserId::from_uuid(good)))
            .await
            .unwrap()
            .unwrap();
        assert!(ann.has_password);
        assert!(
            storage
                .find_user(&UserKey::Email(Email::parse("e", "cat@example.com").unwrap()))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            storage
                .find_user(&UserKey::Id(UserId::from_uuid(dan)))
                .await
                .unwrap()
                .is_some()
        );
    }
}

#[tokio::test]
async fn generated_api_key_admits_its_caller() {
    let output = Command::new(BIN)
        .args(["gen-api-key", "--name", "billing", "--scopes", "verify,admin"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    let key = lines.iter().find(|l| l.starts_with("idk_")).unwrap().to_string();
    let entry = lines.iter().find(|l| l.starts_with("billing:")).unwrap().to_string();
    assert!(entry.ends_with(":verify,admin"), "{entry}");
    assert!(!entry.contains(&key));

    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = command(&db.url)
        .arg("serve")
        .env("IDENTITY_LISTEN_ADDR", &addr)
        .env("IDENTITY_API_KEYS", &entry)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_serving(&addr).await);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = identity::pb::migration_service_client::MigrationServiceClient::with_interceptor(
        channel,
        crate::common::WithKey(Some(key)),
    );
    let result = client.get_auth_mode(identity::pb::GetAuthModeRequest {}).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(result.is_ok(), "{result:?}");

    let bad = Command::new(BIN)
        .args(["gen-api-key", "--name", "bad name"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[tokio::test]
async fn json_logs_carry_the_callers_trace_id() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = command(&db.url)
        .arg("serve")
        .env("IDENTITY_LISTEN_ADDR", &addr)
        .env("IDENTITY_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_serving(&addr).await);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = identity::pb::migration_service_client::MigrationServiceClient::new(channel);
    let mut request = tonic::Request::new(identity::pb::SetAuthModeRequest {
        mode: identity::pb::AuthMode::ClerkOnly as i32,
    });
    request.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    client.set_auth_mode(request).await.unwrap();
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let output = tokio::task::spawn_blocking(move || {
        child.wait().unwrap();
        let mut text = String::new();
        use std::io::Read;
        child.stdout.take().unwrap().read_to_string(&mut text).unwrap();
        text
    })
    .await
    .unwrap();
    let line = output
        .lines()
        .find(|l| l.contains("auth mode changed"))
        .unwrap_or_else(|| panic!("no log line for the change in:\n{output}"));
    let json: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    let spans = json["spans"].as_array().expect("span list");
    assert!(
        spans
            .iter()
            .any(|s| s["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"),
        "{line}"
    );
    assert!(
        output
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "every line is JSON"
    );
}

#[tokio::test]
async fn legacy_token_command_mints_a_verifiable_token() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let user = uuid::Uuid::new_v4().to_string();
    let output = command(&db.url)
        .args(["legacy-token", "--user", &user, "--ttl", "600"])
        .env("JWT_SECRET", "s3cret-for-test")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(b"s3cret-for-test"),
        &validation,
    )
    .unwrap();
    assert_eq!(data.claims["sub"], user.as_str());
    // LeafLock's shape: the user id in the configured claim, HS512.
    let output = command(&db.url)
        .args(["legacy-token", "--user", &user])
        .env("JWT_SECRET", "s3cret-for-test")
        .env("IDENTITY_LEGACY_JWT_USER_CLAIM", "user_id")
        .env("IDENTITY_LEGACY_JWT_ALGORITHM", "HS512")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS512);
    validation.set_required_spec_claims(&["exp"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(b"s3cret-for-test"),
        &validation,
    )
    .unwrap();
    assert_eq!(data.claims["user_id"], user.as_str());
    assert!(data.claims.get("sub").is_none(), "{:?}", data.claims);
    let refused = command(&db.url)
        .args(["legacy-token", "--user", &user])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "no secret, no token");
    let bad = command(&db.url)
        .args(["legacy-token", "--user", "x"])
        .env("JWT_SECRET", "s")
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_command_reports_drift_then_fixes_it() {
    use crate::common::fake_clerk::{FakeClerk, SECRET_KEY, fake_user};
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let Some(db) = TestDb::new(backend).await else { continue };
        let storage = db.storage().await;
        let dan = UserId::new_random();
        storage
            .insert_legacy_user(&identity::storage::NewLegacyUser {
                id: dan,
                email: Email::parse("email", "dan@example.com").unwrap(),
                password_hash: None,
            })
            .await
            .unwrap();
        let fake = FakeClerk::start(&["clerk_a"]).await;
        fake.state
            .directory
            .lock()
            .unwrap()
            .push(fake_user("user_dan", Some(&dan.to_string()), "dan@example.com"));
        let run = |fix: bool| {
            let mut cmd = command(&db.url);
            cmd.env("IDENTITY_CLERK_SECRET_KEY", SECRET_KEY)
                .env("IDENTITY_CLERK_ISSUER", fake.url())
                .env("IDENTITY_CLERK_API_URL", fake.url())
                .arg("reconcile");
            if fix {
                cmd.arg("--fix");
            }
            tokio::task::spawn_blocking(move || cmd.output().unwrap())
        };
        let dry = run(false).await.unwrap();
        let stdout = String::from_utf8_lossy(&dry.stdout);
        assert!(dry.status.success(), "{stdout}{}", String::from_utf8_lossy(&dry.stderr));
        assert!(
            stdout.contains("missing_mapping: 1 found, 0 fixed: user_dan"),
            "{stdout}"
        );
        assert!(stdout.contains("completed"), "{stdout}");
        assert!(
            storage
                .find_user(&UserKey::Id(dan))
                .await
                .unwrap()
                .unwrap()
                .clerk_user_id
                .is_none()
        );
        let fixed = run(true).await.unwrap();
        let stdout = String::from_utf8_lossy(&fixed.stdout);
        assert!(
            fixed.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&fixed.stderr)
        );
        assert!(
            stdout.contains("missing_mapping: 1 found, 1 fixed: user_dan"),
            "{stdout}"
        );
        let linked = storage.find_user(&UserKey::Id(dan)).await.unwrap().unwrap();
        assert_eq!(linked.clerk_user_id.as_deref(), Some("user_dan"));
    }
}
