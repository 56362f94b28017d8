//! Clerk's signing keys: a per-instance cache of the JWKS document, refreshed
//! in the background, refetched at most once per cooldown for an unknown
//! `kid` (single flight, with a negative cache), and served while the
//! endpoint is down until the keys are older than the maximum staleness.
//! A configured PEM key needs no network at all.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse},
};
use secrecy::{ExposeSecret, SecretString};

/// One verification key.
pub(crate) struct Key {
    pub decoding: DecodingKey,
    /// The algorithm the JWKS pins the key to, when it does.
    pub algorithm: Option<Algorithm>,
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<Key>>,
    fetched_at: Option<Instant>,
}

/// What a key look-up found.
pub(crate) enum KeyLookup {
    Found(Arc<Key>),
    /// No such key, even after a refetch (or within the cooldown).
    Unknown,
    /// No usable keys at all: never fetched, or older than the maximum staleness.
    Unavailable,
}

/// Fetch counters, for metrics and tests.
#[derive(Debug, Default)]
pub struct JwksStats {
    pub fetches_ok: AtomicU64,
    pub fetches_failed: AtomicU64,
}

pub(crate) struct RemoteJwks {
    url: url::Url,
    bearer: Option<SecretString>,
    http: reqwest::Client,
    current: RwLock<Arc<KeySet>>,
    fetch_lock: tokio::sync::Mutex<()>,
    last_attempt: Mutex<Option<Instant>>,
    unknown_kids: moka::sync::Cache<String, ()>,
    cooldown: Duration,
    max_staleness: Duration,
    pub refresh_every: Duration,
    pub stats: Arc<JwksStats>,
}

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("server answered {0}")]
    Status(reqwest::StatusCode),
    #[error("document larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("not a JWKS document: {0}")]
    Parse(String),
    #[error("no usable RSA signing keys in the document")]
    Empty,
}

impl FetchError {
    fn is_transient(&self) -> bool {
        match self {
            Self::Http(_) => true,
            Self::Status(status) => status.is_server_error() || *status == reqwest::StatusCode::TOO_MANY_REQUESTS,
            _ => false,
        }
    }
}

fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Arc<Key>>, FetchError> {
    let set: JwkSet = serde_json::from_slice(body).map_err(|e| FetchError::Parse(e.to_string()))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        if !matches!(jwk.algorithm, AlgorithmParameters::RSA(_)) {
            continue;
        }
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let Some(kid) = jwk.common.key_id.clone() else { continue };
        let algorithm = match jwk.common.key_algorithm {
            None => None,
            Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
            Some(KeyAlgorithm::RS384) => Some(Algorithm::RS384),
            Some(KeyAlgorithm::RS512) => Some(Algorithm::RS512),
            // A key pinned to anything else cannot verify an allowed token.
            Some(_) => continue,
        };
        let Ok(decoding) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        keys.insert(kid, Arc::new(Key { decoding, algorithm }));
    }
    if keys.is_empty() {
        return Err(FetchError::Empty);
    }
    Ok(keys)
}

impl RemoteJwks {
    pub fn new(
        url: url::Url,
        bearer: Option<SecretString>,
        http: reqwest::Client,
        refresh_every: Duration,
        cooldown: Duration,
        max_staleness: Duration,
    ) -> Self {
        Self {
            url,
            bearer,
            http,
            current: RwLock::new(Arc::new(KeySet::default())),
            fetch_lock: tokio::sync::Mutex::new(()),
            last_attempt: Mutex::new(None),
            unknown_kids: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(cooldown.max(Duration::from_secs(1)))
                .build(),
            cooldown,
            max_staleness,
            refresh_every,
            stats: Arc::new(JwksStats::default()),
        }
    }

    fn snapshot(&self) -> Arc<KeySet> {
        self.current
            .read()
            .map(|set| set.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    fn usable(&self, set: &KeySet) -> bool {
        set.fetched_at.is_some_and(|at| at.elapsed() <= self.max_staleness) && !set.keys.is_empty()
    }

    pub fn has_usable_keys(&self) -> bool {
        self.usable(&self.snapshot())
    }

    pub async fn key(&self, kid: &str) -> KeyLookup {
        let set = self.snapshot();
        if self.usable(&set) {
            if let Some(key) = set.keys.get(kid) {
                return KeyLookup::Found(key.clone());
            }
            if self.unknown_kids.contains_key(kid) {
                return KeyLookup::Unknown;
            }
        }
        self.refetch_once().await;
        let set = self.snapshot();
        if !self.usable(&set) {
            return KeyLookup::Unavailable;
        }
        match set.keys.get(kid) {
            Some(key) => KeyLookup::Found(key.clone()),
            None => {
                self.unknown_kids.insert(kid.to_owned(), ());
                KeyLookup::Unknown
            }
        }
    }

    /// Fetches unless another fetch just ran: one in flight at a time, and no
    /// more than one per cooldown window however many callers ask.
    async fn refetch_once(&self) {
        let _guard = self.fetch_lock.lock().await;
        {
            let mut last = self.last_attempt.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < self.cooldown) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.fetch_and_store().await;
    }

    /// The background refresh: fetches regardless of the cooldown.
    pub async fn refresh(&self) -> bool {
        let _guard = self.fetch_lock.lock().await;
        *self.last_attempt.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.fetch_and_store().await
    }

    async fn fetch_and_store(&self) -> bool {
        let attempt = || self.fetch();
        let result = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_times(2),
            )
            .when(FetchError::is_transient)
            .await;
        match result {
            Ok(keys) => {
                let count = keys.len();
                let set = Arc::new(KeySet {
                    keys,
                    fetched_at: Some(Instant::now()),
                });
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = set;
                // Kids that were unknown may exist now.
                self.unknown_kids.invalidate_all();
                self.stats.fetches_ok.fetch_add(1, Ordering::Relaxed);
                ::metrics::counter!("identity_jwks_fetches_total", "result" => "ok").increment(1);
                tracing::debug!(url = %self.url, keys = count, "fetched Clerk JWKS");
                true
            }
            Err(err) => {
                self.stats.fetches_failed.fetch_add(1, Ordering::Relaxed);
                ::metrics::counter!("identity_jwks_fetches_total", "result" => "failed").increment(1);
                tracing::warn!(url = %self.url, error = %err, "cannot fetch Clerk JWKS; keeping the last good keys");
                false
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<Key>>, FetchError> {
        let mut request = self.http.get(self.url.clone()).header("accept", "application/json");
        if let Some(secret) = &self.bearer {
            request = request.bearer_auth(secret.expose_secret());
        }
        let mut response = request.send().await?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body)
    }
}

/// Where the verifier gets keys.
pub(crate) enum KeyStore {
    Static(Arc<Key>),
    Remote(Arc<RemoteJwks>),
}

impl KeyStore {
    pub async fn key(&self, kid: Option<&str>) -> KeyLookup {
        match (self, kid) {
            (Self::Static(key), _) => KeyLookup::Found(key.clone()),
            (Self::Remote(remote), Some(kid)) => remote.key(kid).await,
            (Self::Remote(_), None) => KeyLookup::Unknown,
        }
    }

    pub fn has_usable_keys(&self) -> bool {
        match self {
            Self::Static(_) => true,
            Self::Remote(remote) => remote.has_usable_keys(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rsa_signing_keys_with_a_kid_are_kept() {
        let jwk =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/clerk_a.jwk.json")).unwrap();
        let doc = format!(
            r#"{{"keys":[{jwk},
            {{"kty":"EC","crv":"P-256","kid":"ec","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}},
            {{"kty":"oct","k":"c2VjcmV0","kid":"hmac"}}]}}"#
        );
        let keys = parse_jwks(doc.as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["ins_clerk_a"]);
        assert!(matches!(parse_jwks(br#"{"keys":[]}"#), Err(FetchError::Empty)));
        assert!(matches!(parse_jwks(b"<html>"), Err(FetchError::Parse(_))));
    }
}
