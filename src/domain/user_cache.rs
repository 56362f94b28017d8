//! Users read from the database, kept for a short time so that the
//! verification hot path touches no database. A link or unlink on this
//! replica invalidates at once; on other replicas the entry lives at most
//! `IDENTITY_USER_CACHE_SECONDS`. Concurrent misses of one key share one
//! query, so an expiry under load does not send every caller to the database.

use std::{sync::Arc, time::Duration};

use moka::future::Cache;

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

    async fn load(&self, key: UserKey) -> Result<Option<Arc<UserRecord>>, DomainError> {
        Ok(self.storage.find_user(&key).await?.map(Arc::new))
    }

    pub async fn by_id(&self, id: UserId) -> Result<Option<Arc<UserRecord>>, DomainError> {
        if let Some(cache) = &self.by_id
            && let Some(found) = cache.get(&id).await
        {
            return Ok(found);
        }
        match &self.by_id {
            Some(cache) => cache
                .try_get_with(id, self.load(UserKey::Id(id)))
                .await
                .map_err(shared_error),
            None => self.load(UserKey::Id(id)).await,
        }
    }

    pub async fn by_clerk(&self, clerk_user_id: &ClerkUserId) -> Result<Option<Arc<UserRecord>>, DomainError> {
        if let Some(cache) = &self.by_clerk
            && let Some(found) = cache.get(clerk_user_id.as_str()).await
        {
            return Ok(found);
        }
        let load = self.load(UserKey::ClerkUserId(clerk_user_id.clone()));
        match &self.by_clerk {
            Some(cache) => cache
                .try_get_with(clerk_user_id.as_str().to_owned(), load)
                .await
                .map_err(shared_error),
            None => load.await,
        }
    }

    /// Stores a freshly written user under both keys.
    pub async fn put(&self, user: UserRecord) -> Arc<UserRecord> {
        let user = Arc::new(user);
        if let Some(cache) = &self.by_id {
            cache.insert(user.id, Some(user.clone())).await;
        }
        if let (Some(cache), Some(clerk)) = (&self.by_clerk, &user.clerk_user_id) {
            cache.insert(clerk.clone(), Some(user.clone())).await;
        }
        user
    }

    /// Forgets a user after a change made on this replica.
    pub async fn invalidate(&self, id: UserId, clerk_user_id: Option<&str>) {
        if let Some(cache) = &self.by_id {
            cache.invalidate(&id).await;
        }
        if let (Some(cache), Some(clerk)) = (&self.by_clerk, clerk_user_id) {
            cache.invalidate(clerk).await;
        }
    }
}

/// A look-up error shared by every caller that waited on the same query.
fn shared_error(err: Arc<DomainError>) -> DomainError {
    match err.as_ref() {
        DomainError::NotFound(message) => DomainError::NotFound(message.clone()),
        DomainError::Unavailable { message, .. } => DomainError::Unavailable {
            message: message.clone(),
            source: None,
        },
        other => DomainError::Internal(other.to_string().into()),
    }
}
