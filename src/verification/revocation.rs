//! Revoked legacy tokens: stored in `jwt_blacklist` (by `jti`, or by the
//! token's SHA-256 when it has none) until the token expires, and held in
//! memory by every replica, reloaded every `IDENTITY_SETTINGS_REFRESH_SECONDS`.

use std::{
    collections::HashSet,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use chrono::Utc;

use crate::{domain::DomainError, storage::Storage};

#[derive(Default)]
struct Revoked {
    jtis: HashSet<String>,
    hashes: HashSet<String>,
}

#[derive(Clone)]
pub(crate) struct RevocationList {
    storage: Arc<dyn Storage>,
    current: Arc<RwLock<Arc<Revoked>>>,
    /// Whether `current` holds nothing; written under its write lock.
    empty: Arc<AtomicBool>,
}

impl RevocationList {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Self {
            storage,
            current: Arc::new(RwLock::new(Arc::new(Revoked::default()))),
            empty: Arc::new(AtomicBool::new(true)),
        }
    }

    fn snapshot(&self) -> Arc<Revoked> {
        self.current
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// `digest` is the token's SHA-256 (stored hex-encoded).
    pub fn is_revoked(&self, jti: Option<&str>, digest: &[u8; 32]) -> bool {
        // The common case, nothing revoked, reads one flag and takes no lock.
        if self.empty.load(Ordering::Acquire) {
            return false;
        }
        let revoked = self.snapshot();
        jti.is_some_and(|j| revoked.jtis.contains(j))
            || (!revoked.hashes.is_empty() && revoked.hashes.contains(&hex::encode(digest)))
    }

    fn publish(&self, guard: &mut Arc<Revoked>, next: Revoked) {
        let empty = next.jtis.is_empty() && next.hashes.is_empty();
        *guard = Arc::new(next);
        self.empty.store(empty, Ordering::Release);
    }

    /// Applies a revocation made on this replica at once.
    pub fn add_local(&self, jti: Option<&str>, token_hash: Option<&str>) {
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        let mut next = Revoked {
            jtis: guard.jtis.clone(),
            hashes: guard.hashes.clone(),
        };
        if let Some(jti) = jti {
            next.jtis.insert(jti.to_owned());
        }
        if let Some(hash) = token_hash {
            next.hashes.insert(hash.to_owned());
        }
        self.publish(&mut guard, next);
    }

    /// Reloads the active revocations from the database.
    pub async fn reload(&self) -> Result<usize, DomainError> {
        let records = self.storage.active_revocations(Utc::now()).await?;
        let mut next = Revoked::default();
        for record in records {
            if let Some(jti) = record.jti {
                next.jtis.insert(jti);
            }
            if let Some(hash) = record.token_hash {
                next.hashes.insert(hash);
            }
        }
        let count = next.jtis.len() + next.hashes.len();
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        self.publish(&mut guard, next);
        Ok(count)
    }

    /// Deletes expired entries so the list stays small.
    pub async fn purge(&self) -> Result<u64, DomainError> {
        Ok(self.storage.purge_revocations(Utc::now()).await?)
    }
}
