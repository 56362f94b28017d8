//! Verification counters: kept in memory per replica (atomics on the hot
//! path) and flushed into shared minute buckets, so stats read from any
//! replica are cluster-wide (lagging by at most one flush interval).

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::Utc;

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

/// Prometheus handles, registered once: looking a labelled metric up by
/// name on every call costs more than recording it.
struct Exported {
    verifications: [[::metrics::Counter; OUTCOMES.len()]; METHODS.len()],
    durations: [::metrics::Histogram; METHODS.len()],
    /// Token cache misses, hits.
    token_cache: [::metrics::Counter; 2],
}

impl Exported {
    /// Registers with the global recorder installed now (none: no-op handles).
    fn register() -> Self {
        Self {
            verifications: std::array::from_fn(|m| {
                std::array::from_fn(
                    |o| ::metrics::counter!("identity_verifications_total", "method" => METHODS[m], "outcome" => OUTCOMES[o]),
                )
            }),
            durations: std::array::from_fn(
                |m| ::metrics::histogram!("identity_verification_duration_seconds", "method" => METHODS[m]),
            ),
            token_cache: [
                ::metrics::counter!("identity_token_cache_requests_total", "result" => "miss"),
                ::metrics::counter!("identity_token_cache_requests_total", "result" => "hit"),
            ],
        }
    }
}

pub struct AuthRecorder {
    counts: [[AtomicU64; OUTCOMES.len()]; METHODS.len()],
    latency: [AtomicU64; LATENCY_BOUNDS_US.len()],
    activity: Mutex<HashMap<UserId, Activity>>,
    exported: Exported,
}

impl std::fmt::Debug for AuthRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthRecorder")
    }
}

impl Default for AuthRecorder {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            activity: Mutex::new(HashMap::new()),
            exported: Exported::register(),
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
        let o = outcome.index();
        self.counts[m][o].fetch_add(1, Ordering::Relaxed);
        self.latency[slot(elapsed)].fetch_add(1, Ordering::Relaxed);
        self.exported.verifications[m][o].increment(1);
        self.exported.durations[m].record(elapsed.as_secs_f64());
        if let (Some((user_id, migrated)), Some(method)) = (user, method) {
            let mut activity = self.activity.lock().unwrap_or_else(|p| p.into_inner());
            if activity.len() >= MAX_ACTIVITY_USERS && !activity.contains_key(&user_id) {
                return;
            }
            let entry = activity.entry(user_id).or_default();
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
        self.exported.token_cache[usize::from(hit)].increment(1);
    }

    /// Takes everything recorded since the last call, bucketed at the current minute.
    pub fn take(&self) -> AuthFlush {
        let now = Utc::now().timestamp();
        let bucket = now - now.rem_euclid(60);
        let day = now.div_euclid(86_400);
        let mut flush = AuthFlush::default();
        for (m, row) in self.counts.iter().enumerate() {
            for (o, cell) in row.iter().enumerate() {
                let n = cell.swap(0, Ordering::Relaxed);
                if n > 0 {
                    flush
                        .counts
                        .push((bucket, METHODS[m].to_owned(), OUTCOMES[o].to_owned(), n as i64));
                }
            }
        }
        for (slot, cell) in self.latency.iter().enumerate() {
            let n = cell.swap(0, Ordering::Relaxed);
            if n > 0 {
                flush.latency.push((bucket, slot as i32, n as i64));
            }
        }
        let activity = std::mem::take(&mut *self.activity.lock().unwrap_or_else(|p| p.into_inner()));
        flush.activity = activity
            .into_iter()
            .map(|(user, a)| (user, day, a.legacy, a.clerk, a.legacy_while_migrated))
            .collect();
        flush
    }

    /// Puts figures back after a failed flush, so nothing is lost.
    pub fn restore(&self, flush: AuthFlush) {
        for (_, method, outcome, n) in flush.counts {
            let m = METHODS.iter().position(|x| *x == method).unwrap_or(2);
            let o = OUTCOMES
                .iter()
                .position(|x| *x == outcome)
                .unwrap_or(OUTCOMES.len() - 1);
            self.counts[m][o].fetch_add(n as u64, Ordering::Relaxed);
        }
        for (_, slot, n) in flush.latency {
            if let Some(cell) = self.latency.get(slot as usize) {
                cell.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        let mut activity = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        for (user, _, legacy, clerk, lwm) in flush.activity {
            let entry = activity.entry(user).or_default();
            entry.legacy += legacy;
            entry.clerk += clerk;
            entry.legacy_while_migrated += lwm;
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
