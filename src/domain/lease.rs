//! Holding a job's lease while a runner works it: the one renewal loop of
//! every leased job (a bulk migration, a reconciliation pass). What a lease
//! guarantees is told at [`LeasedJob`]; the part it leaves to the runner is
//! here: renew in time, and stop, writing nothing more, once the lease is
//! lost.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::storage::{JobLease, LeasedJob, Storage, StorageResult};

/// When a lease of length `lease` taken now runs out.
pub(super) fn lease_until(lease: Duration) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(lease).unwrap_or_else(|_| chrono::Duration::seconds(30))
}

/// The runner no longer holds its job: another runner took it over, it
/// ended elsewhere, or no renewal succeeded before the lease ran out. The
/// runner must stop and write nothing more to the job.
#[derive(Debug)]
pub(super) struct LeaseLost;

/// One runner's lease on one job, renewed while the runner works.
pub(super) struct LeaseKeeper {
    pub storage: Arc<dyn Storage>,
    pub job: LeasedJob,
    pub id: Uuid,
    /// The runner's lease owner.
    pub owner: String,
    /// How long the lease lasts without renewal.
    pub lease: Duration,
    /// When the lease the runner starts with was taken (or last renewed
    /// before it): the lease runs from before the claim, never from after it.
    pub leased_at: Instant,
    /// Raised when a renewal learns that the job's cancellation was requested.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl LeaseKeeper {
    /// Runs `work` while the lease is renewed every third of its length. The
    /// renewals keep their own timer, so one slow call of the work (a Clerk
    /// `Retry-After` of minutes) never lets the lease lapse. Once the lease is
    /// lost, `work` is dropped where it is, mid-call included.
    pub async fn hold_while<T>(self, work: impl Future<Output = T>) -> Result<T, LeaseLost> {
        tokio::select! {
            end = work => Ok(end),
            () = self.keep() => Err(LeaseLost),
        }
    }

    /// Renews the lease every third of its length; returns once it is lost.
    /// A failed renewal is retried until the lease would have run out, and
    /// never later: the runner stops when its lease ends, not at the next
    /// renewal time after it.
    async fn keep(self) {
        let Self {
            storage,
            job,
            id,
            owner,
            lease,
            leased_at,
            cancel,
        } = self;
        let renew = || storage.renew_lease(job, id, &owner, lease_until(lease));
        let lost = keep_renewing(lease, tokio::time::Instant::from_std(leased_at), renew, |requested| {
            if requested && let Some(cancel) = &cancel {
                cancel.store(true, Ordering::SeqCst);
            }
        })
        .await;
        match lost {
            Lost::Elsewhere => {
                tracing::warn!(job_id = %id, ?job, "job taken over or ended elsewhere; this runner stops");
            }
            Lost::Expired => {
                tracing::warn!(job_id = %id, ?job, "the job's lease expired before it could be renewed; this runner stops");
            }
        }
    }
}

/// How a lease was lost.
#[derive(Debug, PartialEq, Eq)]
enum Lost {
    /// A renewal found the job taken over or ended elsewhere.
    Elsewhere,
    /// No renewal succeeded before the lease ran out.
    Expired,
}

/// The renewal loop of [`LeaseKeeper::keep`], apart from the storage: calls
/// `renew` every third of `lease` (and at the latest when the lease ends),
/// hands each successful renewal's cancellation request to `cancelled`, and
/// returns when the lease is lost.
async fn keep_renewing<F, Fut>(
    lease: Duration,
    leased_at: tokio::time::Instant,
    mut renew: F,
    mut cancelled: impl FnMut(bool),
) -> Lost
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StorageResult<JobLease>>,
{
    // Tokio's clock (the same instants as the standard one, and pausable in tests).
    use tokio::time::Instant;
    let mut held_until = leased_at + lease;
    loop {
        tokio::time::sleep_until((Instant::now() + lease / 3).min(held_until)).await;
        if Instant::now() >= held_until {
            return Lost::Expired;
        }
        let asked = Instant::now();
        match tokio::time::timeout_at(held_until, renew()).await {
            Ok(Ok(now)) if now.held => {
                held_until = asked + lease;
                cancelled(now.cancel_requested);
            }
            Ok(Ok(_)) => return Lost::Elsewhere,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot renew a job's lease; retrying until it runs out");
            }
            Err(_) => return Lost::Expired,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::storage::StorageError;

    const LEASE: Duration = Duration::from_secs(30);

    fn held() -> StorageResult<JobLease> {
        Ok(JobLease {
            held: true,
            cancel_requested: false,
        })
    }

    fn failed() -> StorageResult<JobLease> {
        Err(StorageError::Unavailable("connection reset".into()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_failing_late_stops_the_runner_when_its_lease_ends() {
        // Renewed at 10 s; the renewal at 20 s hangs and fails at 39.9 s,
        // just before the lease renewed at 10 s ends (at 40 s). The next
        // renewal time (49.9 s) is past the lease: the runner stops at 40 s.
        let start = tokio::time::Instant::now();
        let calls = AtomicUsize::new(0);
        let renew = || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    held()
                } else {
                    tokio::time::sleep(Duration::from_millis(19_900)).await;
                    failed()
                }
            }
        };
        let lost = keep_renewing(LEASE, start, renew, |_| {}).await;
        assert_eq!(lost, Lost::Expired);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(40),
            "stopped when the lease ended, not later"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_failure_is_retried_until_the_lease_ends() {
        let start = tokio::time::Instant::now();
        let calls = AtomicUsize::new(0);
        let renew = || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { failed() }
        };
        let lost = keep_renewing(LEASE, start, renew, |_| {}).await;
        assert_eq!(lost, Lost::Expired);
        assert_eq!(start.elapsed(), LEASE);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "at 10 s and 20 s");
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_keep_the_lease_and_pass_on_a_cancellation() {
        let start = tokio::time::Instant::now();
        let calls = AtomicUsize::new(0);
        let renew = || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0..=4 => Ok(JobLease {
                        held: true,
                        cancel_requested: n == 4,
                    }),
                    _ => Ok(JobLease {
                        held: false,
                        cancel_requested: false,
                    }),
                }
            }
        };
        let mut requests = Vec::new();
        let lost = keep_renewing(LEASE, start, renew, |requested| requests.push(requested)).await;
        assert_eq!(lost, Lost::Elsewhere);
        assert_eq!(start.elapsed(), Duration::from_secs(60), "six renewals, 10 s apart");
        assert_eq!(requests, [false, false, false, false, true]);
    }
}
