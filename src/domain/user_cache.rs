//! Users read from the database, kept for a short time so that the
//! verification hot path touches no database. A link or unlink on this
//! replica invalidates at once; on other replicas the entry lives at most
//! `IDENTITY_USER_CACHE_SECONDS`. Concurrent misses of one key share one
//! query, so an expiry under load does not send every caller to the database.
//! While the database is unavailable, a user this replica had cached is
//! served for up to `STALE_IF_UNAVAILABLE` past its expiry.

use std::{
    borrow::Borrow,
    hash::Hash,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{ClerkUserId, DomainError, UserId};
use crate::storage::{Storage, UserKey, UserRecord};

const CAPACITY: u64 = 200_000;

/// How long past its expiry a cached user is still served while the
/// database is unavailable.
pub const STALE_IF_UNAVAILABLE: Duration = Duration::from_secs(300);

/// A look-up result and how long it may be served.
#[derive(Clone)]
struct Entry {
    user: Option<Arc<UserRecord>>,
    until: Instant,
}

/// One key space: `fresh` answers hits cheaply (a sharded map, no
/// bookkeeping per read); `loader` runs one query per key at a time and
/// hands its result, or its error, to every caller waiting on it.
struct Tier<K> {
    fresh: quick_cache::sync::Cache<K, Entry>,
    loader: moka::future::Cache<K, Entry>,
    ttl: Duration,
}

impl<K> Tier<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn new(ttl: Duration) -> Self {
        Self {
            fresh: quick_cache::sync::Cache::new(CAPACITY as usize),
            loader: moka::future::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(ttl)
                .build(),
            ttl,
        }
    }

    async fn get<Q>(
        &self,
        key: &Q,
        load: impl Future<Output = Result<Option<Arc<UserRecord>>, DomainError>>,
    ) -> Result<Option<Arc<UserRecord>>, DomainError>
    where
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
        K: Borrow<Q>,
    {
        let now = Instant::now();
        let known = self.fresh.get(key);
        if let Some(entry) = &known
            && entry.until > now
        {
            return Ok(entry.user.clone());
        }
        let loaded = self
            .loader
            .try_get_with_by_ref(key, async {
                Ok(Entry {
                    user: load.await?,
                    until: Instant::now() + self.ttl,
                })
            })
            .await
            .map_err(shared_error);
        match loaded {
            Ok(entry) => {
                self.fresh.insert(key.to_owned(), entry.clone());
                Ok(entry.user)
            }
            // The database is unreachable: a user this replica knew keeps
            // verifying for a while (changes made here were invalidated).
            Err(DomainError::Unavailable { .. })
                if let Some(entry) = known
                    && now < entry.until + STALE_IF_UNAVAILABLE =>
            {
                Ok(entry.user)
            }
            Err(err) => Err(err),
        }
    }

    async fn put(&self, key: K, user: Arc<UserRecord>) {
        let entry = Entry {
            user: Some(user),
            until: Instant::now() + self.ttl,
        };
        self.fresh.insert(key.clone(), entry.clone());
        self.loader.insert(key, entry).await;
    }

    async fn invalidate<Q>(&self, key: &Q)
    where
        Q: Hash + Eq + ?Sized,
        K: Borrow<Q>,
    {
        self.loader.invalidate(key).await;
        self.fresh.remove(key);
    }
}

#[derive(Clone)]
pub struct UserCache {
    storage: Arc<dyn Storage>,
    /// `None` when caching is off (a zero TTL).
    tiers: Option<Arc<(Tier<UserId>, Tier<String>)>>,
}

impl std::fmt::Debug for UserCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCache")
            .field("enabled", &self.tiers.is_some())
            .finish()
    }
}

impl UserCache {
    /// `ttl` zero disables caching.
    pub fn new(storage: Arc<dyn Storage>, ttl: Duration) -> Self {
        Self {
            storage,
            tiers: (!ttl.is_zero()).then(|| Arc::new((Tier::new(ttl), Tier::new(ttl)))),
        }
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    async fn load(&self, key: UserKey) -> Result<Option<Arc<UserRecord>>, DomainError> {
        Ok(self.storage.find_user(&key).await?.map(Arc::new))
    }

    pub async fn by_id(&self, id: UserId) -> Result<Option<Arc<UserRecord>>, DomainError> {
        let load = self.load(UserKey::Id(id));
        match &self.tiers {
            Some(tiers) => tiers.0.get(&id, load).await,
            None => load.await,
        }
    }

    pub async fn by_clerk(&self, clerk_user_id: &ClerkUserId) -> Result<Option<Arc<UserRecord>>, DomainError> {
        let load = self.load(UserKey::ClerkUserId(clerk_user_id.clone()));
        match &self.tiers {
            Some(tiers) => tiers.1.get(clerk_user_id.as_str(), load).await,
            None => load.await,
        }
    }

    /// Stores a freshly written user under both keys.
    pub async fn put(&self, user: UserRecord) -> Arc<UserRecord> {
        let user = Arc::new(user);
        if let Some(tiers) = &self.tiers {
            tiers.0.put(user.id, user.clone()).await;
            if let Some(clerk) = &user.clerk_user_id {
                tiers.1.put(clerk.clone(), user.clone()).await;
            }
        }
        user
    }

    /// Forgets a user after a change made on this replica.
    pub async fn invalidate(&self, id: UserId, clerk_user_id: Option<&str>) {
        if let Some(tiers) = &self.tiers {
            tiers.0.invalidate(&id).await;
            if let Some(clerk) = clerk_user_id {
                tiers.1.invalidate(clerk).await;
            }
        }
    }
}

impl UserCache {
    /// Forgets a Clerk user's entry after a change made on this replica.
    pub async fn forget_clerk(&self, clerk_user_id: &str) {
        if let Some(tiers) = &self.tiers {
            tiers.1.invalidate(clerk_user_id).await;
        }
    }

    /// Forgets everything a link changed: the user, the Clerk id, and the
    /// provisional user merged away.
    pub async fn forget_link(&self, linked: &crate::storage::Linked) {
        self.invalidate(linked.mapping.user_id, Some(linked.mapping.clerk_user_id.as_str()))
            .await;
        if let Some(merged) = linked.merged_from {
            self.invalidate(merged, None).await;
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
        // The whole cause chain, not just "internal error": the log must say
        // which column of which row could not be read.
        other => DomainError::Internal(super::error_chain(other).into()),
    }
}
