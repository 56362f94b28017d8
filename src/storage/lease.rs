//! Leased jobs, implemented once per backend for every kind of job: the
//! kinds and the tables they live in, and what a guarded write returns.

use super::Conflict;

/// A kind of leased job: a long-running background job (a bulk migration,
/// a Clerk reconciliation pass) stored as one row and worked by one runner
/// at a time across all replicas.
///
/// What a lease guarantees:
///
/// - A job row names its runner (`lease_owner`) and until when that runner
///   holds it (`lease_until`). Another runner can claim the job only once
///   that time has passed (or the job failed), so two live runners never
///   work the same job.
/// - Every write a runner makes (its progress, a renewal, the end of the
///   job) is guarded: it applies only while the job is running and the
///   writer still holds the lease. A runner that was taken over writes
///   nothing, and learns so from the write.
/// - At most one job of a kind is unfinished (a unique index on
///   `state = 'running'`); a second one is refused with the kind's
///   [`Conflict`].
///
/// A lease is not a lock: a runner whose renewals fail must stop by itself
/// once its `lease_until` has passed (the domain's lease keeper does this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeasedJob {
    /// A bulk migration (`identity_bulk_jobs`).
    Bulk,
    /// A reconciliation pass against Clerk (`identity_reconcile_jobs`).
    Reconcile,
}

impl LeasedJob {
    /// The table holding the jobs.
    pub(crate) fn table(self) -> &'static str {
        match self {
            Self::Bulk => "identity_bulk_jobs",
            Self::Reconcile => "identity_reconcile_jobs",
        }
    }

    /// The columns a job record is read from.
    pub(crate) fn columns(self) -> &'static str {
        match self {
            Self::Bulk => {
                "id, state, params, cursor_user_id, total, processed, created, linked_existing, skipped, failed,
                 started_by, cancel_requested, lease_owner, lease_until, started_at"
            }
            Self::Reconcile => {
                "id, state, fix, params, cursor, summary, started_by, lease_owner, lease_until, started_at, finished_at"
            }
        }
    }

    /// The conflict a second unfinished job of this kind meets.
    pub(crate) fn conflict(self) -> Conflict {
        match self {
            Self::Bulk => Conflict::BulkJobRunning,
            Self::Reconcile => Conflict::ReconcileRunning,
        }
    }

    /// What a guarded write returns as the job's cancellation request: the
    /// column, or `FALSE` for a kind that cannot be cancelled.
    pub(crate) fn cancel_flag(self) -> &'static str {
        match self {
            Self::Bulk => "cancel_requested",
            Self::Reconcile => "FALSE",
        }
    }
}

/// Which job row to read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum JobRow {
    Id(uuid::Uuid),
    /// The unfinished one, if any.
    Running,
    /// The most recently started one.
    Latest,
}

/// What a guarded write learned about the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLease {
    /// False when the runner no longer holds the job (taken over, or ended
    /// elsewhere): nothing was written and the runner must stop.
    pub held: bool,
    /// An administrator asked the job to stop (never, for kinds that cannot
    /// be cancelled).
    pub cancel_requested: bool,
}

impl JobLease {
    /// From a guarded write's `RETURNING` of [`LeasedJob::cancel_flag`]: no row means the lease is lost.
    pub(crate) fn from_returned(cancel_requested: Option<bool>) -> Self {
        Self {
            held: cancel_requested.is_some(),
            cancel_requested: cancel_requested.unwrap_or(false),
        }
    }
}
