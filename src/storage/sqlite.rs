//! The embedded SQLite backend: ids as UUID text, timestamps as Unix
//! microseconds, write transactions taken with `BEGIN IMMEDIATE` so two
//! writers serialise instead of failing half way.

use std::{
    str::FromStr,
    sync::{Arc, RwLock},
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    Row, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous},
};
use uuid::Uuid;

use super::{
    AuditQuery, AuditRecord, AuthFlush, AuthPoint, AuthTotals, BulkCandidate, BulkCounters, BulkFilter, BulkJobRecord,
    BulkJobState, Conflict, DatabaseOptions, InvitationCounts, JobLease, JobRow, LeasedJob, Linked, MappingKey,
    MappingRecord, NewAuditEvent, NewInvitation, NewLegacyUser, NewRevocation, OutboxCounts, OutboxMessage, Readiness,
    ReconcileJobRecord, RevocationChanges, RevocationRecord, SettingRecord, Storage, StorageError, StorageResult,
    UserCounts, UserKey, UserKeys, UserRecord, UsersTableConfig,
    clerk_events::{self, ClerkChange, ClerkEvent, ClerkEventOutcome, ClerkEventResult, Step, UserSnapshot},
    error::{classify, classify_mapping_insert},
    log_users_table, migrator,
    users_table::{UserSql, parse_sqlite_time, resolve},
};
use crate::domain::{AuditOutcome, ClerkUserId, Email, UserId};

#[derive(Debug, Clone)]
pub struct SqliteStorage {
    pool: SqlitePool,
    config: UsersTableConfig,
    users: Arc<RwLock<Arc<UserSql>>>,
}

fn db_err(err: sqlx::Error) -> StorageError {
    classify(err, None)
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn from_micros(value: i64) -> StorageResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(value)
        .ok_or_else(|| StorageError::Other(format!("timestamp out of range: {value}").into()))
}

fn parse_uuid(raw: &str) -> StorageResult<UserId> {
    Uuid::parse_str(raw)
        .map(UserId::from_uuid)
        .map_err(|e| StorageError::Other(format!("stored id is not a UUID: {e}").into()))
}

fn parse_clerk(raw: &str) -> StorageResult<ClerkUserId> {
    ClerkUserId::parse("clerk_user_id", raw)
        .map_err(|e| StorageError::Other(format!("stored Clerk id is malformed: {e}").into()))
}

/// A row of the user union (see `users_table::user_rows`). The service's
/// own rows keep Unix microseconds; the application's `created_at` may be
/// in any form SQLite writes, and one it cannot read is an error naming
/// the column and the user.
fn user_from_row(row: &SqliteRow) -> StorageResult<UserRecord> {
    let id: String = row.try_get("id").map_err(db_err)?;
    let id = parse_uuid(&id)?;
    let origin: i64 = row.try_get("origin").map_err(db_err)?;
    let created: Option<String> = row.try_get("created_at").map_err(db_err)?;
    let created_at = match created {
        None => None,
        Some(raw) if origin == 1 => Some(from_micros(raw.parse().map_err(|_| {
            StorageError::Other(format!("identity_users.created_at of {id} is not a number").into())
        })?)?),
        Some(raw) => Some(parse_sqlite_time(&raw).ok_or_else(|| {
            StorageError::Other(
                format!("the application's users.created_at of {id} is not a time SQLite writes (Unix time, or YYYY-MM-DD HH:MM:SS)")
                    .into(),
            )
        })?),
    };
    let updated: Option<i64> = row.try_get("updated_at").map_err(db_err)?;
    let mapped: Option<i64> = row.try_get("mapped_at").map_err(db_err)?;
    let password: Option<String> = row.try_get("password_hash").map_err(db_err)?;
    let email: Option<String> = row.try_get("email").map_err(db_err)?;
    Ok(UserRecord {
        id,
        email: email.filter(|e| !e.is_empty()),
        clerk_user_id: row.try_get("clerk_user_id").map_err(db_err)?,
        clerk_native: row.try_get("clerk_native").map_err(db_err)?,
        has_password: password.is_some_and(|p| !p.is_empty()),
        created_at,
        updated_at: updated.max(mapped).map(from_micros).transpose()?,
    })
}

fn mapping_from_row(row: &SqliteRow) -> StorageResult<MappingRecord> {
    let user_id: String = row.try_get("user_id").map_err(db_err)?;
    let clerk: String = row.try_get("clerk_user_id").map_err(db_err)?;
    Ok(MappingRecord {
        user_id: parse_uuid(&user_id)?,
        clerk_user_id: parse_clerk(&clerk)?,
        created_at: from_micros(row.try_get("created_at").map_err(db_err)?)?,
        updated_at: from_micros(row.try_get("updated_at").map_err(db_err)?)?,
    })
}

fn setting_from_row(row: &SqliteRow) -> StorageResult<SettingRecord> {
    Ok(SettingRecord {
        value: row.try_get("value").map_err(db_err)?,
        updated_at: from_micros(row.try_get("updated_at").map_err(db_err)?)?,
        updated_by: row.try_get("updated_by").map_err(db_err)?,
    })
}

fn audit_from_row(row: &SqliteRow) -> StorageResult<AuditRecord> {
    let user_id: Option<String> = row.try_get("user_id").map_err(db_err)?;
    let outcome: String = row.try_get("outcome").map_err(db_err)?;
    Ok(AuditRecord {
        id: row.try_get("id").map_err(db_err)?,
        occurred_at: from_micros(row.try_get("occurred_at").map_err(db_err)?)?,
        caller: row.try_get("caller").map_err(db_err)?,
        action: row.try_get("action").map_err(db_err)?,
        user_id: user_id.as_deref().map(parse_uuid).transpose()?,
        outcome: AuditOutcome::from_db(&outcome)
            .ok_or_else(|| StorageError::Other(format!("unknown audit outcome {outcome:?}").into()))?,
        detail: row.try_get("detail").map_err(db_err)?,
    })
}

async fn insert_audit(conn: &mut sqlx::SqliteConnection, event: &NewAuditEvent) -> StorageResult<()> {
    sqlx::query(
        "INSERT INTO identity_audit_events (occurred_at, caller, action, user_id, outcome, detail)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(micros(Utc::now()))
    .bind(&event.caller)
    .bind(&event.action)
    .bind(event.user_id.map(|id| id.to_string()))
    .bind(event.outcome.as_db())
    .bind(&event.detail)
    .execute(conn)
    .await
    .map_err(db_err)?;
    Ok(())
}

async fn find_in(conn: &mut sqlx::SqliteConnection, sql: &UserSql, id: UserId) -> StorageResult<Option<UserRecord>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(sql.by_id.as_str()))
        .bind(id.to_string())
        .fetch_optional(conn)
        .await
        .map_err(db_err)?;
    row.as_ref().map(user_from_row).transpose()
}

async fn email_taken(conn: &mut sqlx::SqliteConnection, sql: &UserSql, email: &str) -> StorageResult<bool> {
    let row = sqlx::query(sqlx::AssertSqlSafe(sql.by_email.as_str()))
        .bind(email)
        .fetch_optional(conn)
        .await
        .map_err(db_err)?;
    Ok(row.is_some())
}

/// Sets (or clears) the application's mirror column for a user of its table.
async fn mirror(
    conn: &mut sqlx::SqliteConnection,
    sql: &UserSql,
    user: &UserRecord,
    clerk_user_id: Option<&str>,
) -> StorageResult<()> {
    if let Some(statement) = &sql.mirror
        && !user.clerk_native
    {
        sqlx::query(sqlx::AssertSqlSafe(statement.as_str()))
            .bind(clerk_user_id)
            .bind(user.id.to_string())
            .execute(conn)
            .await
            .map_err(|e| classify(e, Some(Conflict::ClerkUserTaken)))?;
    }
    Ok(())
}

async fn mapping_holder(
    conn: &mut sqlx::SqliteConnection,
    clerk_user_id: &ClerkUserId,
) -> StorageResult<Option<UserId>> {
    let holder: Option<String> =
        sqlx::query_scalar("SELECT user_id FROM identity_user_mappings WHERE clerk_user_id = ?")
            .bind(clerk_user_id.as_str())
            .fetch_optional(conn)
            .await
            .map_err(db_err)?;
    holder.as_deref().map(parse_uuid).transpose()
}

/// Links inside the caller's (write) transaction; see the PostgreSQL twin
/// for the merge of a provisional user.
async fn link_in_tx(
    conn: &mut sqlx::SqliteConnection,
    sql: &UserSql,
    user_id: UserId,
    clerk_user_id: &ClerkUserId,
    merge_audit: &NewAuditEvent,
) -> StorageResult<Linked> {
    let user = find_in(conn, sql, user_id)
        .await?
        .ok_or(StorageError::NotFound("user"))?;
    if user.clerk_user_id.is_some() {
        return Err(StorageError::Conflict(Conflict::UserAlreadyLinked));
    }
    let now = micros(Utc::now());
    let mut merged_from = None;
    if let Some(holder) = mapping_holder(conn, clerk_user_id).await? {
        let provisional = find_in(conn, sql, holder).await?.is_some_and(|h| h.clerk_native);
        if !provisional || user.clerk_native {
            return Err(StorageError::Conflict(Conflict::ClerkUserTaken));
        }
        sqlx::query("DELETE FROM identity_user_mappings WHERE user_id = ?")
            .bind(holder.to_string())
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        sqlx::query("UPDATE identity_users SET merged_into = ?, updated_at = ? WHERE id = ?")
            .bind(user_id.to_string())
            .bind(now)
            .bind(holder.to_string())
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
    sqlx::query(
        "INSERT INTO identity_user_mappings (user_id, clerk_user_id, created_at, updated_at) VALUES (?, ?, ?, ?)",
    )
    .bind(user_id.to_string())
    .bind(clerk_user_id.as_str())
    .bind(now)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(classify_mapping_insert)?;
    sqlx::query("DELETE FROM identity_unlinked_clerk_users WHERE clerk_user_id = ?")
        .bind(clerk_user_id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    mirror(conn, sql, &user, Some(clerk_user_id.as_str())).await?;
    Ok(Linked {
        mapping: MappingRecord {
            user_id,
            clerk_user_id: clerk_user_id.clone(),
            created_at: from_micros(now)?,
            updated_at: from_micros(now)?,
        },
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
    conn: &mut sqlx::SqliteConnection,
    sql: &UserSql,
    clerk_user_id: &ClerkUserId,
    email: Option<&Email>,
) -> StorageResult<UserId> {
    let email = match email {
        Some(email) => (!email_taken(conn, sql, &email.normalized()).await?).then_some(email),
        None => None,
    };
    let id = UserId::new_random();
    let now = micros(Utc::now());
    // The email goes with the user only while nobody has it; the unique
    // key is the final word, and a clash stores the user without it.
    let mut stored = false;
    if let Some(email) = email {
        stored = sqlx::query(
            "INSERT INTO identity_users (id, email, email_key, clerk_native, created_at, updated_at)
             VALUES (?, ?, ?, 1, ?, ?)
             ON CONFLICT (email_key) WHERE merged_into IS NULL DO NOTHING",
        )
        .bind(id.to_string())
        .bind(email.as_str())
        .bind(email.normalized())
        .bind(now)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?
        .rows_affected()
            == 1;
    }
    if !stored {
        sqlx::query("INSERT INTO identity_users (id, clerk_native, created_at, updated_at) VALUES (?, 1, ?, ?)")
            .bind(id.to_string())
            .bind(now)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    sqlx::query(
        "INSERT INTO identity_user_mappings (user_id, clerk_user_id, created_at, updated_at) VALUES (?, ?, ?, ?)",
    )
    .bind(id.to_string())
    .bind(clerk_user_id.as_str())
    .bind(now)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(classify_mapping_insert)?;
    Ok(id)
}

/// Removes a user's mapping (clearing the mirror column) and remembers its
/// Clerk user as unlinked; `None` when the user had no mapping.
async fn unlink_in_tx(
    conn: &mut sqlx::SqliteConnection,
    sql: &UserSql,
    user_id: UserId,
) -> StorageResult<Option<MappingRecord>> {
    let row = sqlx::query(
        "DELETE FROM identity_user_mappings WHERE user_id = ? RETURNING user_id, clerk_user_id, created_at, updated_at",
    )
    .bind(user_id.to_string())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_err)?;
    let Some(removed) = row.as_ref().map(mapping_from_row).transpose()? else {
        return Ok(None);
    };
    sqlx::query(
        "INSERT INTO identity_unlinked_clerk_users (clerk_user_id, user_id, unlinked_at) VALUES (?, ?, ?)
         ON CONFLICT (clerk_user_id) DO UPDATE SET user_id = excluded.user_id, unlinked_at = excluded.unlinked_at",
    )
    .bind(removed.clerk_user_id.as_str())
    .bind(user_id.to_string())
    .bind(micros(Utc::now()))
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    if let Some(user) = find_in(conn, sql, user_id).await? {
        mirror(conn, sql, &user, None).await?;
    }
    Ok(Some(removed))
}

/// Refuses a Clerk session (`column` = `session_id`) or a Clerk user
/// (`clerk_user_id`) until `until`; refusing again keeps the later expiry.
async fn refuse_in_tx(
    conn: &mut sqlx::SqliteConnection,
    column: &'static str,
    value: &str,
    until: DateTime<Utc>,
) -> StorageResult<RevocationRecord> {
    let expires_at: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO identity_revocations (id, {column}, expires_at, revoked_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT ({column}) DO UPDATE SET expires_at = max(identity_revocations.expires_at, excluded.expires_at),
             updated_at = excluded.updated_at
         RETURNING expires_at"
    )))
    .bind(Uuid::new_v4().to_string())
    .bind(value)
    .bind(micros(until))
    .bind(micros(Utc::now()))
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(RevocationRecord {
        jti: None,
        token_hash: None,
        session_id: (column == "session_id").then(|| value.to_owned()),
        clerk_user_id: (column == "clerk_user_id").then(|| value.to_owned()),
        expires_at: from_micros(expires_at)?,
    })
}

/// Copies a Clerk user's email to the service's record of the user (see
/// the PostgreSQL twin); the application's own column is never written.
async fn set_email_in_tx(
    conn: &mut sqlx::SqliteConnection,
    sql: &UserSql,
    user_id: UserId,
    email: &Email,
) -> StorageResult<Option<String>> {
    let updated = sqlx::query(
        "UPDATE identity_users SET email = ?, email_key = ?, updated_at = ? WHERE id = ? AND merged_into IS NULL",
    )
    .bind(email.as_str())
    .bind(email.normalized())
    .bind(micros(Utc::now()))
    .bind(user_id.to_string())
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
        "INSERT INTO identity_user_profiles (user_id, email, email_key, imported_at) VALUES (?, ?, ?, ?)
         ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, email_key = excluded.email_key",
    )
    .bind(user_id.to_string())
    .bind(email.as_str())
    .bind(email.normalized())
    .bind(micros(Utc::now()))
    .execute(&mut *conn)
    .await
    .map_err(|e| classify(e, Some(Conflict::UserExists)))?;
    Ok(None)
}

fn revocation_from_row(row: &SqliteRow) -> StorageResult<RevocationRecord> {
    Ok(RevocationRecord {
        jti: row.try_get("jti").map_err(db_err)?,
        token_hash: row.try_get("token_hash").map_err(db_err)?,
        session_id: row.try_get("session_id").map_err(db_err)?,
        clerk_user_id: row.try_get("clerk_user_id").map_err(db_err)?,
        expires_at: from_micros(row.try_get("expires_at").map_err(db_err)?)?,
    })
}

const REVOCATION_COLUMNS: &str = "jti, token_hash, session_id, clerk_user_id, expires_at";

fn reconcile_from_row(row: &SqliteRow) -> StorageResult<ReconcileJobRecord> {
    let id: String = row.try_get("id").map_err(db_err)?;
    let state: String = row.try_get("state").map_err(db_err)?;
    let lease_until: Option<i64> = row.try_get("lease_until").map_err(db_err)?;
    let finished_at: Option<i64> = row.try_get("finished_at").map_err(db_err)?;
    Ok(ReconcileJobRecord {
        id: Uuid::parse_str(&id).map_err(|e| StorageError::Other(Box::new(e)))?,
        state: BulkJobState::from_db(&state)
            .ok_or_else(|| StorageError::Other(format!("unknown reconciliation state {state:?}").into()))?,
        fix: row.try_get("fix").map_err(db_err)?,
        params: row.try_get("params").map_err(db_err)?,
        cursor: row.try_get("cursor").map_err(db_err)?,
        summary: row.try_get("summary").map_err(db_err)?,
        started_by: row.try_get("started_by").map_err(db_err)?,
        lease_owner: row.try_get("lease_owner").map_err(db_err)?,
        lease_until: lease_until.map(from_micros).transpose()?,
        started_at: from_micros(row.try_get("started_at").map_err(db_err)?)?,
        finished_at: finished_at.map(from_micros).transpose()?,
    })
}

/// Applies a claimed, ordered Clerk event inside the caller's (write)
/// transaction; see the PostgreSQL twin.
async fn apply_change_in_tx(
    conn: &mut sqlx::SqliteConnection,
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
            let holder = mapping_holder(conn, clerk_user_id).await?;
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
            let mut snapshot = UserSnapshot::default();
            if let Some(holder) = mapping_holder(conn, clerk_user_id).await? {
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
                let unlinked: Option<i64> =
                    sqlx::query_scalar("SELECT 1 FROM identity_unlinked_clerk_users WHERE user_id = ? LIMIT 1")
                        .bind(user.id.to_string())
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(db_err)?;
                snapshot.by_email_unlinked = unlinked.is_some();
            }
            let admin_unlinked: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM identity_unlinked_clerk_users WHERE clerk_user_id = ?")
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

/// An `UPDATE` of leased job `?1` that applies only while `?2` holds its
/// lease and the job is running. `set` names the columns written, its
/// parameters numbered from `?3`. It returns the job's cancellation flag: no
/// row when the lease is lost (see [`JobLease::from_returned`]).
fn guarded_update(job: LeasedJob, set: &str) -> String {
    format!(
        "UPDATE {} SET {set} WHERE id = ?1 AND lease_owner = ?2 AND state = 'running' RETURNING {}",
        job.table(),
        job.cancel_flag()
    )
}

/// The [`guarded_update`] that ends a leased job and releases its lease:
/// `?3` the final state, `?4` the time; `set` writes the kind's own
/// columns, its parameters numbered from `?5`.
fn finish_update(job: LeasedJob, set: &str) -> String {
    guarded_update(
        job,
        &format!("state = ?3, lease_owner = NULL, lease_until = NULL, updated_at = ?4, finished_at = ?4, {set}"),
    )
}

fn job_from_row(row: &SqliteRow) -> StorageResult<BulkJobRecord> {
    let id: String = row.try_get("id").map_err(db_err)?;
    let state: String = row.try_get("state").map_err(db_err)?;
    let cursor: Option<String> = row.try_get("cursor_user_id").map_err(db_err)?;
    let lease_until: Option<i64> = row.try_get("lease_until").map_err(db_err)?;
    Ok(BulkJobRecord {
        id: Uuid::parse_str(&id).map_err(|e| StorageError::Other(Box::new(e)))?,
        state: BulkJobState::from_db(&state)
            .ok_or_else(|| StorageError::Other(format!("unknown job state {state:?}").into()))?,
        params: row.try_get("params").map_err(db_err)?,
        cursor: cursor.as_deref().map(parse_uuid).transpose()?,
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
        lease_until: lease_until.map(from_micros).transpose()?,
        started_at: from_micros(row.try_get("started_at").map_err(db_err)?)?,
    })
}

/// Text values as a JSON array, for `json_each`.
fn json_array(values: impl Iterator<Item = String>) -> String {
    serde_json::Value::Array(values.map(serde_json::Value::String).collect()).to_string()
}

/// The candidate filter as SQL parameters: a JSON array of ids (or NULL) and a cut-off.
fn filter_params(filter: &BulkFilter) -> (Option<String>, Option<i64>) {
    let ids = (!filter.user_ids.is_empty()).then(|| {
        serde_json::to_string(
            &filter
                .user_ids
                .iter()
                .map(|id| id.hyphenated().to_string())
                .collect::<Vec<_>>(),
        )
        .unwrap_or_else(|_| "[]".to_owned())
    });
    (ids, filter.created_before.map(micros))
}

fn outbox_from_row(row: &SqliteRow) -> StorageResult<OutboxMessage> {
    let id: String = row.try_get("id").map_err(db_err)?;
    let attempts: i64 = row.try_get("attempts").map_err(db_err)?;
    Ok(OutboxMessage {
        id: Uuid::parse_str(&id).map_err(|e| StorageError::Other(Box::new(e)))?,
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

impl SqliteStorage {
    pub async fn connect(url: &str, options: &DatabaseOptions) -> StorageResult<Self> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| StorageError::Other(Box::new(e)))?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let connect = if in_memory {
            connect
        } else {
            connect
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
        };
        // Every connection to `:memory:` would be a database of its own.
        let max = if in_memory { 1 } else { options.max_connections.max(1) };
        let pool = SqlitePoolOptions::new()
            .max_connections(max)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|e| StorageError::Unavailable(Box::new(e)))?;
        Ok(Self {
            pool,
            config: options.users.clone(),
            users: Arc::new(RwLock::new(Arc::new(UserSql::build(None, false)))),
        })
    }

    /// Applies pending migrations, then adds the mirror column when it is
    /// configured and the application's table lacks it.
    pub async fn migrate(&self) -> StorageResult<()> {
        let migrator = migrator(sqlx::migrate!("./migrations/sqlite"));
        migrator
            .run(&self.pool)
            .await
            .map_err(|e| super::migration_error(e, &migrator))?;
        if let Some(column) = &self.config.clerk_id.name
            && let Some(columns) = self.table_columns().await?
            && !columns.iter().any(|(c, _)| c == column.name())
        {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {} ADD COLUMN {} TEXT",
                self.config.table.quoted(),
                column.quoted()
            )))
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        }
        Ok(())
    }

    async fn table_columns(&self) -> StorageResult<Option<Vec<(String, String)>>> {
        if self.config.table.schema().is_some() {
            return Err(StorageError::Precondition(
                "IDENTITY_USERS_TABLE: SQLite takes a plain table name, without a schema".into(),
            ));
        }
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT name, type FROM pragma_table_info(?)")
            .bind(self.config.table.name())
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        Ok((!rows.is_empty()).then_some(rows))
    }

    /// Matches the configured mapping against the application's table and
    /// builds the statements that read it.
    pub async fn resolve_users(&self) -> StorageResult<()> {
        self.resolve_users_with(true).await
    }

    async fn resolve_users_with(&self, strict: bool) -> StorageResult<()> {
        let columns = self.table_columns().await?;
        let resolved = resolve(&self.config, columns.as_deref(), false, strict)?;
        log_users_table(&resolved);
        let sql = Arc::new(UserSql::build(resolved.app, false));
        *self.users.write().unwrap_or_else(std::sync::PoisonError::into_inner) = sql;
        Ok(())
    }

    fn sql(&self) -> Arc<UserSql> {
        self.users
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After a statement met a dropped column: reads the table again and
    /// says whether to try once more.
    async fn recover(&self, err: &StorageError) -> StorageResult<bool> {
        if let StorageError::SchemaChanged(message) = err {
            tracing::warn!(%message, "the application's users table changed; reading its columns again");
            self.resolve_users_with(false).await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn begin_write(&self) -> StorageResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)
    }

    /// Reads one leased job, as `from_row` makes it.
    async fn job<T>(
        &self,
        job: LeasedJob,
        which: JobRow,
        from_row: fn(&SqliteRow) -> StorageResult<T>,
    ) -> StorageResult<Option<T>> {
        let filter = match which {
            JobRow::Id(_) => "WHERE id = ?",
            JobRow::Running => "WHERE state = 'running' LIMIT 1",
            JobRow::Latest => "ORDER BY started_at DESC, id LIMIT 1",
        };
        let mut query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM {} {filter}",
            job.columns(),
            job.table()
        )));
        if let JobRow::Id(id) = which {
            query = query.bind(id.to_string());
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
        insert: sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
        audit: &NewAuditEvent,
    ) -> StorageResult<()> {
        let mut tx = self.begin_write().await?;
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
        end: sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
        audit: &NewAuditEvent,
    ) -> StorageResult<bool> {
        let mut tx = self.begin_write().await?;
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
            UserKey::ClerkUserId(clerk) => match mapping_holder(&mut conn, clerk).await? {
                Some(id) => find_in(&mut conn, &sql, id).await,
                None => Ok(None),
            },
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
                .bind(json_array(ids.iter().map(ToString::to_string))),
            UserKeys::ClerkUserIds(ids) => sqlx::query(sqlx::AssertSqlSafe(sql.by_clerk_ids.as_str()))
                .bind(json_array(ids.iter().map(|id| id.as_str().to_owned()))),
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
        let (ids, before) = filter_params(filter);
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.candidates.as_str()))
            .bind(ids)
            .bind(before)
            .bind(after.map(|id| id.to_string()))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id").map_err(db_err)?;
                Ok(BulkCandidate {
                    id: parse_uuid(&id)?,
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
        let (ids, before) = filter_params(filter);
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.count_candidates.as_str()))
            .bind(ids)
            .bind(before)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)
    }
}

#[async_trait]
impl Storage for SqliteStorage {
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
        let now = micros(Utc::now());
        let mut tx = self.begin_write().await?;
        let in_directory: Option<i64> = sqlx::query_scalar("SELECT 1 FROM identity_users WHERE id = ?")
            .bind(user.id.to_string())
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
                "INSERT INTO identity_user_profiles (user_id, email_key, password_hash, imported_at, email)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, email_key = excluded.email_key,
                     password_hash = COALESCE(excluded.password_hash, identity_user_profiles.password_hash),
                     imported_at = excluded.imported_at",
            )
            .bind(user.id.to_string())
            .bind(&email)
            .bind(user.password_hash.as_deref())
            .bind(now)
            .bind(shown)
            .execute(&mut *tx)
            .await
            .map_err(|e| classify(e, Some(Conflict::UserExists)))?;
        } else {
            sqlx::query(
                "INSERT INTO identity_users (id, email_key, password_hash, created_at, updated_at, email)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(user.id.to_string())
            .bind(&email)
            .bind(user.password_hash.as_deref())
            .bind(now)
            .bind(now)
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
        let mut tx = self.begin_write().await?;
        let linked = link_in_tx(&mut tx, &sql, user_id, clerk_user_id, &merge_event(audit)).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(linked)
    }

    async fn unlink_user(&self, user_id: UserId, audit: &NewAuditEvent) -> StorageResult<MappingRecord> {
        let sql = self.sql();
        let mut tx = self.begin_write().await?;
        let removed = unlink_in_tx(&mut tx, &sql, user_id)
            .await?
            .ok_or(StorageError::NotFound("mapping"))?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(removed)
    }

    async fn find_mapping(&self, key: &MappingKey) -> StorageResult<Option<MappingRecord>> {
        let query = match key {
            MappingKey::UserId(id) => sqlx::query(
                "SELECT user_id, clerk_user_id, created_at, updated_at FROM identity_user_mappings WHERE user_id = ?",
            )
            .bind(id.to_string()),
            MappingKey::ClerkUserId(clerk) => sqlx::query(
                "SELECT user_id, clerk_user_id, created_at, updated_at FROM identity_user_mappings WHERE clerk_user_id = ?",
            )
            .bind(clerk.as_str().to_owned()),
        };
        let row = query.fetch_optional(&self.pool).await.map_err(db_err)?;
        row.as_ref().map(mapping_from_row).transpose()
    }

    fn users_have_emails(&self) -> bool {
        self.sql().app.as_ref().is_none_or(|app| app.email.is_some())
    }

    async fn clerk_user_unlinked(&self, clerk_user_id: &ClerkUserId) -> StorageResult<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM identity_unlinked_clerk_users WHERE clerk_user_id = ?")
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
        let mut tx = self.begin_write().await?;
        if mapping_holder(&mut tx, clerk_user_id).await?.is_some() {
            return Err(StorageError::Conflict(Conflict::ClerkUserTaken));
        }
        let unlinked: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM identity_unlinked_clerk_users WHERE clerk_user_id = ?")
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
        let now = micros(Utc::now());
        let user = invitation.user_id.to_string();
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE identity_migration_tokens SET superseded_at = ?
             WHERE user_id = ? AND used_at IS NULL AND superseded_at IS NULL",
        )
        .bind(now)
        .bind(&user)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        sqlx::query(
            "INSERT INTO identity_migration_tokens (id, user_id, token_hash, expires_at, email_supplied_by, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(&user)
        .bind(&invitation.token_hash)
        .bind(micros(invitation.expires_at))
        .bind(invitation.email_supplied_by.as_deref())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| classify(e, None))?;
        let email = &invitation.email;
        sqlx::query(
            "INSERT INTO identity_outbox (id, kind, user_id, recipient, subject, body_text, body_html, next_attempt_at, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(&email.kind)
        .bind(email.user_id.map(|id| id.to_string()))
        .bind(&email.recipient)
        .bind(&email.subject)
        .bind(&email.body_text)
        .bind(&email.body_html)
        .bind(now)
        .bind(now)
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
        now: DateTime<Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<Linked> {
        let sql = self.sql();
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT id, user_id FROM identity_migration_tokens
             WHERE token_hash = ? AND used_at IS NULL AND superseded_at IS NULL AND expires_at > ?",
        )
        .bind(token_hash)
        .bind(micros(now))
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?
        .ok_or(StorageError::NotFound("invitation"))?;
        let token_id: String = row.try_get("id").map_err(db_err)?;
        let user_id: String = row.try_get("user_id").map_err(db_err)?;
        let user_id = parse_uuid(&user_id)?;
        let audit = NewAuditEvent {
            user_id: Some(user_id),
            ..audit.clone()
        };
        let linked = link_in_tx(&mut tx, &sql, user_id, clerk_user_id, &merge_event(&audit)).await?;
        sqlx::query("UPDATE identity_migration_tokens SET used_at = ? WHERE id = ?")
            .bind(micros(now))
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
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<OutboxMessage>> {
        let mut tx = self.begin_write().await?;
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM identity_outbox
             WHERE sent_at IS NULL AND failed_at IS NULL AND next_attempt_at <= ?1
               AND (locked_until IS NULL OR locked_until < ?1)
             ORDER BY next_attempt_at, created_at LIMIT ?2",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        let mut rows = Vec::with_capacity(due.len());
        // Oldest first, each leased to this worker inside one write transaction.
        for id in due {
            let row = sqlx::query(
                "UPDATE identity_outbox SET locked_by = ?, locked_until = ? WHERE id = ?
                 RETURNING id, kind, recipient, subject, body_text, body_html, attempts",
            )
            .bind(worker)
            .bind(micros(lease_until))
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
            rows.push(row);
        }
        tx.commit().await.map_err(db_err)?;
        rows.iter().map(outbox_from_row).collect()
    }

    async fn outbox_sent(&self, id: Uuid, worker: &str) -> StorageResult<()> {
        sqlx::query(
            "UPDATE identity_outbox SET sent_at = ?, attempts = attempts + 1, body_text = NULL, body_html = NULL,
                 locked_until = NULL, last_error = NULL
             WHERE id = ? AND locked_by = ?",
        )
        .bind(micros(Utc::now()))
        .bind(id.to_string())
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
        retry_at: Option<DateTime<Utc>>,
    ) -> StorageResult<()> {
        let query = match retry_at {
            Some(at) => sqlx::query(
                "UPDATE identity_outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?, locked_until = NULL
                 WHERE id = ? AND locked_by = ?",
            )
            .bind(error)
            .bind(micros(at)),
            None => sqlx::query(
                "UPDATE identity_outbox SET attempts = attempts + 1, last_error = ?, failed_at = ?, locked_until = NULL,
                     body_text = NULL, body_html = NULL
                 WHERE id = ? AND locked_by = ?",
            )
            .bind(error)
            .bind(micros(Utc::now())),
        };
        query
            .bind(id.to_string())
            .bind(worker)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
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
        lease_until: DateTime<Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<()> {
        let now = micros(Utc::now());
        let insert = sqlx::query(
            "INSERT INTO identity_bulk_jobs (id, state, params, total, started_by, lease_owner, lease_until, started_at, updated_at)
             VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(job.id.to_string())
        .bind(&job.params)
        .bind(job.total)
        .bind(&job.started_by)
        .bind(job.lease_owner.as_deref())
        .bind(micros(lease_until))
        .bind(now)
        .bind(now);
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
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StorageResult<bool> {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET state = 'running', lease_owner = ?1, lease_until = ?2, updated_at = ?3, finished_at = NULL
             WHERE id = ?4 AND state IN ('running', 'failed') AND (lease_until IS NULL OR lease_until < ?5)",
            job.table()
        )))
        .bind(owner)
        .bind(micros(lease_until))
        .bind(micros(Utc::now()))
        .bind(id.to_string())
        .bind(micros(now))
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
        lease_until: DateTime<Utc>,
    ) -> StorageResult<JobLease> {
        let cancel: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(guarded_update(
            job,
            "lease_until = ?3, updated_at = ?4",
        )))
        .bind(id.to_string())
        .bind(owner)
        .bind(micros(lease_until))
        .bind(micros(Utc::now()))
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
        lease_until: DateTime<Utc>,
    ) -> StorageResult<JobLease> {
        let cancel: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(guarded_update(
            LeasedJob::Bulk,
            "lease_until = ?3, updated_at = ?4, cursor_user_id = ?5, processed = ?6, created = ?7,
             linked_existing = ?8, skipped = ?9, failed = ?10",
        )))
        .bind(id.to_string())
        .bind(owner)
        .bind(micros(lease_until))
        .bind(micros(Utc::now()))
        .bind(cursor.map(|c| c.to_string()))
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
            "INSERT INTO identity_bulk_failures (job_id, user_id, reason, occurred_at)
             SELECT id, ?, ?, ? FROM identity_bulk_jobs WHERE id = ? AND lease_owner = ? AND state = 'running'
             ON CONFLICT (job_id, user_id) DO UPDATE SET reason = excluded.reason, occurred_at = excluded.occurred_at",
        )
        .bind(user_id.to_string())
        .bind(reason)
        .bind(micros(Utc::now()))
        .bind(id.to_string())
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn bulk_failures(&self, id: Uuid) -> StorageResult<Vec<(UserId, String)>> {
        let rows = sqlx::query("SELECT user_id, reason FROM identity_bulk_failures WHERE job_id = ? ORDER BY user_id")
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|row| {
                let user: String = row.try_get("user_id").map_err(db_err)?;
                Ok((parse_uuid(&user)?, row.try_get("reason").map_err(db_err)?))
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
            "processed = ?5, created = ?6, linked_existing = ?7, skipped = ?8, failed = ?9",
        )))
        .bind(id.to_string())
        .bind(owner)
        .bind(state.as_db())
        .bind(micros(Utc::now()))
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
        now: DateTime<Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<BulkJobRecord> {
        let mut tx = self.begin_write().await?;
        // Every expression reads the row as it was, so `ended` is evaluated once per column alike.
        let ended = "(lease_until IS NULL OR lease_until < ?1)";
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE identity_bulk_jobs SET cancel_requested = 1,
                 state = CASE WHEN {ended} THEN 'cancelled' ELSE state END,
                 finished_at = CASE WHEN {ended} THEN ?1 ELSE finished_at END,
                 lease_owner = CASE WHEN {ended} THEN NULL ELSE lease_owner END,
                 lease_until = CASE WHEN {ended} THEN NULL ELSE lease_until END,
                 updated_at = ?1
             WHERE id = ?2 AND state IN ('running', 'failed') RETURNING {}",
            LeasedJob::Bulk.columns()
        )))
        .bind(micros(now))
        .bind(id.to_string())
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
        let mut tx = self.begin_write().await?;
        for (bucket, method, outcome, count) in &flush.counts {
            sqlx::query(
                "INSERT INTO identity_auth_counts (bucket, method, outcome, count) VALUES (?, ?, ?, ?)
                 ON CONFLICT (bucket, method, outcome) DO UPDATE SET count = count + excluded.count",
            )
            .bind(bucket)
            .bind(method)
            .bind(outcome)
            .bind(count)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        for (bucket, slot, count) in &flush.latency {
            sqlx::query(
                "INSERT INTO identity_auth_latency (bucket, slot, count) VALUES (?, ?, ?)
                 ON CONFLICT (bucket, slot) DO UPDATE SET count = count + excluded.count",
            )
            .bind(bucket)
            .bind(slot)
            .bind(count)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        for (user, day, legacy, clerk, while_migrated) in &flush.activity {
            sqlx::query(
                "INSERT INTO identity_auth_activity (user_id, day, legacy, clerk, legacy_while_migrated) VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT (user_id, day) DO UPDATE SET legacy = legacy + excluded.legacy, clerk = clerk + excluded.clerk,
                     legacy_while_migrated = legacy_while_migrated + excluded.legacy_while_migrated",
            )
            .bind(user.to_string())
            .bind(day)
            .bind(legacy)
            .bind(clerk)
            .bind(while_migrated)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    async fn auth_totals(&self, since_bucket: Option<i64>) -> StorageResult<AuthTotals> {
        let counts = sqlx::query(
            "SELECT method, outcome, SUM(count) AS n FROM identity_auth_counts WHERE (?1 IS NULL OR bucket >= ?1)
             GROUP BY method, outcome",
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
            "SELECT slot, SUM(count) AS n FROM identity_auth_latency WHERE (?1 IS NULL OR bucket >= ?1) GROUP BY slot",
        )
        .bind(since_bucket)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?
        .iter()
        .map(|row| {
            Ok((
                row.try_get::<i64, _>("slot").map_err(db_err)? as i32,
                row.try_get("n").map_err(db_err)?,
            ))
        })
        .collect::<StorageResult<Vec<_>>>()?;
        Ok(AuthTotals { counts, latency })
    }

    async fn auth_series(&self, since_bucket: i64) -> StorageResult<Vec<AuthPoint>> {
        sqlx::query(
            "SELECT bucket, method, SUM(count) AS n,
                    SUM(CASE WHEN outcome = 'success' THEN count ELSE 0 END) AS ok
             FROM identity_auth_counts WHERE bucket >= ?1 GROUP BY bucket, method ORDER BY bucket, method",
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

    async fn invitation_counts(&self, now: DateTime<Utc>) -> StorageResult<InvitationCounts> {
        // Totals kept by triggers; the unexpired open ones through the partial
        // index on expiry (a day's worth, not the table); expired = open - pending.
        let row = sqlx::query(
            "SELECT
                 COALESCE((SELECT value FROM identity_stat_counters WHERE name = 'invitations_sent'), 0) AS sent,
                 (SELECT count(*) FROM identity_migration_tokens
                  WHERE used_at IS NULL AND superseded_at IS NULL AND expires_at > ?1) AS pending,
                 COALESCE((SELECT value FROM identity_stat_counters WHERE name = 'invitations_redeemed'), 0) AS redeemed,
                 COALESCE((SELECT value FROM identity_stat_counters WHERE name = 'invitations_open'), 0) AS open",
        )
        .bind(micros(now))
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
        let mut tx = self.begin_write().await?;
        // Revoking again keeps the later expiry; it never shortens an entry.
        let target = if revocation.jti.is_some() { "jti" } else { "token_hash" };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO identity_revocations (id, jti, token_hash, user_id, expires_at, revoked_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT ({target}) DO UPDATE SET expires_at = max(identity_revocations.expires_at, excluded.expires_at),
                 updated_at = excluded.updated_at"
        )))
        .bind(Uuid::new_v4().to_string())
        .bind(revocation.jti.as_deref())
        .bind(revocation.token_hash.as_deref())
        .bind(revocation.user_id.map(|id| id.to_string()))
        .bind(micros(revocation.expires_at))
        .bind(micros(Utc::now()))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn active_revocations(&self, now: DateTime<Utc>) -> StorageResult<Vec<RevocationRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {REVOCATION_COLUMNS} FROM identity_revocations WHERE expires_at > ?"
        )))
        .bind(micros(now))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(revocation_from_row).collect()
    }

    async fn revocations_changed_since(
        &self,
        since: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> StorageResult<RevocationChanges> {
        // Writers stamp rows with their own clock, the same machine's as this one.
        let as_of = Utc::now();
        // Two statements, so that the incremental one always plans on the `updated_at` index.
        let rows = match since {
            Some(since) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {REVOCATION_COLUMNS} FROM identity_revocations INDEXED BY idx_identity_revocations_updated_at
                 WHERE updated_at >= ? AND expires_at > ?"
            )))
                .bind(micros(since))
                .bind(micros(now))
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {REVOCATION_COLUMNS} FROM identity_revocations WHERE expires_at > ?"
                )))
                .bind(micros(now))
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(db_err)?;
        let records = rows.iter().map(revocation_from_row).collect::<StorageResult<_>>()?;
        Ok(RevocationChanges { records, as_of })
    }

    async fn purge_revocations(&self, now: DateTime<Utc>) -> StorageResult<u64> {
        let done = sqlx::query("DELETE FROM identity_revocations WHERE expires_at <= ?")
            .bind(micros(now))
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn apply_clerk_event(&self, event: &ClerkEvent) -> StorageResult<ClerkEventResult> {
        let sql = self.sql();
        // One writer at a time: a second delivery of the same id finds the row.
        let mut tx = self.begin_write().await?;
        let object = event.change.object_id();
        let claimed = sqlx::query(
            "INSERT INTO identity_webhook_events (svix_id, event_type, object_id, object_version, outcome, occurred_at, received_at)
             VALUES (?, ?, ?, ?, 'processing', ?, ?) ON CONFLICT (svix_id) DO NOTHING",
        )
        .bind(&event.id)
        .bind(&event.event_type)
        .bind(object)
        .bind(event.version)
        .bind(event.occurred_at.map(micros))
        .bind(micros(Utc::now()))
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
            let latest: Option<i64> = sqlx::query_scalar(
                "SELECT max(object_version) FROM identity_webhook_events WHERE object_id = ? AND svix_id <> ?",
            )
            .bind(object)
            .bind(&event.id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
            stale = clerk_events::is_stale(event.version, latest);
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
        sqlx::query("UPDATE identity_webhook_events SET outcome = ?, detail = ? WHERE svix_id = ?")
            .bind(result.outcome.as_str())
            .bind(&result.detail)
            .bind(&event.id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(result)
    }

    async fn purge_clerk_events(&self, before: DateTime<Utc>, limit: u32) -> StorageResult<u64> {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM identity_webhook_events WHERE svix_id IN ({})",
            clerk_events::purgeable_events("?1", "?2")
        )))
        .bind(micros(before))
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn user_was_unlinked(&self, user_id: UserId) -> StorageResult<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM identity_unlinked_clerk_users WHERE user_id = ? LIMIT 1")
                .bind(user_id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
        Ok(found.is_some())
    }

    async fn mappings_after(&self, after: Option<&ClerkUserId>, limit: u32) -> StorageResult<Vec<MappingRecord>> {
        let rows = sqlx::query(
            "SELECT user_id, clerk_user_id, created_at, updated_at FROM identity_user_mappings
             WHERE (?1 IS NULL OR clerk_user_id > ?1) ORDER BY clerk_user_id LIMIT ?2",
        )
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
        lease_until: DateTime<Utc>,
        audit: &NewAuditEvent,
    ) -> StorageResult<()> {
        let now = micros(Utc::now());
        let insert = sqlx::query(
            "INSERT INTO identity_reconcile_jobs (id, state, fix, params, cursor, summary, started_by, lease_owner,
                 lease_until, started_at, updated_at)
             VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(job.id.to_string())
        .bind(job.fix)
        .bind(&job.params)
        .bind(job.cursor.as_deref())
        .bind(&job.summary)
        .bind(&job.started_by)
        .bind(job.lease_owner.as_deref())
        .bind(micros(lease_until))
        .bind(now)
        .bind(now);
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
        lease_until: DateTime<Utc>,
    ) -> StorageResult<bool> {
        let held: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(guarded_update(
            LeasedJob::Reconcile,
            "lease_until = ?3, updated_at = ?4, cursor = ?5, summary = ?6",
        )))
        .bind(id.to_string())
        .bind(owner)
        .bind(micros(lease_until))
        .bind(micros(Utc::now()))
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
        let end = sqlx::query(sqlx::AssertSqlSafe(finish_update(LeasedJob::Reconcile, "summary = ?5")))
            .bind(id.to_string())
            .bind(owner)
            .bind(state.as_db())
            .bind(micros(Utc::now()))
            .bind(summary);
        self.end_job(end, audit).await
    }

    async fn get_setting(&self, key: &str) -> StorageResult<Option<SettingRecord>> {
        let row = sqlx::query("SELECT value, updated_at, updated_by FROM identity_settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.as_ref().map(setting_from_row).transpose()
    }

    async fn put_setting(&self, key: &str, value: &str, audit: &NewAuditEvent) -> StorageResult<Option<SettingRecord>> {
        let mut tx = self.begin_write().await?;
        let previous = sqlx::query("SELECT value, updated_at, updated_by FROM identity_settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?
            .as_ref()
            .map(setting_from_row)
            .transpose()?;
        sqlx::query(
            "INSERT INTO identity_settings (key, value, updated_at, updated_by) VALUES (?, ?, ?, ?)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(key)
        .bind(value)
        .bind(micros(Utc::now()))
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
             WHERE (?1 IS NULL OR user_id = ?1)
               AND (?2 IS NULL OR action = ?2)
               AND (?3 IS NULL OR occurred_at >= ?3)
               AND (?4 IS NULL OR occurred_at < ?4)
               AND (?5 IS NULL OR id < ?5)
             ORDER BY id DESC LIMIT ?6",
        )
        .bind(query.user_id.map(|id| id.to_string()))
        .bind(query.action.as_deref())
        .bind(query.since.map(micros))
        .bind(query.until.map(micros))
        .bind(query.before_id)
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(audit_from_row).collect()
    }
}
