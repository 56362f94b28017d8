//! Reconciliation with Clerk: webhooks are not guaranteed, so a pass pages
//! through Clerk's users (`GET /v1/users`, by `offset`) and then through the
//! mappings, and reports what disagrees, by kind:
//!
//! - `external_id_mapped_elsewhere`: a Clerk user's `external_id` names a
//!   user mapped to another Clerk id (or it is mapped to another user);
//! - `clerk_user_missing`: a mapping whose Clerk user no longer exists;
//! - `external_id_unknown`: a Clerk user's `external_id` names no known user;
//! - `email_mismatch`: a mapped user whose email differs from Clerk's;
//! - `missing_mapping`: a Clerk user whose `external_id` names an unlinked
//!   user it is not mapped to;
//! - `invalid_clerk_user_id`: a Clerk user whose id is not one this service
//!   accepts (`user_` and letters or digits): it is checked no further, and
//!   its id is reported escaped, at most [`MAX_SHOWN_ID`] characters.
//!
//! A dry run is the default. With `fix`, the safe repairs go through the
//! same transactional path as webhooks (mappings of deleted Clerk users
//! removed and their tokens refused; missing mappings filled from a matching
//! `external_id`); the ambiguous kinds are reported and left alone. A pass
//! runs under a lease, one at a time cluster-wide, and resumes from its
//! saved cursor (the page it reached) after a crash or a restart. Requests
//! are paced; 429s wait for `Retry-After` and 5xx back off (see `clerk`).

use std::{
    collections::{BTreeMap, HashSet},
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    AuditOutcome, Caller, ClerkUserId, DomainError, Email, Scope, UserCache, UserId, audit,
    lease::{LeaseKeeper, LeaseLost, lease_until},
};
use crate::{
    clerk::{ClerkApi, ClerkUser},
    config::UnmappedPolicy,
    storage::{
        BulkJobState, ClerkChange, ClerkEvent, ClerkEventOutcome, Conflict, DELETED_VERSION, LeasedJob,
        ReconcileJobRecord, Storage, StorageError, UserKey,
    },
    verification::Verifier,
};

/// Every drift kind, in report order.
pub const DRIFT_KINDS: [&str; 6] = [
    "external_id_mapped_elsewhere",
    "clerk_user_missing",
    "external_id_unknown",
    "email_mismatch",
    "missing_mapping",
    "invalid_clerk_user_id",
];

/// The most characters of a malformed Clerk user id a report shows.
pub const MAX_SHOWN_ID: usize = 128;

/// Ids kept per kind in a report (the count goes on).
const MAX_IDS: usize = 1000;
/// Mappings checked per request in the second phase.
const MAPPING_BATCH: u32 = 100;
const DEFAULT_PAGE: u32 = 500;
/// Why a runner stopped when its lease was lost.
const LEASE_LOST: &str = "this runner lost the reconciliation's lease";

/// What the caller asks for.
#[derive(Debug, Clone, Default)]
pub struct ReconcileRequest {
    pub fix: bool,
    /// 0 means the configured default.
    pub max_requests_per_second: f64,
    /// Clerk users per page, 1 to 500; 0 means 500.
    pub page_size: u32,
    pub resume_job_id: Option<Uuid>,
}

/// One kind of drift found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    pub count: i64,
    pub fixed: i64,
    /// Clerk user ids, the first [`MAX_IDS`].
    pub ids: Vec<String>,
}

/// A pass's findings so far (stored as JSON with the job).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileSummary {
    pub clerk_users_seen: i64,
    pub mappings_checked: i64,
    pub drift: BTreeMap<String, Drift>,
}

impl ReconcileSummary {
    fn found(&mut self, kind: &str, clerk_user_id: &str, fixed: bool) {
        let drift = self.drift.entry(kind.to_owned()).or_default();
        drift.count += 1;
        if fixed {
            drift.fixed += 1;
        }
        if drift.ids.len() < MAX_IDS {
            drift.ids.push(clerk_user_id.to_owned());
        }
    }

    /// Reads a stored summary; an unreadable one starts empty.
    pub fn from_json(raw: &str) -> Self {
        serde_json::from_str(raw).unwrap_or_default()
    }
}

/// Where a pass continues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
enum Cursor {
    ClerkUsers { offset: u64 },
    Mappings { after: Option<String> },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Params {
    rate: f64,
    page_size: u32,
}

/// A snapshot of a pass, streamed to the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileProgress {
    pub job_id: Uuid,
    pub state: BulkJobState,
    pub fix: bool,
    pub summary: ReconcileSummary,
    pub message: String,
    pub finished_at: Option<DateTime<Utc>>,
}

impl ReconcileProgress {
    /// The progress a stored pass shows (`GetMigrationStats`).
    pub fn from_record(job: &ReconcileJobRecord) -> Self {
        Self {
            job_id: job.id,
            state: job.state,
            fix: job.fix,
            summary: ReconcileSummary::from_json(&job.summary),
            message: String::new(),
            finished_at: job.finished_at,
        }
    }
}

#[derive(Clone)]
pub struct Reconciliations {
    storage: Arc<dyn Storage>,
    clerk: Option<ClerkApi>,
    verifier: Option<Verifier>,
    users: Option<UserCache>,
    config: super::BulkConfig,
    stop: watch::Receiver<bool>,
}

impl std::fmt::Debug for Reconciliations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciliations").finish()
    }
}

struct Abort(String);

impl Reconciliations {
    /// `verifier` (in the server) applies refusals at once on this replica.
    pub fn new(
        storage: Arc<dyn Storage>,
        clerk: Option<ClerkApi>,
        verifier: Option<Verifier>,
        config: super::BulkConfig,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let users = verifier.as_ref().map(|v| v.users().clone());
        Self {
            storage,
            clerk,
            verifier,
            users,
            config,
            stop,
        }
    }

    /// Starts (or resumes) a pass in the background; the receiver follows it.
    pub async fn start(
        &self,
        caller: &Caller,
        request: ReconcileRequest,
    ) -> Result<watch::Receiver<ReconcileProgress>, DomainError> {
        caller.require(Scope::Admin)?;
        let clerk = self.clerk.clone().ok_or_else(|| {
            DomainError::FailedPrecondition(
                "reconciliation needs Clerk's Backend API (IDENTITY_CLERK_SECRET_KEY)".into(),
            )
        })?;
        let owner = format!("reconcile-{}", Uuid::new_v4().simple());
        // The lease runs from before the claim, never from after it.
        let leased_at = Instant::now();
        let (job, params, cursor) = match request.resume_job_id {
            Some(id) => self.resume(caller, id, &owner).await?,
            None => self.create(caller, &request, &owner).await?,
        };
        let initial = ReconcileProgress {
            job_id: job.id,
            state: BulkJobState::Running,
            fix: job.fix,
            summary: ReconcileSummary::from_json(&job.summary),
            message: if request.resume_job_id.is_some() {
                "resumed".into()
            } else {
                "started".into()
            },
            finished_at: None,
        };
        let (tx, rx) = watch::channel(initial.clone());
        let limiter = Arc::new(RateLimiter::direct(
            Quota::with_period(Duration::from_secs_f64(1.0 / params.rate))
                .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)),
        ));
        let runner = Runner {
            jobs: self.clone(),
            owner,
            clerk: clerk.paced(limiter),
            caller: caller.clone(),
            params,
            cursor,
            progress: initial,
            leased_at,
            lost: false,
            tx,
        };
        let mut stop = self.stop.clone();
        let id = job.id;
        tokio::spawn(async move {
            tokio::select! {
                _ = runner.run() => {}
                _ = stop.changed() => tracing::warn!(job_id = %id, "reconciliation interrupted by shutdown; resume it later"),
            }
        });
        Ok(rx)
    }

    async fn create(
        &self,
        caller: &Caller,
        request: &ReconcileRequest,
        owner: &str,
    ) -> Result<(ReconcileJobRecord, Params, Cursor), DomainError> {
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE,
            n if n <= 500 => n,
            _ => return Err(DomainError::invalid("page_size", "must be at most 500")),
        };
        let rate = match request.max_requests_per_second {
            0.0 => self.config.default_rate,
            r if r.is_finite() && r > 0.0 && r <= self.config.max_rate => r,
            _ => {
                return Err(DomainError::invalid(
                    "max_requests_per_second",
                    format!("must be above 0 and at most {}", self.config.max_rate),
                ));
            }
        };
        let params = Params { rate, page_size };
        let cursor = Cursor::ClerkUsers { offset: 0 };
        let job = ReconcileJobRecord {
            id: Uuid::new_v4(),
            state: BulkJobState::Running,
            fix: request.fix,
            params: serde_json::to_string(&params).map_err(|e| DomainError::Internal(Box::new(e)))?,
            cursor: Some(serde_json::to_string(&cursor).map_err(|e| DomainError::Internal(Box::new(e)))?),
            summary: "{}".into(),
            started_by: caller.name.clone(),
            lease_owner: Some(owner.to_owned()),
            lease_until: None,
            started_at: Utc::now(),
            finished_at: None,
        };
        let event = audit::event(
            caller,
            "reconcile.start",
            None,
            AuditOutcome::Success,
            format!(
                "reconciliation {} ({})",
                job.id,
                if job.fix { "fix" } else { "dry run" }
            ),
        );
        match self
            .storage
            .create_reconcile_job(&job, lease_until(self.config.lease), &event)
            .await
        {
            Ok(()) => Ok((job, params, cursor)),
            Err(StorageError::Conflict(Conflict::ReconcileRunning)) => {
                let running = self
                    .storage
                    .running_reconcile_job()
                    .await?
                    .map(|j| j.id.to_string())
                    .unwrap_or_default();
                Err(DomainError::FailedPrecondition(format!(
                    "reconciliation {running} is unfinished: resume it with resume_job_id"
                )))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// A reconciliation pass by id, or NOT_FOUND.
    async fn job(&self, id: Uuid) -> Result<ReconcileJobRecord, DomainError> {
        self.storage
            .get_reconcile_job(id)
            .await?
            .ok_or_else(|| DomainError::NotFound("reconciliation not found".into()))
    }

    async fn resume(
        &self,
        caller: &Caller,
        id: Uuid,
        owner: &str,
    ) -> Result<(ReconcileJobRecord, Params, Cursor), DomainError> {
        let job = self.job(id).await?;
        if matches!(job.state, BulkJobState::Completed | BulkJobState::Cancelled) {
            return Err(DomainError::FailedPrecondition(format!(
                "reconciliation {id} is {}",
                job.state.as_db()
            )));
        }
        let claimed = match self
            .storage
            .claim_reconcile_job(id, owner, Utc::now(), lease_until(self.config.lease))
            .await
        {
            Ok(claimed) => claimed,
            Err(StorageError::Conflict(Conflict::ReconcileRunning)) => {
                return Err(DomainError::FailedPrecondition(
                    "another reconciliation is unfinished".into(),
                ));
            }
            Err(err) => return Err(err.into()),
        };
        if !claimed {
            return Err(DomainError::FailedPrecondition(format!(
                "reconciliation {id} is running (its lease has not expired)"
            )));
        }
        // Read again now that the lease is ours (see the bulk job's resume).
        let job = self.job(id).await?;
        let params: Params = serde_json::from_str(&job.params).map_err(|e| DomainError::Internal(Box::new(e)))?;
        let cursor = job
            .cursor
            .as_deref()
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or(Cursor::ClerkUsers { offset: 0 });
        self.storage
            .append_audit(&audit::event(
                caller,
                "reconcile.resume",
                None,
                AuditOutcome::Success,
                format!("reconciliation {id} resumed"),
            ))
            .await?;
        Ok((job, params, cursor))
    }
}

struct Runner {
    jobs: Reconciliations,
    owner: String,
    clerk: ClerkApi,
    caller: Caller,
    params: Params,
    cursor: Cursor,
    progress: ReconcileProgress,
    /// When the lease this runner starts with was taken.
    leased_at: Instant,
    /// The lease was lost: the pass is someone else's, its end is not written here.
    lost: bool,
    tx: watch::Sender<ReconcileProgress>,
}

impl Runner {
    async fn run(mut self) {
        let keeper = LeaseKeeper {
            storage: self.jobs.storage.clone(),
            job: LeasedJob::Reconcile,
            id: self.progress.job_id,
            owner: self.owner.clone(),
            lease: self.jobs.config.lease,
            leased_at: self.leased_at,
            cancel: None,
        };
        let end = match keeper.hold_while(self.work()).await {
            Ok(end) => end,
            Err(LeaseLost) => {
                self.lost = true;
                Err(Abort(LEASE_LOST.into()))
            }
        };
        let (state, message) = match end {
            Ok(()) => (BulkJobState::Completed, "completed".to_owned()),
            Err(Abort(reason)) => (BulkJobState::Failed, reason),
        };
        if !self.lost {
            let summary = serde_json::to_string(&self.progress.summary).unwrap_or_else(|_| "{}".into());
            let counts: Vec<String> = DRIFT_KINDS
                .iter()
                .map(|k| format!("{k}={}", self.progress.summary.drift.get(*k).map_or(0, |d| d.count)))
                .collect();
            let event = audit::event(
                &self.caller,
                "reconcile.finish",
                None,
                if state == BulkJobState::Completed {
                    AuditOutcome::Success
                } else {
                    AuditOutcome::Failure
                },
                format!(
                    "reconciliation {} {}: {} Clerk users, {} mappings; {} ({message})",
                    self.progress.job_id,
                    state.as_db(),
                    self.progress.summary.clerk_users_seen,
                    self.progress.summary.mappings_checked,
                    counts.join(", ")
                ),
            );
            if let Err(err) = self
                .jobs
                .storage
                .finish_reconcile_job(self.progress.job_id, &self.owner, state, &summary, &event)
                .await
            {
                tracing::error!(job_id = %self.progress.job_id, error = %err, "cannot record the end of a reconciliation; it stays resumable");
            }
            for kind in DRIFT_KINDS {
                let count = self.progress.summary.drift.get(kind).map_or(0, |d| d.count);
                ::metrics::gauge!("identity_reconcile_drift", "kind" => kind).set(count as f64);
            }
        }
        tracing::info!(job_id = %self.progress.job_id, state = state.as_db(), "reconciliation ended");
        self.progress.state = state;
        self.progress.finished_at = Some(Utc::now());
        self.progress.message = message;
        self.tx.send_replace(self.progress.clone());
    }

    async fn save(&mut self) -> Result<(), Abort> {
        let cursor = serde_json::to_string(&self.cursor).map_err(|e| Abort(e.to_string()))?;
        let summary = serde_json::to_string(&self.progress.summary).map_err(|e| Abort(e.to_string()))?;
        let held = self
            .jobs
            .storage
            .save_reconcile_progress(
                self.progress.job_id,
                &self.owner,
                &cursor,
                &summary,
                lease_until(self.jobs.config.lease),
            )
            .await
            .map_err(|e| Abort(format!("database unavailable: {e}")))?;
        if !held {
            self.lost = true;
            return Err(Abort(LEASE_LOST.into()));
        }
        self.tx.send_replace(self.progress.clone());
        Ok(())
    }

    async fn work(&mut self) -> Result<(), Abort> {
        loop {
            match self.cursor.clone() {
                Cursor::ClerkUsers { offset } => {
                    let page = self
                        .clerk
                        .list_users(self.params.page_size, offset)
                        .await
                        .map_err(|e| Abort(format!("Clerk unavailable: {e}")))?;
                    for user in &page {
                        self.examine(user).await?;
                    }
                    self.progress.summary.clerk_users_seen += page.len() as i64;
                    self.cursor = if page.len() < self.params.page_size as usize {
                        Cursor::Mappings { after: None }
                    } else {
                        Cursor::ClerkUsers {
                            offset: offset + page.len() as u64,
                        }
                    };
                }
                Cursor::Mappings { after } => {
                    let after = after
                        .map(|a| ClerkUserId::parse("cursor", &a))
                        .transpose()
                        .map_err(|e| Abort(e.to_string()))?;
                    let batch = self
                        .jobs
                        .storage
                        .mappings_after(after.as_ref(), MAPPING_BATCH)
                        .await
                        .map_err(|e| Abort(format!("database unavailable: {e}")))?;
                    let Some(last) = batch.last() else {
                        return Ok(());
                    };
                    let ids: Vec<&str> = batch.iter().map(|m| m.clerk_user_id.as_str()).collect();
                    let found: HashSet<String> = self
                        .clerk
                        .users_by_ids(&ids)
                        .await
                        .map_err(|e| Abort(format!("Clerk unavailable: {e}")))?
                        .into_iter()
                        .map(|u| u.id)
                        .collect();
                    let last = last.clerk_user_id.to_string();
                    for mapping in &batch {
                        if found.contains(mapping.clerk_user_id.as_str()) {
                            continue;
                        }
                        // Absent from the list: confirmed one by one before anything is removed.
                        let gone = self
                            .clerk
                            .get_user(&mapping.clerk_user_id)
                            .await
                            .map_err(|e| Abort(format!("Clerk unavailable: {e}")))?
                            .is_none();
                        if gone {
                            let fixed = self.progress.fix && self.remove(&mapping.clerk_user_id).await?;
                            self.progress
                                .summary
                                .found("clerk_user_missing", mapping.clerk_user_id.as_str(), fixed);
                        }
                    }
                    self.progress.summary.mappings_checked += batch.len() as i64;
                    self.cursor = Cursor::Mappings { after: Some(last) };
                }
            }
            self.save().await?;
        }
    }

    async fn examine(&mut self, user: &ClerkUser) -> Result<(), Abort> {
        let db = |e: StorageError| Abort(format!("database unavailable: {e}"));
        let Ok(clerk_user_id) = ClerkUserId::parse("id", &user.id) else {
            // Hostile or garbled: shown escaped and bounded, never as sent.
            let shown: String = user
                .id
                .chars()
                .flat_map(char::escape_debug)
                .take(MAX_SHOWN_ID)
                .collect();
            tracing::warn!(clerk_user_id = %shown, "a Clerk user's id is malformed; it is not reconciled");
            self.progress.summary.found("invalid_clerk_user_id", &shown, false);
            return Ok(());
        };
        let storage = self.jobs.storage.clone();
        let mapped = storage
            .find_user(&UserKey::ClerkUserId(clerk_user_id.clone()))
            .await
            .map_err(db)?;
        let external = user.external_id.as_deref().map(str::trim).filter(|e| !e.is_empty());
        if let Some(external) = external {
            let named = match UserId::parse("external_id", external) {
                Ok(id) => storage.find_user(&UserKey::Id(id)).await.map_err(db)?,
                Err(_) => None,
            };
            match named {
                None => self.progress.summary.found("external_id_unknown", &user.id, false),
                Some(named) if named.clerk_user_id.as_deref() == Some(user.id.as_str()) => {}
                Some(named) if named.clerk_user_id.is_some() || mapped.is_some() || named.clerk_native => self
                    .progress
                    .summary
                    .found("external_id_mapped_elsewhere", &user.id, false),
                Some(_) => {
                    let fixed = self.progress.fix && self.link(&clerk_user_id, user, external).await?;
                    self.progress.summary.found("missing_mapping", &user.id, fixed);
                }
            }
        }
        if let (Some(mapped), Some(clerk_email)) = (&mapped, user.verified_primary_email()) {
            let same = mapped
                .email
                .as_deref()
                .is_some_and(|e| e.trim().eq_ignore_ascii_case(clerk_email.trim()));
            if !same {
                self.progress.summary.found("email_mismatch", &user.id, false);
            }
        }
        Ok(())
    }

    /// Applies a repair as an event of its own, through the webhooks' path.
    async fn apply(&self, event: ClerkEvent) -> Result<bool, Abort> {
        let result = self
            .jobs
            .storage
            .apply_clerk_event(&event)
            .await
            .map_err(|e| Abort(format!("database unavailable: {e}")))?;
        if let Some(revocation) = &result.revocation
            && let Some(verifier) = &self.jobs.verifier
        {
            verifier.apply_revocation(revocation);
        }
        if let Some(users) = &self.jobs.users {
            for user in &result.users {
                users.invalidate(*user, None).await;
            }
            for clerk in &result.clerk_user_ids {
                users.forget_clerk(clerk).await;
            }
        }
        Ok(matches!(
            result.outcome,
            ClerkEventOutcome::Applied | ClerkEventOutcome::Duplicate
        ))
    }

    async fn link(&self, clerk_user_id: &ClerkUserId, user: &ClerkUser, external: &str) -> Result<bool, Abort> {
        self.apply(ClerkEvent {
            id: format!("reconcile_{}_{}_link", self.progress.job_id.simple(), clerk_user_id),
            event_type: "reconcile.link".into(),
            occurred_at: Some(Utc::now()),
            version: user.updated_at,
            change: ClerkChange::User {
                clerk_user_id: clerk_user_id.clone(),
                external_id: Some(external.to_owned()),
                verified_email: user
                    .verified_primary_email()
                    .and_then(|e| Email::parse("email", e).ok()),
                unmapped: UnmappedPolicy::Reject,
            },
            caller: self.caller.name.clone(),
        })
        .await
    }

    async fn remove(&self, clerk_user_id: &ClerkUserId) -> Result<bool, Abort> {
        let refuse_until = Utc::now()
            + chrono::Duration::from_std(crate::webhooks::REFUSAL).unwrap_or_else(|_| chrono::Duration::days(1));
        self.apply(ClerkEvent {
            id: format!("reconcile_{}_{}_deleted", self.progress.job_id.simple(), clerk_user_id),
            event_type: "reconcile.user_deleted".into(),
            occurred_at: Some(Utc::now()),
            version: Some(DELETED_VERSION),
            change: ClerkChange::UserDeleted {
                clerk_user_id: clerk_user_id.clone(),
                refuse_until,
            },
            caller: self.caller.name.clone(),
        })
        .await
    }
}
