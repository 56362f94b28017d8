//! What the fuzz targets in `fuzz/` drive: the token entry point with a real
//! verifier, and parsers of outside input that the service keeps private.
//! Not an API: it may change at any time.

use std::{sync::Arc, time::Duration};

use jsonwebtoken::{Algorithm, EncodingKey};

use crate::{
    config::Config,
    domain::{AuthMode, AuthModes, Caller, Email, Scope, UserCache, UserId},
    metrics::AuthRecorder,
    storage::{self, DatabaseOptions, NewLegacyUser},
    verification::{Verdict, Verifier},
};

/// The legacy secret of the fuzzing verifier.
pub const LEGACY_SECRET: &str = "fuzzing-legacy-secret";
/// The Clerk issuer of the fuzzing verifier.
pub const CLERK_ISSUER: &str = "https://fuzzing.clerk.accounts.dev";
/// The legacy user the fuzzing database holds.
pub const KNOWN_USER: &str = "00000000-0000-0000-0000-000000000001";
const CLERK_PUBLIC_KEY: &str = include_str!("../tests/fixtures/clerk_a.pub.pem");

/// A verifier as the server builds it (legacy HS256 and Clerk with a fixed
/// key, `dual` mode, a SQLite database in the temporary folder), driven one
/// token at a time.
pub struct TokenHarness {
    runtime: tokio::runtime::Runtime,
    verifier: Verifier,
    caller: Caller,
    database: std::path::PathBuf,
}

impl Drop for TokenHarness {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.database.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

impl TokenHarness {
    /// Fails only when the harness itself cannot be set up (never an input's fault).
    pub fn new() -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("a runtime: {e}"))?;
        let path = std::env::temp_dir().join(format!("identity-fuzz-{}.db", uuid::Uuid::new_v4().simple()));
        let url = format!("sqlite://{}", path.display());
        let storage = runtime
            .block_on(storage::connect(&url, &DatabaseOptions::default(), true))
            .map_err(|e| format!("the fuzzing database: {e}"))?;
        let config = Config::from_vars(
            [
                ("IDENTITY_LEGACY_JWT_SECRET", LEGACY_SECRET),
                ("IDENTITY_CLERK_ISSUER", CLERK_ISSUER),
                ("IDENTITY_CLERK_JWT_KEY", CLERK_PUBLIC_KEY),
                ("IDENTITY_UNMAPPED_CLERK_USER", "reject"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .map_err(|e| format!("the fuzzing configuration: {e}"))?
        .verification;
        // A known user, so that well-formed tokens reach the accepting path.
        let _ = runtime.block_on(storage.insert_legacy_user(&NewLegacyUser {
            id: UserId::parse("user", KNOWN_USER).map_err(|e| e.to_string())?,
            email: Email::parse("email", "fuzz@example.com").map_err(|e| e.to_string())?,
            password_hash: None,
        }));
        let users = UserCache::new(storage.clone(), Duration::from_secs(3600));
        let verifier = Verifier::new(
            &config,
            AuthModes::starting_with(storage, AuthMode::Dual),
            users,
            reqwest::Client::new(),
            Arc::new(AuthRecorder::default()),
        )
        .map_err(|e| format!("the fuzzing verifier: {e}"))?;
        Ok(Self {
            runtime,
            verifier,
            caller: Caller::new("fuzz", vec![Scope::Verify]),
            database: path,
        })
    }

    /// `VerifyToken` on `token`; true when it was accepted.
    pub fn verify(&self, token: &str) -> bool {
        matches!(
            self.runtime.block_on(self.verifier.verify(&self.caller, token, None)),
            Ok(Verdict::Accepted(_))
        )
    }

    /// A token with this header and these claims (any bytes), signed
    /// HS256 with the legacy secret, so the claims are read.
    pub fn signed(header: &[u8], claims: &[u8]) -> String {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let message = format!("{}.{}", engine.encode(header), engine.encode(claims));
        let key = EncodingKey::from_secret(LEGACY_SECRET.as_bytes());
        match jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256) {
            Ok(signature) => format!("{message}.{signature}"),
            Err(_) => message,
        }
    }
}

/// Parses a JWKS document as a fetch from Clerk would; true when usable keys came out.
pub fn parse_jwks(body: &[u8]) -> bool {
    crate::verification::jwks::parses(body)
}

/// The API key of an `authorization` value.
pub use crate::grpc::auth::bearer_key;

/// Reads a Clerk webhook body as the endpoint does (after its signature checked).
pub fn parse_webhook(body: &[u8]) -> bool {
    crate::webhooks::parse_event(body).is_ok()
}
