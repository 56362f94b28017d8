//! Why a token was rejected: a normal answer, not an error.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not a JWT, oversized, undecodable, or missing a required claim.
    Malformed,
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    IssuedInFuture,
    BadSignature,
    /// No key with the token's `kid` (after a refetch, or within the refetch cooldown).
    UnknownKey,
    /// `iss` is not the configured issuer.
    Issuer,
    /// `aud` (legacy) or `azp` (Clerk) is not allowed or not the expected one.
    Audience,
    /// `alg: none`, an HS token for the RSA issuer, an RS token for the HMAC issuer, or any other algorithm.
    AlgorithmNotAllowed,
    Revoked,
    /// The auth mode does not accept this kind of token (or it is not configured).
    MethodDisabled,
    /// A legacy token's user does not exist.
    UserNotFound,
    /// A Clerk user with no mapping, under the `reject` policy.
    UnmappedUser,
    /// A Clerk session still pending (`sts: pending`).
    SessionPending,
    /// A Clerk JWT that is not a session token (JWT template, M2M, OAuth access token).
    NotSessionToken,
    /// A legacy token of a user who has moved to Clerk (when that rule is on).
    LegacyAfterMigration,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IssuedInFuture => "issued_in_future",
            Self::BadSignature => "bad_signature",
            Self::UnknownKey => "unknown_key",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::AlgorithmNotAllowed => "algorithm_not_allowed",
            Self::Revoked => "revoked",
            Self::MethodDisabled => "method_disabled",
            Self::UserNotFound => "user_not_found",
            Self::UnmappedUser => "unmapped_user",
            Self::SessionPending => "session_pending",
            Self::NotSessionToken => "not_session_token",
            Self::LegacyAfterMigration => "legacy_after_migration",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejection with a short, token-free message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// `exp` and `nbf` against `now` (Unix seconds) with the given leeway
/// (jsonwebtoken's rule): why a token is outside its validity window, if it is.
pub(crate) fn outside_validity(expires_at: i64, not_before: Option<i64>, leeway: i64, now: i64) -> Option<Rejection> {
    if expires_at.saturating_add(leeway) < now {
        return Some(Rejection::new(RejectReason::Expired, "token has expired"));
    }
    if not_before.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
        return Some(Rejection::new(
            RejectReason::NotYetValid,
            "token is not valid yet (nbf)",
        ));
    }
    None
}
