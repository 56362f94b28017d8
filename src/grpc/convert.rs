//! Conversions between protobuf messages and domain types.

use chrono::{DateTime, Utc};

use crate::{
    domain::{AuditOutcome, AuthMode, ClerkUserId, DomainError, Email, MigrationState, User, UserId},
    pb,
    storage::{AuditRecord, MappingKey, MappingRecord, UserKey},
    verification::{AuthMethod, Principal, RejectReason, Rejection},
};

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A client's timestamp; `field` names it when it is out of range.
pub fn from_timestamp(field: &'static str, ts: &prost_types::Timestamp) -> Result<DateTime<Utc>, DomainError> {
    u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
        .ok_or_else(|| DomainError::invalid(field, "is not a valid timestamp"))
}

pub fn user(user: User) -> pb::User {
    pb::User {
        user_id: user.id.to_string(),
        email: user.email.unwrap_or_default(),
        clerk_user_id: user.clerk_user_id.unwrap_or_default(),
        migration_state: migration_state(user.migration_state) as i32,
        has_legacy_password: user.has_legacy_password,
        created_at: user.created_at.map(timestamp),
        updated_at: user.updated_at.map(timestamp),
    }
}

pub fn migration_state(state: MigrationState) -> pb::MigrationState {
    match state {
        MigrationState::LegacyOnly => pb::MigrationState::LegacyOnly,
        MigrationState::Migrated => pb::MigrationState::Migrated,
        MigrationState::ClerkNative => pb::MigrationState::ClerkNative,
    }
}

pub fn principal(principal: Principal) -> pb::Principal {
    pb::Principal {
        user_id: principal.user_id.to_string(),
        auth_method: match principal.method {
            AuthMethod::LegacyJwt => pb::AuthMethod::LegacyJwt,
            AuthMethod::Clerk => pb::AuthMethod::Clerk,
        } as i32,
        clerk_user_id: principal.clerk_user_id.unwrap_or_default(),
        session_id: principal.session_id.unwrap_or_default(),
        email: principal.email.unwrap_or_default(),
        migration_state: migration_state(principal.migration_state) as i32,
        expires_at: Some(timestamp(principal.expires_at)),
        organization: principal.organization.map(|o| pb::Organization {
            id: o.id,
            role: o.role,
            slug: o.slug,
        }),
        new_to_application: principal.new_to_application,
    }
}

pub fn rejection(rejection: Rejection) -> pb::Rejection {
    use pb::RejectionReason as R;
    let reason = match rejection.reason {
        RejectReason::Malformed => R::Malformed,
        RejectReason::Expired => R::Expired,
        RejectReason::NotYetValid => R::NotYetValid,
        RejectReason::IssuedInFuture => R::IssuedInFuture,
        RejectReason::BadSignature => R::BadSignature,
        RejectReason::UnknownKey => R::UnknownKey,
        RejectReason::Issuer => R::Issuer,
        RejectReason::Audience => R::Audience,
        RejectReason::AlgorithmNotAllowed => R::AlgorithmNotAllowed,
        RejectReason::Revoked => R::Revoked,
        RejectReason::MethodDisabled => R::MethodDisabled,
        RejectReason::UserNotFound => R::UserNotFound,
        RejectReason::UnmappedUser => R::UnmappedUser,
        RejectReason::SessionPending => R::SessionPending,
        RejectReason::NotSessionToken => R::NotSessionToken,
        RejectReason::LegacyAfterMigration => R::LegacyAfterMigration,
    };
    pb::Rejection {
        reason: reason as i32,
        message: rejection.message,
    }
}

pub fn bulk_state(state: crate::storage::BulkJobState) -> pb::BulkJobState {
    use crate::storage::BulkJobState as S;
    match state {
        S::Running => pb::BulkJobState::Running,
        S::Completed => pb::BulkJobState::Completed,
        S::Cancelled => pb::BulkJobState::Cancelled,
        S::Failed => pb::BulkJobState::Failed,
    }
}

pub fn bulk_progress(progress: crate::domain::BulkProgress) -> pb::BulkMigrationProgress {
    let c = progress.counters;
    pb::BulkMigrationProgress {
        job_id: progress.job_id.to_string(),
        state: bulk_state(progress.state) as i32,
        dry_run: progress.dry_run,
        total: progress.total,
        processed: c.processed,
        created: c.created,
        linked_existing: c.linked_existing,
        skipped: c.skipped,
        failed: c.failed,
        users_per_second: progress.rate,
        eta_seconds: progress.eta_seconds.unwrap_or(0),
        message: progress.message,
    }
}

pub fn window(raw: i32) -> Result<crate::metrics::Window, DomainError> {
    use crate::metrics::Window;
    match pb::StatsWindow::try_from(raw) {
        Ok(pb::StatsWindow::Unspecified | pb::StatsWindow::LastHour) => Ok(Window::LastHour),
        Ok(pb::StatsWindow::Last5Minutes) => Ok(Window::Last5Minutes),
        Ok(pb::StatsWindow::LastDay) => Ok(Window::LastDay),
        Ok(pb::StatsWindow::AllTime) => Ok(Window::AllTime),
        Err(_) => Err(DomainError::invalid("window", "is not a known window")),
    }
}

pub fn stats(snapshot: crate::metrics::StatsSnapshot) -> pb::MigrationStats {
    use crate::metrics::Window;
    let users = snapshot.users;
    let total = users.legacy_only + users.migrated + users.clerk_native;
    pb::MigrationStats {
        at: Some(timestamp(snapshot.at)),
        window: match snapshot.window {
            Window::Last5Minutes => pb::StatsWindow::Last5Minutes,
            Window::LastHour => pb::StatsWindow::LastHour,
            Window::LastDay => pb::StatsWindow::LastDay,
            Window::AllTime => pb::StatsWindow::AllTime,
        } as i32,
        total_users: total,
        legacy_users: users.legacy_only,
        migrated_users: users.migrated,
        clerk_native_users: users.clerk_native,
        migrated_ratio: if total > 0 {
            (users.migrated + users.clerk_native) as f64 / total as f64
        } else {
            0.0
        },
        auth_attempts: snapshot.attempts,
        auth_successes: snapshot.successes,
        auth_rejections: snapshot.rejections,
        auth_errors: snapshot.errors,
        success_rate: snapshot.success_rate,
        error_rate: snapshot.error_rate,
        methods: snapshot
            .methods
            .into_iter()
            .map(|m| pb::MethodStats {
                method: m.method,
                attempts: m.attempts,
                successes: m.successes,
                errors: m.errors,
                rejections: m
                    .rejections
                    .into_iter()
                    .map(|(reason, count)| pb::ReasonCount { reason, count })
                    .collect(),
            })
            .collect(),
        latency_p50_us: snapshot.p50_us,
        latency_p95_us: snapshot.p95_us,
        latency_p99_us: snapshot.p99_us,
        invitations: Some(pb::InvitationStats {
            sent: snapshot.invitations.sent,
            pending: snapshot.invitations.pending,
            redeemed: snapshot.invitations.redeemed,
            expired: snapshot.invitations.expired,
        }),
        bulk_job: snapshot.bulk_job.map(|job| pb::BulkMigrationProgress {
            job_id: job.id.to_string(),
            state: bulk_state(job.state) as i32,
            dry_run: false,
            total: job.total,
            processed: job.counters.processed,
            created: job.counters.created,
            linked_existing: job.counters.linked_existing,
            skipped: job.counters.skipped,
            failed: job.counters.failed,
            users_per_second: 0.0,
            eta_seconds: 0,
            message: String::new(),
        }),
        readiness: Some(pb::CutoverReadiness {
            days: snapshot.readiness_days,
            active_users: snapshot.readiness.active_users,
            would_be_locked_out: snapshot.readiness.legacy_only_unlinked,
            legacy_verifications_by_migrated_users: snapshot.readiness.legacy_verifications_by_migrated,
        }),
        auth_mode: auth_mode(snapshot.auth_mode) as i32,
        last_reconciliation: snapshot
            .reconciliation
            .as_ref()
            .map(|job| reconcile_progress(crate::domain::ReconcileProgress::from_record(job))),
    }
}

pub fn reconcile_progress(progress: crate::domain::ReconcileProgress) -> pb::ReconcileProgress {
    let summary = progress.summary;
    pb::ReconcileProgress {
        job_id: progress.job_id.to_string(),
        state: bulk_state(progress.state) as i32,
        fix: progress.fix,
        clerk_users_seen: summary.clerk_users_seen,
        mappings_checked: summary.mappings_checked,
        drift: crate::domain::reconcile::DRIFT_KINDS
            .iter()
            .map(|kind| {
                let drift = summary.drift.get(*kind).cloned().unwrap_or_default();
                pb::DriftReport {
                    kind: (*kind).to_owned(),
                    count: drift.count,
                    fixed: drift.fixed,
                    clerk_user_ids: drift.ids,
                }
            })
            .collect(),
        message: progress.message,
        finished_at: progress.finished_at.map(timestamp),
    }
}

pub fn mapping(mapping: MappingRecord) -> pb::UserMapping {
    pb::UserMapping {
        user_id: mapping.user_id.to_string(),
        clerk_user_id: mapping.clerk_user_id.to_string(),
        created_at: Some(timestamp(mapping.created_at)),
        updated_at: Some(timestamp(mapping.updated_at)),
    }
}

pub fn audit_event(event: AuditRecord) -> pb::AuditEvent {
    pb::AuditEvent {
        id: event.id,
        occurred_at: Some(timestamp(event.occurred_at)),
        caller: event.caller,
        action: event.action,
        user_id: event.user_id.map(|id| id.to_string()).unwrap_or_default(),
        outcome: match event.outcome {
            AuditOutcome::Success => pb::AuditOutcome::Success,
            AuditOutcome::Failure => pb::AuditOutcome::Failure,
        } as i32,
        detail: event.detail,
    }
}

pub fn auth_mode(mode: AuthMode) -> pb::AuthMode {
    match mode {
        AuthMode::Dual => pb::AuthMode::Dual,
        AuthMode::ClerkOnly => pb::AuthMode::ClerkOnly,
        AuthMode::LegacyOnly => pb::AuthMode::LegacyOnly,
    }
}

pub fn auth_mode_from(field: &'static str, raw: i32) -> Result<AuthMode, DomainError> {
    match pb::AuthMode::try_from(raw) {
        Ok(pb::AuthMode::Dual) => Ok(AuthMode::Dual),
        Ok(pb::AuthMode::ClerkOnly) => Ok(AuthMode::ClerkOnly),
        Ok(pb::AuthMode::LegacyOnly) => Ok(AuthMode::LegacyOnly),
        Ok(pb::AuthMode::Unspecified) => Err(DomainError::invalid(
            field,
            "must be set (AUTH_MODE_DUAL, AUTH_MODE_CLERK_ONLY or AUTH_MODE_LEGACY_ONLY)",
        )),
        Err(_) => Err(DomainError::invalid(field, "is not a known auth mode")),
    }
}

pub fn user_key(lookup: Option<pb::get_user_request::Lookup>) -> Result<UserKey, DomainError> {
    use pb::get_user_request::Lookup;
    match lookup {
        Some(Lookup::UserId(id)) => Ok(UserKey::Id(UserId::parse("user_id", &id)?)),
        Some(Lookup::ClerkUserId(id)) => Ok(UserKey::ClerkUserId(ClerkUserId::parse("clerk_user_id", &id)?)),
        Some(Lookup::Email(email)) => Ok(UserKey::Email(Email::parse("email", &email)?)),
        None => Err(DomainError::invalid(
            "lookup",
            "set one of user_id, clerk_user_id or email",
        )),
    }
}

pub fn mapping_key(lookup: Option<pb::get_mapping_request::Lookup>) -> Result<MappingKey, DomainError> {
    use pb::get_mapping_request::Lookup;
    match lookup {
        Some(Lookup::UserId(id)) => Ok(MappingKey::UserId(UserId::parse("user_id", &id)?)),
        Some(Lookup::ClerkUserId(id)) => Ok(MappingKey::ClerkUserId(ClerkUserId::parse("clerk_user_id", &id)?)),
        None => Err(DomainError::invalid("lookup", "set one of user_id or clerk_user_id")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_timestamps_are_invalid_not_panics() {
        for ts in [
            prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            },
            prost_types::Timestamp { seconds: 0, nanos: -1 },
            prost_types::Timestamp {
                seconds: 0,
                nanos: 2_000_000_000,
            },
        ] {
            assert!(from_timestamp("since", &ts).is_err());
        }
        let now = Utc::now();
        assert_eq!(from_timestamp("since", &timestamp(now)).unwrap(), now);
    }
}
