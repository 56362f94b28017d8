//! Clerk events (webhook deliveries, and the repairs a reconciliation makes)
//! as storage applies them: each in one transaction with its delivery row
//! (`identity_webhook_events`, keyed by `svix-id`), its audit event and any
//! revocation it writes.
//!
//! What an event does is decided here, once for both backends, by
//! [`plan_user`] from what the transaction read ([`UserSnapshot`]); each
//! backend only reads the snapshot and carries the [`Step`]s out.

use chrono::{DateTime, Utc};

use super::{RevocationRecord, UserRecord};
use crate::{
    config::UnmappedPolicy,
    domain::{ClerkUserId, Email, UserId},
};

/// The version a deletion records: later than any `updated_at`, so nothing
/// older (every other event about the user) applies after it.
pub const DELETED_VERSION: i64 = i64::MAX;

/// What an event asks of the mapping, parsed and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClerkChange {
    /// `user.created` / `user.updated`: the user as Clerk shows it now.
    User {
        clerk_user_id: ClerkUserId,
        /// `external_id` as Clerk holds it (a user id when it parses as one).
        external_id: Option<String>,
        /// The primary email address, only when Clerk has verified it.
        verified_email: Option<Email>,
        /// What to do when neither a mapping nor `external_id` names a user.
        unmapped: UnmappedPolicy,
    },
    /// `user.deleted`: the mapping goes, and the Clerk user's tokens are
    /// refused until `refuse_until`.
    UserDeleted {
        clerk_user_id: ClerkUserId,
        refuse_until: DateTime<Utc>,
    },
    /// `session.revoked` / `session.ended` / `session.removed`: tokens of
    /// the session are refused until `refuse_until`.
    SessionEnded {
        session_id: String,
        refuse_until: DateTime<Utc>,
    },
    /// A type this service does not act on: recorded, nothing else.
    Ignored,
}

impl ClerkChange {
    /// The Clerk object the event is about, by which events are ordered.
    pub fn object_id(&self) -> Option<&str> {
        match self {
            Self::User { clerk_user_id, .. } | Self::UserDeleted { clerk_user_id, .. } => Some(clerk_user_id.as_str()),
            Self::SessionEnded { session_id, .. } => Some(session_id),
            Self::Ignored => None,
        }
    }
}

/// One event to record and apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClerkEvent {
    /// The delivery's `svix-id` (or, for a reconciliation's repair, an id of its own).
    pub id: String,
    pub event_type: String,
    /// When Clerk says it happened.
    pub occurred_at: Option<DateTime<Utc>>,
    /// The object's `updated_at` in milliseconds ([`DELETED_VERSION`] for a
    /// deletion); `None` when the event carries none (it is not ordered).
    pub version: Option<i64>,
    pub change: ClerkChange,
    /// Who the audit log names.
    pub caller: String,
}

/// How an event ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClerkEventOutcome {
    /// The mapping, the directory or the revocations changed.
    Applied,
    /// Nothing to change (already so, or the policy leaves it).
    Unchanged,
    /// Older than what was already applied for the object: not applied.
    Stale,
    /// It would move a mapping or take another user's link: recorded and
    /// audited, not applied.
    Conflict,
    /// A type this service does not act on.
    Ignored,
    /// This delivery was processed before (here or on another replica).
    Duplicate,
}

impl ClerkEventOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Stale => "stale",
            Self::Conflict => "conflict",
            Self::Ignored => "ignored",
            Self::Duplicate => "duplicate",
        }
    }
}

/// What applying an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClerkEventResult {
    pub outcome: ClerkEventOutcome,
    pub detail: String,
    /// Users whose record or link changed (for the caller's caches).
    pub users: Vec<UserId>,
    /// Clerk users whose link changed.
    pub clerk_user_ids: Vec<String>,
    /// The refusal written, to apply on this replica at once.
    pub revocation: Option<RevocationRecord>,
}

impl ClerkEventResult {
    pub fn only(outcome: ClerkEventOutcome, detail: impl Into<String>) -> Self {
        Self {
            outcome,
            detail: detail.into(),
            users: Vec::new(),
            clerk_user_ids: Vec::new(),
            revocation: None,
        }
    }
}

/// What a user event's transaction read before deciding.
#[derive(Debug, Clone, Default)]
pub(crate) struct UserSnapshot {
    /// The user mapped to the Clerk user now.
    pub mapped: Option<UserRecord>,
    /// The user `external_id` names, when it parses as a user id and exists.
    pub named: Option<UserRecord>,
    /// The user holding the verified email, when there is one.
    pub by_email: Option<UserRecord>,
    /// Whether `by_email` once lost a Clerk link (unlinked by an admin, or
    /// its Clerk user deleted): it is not linked by email to another account.
    pub by_email_unlinked: bool,
    /// Whether an admin unlinked this Clerk user (it stays unmapped).
    pub admin_unlinked: bool,
}

/// One write of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Link this user to the event's Clerk user.
    Link(UserId),
    /// Create a Clerk-native user linked to the event's Clerk user.
    Provision(Option<Email>),
    /// Copy the Clerk user's verified email to the user.
    SetEmail(UserId, Email),
}

/// What a user event will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub steps: Vec<Step>,
    pub outcome: ClerkEventOutcome,
    pub detail: String,
    /// The user the audit event names.
    pub user: Option<UserId>,
}

fn same_email(user: &UserRecord, email: &Email) -> bool {
    user.email
        .as_deref()
        .and_then(|e| Email::parse("email", e).ok())
        .is_some_and(|e| e.normalized() == email.normalized())
}

/// Decides a `user.created` / `user.updated` event.
pub(crate) fn plan_user(
    clerk_user_id: &ClerkUserId,
    external_id: Option<&str>,
    verified_email: Option<&Email>,
    unmapped: UnmappedPolicy,
    snapshot: &UserSnapshot,
) -> Plan {
    let external = external_id.map(str::trim).filter(|e| !e.is_empty());
    let named_id = external.and_then(|e| UserId::parse("external_id", e).ok());
    let plan = |steps, outcome, detail: String, user| Plan {
        steps,
        outcome,
        detail,
        user,
    };
    if let Some(mapped) = &snapshot.mapped {
        if let Some(external) = external
            && named_id != Some(mapped.id)
        {
            return plan(
                Vec::new(),
                ClerkEventOutcome::Conflict,
                format!(
                    "{clerk_user_id} has external_id {external:?} but is mapped to user {}: the mapping is not moved",
                    mapped.id
                ),
                Some(mapped.id),
            );
        }
        return match verified_email {
            Some(email) if !same_email(mapped, email) => match &snapshot.by_email {
                Some(holder) if holder.id != mapped.id => plan(
                    Vec::new(),
                    ClerkEventOutcome::Conflict,
                    format!(
                        "{clerk_user_id}'s email {} belongs to user {}: not copied to user {}",
                        email.as_str(),
                        holder.id,
                        mapped.id
                    ),
                    Some(mapped.id),
                ),
                _ => plan(
                    vec![Step::SetEmail(mapped.id, email.clone())],
                    ClerkEventOutcome::Applied,
                    format!("email of user {} set to {}", mapped.id, email.as_str()),
                    Some(mapped.id),
                ),
            },
            _ => plan(
                Vec::new(),
                ClerkEventOutcome::Unchanged,
                format!("{clerk_user_id} is mapped to user {}; nothing changed", mapped.id),
                Some(mapped.id),
            ),
        };
    }
    if snapshot.admin_unlinked {
        return plan(
            Vec::new(),
            ClerkEventOutcome::Unchanged,
            format!("{clerk_user_id} was unlinked by an admin and stays unmapped until linked again"),
            None,
        );
    }
    let mut note = String::new();
    if let Some(external) = external {
        match &snapshot.named {
            Some(user) if user.clerk_user_id.is_none() && !user.clerk_native => {
                return plan(
                    vec![Step::Link(user.id)],
                    ClerkEventOutcome::Applied,
                    format!("linked user {} to {clerk_user_id} by external_id", user.id),
                    Some(user.id),
                );
            }
            Some(user) => {
                return plan(
                    Vec::new(),
                    ClerkEventOutcome::Conflict,
                    format!(
                        "{clerk_user_id}'s external_id names user {} who is linked to {}: not linked",
                        user.id,
                        user.clerk_user_id.as_deref().unwrap_or("a Clerk user")
                    ),
                    Some(user.id),
                );
            }
            None => note = format!("external_id {external:?} names no known user; "),
        }
    }
    let free_email = || verified_email.filter(|_| snapshot.by_email.is_none()).cloned();
    match unmapped {
        UnmappedPolicy::Reject => plan(
            Vec::new(),
            ClerkEventOutcome::Unchanged,
            format!("{note}{clerk_user_id} stays unmapped (policy reject)"),
            None,
        ),
        UnmappedPolicy::LinkByEmail => match (&snapshot.by_email, verified_email) {
            (Some(user), Some(email))
                if user.clerk_user_id.is_none() && !user.clerk_native && !snapshot.by_email_unlinked =>
            {
                plan(
                    vec![Step::Link(user.id)],
                    ClerkEventOutcome::Applied,
                    format!(
                        "{note}linked user {} to {clerk_user_id} by verified email {}",
                        user.id,
                        email.as_str()
                    ),
                    Some(user.id),
                )
            }
            _ => plan(
                vec![Step::Provision(free_email())],
                ClerkEventOutcome::Applied,
                format!("{note}provisioned a user for {clerk_user_id}"),
                None,
            ),
        },
        UnmappedPolicy::Provision => plan(
            vec![Step::Provision(free_email())],
            ClerkEventOutcome::Applied,
            format!("{note}provisioned a user for {clerk_user_id}"),
            None,
        ),
    }
}

/// Whether an event of `version` is older than `latest` (the newest
/// version already recorded for its object).
pub(crate) fn is_stale(version: Option<i64>, latest: Option<i64>) -> bool {
    match (version, latest) {
        (Some(version), Some(latest)) => version < latest || latest == DELETED_VERSION && version != DELETED_VERSION,
        // An unordered event after a deletion of its object changes nothing either.
        (None, Some(latest)) => latest == DELETED_VERSION,
        _ => false,
    }
}

/// The ids of at most `limit` recorded events received before `before`,
/// oldest first, that the out-of-order check no longer needs: those of no
/// object or of no version (`max(object_version)` skips them), and those
/// of a version older than another row of their object. Each object's
/// newest version stays (both if two rows share it). Placeholders are the
/// backend's (`?1`, `$1`...); `received_at` is indexed.
pub(crate) fn purgeable_events(before: &str, limit: &str) -> String {
    format!(
        "SELECT e.svix_id FROM identity_webhook_events e
         WHERE e.received_at < {before}
           AND (e.object_id IS NULL OR e.object_version IS NULL OR EXISTS (
               SELECT 1 FROM identity_webhook_events newer
               WHERE newer.object_id = e.object_id AND newer.object_version > e.object_version))
         ORDER BY e.received_at LIMIT {limit}"
    )
}

/// The audit action of an event type.
pub(crate) fn audit_action(event_type: &str) -> String {
    format!("clerk.{event_type}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: UserId, email: &str, clerk: Option<&str>, native: bool) -> UserRecord {
        UserRecord {
            id,
            email: Some(email.to_owned()),
            clerk_user_id: clerk.map(str::to_owned),
            clerk_native: native,
            has_password: false,
            created_at: None,
            updated_at: None,
        }
    }

    fn clerk(id: &str) -> ClerkUserId {
        ClerkUserId::parse("clerk", id).unwrap()
    }

    fn email(e: &str) -> Email {
        Email::parse("email", e).unwrap()
    }

    #[test]
    fn a_mapped_user_takes_a_new_email_but_never_moves() {
        let ann = UserId::new_random();
        let other = UserId::new_random();
        let snapshot = UserSnapshot {
            mapped: Some(user(ann, "ann@example.com", Some("user_a"), false)),
            ..Default::default()
        };
        let same = plan_user(
            &clerk("user_a"),
            None,
            Some(&email("ANN@example.com")),
            UnmappedPolicy::Reject,
            &snapshot,
        );
        assert_eq!(same.outcome, ClerkEventOutcome::Unchanged);
        let changed = plan_user(
            &clerk("user_a"),
            Some(&ann.to_string()),
            Some(&email("new@example.com")),
            UnmappedPolicy::Reject,
            &snapshot,
        );
        assert_eq!(changed.steps, vec![Step::SetEmail(ann, email("new@example.com"))]);
        let moved = plan_user(
            &clerk("user_a"),
            Some(&other.to_string()),
            None,
            UnmappedPolicy::Provision,
            &snapshot,
        );
        assert_eq!(moved.outcome, ClerkEventOutcome::Conflict);
        assert!(moved.steps.is_empty());
        let taken = UserSnapshot {
            by_email: Some(user(other, "new@example.com", None, false)),
            ..snapshot
        };
        let clash = plan_user(
            &clerk("user_a"),
            None,
            Some(&email("new@example.com")),
            UnmappedPolicy::Reject,
            &taken,
        );
        assert_eq!(clash.outcome, ClerkEventOutcome::Conflict);
    }

    #[test]
    fn an_unmapped_user_is_linked_by_external_id_or_handled_by_the_policy() {
        let bob = UserId::new_random();
        let named = UserSnapshot {
            named: Some(user(bob, "bob@example.com", None, false)),
            ..Default::default()
        };
        let linked = plan_user(
            &clerk("user_b"),
            Some(&bob.to_string()),
            None,
            UnmappedPolicy::Reject,
            &named,
        );
        assert_eq!(linked.steps, vec![Step::Link(bob)]);
        let elsewhere = UserSnapshot {
            named: Some(user(bob, "bob@example.com", Some("user_z"), false)),
            ..Default::default()
        };
        let conflict = plan_user(
            &clerk("user_b"),
            Some(&bob.to_string()),
            None,
            UnmappedPolicy::Provision,
            &elsewhere,
        );
        assert_eq!(conflict.outcome, ClerkEventOutcome::Conflict);

        let nobody = UserSnapshot::default();
        let rejected = plan_user(&clerk("user_c"), Some("unknown"), None, UnmappedPolicy::Reject, &nobody);
        assert_eq!(rejected.outcome, ClerkEventOutcome::Unchanged);
        let provisioned = plan_user(
            &clerk("user_c"),
            None,
            Some(&email("c@example.com")),
            UnmappedPolicy::Provision,
            &nobody,
        );
        assert_eq!(provisioned.steps, vec![Step::Provision(Some(email("c@example.com")))]);

        let by_email = UserSnapshot {
            by_email: Some(user(bob, "bob@example.com", None, false)),
            ..Default::default()
        };
        let link = plan_user(
            &clerk("user_d"),
            None,
            Some(&email("bob@example.com")),
            UnmappedPolicy::LinkByEmail,
            &by_email,
        );
        assert_eq!(link.steps, vec![Step::Link(bob)]);
        // Without a verified email, never by email.
        let unverified = plan_user(&clerk("user_d"), None, None, UnmappedPolicy::LinkByEmail, &by_email);
        assert_eq!(unverified.steps, vec![Step::Provision(None)]);
        // A user whose Clerk link was removed is not handed to another account.
        let once_linked = UserSnapshot {
            by_email_unlinked: true,
            ..by_email
        };
        let kept = plan_user(
            &clerk("user_d"),
            None,
            Some(&email("bob@example.com")),
            UnmappedPolicy::LinkByEmail,
            &once_linked,
        );
        assert_eq!(kept.steps, vec![Step::Provision(None)]);
        let unlinked = UserSnapshot {
            admin_unlinked: true,
            ..Default::default()
        };
        assert!(
            plan_user(&clerk("user_e"), None, None, UnmappedPolicy::Provision, &unlinked)
                .steps
                .is_empty()
        );
    }

    #[test]
    fn older_events_and_anything_after_a_deletion_are_stale() {
        assert!(!is_stale(Some(5), None));
        assert!(!is_stale(Some(5), Some(5)));
        assert!(!is_stale(Some(6), Some(5)));
        assert!(is_stale(Some(4), Some(5)));
        assert!(is_stale(Some(4), Some(DELETED_VERSION)));
        assert!(is_stale(None, Some(DELETED_VERSION)));
        assert!(!is_stale(Some(DELETED_VERSION), Some(DELETED_VERSION)));
        assert!(!is_stale(None, Some(5)));
    }
}
