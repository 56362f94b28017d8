//! The optional local cache of verdicts, keyed by the token's SHA-256.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use quick_cache::sync::Cache;
use sha2::{Digest, Sha256};

use crate::{pb::RejectionReason, principal::Principal};

/// Settings of the local verdict cache ([`Builder::cache`](crate::Builder::cache)).
///
/// Verdicts are keyed by the SHA-256 of the token (the raw token is never
/// stored). An accepted token is served from the cache for at most
/// [`max_staleness`](Self::max_staleness) and never past its `exp`.
/// Rejections live in a separate, smaller cache for
/// [`rejection_ttl`](Self::rejection_ttl), so a flood of garbage tokens can
/// only evict other rejections, never good entries. Outages are never cached.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CacheOptions {
    /// Accepted tokens kept (default 10,000); the least useful are evicted beyond it.
    pub capacity: usize,
    /// How long an accepted verdict may be served without asking the service
    /// again (default 5 s). **This bounds how late this caller sees a
    /// revocation, a `user.deleted` or an auth-mode switch** made elsewhere.
    /// A verdict is never served past the token's `exp`, whatever this says.
    pub max_staleness: Duration,
    /// Rejected tokens kept (default 1,000), in their own cache.
    pub rejection_capacity: usize,
    /// How long a rejection is served from the cache (default 1 s): long
    /// enough to absorb a retry storm, short enough that a token that was
    /// not yet valid soon gets a fresh verdict.
    pub rejection_ttl: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            max_staleness: Duration::from_secs(5),
            rejection_capacity: 1_000,
            rejection_ttl: Duration::from_secs(1),
        }
    }
}

impl CacheOptions {
    /// Sets [`capacity`](Self::capacity).
    pub fn capacity(mut self, entries: usize) -> Self {
        self.capacity = entries;
        self
    }

    /// Sets [`max_staleness`](Self::max_staleness): how late a revocation,
    /// a deleted user or an auth-mode switch may be seen.
    pub fn max_staleness(mut self, staleness: Duration) -> Self {
        self.max_staleness = staleness;
        self
    }

    /// Sets [`rejection_capacity`](Self::rejection_capacity).
    pub fn rejection_capacity(mut self, entries: usize) -> Self {
        self.rejection_capacity = entries;
        self
    }

    /// Sets [`rejection_ttl`](Self::rejection_ttl).
    pub fn rejection_ttl(mut self, ttl: Duration) -> Self {
        self.rejection_ttl = ttl;
        self
    }
}

/// The digest a token is cached under.
pub(crate) type TokenDigest = [u8; 32];

/// The key of a verdict: the token and the audience it was checked for.
pub(crate) fn digest(token: &str, audience: &str) -> TokenDigest {
    let mut hash = Sha256::new();
    hash.update(audience.as_bytes());
    hash.update([0]);
    hash.update(token.as_bytes());
    hash.finalize().into()
}

/// How many distinct audiences a cache remembers for [`VerdictCache::forget`].
const AUDIENCES: usize = 16;

#[derive(Clone)]
struct Accepted {
    principal: Principal,
    until: Instant,
}

#[derive(Clone)]
struct Rejected {
    reason: RejectionReason,
    message: String,
    until: Instant,
}

/// A verdict served from the cache.
pub(crate) enum Hit {
    Accepted(Principal),
    Rejected(RejectionReason, String),
}

pub(crate) struct VerdictCache {
    accepted: Cache<TokenDigest, Accepted>,
    rejected: Cache<TokenDigest, Rejected>,
    options: CacheOptions,
    /// The audiences verdicts were cached for, so a revocation can drop all of them.
    audiences: Mutex<Vec<String>>,
}

impl VerdictCache {
    pub(crate) fn new(options: CacheOptions) -> Self {
        Self {
            accepted: Cache::new(options.capacity.max(1)),
            rejected: Cache::new(options.rejection_capacity.max(1)),
            options,
            audiences: Mutex::new(vec![String::new()]),
        }
    }

    fn remember(&self, audience: &str) {
        let mut audiences = self.audiences.lock().unwrap_or_else(PoisonError::into_inner);
        if audiences.len() < AUDIENCES && !audiences.iter().any(|a| a == audience) {
            audiences.push(audience.to_owned());
        }
    }

    pub(crate) fn get(&self, key: &TokenDigest) -> Option<Hit> {
        let now = Instant::now();
        if let Some(entry) = self.accepted.get(key) {
            if now < entry.until {
                return Some(Hit::Accepted(entry.principal));
            } else {
                self.accepted.remove(key);
            }
        }
        if let Some(entry) = self.rejected.get(key) {
            if now < entry.until {
                return Some(Hit::Rejected(entry.reason, entry.message));
            } else {
                self.rejected.remove(key);
            }
        }
        None
    }

    pub(crate) fn put_accepted(&self, key: TokenDigest, audience: &str, principal: &Principal) {
        // Without an expiry there is nothing to bound the entry by: ask every time.
        let Some(expires_at) = principal.expires_at else {
            return;
        };
        let Ok(left) = expires_at.duration_since(SystemTime::now()) else {
            return;
        };
        let ttl = left.min(self.options.max_staleness);
        if ttl.is_zero() {
            return;
        }
        self.remember(audience);
        self.rejected.remove(&key);
        self.accepted.insert(
            key,
            Accepted {
                principal: principal.clone(),
                until: Instant::now() + ttl,
            },
        );
    }

    pub(crate) fn put_rejected(&self, key: TokenDigest, audience: &str, reason: RejectionReason, message: &str) {
        if self.options.rejection_ttl.is_zero() {
            return;
        }
        self.remember(audience);
        self.accepted.remove(&key);
        self.rejected.insert(
            key,
            Rejected {
                reason,
                message: message.to_owned(),
                until: Instant::now() + self.options.rejection_ttl,
            },
        );
    }

    /// Drops every verdict about `token`, whatever the audience.
    pub(crate) fn forget(&self, token: &str) {
        let audiences = self.audiences.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for audience in audiences {
            let key = digest(token, &audience);
            self.accepted.remove(&key);
            self.rejected.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    fn principal(expires_in: Option<Duration>, past: bool) -> Principal {
        let expires_at = expires_in.map(|d| {
            if past {
                SystemTime::now() - d
            } else {
                SystemTime::now() + d
            }
        });
        let mut p = Principal::from(pb::Principal {
            user_id: "6f1c2b9e-8a43-4f0e-9d57-0c8f3b1a2d44".to_owned(),
            ..Default::default()
        });
        p.expires_at = expires_at;
        p
    }

    #[test]
    fn nothing_without_or_past_its_expiry_is_cached() {
        let cache = VerdictCache::new(CacheOptions::default());
        let key = digest("t", "");
        cache.put_accepted(key, "", &principal(None, false));
        assert!(cache.get(&key).is_none(), "no exp, no entry");
        cache.put_accepted(key, "", &principal(Some(Duration::from_secs(1)), true));
        assert!(cache.get(&key).is_none(), "already expired, no entry");
        cache.put_accepted(key, "", &principal(Some(Duration::from_secs(3600)), false));
        assert!(matches!(cache.get(&key), Some(Hit::Accepted(_))));
    }

    #[test]
    fn audiences_are_separate_and_forget_drops_them_all() {
        let cache = VerdictCache::new(CacheOptions::default());
        let p = principal(Some(Duration::from_secs(3600)), false);
        cache.put_accepted(digest("t", ""), "", &p);
        cache.put_rejected(
            digest("t", "billing"),
            "billing",
            RejectionReason::Audience,
            "wrong audience",
        );
        assert!(matches!(cache.get(&digest("t", "")), Some(Hit::Accepted(_))));
        assert!(matches!(
            cache.get(&digest("t", "billing")),
            Some(Hit::Rejected(RejectionReason::Audience, _))
        ));
        cache.forget("t");
        assert!(cache.get(&digest("t", "")).is_none());
        assert!(cache.get(&digest("t", "billing")).is_none());
    }

    #[test]
    fn rejections_cannot_evict_accepted_tokens() {
        let cache = VerdictCache::new(CacheOptions::default().capacity(4).rejection_capacity(4));
        let p = principal(Some(Duration::from_secs(3600)), false);
        cache.put_accepted(digest("good", ""), "", &p);
        for i in 0..10_000 {
            cache.put_rejected(digest(&format!("bad-{i}"), ""), "", RejectionReason::Malformed, "m");
        }
        assert!(matches!(cache.get(&digest("good", "")), Some(Hit::Accepted(_))));
    }

    #[test]
    fn a_zero_rejection_ttl_caches_no_rejection() {
        let cache = VerdictCache::new(CacheOptions::default().rejection_ttl(Duration::ZERO));
        cache.put_rejected(digest("t", ""), "", RejectionReason::Malformed, "m");
        assert!(cache.get(&digest("t", "")).is_none());
    }
}
