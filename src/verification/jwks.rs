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

use aws_lc_rs::signature::{self, ParsedPublicKey, RsaParameters, RsaPublicKeyComponents};
use backon::{ExponentialBuilder, Retryable};
use jsonwebtoken::{
    Algorithm, DecodingKey, DecodingKeyKind,
    jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse},
};
use secrecy::{ExposeSecret, SecretString};

/// One verification key, parsed for aws-lc-rs once per algorithm when it is
/// made: parsing an RSA key (and its Montgomery set-up) on every check, as
/// `jsonwebtoken::crypto::verify` does, costs about 2 µs of a 14 µs RS256 check.
pub(crate) struct Key {
    /// The algorithm the JWKS pins the key to, when it does.
    pub algorithm: Option<Algorithm>,
    /// RS256, RS384 and RS512, in that order; `None` where aws-lc-rs cannot
    /// use the key (then no signature verifies with it).
    prepared: [Option<ParsedPublicKey>; 3],
}

impl Key {
    /// `None` when aws-lc-rs cannot use the key for any of the three.
    pub fn new(decoding: &DecodingKey, algorithm: Option<Algorithm>) -> Option<Self> {
        let prepare = |params: &'static RsaParameters| match decoding.kind() {
            DecodingKeyKind::SecretOrDer(der) => ParsedPublicKey::new(params, der).ok(),
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                RsaPublicKeyComponents { n, e }.to_parsed_public_key(params).ok()
            }
        };
        let prepared = [
            prepare(&signature::RSA_PKCS1_2048_8192_SHA256),
            prepare(&signature::RSA_PKCS1_2048_8192_SHA384),
            prepare(&signature::RSA_PKCS1_2048_8192_SHA512),
        ];
        prepared
            .iter()
            .any(Option::is_some)
            .then_some(Self { algorithm, prepared })
    }

    /// Whether `signature` (raw bytes) signs `message` with this key under
    /// `algorithm` (RS256, RS384 or RS512; anything else never verifies).
    pub fn verifies(&self, algorithm: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        let slot = match algorithm {
            Algorithm::RS256 => 0,
            Algorithm::RS384 => 1,
            Algorithm::RS512 => 2,
            _ => return false,
        };
        self.prepared[slot]
            .as_ref()
            .is_some_and(|key| key.verify_sig(message, signature).is_ok())
    }
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
    /// Held while fetching.
    fetch_lock: tokio::sync::Mutex<()>,
    /// Fetches that ended: a caller that waited on one uses its result
    /// instead of fetching again, however slow the fetch was.
    fetches_ended: AtomicU64,
    last_attempt: Mutex<Option<Instant>>,
    unknown_kids: moka::sync::Cache<String, ()>,
    cooldown: Duration,
    max_staleness: Duration,
    pub refresh_every: Duration,
    pub stats: Arc<JwksStats>,
}

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Longest `kid` looked up. Clerk's are about 30 bytes; a longer one in a
/// token is answered "unknown key" at once: never fetched for, never cached.
/// Keys in the JWKS with a longer `kid` are skipped, so none is lost.
const MAX_KID_LEN: usize = 256;

/// Bytes the negative cache of unknown kids may hold, counting each entry's
/// kid and a fixed overhead: kids come from callers before any signature
/// check, so the bound is in bytes, not entries.
const UNKNOWN_KIDS_MAX_BYTES: u64 = 1024 * 1024;

/// What one cached kid costs beyond its bytes (the `String`, moka's entry).
const UNKNOWN_KID_OVERHEAD: u32 = 64;

fn unknown_kid_weight(kid: &str) -> u32 {
    u32::try_from(kid.len())
        .unwrap_or(u32::MAX)
        .saturating_add(UNKNOWN_KID_OVERHEAD)
}

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

/// Whether a document yields usable keys (for the fuzz target).
pub(crate) fn parses(body: &[u8]) -> bool {
    parse_jwks(body).is_ok()
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
        let Some(kid) = jwk.common.key_id.clone().filter(|kid| kid.len() <= MAX_KID_LEN) else {
            continue;
        };
        let algorithm = match jwk.common.key_algorithm {
            None => None,
            Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
            Some(KeyAlgorithm::RS384) => Some(Algorithm::RS384),
            Some(KeyAlgorithm::RS512) => Some(Algorithm::RS512),
            // A key pinned to anything else cannot verify an allowed token.
            Some(_) => continue,
        };
        let Some(key) = DecodingKey::from_jwk(jwk).ok().and_then(|d| Key::new(&d, algorithm)) else {
            continue;
        };
        keys.insert(kid, Arc::new(key));
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
            fetches_ended: AtomicU64::new(0),
            last_attempt: Mutex::new(None),
            unknown_kids: moka::sync::Cache::builder()
                .weigher(|kid: &String, _: &()| unknown_kid_weight(kid))
                .max_capacity(UNKNOWN_KIDS_MAX_BYTES)
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

    /// Time since the keys in use were fetched; `None` before the first fetch succeeded.
    pub fn key_age(&self) -> Option<Duration> {
        self.snapshot().fetched_at.map(|at| at.elapsed())
    }

    pub async fn key(&self, kid: &str) -> KeyLookup {
        if kid.len() > MAX_KID_LEN {
            // No key of ours has such a kid; answering costs no fetch and no memory.
            return if self.has_usable_keys() {
                KeyLookup::Unknown
            } else {
                KeyLookup::Unavailable
            };
        }
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
        let seen = self.fetches_ended.load(Ordering::Acquire);
        let _guard = self.fetch_lock.lock().await;
        if self.fetches_ended.load(Ordering::Acquire) != seen {
            // A fetch ended while this caller waited: its keys are current.
            return;
        }
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
        let stored = self.fetch_and_store_once().await;
        self.fetches_ended.fetch_add(1, Ordering::Release);
        stored
    }

    async fn fetch_and_store_once(&self) -> bool {
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
        let jwk = fixture("clerk_a.jwk.json");
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

    /// A JWKS client holding one good key, fetched just now, that will not
    /// fetch again within the test (the cooldown is an hour).
    fn jwks_with_fresh_keys() -> RemoteJwks {
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_str(&fixture("clerk_a.jwk.json")).unwrap();
        let key = Key::new(&DecodingKey::from_jwk(&jwk).unwrap(), None).unwrap();
        let remote = RemoteJwks::new(
            url::Url::parse("http://127.0.0.1:9/jwks.json").unwrap(),
            None,
            reqwest::Client::new(),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );
        *remote.current.write().unwrap() = Arc::new(KeySet {
            keys: HashMap::from([("ins_clerk_a".to_owned(), Arc::new(key))]),
            fetched_at: Some(Instant::now()),
        });
        *remote.last_attempt.lock().unwrap() = Some(Instant::now());
        remote
    }

    fn unknown_kid_bytes(remote: &RemoteJwks) -> usize {
        remote.unknown_kids.run_pending_tasks();
        remote.unknown_kids.iter().map(|(kid, ())| kid.len()).sum()
    }

    #[tokio::test]
    async fn a_flood_of_huge_distinct_kids_stays_within_the_byte_bound() {
        let remote = jwks_with_fresh_keys();
        // Over-long kids (a 6 KB header is easy to send) are never held.
        for n in 0..2_000 {
            let kid = format!("{n:06}{}", "k".repeat(6_000));
            assert!(matches!(remote.key(&kid).await, KeyLookup::Unknown));
        }
        assert_eq!(unknown_kid_bytes(&remote), 0, "over-long kids are not cached");
        // Kids of the longest accepted length, far more than fit.
        for n in 0..20_000 {
            let kid = format!("{n:06}{}", "k".repeat(MAX_KID_LEN - 6));
            assert!(matches!(remote.key(&kid).await, KeyLookup::Unknown));
        }
        let held = unknown_kid_bytes(&remote);
        assert!(held > 0, "unknown kids are still remembered");
        assert!(
            held as u64 <= UNKNOWN_KIDS_MAX_BYTES,
            "{held} bytes of kids held, bound {UNKNOWN_KIDS_MAX_BYTES}"
        );
        assert!(remote.unknown_kids.weighted_size() <= UNKNOWN_KIDS_MAX_BYTES);
        assert!(matches!(remote.key("ins_clerk_a").await, KeyLookup::Found(_)));
        assert_eq!(remote.stats.fetches_ok.load(Ordering::Relaxed), 0, "no fetch storm");
        assert_eq!(remote.stats.fetches_failed.load(Ordering::Relaxed), 0, "no fetch storm");
    }

    #[test]
    fn keys_with_over_long_kids_are_skipped() {
        let jwk: serde_json::Value = serde_json::from_str(&fixture("clerk_a.jwk.json")).unwrap();
        let mut long = jwk.clone();
        long["kid"] = serde_json::Value::String("k".repeat(MAX_KID_LEN + 1));
        let doc = serde_json::json!({ "keys": [jwk, long] }).to_string();
        assert_eq!(parse_jwks(doc.as_bytes()).unwrap().len(), 1);
    }

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn prepared_keys_verify_each_rsa_algorithm_and_nothing_else() {
        use base64::Engine;
        let signing = jsonwebtoken::EncodingKey::from_rsa_pem(fixture("clerk_a.key.pem").as_bytes()).unwrap();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_str(&fixture("clerk_a.jwk.json")).unwrap();
        let from_pem = Key::new(
            &DecodingKey::from_rsa_pem(fixture("clerk_a.pub.pem").as_bytes()).unwrap(),
            None,
        );
        let from_jwk = Key::new(&DecodingKey::from_jwk(&jwk).unwrap(), None);
        let other = Key::new(
            &DecodingKey::from_rsa_pem(fixture("other.pub.pem").as_bytes()).unwrap(),
            None,
        )
        .unwrap();
        let message = b"header.payload";
        for key in [from_pem.unwrap(), from_jwk.unwrap()] {
            for algorithm in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512] {
                let signature = jsonwebtoken::crypto::sign(message, &signing, algorithm).unwrap();
                let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(signature)
                    .unwrap();
                assert!(key.verifies(algorithm, message, &signature), "{algorithm:?}");
                assert!(!key.verifies(algorithm, b"header.payloaD", &signature), "{algorithm:?}");
                assert!(!other.verifies(algorithm, message, &signature), "{algorithm:?}");
                let wrong = if algorithm == Algorithm::RS256 {
                    Algorithm::RS384
                } else {
                    Algorithm::RS256
                };
                assert!(!key.verifies(wrong, message, &signature), "{algorithm:?} as {wrong:?}");
                assert!(!key.verifies(Algorithm::HS256, message, &signature));
            }
        }
        let not_rsa = DecodingKey::from_rsa_raw_components(b"\x00\x01", b"\x01\x00\x01");
        assert!(
            Key::new(&not_rsa, None).is_none(),
            "a modulus with a leading zero is unusable"
        );
        assert!(Key::new(&DecodingKey::from_rsa_der(b"not DER"), None).is_none());
    }
}
