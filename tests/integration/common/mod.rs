//! Test harness: a fresh database per test (a SQLite file or a PostgreSQL
//! database), the real server on 127.0.0.1:0, tonic clients, a fake Clerk
//! and token minting.

pub mod binary;
pub mod browser;
pub mod fake_clerk;
pub mod fake_smtp;
pub mod gateway;
pub mod tcp_proxy;
pub mod tokens;

use std::{sync::Arc, time::Duration};

use identity::{
    config::{ClerkConfig, ClerkKeySource, Config, LegacyJwtConfig, UnmappedPolicy, VerificationConfig},
    domain::{ApiKeyRegistry, BulkConfig, Email, Scope, UserId, generate_api_key},
    pb::{identity_service_client::IdentityServiceClient, migration_service_client::MigrationServiceClient},
    server::{self, RunningServer},
    storage::{self, DatabaseOptions, NewLegacyUser, Storage},
};
use secrecy::SecretString;
use sqlx::Connection;
use tokio::sync::OnceCell;
use tokio_stream::StreamExt;
use tonic::{
    Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

/// Where the PostgreSQL suites connect; any database the user may create databases from.
pub fn postgres_admin_url() -> String {
    std::env::var("IDENTITY_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

static PG_READY: OnceCell<bool> = OnceCell::const_new();

/// Whether PostgreSQL is reachable; under CI an unreachable server fails the test.
/// The first call also drops databases left by earlier runs.
async fn postgres_ready() -> bool {
    *PG_READY
        .get_or_init(|| async {
            let url = postgres_admin_url();
            let attempt = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&url)).await;
            match attempt {
                Ok(Ok(mut conn)) => {
                    let names: Vec<String> =
                        sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE 'identity_t_%'")
                            .fetch_all(&mut conn)
                            .await
                            .unwrap_or_default();
                    // Only databases of runs over an hour old: another
                    // suite may be running on the same server right now.
                    let now = chrono::Utc::now().timestamp();
                    let stale = names.into_iter().filter(|name| {
                        name.strip_prefix("identity_t_")
                            .and_then(|rest| rest.split('_').next())
                            .and_then(|secs| secs.parse::<i64>().ok())
                            .is_some_and(|created| now - created > 3600)
                    });
                    for name in stale {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                        )))
                        .execute(&mut conn)
                        .await;
                    }
                    true
                }
                Ok(Err(err)) => unreachable_postgres(&err.to_string()),
                Err(_) => unreachable_postgres("timed out"),
            }
        })
        .await
}

fn unreachable_postgres(reason: &str) -> bool {
    if under_ci() {
        panic!(
            "PostgreSQL at {} is unreachable under CI: {reason}",
            postgres_admin_url()
        );
    }
    eprintln!(
        "skipping PostgreSQL test: {} unreachable ({reason}); set CI=true to make this fail",
        postgres_admin_url()
    );
    false
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// What the database holds before the service first starts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Nothing: legacy users come from `import-users` into the service's directory.
    Empty,
    /// The seed application's `users(id, email, password_hash, failed_attempts,
    /// created_at, updated_at)` and the Go implementation's own tables;
    /// legacy users are rows the application wrote.
    Seed,
}

impl Layout {
    /// `IDENTITY_TEST_LAYOUT` (`empty` or `seed`) for every suite; by
    /// default SQLite starts empty and PostgreSQL holds the seed's application.
    fn for_backend(backend: Backend) -> Self {
        match std::env::var("IDENTITY_TEST_LAYOUT").as_deref() {
            Ok("empty") => Self::Empty,
            Ok("seed") => Self::Seed,
            Ok(other) => panic!("IDENTITY_TEST_LAYOUT={other}: expected empty or seed"),
            Err(_) => match backend {
                Backend::Sqlite => Self::Empty,
                Backend::Postgres => Self::Seed,
            },
        }
    }
}

/// The seed application's tables, as its Go implementation creates them.
pub const SEED_POSTGRES: &str = "
    CREATE TABLE users (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        email VARCHAR(255) NOT NULL UNIQUE,
        password_hash VARCHAR(255) NOT NULL,
        failed_attempts INTEGER NOT NULL DEFAULT 0,
        created_at TIMESTAMP NOT NULL DEFAULT NOW(),
        updated_at TIMESTAMP NOT NULL DEFAULT NOW()
    );
    CREATE TABLE user_clerk_mappings (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        clerk_user_id TEXT NOT NULL UNIQUE,
        created_at TIMESTAMP NOT NULL DEFAULT NOW(),
        updated_at TIMESTAMP NOT NULL DEFAULT NOW()
    );
    CREATE TABLE user_migration_tokens (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        user_id UUID NOT NULL REFERENCES users(id),
        token TEXT NOT NULL,
        expires_at TIMESTAMP NOT NULL,
        created_at TIMESTAMP NOT NULL DEFAULT NOW()
    );
    CREATE TABLE jwt_blacklist (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        jti TEXT UNIQUE,
        user_id UUID,
        expires_at TIMESTAMP NOT NULL,
        created_at TIMESTAMP NOT NULL DEFAULT NOW()
    );";

/// The seed's `users` in SQLite, timestamps as `datetime('now')` writes them.
pub const SEED_SQLITE: &str = "
    CREATE TABLE users (
        id TEXT PRIMARY KEY NOT NULL,
        email TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        failed_attempts INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL DEFAULT (datetime('now')),
        updated_at TEXT NOT NULL DEFAULT (datetime('now'))
    );";

/// A fresh database for one test, laid out as [`Layout`] says.
#[derive(Debug)]
pub struct TestDb {
    pub backend: Backend,
    pub layout: Layout,
    pub url: String,
    /// Keeps the SQLite file alive.
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Option<Self> {
        let db = Self::bare(backend).await?;
        if db.layout == Layout::Seed {
            exec(
                &db,
                match backend {
                    Backend::Sqlite => SEED_SQLITE,
                    Backend::Postgres => SEED_POSTGRES,
                },
            )
            .await;
        }
        Some(db)
    }

    /// A database with nothing in it, whatever the layout.
    pub async fn bare(backend: Backend) -> Option<Self> {
        let layout = Layout::for_backend(backend);
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("identity.db").display());
                Some(Self {
                    backend,
                    layout,
                    url,
                    _dir: Some(dir),
                })
            }
            Backend::Postgres => {
                if !postgres_ready().await {
                    return None;
                }
                let admin = postgres_admin_url();
                let name = format!(
                    "identity_t_{}_{}",
                    chrono::Utc::now().timestamp(),
                    uuid::Uuid::new_v4().simple()
                );
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("connect to PostgreSQL");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let mut url = url::Url::parse(&admin).expect("admin URL");
                url.set_path(&name);
                Some(Self {
                    backend,
                    layout,
                    url: url.to_string(),
                    _dir: None,
                })
            }
        }
    }

    /// The same database for a second server; the first `TestDb` keeps it alive.
    pub fn share(&self) -> Self {
        Self {
            backend: self.backend,
            layout: self.layout,
            url: self.url.clone(),
            _dir: None,
        }
    }

    /// Opens the database with migrations applied.
    pub async fn storage(&self) -> Arc<dyn Storage> {
        storage::connect(&self.url, &DatabaseOptions::default(), true)
            .await
            .expect("open test database")
    }

    /// Drops the PostgreSQL database, forcing its connections closed (an outage).
    pub async fn drop_postgres(&self) {
        let name = url::Url::parse(&self.url)
            .unwrap()
            .path()
            .trim_start_matches('/')
            .to_owned();
        let mut conn = sqlx::PgConnection::connect(&postgres_admin_url()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE \"{name}\" WITH (FORCE)")))
            .execute(&mut conn)
            .await
            .unwrap();
    }
}

/// Runs each named `async fn(TestDb)` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::init_logs();
                    let db = $crate::common::TestDb::new($crate::common::Backend::Sqlite).await.unwrap();
                    super::$name(db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::init_logs();
                    if let Some(db) = $crate::common::TestDb::new($crate::common::Backend::Postgres).await {
                        super::$name(db).await;
                    }
                }
            )*
        }
    };
}

/// Logs stay silent unless `TEST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        identity::telemetry::init_logging(identity::config::LogFormat::Text, "identity=debug,info");
    }
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Debug, Clone)]
pub struct WithKey(pub Option<String>);

impl Interceptor for WithKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(key) = &self.0 {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {key}")
                    .parse()
                    .map_err(|_| Status::internal("bad key"))?,
            );
        }
        Ok(request)
    }
}

pub type IdentityClient = IdentityServiceClient<InterceptedService<Channel, WithKey>>;
pub type MigrationClient = MigrationServiceClient<InterceptedService<Channel, WithKey>>;

/// The running server with its database and one key per scope.
pub struct TestApp {
    pub db: TestDb,
    pub storage: Arc<dyn Storage>,
    pub channel: Channel,
    /// Where the server serves `/metrics`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub admin_key: String,
    pub verify_key: String,
    pub migrate_key: String,
    server: Option<RunningServer>,
}

pub fn test_config(db: &TestDb) -> (Config, [String; 3]) {
    let (admin_key, admin_line) = generate_api_key("admin", &Scope::ALL);
    let (verify_key, verify_line) = generate_api_key("verifier", &[Scope::Verify]);
    let (migrate_key, migrate_line) = generate_api_key("migrator", &[Scope::Migrate]);
    let mut config = Config::for_development(&db.url);
    config.database_url = SecretString::from(db.url.clone());
    config.api_keys = ApiKeyRegistry::parse(&format!("{admin_line};{verify_line};{migrate_line}")).unwrap();
    config.health_interval = Duration::from_secs(1);
    config.settings_refresh = Duration::from_secs(1);
    config.shutdown_grace = Duration::from_secs(5);
    config.stats_flush = Duration::from_secs(1);
    config.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    (config, [admin_key, verify_key, migrate_key])
}

impl TestApp {
    pub async fn spawn(db: TestDb) -> Self {
        let (config, keys) = test_config(&db);
        Self::spawn_with(db, config, keys).await
    }

    pub async fn spawn_with(db: TestDb, config: Config, keys: [String; 3]) -> Self {
        let url = db.url.clone();
        Self::spawn_connecting(db, config, keys, &url).await
    }

    /// A server that reaches its database through `url` (a proxy, say).
    pub async fn spawn_connecting(
        db: TestDb,
        config: Config,
        [admin_key, verify_key, migrate_key]: [String; 3],
        url: &str,
    ) -> Self {
        let storage = storage::connect(url, &config.database, true)
            .await
            .expect("open test database");
        let server = server::start_with_storage(config, storage.clone())
            .await
            .expect("server starts");
        let addr = server.addr;
        let metrics_addr = server.metrics_addr;
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        Self {
            db,
            storage,
            channel,
            metrics_addr,
            admin_key,
            verify_key,
            migrate_key,
            server: Some(server),
        }
    }

    pub fn identity(&self, key: &str) -> IdentityClient {
        IdentityServiceClient::with_interceptor(self.channel.clone(), WithKey(Some(key.to_owned())))
    }

    pub fn migration(&self, key: &str) -> MigrationClient {
        MigrationServiceClient::with_interceptor(self.channel.clone(), WithKey(Some(key.to_owned())))
    }

    pub fn admin(&self) -> MigrationClient {
        self.migration(&self.admin_key)
    }

    /// Adds a legacy user and returns its id: a row the application writes
    /// into its own table (seed layout), or an import into the service's
    /// directory (empty layout).
    pub async fn legacy_user(&self, email: &str) -> UserId {
        let id = UserId::new_random();
        let hash = "$2b$12$abcdefghijklmnopqrstuu8pHn2n9FcsZ8Sx0I2mO5Ww8R0o5y5yK";
        match self.db.layout {
            Layout::Empty => self
                .storage
                .insert_legacy_user(&NewLegacyUser {
                    id,
                    email: Email::parse("email", email).unwrap(),
                    password_hash: Some(hash.to_owned()),
                })
                .await
                .unwrap(),
            Layout::Seed => {
                exec(
                    &self.db,
                    &format!("INSERT INTO users (id, email, password_hash) VALUES ('{id}', '{email}', '{hash}')"),
                )
                .await
            }
        }
        id
    }

    /// Where the server listens.
    pub fn server_addr(&self) -> std::net::SocketAddr {
        self.server.as_ref().expect("the server runs").addr
    }

    /// Stops the server; the database lives on in the returned `TestDb`.
    pub async fn shutdown(mut self) -> TestDb {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        self.db
    }
}

/// How long a job's lease lasts in the tests that run jobs (bulk jobs,
/// reconciliation passes): short, so that a job whose server died can be
/// taken over within the test.
pub const JOB_LEASE: Duration = Duration::from_secs(2);

/// A server that runs jobs against `fake` Clerk, at a fast pace and with
/// a [`JOB_LEASE`].
pub async fn spawn_for_jobs(db: TestDb, fake: &fake_clerk::FakeClerk) -> TestApp {
    let (mut config, keys) = test_config(&db);
    config.verification = VerificationConfig {
        clerk: Some(clerk_config(fake)),
        ..VerificationConfig::default()
    };
    config.bulk = BulkConfig {
        default_rate: 1000.0,
        max_rate: 10_000.0,
        lease: JOB_LEASE,
    };
    TestApp::spawn_with(db, config, keys).await
}

/// Stops the server as a crash would (its runners stop where they are) and
/// waits until the leases of its jobs have lapsed.
pub async fn crash_and_wait_out_leases(app: TestApp) -> TestDb {
    let db = app.shutdown().await;
    tokio::time::sleep(JOB_LEASE + Duration::from_millis(500)).await;
    db
}

/// The last snapshot a job streams (a bulk job or a reconciliation pass).
pub async fn run_to_end<T>(stream: &mut tonic::Streaming<T>) -> T {
    let mut last = None;
    while let Some(progress) = tokio::time::timeout(Duration::from_secs(120), stream.next())
        .await
        .expect("progress")
    {
        last = Some(progress.unwrap());
    }
    last.expect("at least one snapshot")
}

/// The field named by a status's google.rpc.BadRequest details.
pub fn bad_request_fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|br| br.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Asserts INVALID_ARGUMENT naming `field`.
pub fn assert_invalid(status: &Status, field: &str) {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(bad_request_fields(status), vec![field.to_owned()], "{status:?}");
}

/// The legacy verifier as the tests configure it.
pub fn legacy_config() -> LegacyJwtConfig {
    LegacyJwtConfig {
        secret: SecretString::from(tokens::LEGACY_SECRET.to_owned()),
        algorithm: jsonwebtoken::Algorithm::HS256,
        issuer: None,
        audience: None,
        user_claim: "sub".to_owned(),
    }
}

/// Clerk against the fake: issuer = the fake's URL, keys from its Frontend API JWKS.
pub fn clerk_config(fake: &fake_clerk::FakeClerk) -> ClerkConfig {
    ClerkConfig {
        issuer: fake.url(),
        keys: ClerkKeySource::Jwks {
            url: url::Url::parse(&format!("{}/.well-known/jwks.json", fake.url())).unwrap(),
            bearer: None,
        },
        api_url: url::Url::parse(&fake.url()).unwrap(),
        secret_key: Some(SecretString::from(fake_clerk::SECRET_KEY.to_owned())),
        authorized_parties: Vec::new(),
        leeway_seconds: 5,
        jwks_refresh: Duration::from_secs(300),
        jwks_cooldown: Duration::from_secs(30),
        jwks_max_staleness: Duration::from_secs(86_400),
        unmapped_policy: UnmappedPolicy::Provision,
    }
}

impl TestApp {
    /// A server with the given verification settings.
    pub async fn spawn_verifying(db: TestDb, verification: VerificationConfig) -> Self {
        let (mut config, keys) = test_config(&db);
        config.verification = verification;
        Self::spawn_with(db, config, keys).await
    }

    /// VerifyToken with the verify key.
    pub async fn verify(&self, token: &str) -> identity::pb::verify_token_response::Result {
        self.verify_for(token, "").await
    }

    pub async fn verify_for(&self, token: &str, audience: &str) -> identity::pb::verify_token_response::Result {
        self.identity(&self.verify_key)
            .verify_token(identity::pb::VerifyTokenRequest {
                token: token.to_owned(),
                expected_audience: audience.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap()
    }
}

/// The principal of an accepted token, or a panic naming the rejection.
pub fn accepted(result: identity::pb::verify_token_response::Result) -> identity::pb::Principal {
    match result {
        identity::pb::verify_token_response::Result::Principal(p) => p,
        identity::pb::verify_token_response::Result::Rejection(r) => panic!("rejected: {:?} {}", r.reason(), r.message),
    }
}

/// The reason of a rejected token, or a panic when it was accepted.
pub fn rejected(result: identity::pb::verify_token_response::Result) -> identity::pb::RejectionReason {
    match result {
        identity::pb::verify_token_response::Result::Rejection(r) => r.reason(),
        identity::pb::verify_token_response::Result::Principal(p) => panic!("accepted: {p:?}"),
    }
}

/// A direct connection to the test's SQLite file, created when missing.
async fn sqlite_conn(db: &TestDb) -> sqlx::SqliteConnection {
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(&db.url)
        .unwrap()
        .create_if_missing(true);
    sqlx::SqliteConnection::connect_with(&options).await.unwrap()
}

/// Runs a SQL statement against the test database directly (test set-up and inspection).
pub async fn exec(db: &TestDb, sql: &str) {
    match db.backend {
        Backend::Sqlite => {
            let mut conn = sqlite_conn(db).await;
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&mut conn)
                .await
                .unwrap();
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
}

/// The first column of every row, as text.
pub async fn strings(db: &TestDb, sql: &str) -> Vec<Option<String>> {
    match db.backend {
        Backend::Sqlite => {
            let mut conn = sqlite_conn(db).await;
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_all(&mut conn)
                .await
                .unwrap()
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_all(&mut conn)
                .await
                .unwrap()
        }
    }
}
