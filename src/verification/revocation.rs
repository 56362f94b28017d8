//! Revoked legacy tokens: stored in `jwt_blacklist` (by `jti`, or by the
//! token's SHA-256 when it has none) until the token expires, and held in
//! memory by every replica, reloaded every `IDENTITY_SETTINGS_REFRESH_SECONDS`.

use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
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
}

impl RevocationList {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Self {
            storage,
            current: Arc::new(RwLock::new(Arc::new(Revoked::default()))),
        }
    }

    fn snapshot(&self) -> Arc<Revoked> {
        self.current
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn is_revoked(&self, jti: Option<&str>, token_hash: &str) -> bool {
        let revoked = self.snapshot();
        if revoked.jtis.is_empty() && revoked.hashes.is_empty() {
            return false;
        }
        jti.is_some_and(|j| revoked.jtis.contains(j)) || revoked.hashes.contains(token_hash)
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
        *guard = Arc::new(next);
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
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(count)
    }

    /// Deletes expired entries so the list stays small.
    pub async fn purge(&self) -> Result<u64, DomainError> {
        Ok(self.storage.purge_revocations(Utc::now()).await?)
    }
}
