//! The migration dashboard as an API: user counts (exact, O(1)), auth
//! figures over a window (cluster-wide), latency percentiles, invitations,
//! the bulk job, and cutover readiness.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};

use super::auth::{AuthRecorder, LATENCY_BOUNDS_US, percentile};
use crate::{
    domain::{AuthMode, AuthModes, Caller, DomainError, Scope},
    storage::{BulkJobRecord, InvitationCounts, Readiness, Storage, UserCounts},
};

/// The span of time auth figures cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Last5Minutes,
    LastHour,
    LastDay,
    /// Everything recorded.
    AllTime,
}

impl Window {
    fn seconds(self) -> Option<i64> {
        match self {
            Self::Last5Minutes => Some(300),
            Self::LastHour => Some(3600),
            Self::LastDay => Some(86_400),
            Self::AllTime => None,
        }
    }
}

/// Figures for one method (legacy, Clerk, or unknown for undecodable tokens).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodFigures {
    pub method: String,
    pub attempts: i64,
    pub successes: i64,
    pub errors: i64,
    /// (reason, count), most frequent first.
    pub rejections: Vec<(String, i64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StatsSnapshot {
    pub at: DateTime<Utc>,
    pub window: Window,
    pub users: UserCounts,
    pub methods: Vec<MethodFigures>,
    pub attempts: i64,
    pub successes: i64,
    pub rejections: i64,
    pub errors: i64,
    pub success_rate: f64,
    pub error_rate: f64,
    /// Verification latency percentiles in microseconds (slot upper bounds).
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub invitations: InvitationCounts,
    pub bulk_job: Option<BulkJobRecord>,
    /// The most recent reconciliation pass.
    pub reconciliation: Option<crate::storage::ReconcileJobRecord>,
    pub readiness_days: u32,
    pub readiness: Readiness,
    pub auth_mode: AuthMode,
}

#[derive(Clone)]
pub struct MigrationStats {
    storage: Arc<dyn Storage>,
    recorder: Arc<AuthRecorder>,
    modes: AuthModes,
    /// Readiness aggregates days of activity and joins the active users'
    /// links: recomputed at most every `READINESS_TTL` per replica, so a
    /// stream of snapshots costs the same whatever the number of users.
    /// Keyed by (first day, look-back bucket): a caller cycling through
    /// look-backs meets at most `READINESS_BUCKETS.len()` keys a day.
    readiness: moka::future::Cache<(i64, u32), Readiness>,
    /// Snapshots streams share: one computation per window and look-back
    /// per `SHARED_TTL`, however many streams ask.
    shared: moka::future::Cache<(Window, u32), StatsSnapshot>,
    /// Open `StreamMigrationMetrics` streams, per caller and in all.
    streams: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// Open metric streams one caller may hold on one replica.
pub const MAX_STREAMS_PER_CALLER: usize = 8;
/// Open metric streams one replica serves in all.
pub const MAX_STREAMS_PER_REPLICA: usize = 256;

/// A slot held by one open metric stream; dropping it frees the slot.
#[derive(Debug)]
pub struct StreamSlot {
    caller: String,
    streams: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(open) = streams.get_mut(&self.caller) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                streams.remove(&self.caller);
            }
        }
    }
}

impl std::fmt::Debug for MigrationStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationStats").finish_non_exhaustive()
    }
}

const READINESS_TTL: Duration = Duration::from_secs(30);
const SHARED_TTL: Duration = Duration::from_secs(1);

/// Look-backs readiness is computed for; a request is rounded up to one.
const READINESS_BUCKETS: [u32; 8] = [1, 7, 14, 30, 60, 90, 180, 365];

/// Default and maximum look-back for cutover readiness.
const DEFAULT_READINESS_DAYS: u32 = 30;
const MAX_READINESS_DAYS: u32 = 365;

impl MigrationStats {
    pub fn new(storage: Arc<dyn Storage>, recorder: Arc<AuthRecorder>, modes: AuthModes) -> Self {
        let readiness = moka::future::Cache::builder()
            .max_capacity(64)
            .time_to_live(READINESS_TTL)
            .build();
        let shared = moka::future::Cache::builder()
            .max_capacity(64)
            .time_to_live(SHARED_TTL)
            .build();
        Self {
            storage,
            recorder,
            modes,
            readiness,
            shared,
            streams: Arc::default(),
        }
    }

    /// A slot for one more metric stream, or RESOURCE_EXHAUSTED when the
    /// caller or the replica holds the most it may.
    pub fn open_stream(&self, caller: &Caller) -> Result<StreamSlot, DomainError> {
        caller.require_any(&Scope::SERVICE)?;
        let mut streams = self.streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let total: usize = streams.values().sum();
        let mine = streams.get(&caller.name).copied().unwrap_or(0);
        let exhausted = |message: String| DomainError::ResourceExhausted {
            message,
            retry_after: Duration::from_secs(5),
        };
        if mine >= MAX_STREAMS_PER_CALLER {
            return Err(exhausted(format!(
                "this caller already has {MAX_STREAMS_PER_CALLER} metric streams open on this replica"
            )));
        }
        if total >= MAX_STREAMS_PER_REPLICA {
            return Err(exhausted(format!(
                "this replica already serves {MAX_STREAMS_PER_REPLICA} metric streams"
            )));
        }
        *streams.entry(caller.name.clone()).or_default() += 1;
        Ok(StreamSlot {
            caller: caller.name.clone(),
            streams: self.streams.clone(),
        })
    }

    /// The snapshot streams send: shared by every stream of the same window
    /// and look-back on this replica, computed at most once per second.
    pub async fn shared_snapshot(
        &self,
        caller: &Caller,
        window: Window,
        readiness_days: u32,
    ) -> Result<StatsSnapshot, DomainError> {
        let days = Self::admit(caller, readiness_days)?;
        self.shared
            .try_get_with((window, days), self.compute(window, days))
            .await
            .map_err(|e| match e.as_ref() {
                DomainError::Unavailable { message, .. } => DomainError::Unavailable {
                    message: message.clone(),
                    source: None,
                },
                other => DomainError::Internal(crate::domain::error_chain(other).into()),
            })
    }

    /// Writes this replica's pending figures; on failure they are kept for the next try.
    pub async fn flush(&self) -> Result<(), DomainError> {
        let pending = self.recorder.take();
        if pending.counts.is_empty() && pending.activity.is_empty() {
            return Ok(());
        }
        if let Err(err) = self.storage.flush_auth_stats(&pending).await {
            self.recorder.restore(pending);
            return Err(err.into());
        }
        Ok(())
    }

    /// Flushes every `every` until `stop` flips, and once more at the end.
    pub async fn run_flusher(self, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        self.publish_user_counts().await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => {
                    let _ = self.flush().await;
                    return;
                }
            }
            if let Err(err) = self.flush().await {
                tracing::warn!(error = %err, "cannot flush auth figures; keeping them for the next try");
            }
            self.publish_user_counts().await;
        }
    }

    /// Users by migration state for Prometheus (`identity_users`): counters
    /// the database keeps exact, so one cheap read per flush.
    async fn publish_user_counts(&self) {
        if let Ok(users) = self.storage.user_counts().await {
            for (state, n) in [
                ("legacy_only", users.legacy_only),
                ("migrated", users.migrated),
                ("clerk_native", users.clerk_native),
            ] {
                ::metrics::gauge!("identity_users", "state" => state).set(n as f64);
            }
        }
    }

    /// The look-back a request gets: its days rounded up to a bucket.
    pub fn check_readiness_days(days: u32) -> Result<u32, DomainError> {
        match days {
            0 => Ok(DEFAULT_READINESS_DAYS),
            d if d <= MAX_READINESS_DAYS => Ok(READINESS_BUCKETS
                .into_iter()
                .find(|bucket| *bucket >= d)
                .unwrap_or(MAX_READINESS_DAYS)),
            _ => Err(DomainError::invalid(
                "readiness_days",
                format!("must be at most {MAX_READINESS_DAYS}"),
            )),
        }
    }

    pub async fn snapshot(
        &self,
        caller: &Caller,
        window: Window,
        readiness_days: u32,
    ) -> Result<StatsSnapshot, DomainError> {
        let readiness_days = Self::admit(caller, readiness_days)?;
        self.compute(window, readiness_days).await
    }

    /// Any scope may read stats; the look-back it gets.
    fn admit(caller: &Caller, readiness_days: u32) -> Result<u32, DomainError> {
        caller.require_any(&Scope::SERVICE)?;
        Self::check_readiness_days(readiness_days)
    }

    async fn compute(&self, window: Window, readiness_days: u32) -> Result<StatsSnapshot, DomainError> {
        // This replica's own figures are exact; other replicas' lag by one flush interval.
        if let Err(err) = self.flush().await {
            tracing::warn!(error = %err, "cannot flush auth figures before reading stats");
        }
        let now = Utc::now();
        let since_bucket = window.seconds().map(|s| {
            let start = now.timestamp() - s;
            start - start.rem_euclid(60)
        });
        let since_day = now.timestamp().div_euclid(86_400) - i64::from(readiness_days) + 1;
        let (users, totals, invitations, bulk_job, reconciliation, readiness) = tokio::try_join!(
            self.storage.user_counts(),
            self.storage.auth_totals(since_bucket),
            self.storage.invitation_counts(now),
            self.storage.latest_bulk_job(),
            self.storage.latest_reconcile_job(),
            async {
                self.readiness
                    .try_get_with((since_day, readiness_days), self.storage.readiness(since_day))
                    .await
                    .map_err(|e| crate::storage::StorageError::Unavailable(e.to_string().into()))
            },
        )?;

        let mut methods: Vec<MethodFigures> = Vec::new();
        for (method, outcome, count) in totals.counts {
            let figures = match methods.iter_mut().find(|m| m.method == method) {
                Some(existing) => existing,
                None => {
                    methods.push(MethodFigures {
                        method: method.clone(),
                        ..Default::default()
                    });
                    methods.last_mut().unwrap_or_else(|| unreachable!("just pushed"))
                }
            };
            figures.attempts += count;
            match outcome.as_str() {
                "success" => figures.successes += count,
                "error" => figures.errors += count,
                _ => figures.rejections.push((outcome, count)),
            }
        }
        for figures in &mut methods {
            figures.rejections.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        methods.sort_by(|a, b| a.method.cmp(&b.method));
        let attempts: i64 = methods.iter().map(|m| m.attempts).sum();
        let successes: i64 = methods.iter().map(|m| m.successes).sum();
        let errors: i64 = methods.iter().map(|m| m.errors).sum();
        let rate = |n: i64| if attempts > 0 { n as f64 / attempts as f64 } else { 0.0 };
        let pct = |q| {
            percentile(&totals.latency, q)
                .map(|v| v.min(LATENCY_BOUNDS_US[LATENCY_BOUNDS_US.len() - 2]))
                .unwrap_or(0)
        };
        Ok(StatsSnapshot {
            at: now,
            window,
            users,
            attempts,
            successes,
            rejections: attempts - successes - errors,
            errors,
            success_rate: rate(successes),
            error_rate: rate(errors),
            p50_us: pct(0.5),
            p95_us: pct(0.95),
            p99_us: pct(0.99),
            methods,
            invitations,
            bulk_job,
            reconciliation,
            readiness_days,
            readiness,
            auth_mode: self.modes.current(),
        })
    }
}
