//! Persistence behind one trait, with a SQLite implementation (the embedded
//! default) and a PostgreSQL one (production). Both pass the same
//! conformance suite in `tests/integration/storage_conformance.rs`.

mod clerk_events;
mod error;
mod lease;
mod postgres;
mod sqlite;
mod users_table;

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use clerk_events::{ClerkChange, ClerkEvent, ClerkEventOutcome, ClerkEventResult, DELETED_VERSION};
use error::classify;
pub use error::{Conflict, StorageError};
use lease::JobRow;
pub use lease::{JobLease, LeasedJob};
pub use postgres::PostgresStorage;
pub use sqlite::SqliteStorage;
pub use users_table::{ColumnSetting, Ident, UsersTableConfig};

use crate::domain::{AuditOutcome, ClerkUserId, Email, UserId};

pub type StorageResult<T> = Result<T, StorageError>;

/// How to find a user.
#[derive(Debug, Clone)]
pub enum UserKey {
    Id(UserId),
    ClerkUserId(ClerkUserId),
    Email(Email),
}

/// Several users of one kind of key, found in one statement.
#[derive(Debug, Clone)]
pub enum UserKeys {
    Ids(Vec<UserId>),
    ClerkUserIds(Vec<ClerkUserId>),
}

/// Each user once, from rows that may hold an id twice (the directory's
/// row first, as in [`Storage::find_user`]).
pub(crate) fn first_row_per_user(
    rows: impl ExactSizeIterator<Item = StorageResult<UserRecord>>,
) -> StorageResult<Vec<UserRecord>> {
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    let mut users = Vec::with_capacity(rows.len());
    for user in rows {
        let user = user?;
        if seen.insert(user.id) {
            users.push(user);
        }
    }
    Ok(users)
}

/// How to find a mapping.
#[derive(Debug, Clone)]
pub enum MappingKey {
    UserId(UserId),
    ClerkUserId(ClerkUserId),
}

/// A user as far as this service cares: a row of the application's users
/// table (read through the configured mapping) or of the service's own
/// directory, with its link to Clerk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: UserId,
    pub email: Option<String>,
    pub clerk_user_id: Option<String>,
    /// Created by this service on first sight through Clerk (provisioned):
    /// the application has no row for this user.
    pub clerk_native: bool,
    pub has_password: bool,
    /// `None` when the application's table has no creation time.
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// What a link wrote: the mapping, and the provisional user merged into the
/// linked one when the Clerk user had signed in before migrating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linked {
    pub mapping: MappingRecord,
    pub merged_from: Option<UserId>,
}

/// A legacy user to insert into the service's directory (the import command).
#[derive(Debug, Clone)]
pub struct NewLegacyUser {
    pub id: UserId,
    pub email: Email,
    pub password_hash: Option<String>,
}

/// A row of `user_clerk_mappings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingRecord {
    pub user_id: UserId,
    pub clerk_user_id: ClerkUserId,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An audit event to append, in the same transaction as the change it records.
#[derive(Debug, Clone)]
pub struct NewAuditEvent {
    pub caller: String,
    pub action: String,
    pub user_id: Option<UserId>,
    pub outcome: AuditOutcome,
    pub detail: String,
}

/// A stored audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub caller: String,
    pub action: String,
    pub user_id: Option<UserId>,
    pub outcome: AuditOutcome,
    pub detail: String,
}

/// Filters and paging for the audit log. Results are newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub user_id: Option<UserId>,
    pub action: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only events with an id below this one (the paging cursor).
    pub before_id: Option<i64>,
    pub limit: u32,
}

/// A value of the settings table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingRecord {
    pub value: String,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

/// A revoked legacy token, by `jti` or by the SHA-256 (hex) of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRevocation {
    pub jti: Option<String>,
    pub token_hash: Option<String>,
    pub user_id: Option<UserId>,
    /// When the entry may be purged (the token's own expiry).
    pub expires_at: DateTime<Utc>,
}

/// An active revocation: a legacy token (by `jti` or hash), an ended Clerk
/// session (by `sid`) or a deleted Clerk user (by its id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRecord {
    pub jti: Option<String>,
    pub token_hash: Option<String>,
    pub session_id: Option<String>,
    pub clerk_user_id: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// A reconciliation pass against Clerk's user list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileJobRecord {
    pub id: uuid::Uuid,
    pub state: BulkJobState,
    /// Whether the safe repairs are applied (a dry run otherwise).
    pub fix: bool,
    /// The pass's parameters (JSON), so a resumed pass runs as it started.
    pub params: String,
    /// Where the pass continues (JSON, the runner's own form).
    pub cursor: Option<String>,
    /// The drift found so far (JSON).
    pub summary: String,
    pub started_by: String,
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Revocations read from the database, and from when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationChanges {
    /// Unexpired revocations written or extended since the time asked for.
    pub records: Vec<RevocationRecord>,
    /// The database's clock when the read began: the next read asks for
    /// changes since then (less an overlap for writes that commit late).
    pub as_of: DateTime<Utc>,
}

/// An email to deliver through the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOutboxMessage {
    pub kind: String,
    pub user_id: Option<UserId>,
    pub recipient: String,
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
}

/// A migration invitation: the token's hash, its expiry and its email,
/// written together.
#[derive(Debug, Clone)]
pub struct NewInvitation {
    pub user_id: UserId,
    /// SHA-256 (hex) of the migration token; the token itself is never stored here.
    pub token_hash: String,
    pub expires_at: DateTime<Utc>,
    pub email: NewOutboxMessage,
    /// The caller that supplied the address, when the application's table
    /// has no readable email.
    pub email_supplied_by: Option<String>,
}

/// An outbox message claimed by a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    pub id: uuid::Uuid,
    pub kind: String,
    pub recipient: String,
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
    /// Delivery attempts before this one.
    pub attempts: u32,
}

/// Outbox depth, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxCounts {
    pub pending: i64,
    pub sent: i64,
    pub failed: i64,
}

/// Where a bulk migration job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkJobState {
    Running,
    Completed,
    Cancelled,
    Failed,
}

impl BulkJobState {
    pub fn as_db(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }

    pub fn from_db(value: &str) -> Option<Self> {
        match value {
            "running" => Some(Self::Running),
            "completed" => Some(Self::Completed),
            "cancelled" => Some(Self::Cancelled),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// A bulk job's tallies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BulkCounters {
    pub processed: i64,
    pub created: i64,
    pub linked_existing: i64,
    pub skipped: i64,
    pub failed: i64,
}

/// A persisted bulk migration job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkJobRecord {
    pub id: uuid::Uuid,
    pub state: BulkJobState,
    /// The job's parameters (JSON), so a resumed job runs as it started.
    pub params: String,
    /// The last user processed; the job continues after it.
    pub cursor: Option<UserId>,
    pub total: i64,
    pub counters: BulkCounters,
    pub started_by: String,
    pub cancel_requested: bool,
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
}

/// Which unmigrated users a bulk job takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BulkFilter {
    /// Only these users, when not empty.
    pub user_ids: Vec<uuid::Uuid>,
    pub created_before: Option<DateTime<Utc>>,
}

/// A user a bulk job will create in Clerk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkCandidate {
    pub id: UserId,
    pub email: Option<String>,
    pub password_hash: Option<String>,
}

/// Users by migration state, kept exact by database triggers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserCounts {
    pub legacy_only: i64,
    pub migrated: i64,
    pub clerk_native: i64,
}

/// One replica's verification figures since its last flush.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthFlush {
    /// (minute bucket in Unix seconds, method, outcome, count)
    pub counts: Vec<(i64, String, String, i64)>,
    /// (minute bucket, latency slot, count)
    pub latency: Vec<(i64, i32, i64)>,
    /// Per user and day: (user, day since epoch, legacy, clerk, legacy while migrated)
    pub activity: Vec<(UserId, i64, i64, i64, i64)>,
}

/// Verification figures summed over all replicas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthTotals {
    /// (method, outcome, count)
    pub counts: Vec<(String, String, i64)>,
    /// (latency slot, count)
    pub latency: Vec<(i32, i64)>,
}

/// One minute of one method's verifications, summed over all replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthPoint {
    /// Start of the minute, in Unix seconds.
    pub bucket: i64,
    pub method: String,
    pub attempts: i64,
    pub successes: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InvitationCounts {
    /// Invitation emails the mail server accepted.
    pub sent: i64,
    /// Unused, unexpired, not superseded tokens.
    pub pending: i64,
    pub redeemed: i64,
    /// Unused tokens past their expiry (superseded ones are not counted).
    pub expired: i64,
}

/// Who would be locked out by `clerk_only`, from recorded activity. Only
/// users that are still users count: activity of a user the application
/// has since deleted (soft or hard), or merged away, is left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Users who authenticated in the window and are still users.
    pub active_users: i64,
    /// Of them, users who only used legacy tokens and have no Clerk link.
    pub legacy_only_unlinked: i64,
    /// Legacy-token verifications by them while they were already migrated.
    pub legacy_verifications_by_migrated: i64,
}

/// Everything the service stores. Implementations translate their database's
/// errors into [`StorageError`] in one place.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Cheap round trip, for health checks.
    async fn ping(&self) -> StorageResult<()>;

    /// Connections in the pool: (open, idle), for metrics.
    fn pool_status(&self) -> (u32, u32);

    async fn find_user(&self, key: &UserKey) -> StorageResult<Option<UserRecord>>;

    /// The users these keys name, in no particular order; keys that name no
    /// user are left out. Each user once, as [`Storage::find_user`] finds it.
    async fn find_users(&self, keys: &UserKeys) -> StorageResult<Vec<UserRecord>>;

    /// Inserts a legacy user into the service's directory;
    /// [`Conflict::UserExists`] when the id or email is taken by any user.
    async fn insert_legacy_user(&self, user: &NewLegacyUser) -> StorageResult<()>;

    /// Writes the mapping (and the mirror column, when configured) in one
    /// transaction, together with the audit event. A Clerk user mapped to a
    /// provisional (Clerk-native) user is merged into this user: the mapping
    /// moves, the provisional user stops resolving, and a `user.merge`
    /// event records both ids.
    async fn link_user(
        &self,
        user_id: UserId,
        clerk_user_id: &ClerkUserId,
        audit: &NewAuditEvent,
    ) -> StorageResult<Linked>;

    /// Removes the mapping (and clears the mirror column) in one transaction,
    /// together with the audit event, and remembers the Clerk user as
    /// unlinked until it is linked again. Returns what was removed.
    async fn unlink_user(&self, user_id: UserId, audit: &NewAuditEvent) -> StorageResult<MappingRecord>;

    async fn find_mapping(&self, key: &MappingKey) -> StorageResult<Option<MappingRecord>>;

    /// Whether users can be matched by email: false when the application's
    /// users table has no readable email column.
    fn users_have_emails(&self) -> bool;

    /// Whether an admin unlinked this Clerk user (and nobody linked it since).
    async fn clerk_user_unlinked(&self, clerk_user_id: &ClerkUserId) -> StorageResult<bool>;

    /// Creates a Clerk-native user in the service's directory, linked to
    /// `clerk_user_id` (user, mapping and audit event in one transaction).
    /// The email is stored when no other user has it.
    /// [`Conflict::ClerkUserTaken`] when the Clerk user is already mapped (a
    /// concurrent first sighting won); [`Conflict::ClerkUserUnlinked`] after
    /// an admin unlinked it.
    async fn provision_clerk_user(
        &self,
        clerk_user_id: &ClerkUserId,
        email: Option<&Email>,
        audit: &NewAuditEvent,
    ) -> StorageResult<UserRecord>;

    /// Supersedes the user's unused invitations, stores the new one and its
    /// email in the outbox, and appends the audit event, in one transaction.
    async fn create_invitation(&self, invitation: &NewInvitation, audit: &NewAuditEvent) -> StorageResult<()>;

    /// Consumes an invitation and links its user to `clerk_user_id`, in one
    /// transaction. [`StorageError::NotFound`]`("invitation")` when the token
    /// is unknown, expired, used or superseded (deliberately one answer).
    async fn redeem_invitation(
        &self,
        token_hash: &str,
        clerk_user_id: &ClerkUserId,
        now: DateTime<Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<Linked>;

    /// Leases up to `limit` due messages to `worker` until `lease_until`;
    /// messages leased to another live worker are skipped.
    async fn claim_outbox(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<OutboxMessage>>;

    /// Marks a message sent (after the server accepted it) and clears its bodies.
    async fn outbox_sent(&self, id: uuid::Uuid, worker: &str) -> StorageResult<()>;

    /// Records a failed attempt: retried at `retry_at`, or given up (bodies
    /// cleared) when `None`.
    async fn outbox_failed(
        &self,
        id: uuid::Uuid,
        worker: &str,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
    ) -> StorageResult<()>;

    async fn outbox_counts(&self) -> StorageResult<OutboxCounts>;

    /// Unmigrated legacy users matching the filter.
    async fn count_bulk_candidates(&self, filter: &BulkFilter) -> StorageResult<i64>;

    /// The next unmigrated legacy users after `after`, in id order.
    async fn bulk_candidates(
        &self,
        filter: &BulkFilter,
        after: Option<UserId>,
        limit: u32,
    ) -> StorageResult<Vec<BulkCandidate>>;

    /// Creates a running job leased to `owner`; [`Conflict::BulkJobRunning`]
    /// while another job is unfinished.
    async fn create_bulk_job(
        &self,
        job: &BulkJobRecord,
        lease_until: DateTime<Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<()>;

    async fn get_bulk_job(&self, id: uuid::Uuid) -> StorageResult<Option<BulkJobRecord>>;

    /// The unfinished job, if any.
    async fn running_bulk_job(&self) -> StorageResult<Option<BulkJobRecord>>;

    /// Takes over a running or failed job of the kind (what a lease
    /// guarantees: see [`LeasedJob`]) whose lease expired at `now`; false
    /// while any runner holds it, `owner` included (one runner per job). A
    /// requested cancellation is kept. The kind's [`Conflict`] when another
    /// job of the kind is unfinished.
    async fn claim_job(
        &self,
        job: LeasedJob,
        id: uuid::Uuid,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StorageResult<bool>;

    /// Renews `owner`'s lease on a running job of the kind, whatever its
    /// progress; tells whether the lease is still held, and of a requested
    /// cancellation.
    async fn renew_lease(
        &self,
        job: LeasedJob,
        id: uuid::Uuid,
        owner: &str,
        lease_until: DateTime<Utc>,
    ) -> StorageResult<JobLease>;

    /// [`Storage::claim_job`] of a bulk job.
    async fn claim_bulk_job(
        &self,
        id: uuid::Uuid,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StorageResult<bool> {
        self.claim_job(LeasedJob::Bulk, id, owner, now, lease_until).await
    }

    /// Saves the cursor and counters and renews the lease.
    async fn save_bulk_progress(
        &self,
        id: uuid::Uuid,
        owner: &str,
        cursor: Option<UserId>,
        counters: &BulkCounters,
        lease_until: DateTime<Utc>,
    ) -> StorageResult<JobLease>;

    /// [`Storage::renew_lease`] of a bulk job.
    async fn renew_bulk_lease(
        &self,
        id: uuid::Uuid,
        owner: &str,
        lease_until: DateTime<Utc>,
    ) -> StorageResult<JobLease> {
        self.renew_lease(LeasedJob::Bulk, id, owner, lease_until).await
    }

    /// Records why one user failed (the latest reason wins), while `owner`
    /// holds the running job; false (nothing written) otherwise.
    async fn record_bulk_failure(
        &self,
        id: uuid::Uuid,
        owner: &str,
        user_id: UserId,
        reason: &str,
    ) -> StorageResult<bool>;

    /// The recorded failures of a job.
    async fn bulk_failures(&self, id: uuid::Uuid) -> StorageResult<Vec<(UserId, String)>>;

    /// Ends a running job `owner` holds (completed, cancelled or failed),
    /// releases its lease and appends the audit event; false (nothing
    /// written) when the job is not running or another runner holds it.
    async fn finish_bulk_job(
        &self,
        id: uuid::Uuid,
        owner: &str,
        state: BulkJobState,
        counters: &BulkCounters,
        audit: &NewAuditEvent,
    ) -> StorageResult<bool>;

    /// Asks the runner of a running job to stop; a job with no live runner
    /// (its lease expired at `now`, or a failed job) is cancelled at once.
    /// [`StorageError::NotFound`] unless the job is running or failed.
    async fn request_bulk_cancel(
        &self,
        id: uuid::Uuid,
        now: DateTime<Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<BulkJobRecord>;

    /// Users by migration state (the application's table is counted).
    async fn user_counts(&self) -> StorageResult<UserCounts>;

    /// Adds one replica's figures to the shared buckets.
    async fn flush_auth_stats(&self, flush: &AuthFlush) -> StorageResult<()>;

    /// Sums the buckets at or after `since_bucket` (all when `None`).
    async fn auth_totals(&self, since_bucket: Option<i64>) -> StorageResult<AuthTotals>;

    /// Verifications per minute and method from `since_bucket` on, oldest first.
    async fn auth_series(&self, since_bucket: i64) -> StorageResult<Vec<AuthPoint>>;

    async fn invitation_counts(&self, now: DateTime<Utc>) -> StorageResult<InvitationCounts>;

    /// The most recently started bulk job.
    async fn latest_bulk_job(&self) -> StorageResult<Option<BulkJobRecord>>;

    /// Cutover readiness from the activity of days `since_day` onwards.
    async fn readiness(&self, since_day: i64) -> StorageResult<Readiness>;

    /// Records a revocation and its audit event; revoking again keeps the
    /// later expiry and marks the entry changed.
    async fn revoke_token(&self, revocation: &NewRevocation, audit: &NewAuditEvent) -> StorageResult<()>;

    /// Revocations that have not expired at `now`.
    async fn active_revocations(&self, now: DateTime<Utc>) -> StorageResult<Vec<RevocationRecord>>;

    /// Revocations unexpired at `now` that were written or extended at or
    /// after `since` (all of them when `None`), read through an index, with
    /// the database's time the read began.
    async fn revocations_changed_since(
        &self,
        since: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> StorageResult<RevocationChanges>;

    /// Deletes revocations that expired before `now`; returns how many.
    async fn purge_revocations(&self, now: DateTime<Utc>) -> StorageResult<u64>;

    /// Records a Clerk event by its id and applies it, in one transaction
    /// with its audit event and any refusal it writes: once per id however
    /// many replicas receive it at the same moment ([`ClerkEventOutcome::Duplicate`]
    /// for the others), and not when an event of a later version of its
    /// object was applied before ([`ClerkEventOutcome::Stale`]). An error
    /// writes nothing, so the delivery can be retried.
    async fn apply_clerk_event(&self, event: &ClerkEvent) -> StorageResult<ClerkEventResult>;

    /// Deletes at most `limit` recorded Clerk events received before
    /// `before`, oldest first, in one short statement; returns how many.
    /// Each object's newest version is kept however old it is (the
    /// out-of-order check of [`Storage::apply_clerk_event`] reads it); rows
    /// that carry no version, or no object, do not count for it and go.
    async fn purge_clerk_events(&self, before: DateTime<Utc>, limit: u32) -> StorageResult<u64>;

    /// Whether this user once lost a Clerk link (unlinked by an admin, or
    /// its Clerk user deleted) and was not linked since.
    async fn user_was_unlinked(&self, user_id: UserId) -> StorageResult<bool>;

    /// Mappings in Clerk user id order, after `after`.
    async fn mappings_after(&self, after: Option<&ClerkUserId>, limit: u32) -> StorageResult<Vec<MappingRecord>>;

    /// Creates a running reconciliation pass leased to its `lease_owner`;
    /// [`Conflict::ReconcileRunning`] while another one is unfinished.
    async fn create_reconcile_job(
        &self,
        job: &ReconcileJobRecord,
        lease_until: DateTime<Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<()>;

    async fn get_reconcile_job(&self, id: uuid::Uuid) -> StorageResult<Option<ReconcileJobRecord>>;

    /// The most recently started reconciliation pass.
    async fn latest_reconcile_job(&self) -> StorageResult<Option<ReconcileJobRecord>>;

    /// The unfinished pass, if any.
    async fn running_reconcile_job(&self) -> StorageResult<Option<ReconcileJobRecord>>;

    /// [`Storage::claim_job`] of a reconciliation pass.
    async fn claim_reconcile_job(
        &self,
        id: uuid::Uuid,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StorageResult<bool> {
        self.claim_job(LeasedJob::Reconcile, id, owner, now, lease_until).await
    }

    /// Saves the cursor and the summary and renews the lease; false (nothing
    /// written) when `owner` no longer holds the running pass.
    async fn save_reconcile_progress(
        &self,
        id: uuid::Uuid,
        owner: &str,
        cursor: &str,
        summary: &str,
        lease_until: DateTime<Utc>,
    ) -> StorageResult<bool>;

    /// [`Storage::renew_lease`] of a reconciliation pass; false when it is lost.
    async fn renew_reconcile_lease(
        &self,
        id: uuid::Uuid,
        owner: &str,
        lease_until: DateTime<Utc>,
    ) -> StorageResult<bool> {
        Ok(self
            .renew_lease(LeasedJob::Reconcile, id, owner, lease_until)
            .await?
            .held)
    }

    /// Ends a running pass `owner` holds, with its summary and audit event;
    /// false (nothing written) otherwise.
    async fn finish_reconcile_job(
        &self,
        id: uuid::Uuid,
        owner: &str,
        state: BulkJobState,
        summary: &str,
        audit: &NewAuditEvent,
    ) -> StorageResult<bool>;

    async fn get_setting(&self, key: &str) -> StorageResult<Option<SettingRecord>>;

    /// Sets a setting and appends the audit event in one transaction;
    /// returns the previous value.
    async fn put_setting(&self, key: &str, value: &str, audit: &NewAuditEvent) -> StorageResult<Option<SettingRecord>>;

    /// Appends an audit event on its own (failures, whose change rolled back).
    async fn append_audit(&self, event: &NewAuditEvent) -> StorageResult<()>;

    async fn list_audit(&self, query: &AuditQuery) -> StorageResult<Vec<AuditRecord>>;
}

/// Database connection settings.
#[derive(Debug, Clone)]
pub struct DatabaseOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// How the application's users table is read.
    pub users: UsersTableConfig,
}

impl Default for DatabaseOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            users: UsersTableConfig::default(),
        }
    }
}

/// Which backend a URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn from_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }
}

/// Opens the database a URL names; `migrate` applies pending migrations
/// first. Then the application's users table is matched against the
/// configured mapping (a named column that is missing stops here).
pub async fn connect(url: &str, options: &DatabaseOptions, migrate: bool) -> StorageResult<Arc<dyn Storage>> {
    match Backend::from_url(url) {
        Some(Backend::Sqlite) => {
            let storage = SqliteStorage::connect(url, options).await?;
            if migrate {
                storage.migrate().await?;
            }
            storage.resolve_users().await?;
            Ok(Arc::new(storage))
        }
        Some(Backend::Postgres) => {
            let storage = PostgresStorage::connect(url, options).await?;
            if migrate {
                storage.migrate().await?;
            }
            storage.resolve_users().await?;
            Ok(Arc::new(storage))
        }
        None => Err(StorageError::Other(
            "database URL must start with sqlite: or postgres://".into(),
        )),
    }
}

/// A database URL with its password replaced, for logs: in the user-info
/// part and in query parameters such as `?password=`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("*****"));
            }
            let secret = |key: &str| {
                let key = key.to_ascii_lowercase();
                ["password", "passwd", "pwd", "secret", "token", "key", "sslpassword"]
                    .iter()
                    .any(|s| key.contains(s))
            };
            if parsed.query_pairs().any(|(k, _)| secret(&k)) {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if secret(&k) { "*****".to_owned() } else { v.into_owned() };
                        (k.into_owned(), v)
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable database URL>".to_owned(),
    }
}

/// Why a migration failed: the file, and the database's own message with
/// the column, table or constraint it names (never the URL).
fn migration_error(err: sqlx::migrate::MigrateError, migrator: &sqlx::migrate::Migrator) -> StorageError {
    use sqlx::migrate::MigrateError;
    let file = |version: i64| {
        migrator
            .iter()
            .find(|m| m.version == version)
            .map(|m| format!("{}_{}.sql", m.version, m.description.replace(' ', "_")))
            .unwrap_or_else(|| format!("version {version}"))
    };
    match err {
        MigrateError::ExecuteMigration(source, version) => {
            let detail = match &source {
                sqlx::Error::Database(db) => {
                    let mut detail = db.message().to_owned();
                    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                        for (label, value) in [
                            ("table", pg.table()),
                            ("column", pg.column()),
                            ("constraint", pg.constraint()),
                            ("detail", pg.detail()),
                        ] {
                            if let Some(value) = value {
                                detail.push_str(&format!("; {label}: {value}"));
                            }
                        }
                    }
                    detail
                }
                other => other.to_string(),
            };
            StorageError::Precondition(format!("migration {} failed: {detail}", file(version)))
        }
        MigrateError::Execute(sqlx::Error::Database(db)) => {
            StorageError::Precondition(format!("migrations could not run: {}", db.message()))
        }
        MigrateError::Execute(source) => match classify(source, None) {
            StorageError::Unavailable(source) => StorageError::Unavailable(source),
            other => other,
        },
        other => StorageError::Precondition(format!("migrations could not run: {other}")),
    }
}

/// The service's migrations table, apart from any the application keeps.
const MIGRATIONS_TABLE: &str = "identity_schema_migrations";

fn migrator(mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

/// Logs what matching the users table warned about.
fn log_users_table(resolved: &users_table::Resolved) {
    for warning in &resolved.warnings {
        tracing::warn!("{warning}");
    }
    if let Some(app) = &resolved.app {
        tracing::info!(
            table = %app.table,
            email = app.email.is_some(),
            password_hash = app.password_hash.is_some(),
            soft_delete = app.deleted_at.is_some(),
            mirror = app.clerk_id.is_some(),
            "reading legacy users from the application's table"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_lose_their_passwords_wherever_they_are() {
        let redacted = redact_url("postgres://app:s3cret@db:5432/app?sslmode=require&password=other&sslpassword=x");
        assert!(
            !redacted.contains("s3cret") && !redacted.contains("other") && !redacted.contains("=x"),
            "{redacted}"
        );
        assert!(redacted.contains("sslmode=require"), "{redacted}");
        assert_eq!(redact_url("sqlite://identity.db"), "sqlite://identity.db");
        assert_eq!(redact_url("::nope"), "<unparseable database URL>");
    }
}
