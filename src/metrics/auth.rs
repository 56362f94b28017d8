//! Verification counters: kept in memory per replica (atomics on the hot
//! path) and flushed into shared minute buckets, so stats read from any
//! replica are cluster-wide (lagging by at most one flush interval).

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use thread_local::ThreadLocal;

use super::per_thread::PerThreadCounters;

use crate::{
    domain::UserId,
    storage::AuthFlush,
    verification::{AuthMethod, RejectReason},
};

/// Outcomes: success, each rejection reason, and errors (outages, bad requests).
pub const OUTCOMES: [&str; 18] = [
    "success",
    "malformed",
    "expired",
    "not_yet_valid",
    "issued_in_future",
    "bad_signature",
    "unknown_key",
    "issuer",
    "audience",
    "algorithm_not_allowed",
    "revoked",
    "method_disabled",
    "user_not_found",
    "unmapped_user",
    "session_pending",
    "not_session_token",
    "legacy_after_migration",
    "error",
];

pub const METHODS: [&str; 3] = ["legacy_jwt", "clerk", "unknown"];

/// Upper bounds of the latency slots, in microseconds (the last is open).
pub const LATENCY_BOUNDS_US: [u64; 15] = [
    50,
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    u64::MAX,
];

/// Bounded so a flood of distinct users between flushes cannot grow memory.
const MAX_ACTIVITY_USERS: usize = 100_000;

/// What one verification ended as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Success,
    Rejected(RejectReason),
    Error,
}

impl AuthOutcome {
    fn index(self) -> usize {
        match self {
            Self::Success => 0,
            Self::Error => OUTCOMES.len() - 1,
            Self::Rejected(reason) => OUTCOMES
                .iter()
                .position(|o| *o == reason.as_str())
                .unwrap_or(OUTCOMES.len() - 1),
        }
    }
}

fn method_index(method: Option<AuthMethod>) -> usize {
    match method {
        Some(AuthMethod::LegacyJwt) => 0,
        Some(AuthMethod::Clerk) => 1,
        None => 2,
    }
}

#[derive(Default)]
struct Activity {
    legacy: i64,
    clerk: i64,
    legacy_while_migrated: i64,
}

impl Activity {
    fn absorb(&mut self, other: &Activity) {
        self.legacy += other.legacy;
        self.clerk += other.clerk;
        self.legacy_while_migrated += other.legacy_while_migrated;
    }
}

/// Where each figure lives in the per-thread cells.
mod cell {
    use super::{LATENCY_BOUNDS_US, METHODS, OUTCOMES};

    const LATENCY: usize = METHODS.len() * OUTCOMES.len();
    const SUM_NANOS: usize = LATENCY + METHODS.len() * LATENCY_BOUNDS_US.len();
    const TOKEN_CACHE: usize = SUM_NANOS + METHODS.len();
    pub const COUNT: usize = TOKEN_CACHE + 2;

    pub fn outcome(method: usize, outcome: usize) -> usize {
        method * OUTCOMES.len() + outcome
    }
    pub fn latency(method: usize, slot: usize) -> usize {
        LATENCY + method * LATENCY_BOUNDS_US.len() + slot
    }
    pub fn sum_nanos(method: usize) -> usize {
        SUM_NANOS + method
    }
    /// Token cache misses (0) and hits (1).
    pub fn token_cache(hit: bool) -> usize {
        TOKEN_CACHE + usize::from(hit)
    }
}

/// Verification figures of one server. Counted per thread on the hot path
/// (see [`PerThreadCounters`]); Prometheus reads the running totals, and
/// each flush takes what was added since the last one.
pub struct AuthRecorder {
    cells: PerThreadCounters<{ cell::COUNT }>,
    /// The totals the last successful flush took.
    flushed: Mutex<[u64; cell::COUNT]>,
    /// Users seen since the last flush, per thread (each thread locks only its own map).
    activity: ThreadLocal<Mutex<HashMap<UserId, Activity>>>,
    /// Entries in all the activity maps, bounded by [`MAX_ACTIVITY_USERS`].
    activity_entries: AtomicUsize,
}

impl std::fmt::Debug for AuthRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthRecorder")
    }
}

impl Default for AuthRecorder {
    fn default() -> Self {
        Self {
            cells: PerThreadCounters::default(),
            flushed: Mutex::new([0; cell::COUNT]),
            activity: ThreadLocal::new(),
            activity_entries: AtomicUsize::new(0),
        }
    }
}

/// The latency slot of a duration.
pub fn slot(elapsed: Duration) -> usize {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    LATENCY_BOUNDS_US
        .iter()
        .position(|bound| micros <= *bound)
        .unwrap_or(LATENCY_BOUNDS_US.len() - 1)
}

/// Counts `elapsed` into latency cells: one per slot from `slots_at` on, and
/// the sum in nanoseconds at `sum_at` (for Prometheus histograms).
pub(super) fn record_latency<const N: usize>(
    cells: &PerThreadCounters<N>,
    slots_at: usize,
    sum_at: usize,
    elapsed: Duration,
) {
    cells.add(slots_at + slot(elapsed), 1);
    cells.add(sum_at, u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl AuthRecorder {
    /// Records one verification. `user` is the principal's user, with
    /// whether a legacy token was used although the user is migrated.
    pub fn record(
        &self,
        method: Option<AuthMethod>,
        outcome: AuthOutcome,
        elapsed: Duration,
        user: Option<(UserId, bool)>,
    ) {
        let m = method_index(method);
        self.cells.add(cell::outcome(m, outcome.index()), 1);
        record_latency(&self.cells, cell::latency(m, 0), cell::sum_nanos(m), elapsed);
        if let (Some((user_id, migrated)), Some(method)) = (user, method) {
            let mut activity = lock(self.activity.get_or_default());
            let entry = match activity.get_mut(&user_id) {
                Some(entry) => entry,
                None => {
                    if self.activity_entries.load(Ordering::Relaxed) >= MAX_ACTIVITY_USERS {
                        return;
                    }
                    self.activity_entries.fetch_add(1, Ordering::Relaxed);
                    activity.entry(user_id).or_default()
                }
            };
            match method {
                AuthMethod::LegacyJwt => {
                    entry.legacy += 1;
                    if migrated {
                        entry.legacy_while_migrated += 1;
                    }
                }
                AuthMethod::Clerk => entry.clerk += 1,
            }
        }
    }

    /// Counts a token cache look-up (Prometheus only).
    pub fn token_cache(&self, hit: bool) {
        self.cells.add(cell::token_cache(hit), 1);
    }

    /// Takes everything recorded since the last call, bucketed at the current minute.
    pub fn take(&self) -> AuthFlush {
        let now = Utc::now().timestamp();
        let bucket = now - now.rem_euclid(60);
        let day = now.div_euclid(86_400);
        let totals = self.cells.sum();
        let since = {
            let mut flushed = lock(&self.flushed);
            let since: [u64; cell::COUNT] = std::array::from_fn(|i| totals[i].wrapping_sub(flushed[i]));
            *flushed = totals;
            since
        };
        let mut flush = AuthFlush::default();
        for (m, method) in METHODS.iter().enumerate() {
            for (o, outcome) in OUTCOMES.iter().enumerate() {
                let n = since[cell::outcome(m, o)];
                if n > 0 {
                    flush
                        .counts
                        .push((bucket, (*method).to_owned(), (*outcome).to_owned(), n as i64));
                }
            }
        }
        for slot in 0..LATENCY_BOUNDS_US.len() {
            let n: u64 = (0..METHODS.len()).map(|m| since[cell::latency(m, slot)]).sum();
            if n > 0 {
                flush.latency.push((bucket, slot as i32, n as i64));
            }
        }
        let mut users: HashMap<UserId, Activity> = HashMap::new();
        for map in self.activity.iter() {
            let drained = std::mem::take(&mut *lock(map));
            self.activity_entries.fetch_sub(drained.len(), Ordering::Relaxed);
            for (user, a) in drained {
                users.entry(user).or_default().absorb(&a);
            }
        }
        flush.activity = users
            .into_iter()
            .map(|(user, a)| (user, day, a.legacy, a.clerk, a.legacy_while_migrated))
            .collect();
        flush
    }

    /// Puts figures back after a failed flush, so nothing is lost: the next
    /// flush takes them again.
    pub fn restore(&self, flush: AuthFlush) {
        {
            let mut flushed = lock(&self.flushed);
            for (_, method, outcome, n) in &flush.counts {
                let m = METHODS.iter().position(|x| x == method).unwrap_or(2);
                let o = OUTCOMES.iter().position(|x| x == outcome).unwrap_or(OUTCOMES.len() - 1);
                let i = cell::outcome(m, o);
                flushed[i] = flushed[i].wrapping_sub(*n as u64);
            }
            // The flush sums latency over methods; put it back under the first
            // method that has that much (only the per-slot sums are flushed).
            for (_, slot, n) in &flush.latency {
                let Ok(slot) = usize::try_from(*slot) else { continue };
                if slot >= LATENCY_BOUNDS_US.len() {
                    continue;
                }
                let mut left = *n as u64;
                for m in 0..METHODS.len() {
                    let i = cell::latency(m, slot);
                    let back = left.min(flushed[i]);
                    flushed[i] -= back;
                    left -= back;
                }
            }
        }
        let mut activity = lock(self.activity.get_or_default());
        for (user, _, legacy, clerk, legacy_while_migrated) in flush.activity {
            let entry = activity.entry(user).or_insert_with(|| {
                self.activity_entries.fetch_add(1, Ordering::Relaxed);
                Activity::default()
            });
            entry.absorb(&Activity {
                legacy,
                clerk,
                legacy_while_migrated,
            });
        }
    }

    /// Appends the verification figures in the Prometheus text format.
    pub fn render_prometheus(&self, out: &mut super::prometheus::Text) {
        let totals = self.cells.sum();
        out.family("identity_verifications_total", "counter");
        for (m, method) in METHODS.iter().enumerate() {
            for (o, outcome) in OUTCOMES.iter().enumerate() {
                out.sample(
                    "identity_verifications_total",
                    &[("method", method), ("outcome", outcome)],
                    totals[cell::outcome(m, o)],
                );
            }
        }
        out.family("identity_verification_duration_seconds", "histogram");
        for (m, method) in METHODS.iter().enumerate() {
            let slots: [u64; LATENCY_BOUNDS_US.len()] = std::array::from_fn(|s| totals[cell::latency(m, s)]);
            out.histogram(
                "identity_verification_duration_seconds",
                &[("method", method)],
                &slots,
                totals[cell::sum_nanos(m)],
            );
        }
        out.family("identity_token_cache_requests_total", "counter");
        for (hit, result) in [(false, "miss"), (true, "hit")] {
            out.sample(
                "identity_token_cache_requests_total",
                &[("result", result)],
                totals[cell::token_cache(hit)],
            );
        }
    }
}

/// The value below which a share `q` of the samples fall (the slot's upper bound), in microseconds.
pub fn percentile(slots: &[(i32, i64)], q: f64) -> Option<u64> {
    let total: i64 = slots.iter().map(|(_, n)| *n).sum();
    if total <= 0 {
        return None;
    }
    let mut sorted = slots.to_vec();
    sorted.sort_by_key(|(slot, _)| *slot);
    let target = (q * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (slot, n) in sorted {
        seen += n;
        if seen >= target {
            return LATENCY_BOUNDS_US.get(slot as usize).copied();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_flush_and_restore() {
        let recorder = AuthRecorder::default();
        let user = UserId::new_random();
        recorder.record(
            Some(AuthMethod::LegacyJwt),
            AuthOutcome::Success,
            Duration::from_micros(80),
            Some((user, true)),
        );
        recorder.record(
            Some(AuthMethod::Clerk),
            AuthOutcome::Rejected(RejectReason::Expired),
            Duration::from_millis(3),
            None,
        );
        recorder.record(None, AuthOutcome::Error, Duration::from_secs(5), None);
        let flush = recorder.take();
        assert_eq!(flush.counts.len(), 3);
        assert!(
            flush
                .counts
                .iter()
                .any(|c| c.1 == "clerk" && c.2 == "expired" && c.3 == 1)
        );
        assert_eq!(flush.activity, vec![(user, flush.activity[0].1, 1, 0, 1)]);
        assert!(recorder.take().counts.is_empty(), "taking empties");
        recorder.restore(flush.clone());
        assert_eq!(recorder.take().counts.len(), 3);
    }

    #[test]
    fn percentiles_come_from_slots() {
        // 90 fast (≤100 µs), 10 slow (≤10 ms).
        let slots = [(1, 90), (7, 10)];
        assert_eq!(percentile(&slots, 0.5), Some(100));
        assert_eq!(percentile(&slots, 0.9), Some(100));
        assert_eq!(percentile(&slots, 0.95), Some(10_000));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(slot(Duration::from_micros(50)), 0);
        assert_eq!(slot(Duration::from_secs(100)), LATENCY_BOUNDS_US.len() - 1);
    }
}
