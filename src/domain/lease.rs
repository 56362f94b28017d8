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

use crate::storage::{LeasedJob, Storage};

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
    /// A failed renewal is retried until the lease would have run out.
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
        let mut held_until = leased_at + lease;
        loop {
            tokio::time::sleep(lease / 3).await;
            let asked = Instant::now();
            let renewal = tokio::time::timeout_at(
                held_until.into(),
                storage.renew_lease(job, id, &owner, lease_until(lease)),
            )
            .await;
            match renewal {
                Ok(Ok(now)) if now.held => {
                    held_until = asked + lease;
                    if now.cancel_requested
                        && let Some(cancel) = &cancel
                    {
                        cancel.store(true, Ordering::SeqCst);
                    }
                }
                Ok(Ok(_)) => {
                    tracing::warn!(job_id = %id, ?job, "job taken over or ended elsewhere; this runner stops");
                    return;
                }
                Ok(Err(err)) if Instant::now() < held_until => {
                    tracing::warn!(job_id = %id, ?job, error = %err, "cannot renew the job's lease; retrying");
                }
                Ok(Err(_)) | Err(_) => {
                    tracing::warn!(job_id = %id, ?job, "the job's lease expired before it could be renewed; this runner stops");
                    return;
                }
            }
        }
    }
}
