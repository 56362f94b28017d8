//! The verified caller, as the service describes it.

use std::time::{Duration, SystemTime};

use crate::pb;

/// Who a verified token belongs to.
///
/// Put into the request extensions by [`AuthLayer`](crate::AuthLayer); with
/// the `axum` feature it is also an extractor (`Principal` for protected
/// routes, `Option<Principal>` for public ones).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Principal {
    /// The stable user id (a UUID), whichever provider issued the token.
    pub user_id: String,
    /// Which kind of token was presented.
    pub auth_method: pb::AuthMethod,
    /// The Clerk user, when the user is linked to one.
    pub clerk_user_id: Option<String>,
    /// The Clerk session id, for Clerk tokens.
    pub session_id: Option<String>,
    /// The user's email, when known.
    pub email: Option<String>,
    /// Where the user stands in the migration to Clerk.
    pub migration_state: pb::MigrationState,
    /// When the token expires (its `exp`); nothing is served from a cache past it.
    pub expires_at: Option<SystemTime>,
    /// The active organization of a Clerk session.
    pub organization: Option<Organization>,
    /// Whether this verification created the user (first sign-in).
    pub new_to_application: bool,
}

/// A Clerk organization the session is acting in.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Organization {
    /// The organization id (`org_...`).
    pub id: String,
    /// The user's role in it.
    pub role: String,
    /// The organization's slug.
    pub slug: String,
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub(crate) fn system_time(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

impl From<pb::Principal> for Principal {
    fn from(p: pb::Principal) -> Self {
        Self {
            auth_method: p.auth_method(),
            migration_state: p.migration_state(),
            expires_at: p.expires_at.as_ref().and_then(system_time),
            user_id: p.user_id,
            clerk_user_id: non_empty(p.clerk_user_id),
            session_id: non_empty(p.session_id),
            email: non_empty(p.email),
            organization: p.organization.map(|o| Organization {
                id: o.id,
                role: o.role,
                slug: o.slug,
            }),
            new_to_application: p.new_to_application,
        }
    }
}
