//! Test harness: the real service on 127.0.0.1:0 with a fresh SQLite file,
//! one API key per scope, legacy tokens, and a count of VerifyToken calls.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use identity::{
    config::Config,
    domain::{ApiKeyRegistry, Email, Scope, UserId, generate_api_key},
    server::{self, RunningServer},
    storage::{self, NewLegacyUser, Storage},
};
use identity_client::IdentityClient;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{Mutex, MutexGuard},
};

pub const LEGACY_SECRET: &str = "legacy-test-secret-0123456789abcdef";
pub const CLERK_ISSUER: &str = "https://client-tests.clerk.accounts.dev";

/// A key of the service's test fixtures.
fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/../../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The service's Prometheus figures are process-wide, so tests that count
/// calls must not overlap with tests that make them: every test holds this.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// The running service with its database and keys.
pub struct TestApp {
    pub url: String,
    pub storage: Arc<dyn Storage>,
    pub admin_key: String,
    pub verify_key: String,
    metrics_addr: Option<SocketAddr>,
    server: Option<RunningServer>,
    _dir: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        let serial = SERIAL.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let db_url = format!("sqlite://{}", dir.path().join("identity.db").display());
        let (admin_key, admin_line) = generate_api_key("admin", &Scope::ALL);
        let (verify_key, verify_line) = generate_api_key("verifier", &[Scope::Verify]);
        let mut config = Config::for_development(&db_url);
        config.api_keys = ApiKeyRegistry::parse(&format!("{admin_line};{verify_line}")).unwrap();
        config.shutdown_grace = Duration::from_secs(1);
        config.settings_refresh = Duration::from_secs(1);
        config.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        // Legacy HS256 tokens, and Clerk session tokens checked against a
        // fixed PEM key (networkless: no fake Clerk needed for linked users).
        config.verification = Config::from_vars(
            [
                ("IDENTITY_LEGACY_JWT_SECRET", LEGACY_SECRET),
                ("IDENTITY_CLERK_ISSUER", CLERK_ISSUER),
                ("IDENTITY_CLERK_JWT_KEY", &fixture("clerk_a.pub.pem")),
                ("IDENTITY_UNMAPPED_CLERK_USER", "reject"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .unwrap()
        .verification;
        let storage = storage::connect(&db_url, &config.database, true).await.unwrap();
        let server = server::start_with_storage(config, storage.clone()).await.unwrap();
        Self {
            url: format!("http://{}", server.addr),
            storage,
            admin_key,
            verify_key,
            metrics_addr: server.metrics_addr,
            server: Some(server),
            _dir: dir,
            _serial: serial,
        }
    }

    /// A client with `key`, default settings, no cache.
    pub async fn client(&self, key: &str) -> IdentityClient {
        IdentityClient::connect(self.url.clone(), key).await.unwrap()
    }

    /// A legacy user in the service's directory.
    pub async fn legacy_user(&self, email: &str) -> UserId {
        let id = UserId::new_random();
        self.storage
            .insert_legacy_user(&NewLegacyUser {
                id,
                email: Email::parse("email", email).unwrap(),
                password_hash: Some("$2b$12$abcdefghijklmnopqrstuu8pHn2n9FcsZ8Sx0I2mO5Ww8R0o5y5yK".to_owned()),
            })
            .await
            .unwrap();
        id
    }

    /// How many VerifyToken calls the service has answered (all codes).
    pub async fn verify_calls(&self) -> u64 {
        let addr = self.metrics_addr.expect("metrics served");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body.lines()
            .filter(|l| l.starts_with("identity_grpc_requests_total{") && l.contains("method=\"VerifyToken\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Stops the service; calls to it fail from now on.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn legacy(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(LEGACY_SECRET.as_bytes()),
    )
    .unwrap()
}

/// A Clerk session token for Clerk user `sub`, valid for a minute.
pub fn clerk_for(sub: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("ins_test".to_owned());
    let claims = json!({
        "sub": sub, "sid": "sess_2abc", "iss": CLERK_ISSUER, "azp": "https://app.example.com",
        "exp": now() + 60, "nbf": now() - 5, "iat": now(),
        "jti": uuid::Uuid::new_v4().simple().to_string(), "v": 2, "sts": "active",
    });
    encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(fixture("clerk_a.key.pem").as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A legacy token for `user`, valid for `secs` seconds.
pub fn legacy_for(user: &UserId, secs: i64) -> String {
    legacy(
        json!({ "sub": user.to_string(), "exp": now() + secs, "iat": now(), "jti": uuid::Uuid::new_v4().to_string() }),
    )
}
