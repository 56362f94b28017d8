//! The big-bang strategy: a bulk job creates every unmigrated legacy user in
//! Clerk through the Backend API (with the legacy password digest, so nobody
//! resets a password) and writes the mappings.
//!
//! Safe against production: a user is looked up by `external_id` before it
//! is created, so a crash between Clerk's create and our link never creates
//! twice; progress (cursor and counters) is saved after every user under a
//! lease, so a job interrupted by a crash or a restart resumes where it
//! stopped; only one job is unfinished at a time across all replicas; Clerk's
//! rate limits are honoured (a pace below them, `Retry-After` on 429).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    AuditOutcome, Caller, ClerkUserId, DomainError, Scope, UserCache, audit,
    lease::{LeaseKeeper, LeaseLost, lease_until},
};
use crate::{
    clerk::{ClerkApi, ClerkApiError, NewClerkUser},
    storage::{
        BulkCandidate, BulkCounters, BulkFilter, BulkJobRecord, BulkJobState, Conflict, LeasedJob, Storage,
        StorageError,
    },
};

/// Settings of bulk jobs.
#[derive(Debug, Clone)]
pub struct BulkConfig {
    /// Default pace of Clerk requests (per second).
    pub default_rate: f64,
    /// Highest pace a request may ask for.
    pub max_rate: f64,
    /// How long a runner's claim on a job lasts without renewal (the resume delay after a crash).
    pub lease: Duration,
}

impl Default for BulkConfig {
    fn default() -> Self {
        Self {
            default_rate: 9.0,
            max_rate: 100.0,
            lease: Duration::from_secs(30),
        }
    }
}

/// What the caller asks for.
#[derive(Debug, Clone, Default)]
pub struct BulkRequest {
    pub dry_run: bool,
    /// 0 means the default (50).
    pub batch_size: u32,
    /// 0 means the configured default.
    pub max_requests_per_second: f64,
    pub filter: BulkFilter,
    pub resume_job_id: Option<Uuid>,
}

/// The parameters a job keeps, so a resumed job runs as it started.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JobParams {
    batch_size: u32,
    rate: f64,
    filter: BulkFilter,
}

/// A snapshot of a job, streamed to the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkProgress {
    pub job_id: Uuid,
    pub state: BulkJobState,
    pub dry_run: bool,
    pub total: i64,
    pub counters: BulkCounters,
    /// Users per second since this runner started.
    pub rate: f64,
    pub eta_seconds: Option<i64>,
    pub message: String,
}

/// The result of one user.
#[derive(Debug)]
enum Outcome {
    Created,
    LinkedExisting,
    Skipped,
    Failed(String),
}

/// Clerk or the database is out: the job stops (resumable) instead of failing every user.
#[derive(Debug)]
struct Abort(String);

#[derive(Clone)]
pub struct BulkMigrations {
    storage: Arc<dyn Storage>,
    users: UserCache,
    clerk: Option<ClerkApi>,
    config: BulkConfig,
    /// This process; each runner's lease owner starts with it.
    owner: String,
    stop: watch::Receiver<bool>,
    /// Jobs with a runner in this process (and their cancel flags): one
    /// runner per job here, the lease keeps it one across replicas.
    running: Arc<Mutex<HashMap<Uuid, Arc<AtomicBool>>>>,
}

impl std::fmt::Debug for BulkMigrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkMigrations")
            .field("owner", &self.owner)
            .field("config", &self.config)
            .finish()
    }
}

const DEFAULT_BATCH: u32 = 50;
const MAX_BATCH: u32 = 500;
const MAX_FILTER_IDS: usize = 10_000;
/// Why a runner stopped when its lease was lost.
const LEASE_LOST: &str = "this runner lost the job's lease (taken over, ended elsewhere, or not renewed in time)";

/// Clerk's `password_hasher` for a stored digest; `Ok(None)` for no password.
pub fn password_hasher(digest: Option<&str>) -> Result<Option<&'static str>, String> {
    let Some(digest) = digest.map(str::trim).filter(|d| !d.is_empty()) else {
        return Ok(None);
    };
    let is_hex = |len: usize| digest.len() == len && digest.bytes().all(|b| b.is_ascii_hexdigit());
    let hasher = if ["$2a$", "$2b$", "$2y$"].iter().any(|p| digest.starts_with(p)) {
        "bcrypt"
    } else if digest.starts_with("$argon2id$") {
        "argon2id"
    } else if digest.starts_with("$argon2i$") {
        "argon2i"
    } else if digest.starts_with("$pbkdf2-sha256$") {
        "pbkdf2_sha256"
    } else if digest.starts_with("pbkdf2_sha256$") {
        "pbkdf2_sha256_django"
    } else if digest.starts_with("bcrypt_sha256$") {
        "bcrypt_sha256_django"
    } else if digest.starts_with("$P$") || digest.starts_with("$H$") {
        "phpass"
    } else if is_hex(32) {
        "md5"
    } else if is_hex(64) {
        "sha256"
    } else {
        return Err("unsupported password hash format".into());
    };
    Ok(Some(hasher))
}

fn clerk_failure(err: ClerkApiError) -> Result<Outcome, Abort> {
    if err.is_transient() {
        Err(Abort(format!("Clerk unavailable: {err}")))
    } else {
        Ok(Outcome::Failed(err.to_string()))
    }
}

impl BulkMigrations {
    pub fn new(
        storage: Arc<dyn Storage>,
        users: UserCache,
        clerk: Option<ClerkApi>,
        config: BulkConfig,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            storage,
            users,
            clerk,
            config,
            owner: format!("bulk-{}", Uuid::new_v4().simple()),
            stop,
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Starts (or resumes) a job in the background; the receiver follows its progress.
    pub async fn start(
        &self,
        caller: &Caller,
        request: BulkRequest,
    ) -> Result<watch::Receiver<BulkProgress>, DomainError> {
        caller.require(Scope::Admin)?;
        let clerk = self.clerk.clone().ok_or_else(|| {
            DomainError::FailedPrecondition(
                "bulk migration needs Clerk's Backend API (IDENTITY_CLERK_SECRET_KEY)".into(),
            )
        })?;
        // A lease owner per runner, so that a stale runner of this process
        // can never write with the credentials of a newer one.
        let owner = format!("{}-{}", self.owner, Uuid::new_v4().simple());
        let cancel = Arc::new(AtomicBool::new(false));
        // The lease runs from before the claim, never from after it.
        let leased_at = Instant::now();
        let (registration, (id, params, cursor, counters, total)) = match request.resume_job_id {
            Some(id) => {
                // Registered before the claim, so two resumes racing here cannot both pass.
                let registration = self.register(id, &cancel)?;
                (registration, self.resume(caller, id, &owner).await?)
            }
            None => {
                let created = self.create(caller, &request, &owner).await?;
                (self.register(created.0, &cancel)?, created)
            }
        };
        let initial = BulkProgress {
            job_id: id,
            state: BulkJobState::Running,
            dry_run: request.dry_run && request.resume_job_id.is_none(),
            total,
            counters,
            rate: 0.0,
            eta_seconds: None,
            message: if request.resume_job_id.is_some() {
                "resumed".into()
            } else {
                "started".into()
            },
        };
        let (tx, rx) = watch::channel(initial.clone());
        let limiter = Arc::new(RateLimiter::direct(
            Quota::with_period(Duration::from_secs_f64(1.0 / params.rate))
                .unwrap_or_else(|| Quota::per_second(std::num::NonZeroU32::MIN)),
        ));
        let runner = Runner {
            jobs: self.clone(),
            owner,
            _registration: registration,
            clerk: clerk.paced(limiter),
            caller: caller.clone(),
            params,
            cursor,
            progress: initial,
            started: Instant::now(),
            leased_at,
            processed_at_start: counters.processed,
            cancel,
            tx,
        };
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            // A server shutdown stops the runner where it is, as a crash
            // would; the lease expires and the job can be resumed.
            tokio::select! {
                _ = runner.run() => {}
                _ = stop.changed() => tracing::warn!(job_id = %id, "bulk job interrupted by shutdown; resume it later"),
            }
        });
        Ok(rx)
    }

    /// Registers a runner of job `id` in this process until the returned
    /// registration drops; FAILED_PRECONDITION when one is already running it here.
    fn register(&self, id: Uuid, cancel: &Arc<AtomicBool>) -> Result<Registration, DomainError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.contains_key(&id) {
            return Err(DomainError::FailedPrecondition(format!(
                "bulk job {id} is already running on this replica"
            )));
        }
        running.insert(id, cancel.clone());
        Ok(Registration {
            running: self.running.clone(),
            id,
        })
    }

    async fn create(
        &self,
        caller: &Caller,
        request: &BulkRequest,
        owner: &str,
    ) -> Result<(Uuid, JobParams, Option<super::UserId>, BulkCounters, i64), DomainError> {
        let batch_size = match request.batch_size {
            0 => DEFAULT_BATCH,
            n if n <= MAX_BATCH => n,
            _ => {
                return Err(DomainError::invalid(
                    "batch_size",
                    format!("must be at most {MAX_BATCH}"),
                ));
            }
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
        if request.filter.user_ids.len() > MAX_FILTER_IDS {
            return Err(DomainError::invalid(
                "user_ids",
                format!("at most {MAX_FILTER_IDS} ids"),
            ));
        }
        let params = JobParams {
            batch_size,
            rate,
            filter: request.filter.clone(),
        };
        let total = self.storage.count_bulk_candidates(&params.filter).await?;
        let id = Uuid::new_v4();
        if request.dry_run {
            let event = audit::event(
                caller,
                "bulk.dry_run",
                None,
                AuditOutcome::Success,
                format!("dry run {id} of {total} users"),
            );
            self.storage.append_audit(&event).await?;
            return Ok((id, params, None, BulkCounters::default(), total));
        }
        let job = BulkJobRecord {
            id,
            state: BulkJobState::Running,
            params: serde_json::to_string(&params).map_err(|e| DomainError::Internal(Box::new(e)))?,
            cursor: None,
            total,
            counters: BulkCounters::default(),
            started_by: caller.name.clone(),
            cancel_requested: false,
            lease_owner: Some(owner.to_owned()),
            lease_until: None,
            started_at: Utc::now(),
        };
        let event = audit::event(
            caller,
            "bulk.start",
            None,
            AuditOutcome::Success,
            format!("job {id} for {total} users"),
        );
        match self
            .storage
            .create_bulk_job(&job, lease_until(self.config.lease), &event)
            .await
        {
            Ok(()) => Ok((id, params, None, BulkCounters::default(), total)),
            Err(StorageError::Conflict(Conflict::BulkJobRunning)) => {
                let running = self
                    .storage
                    .running_bulk_job()
                    .await?
                    .map(|j| j.id.to_string())
                    .unwrap_or_default();
                let err = DomainError::FailedPrecondition(format!(
                    "bulk job {running} is unfinished: resume it with resume_job_id, or cancel it"
                ));
                audit::record_failure(self.storage.as_ref(), caller, "bulk.start", None, &err).await;
                Err(err)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// A bulk job by id, or NOT_FOUND.
    async fn job(&self, id: Uuid) -> Result<BulkJobRecord, DomainError> {
        self.storage
            .get_bulk_job(id)
            .await?
            .ok_or_else(|| DomainError::NotFound("bulk job not found".into()))
    }

    async fn resume(
        &self,
        caller: &Caller,
        id: Uuid,
        owner: &str,
    ) -> Result<(Uuid, JobParams, Option<super::UserId>, BulkCounters, i64), DomainError> {
        let job = self.job(id).await?;
        if matches!(job.state, BulkJobState::Completed | BulkJobState::Cancelled) {
            return Err(DomainError::FailedPrecondition(format!(
                "bulk job {id} is {}",
                job.state.as_db()
            )));
        }
        if job.cancel_requested {
            // Its runner stopped before it saw the cancellation: the job ends
            // now (once no runner holds it) rather than running again.
            let event = audit::event(
                caller,
                "bulk.cancel",
                None,
                AuditOutcome::Success,
                format!("job {id} cancelled instead of resumed: its cancellation was requested"),
            );
            self.storage.request_bulk_cancel(id, Utc::now(), &event).await?;
            return Err(DomainError::FailedPrecondition(format!(
                "bulk job {id} is cancelled: its cancellation was requested"
            )));
        }
        let claimed = match self
            .storage
            .claim_bulk_job(id, owner, Utc::now(), lease_until(self.config.lease))
            .await
        {
            Ok(claimed) => claimed,
            Err(StorageError::Conflict(Conflict::BulkJobRunning)) => {
                return Err(DomainError::FailedPrecondition("another bulk job is unfinished".into()));
            }
            Err(err) => return Err(err.into()),
        };
        if !claimed {
            return Err(DomainError::FailedPrecondition(format!(
                "bulk job {id} is running on another replica (its lease has not expired)"
            )));
        }
        // Read again now that the lease is ours: a runner whose lease had
        // run out may have saved progress between the first read and the
        // claim (its guarded writes fail from the claim on).
        let job = self.job(id).await?;
        let params: JobParams = serde_json::from_str(&job.params).map_err(|e| DomainError::Internal(Box::new(e)))?;
        let event = audit::event(
            caller,
            "bulk.resume",
            None,
            AuditOutcome::Success,
            format!("job {id} resumed"),
        );
        self.storage.append_audit(&event).await?;
        Ok((id, params, job.cursor, job.counters, job.total))
    }

    /// Asks a job to stop after the user in progress; a job whose runner is
    /// gone (its lease expired) is cancelled at once, so a new one can start.
    pub async fn cancel(&self, caller: &Caller, id: Uuid) -> Result<BulkJobRecord, DomainError> {
        caller.require(Scope::Admin)?;
        let local = self.running.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
        if let Some(flag) = &local {
            flag.store(true, Ordering::SeqCst);
        }
        let event = audit::event(
            caller,
            "bulk.cancel",
            None,
            AuditOutcome::Success,
            format!("job {id} cancellation requested"),
        );
        match self.storage.request_bulk_cancel(id, Utc::now(), &event).await {
            Ok(job) => Ok(job),
            // A dry run lives only here.
            Err(StorageError::NotFound(_)) if local.is_some() => Ok(BulkJobRecord {
                id,
                state: BulkJobState::Cancelled,
                params: String::new(),
                cursor: None,
                total: 0,
                counters: BulkCounters::default(),
                started_by: caller.name.clone(),
                cancel_requested: true,
                lease_owner: None,
                lease_until: None,
                started_at: Utc::now(),
            }),
            Err(StorageError::NotFound(_)) => Err(DomainError::NotFound("no running bulk job with this id".into())),
            Err(err) => Err(err.into()),
        }
    }
}

/// A job's entry in [`BulkMigrations::running`], removed when dropped
/// (the runner ended, was stopped by a shutdown, or never started).
struct Registration {
    running: Arc<Mutex<HashMap<Uuid, Arc<AtomicBool>>>>,
    id: Uuid,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

struct Runner {
    jobs: BulkMigrations,
    /// This runner's lease owner.
    owner: String,
    _registration: Registration,
    clerk: ClerkApi,
    caller: Caller,
    params: JobParams,
    cursor: Option<super::UserId>,
    progress: BulkProgress,
    started: Instant,
    /// When the lease this runner starts with was taken (or last renewed before it).
    leased_at: Instant,
    processed_at_start: i64,
    cancel: Arc<AtomicBool>,
    tx: watch::Sender<BulkProgress>,
}

impl Runner {
    async fn run(mut self) {
        let end = if self.progress.dry_run {
            self.work().await
        } else {
            let keeper = LeaseKeeper {
                storage: self.jobs.storage.clone(),
                job: LeasedJob::Bulk,
                id: self.progress.job_id,
                owner: self.owner.clone(),
                lease: self.jobs.config.lease,
                leased_at: self.leased_at,
                cancel: Some(self.cancel.clone()),
            };
            keeper
                .hold_while(self.work())
                .await
                .unwrap_or_else(|LeaseLost| Err(Abort(LEASE_LOST.into())))
        };
        let (state, message) = match end {
            Ok(state) => (state, state.as_db().to_owned()),
            Err(Abort(reason)) => (BulkJobState::Failed, reason),
        };
        self.finish(state, message).await;
    }

    async fn work(&mut self) -> Result<BulkJobState, Abort> {
        let storage = self.jobs.storage.clone();
        loop {
            let batch = storage
                .bulk_candidates(&self.params.filter, self.cursor, self.params.batch_size)
                .await
                .map_err(|e| Abort(format!("database unavailable: {e}")))?;
            if batch.is_empty() {
                return Ok(BulkJobState::Completed);
            }
            for candidate in batch {
                if self.cancel.load(Ordering::SeqCst) {
                    return Ok(BulkJobState::Cancelled);
                }
                let outcome = self.migrate(&candidate).await?;
                let counters = &mut self.progress.counters;
                counters.processed += 1;
                match &outcome {
                    Outcome::Created => counters.created += 1,
                    Outcome::LinkedExisting => counters.linked_existing += 1,
                    Outcome::Skipped => counters.skipped += 1,
                    Outcome::Failed(_) => counters.failed += 1,
                }
                self.cursor = Some(candidate.id);
                if !self.progress.dry_run {
                    if let Outcome::Failed(reason) = &outcome
                        && let Err(err) = storage
                            .record_bulk_failure(self.progress.job_id, &self.owner, candidate.id, reason)
                            .await
                    {
                        tracing::warn!(error = %err, "cannot record a bulk failure");
                    }
                    let lease = storage
                        .save_bulk_progress(
                            self.progress.job_id,
                            &self.owner,
                            self.cursor,
                            &self.progress.counters,
                            lease_until(self.jobs.config.lease),
                        )
                        .await
                        .map_err(|e| Abort(format!("database unavailable: {e}")))?;
                    if !lease.held {
                        return Err(Abort(LEASE_LOST.into()));
                    }
                    if lease.cancel_requested {
                        return Ok(BulkJobState::Cancelled);
                    }
                }
                self.publish(String::new());
            }
        }
    }

    fn publish(&mut self, message: String) {
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let done_here = (self.progress.counters.processed - self.processed_at_start).max(0) as f64;
        self.progress.rate = done_here / elapsed;
        let remaining = (self.progress.total - self.progress.counters.processed).max(0) as f64;
        self.progress.eta_seconds = (self.progress.rate > 0.0).then(|| (remaining / self.progress.rate).ceil() as i64);
        self.progress.message = message;
        if !self.progress.dry_run {
            let c = &self.progress.counters;
            for (name, value) in [
                ("total", self.progress.total),
                ("processed", c.processed),
                ("created", c.created),
                ("linked_existing", c.linked_existing),
                ("skipped", c.skipped),
                ("failed", c.failed),
            ] {
                ::metrics::gauge!("identity_bulk_job_users", "count" => name).set(value as f64);
            }
            ::metrics::gauge!("identity_bulk_job_running").set(if self.progress.state == BulkJobState::Running {
                1.0
            } else {
                0.0
            });
            // The state of the last job this replica ran, one series per state (1 for the current one).
            for state in [
                BulkJobState::Running,
                BulkJobState::Completed,
                BulkJobState::Cancelled,
                BulkJobState::Failed,
            ] {
                ::metrics::gauge!("identity_bulk_job_state", "state" => state.as_db())
                    .set(if self.progress.state == state { 1.0 } else { 0.0 });
            }
        }
        self.tx.send_replace(self.progress.clone());
    }

    async fn finish(&mut self, state: BulkJobState, message: String) {
        let job_id = self.progress.job_id;
        // A runner that lost its lease writes nothing: the job is someone else's (or resumable).
        if !self.progress.dry_run && message != LEASE_LOST {
            let c = &self.progress.counters;
            let event = audit::event(
                &self.caller,
                "bulk.finish",
                None,
                if state == BulkJobState::Completed {
                    AuditOutcome::Success
                } else {
                    AuditOutcome::Failure
                },
                format!(
                    "job {job_id} {}: {} processed, {} created, {} linked, {} skipped, {} failed ({message})",
                    state.as_db(),
                    c.processed,
                    c.created,
                    c.linked_existing,
                    c.skipped,
                    c.failed
                ),
            );
            match self
                .jobs
                .storage
                .finish_bulk_job(job_id, &self.owner, state, c, &event)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(%job_id, "bulk job taken over or ended elsewhere; its end is not recorded here")
                }
                Err(err) => {
                    tracing::error!(%job_id, error = %err, "cannot record the end of a bulk job; it stays resumable");
                }
            }
        }
        tracing::info!(%job_id, state = state.as_db(), processed = self.progress.counters.processed, "bulk job ended");
        self.progress.state = state;
        self.publish(message);
    }

    /// Creates (or finds) one user in Clerk and links it.
    async fn migrate(&self, candidate: &BulkCandidate) -> Result<Outcome, Abort> {
        let Some(email) = candidate.email.as_deref().filter(|e| !e.trim().is_empty()) else {
            return Ok(Outcome::Failed("no email address".into()));
        };
        let external_id = candidate.id.to_string();
        let existing = match self.clerk.find_users("external_id", &external_id).await {
            Ok(users) => users,
            Err(err) => return clerk_failure(err),
        };
        if let Some(user) = existing.first() {
            return if self.progress.dry_run {
                Ok(Outcome::LinkedExisting)
            } else {
                self.link(candidate, &user.id, Outcome::LinkedExisting).await
            };
        }
        let hasher = match password_hasher(candidate.password_hash.as_deref()) {
            Ok(hasher) => hasher,
            Err(reason) => return Ok(Outcome::Failed(reason)),
        };
        if self.progress.dry_run {
            return Ok(Outcome::Created);
        }
        let new_user = NewClerkUser {
            external_id: external_id.clone(),
            email_address: vec![email.to_owned()],
            password_digest: hasher.and(candidate.password_hash.clone()),
            password_hasher: hasher.map(str::to_owned),
            skip_password_requirement: hasher.is_none(),
            skip_password_checks: hasher.is_some(),
        };
        match self.clerk.create_user(&new_user).await {
            Ok(created) => self.link(candidate, &created.id, Outcome::Created).await,
            Err(ClerkApiError::Refused { code, .. }) if code == "form_identifier_exists" => {
                // The email already belongs to a Clerk user: link it when it is not someone else's.
                let owners = match self.clerk.find_users("email_address", email).await {
                    Ok(users) => users,
                    Err(err) => return clerk_failure(err),
                };
                let Some(owner) = owners.first() else {
                    return Ok(Outcome::Failed(
                        "Clerk reports the email taken but no user has it".into(),
                    ));
                };
                // The same rule as `link_by_email`: only an address the Clerk
                // user verified, and holds as its primary one, proves it is
                // this user's.
                if !owner
                    .verified_primary_email()
                    .is_some_and(|verified| verified.eq_ignore_ascii_case(email.trim()))
                {
                    return Ok(Outcome::Failed(
                        "conflict: the email belongs to a Clerk user who has not verified it as primary".into(),
                    ));
                }
                match owner.external_id.as_deref() {
                    None | Some("") => {
                        if let Err(err) = self.clerk.set_external_id(&owner.id, Some(&external_id)).await {
                            return clerk_failure(err);
                        }
                        let outcome = self.link(candidate, &owner.id, Outcome::LinkedExisting).await;
                        // A link that did not happen must not leave Clerk saying it did.
                        if !matches!(outcome, Ok(Outcome::LinkedExisting))
                            && let Err(err) = self.clerk.set_external_id(&owner.id, None).await
                        {
                            tracing::error!(clerk_user_id = %owner.id, error = %err,
                                "cannot clear the external_id set for a link that failed; Clerk and the database disagree for this user");
                        }
                        outcome
                    }
                    Some(id) if id == external_id => self.link(candidate, &owner.id, Outcome::LinkedExisting).await,
                    Some(_) => Ok(Outcome::Failed(
                        "conflict: the email belongs to a Clerk user with another external_id".into(),
                    )),
                }
            }
            Err(err) => clerk_failure(err),
        }
    }

    async fn link(&self, candidate: &BulkCandidate, clerk_id: &str, done: Outcome) -> Result<Outcome, Abort> {
        let Ok(clerk_user_id) = ClerkUserId::parse("clerk_user_id", clerk_id) else {
            return Ok(Outcome::Failed("Clerk returned a malformed user id".into()));
        };
        let event = audit::event(
            &self.caller,
            "user.link",
            Some(candidate.id),
            AuditOutcome::Success,
            format!("linked to {clerk_user_id} by bulk job {}", self.progress.job_id),
        );
        match self.jobs.storage.link_user(candidate.id, &clerk_user_id, &event).await {
            Ok(linked) => {
                self.jobs.users.forget_link(&linked).await;
                Ok(done)
            }
            Err(StorageError::Conflict(Conflict::UserAlreadyLinked) | StorageError::NotFound(_)) => {
                Ok(Outcome::Skipped)
            }
            Err(StorageError::Conflict(_)) => {
                Ok(Outcome::Failed("Clerk user is already linked to another user".into()))
            }
            Err(err) => Err(Abort(format!("database unavailable: {err}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hashers_are_detected() {
        assert_eq!(
            password_hasher(Some("$2b$12$abcdefghijklmnopqrstuv")).unwrap(),
            Some("bcrypt")
        );
        assert_eq!(password_hasher(Some("$2y$10$x")).unwrap(), Some("bcrypt"));
        assert_eq!(
            password_hasher(Some("$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA")).unwrap(),
            Some("argon2id")
        );
        assert_eq!(
            password_hasher(Some("pbkdf2_sha256$260000$salt$hash")).unwrap(),
            Some("pbkdf2_sha256_django")
        );
        assert_eq!(password_hasher(Some(&"a".repeat(32))).unwrap(), Some("md5"));
        assert_eq!(password_hasher(None).unwrap(), None);
        assert_eq!(password_hasher(Some("  ")).unwrap(), None);
        assert!(password_hasher(Some("plaintext-password")).is_err());
    }
}
