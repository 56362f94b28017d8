//! Revoked legacy tokens: stored in `identity_revocations` (by `jti`, or by
//! the token's SHA-256 when it has none) until the token expires, and held in
//! memory by every replica. Ended Clerk sessions (by `sid`) and deleted Clerk
//! users (by user id), from Clerk's webhooks, are rows of the same table and
//! travel the same way.
//!
//! A replica reads every active revocation once at start (and again, as a
//! backstop, every [`FULL_RELOAD_EVERY`]); each reload in between reads only
//! the rows written or extended since the previous read began, less
//! [`OVERLAP`] for writes that commit after the time they were stamped with.
//! So a tick with a million revocations stored and a few new ones reads the
//! few. Entries live in concurrent maps, so a revocation made here is one
//! insert (no copy of the sets), and each entry keeps its expiry, so expired
//! ones are pruned from memory without a read.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use dashmap::{DashMap, mapref::entry::Entry};

use crate::{
    domain::DomainError,
    storage::{RevocationRecord, Storage},
};

/// How far before the previous read's start an incremental read begins: a
/// revocation stamped just before a read and committed just after it is read
/// the next time. Larger than any revocation's transaction.
pub const OVERLAP: Duration = Duration::from_secs(10);

/// How often a replica reads every active revocation again, in case an
/// incremental read missed a row (a transaction longer than [`OVERLAP`]).
pub const FULL_RELOAD_EVERY: Duration = Duration::from_secs(3600);

/// Where incremental reads stand.
#[derive(Default)]
struct Watermark {
    /// The start of the last successful read, in the database's clock.
    as_of: Option<DateTime<Utc>>,
    /// When the last full read finished.
    full_at: Option<Instant>,
}

/// What one reload read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadStats {
    /// Rows read from the database.
    pub read: usize,
    /// Whether every active row was read (start-up, or the periodic backstop).
    pub full: bool,
    /// Entries held in memory afterwards.
    pub held: usize,
}

/// Entries by one key (`jti`, or the token's SHA-256 in hex) → the token's
/// expiry, with their count, so that an empty map is known without a lock
/// (`DashMap::is_empty` locks every shard).
#[derive(Default)]
struct Entries {
    map: DashMap<String, DateTime<Utc>>,
    held: AtomicUsize,
}

impl Entries {
    fn len(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Adds an entry, or keeps the later expiry of the two.
    fn put(&self, key: &str, expires_at: DateTime<Utc>) {
        // A read first: reloads see mostly entries already held.
        if let Some(mut held) = self.map.get_mut(key) {
            if *held < expires_at {
                *held = expires_at;
            }
            return;
        }
        match self.map.entry(key.to_owned()) {
            Entry::Occupied(mut held) => {
                if *held.get() < expires_at {
                    held.insert(expires_at);
                }
            }
            Entry::Vacant(slot) => {
                // Counted while the shard is still locked, so a prune cannot
                // remove (and uncount) the entry first.
                let _locked = slot.insert(expires_at);
                self.held.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    fn contains(&self, key: &str) -> bool {
        self.len() > 0 && self.map.contains_key(key)
    }

    fn prune(&self, now: DateTime<Utc>) -> usize {
        let mut pruned = 0;
        self.map.retain(|_, expires_at| {
            let keep = *expires_at > now;
            if !keep {
                pruned += 1;
            }
            keep
        });
        self.held.fetch_sub(pruned, Ordering::AcqRel);
        pruned
    }
}

struct Inner {
    storage: Arc<dyn Storage>,
    jtis: Entries,
    hashes: Entries,
    sessions: Entries,
    clerk_users: Entries,
    watermark: Mutex<Watermark>,
    overlap: chrono::Duration,
    /// One reload at a time: a watermark must not move backwards.
    reloading: tokio::sync::Mutex<()>,
}

/// The revocations a replica holds in memory.
#[derive(Clone)]
pub struct RevocationList {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RevocationList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationList").field("held", &self.len()).finish()
    }
}

impl RevocationList {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Self::with_overlap(storage, OVERLAP)
    }

    /// Another overlap than [`OVERLAP`] (tests and benchmarks).
    pub fn with_overlap(storage: Arc<dyn Storage>, overlap: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                storage,
                jtis: Entries::default(),
                hashes: Entries::default(),
                sessions: Entries::default(),
                clerk_users: Entries::default(),
                watermark: Mutex::new(Watermark::default()),
                overlap: chrono::Duration::from_std(overlap).unwrap_or(chrono::Duration::zero()),
                reloading: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Entries held in memory.
    pub fn len(&self) -> usize {
        let inner = &self.inner;
        inner.jtis.len() + inner.hashes.len() + inner.sessions.len() + inner.clerk_users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `digest` is the token's SHA-256 (stored hex-encoded).
    pub fn is_revoked(&self, jti: Option<&str>, digest: &[u8; 32]) -> bool {
        if self.is_empty() {
            return false;
        }
        let inner = &self.inner;
        jti.is_some_and(|j| inner.jtis.contains(j))
            || (inner.hashes.len() > 0 && inner.hashes.contains(&hex::encode(digest)))
    }

    /// Whether a Clerk token of this session, or of this Clerk user, is refused.
    pub fn is_clerk_refused(&self, session_id: Option<&str>, clerk_user_id: &str) -> bool {
        let inner = &self.inner;
        inner.clerk_users.contains(clerk_user_id) || session_id.is_some_and(|sid| inner.sessions.contains(sid))
    }

    /// Applies a stored revocation of any kind on this replica at once.
    pub fn add_record(&self, record: &RevocationRecord) {
        let inner = &self.inner;
        for (entries, key) in [
            (&inner.jtis, &record.jti),
            (&inner.hashes, &record.token_hash),
            (&inner.sessions, &record.session_id),
            (&inner.clerk_users, &record.clerk_user_id),
        ] {
            if let Some(key) = key {
                entries.put(key, record.expires_at);
            }
        }
    }

    /// Applies a revocation made on this replica at once.
    pub fn add_local(&self, jti: Option<&str>, token_hash: Option<&str>, expires_at: DateTime<Utc>) {
        if let Some(jti) = jti {
            self.inner.jtis.put(jti, expires_at);
        }
        if let Some(hash) = token_hash {
            self.inner.hashes.put(hash, expires_at);
        }
    }

    /// One reload tick: the revocations changed since the last read (or all
    /// of them, at start and every [`FULL_RELOAD_EVERY`]).
    pub async fn reload(&self) -> Result<ReloadStats, DomainError> {
        let _one = self.inner.reloading.lock().await;
        let since = {
            let mark = self.inner.watermark.lock().unwrap_or_else(|p| p.into_inner());
            match (mark.as_of, mark.full_at) {
                (Some(as_of), Some(full_at)) if full_at.elapsed() < FULL_RELOAD_EVERY => {
                    Some(as_of - self.inner.overlap)
                }
                _ => None,
            }
        };
        self.read(since).await
    }

    /// Reads every active revocation (start-up, and the periodic backstop).
    pub async fn full_reload(&self) -> Result<ReloadStats, DomainError> {
        let _one = self.inner.reloading.lock().await;
        self.read(None).await
    }

    async fn read(&self, since: Option<DateTime<Utc>>) -> Result<ReloadStats, DomainError> {
        let changes = self.inner.storage.revocations_changed_since(since, Utc::now()).await?;
        for record in &changes.records {
            self.add_record(record);
        }
        let mut mark = self.inner.watermark.lock().unwrap_or_else(|p| p.into_inner());
        mark.as_of = Some(changes.as_of);
        if since.is_none() {
            mark.full_at = Some(Instant::now());
        }
        Ok(ReloadStats {
            read: changes.records.len(),
            full: since.is_none(),
            held: self.len(),
        })
    }

    /// Drops from memory the entries whose token has expired at `now` (the
    /// token is refused as expired anyway); returns how many.
    pub fn prune(&self, now: DateTime<Utc>) -> usize {
        let inner = &self.inner;
        inner.jtis.prune(now) + inner.hashes.prune(now) + inner.sessions.prune(now) + inner.clerk_users.prune(now)
    }

    /// Deletes expired entries from the database so the table stays small.
    pub async fn purge(&self) -> Result<u64, DomainError> {
        Ok(self.inner.storage.purge_revocations(Utc::now()).await?)
    }
}
