//! Users read from the database, kept for a short time so that the
//! verification hot path touches no database. A link or unlink on this
//! replica invalidates at once; on other replicas the entry lives at most
//! `IDENTITY_USER_CACHE_SECONDS`. Concurrent misses of one key share one
//! query, so an expiry under load does not send every caller to the database.
//! While the database is unavailable, a user this replica had cached is
//! served for up to `STALE_IF_UNAVAILABLE` past its expiry.
//!
//! Misses of different keys that arrive while earlier look-ups are in flight
//! are loaded together, in one statement ([`Batcher`]): when the entries of
//! many active users expire under load, the database sees a few queries, not
//! one round trip per user. A lone miss is loaded at once, with no wait.

use std::{
    borrow::Borrow,
    hash::Hash,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{ClerkUserId, DomainError, UserId};
use crate::storage::{Storage, UserKey, UserKeys, UserRecord};

const CAPACITY: u64 = 200_000;

/// Keys loaded by one statement at most.
const MAX_BATCH: usize = 256;

/// Batched statements in flight at once; further misses wait and join the
/// next batch.
const BATCHES_IN_FLIGHT: usize = 4;

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
    by_id: Batcher<UserId>,
    by_clerk: Batcher<ClerkUserId>,
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
            tiers: (!ttl.is_zero()).then(|| Arc::new((Tier::new(ttl), Tier::new(ttl)))),
            by_id: Batcher::new(storage.clone()),
            by_clerk: Batcher::new(storage.clone()),
            storage,
        }
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub async fn by_id(&self, id: UserId) -> Result<Option<Arc<UserRecord>>, DomainError> {
        let load = self.by_id.load(id);
        match &self.tiers {
            Some(tiers) => tiers.0.get(&id, load).await,
            None => load.await,
        }
    }

    pub async fn by_clerk(&self, clerk_user_id: &ClerkUserId) -> Result<Option<Arc<UserRecord>>, DomainError> {
        let load = self.by_clerk.load(clerk_user_id.clone());
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

/// A key the batcher can load many of in one statement.
trait BatchKey: Hash + Eq + Clone + Send + Sync + 'static {
    fn statement(keys: Vec<Self>) -> UserKeys;
    /// The key a found user answers.
    fn of(user: &UserRecord) -> Option<Self>;
    /// The single look-up, when no batcher task can run.
    fn single(self) -> UserKey;
}

impl BatchKey for UserId {
    fn statement(keys: Vec<Self>) -> UserKeys {
        UserKeys::Ids(keys)
    }
    fn of(user: &UserRecord) -> Option<Self> {
        Some(user.id)
    }
    fn single(self) -> UserKey {
        UserKey::Id(self)
    }
}

impl BatchKey for ClerkUserId {
    fn statement(keys: Vec<Self>) -> UserKeys {
        UserKeys::ClerkUserIds(keys)
    }
    fn of(user: &UserRecord) -> Option<Self> {
        user.clerk_user_id
            .as_deref()
            .and_then(|id| ClerkUserId::parse("clerk_user_id", id).ok())
    }
    fn single(self) -> UserKey {
        UserKey::ClerkUserId(self)
    }
}

type Reply = oneshot::Sender<Result<Option<Arc<UserRecord>>, Arc<DomainError>>>;

/// Gathers concurrent misses into batches. Its task starts with the first
/// miss (inside the runtime) and ends when the cache is dropped.
struct Batcher<K> {
    storage: Arc<dyn Storage>,
    /// Shared by the cache's clones, so they all feed one task.
    queue: Arc<std::sync::OnceLock<mpsc::UnboundedSender<(K, Reply)>>>,
}

impl<K> Clone for Batcher<K> {
    fn clone(&self) -> Self {
        Self {
            storage: self.storage.clone(),
            queue: self.queue.clone(),
        }
    }
}

impl<K: BatchKey> Batcher<K> {
    fn new(storage: Arc<dyn Storage>) -> Self {
        Self {
            storage,
            queue: Arc::default(),
        }
    }

    async fn load(&self, key: K) -> Result<Option<Arc<UserRecord>>, DomainError> {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(Self::run(self.storage.clone(), rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError((key, _))) = queue.send((key, reply)) {
            // The task's runtime has gone (a cache outliving its runtime):
            // load this key alone.
            return Ok(self.storage.find_user(&key.single()).await?.map(Arc::new));
        }
        match answer.await {
            Ok(result) => result.map_err(shared_error),
            Err(_) => Err(DomainError::Unavailable {
                message: "the user look-up was interrupted; try again".into(),
                source: None,
            }),
        }
    }

    async fn run(storage: Arc<dyn Storage>, mut queue: mpsc::UnboundedReceiver<(K, Reply)>) {
        let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        loop {
            // A free slot first: misses arriving meanwhile join this batch.
            let Ok(slot) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH
                && let Ok(next) = queue.try_recv()
            {
                batch.push(next);
            }
            let storage = storage.clone();
            tokio::spawn(async move {
                Self::answer(storage.as_ref(), batch).await;
                drop(slot);
            });
        }
    }

    async fn answer(storage: &dyn Storage, batch: Vec<(K, Reply)>) {
        let keys: std::collections::HashSet<K> = batch.iter().map(|(key, _)| key.clone()).collect();
        let keys = keys.into_iter().collect();
        match storage.find_users(&K::statement(keys)).await {
            Ok(users) => {
                let found: std::collections::HashMap<K, Arc<UserRecord>> = users
                    .into_iter()
                    .filter_map(|user| K::of(&user).map(|key| (key, Arc::new(user))))
                    .collect();
                for (key, reply) in batch {
                    let _ = reply.send(Ok(found.get(&key).cloned()));
                }
            }
            Err(err) => {
                let err = Arc::new(DomainError::from(err));
                for (_, reply) in batch {
                    let _ = reply.send(Err(err.clone()));
                }
            }
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
