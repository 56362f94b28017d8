//! Users read from the database, kept for a short time so that the
//! verification hot path touches no database. A link or unlink on this
//! replica invalidates at once; on other replicas the entry lives at most
//! `IDENTITY_USER_CACHE_SECONDS`.

use std::{sync::Arc, time::Duration};

use moka::sync::Cache;

use super::{ClerkUserId, DomainError, UserId};
use crate::storage::{Storage, UserKey, UserRecord};

#[derive(Clone)]
pub struct UserCache {
    storage: Arc<dyn Storage>,
    by_id: Option<Cache<UserId, Option<Arc<UserRecord>>>>,
    by_clerk: Option<Cache<String, Option<Arc<UserRecord>>>>,
}

impl std::fmt::Debug for UserCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCache")
            .field("enabled", &self.by_id.is_some())
            .finish()
    }
}

const CAPACITY: u64 = 200_000;

impl UserCache {
    /// `ttl` zero disables caching.
    pub fn new(storage: Arc<dyn Storage>, ttl: Duration) -> Self {
        let enabled = !ttl.is_zero();
        Self {
            storage,
            by_id: enabled.then(|| Cache::builder().max_capacity(CAPACITY).time_to_live(ttl).build()),
            by_clerk: enabled.then(|| Cache::builder().max_capacity(CAPACITY).time_to_live(ttl).build()),
        }
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub async fn by_id(&self, id: UserId) -> Result<Option<Arc<UserRecord>>, DomainError> {
        if let Some(hit) = self.by_id.as_ref().and_then(|c| c.get(&id)) {
            return Ok(hit);
        }
        let found = self.storage.find_user(&UserKey::Id(id)).await?.map(Arc::new);
        self.remember(Some(id), None, &found);
        Ok(found)
    }

    pub async fn by_clerk(&self, clerk_user_id: &ClerkUserId) -> Result<Option<Arc<UserRecord>>, DomainError> {
        if let Some(hit) = self.by_clerk.as_ref().and_then(|c| c.get(clerk_user_id.as_str())) {
            return Ok(hit);
        }
        let found = self
            .storage
            .find_user(&UserKey::ClerkUserId(clerk_user_id.clone()))
            .await?
            .map(Arc::new);
        self.remember(None, Some(clerk_user_id.as_str()), &found);
        Ok(found)
    }

    /// Stores a freshly written user under both keys.
    pub fn put(&self, user: UserRecord) -> Arc<UserRecord> {
        let user = Arc::new(user);
        let found = Some(user.clone());
        self.remember(Some(user.id), user.clerk_user_id.as_deref(), &found);
        user
    }

    fn remember(&self, id: Option<UserId>, clerk: Option<&str>, found: &Option<Arc<UserRecord>>) {
        if let (Some(cache), Some(id)) = (&self.by_id, id.or_else(|| found.as_ref().map(|u| u.id))) {
            cache.insert(id, found.clone());
        }
        let clerk = clerk
            .map(str::to_owned)
            .or_else(|| found.as_ref().and_then(|u| u.clerk_user_id.clone()));
        if let (Some(cache), Some(clerk)) = (&self.by_clerk, clerk) {
            cache.insert(clerk, found.clone());
        }
    }

    /// Forgets a user after a change made on this replica.
    pub fn invalidate(&self, id: UserId, clerk_user_id: Option<&str>) {
        if let Some(cache) = &self.by_id {
            cache.invalidate(&id);
        }
        if let (Some(cache), Some(clerk)) = (&self.by_clerk, clerk_user_id) {
            cache.invalidate(clerk);
        }
    }
}
