//! The PostgreSQL backend: the application's own database, native UUID and
//! TIMESTAMPTZ. Migrations take sqlx's advisory lock, so replicas starting
//! together apply them once; adopting the seed's tables and adding the
//! mirror column happen under a second advisory lock, once.

use std::{
    str::FromStr,
    sync::{Arc, RwLock},
    time::Duration,
};

use async_trait::async_trait;
use sqlx::{
    PgPool, Row,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
};
use uuid::Uuid;

use super::{
    AuditQuery, AuditRecord, AuthFlush, AuthPoint, AuthTotals, BulkCandidate, BulkCounters, BulkFilter, BulkJobRecord,
    BulkJobState, Conflict, DatabaseOptions, InvitationCounts, JobLease, JobRow, LeasedJob, Linked, MappingKey,
    MappingRecord, NewAuditEvent, NewInvitation, NewLegacyUser, NewRevocation, OutboxCounts, OutboxMessage, Readiness,
    ReconcileJobRecord, RevocationChanges, RevocationRecord, SettingRecord, Storage, StorageError, StorageResult,
    UserCounts, UserKey, UserKeys, UserRecord, UsersTableConfig,
    clerk_events::{
        self, ClerkChange, ClerkEvent, ClerkEventOutcome, ClerkEventResult, DELETED_VERSION, Step, UserSnapshot,
    },
    error::{classify, classify_mapping_insert},
    log_users_table, migrator,
    users_table::{UserSql, resolve},
};
use crate::domain::{AuditOutcome, ClerkUserId, Email, UserId};

/// Key of the advisory lock held while adopting the seed's tables.
const ADOPT_LOCK: i64 = 0x1de7_1700_0001;

#[derive(Debug, Clone)]
pub struct PostgresStorage {
    pool: PgPool,
    config: UsersTableConfig,
    users: Arc<RwLock<Arc<UserSql>>>,
}

fn db_err(err: sqlx::Error) -> StorageError {
    classify(err, None)
}

fn parse_clerk(raw: &str) -> StorageResult<ClerkUserId> {
    ClerkUserId::parse("clerk_user_id", raw)
        .map_err(|e| StorageError::Other(format!("stored Clerk id is malformed: {e}").into()))
}

fn user_from_row(row: &PgRow) -> StorageResult<UserRecord> {
    let password: Option<String> = row.try_get("password_hash").map_err(db_err)?;
    let updated: Option<chrono::DateTime<chrono::Utc>> = row.try_get("updated_at").map_err(db_err)?;
    let mapped: Option<chrono::DateTime<chrono::Utc>> = row.try_get("mapped_at").map_err(db_err)?;
    let email: Option<String> = row.try_get("email").map_err(db_err)?;
    Ok(UserRecord {
        id: UserId::from_uuid(row.try_get("id").map_err(db_err)?),
        email: email.filter(|e| !e.is_empty()),
        clerk_user_id: row.try_get("clerk_user_id").map_err(db_err)?,
        clerk_native: row.try_get("clerk_native").map_err(db_err)?,
        has_password: password.is_some_and(|p| !p.is_empty()),
        created_at: row.try_get("created_at").map_err(db_err)?,
        updated_at: updated.max(mapped),
    })
}

fn mapping_from_row(row: &PgRow) -> StorageResult<MappingRecord> {
    let clerk: String = row.try_get("clerk_user_id").map_err(db_err)?;
    Ok(MappingRecord {
        user_id: UserId::from_uuid(row.try_get("user_id").map_err(db_err)?),
        clerk_user_id: parse_clerk(&clerk)?,
        created_at: row.try_get("created_at").map_err(db_err)?,
        updated_at: row.try_get("updated_at").map_err(db_err)?,
    })
}

fn setting_from_row(row: &PgRow) -> StorageResult<SettingRecord> {
    Ok(SettingRecord {
        value: row.try_get("value").map_err(db_err)?,
        updated_at: row.try_get("updated_at").map_err(db_err)?,
        updated_by: row.try_get("updated_by").map_err(db_err)?,
    })
}

fn audit_from_row(row: &PgRow) -> StorageResult<AuditRecord> {
    let user_id: Option<Uuid> = row.try_get("user_id").map_err(db_err)?;
    let outcome: String = row.try_get("outcome").map_err(db_err)?;
    Ok(AuditRecord {
        id: row.try_get("id").map_err(db_err)?,
        occurred_at: row.try_get("occurred_at").map_err(db_err)?,
        caller: row.try_get("caller").map_err(db_err)?,
        action: row.try_get("action").map_err(db_err)?,
        user_id: user_id.map(UserId::from_uuid),
        outcome: AuditOutcome::from_db(&outcome)
            .ok_or_else(|| StorageError::Other(format!("unknown audit outcome {outcome:?}").into()))?,
        detail: row.try_get("detail").map_err(db_err)?,
    })
}

async fn insert_audit(conn: &mut sqlx::PgConnection, event: &NewAuditEvent) -> StorageResult<()> {
    sqlx::query(
        "INSERT INTO identity_audit_events (caller, action, user_id, outcome, detail)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&event.caller)
    .bind(&event.action)
    .bind(event.user_id.map(|id| *id.as_uuid()))
    .bind(event.outcome.as_db())
    .bind(&event.detail)
    .execute(conn)
    .await
    .map_err(db_err)?;
    Ok(())
}

const MAPPING_COLUMNS: &str = "user_id, clerk_user_id, created_at, updated_at";

/// Serialises writers of one key (a user, a Clerk user, an email) for the
/// rest of the transaction.
async fn lock_key(conn: &mut sqlx::PgConnection, space: &str, key: &str) -> StorageResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
        .bind(space)
        .bind(key)
        .execute(conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

async fn find_in(conn: &mut sqlx::PgConnection, sql: &UserSql, id: UserId) -> StorageResult<Option<UserRecord>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(sql.by_id.as_str()))
        .bind(*id.as_uuid())
        .fetch_optional(conn)
        .await
        .map_err(db_err)?;
    row.as_ref().map(user_from_row).transpose()
}

async fn email_taken(conn: &mut sqlx::PgConnection, sql: &UserSql, email: &str) -> StorageResult<bool> {
    let row = sqlx::query(sqlx::AssertSqlSafe(sql.by_email.as_str()))
        .bind(email)
        .fetch_optional(conn)
        .await
        .map_err(db_err)?;
    Ok(row.is_some())
}

/// Sets (or clears) the application's mirror column for a user of its table.
async fn mirror(
    conn: &mut sqlx::PgConnection,
    sql: &UserSql,
    user: &UserRecord,
    clerk_user_id: Option<&str>,
) -> StorageResult<()> {
    if let Some(statement) = &sql.mirror
        && !user.clerk_native
    {
        sqlx::query(sqlx::AssertSqlSafe(statement.as_str()))
            .bind(clerk_user_id)
            .bind(*user.id.as_uuid())
            .execute(conn)
            .await
            .map_err(|e| classify(e, Some(Conflict::ClerkUserTaken)))?;
    }
    Ok(())
}

/// Links inside the caller's transaction. A Clerk user held by a
/// provisional (Clerk-native) user moves to this one, and the provisional
/// user is marked merged; `merge_audit` is then appended with both ids.
async fn link_in_tx(
    conn: &mut sqlx::PgConnection,
    sql: &UserSql,
    user_id: UserId,
    clerk_user_id: &ClerkUserId,
    merge_audit: &NewAuditEvent,
) -> StorageResult<Linked> {
    lock_key(conn, "identity.clerk", clerk_user_id.as_str()).await?;
    lock_key(conn, "identity.user", &user_id.to_string()).await?;
    let user = find_in(conn, sql, user_id)
        .await?
        .ok_or(StorageError::NotFound("user"))?;
    if user.clerk_user_id.is_some() {
        return Err(StorageError::Conflict(Conflict::UserAlreadyLinked));
    }
    let holder: Option<Uuid> =
        sqlx::query_scalar("SELECT user_id FROM identity_user_mappings WHERE clerk_user_id = $1")
            .bind(clerk_user_id.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_err)?;
    let mut merged_from = None;
    if let Some(holder) = holder {
        let holder = UserId::from_uuid(holder);
        let provisional = find_in(conn, sql, holder).await?.is_some_and(|h| h.clerk_native);
        if !provisional || user.clerk_native {
            return Err(StorageError::Conflict(Conflict::ClerkUserTaken));
        }
        sqlx::query("DELETE FROM identity_user_mappings WHERE user_id = $1")
            .bind(*holder.as_uuid())
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        sqlx::query("UPDATE identity_users SET merged_into = $1, updated_at = now() WHERE id = $2")
            .bind(*user_id.as_uuid())
            .bind(*holder.as_uuid())
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        insert_audit(
            conn,
            &NewAuditEvent {
                user_id: Some(user_id),
                detail: format!(
                    "merged provisional user {holder} into {user_id} for {clerk_user_id}; {}",
                    merge_audit.detail
                ),
                ..merge_audit.clone()
            },
        )
        .await?;
        merged_from = Some(holder);
    }
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO identity_user_mappings (user_id, clerk_user_id) VALUES ($1, $2) RETURNING {MAPPING_COLUMNS}"
    )))
    .bind(*user_id.as_uuid())
    .bind(clerk_user_id.as_str())
    .fetch_one(&mut *conn)
    .await
    .map_err(classify_mapping_insert)?;
    sqlx::query("DELETE FROM identity_unlinked_clerk_users WHERE clerk_user_id = $1")
        .bind(clerk_user_id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    mirror(conn, sql, &user, Some(clerk_user_id.as_str())).await?;
    Ok(Linked {
        mapping: mapping_from_row(&row)?,
        merged_from,
    })
}

/// The audit event a merge appends, from the link's own event.
fn merge_event(audit: &NewAuditEvent) -> NewAuditEvent {
    NewAuditEvent {
        action: "user.merge".to_owned(),
        ..audit.clone()
    }
}

/// Creates a Clerk-native user linked to `clerk_user_id` (the caller checked
/// that the Clerk user is free); the email goes with it while nobody has it.
async fn provision_in_tx(
    conn: &mut sqlx::PgConnection,
    sql: &UserSql,
    clerk_user_id: &ClerkUserId,
    email: Option<&Email>,
) -> StorageResult<UserId> {
    let email = match email {
        Some(email) => {
            let key = email.normalized();
            lock_key(conn, "identity.email", &key).await?;
            (!email_taken(conn, sql, &key).await?).then_some(email)
        }
        None => None,
    };
    let id = UserId::new_random();
    // Writers of this service hold the email's lock, but the unique key is
    // the final word: a clash stores the user without the email rather than
    // failing the transaction (PostgreSQL would abort it).
    let mut stored = false;
    if let Some(email) = email {
        stored = sqlx::query(
            "INSERT INTO identity_users (id, email, email_key, clerk_native) VALUES ($1, $2, $3, true)
             ON CONFLICT (email_key) WHERE merged_into IS NULL DO NOTHING",
        )
        .bind(*id.as_uuid())
        .bind(email.as_str())
        .bind(email.normalized())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?
        .rows_affected()
            == 1;
    }
    if !stored {
        sqlx::query("INSERT INTO identity_users (id, clerk_native) VALUES ($1, true)")
            .bind(*id.as_uuid())
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    sqlx::query("INSERT INTO identity_user_mappings (user_id, clerk_user_id) VALUES ($1, $2)")
        .bind(*id.as_uuid())
        .bind(clerk_user_id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(classify_mapping_insert)?;
    Ok(id)
}

/// Removes a user's mapping (clearing the mirror column) and remembers its
/// Clerk user as unlinked; `None` when the user had no mapping.
async fn unlink_in_tx(
    conn: &mut sqlx::PgConnection,
    sql: &UserSql,
    user_id: UserId,
) -> StorageResult<Option<MappingRecord>> {
    lock_key(conn, "identity.user", &user_id.to_string()).await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM identity_user_mappings WHERE user_id = $1 RETURNING {MAPPING_COLUMNS}"
    )))
    .bind(*user_id.as_uuid())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_err)?;
    let Some(removed) = row.as_ref().map(mapping_from_row).transpose()? else {
        return Ok(None);
    };
    sqlx::query(
        "INSERT INTO identity_unlinked_clerk_users (clerk_user_id, user_id) VALUES ($1, $2)
         ON CONFLICT (clerk_user_id) DO UPDATE SET user_id = excluded.user_id, unlinked_at = now()",
    )
    .bind(removed.clerk_user_id.as_str())
    .bind(*user_id.as_uuid())
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    if let Some(user) = find_in(conn, sql, user_id).await? {
        mirror(conn, sql, &user, None).await?;
    }
    Ok(Some(removed))
}

async fn mapping_holder(conn: &mut sqlx::PgConnection, clerk_user_id: &str) -> StorageResult<Option<UserId>> {
    let holder: Option<Uuid> =
        sqlx::query_scalar("SELECT user_id FROM identity_user_mappings WHERE clerk_user_id = $1")
            .bind(clerk_user_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_err)?;
    Ok(holder.map(UserId::from_uuid))
}

/// Refuses a Clerk session (`column` = `session_id`) or a Clerk user
/// (`clerk_user_id`) until `until`; refusing again keeps the later expiry.
async fn refuse_in_tx(
    conn: &mut sqlx::PgConnection,
    column: &'static str,
    value: &str,
    until: chrono::DateTime<chrono::Utc>,
) -> StorageResult<RevocationRecord> {
    let expires_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO identity_revocations (id, {column}, expires_at, updated_at) VALUES ($1, $2, $3, clock_timestamp())
         ON CONFLICT ({column}) DO UPDATE SET expires_at = GREATEST(identity_revocations.expires_at, excluded.expires_at),
             updated_at = clock_timestamp()
         RETURNING expires_at"
    )))
    .bind(Uuid::new_v4())
    .bind(value)
    .bind(until)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(RevocationRecord {
        jti: None,
        token_hash: None,
        session_id: (column == "session_id").then(|| value.to_owned()),
        clerk_user_id: (column == "clerk_user_id").then(|| value.to_owned()),
        expires_at,
    })
}

/// Copies a Clerk user's email to the service's record of the user: its own
/// directory row, or what an export added about a user of the application's
/// table when that table shows no email. The application's own column is
/// never written; the returned note says so.
async fn set_email_in_tx(
    conn: &mut sqlx::PgConnection,
    sql: &UserSql,
    user_id: UserId,
    email: &Email,
) -> StorageResult<Option<String>> {
    let updated = sqlx::query(
        "UPDATE identity_users SET email = $2, email_key = $3, updated_at = now() WHERE id = $1 AND merged_into IS NULL",
    )
    .bind(*user_id.as_uuid())
    .bind(email.as_str())
    .bind(email.normalized())
    .execute(&mut *conn)
    .await
    .map_err(|e| classify(e, Some(Conflict::UserExists)))?
    .rows_affected();
    if updated == 1 {
        return Ok(None);
    }
    if sql.app.as_ref().is_some_and(|app| app.email.is_some()) {
        return Ok(Some(
            "the application's table holds this user's email; it is left as it is".into(),
        ));
    }
    sqlx::query(
        "INSERT INTO identity_user_profiles (user_id, email, email_key) VALUES ($1, $2, $3)
         ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, email_key = excluded.email_key",
    )
    .bind(*user_id.as_uuid())
    .bind(email.as_str())
    .bind(email.normalized())
    .execute(&mut *conn)
    .await
    .map_err(|e| classify(e, Some(Conflict::UserExists)))?;
    Ok(None)
}

fn revocation_from_row(row: &PgRow) -> StorageResult<RevocationRecord> {
    Ok(RevocationRecord {
        jti: row.try_get("jti").map_err(db_err)?,
        token_hash: row.try_get("token_hash").map_err(db_err)?,
        session_id: row.try_get("session_id").map_err(db_err)?,
        clerk_user_id: row.try_get("clerk_user_id").map_err(db_err)?,
        expires_at: row.try_get("expires_at").map_err(db_err)?,
    })
}

const REVOCATION_COLUMNS: &str = "jti, token_hash, session_id, clerk_user_id, expires_at";

fn reconcile_from_row(row: &PgRow) -> StorageResult<ReconcileJobRecord> {
    let state: String = row.try_get("state").map_err(db_err)?;
    Ok(ReconcileJobRecord {
        id: row.try_get("id").map_err(db_err)?,
        state: BulkJobState::from_db(&state)
            .ok_or_else(|| StorageError::Other(format!("unknown reconciliation state {state:?}").into()))?,
        fix: row.try_get("fix").map_err(db_err)?,
        params: row.try_get("params").map_err(db_err)?,
        cursor: row.try_get("cursor").map_err(db_err)?,
        summary: row.try_get("summary").map_err(db_err)?,
        started_by: row.try_get("started_by").map_err(db_err)?,
        lease_owner: row.try_get("lease_owner").map_err(db_err)?,
        lease_until: row.try_get("lease_until").map_err(db_err)?,
        started_at: row.try_get("started_at").map_err(db_err)?,
        finished_at: row.try_get("finished_at").map_err(db_err)?,
    })
}

/// Applies a claimed, ordered Clerk event inside the caller's transaction.
async fn apply_change_in_tx(
    conn: &mut sqlx::PgConnection,
    sql: &UserSql,
    event: &ClerkEvent,
) -> StorageResult<ClerkEventResult> {
    let audit = |user_id: Option<UserId>, outcome: ClerkEventOutcome, detail: &str| NewAuditEvent {
        caller: event.caller.clone(),
        action: clerk_events::audit_action(&event.event_type),
        user_id,
        outcome: if outcome == ClerkEventOutcome::Conflict {
            AuditOutcome::Failure
        } else {
            AuditOutcome::Success
        },
        detail: format!("event {}: {detail}", event.id),
    };
    match &event.change {
        ClerkChange::Ignored => Ok(ClerkEventResult::only(
            ClerkEventOutcome::Ignored,
            format!("{} is not acted on", event.event_type),
        )),
        ClerkChange::SessionEnded {
            session_id,
            refuse_until,
        } => {
            let revocation = refuse_in_tx(conn, "session_id", session_id, *refuse_until).await?;
            let detail = format!(
                "session {session_id} refused until {}",
                revocation.expires_at.to_rfc3339()
            );
            insert_audit(conn, &audit(None, ClerkEventOutcome::Applied, &detail)).await?;
            Ok(ClerkEventResult {
                revocation: Some(revocation),
                ..ClerkEventResult::only(ClerkEventOutcome::Applied, detail)
            })
        }
        ClerkChange::UserDeleted {
            clerk_user_id,
            refuse_until,
        } => {
            let holder = mapping_holder(conn, clerk_user_id.as_str()).await?;
            let removed = match holder {
                Some(user_id) => unlink_in_tx(conn, sql, user_id).await?,
                None => None,
            };
            let revocation = refuse_in_tx(conn, "clerk_user_id", clerk_user_id.as_str(), *refuse_until).await?;
            let detail = match &removed {
                Some(m) => format!(
                    "{clerk_user_id} deleted in Clerk: mapping of user {} removed, tokens refused until {}",
                    m.user_id,
                    revocation.expires_at.to_rfc3339()
                ),
                None => format!(
                    "{clerk_user_id} deleted in Clerk (no mapping): tokens refused until {}",
                    revocation.expires_at.to_rfc3339()
                ),
            };
            insert_audit(conn, &audit(holder, ClerkEventOutcome::Applied, &detail)).await?;
            Ok(ClerkEventResult {
                outcome: ClerkEventOutcome::Applied,
                detail,
                users: holder.into_iter().collect(),
                clerk_user_ids: vec![clerk_user_id.to_string()],
                revocation: Some(revocation),
            })
        }
        ClerkChange::User {
            clerk_user_id,
            external_id,
            verified_email,
            unmapped,
        } => {
            if let Some(email) = verified_email {
                lock_key(conn, "identity.email", &email.normalized()).await?;
            }
            let mut snapshot = UserSnapshot::default();
            if let Some(holder) = mapping_holder(conn, clerk_user_id.as_str()).await? {
                snapshot.mapped = find_in(conn, sql, holder).await?;
            }
            if let Some(named) = external_id
                .as_deref()
                .and_then(|e| UserId::parse("external_id", e.trim()).ok())
            {
                snapshot.named = find_in(conn, sql, named).await?;
            }
            if let Some(email) = verified_email {
                snapshot.by_email = sqlx::query(sqlx::AssertSqlSafe(sql.by_email.as_str()))
                    .bind(email.normalized())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db_err)?
                    .as_ref()
                    .map(user_from_row)
                    .transpose()?;
            }
            if let Some(user) = &snapshot.by_email {
                let unlinked: Option<i32> =
                    sqlx::query_scalar("SELECT 1 FROM identity_unlinked_clerk_users WHERE user_id = $1 LIMIT 1")
                        .bind(*user.id.as_uuid())
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(db_err)?;
                snapshot.by_email_unlinked = unlinked.is_some();
            }
            let admin_unlinked: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM identity_unlinked_clerk_users WHERE clerk_user_id = $1")
                    .bind(clerk_user_id.as_str())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db_err)?;
            snapshot.admin_unlinked = admin_unlinked.is_some();
            let plan = clerk_events::plan_user(
                clerk_user_id,
                external_id.as_deref(),
                verified_email.as_ref(),
                *unmapped,
                &snapshot,
            );
            let mut result = ClerkEventResult::only(plan.outcome, plan.detail.clone());
            let mut audited_user = plan.user;
            let mut notes = Vec::new();
            for step in &plan.steps {
                match step {
                    Step::Link(user_id) => {
                        let event = audit(Some(*user_id), plan.outcome, &plan.detail);
                        let linked = link_in_tx(conn, sql, *user_id, clerk_user_id, &merge_event(&event)).await?;
                        result.users.push(*user_id);
                        result.users.extend(linked.merged_from);
                    }
                    Step::Provision(email) => {
                        let id = provision_in_tx(conn, sql, clerk_user_id, email.as_ref()).await?;
                        audited_user = Some(id);
                        result.users.push(id);
                        result.detail = format!("{} ({id})", plan.detail);
                    }
                    Step::SetEmail(user_id, email) => {
                        notes.extend(set_email_in_tx(conn, sql, *user_id, email).await?);
                        result.users.push(*user_id);
                    }
                }
            }
            if !plan.steps.is_empty() {
                result.clerk_user_ids.push(clerk_user_id.to_string());
            }
            for note in notes {
                result.detail = format!("{}; {note}", result.detail);
            }
            if matches!(plan.outcome, ClerkEventOutcome::Applied | ClerkEventOutcome::Conflict) {
                insert_audit(conn, &audit(audited_user, plan.outcome, &result.detail)).await?;
            }
            Ok(result)
        }
    }
}

/// An `UPDATE` of leased job `$1` that applies only while `$2` holds its
/// lease and the job is running. `set` names the columns written, its
/// parameters numbered from `$3`. It returns the job's cancellation flag: no
/// row when the lease is lost (see [`JobLease::from_returned`]).
fn guarded_update(job: LeasedJob, set: &str) -> String {
    format!(
        "UPDATE {} SET {set} WHERE id = $1 AND lease_owner = $2 AND state = 'running' RETURNING {}",
        job.table(),
        job.cancel_flag()
    )
}

/// The [`guarded_update`] that ends a leased job and releases its lease:
/// `$3` the final state; `set` writes the kind's own columns, its
/// parameters numbered from `$4`.
fn finish_update(job: LeasedJob, set: &str) -> String {
    guarded_update(
        job,
        &format!("state = $3, lease_owner = NULL, lease_until = NULL, updated_at = now(), finished_at = now(), {set}"),
    )
}

fn job_from_row(row: &PgRow) -> StorageResult<BulkJobRecord> {
    let state: String = row.try_get("state").map_err(db_err)?;
    let cursor: Option<Uuid> = row.try_get("cursor_user_id").map_err(db_err)?;
    Ok(BulkJobRecord {
        id: row.try_get("id").map_err(db_err)?,
        state: BulkJobState::from_db(&state)
            .ok_or_else(|| StorageError::Other(format!("unknown job state {state:?}").into()))?,
        params: row.try_get("params").map_err(db_err)?,
        cursor: cursor.map(UserId::from_uuid),
        total: row.try_get("total").map_err(db_err)?,
        counters: BulkCounters {
            processed: row.try_get("processed").map_err(db_err)?,
            created: row.try_get("created").map_err(db_err)?,
            linked_existing: row.try_get("linked_existing").map_err(db_err)?,
            skipped: row.try_get("skipped").map_err(db_err)?,
            failed: row.try_get("failed").map_err(db_err)?,
        },
        started_by: row.try_get("started_by").map_err(db_err)?,
        cancel_requested: row.try_get("cancel_requested").map_err(db_err)?,
        lease_owner: row.try_get("lease_owner").map_err(db_err)?,
        lease_until: row.try_get("lease_until").map_err(db_err)?,
        started_at: row.try_get("started_at").map_err(db_err)?,
    })
}

fn outbox_from_row(row: &PgRow) -> StorageResult<OutboxMessage> {
    let attempts: i32 = row.try_get("attempts").map_err(db_err)?;
    Ok(OutboxMessage {
        id: row.try_get("id").map_err(db_err)?,
        kind: row.try_get("kind").map_err(db_err)?,
        recipient: row.try_get("recipient").map_err(db_err)?,
        subject: row.try_get("subject").map_err(db_err)?,
        body_text: row
            .try_get::<Option<String>, _>("body_text")
            .map_err(db_err)?
            .unwrap_or_default(),
        body_html: row
            .try_get::<Option<String>, _>("body_html")
            .map_err(db_err)?
            .unwrap_or_default(),
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
    })
}

/// The columns of a table (`None`: no such table), names as stored.
async fn table_columns(conn: &mut sqlx::PgConnection, table: &str) -> StorageResult<Option<Vec<(String, String)>>> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(table)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err)?;
    if exists.is_none() {
        return Ok(None);
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
         WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(Some(rows))
}

fn has(columns: &[(String, String)], name: &str) -> bool {
    columns.iter().any(|(c, _)| c == name)
}

impl PostgresStorage {
    pub async fn connect(url: &str, options: &DatabaseOptions) -> StorageResult<Self> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StorageError::Other(Box::new(e)))?
            .application_name("identity");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            .connect_with(connect)
            .await
            .map_err(|e| StorageError::Unavailable(Box::new(e)))?;
        Ok(Self {
            pool,
            config: options.users.clone(),
            users: Arc::new(RwLock::new(Arc::new(UserSql::build(None, true)))),
        })
    }

    /// Applies pending migrations under sqlx's advisory lock, then (under a
    /// lock of its own) takes over the seed's tables once and adds the
    /// mirror column when it is configured and missing.
    pub async fn migrate(&self) -> StorageResult<()> {
        let migrator = migrator(sqlx::migrate!("./migrations/postgres"));
        migrator
            .run(&self.pool)
            .await
            .map_err(|e| super::migration_error(e, &migrator))?;
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(ADOPT_LOCK)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        let result = self.adopt(&mut conn).await;
        let unlock = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(ADOPT_LOCK)
            .execute(&mut *conn)
            .await
            .map_err(db_err);
        result.and(unlock.map(|_| ()))
    }

    async fn adopt(&self, conn: &mut sqlx::PgConnection) -> StorageResult<()> {
        let adopted: Option<String> =
            sqlx::query_scalar("SELECT value FROM identity_settings WHERE key = 'adopted_seed_tables'")
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_err)?;
        if adopted.is_none() {
            let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(db_err)?;
            adopt_seed_tables(&mut tx).await?;
            sqlx::query(
                "INSERT INTO identity_settings (key, value, updated_by) VALUES ('adopted_seed_tables', 'done', 'migration')
                 ON CONFLICT (key) DO NOTHING",
            )
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
        }
        // The seed's optional `users.clerk_user_id`: the one column the
        // service adds to an application table, nullable and without a
        // default, so adding it rewrites nothing. It waits at most 5 s for
        // the application's transactions; otherwise the next start tries again.
        if let Some(column) = &self.config.clerk_id.name {
            let table = self.config.table.quoted();
            if let Some(columns) = table_columns(conn, &table).await?
                && !has(&columns, column.name())
            {
                let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(db_err)?;
                sqlx::query("SET LOCAL lock_timeout = '5s'")
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                let added = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} TEXT",
                    column.quoted()
                )))
                .execute(&mut *tx)
                .await;
                match added {
                    Ok(_) => tx.commit().await.map_err(db_err)?,
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot add the mirror column {column} to {}; it is left out until the next start", self.config.table);
                        tx.rollback().await.map_err(db_err)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Matches the configured mapping against the application's table and
    /// builds the statements that read it.
    pub async fn resolve_users(&self) -> StorageResult<()> {
        self.resolve_users_with(true).await
    }

    async fn resolve_users_with(&self, strict: bool) -> StorageResult<()> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        let columns = table_columns(&mut conn, &self.config.table.quoted()).await?;
        let resolved = resolve(&self.config, columns.as_deref(), true, strict)?;
        log_users_table(&resolved);
        let sql = Arc::new(UserSql::build(resolved.app, true));
        *self.users.write().unwrap_or_else(std::sync::PoisonError::into_inner) = sql;
        Ok(())
    }

    fn sql(&self) -> Arc<UserSql> {
        self.users
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After a statement met a dropped column: reads the table again (a
    /// missing default column is then left out; a missing named one is a
    /// precondition error) and says whether to try once more.
    async fn recover(&self, err: &StorageError) -> StorageResult<bool> {
        if let StorageError::SchemaChanged(message) = err {
            tracing::warn!(%message, "the application's users table changed; reading its columns again");
            self.resolve_users_with(false).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Reads one leased job, as `from_row` makes it.
    async fn job<T>(
        &self,
        job: LeasedJob,
        which: JobRow,
        from_row: fn(&PgRow) -> StorageResult<T>,
    ) -> StorageResult<Option<T>> {
        let filter = match which {
            JobRow::Id(_) => "WHERE id = $1",
            JobRow::Running => "WHERE state = 'running' LIMIT 1",
            JobRow::Latest => "ORDER BY started_at DESC, id LIMIT 1",
        };
        let mut query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM {} {filter}",
            job.columns(),
            job.table()
        )));
        if let JobRow::Id(id) = which {
            query = query.bind(id);
        }
        let row = query.fetch_optional(&self.pool).await.map_err(db_err)?;
        row.as_ref().map(from_row).transpose()
    }

    /// Creates a job with `insert` (the row, leased to its runner) and its
    /// audit event, in one transaction; the kind's [`Conflict`] while
    /// another job of the kind is unfinished.
    async fn create_job(
        &self,
        job: LeasedJob,
        insert: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        audit: &NewAuditEvent,
    ) -> StorageResult<()> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        insert
            .execute(&mut *tx)
            .await
            .map_err(|e| classify(e, Some(job.conflict())))?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db_err)
    }

    /// Ends a job with `end` (a [`finish_update`]) and appends its audit
    /// event, in one transaction; false, and nothing written, when the
    /// runner no longer holds the job.
    async fn end_job(
        &self,
        end: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        audit: &NewAuditEvent,
    ) -> StorageResult<bool> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        if end.execute(&mut *tx).await.map_err(db_err)?.rows_affected() != 1 {
            return Ok(false);
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    async fn find_user_once(&self, key: &UserKey) -> StorageResult<Option<UserRecord>> {
        let sql = self.sql();
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        match key {
            UserKey::Id(id) => find_in(&mut conn, &sql, *id).await,
            UserKey::ClerkUserId(clerk) => {
                let id: Option<Uuid> =
                    sqlx::query_scalar("SELECT user_id FROM identity_user_mappings WHERE clerk_user_id = $1")
                        .bind(clerk.as_str())
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(db_err)?;
                match id {
                    Some(id) => find_in(&mut conn, &sql, UserId::from_uuid(id)).await,
                    None => Ok(None),
                }
            }
            UserKey::Email(email) => {
                let row = sqlx::query(sqlx::AssertSqlSafe(sql.by_email.as_str()))
                    .bind(email.normalized())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db_err)?;
                row.as_ref().map(user_from_row).transpose()
            }
        }
    }

    async fn find_users_once(&self, keys: &UserKeys) -> StorageResult<Vec<UserRecord>> {
        let sql = self.sql();
        let query = match keys {
            UserKeys::Ids(ids) => sqlx::query(sqlx::AssertSqlSafe(sql.by_ids.as_str()))
                .bind(ids.iter().map(|id| *id.as_uuid()).collect::<Vec<Uuid>>()),
            UserKeys::ClerkUserIds(ids) => sqlx::query(sqlx::AssertSqlSafe(sql.by_clerk_ids.as_str()))
                .bind(ids.iter().map(|id| id.as_str().to_owned()).collect::<Vec<String>>()),
        };
        let rows = query.fetch_all(&self.pool).await.map_err(db_err)?;
        super::first_row_per_user(rows.iter().map(user_from_row))
    }

    async fn user_counts_once(&self) -> StorageResult<UserCounts> {
        let sql = self.sql();
        let row = sqlx::query(sqlx::AssertSqlSafe(sql.counts.as_str()))
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        let total: i64 = row.try_get("legacy_total").map_err(db_err)?;
        let migrated: i64 = row.try_get("migrated").map_err(db_err)?;
        Ok(UserCounts {
            legacy_only: (total - migrated).max(0),
            migrated,
            clerk_native: row.try_get("clerk_native").map_err(db_err)?,
        })
    }

    async fn readiness_once(&self, since_day: i64) -> StorageResult<Readiness> {
        let sql = self.sql();
        let row = sqlx::query(sqlx::AssertSqlSafe(sql.readiness.as_str()))
            .bind(since_day)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(Readiness {
            active_users: row.try_get("active_users").map_err(db_err)?,
            legacy_only_unlinked: row.try_get("legacy_only_unlinked").map_err(db_err)?,
            legacy_verifications_by_migrated: row.try_get("lwm").map_err(db_err)?,
        })
    }

    async fn bulk_candidates_once(
        &self,
        filter: &BulkFilter,
        after: Option<UserId>,
        limit: u32,
    ) -> StorageResult<Vec<BulkCandidate>> {
        let sql = self.sql();
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.candidates.as_str()))
            .bind(&filter.user_ids)
            .bind(filter.created_before)
            .bind(after.map(|id| *id.as_uuid()))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|row| {
                Ok(BulkCandidate {
                    id: UserId::from_uuid(row.try_get("id").map_err(db_err)?),
                    email: row
                        .try_get::<Option<String>, _>("email")
                        .map_err(db_err)?
                        .filter(|e| !e.is_empty()),
                    password_hash: row.try_get("password_hash").map_err(db_err)?,
                })
            })
            .collect()
    }

    async fn count_bulk_candidates_once(&self, filter: &BulkFilter) -> StorageResult<i64> {
        let sql = self.sql();
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.count_candidates.as_str()))
            .bind(&filter.user_ids)
            .bind(filter.created_before)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)
    }
}

/// Takes over what the seed's Go implementation (or an earlier version of
/// this service) left: mappings, unexpired revocations, and unexpired
/// migration tokens, whose plaintext is hashed on the way (the plaintext
/// is never accepted). Each table may be missing or have its own columns.
async fn adopt_seed_tables(conn: &mut sqlx::PgConnection) -> StorageResult<()> {
    if let Some(columns) = table_columns(conn, "user_clerk_mappings").await?
        && has(&columns, "user_id")
        && has(&columns, "clerk_user_id")
    {
        let created = if has(&columns, "created_at") {
            "created_at::timestamptz"
        } else {
            "now()"
        };
        let updated = if has(&columns, "updated_at") {
            "updated_at::timestamptz"
        } else {
            created
        };
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO identity_user_mappings (user_id, clerk_user_id, created_at, updated_at)
             SELECT DISTINCT ON (user_id) user_id::uuid, clerk_user_id::text, COALESCE({created}, now()), COALESCE({updated}, now())
             FROM user_clerk_mappings WHERE clerk_user_id IS NOT NULL
             ORDER BY user_id, {created} DESC
             ON CONFLICT DO NOTHING"
        )))
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        tracing::info!(rows = done.rows_affected(), "adopted the seed's user_clerk_mappings");
    }
    if let Some(columns) = table_columns(conn, "jwt_blacklist").await?
        && has(&columns, "expires_at")
        && (has(&columns, "jti") || has(&columns, "token_hash"))
    {
        let jti = if has(&columns, "jti") {
            "jti::text"
        } else {
            "NULL::text"
        };
        let hash = if has(&columns, "token_hash") {
            "token_hash::text"
        } else {
            "NULL::text"
        };
        let user = if has(&columns, "user_id") {
            "user_id::uuid"
        } else {
            "NULL::uuid"
        };
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO identity_revocations (id, jti, token_hash, user_id, expires_at)
             SELECT gen_random_uuid(), {jti}, {hash}, {user}, expires_at::timestamptz FROM jwt_blacklist
             WHERE expires_at::timestamptz > now() AND ({jti} IS NOT NULL OR {hash} IS NOT NULL)
             ON CONFLICT DO NOTHING"
        )))
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        tracing::info!(rows = done.rows_affected(), "adopted the seed's jwt_blacklist");
    }
    if let Some(columns) = table_columns(conn, "user_migration_tokens").await?
        && has(&columns, "user_id")
        && has(&columns, "expires_at")
    {
        let hash = if has(&columns, "token_hash") {
            "token_hash::text"
        } else if has(&columns, "token") {
            "encode(sha256(convert_to(token::text, 'UTF8')), 'hex')"
        } else {
            ""
        };
        if !hash.is_empty() {
            let used = if has(&columns, "used_at") {
                "used_at IS NULL"
            } else {
                "true"
            };
            let superseded = if has(&columns, "superseded_at") {
                "superseded_at IS NULL"
            } else {
                "true"
            };
            let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO identity_migration_tokens (id, user_id, token_hash, expires_at)
                 SELECT gen_random_uuid(), user_id::uuid, {hash}, expires_at::timestamptz FROM user_migration_tokens
                 WHERE expires_at::timestamptz > now() AND {used} AND {superseded}
                 ON CONFLICT DO NOTHING"
            )))
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
            tracing::info!(
                rows = done.rows_affected(),
                "adopted the seed's user_migration_tokens (hashed)"
            );
            if has(&columns, "token") {
                // No plaintext token stays usable in the database: each is
                // replaced by its hash (the link in the email still works,
                // through the hashed copy). Where the column cannot hold a
                // hash, the old tokens are expired instead.
                let mut savepoint = sqlx::Connection::begin(&mut *conn).await.map_err(db_err)?;
                let hashed = sqlx::query(
                    "UPDATE user_migration_tokens SET token = encode(sha256(convert_to(token::text, 'UTF8')), 'hex')",
                )
                .execute(&mut *savepoint)
                .await;
                match hashed {
                    Ok(_) => savepoint.commit().await.map_err(db_err)?,
                    Err(err) => {
                        savepoint.rollback().await.map_err(db_err)?;
                        tracing::warn!(error = %err, "cannot replace the seed's plaintext migration tokens by their hashes; expiring them");
                        sqlx::query(
                            "UPDATE user_migration_tokens SET expires_at = now() WHERE expires_at::timestamptz > now()",
                        )
                        .execute(&mut *conn)
                        .await
                        .map_err(db_err)?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Storage for PostgresStorage {
    fn pool_status(&self) -> (u32, u32) {
        (
            self.pool.size(),
            u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
        )
    }

    async fn ping(&self) -> StorageResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| StorageError::Unavailable(Box::new(e)))
    }

    async fn find_user(&self, key: &UserKey) -> StorageResult<Option<UserRecord>> {
        match self.find_user_once(key).await {
            Err(err) if self.recover(&err).await? => self.find_user_once(key).await,
            other => other,
        }
    }

    async fn find_users(&self, keys: &UserKeys) -> StorageResult<Vec<UserRecord>> {
        match self.find_users_once(keys).await {
            Err(err) if self.recover(&err).await? => self.find_users_once(keys).await,
            other => other,
        }
    }

    async fn insert_legacy_user(&self, user: &NewLegacyUser) -> StorageResult<()> {
        let sql = self.sql();
        let email = user.email.normalized();
        let shown = user.email.as_str();
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        lock_key(&mut tx, "identity.email", &email).await?;
        lock_key(&mut tx, "identity.user", &user.id.to_string()).await?;
        let in_directory: Option<i32> = sqlx::query_scalar("SELECT 1 FROM identity_users WHERE id = $1")
            .bind(*user.id.as_uuid())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
        let holder = sqlx::query(sqlx::AssertSqlSafe(sql.by_email.as_str()))
            .bind(&email)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?
            .as_ref()
            .map(user_from_row)
            .transpose()?;
        if in_directory.is_some() || holder.is_some_and(|h| h.id != user.id) {
            return Err(StorageError::Conflict(Conflict::UserExists));
        }
        if find_in(&mut tx, &sql, user.id).await?.is_some() {
            // A user of the application's table: the export adds what the table does not show.
            sqlx::query(
                "INSERT INTO identity_user_profiles (user_id, email, email_key, password_hash) VALUES ($1, $4, $2, $3)
                 ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, email_key = excluded.email_key,
                     password_hash = COALESCE(excluded.password_hash, identity_user_profiles.password_hash),
                     imported_at = now()",
            )
            .bind(*user.id.as_uuid())
            .bind(&email)
            .bind(user.password_hash.as_deref())
            .bind(shown)
            .execute(&mut *tx)
            .await
            .map_err(|e| classify(e, Some(Conflict::UserExists)))?;
        } else {
            sqlx::query("INSERT INTO identity_users (id, email, email_key, password_hash) VALUES ($1, $4, $2, $3)")
                .bind(*user.id.as_uuid())
                .bind(&email)
                .bind(user.password_hash.as_deref())
                .bind(shown)
                .execute(&mut *tx)
                .await
                .map_err(|e| classify(e, Some(Conflict::UserExists)))?;
        }
        tx.commit().await.map_err(db_err)
    }

    async fn link_user(
        &self,
        user_id: UserId,
        clerk_user_id: &ClerkUserId,
        audit: &NewAuditEvent,
    ) -> StorageResult<Linked> {
        let sql = self.sql();
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let linked = link_in_tx(&mut tx, &sql, user_id, clerk_user_id, &merge_event(audit)).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(linked)
    }

    async fn unlink_user(&self, user_id: UserId, audit: &NewAuditEvent) -> StorageResult<MappingRecord> {
        let sql = self.sql();
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let removed = unlink_in_tx(&mut tx, &sql, user_id)
            .await?
            .ok_or(StorageError::NotFound("mapping"))?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(removed)
    }

    async fn find_mapping(&self, key: &MappingKey) -> StorageResult<Option<MappingRecord>> {
        let row = match key {
            MappingKey::UserId(id) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {MAPPING_COLUMNS} FROM identity_user_mappings WHERE user_id = $1"
                )))
                .bind(*id.as_uuid())
                .fetch_optional(&self.pool)
                .await
            }
            MappingKey::ClerkUserId(clerk) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {MAPPING_COLUMNS} FROM identity_user_mappings WHERE clerk_user_id = $1"
                )))
                .bind(clerk.as_str().to_owned())
                .fetch_optional(&self.pool)
                .await
            }
        }
        .map_err(db_err)?;
        row.as_ref().map(mapping_from_row).transpose()
    }

    fn users_have_emails(&self) -> bool {
        self.sql().app.as_ref().is_none_or(|app| app.email.is_some())
    }

    async fn clerk_user_unlinked(&self, clerk_user_id: &ClerkUserId) -> StorageResult<bool> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM identity_unlinked_clerk_users WHERE clerk_user_id = $1")
                .bind(clerk_user_id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
        Ok(found.is_some())
    }

    async fn provision_clerk_user(
        &self,
        clerk_user_id: &ClerkUserId,
        email: Option<&Email>,
        audit: &NewAuditEvent,
    ) -> StorageResult<UserRecord> {
        let sql = self.sql();
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // Serialise first sightings of one Clerk user; the unique index is the final word.
        lock_key(&mut tx, "identity.clerk", clerk_user_id.as_str()).await?;
        let mapped: Option<Uuid> =
            sqlx::query_scalar("SELECT user_id FROM identity_user_mappings WHERE clerk_user_id = $1")
                .bind(clerk_user_id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        if mapped.is_some() {
            return Err(StorageError::Conflict(Conflict::ClerkUserTaken));
        }
        let unlinked: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM identity_unlinked_clerk_users WHERE clerk_user_id = $1")
                .bind(clerk_user_id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        if unlinked.is_some() {
            return Err(StorageError::Conflict(Conflict::ClerkUserUnlinked));
        }
        let id = provision_in_tx(&mut tx, &sql, clerk_user_id, email).await?;
        let audit = NewAuditEvent {
            user_id: Some(id),
            ..audit.clone()
        };
        insert_audit(&mut tx, &audit).await?;
        let user = find_in(&mut tx, &sql, id)
            .await?
            .ok_or_else(|| StorageError::Other("provisioned user is missing".into()))?;
        tx.commit().await.map_err(db_err)?;
        Ok(user)
    }

    async fn create_invitation(&self, invitation: &NewInvitation, audit: &NewAuditEvent) -> StorageResult<()> {
        let user = *invitation.user_id.as_uuid();
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        sqlx::query(
            "UPDATE identity_migration_tokens SET superseded_at = now()
             WHERE user_id = $1 AND used_at IS NULL AND superseded_at IS NULL",
        )
        .bind(user)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        sqlx::query(
            "INSERT INTO identity_migration_tokens (id, user_id, token_hash, expires_at, email_supplied_by)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(Uuid::new_v4())
        .bind(user)
        .bind(&invitation.token_hash)
        .bind(invitation.expires_at)
        .bind(invitation.email_supplied_by.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let email = &invitation.email;
        sqlx::query(
            "INSERT INTO identity_outbox (id, kind, user_id, recipient, subject, body_text, body_html)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(Uuid::new_v4())
        .bind(&email.kind)
        .bind(email.user_id.map(|id| *id.as_uuid()))
        .bind(&email.recipient)
        .bind(&email.subject)
        .bind(&email.body_text)
        .bind(&email.body_html)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn redeem_invitation(
        &self,
        token_hash: &str,
        clerk_user_id: &ClerkUserId,
        now: chrono::DateTime<chrono::Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<Linked> {
        let sql = self.sql();
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // The row lock makes concurrent redemptions of one token queue up;
        // all but the first then find it used.
        let row = sqlx::query(
            "SELECT id, user_id, used_at, superseded_at, expires_at FROM identity_migration_tokens
             WHERE token_hash = $1 FOR UPDATE",
        )
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?
        .ok_or(StorageError::NotFound("invitation"))?;
        let used: Option<chrono::DateTime<chrono::Utc>> = row.try_get("used_at").map_err(db_err)?;
        let superseded: Option<chrono::DateTime<chrono::Utc>> = row.try_get("superseded_at").map_err(db_err)?;
        let expires: chrono::DateTime<chrono::Utc> = row.try_get("expires_at").map_err(db_err)?;
        if used.is_some() || superseded.is_some() || expires <= now {
            return Err(StorageError::NotFound("invitation"));
        }
        let token_id: Uuid = row.try_get("id").map_err(db_err)?;
        let user_id = UserId::from_uuid(row.try_get("user_id").map_err(db_err)?);
        let audit = NewAuditEvent {
            user_id: Some(user_id),
            ..audit.clone()
        };
        let linked = link_in_tx(&mut tx, &sql, user_id, clerk_user_id, &merge_event(&audit)).await?;
        sqlx::query("UPDATE identity_migration_tokens SET used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(token_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(linked)
    }

    async fn claim_outbox(
        &self,
        worker: &str,
        now: chrono::DateTime<chrono::Utc>,
        lease_until: chrono::DateTime<chrono::Utc>,
        limit: u32,
    ) -> StorageResult<Vec<OutboxMessage>> {
        // Oldest first: RETURNING alone does not keep the sub-select's order.
        let rows = sqlx::query(
            "WITH due AS (
                 SELECT id FROM identity_outbox
                 WHERE sent_at IS NULL AND failed_at IS NULL AND next_attempt_at <= $3
                   AND (locked_until IS NULL OR locked_until < $3)
                 ORDER BY next_attempt_at, created_at LIMIT $4
                 FOR UPDATE SKIP LOCKED),
             claimed AS (
                 UPDATE identity_outbox o SET locked_by = $1, locked_until = $2
                 FROM due WHERE o.id = due.id
                 RETURNING o.id, o.kind, o.recipient, o.subject, o.body_text, o.body_html, o.attempts,
                           o.next_attempt_at, o.created_at)
             SELECT * FROM claimed ORDER BY next_attempt_at, created_at",
        )
        .bind(worker)
        .bind(lease_until)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(outbox_from_row).collect()
    }

    async fn outbox_sent(&self, id: Uuid, worker: &str) -> StorageResult<()> {
        sqlx::query(
            "UPDATE identity_outbox SET sent_at = now(), attempts = attempts + 1, body_text = NULL, body_html = NULL,
                 locked_until = NULL, last_error = NULL
             WHERE id = $1 AND locked_by = $2",
        )
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn outbox_failed(
        &self,
        id: Uuid,
        worker: &str,
        error: &str,
        retry_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> StorageResult<()> {
        let query = match retry_at {
            Some(at) => sqlx::query(
                "UPDATE identity_outbox SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2, locked_until = NULL
                 WHERE id = $3 AND locked_by = $4",
            )
            .bind(error)
            .bind(at),
            None => sqlx::query(
                "UPDATE identity_outbox SET attempts = attempts + 1, last_error = $1, failed_at = now(), locked_until = NULL,
                     body_text = NULL, body_html = NULL
                 WHERE id = $2 AND locked_by = $3",
            )
            .bind(error),
        };
        query.bind(id).bind(worker).execute(&self.pool).await.map_err(db_err)?;
        Ok(())
    }

    async fn outbox_counts(&self) -> StorageResult<OutboxCounts> {
        // Pending messages through the partial due index; totals kept by triggers.
        let row = sqlx::query(
            "SELECT
                 (SELECT count(*) FROM identity_outbox WHERE sent_at IS NULL AND failed_at IS NULL) AS pending,
                 COALESCE((SELECT value FROM identity_stat_counters WHERE name = 'outbox_sent'), 0) AS sent,
                 COALESCE((SELECT value FROM identity_stat_counters WHERE name = 'outbox_failed'), 0) AS failed",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(OutboxCounts {
            pending: row.try_get("pending").map_err(db_err)?,
            sent: row.try_get("sent").map_err(db_err)?,
            failed: row.try_get("failed").map_err(db_err)?,
        })
    }

    async fn count_bulk_candidates(&self, filter: &BulkFilter) -> StorageResult<i64> {
        match self.count_bulk_candidates_once(filter).await {
            Err(err) if self.recover(&err).await? => self.count_bulk_candidates_once(filter).await,
            other => other,
        }
    }

    async fn bulk_candidates(
        &self,
        filter: &BulkFilter,
        after: Option<UserId>,
        limit: u32,
    ) -> StorageResult<Vec<BulkCandidate>> {
        match self.bulk_candidates_once(filter, after, limit).await {
            Err(err) if self.recover(&err).await? => self.bulk_candidates_once(filter, after, limit).await,
            other => other,
        }
    }

    async fn create_bulk_job(
        &self,
        job: &BulkJobRecord,
        lease_until: chrono::DateTime<chrono::Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<()> {
        let insert = sqlx::query(
            "INSERT INTO identity_bulk_jobs (id, state, params, total, started_by, lease_owner, lease_until)
             VALUES ($1, 'running', $2, $3, $4, $5, $6)",
        )
        .bind(job.id)
        .bind(&job.params)
        .bind(job.total)
        .bind(&job.started_by)
        .bind(job.lease_owner.as_deref())
        .bind(lease_until);
        self.create_job(LeasedJob::Bulk, insert, audit).await
    }

    async fn get_bulk_job(&self, id: Uuid) -> StorageResult<Option<BulkJobRecord>> {
        self.job(LeasedJob::Bulk, JobRow::Id(id), job_from_row).await
    }

    async fn running_bulk_job(&self) -> StorageResult<Option<BulkJobRecord>> {
        self.job(LeasedJob::Bulk, JobRow::Running, job_from_row).await
    }

    async fn claim_job(
        &self,
        job: LeasedJob,
        id: Uuid,
        owner: &str,
        now: chrono::DateTime<chrono::Utc>,
        lease_until: chrono::DateTime<chrono::Utc>,
    ) -> StorageResult<bool> {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET state = 'running', lease_owner = $1, lease_until = $2, updated_at = now(), finished_at = NULL
             WHERE id = $3 AND state IN ('running', 'failed') AND (lease_until IS NULL OR lease_until < $4)",
            job.table()
        )))
        .bind(owner)
        .bind(lease_until)
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| classify(e, Some(job.conflict())))?;
        Ok(done.rows_affected() == 1)
    }

    async fn renew_lease(
        &self,
        job: LeasedJob,
        id: Uuid,
        owner: &str,
        lease_until: chrono::DateTime<chrono::Utc>,
    ) -> StorageResult<JobLease> {
        let cancel: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(guarded_update(
            job,
            "lease_until = $3, updated_at = now()",
        )))
        .bind(id)
        .bind(owner)
        .bind(lease_until)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(JobLease::from_returned(cancel))
    }

    async fn save_bulk_progress(
        &self,
        id: Uuid,
        owner: &str,
        cursor: Option<UserId>,
        counters: &BulkCounters,
        lease_until: chrono::DateTime<chrono::Utc>,
    ) -> StorageResult<JobLease> {
        let cancel: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(guarded_update(
            LeasedJob::Bulk,
            "lease_until = $3, updated_at = now(), cursor_user_id = $4, processed = $5, created = $6,
             linked_existing = $7, skipped = $8, failed = $9",
        )))
        .bind(id)
        .bind(owner)
        .bind(lease_until)
        .bind(cursor.map(|c| *c.as_uuid()))
        .bind(counters.processed)
        .bind(counters.created)
        .bind(counters.linked_existing)
        .bind(counters.skipped)
        .bind(counters.failed)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(JobLease::from_returned(cancel))
    }

    async fn record_bulk_failure(&self, id: Uuid, owner: &str, user_id: UserId, reason: &str) -> StorageResult<bool> {
        let done = sqlx::query(
            "INSERT INTO identity_bulk_failures (job_id, user_id, reason)
             SELECT id, $2, $3 FROM identity_bulk_jobs WHERE id = $1 AND lease_owner = $4 AND state = 'running'
             ON CONFLICT (job_id, user_id) DO UPDATE SET reason = excluded.reason, occurred_at = now()",
        )
        .bind(id)
        .bind(*user_id.as_uuid())
        .bind(reason)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn bulk_failures(&self, id: Uuid) -> StorageResult<Vec<(UserId, String)>> {
        let rows = sqlx::query("SELECT user_id, reason FROM identity_bulk_failures WHERE job_id = $1 ORDER BY user_id")
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|row| {
                Ok((
                    UserId::from_uuid(row.try_get("user_id").map_err(db_err)?),
                    row.try_get("reason").map_err(db_err)?,
                ))
            })
            .collect()
    }

    async fn finish_bulk_job(
        &self,
        id: Uuid,
        owner: &str,
        state: BulkJobState,
        counters: &BulkCounters,
        audit: &NewAuditEvent,
    ) -> StorageResult<bool> {
        let end = sqlx::query(sqlx::AssertSqlSafe(finish_update(
            LeasedJob::Bulk,
            "processed = $4, created = $5, linked_existing = $6, skipped = $7, failed = $8",
        )))
        .bind(id)
        .bind(owner)
        .bind(state.as_db())
        .bind(counters.processed)
        .bind(counters.created)
        .bind(counters.linked_existing)
        .bind(counters.skipped)
        .bind(counters.failed);
        self.end_job(end, audit).await
    }

    async fn request_bulk_cancel(
        &self,
        id: Uuid,
        now: chrono::DateTime<chrono::Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<BulkJobRecord> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // Every expression reads the row as it was, so `ended` is evaluated once per column alike.
        let ended = "(lease_until IS NULL OR lease_until < $2)";
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE identity_bulk_jobs SET cancel_requested = true,
                 state = CASE WHEN {ended} THEN 'cancelled' ELSE state END,
                 finished_at = CASE WHEN {ended} THEN now() ELSE finished_at END,
                 lease_owner = CASE WHEN {ended} THEN NULL ELSE lease_owner END,
                 lease_until = CASE WHEN {ended} THEN NULL ELSE lease_until END,
                 updated_at = now()
             WHERE id = $1 AND state IN ('running', 'failed') RETURNING {}",
            LeasedJob::Bulk.columns()
        )))
        .bind(id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?
        .ok_or(StorageError::NotFound("running bulk job"))?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db_err)?;
        job_from_row(&row)
    }

    async fn user_counts(&self) -> StorageResult<UserCounts> {
        match self.user_counts_once().await {
            Err(err) if self.recover(&err).await? => self.user_counts_once().await,
            other => other,
        }
    }

    async fn flush_auth_stats(&self, flush: &AuthFlush) -> StorageResult<()> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        if !flush.counts.is_empty() {
            let (buckets, methods, outcomes, counts): (Vec<i64>, Vec<String>, Vec<String>, Vec<i64>) = flush
                .counts
                .iter()
                .cloned()
                .fold(Default::default(), |mut acc, (b, m, o, c)| {
                    acc.0.push(b);
                    acc.1.push(m);
                    acc.2.push(o);
                    acc.3.push(c);
                    acc
                });
            sqlx::query(
                "INSERT INTO identity_auth_counts (bucket, method, outcome, count)
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[])
                 ON CONFLICT (bucket, method, outcome) DO UPDATE SET count = identity_auth_counts.count + excluded.count",
            )
            .bind(buckets)
            .bind(methods)
            .bind(outcomes)
            .bind(counts)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        if !flush.latency.is_empty() {
            let buckets: Vec<i64> = flush.latency.iter().map(|l| l.0).collect();
            let slots: Vec<i32> = flush.latency.iter().map(|l| l.1).collect();
            let counts: Vec<i64> = flush.latency.iter().map(|l| l.2).collect();
            sqlx::query(
                "INSERT INTO identity_auth_latency (bucket, slot, count)
                 SELECT * FROM UNNEST($1::bigint[], $2::int[], $3::bigint[])
                 ON CONFLICT (bucket, slot) DO UPDATE SET count = identity_auth_latency.count + excluded.count",
            )
            .bind(buckets)
            .bind(slots)
            .bind(counts)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        if !flush.activity.is_empty() {
            let users: Vec<Uuid> = flush.activity.iter().map(|a| *a.0.as_uuid()).collect();
            let days: Vec<i64> = flush.activity.iter().map(|a| a.1).collect();
            let legacy: Vec<i64> = flush.activity.iter().map(|a| a.2).collect();
            let clerk: Vec<i64> = flush.activity.iter().map(|a| a.3).collect();
            let lwm: Vec<i64> = flush.activity.iter().map(|a| a.4).collect();
            sqlx::query(
                "INSERT INTO identity_auth_activity (user_id, day, legacy, clerk, legacy_while_migrated)
                 SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
                 ON CONFLICT (user_id, day) DO UPDATE SET legacy = identity_auth_activity.legacy + excluded.legacy,
                     clerk = identity_auth_activity.clerk + excluded.clerk,
                     legacy_while_migrated = identity_auth_activity.legacy_while_migrated + excluded.legacy_while_migrated",
            )
            .bind(users)
            .bind(days)
            .bind(legacy)
            .bind(clerk)
            .bind(lwm)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    async fn auth_totals(&self, since_bucket: Option<i64>) -> StorageResult<AuthTotals> {
        let counts = sqlx::query(
            "SELECT method, outcome, SUM(count)::bigint AS n FROM identity_auth_counts
             WHERE ($1::bigint IS NULL OR bucket >= $1) GROUP BY method, outcome",
        )
        .bind(since_bucket)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?
        .iter()
        .map(|row| {
            Ok((
                row.try_get("method").map_err(db_err)?,
                row.try_get("outcome").map_err(db_err)?,
                row.try_get("n").map_err(db_err)?,
            ))
        })
        .collect::<StorageResult<Vec<_>>>()?;
        let latency = sqlx::query(
            "SELECT slot, SUM(count)::bigint AS n FROM identity_auth_latency
             WHERE ($1::bigint IS NULL OR bucket >= $1) GROUP BY slot",
        )
        .bind(since_bucket)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?
        .iter()
        .map(|row| Ok((row.try_get("slot").map_err(db_err)?, row.try_get("n").map_err(db_err)?)))
        .collect::<StorageResult<Vec<_>>>()?;
        Ok(AuthTotals { counts, latency })
    }

    async fn auth_series(&self, since_bucket: i64) -> StorageResult<Vec<AuthPoint>> {
        sqlx::query(
            "SELECT bucket, method, SUM(count)::bigint AS n,
                    SUM(CASE WHEN outcome = 'success' THEN count ELSE 0 END)::bigint AS ok
             FROM identity_auth_counts WHERE bucket >= $1 GROUP BY bucket, method ORDER BY bucket, method",
        )
        .bind(since_bucket)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?
        .iter()
        .map(|row| {
            Ok(AuthPoint {
                bucket: row.try_get("bucket").map_err(db_err)?,
                method: row.try_get("method").map_err(db_err)?,
                attempts: row.try_get("n").map_err(db_err)?,
                successes: row.try_get("ok").map_err(db_err)?,
            })
        })
        .collect()
    }

    async fn invitation_counts(&self, now: chrono::DateTime<chrono::Utc>) -> StorageResult<InvitationCounts> {
        // Totals kept by triggers; the unexpired open ones through the partial
        // index on expiry (a day's worth, not the table); expired = open - pending.
        let row = sqlx::query(
            "SELECT
                 COALESCE((SELECT value FROM identity_stat_counters WHERE name = 'invitations_sent'), 0) AS sent,
                 (SELECT count(*) FROM identity_migration_tokens
                  WHERE used_at IS NULL AND superseded_at IS NULL AND expires_at > $1) AS pending,
                 COALESCE((SELECT value FROM identity_stat_counters WHERE name = 'invitations_redeemed'), 0) AS redeemed,
                 COALESCE((SELECT value FROM identity_stat_counters WHERE name = 'invitations_open'), 0) AS open",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        let pending: i64 = row.try_get("pending").map_err(db_err)?;
        let open: i64 = row.try_get("open").map_err(db_err)?;
        Ok(InvitationCounts {
            sent: row.try_get("sent").map_err(db_err)?,
            pending,
            redeemed: row.try_get("redeemed").map_err(db_err)?,
            expired: (open - pending).max(0),
        })
    }

    async fn latest_bulk_job(&self) -> StorageResult<Option<BulkJobRecord>> {
        self.job(LeasedJob::Bulk, JobRow::Latest, job_from_row).await
    }

    async fn readiness(&self, since_day: i64) -> StorageResult<Readiness> {
        match self.readiness_once(since_day).await {
            Err(err) if self.recover(&err).await? => self.readiness_once(since_day).await,
            other => other,
        }
    }

    async fn revoke_token(&self, revocation: &NewRevocation, audit: &NewAuditEvent) -> StorageResult<()> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // Revoking again keeps the later expiry; it never shortens an entry.
        // `updated_at` is the clock at the statement (not the transaction's
        // start), so it trails the commit as little as it can.
        let sql = if revocation.jti.is_some() {
            "INSERT INTO identity_revocations (id, jti, token_hash, user_id, expires_at, updated_at)
             VALUES ($5, $1, $2, $3, $4, clock_timestamp())
             ON CONFLICT (jti) DO UPDATE SET expires_at = GREATEST(identity_revocations.expires_at, excluded.expires_at),
                 updated_at = clock_timestamp()"
        } else {
            "INSERT INTO identity_revocations (id, jti, token_hash, user_id, expires_at, updated_at)
             VALUES ($5, $1, $2, $3, $4, clock_timestamp())
             ON CONFLICT (token_hash) DO UPDATE SET expires_at = GREATEST(identity_revocations.expires_at, excluded.expires_at),
                 updated_at = clock_timestamp()"
        };
        sqlx::query(sql)
            .bind(revocation.jti.as_deref())
            .bind(revocation.token_hash.as_deref())
            .bind(revocation.user_id.map(|id| *id.as_uuid()))
            .bind(revocation.expires_at)
            .bind(Uuid::new_v4())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn active_revocations(&self, now: chrono::DateTime<chrono::Utc>) -> StorageResult<Vec<RevocationRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {REVOCATION_COLUMNS} FROM identity_revocations WHERE expires_at > $1"
        )))
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(revocation_from_row).collect()
    }

    async fn revocations_changed_since(
        &self,
        since: Option<chrono::DateTime<chrono::Utc>>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> StorageResult<RevocationChanges> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        // Read the clock first: every row committed before it is visible to the next statement.
        let as_of: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)?;
        // Two statements, so that the incremental one always plans on the `updated_at` index.
        let rows =
            match since {
                Some(since) => sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {REVOCATION_COLUMNS} FROM identity_revocations WHERE updated_at >= $1 AND expires_at > $2"
                )))
                .bind(since)
                .bind(now)
                .fetch_all(&mut *conn)
                .await,
                None => {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT {REVOCATION_COLUMNS} FROM identity_revocations WHERE expires_at > $1"
                    )))
                    .bind(now)
                    .fetch_all(&mut *conn)
                    .await
                }
            }
            .map_err(db_err)?;
        let records = rows.iter().map(revocation_from_row).collect::<StorageResult<_>>()?;
        Ok(RevocationChanges { records, as_of })
    }

    async fn purge_revocations(&self, now: chrono::DateTime<chrono::Utc>) -> StorageResult<u64> {
        let done = sqlx::query("DELETE FROM identity_revocations WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn apply_clerk_event(&self, event: &ClerkEvent) -> StorageResult<ClerkEventResult> {
        let sql = self.sql();
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let object = event.change.object_id();
        // The unique key decides: a second delivery of the same id waits here
        // for the first transaction, then finds the row and changes nothing.
        let claimed = sqlx::query(
            "INSERT INTO identity_webhook_events (svix_id, event_type, object_id, object_version, outcome, occurred_at)
             VALUES ($1, $2, $3, $4, 'processing', $5) ON CONFLICT (svix_id) DO NOTHING",
        )
        .bind(&event.id)
        .bind(&event.event_type)
        .bind(object)
        .bind(event.version)
        .bind(event.occurred_at)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected()
            == 1;
        if !claimed {
            return Ok(ClerkEventResult::only(
                ClerkEventOutcome::Duplicate,
                format!("event {} was processed before", event.id),
            ));
        }
        let mut stale = false;
        if let Some(object) = object {
            // One event per Clerk object at a time, in version order.
            lock_key(&mut tx, "identity.clerk", object).await?;
            let latest: Option<i64> = sqlx::query_scalar(
                "SELECT max(object_version) FROM identity_webhook_events WHERE object_id = $1 AND svix_id <> $2",
            )
            .bind(object)
            .bind(&event.id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
            stale = clerk_events::is_stale(event.version, latest);
            if stale && latest == Some(DELETED_VERSION) {
                tracing::debug!(object, "event after the object's deletion");
            }
        }
        let result = if stale {
            ClerkEventResult::only(
                ClerkEventOutcome::Stale,
                format!(
                    "event {} is older than what was applied for {}",
                    event.id,
                    object.unwrap_or("")
                ),
            )
        } else {
            apply_change_in_tx(&mut tx, &sql, event).await?
        };
        sqlx::query("UPDATE identity_webhook_events SET outcome = $2, detail = $3 WHERE svix_id = $1")
            .bind(&event.id)
            .bind(result.outcome.as_str())
            .bind(&result.detail)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(result)
    }

    async fn purge_clerk_events(&self, before: chrono::DateTime<chrono::Utc>, limit: u32) -> StorageResult<u64> {
        // Rows another replica's purge is deleting are skipped, not waited for.
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM identity_webhook_events WHERE svix_id IN ({} FOR UPDATE SKIP LOCKED)",
            clerk_events::purgeable_events("$1", "$2")
        )))
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn user_was_unlinked(&self, user_id: UserId) -> StorageResult<bool> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM identity_unlinked_clerk_users WHERE user_id = $1 LIMIT 1")
                .bind(*user_id.as_uuid())
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
        Ok(found.is_some())
    }

    async fn mappings_after(&self, after: Option<&ClerkUserId>, limit: u32) -> StorageResult<Vec<MappingRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MAPPING_COLUMNS} FROM identity_user_mappings
             WHERE ($1::text IS NULL OR clerk_user_id > $1) ORDER BY clerk_user_id LIMIT $2"
        )))
        .bind(after.map(ClerkUserId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(mapping_from_row).collect()
    }

    async fn create_reconcile_job(
        &self,
        job: &ReconcileJobRecord,
        lease_until: chrono::DateTime<chrono::Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<()> {
        let insert = sqlx::query(
            "INSERT INTO identity_reconcile_jobs (id, state, fix, params, cursor, summary, started_by, lease_owner, lease_until)
             VALUES ($1, 'running', $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(job.id)
        .bind(job.fix)
        .bind(&job.params)
        .bind(job.cursor.as_deref())
        .bind(&job.summary)
        .bind(&job.started_by)
        .bind(job.lease_owner.as_deref())
        .bind(lease_until);
        self.create_job(LeasedJob::Reconcile, insert, audit).await
    }

    async fn get_reconcile_job(&self, id: Uuid) -> StorageResult<Option<ReconcileJobRecord>> {
        self.job(LeasedJob::Reconcile, JobRow::Id(id), reconcile_from_row).await
    }

    async fn latest_reconcile_job(&self) -> StorageResult<Option<ReconcileJobRecord>> {
        self.job(LeasedJob::Reconcile, JobRow::Latest, reconcile_from_row).await
    }

    async fn running_reconcile_job(&self) -> StorageResult<Option<ReconcileJobRecord>> {
        self.job(LeasedJob::Reconcile, JobRow::Running, reconcile_from_row)
            .await
    }

    async fn save_reconcile_progress(
        &self,
        id: Uuid,
        owner: &str,
        cursor: &str,
        summary: &str,
        lease_until: chrono::DateTime<chrono::Utc>,
    ) -> StorageResult<bool> {
        let held: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(guarded_update(
            LeasedJob::Reconcile,
            "lease_until = $3, updated_at = now(), cursor = $4, summary = $5",
        )))
        .bind(id)
        .bind(owner)
        .bind(lease_until)
        .bind(cursor)
        .bind(summary)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(held.is_some())
    }

    async fn finish_reconcile_job(
        &self,
        id: Uuid,
        owner: &str,
        state: BulkJobState,
        summary: &str,
        audit: &NewAuditEvent,
    ) -> StorageResult<bool> {
        let end = sqlx::query(sqlx::AssertSqlSafe(finish_update(LeasedJob::Reconcile, "summary = $4")))
            .bind(id)
            .bind(owner)
            .bind(state.as_db())
            .bind(summary);
        self.end_job(end, audit).await
    }

    async fn get_setting(&self, key: &str) -> StorageResult<Option<SettingRecord>> {
        let row = sqlx::query("SELECT value, updated_at, updated_by FROM identity_settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.as_ref().map(setting_from_row).transpose()
    }

    async fn put_setting(&self, key: &str, value: &str, audit: &NewAuditEvent) -> StorageResult<Option<SettingRecord>> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // Serialise writers of the same key so `previous` is exact.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('identity.settings'), hashtext($1))")
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let previous = sqlx::query("SELECT value, updated_at, updated_by FROM identity_settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?
            .as_ref()
            .map(setting_from_row)
            .transpose()?;
        sqlx::query(
            "INSERT INTO identity_settings (key, value, updated_at, updated_by) VALUES ($1, $2, now(), $3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(key)
        .bind(value)
        .bind(&audit.caller)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(previous)
    }

    async fn append_audit(&self, event: &NewAuditEvent) -> StorageResult<()> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        insert_audit(&mut conn, event).await
    }

    async fn list_audit(&self, query: &AuditQuery) -> StorageResult<Vec<AuditRecord>> {
        let rows = sqlx::query(
            "SELECT id, occurred_at, caller, action, user_id, outcome, detail FROM identity_audit_events
             WHERE ($1::uuid IS NULL OR user_id = $1)
               AND ($2::text IS NULL OR action = $2)
               AND ($3::timestamptz IS NULL OR occurred_at >= $3)
               AND ($4::timestamptz IS NULL OR occurred_at < $4)
               AND ($5::bigint IS NULL OR id < $5)
             ORDER BY id DESC LIMIT $6",
        )
        .bind(query.user_id.map(|id| *id.as_uuid()))
        .bind(query.action.as_deref())
        .bind(query.since)
        .bind(query.until)
        .bind(query.before_id)
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(audit_from_row).collect()
    }
}
