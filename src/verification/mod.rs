//! Token verification, the hot path every backend calls: legacy HS JWTs and
//! Clerk session tokens resolved to one principal, under the auth mode.
//!
//! A token that verified is cached by its SHA-256 (bounded, evicting; a
//! legacy token from its second sighting), so a repeated token costs a hash,
//! a few in-memory checks and a cached user look-up; the expiry, the auth
//! mode, revocation and the caller's expected audience are checked again on
//! every call.

mod clerk;
pub(crate) mod jwks;
mod legacy;
mod principal;
mod reason;
mod revocation;
mod token;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

pub use clerk::Organization;
pub use jwks::JwksStats;
pub use principal::{AuthMethod, Principal};
use reason::outside_validity;
pub use reason::{RejectReason, Rejection};
pub use revocation::{FULL_RELOAD_EVERY, OVERLAP, ReloadStats, RevocationList};

use self::{
    clerk::{ClerkFailure, ClerkToken, ClerkVerifier, is_rsa},
    jwks::{Key, KeyStore, RemoteJwks},
    legacy::{LegacyToken, LegacyVerifier, Unverified},
    principal::PrincipalResolver,
};
use crate::{
    clerk::ClerkApi,
    config::{ClerkKeySource, UnmappedPolicy, VerificationConfig},
    domain::{AuditOutcome, AuthModes, Caller, DomainError, Scope, UserCache, audit},
    storage::NewRevocation,
};

/// Hashes a SHA-256 digest by taking its first eight bytes: the key is
/// already uniformly distributed, so SipHash would only cost time (as much as
/// an HS256 check on a miss). Only tokens that verified are cached, so an
/// attacker cannot choose the keys.
#[derive(Debug, Clone, Copy, Default)]
struct DigestHash;

#[derive(Debug, Default)]
struct DigestHasher(u64);

impl std::hash::BuildHasher for DigestHash {
    type Hasher = DigestHasher;

    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as one 32-byte write; fold anything else in too.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
            if bytes.len() == 32 {
                break;
            }
        }
    }
}

/// Verified tokens by the SHA-256 of the token (bounded, evicting; S3-FIFO
/// like, so a flood of one-off tokens does not push out the repeated ones).
type TokenCache = quick_cache::sync::Cache<[u8; 32], Cached, quick_cache::UnitWeighter, DigestHash>;

/// Nothing stays cached longer than this, whatever its `exp` says; every
/// hit is re-checked (expiry, mode, revocation) anyway.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(3600);

/// Legacy (HMAC) tokens enter the token cache on their second sighting:
/// checking one costs about as much as hashing and inserting it, so a token
/// seen once (a flood of one-off tokens, say) is not worth an insert and an
/// eviction. One slot per digest bucket remembers the last token seen there;
/// a slot lost to another token only means one more check.
struct SeenOnce {
    slots: Box<[AtomicU64]>,
}

impl SeenOnce {
    /// At most 2^20 slots (8 MiB), whatever the cache size.
    fn new(cache_size: u64) -> Self {
        let len = cache_size.clamp(1, 1 << 20).next_power_of_two() as usize;
        Self {
            slots: (0..len).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether this digest was seen before; remembers it otherwise.
    fn second_sighting(&self, digest: &[u8; 32]) -> bool {
        let word = |at: usize| u64::from_le_bytes(std::array::from_fn(|i| digest[at + i]));
        let tag = word(0) | 1; // never the empty slot's 0
        let slot = &self.slots[(word(8) as usize) & (self.slots.len() - 1)];
        if slot.load(Ordering::Relaxed) == tag {
            true
        } else {
            slot.store(tag, Ordering::Relaxed);
            false
        }
    }
}

/// The token cache's fill, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCacheUsage {
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Clone)]
struct Cached {
    verified: Arc<Verified>,
    until: Instant,
}

/// The outcome of a verification: a principal, or a rejection with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted(Principal),
    Rejected(Rejection),
}

impl Verdict {
    fn reject(reason: RejectReason, message: &str) -> Self {
        Self::Rejected(Rejection::new(reason, message))
    }
}

/// What a token verified as, before the per-call checks.
enum Verified {
    Legacy(LegacyToken),
    Clerk(ClerkToken),
}

/// The kinds of token a caller accepts (a gateway route's `methods`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptedMethods {
    pub legacy: bool,
    pub clerk: bool,
}

impl AcceptedMethods {
    pub const ALL: Self = Self {
        legacy: true,
        clerk: true,
    };
}

/// Which token RevokeToken names.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    /// The legacy token itself (its own user, or an admin).
    Token(String),
    /// A `jti` (admin only); kept until `expires_at`, or the default lifetime.
    Jti {
        jti: String,
        expires_at: Option<DateTime<Utc>>,
    },
}

const MAX_JTI_LEN: usize = 256;

struct Inner {
    legacy: Option<LegacyVerifier>,
    clerk: Option<ClerkVerifier>,
    modes: AuthModes,
    revocations: RevocationList,
    principals: PrincipalResolver,
    cache: TokenCache,
    seen_once: SeenOnce,
    max_token_bytes: usize,
    reject_legacy_after_migration: bool,
    revocation_default_ttl: Duration,
    recorder: Arc<crate::metrics::AuthRecorder>,
}

#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("legacy", &self.inner.legacy.is_some())
            .field("clerk", &self.inner.clerk.is_some())
            .finish()
    }
}

/// Why the Clerk configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[error("IDENTITY_CLERK_JWT_KEY: {0}")]
pub struct KeyError(String);

impl Verifier {
    pub fn new(
        config: &VerificationConfig,
        modes: AuthModes,
        users: UserCache,
        http: reqwest::Client,
        recorder: Arc<crate::metrics::AuthRecorder>,
    ) -> Result<Self, KeyError> {
        let clerk = match &config.clerk {
            None => None,
            Some(clerk) => {
                let keys = match &clerk.keys {
                    ClerkKeySource::Pem(pem) => {
                        let key = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes())
                            .ok()
                            .and_then(|decoding| Key::new(&decoding, None))
                            .ok_or_else(|| KeyError("is not an RSA public key in PEM form".into()))?;
                        KeyStore::Static(Arc::new(key))
                    }
                    ClerkKeySource::Jwks { url, bearer } => KeyStore::Remote(Arc::new(RemoteJwks::new(
                        url.clone(),
                        bearer.clone(),
                        http.clone(),
                        clerk.jwks_refresh,
                        clerk.jwks_cooldown,
                        clerk.jwks_max_staleness,
                    ))),
                };
                Some(ClerkVerifier::new(
                    clerk.issuer.clone(),
                    keys,
                    clerk.authorized_parties.clone(),
                    clerk.leeway_seconds,
                ))
            }
        };
        let clerk_api = config.clerk.as_ref().and_then(|c| {
            c.secret_key
                .as_ref()
                // A caller waits on these calls: a short retry budget.
                .map(|secret| ClerkApi::new(http.clone(), c.api_url.clone(), secret.clone()).interactive())
        });
        let policy = config
            .clerk
            .as_ref()
            .map(|c| c.unmapped_policy)
            .unwrap_or(UnmappedPolicy::Reject);
        let storage = users.storage().clone();
        Ok(Self {
            inner: Arc::new(Inner {
                legacy: config.legacy.as_ref().map(LegacyVerifier::new),
                clerk,
                modes,
                revocations: RevocationList::new(storage),
                principals: PrincipalResolver::new(users, policy, clerk_api),
                cache: TokenCache::with(
                    usize::try_from(config.token_cache_size).unwrap_or(usize::MAX),
                    config.token_cache_size,
                    quick_cache::UnitWeighter,
                    DigestHash,
                    quick_cache::sync::DefaultLifecycle::default(),
                ),
                seen_once: SeenOnce::new(config.token_cache_size),
                max_token_bytes: config.max_token_bytes,
                reject_legacy_after_migration: config.reject_legacy_after_migration,
                revocation_default_ttl: config.revocation_default_ttl,
                recorder,
            }),
        })
    }

    /// Whether Clerk tokens can be verified now: `None` when Clerk is not configured.
    pub fn clerk_keys_usable(&self) -> Option<bool> {
        self.inner.clerk.as_ref().map(|c| c.keys.has_usable_keys())
    }

    /// Time since Clerk's JWKS was last fetched: `None` unless keys come from
    /// a JWKS URL and one fetch succeeded.
    pub fn clerk_key_age(&self) -> Option<Duration> {
        match self.inner.clerk.as_ref().map(|c| &c.keys) {
            Some(KeyStore::Remote(remote)) => remote.key_age(),
            _ => None,
        }
    }

    /// How full the token cache is: entries held and the configured bound.
    pub fn token_cache_usage(&self) -> TokenCacheUsage {
        TokenCacheUsage {
            entries: self.inner.cache.len() as u64,
            capacity: self.inner.cache.capacity(),
        }
    }

    /// JWKS fetch counters, when keys come from a JWKS URL.
    pub fn jwks_stats(&self) -> Option<Arc<JwksStats>> {
        match self.inner.clerk.as_ref().map(|c| &c.keys) {
            Some(KeyStore::Remote(remote)) => Some(remote.stats.clone()),
            _ => None,
        }
    }

    /// Starts the background work: JWKS refresh, revocation reload and
    /// purge, and with the purge the Clerk events older than `event_retention`.
    pub fn spawn_background(&self, reload_every: Duration, event_retention: Duration, stop: watch::Receiver<bool>) {
        if let Some(KeyStore::Remote(remote)) = self.inner.clerk.as_ref().map(|c| &c.keys) {
            tokio::spawn(refresh_jwks(remote.clone(), stop.clone()));
        }
        let revocations = self.inner.revocations.clone();
        let storage = self.inner.principals.users.storage().clone();
        let event_retention = chrono::Duration::from_std(event_retention).unwrap_or(chrono::Duration::MAX);
        let mut stop = stop;
        tokio::spawn(async move {
            // Each tick reads only what changed (see revocation.rs); expired
            // entries leave memory every minute and the table every ten, as
            // do Clerk events past their retention (in short batches, in a
            // task of their own: a large first purge does not hold up reloads).
            let prune_every = Duration::from_secs(60);
            let purge_every = Duration::from_secs(600);
            let mut since_prune = Duration::ZERO;
            let mut since_purge = Duration::ZERO;
            let mut event_purge: Option<tokio::task::JoinHandle<()>> = None;
            loop {
                match revocations.reload().await {
                    Ok(stats) if stats.full => {
                        tracing::debug!(read = stats.read, held = stats.held, "read every active revocation")
                    }
                    Ok(_) => {}
                    Err(err) => tracing::warn!(error = %err, "cannot reload revocations; keeping the last known list"),
                }
                if since_prune >= prune_every {
                    since_prune = Duration::ZERO;
                    revocations.prune(Utc::now());
                }
                if since_purge >= purge_every {
                    since_purge = Duration::ZERO;
                    match revocations.purge().await {
                        Ok(n) if n > 0 => tracing::info!(purged = n, "purged expired revocations"),
                        Ok(_) => {}
                        Err(err) => tracing::warn!(error = %err, "cannot purge expired revocations"),
                    }
                    // Beside the reloads, never delaying them; one at a time.
                    let idle = event_purge.as_ref().is_none_or(|purge| purge.is_finished());
                    if let Some(before) = Utc::now().checked_sub_signed(event_retention).filter(|_| idle) {
                        let storage = storage.clone();
                        event_purge = Some(tokio::spawn(async move {
                            let batch = crate::webhooks::PURGE_BATCH;
                            match crate::webhooks::purge_events(storage.as_ref(), before, batch).await {
                                Ok(n) if n > 0 => {
                                    tracing::info!(purged = n, "purged Clerk events past their retention")
                                }
                                Ok(_) => {}
                                Err(err) => tracing::warn!(error = %err, "cannot purge old Clerk events"),
                            }
                        }));
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(reload_every) => {
                        since_prune += reload_every;
                        since_purge += reload_every;
                    }
                    _ = stop.changed() => {
                        if let Some(purge) = event_purge {
                            purge.abort();
                        }
                        return;
                    }
                }
            }
        });
    }

    /// Reads every active revocation now (start-up); returns how many are held.
    pub async fn load_revocations(&self) -> Result<usize, DomainError> {
        Ok(self.inner.revocations.full_reload().await?.held)
    }

    /// Forgets cached users after a link or unlink on this replica.
    pub fn users(&self) -> &UserCache {
        &self.inner.principals.users
    }

    /// Verifies a bearer token. An invalid token is `Ok(Rejected)`; errors
    /// are for the caller's own mistakes and for outages.
    pub async fn verify(
        &self,
        caller: &Caller,
        raw_token: &str,
        expected_audience: Option<&str>,
    ) -> Result<Verdict, DomainError> {
        caller.require_any(&[Scope::Verify, Scope::Admin])?;
        self.verify_accepting(caller, raw_token, expected_audience, AcceptedMethods::ALL)
            .await
    }

    /// [`Self::verify`] for a gateway (Envoy's `Check`, `/forward-auth`): the
    /// caller needs the `gateway` scope, and the route may accept only some
    /// kinds of token (a token of another kind is rejected as `method_disabled`).
    /// Counted and audited exactly as `VerifyToken` is.
    pub async fn verify_at_gateway(
        &self,
        caller: &Caller,
        raw_token: &str,
        expected_audience: Option<&str>,
        methods: AcceptedMethods,
    ) -> Result<Verdict, DomainError> {
        caller.require(Scope::Gateway)?;
        self.verify_accepting(caller, raw_token, expected_audience, methods)
            .await
    }

    async fn verify_accepting(
        &self,
        caller: &Caller,
        raw_token: &str,
        expected_audience: Option<&str>,
        methods: AcceptedMethods,
    ) -> Result<Verdict, DomainError> {
        let started = std::time::Instant::now();
        let result = match self.signature_checked("token", raw_token).await {
            Ok(Ok((verified, digest))) => self.judge(caller, &verified, &digest, expected_audience, methods).await,
            Ok(Err(rejection)) => Ok(Verdict::Rejected(rejection)),
            Err(err) => Err(err),
        };
        self.record(raw_token, &result, started.elapsed());
        result
    }

    /// Counts the outcome by method and reason, with its latency and, for an
    /// accepted token, the user's activity (for cutover readiness).
    fn record(&self, raw_token: &str, result: &Result<Verdict, DomainError>, elapsed: Duration) {
        use crate::metrics::AuthOutcome;
        let (method, outcome, user) = match result {
            Ok(Verdict::Accepted(principal)) => {
                let migrated_legacy = principal.method == AuthMethod::LegacyJwt
                    && principal.migration_state == crate::domain::MigrationState::Migrated;
                (
                    Some(principal.method),
                    AuthOutcome::Success,
                    Some((principal.user_id, migrated_legacy)),
                )
            }
            Ok(Verdict::Rejected(rejection)) => (method_of(raw_token), AuthOutcome::Rejected(rejection.reason), None),
            Err(_) => (method_of(raw_token), AuthOutcome::Error, None),
        };
        self.inner.recorder.record(method, outcome, elapsed, user);
    }

    /// The Clerk user a session token speaks for, without resolving (or
    /// provisioning) an internal user: for completing an invitation.
    pub(crate) async fn clerk_subject(
        &self,
        field: &'static str,
        raw_token: &str,
    ) -> Result<Result<crate::domain::ClerkUserId, Rejection>, DomainError> {
        let (verified, _) = match self.signature_checked(field, raw_token).await? {
            Ok(found) => found,
            Err(rejection) => return Ok(Err(rejection)),
        };
        let Verified::Clerk(token) = verified.as_ref() else {
            return Ok(Err(Rejection::new(
                RejectReason::AlgorithmNotAllowed,
                "not a Clerk session token",
            )));
        };
        if let Some(rejection) = self.clerk_time_and_mode(token) {
            return Ok(Err(rejection));
        }
        if let Some(rejection) = self.clerk_refusal(token) {
            return Ok(Err(rejection));
        }
        Ok(Ok(token.clerk_user_id.clone()))
    }

    /// The user a legacy token speaks for (it must exist, be unrevoked and
    /// accepted by the auth mode): for requesting an invitation.
    pub(crate) async fn legacy_subject(
        &self,
        field: &'static str,
        raw_token: &str,
    ) -> Result<Result<crate::domain::UserId, Rejection>, DomainError> {
        let (verified, digest) = match self.signature_checked(field, raw_token).await? {
            Ok(found) => found,
            Err(rejection) => return Ok(Err(rejection)),
        };
        let Verified::Legacy(token) = verified.as_ref() else {
            return Ok(Err(Rejection::new(
                RejectReason::AlgorithmNotAllowed,
                "not a legacy token",
            )));
        };
        if let Some(rejection) = self.legacy_time_mode_revocation(token, &digest) {
            return Ok(Err(rejection));
        }
        match self.inner.principals.legacy(token.user_id).await? {
            Ok(user) => Ok(Ok(user.id)),
            Err(rejection) => Ok(Err(rejection)),
        }
    }

    /// Size limit, cache, then routing and signature/claims on a miss.
    async fn signature_checked(
        &self,
        field: &'static str,
        raw_token: &str,
    ) -> Result<Result<(Arc<Verified>, [u8; 32]), Rejection>, DomainError> {
        if !self.inner.modes.known() {
            return Err(DomainError::Unavailable {
                message: "the auth mode has not been read from the database yet".into(),
                source: None,
            });
        }
        let token = token::strip_bearer(raw_token);
        if token.is_empty() {
            return Err(DomainError::invalid(field, "must not be empty"));
        }
        if token.len() > self.inner.max_token_bytes {
            return Ok(Err(Rejection::new(RejectReason::Malformed, "token is too large")));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some(hit) = self.inner.cache.get(&digest)
            && hit.until > now
        {
            self.inner.recorder.token_cache(true);
            return Ok(Ok((hit.verified.clone(), digest)));
        }
        self.inner.recorder.token_cache(false);
        match self.verify_cold(token).await? {
            Ok(verified) => {
                let verified = Arc::new(verified);
                let worth_caching = match *verified {
                    // An RSA check costs about 30 µs: cache at once.
                    Verified::Clerk(_) => true,
                    Verified::Legacy(_) => self.inner.seen_once.second_sighting(&digest),
                };
                if worth_caching {
                    let cached = Cached {
                        verified: verified.clone(),
                        until: now + TOKEN_CACHE_TTL,
                    };
                    self.inner.cache.insert(digest, cached);
                }
                Ok(Ok((verified, digest)))
            }
            Err(rejection) => Ok(Err(rejection)),
        }
    }

    fn legacy_time_mode_revocation(&self, token: &LegacyToken, digest: &[u8; 32]) -> Option<Rejection> {
        let inner = &self.inner;
        if !inner.modes.current().accepts_legacy() {
            return Some(Rejection::new(
                RejectReason::MethodDisabled,
                "legacy tokens are not accepted",
            ));
        }
        if let Some(rejection) =
            outside_validity(token.expires_at, None, legacy::LEEWAY_SECONDS, Utc::now().timestamp())
        {
            return Some(rejection);
        }
        if inner.revocations.is_revoked(token.jti.as_deref(), digest) {
            return Some(Rejection::new(RejectReason::Revoked, "token has been revoked"));
        }
        None
    }

    fn clerk_time_and_mode(&self, token: &ClerkToken) -> Option<Rejection> {
        let inner = &self.inner;
        if !inner.modes.current().accepts_clerk() {
            return Some(Rejection::new(
                RejectReason::MethodDisabled,
                "Clerk tokens are not accepted",
            ));
        }
        let leeway = inner.clerk.as_ref().map(|c| c.leeway).unwrap_or(5);
        outside_validity(token.expires_at, token.not_before, leeway, Utc::now().timestamp())
    }

    /// Refuses a token whose session ended or whose user was deleted in Clerk.
    fn clerk_refusal(&self, token: &ClerkToken) -> Option<Rejection> {
        self.inner
            .revocations
            .is_clerk_refused(token.session_id.as_deref(), token.clerk_user_id.as_str())
            .then(|| {
                Rejection::new(
                    RejectReason::Revoked,
                    "the Clerk session has ended or its user was deleted",
                )
            })
    }

    /// Applies a refusal written on this replica (a Clerk webhook) at once;
    /// the other replicas read it within their revocation reload interval.
    pub fn apply_revocation(&self, record: &crate::storage::RevocationRecord) {
        self.inner.revocations.add_record(record);
    }

    /// Routes by header and `iss` (never by anything the token points to)
    /// and checks the signature and claims.
    async fn verify_cold(&self, token: &str) -> Result<Result<Verified, Rejection>, DomainError> {
        let peeked = match token::peek(token) {
            Ok(peeked) => peeked,
            Err(rejection) => return Ok(Err(rejection)),
        };
        let inner = &self.inner;
        let mode = inner.modes.current();
        let alg = peeked.header.alg.as_str();
        let not_allowed = |why: &str| Ok(Err(Rejection::new(RejectReason::AlgorithmNotAllowed, why)));
        let disabled = || {
            Ok(Err(Rejection::new(
                RejectReason::MethodDisabled,
                "this kind of token is not accepted",
            )))
        };

        if is_rsa(alg).is_some() {
            let Some(clerk) = &inner.clerk else {
                return if inner.legacy.is_some() {
                    not_allowed("RS token presented to the HMAC (legacy) issuer")
                } else {
                    disabled()
                };
            };
            if !mode.accepts_clerk() {
                return disabled();
            }
            return match clerk.verify(&peeked).await {
                Ok(verified) => Ok(Ok(Verified::Clerk(verified))),
                Err(ClerkFailure::Rejected(rejection)) => Ok(Err(rejection)),
                Err(ClerkFailure::KeysUnavailable) => Err(DomainError::Unavailable {
                    message: "Clerk signing keys are unavailable".into(),
                    source: None,
                }),
            };
        }
        if matches!(alg, "HS256" | "HS384" | "HS512") {
            let user_claim = inner.legacy.as_ref().map_or("sub", LegacyVerifier::user_claim);
            let unverified = match Unverified::read(&peeked, user_claim) {
                Ok(unverified) => unverified,
                Err(rejection) => return Ok(Err(rejection)),
            };
            let clerk_issuer = inner.clerk.as_ref().map(|c| c.issuer.as_str());
            if clerk_issuer.is_some() && unverified.issuer() == clerk_issuer {
                return not_allowed("HMAC token presented to the RSA (Clerk) issuer");
            }
            let Some(legacy) = &inner.legacy else {
                return if inner.clerk.is_some() {
                    not_allowed("HMAC tokens are not accepted")
                } else {
                    disabled()
                };
            };
            if !mode.accepts_legacy() {
                return disabled();
            }
            return Ok(legacy.verify(unverified, true).map(Verified::Legacy));
        }
        not_allowed("algorithm not allowed")
    }

    /// The checks that depend on the moment, the mode, the caller and the database.
    async fn judge(
        &self,
        caller: &Caller,
        verified: &Verified,
        digest: &[u8; 32],
        expected_audience: Option<&str>,
        methods: AcceptedMethods,
    ) -> Result<Verdict, DomainError> {
        let inner = &self.inner;
        let expected = expected_audience
            .map(|a| a.trim().trim_end_matches('/'))
            .filter(|a| !a.is_empty());
        match verified {
            Verified::Legacy(_) if !methods.legacy => Ok(Verdict::reject(
                RejectReason::MethodDisabled,
                "this route does not accept legacy tokens",
            )),
            Verified::Clerk(_) if !methods.clerk => Ok(Verdict::reject(
                RejectReason::MethodDisabled,
                "this route does not accept Clerk tokens",
            )),
            Verified::Legacy(token) => {
                if let Some(rejection) = self.legacy_time_mode_revocation(token, digest) {
                    return Ok(Verdict::Rejected(rejection));
                }
                if let Some(expected) = expected
                    && !token.audiences.iter().any(|a| a.trim_end_matches('/') == expected)
                {
                    return Ok(Verdict::reject(
                        RejectReason::Audience,
                        "audience is not the expected one",
                    ));
                }
                let user = match inner.principals.legacy(token.user_id).await? {
                    Ok(user) => user,
                    Err(rejection) => return Ok(Verdict::Rejected(rejection)),
                };
                if inner.reject_legacy_after_migration && user.clerk_user_id.is_some() {
                    return Ok(Verdict::reject(
                        RejectReason::LegacyAfterMigration,
                        "user has moved to Clerk; legacy tokens are no longer accepted",
                    ));
                }
                Ok(Verdict::Accepted(Principal::new(
                    &user,
                    AuthMethod::LegacyJwt,
                    token.expires_at,
                )))
            }
            Verified::Clerk(token) => {
                if let Some(rejection) = self.clerk_time_and_mode(token) {
                    return Ok(Verdict::Rejected(rejection));
                }
                // Checked on every call, cache hits included: a session
                // ended or a user deleted in Clerk stops at once.
                if let Some(rejection) = self.clerk_refusal(token) {
                    return Ok(Verdict::Rejected(rejection));
                }
                if let Some(expected) = expected
                    && token.authorized_party.as_deref() != Some(expected)
                {
                    return Ok(Verdict::reject(RejectReason::Audience, "azp is not the expected party"));
                }
                let user = match inner.principals.clerk(caller, &token.clerk_user_id).await? {
                    Ok(user) => user,
                    Err(rejection) => return Ok(Verdict::Rejected(rejection)),
                };
                let mut principal = Principal::new(&user, AuthMethod::Clerk, token.expires_at);
                principal.clerk_user_id = Some(token.clerk_user_id.to_string());
                principal.session_id = token.session_id.clone();
                principal.organization = token.organization.clone();
                Ok(Verdict::Accepted(principal))
            }
        }
    }

    /// Revokes a legacy token until it expires. Returns when the entry expires.
    pub async fn revoke(&self, caller: &Caller, target: RevokeTarget) -> Result<DateTime<Utc>, DomainError> {
        let inner = &self.inner;
        let action = "token.revoke";
        let (revocation, detail) = match target {
            RevokeTarget::Token(raw) => {
                // Presenting the token proves the right to revoke it; any authenticated caller may.
                caller.require_any(&Scope::SERVICE)?;
                let token = token::strip_bearer(&raw);
                if token.is_empty() {
                    return Err(DomainError::invalid("token", "must not be empty"));
                }
                if token.len() > inner.max_token_bytes {
                    return Err(DomainError::invalid("token", "is too large"));
                }
                let legacy = inner.legacy.as_ref().ok_or_else(|| {
                    DomainError::FailedPrecondition("legacy tokens are not configured on this service".into())
                })?;
                let peeked = token::peek(token).map_err(|r| DomainError::invalid("token", r.message))?;
                if is_rsa(&peeked.header.alg).is_some() {
                    return Err(DomainError::invalid(
                        "token",
                        "only legacy tokens can be revoked here; end Clerk sessions in Clerk",
                    ));
                }
                let invalid =
                    |r: Rejection| DomainError::invalid("token", format!("is not a valid legacy token ({})", r.reason));
                let verified = legacy
                    .verify(Unverified::read(&peeked, legacy.user_claim()).map_err(invalid)?, false)
                    .map_err(invalid)?;
                let expires_at = DateTime::from_timestamp(verified.expires_at, 0).unwrap_or(DateTime::<Utc>::MAX_UTC);
                let digest = hex::encode(Sha256::digest(token.as_bytes()));
                let (jti, token_hash, how) = match verified.jti {
                    Some(jti) => (Some(jti), None, "by jti"),
                    None => (None, Some(digest), "by token hash"),
                };
                (
                    NewRevocation {
                        jti,
                        token_hash,
                        user_id: Some(verified.user_id),
                        expires_at,
                    },
                    how,
                )
            }
            RevokeTarget::Jti { jti, expires_at } => {
                caller.require(Scope::Admin)?;
                let jti = jti.trim().to_owned();
                if jti.is_empty() || jti.len() > MAX_JTI_LEN {
                    return Err(DomainError::invalid(
                        "jti",
                        format!("must be 1 to {MAX_JTI_LEN} characters"),
                    ));
                }
                let default_ttl = chrono::Duration::from_std(inner.revocation_default_ttl)
                    .unwrap_or_else(|_| chrono::Duration::days(30));
                let expires_at = expires_at.unwrap_or_else(|| Utc::now() + default_ttl);
                if expires_at <= Utc::now() {
                    return Err(DomainError::invalid("expires_at", "must be in the future"));
                }
                (
                    NewRevocation {
                        jti: Some(jti),
                        token_hash: None,
                        user_id: None,
                        expires_at,
                    },
                    "by jti (admin)",
                )
            }
        };
        let event = audit::event(
            caller,
            action,
            revocation.user_id,
            AuditOutcome::Success,
            format!("revoked {detail}"),
        );
        if let Err(err) = inner.revocations_storage().revoke_token(&revocation, &event).await {
            let err = DomainError::from(err);
            audit::record_failure(
                inner.revocations_storage().as_ref(),
                caller,
                action,
                revocation.user_id,
                &err,
            )
            .await;
            return Err(err);
        }
        inner.revocations.add_local(
            revocation.jti.as_deref(),
            revocation.token_hash.as_deref(),
            revocation.expires_at,
        );
        tracing::info!(caller = %caller.name, user_id = ?revocation.user_id.map(|u| u.to_string()), "legacy token revoked");
        Ok(revocation.expires_at)
    }
}

impl Inner {
    fn revocations_storage(&self) -> &Arc<dyn crate::storage::Storage> {
        self.principals.users.storage()
    }
}

/// The method a token claims by its header, for counting rejections (not trusted for anything else).
fn method_of(raw_token: &str) -> Option<AuthMethod> {
    let header = token::peek(token::strip_bearer(raw_token)).ok()?.header;
    if is_rsa(&header.alg).is_some() {
        Some(AuthMethod::Clerk)
    } else if header.alg.starts_with("HS") {
        Some(AuthMethod::LegacyJwt)
    } else {
        None
    }
}

/// Keeps the JWKS fresh; retries sooner while the endpoint is failing.
async fn refresh_jwks(remote: Arc<RemoteJwks>, mut stop: watch::Receiver<bool>) {
    loop {
        let ok = remote.refresh().await;
        let wait = if ok {
            remote.refresh_every
        } else {
            remote.refresh_every.min(Duration::from_secs(30))
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_counts_as_seen_from_its_second_sighting() {
        let seen = SeenOnce::new(4);
        let digest = |n: u8| -> [u8; 32] { Sha256::digest([n]).into() };
        assert!(!seen.second_sighting(&digest(1)));
        assert!(seen.second_sighting(&digest(1)));
        assert!(seen.second_sighting(&digest(1)), "stays seen until its slot is taken");
        // Enough other digests to take every one of the four slots.
        for n in 2..=64 {
            seen.second_sighting(&digest(n));
        }
        assert!(!seen.second_sighting(&digest(1)), "a lost slot means one more check");
        assert_eq!(SeenOnce::new(0).slots.len(), 1);
        assert_eq!(SeenOnce::new(50_000).slots.len(), 65_536);
        assert_eq!(SeenOnce::new(10_000_000).slots.len(), 1 << 20);
    }
}
