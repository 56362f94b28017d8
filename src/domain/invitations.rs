//! The invitation strategy: a legacy user (proved by its legacy token, or
//! named by an admin) gets a single-use, expiring migration token by email;
//! redeeming it with a Clerk session token links the two accounts.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use base64::Engine;
use chrono::{DateTime, Utc};
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{AuditOutcome, Caller, DomainError, Email, Scope, UserCache, UserId, audit};
use crate::{
    config::{InvitationConfig, LinkStyle},
    mail::{Invitation, render_invitation},
    storage::{Conflict, MappingRecord, NewInvitation, NewOutboxMessage, StorageError, UserKey},
    verification::{RejectReason, Verifier},
};

/// Longest migration token accepted from a client (ours are 43 characters).
const MAX_TOKEN_LEN: usize = 128;

/// One answer for unknown, expired, used and superseded tokens, so a guesser learns nothing.
pub const INVALID_TOKEN: &str = "migration token is invalid, expired or already used";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvitationSent {
    pub user_id: UserId,
    pub expires_at: DateTime<Utc>,
}

#[derive(Clone)]
pub struct Invitations {
    users: UserCache,
    verifier: Verifier,
    config: InvitationConfig,
    per_user: Arc<DefaultKeyedRateLimiter<UserId>>,
    per_caller: Arc<DefaultKeyedRateLimiter<String>>,
}

impl std::fmt::Debug for Invitations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invitations").field("config", &self.config).finish()
    }
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// "24 hours", "90 minutes", "2 days".
fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    if secs.is_multiple_of(86_400) && secs >= 2 * 86_400 {
        plural(secs / 86_400, "day")
    } else if secs.is_multiple_of(3600) {
        plural(secs / 3600, "hour")
    } else {
        plural(secs.div_ceil(60), "minute")
    }
}

impl Invitations {
    pub fn new(users: UserCache, verifier: Verifier, config: InvitationConfig) -> Self {
        let per_user = Quota::per_hour(NonZeroU32::new(config.per_user_per_hour).unwrap_or(NonZeroU32::MIN));
        let per_caller = Quota::per_minute(NonZeroU32::new(config.per_caller_per_minute).unwrap_or(NonZeroU32::MIN));
        Self {
            users,
            verifier,
            config,
            per_user: Arc::new(RateLimiter::keyed(per_user)),
            per_caller: Arc::new(RateLimiter::keyed(per_caller)),
        }
    }

    /// The user asks for an invitation, proving who it is with its legacy token.
    pub async fn initiate_with_legacy_token(
        &self,
        caller: &Caller,
        legacy_token: &str,
        email: Option<Email>,
    ) -> Result<InvitationSent, DomainError> {
        caller.require_any(&[Scope::Migrate, Scope::Admin])?;
        let user_id = match self.verifier.legacy_subject("legacy_token", legacy_token).await? {
            Ok(user_id) => user_id,
            Err(rejection) if rejection.reason == RejectReason::MethodDisabled => {
                return Err(DomainError::FailedPrecondition(
                    "legacy tokens are not accepted in the current auth mode".into(),
                ));
            }
            Err(rejection) => {
                return Err(DomainError::invalid(
                    "legacy_token",
                    format!("is not a valid legacy token ({})", rejection.reason),
                ));
            }
        };
        self.initiate(caller, user_id, email).await
    }

    /// An admin invites a user by id.
    pub async fn initiate_for_user(
        &self,
        caller: &Caller,
        user_id: UserId,
        email: Option<Email>,
    ) -> Result<InvitationSent, DomainError> {
        caller.require(Scope::Admin)?;
        self.initiate(caller, user_id, email).await
    }

    fn limit(&self, caller: &Caller, user_id: UserId) -> Result<(), DomainError> {
        let clock = DefaultClock::default();
        if let Err(not_until) = self.per_caller.check_key(&caller.name) {
            return Err(DomainError::ResourceExhausted {
                message: "too many invitations from this caller; retry later".into(),
                retry_after: not_until.wait_time_from(clock.now()),
            });
        }
        if let Err(not_until) = self.per_user.check_key(&user_id) {
            return Err(DomainError::ResourceExhausted {
                message: "too many invitations for this user; retry later".into(),
                retry_after: not_until.wait_time_from(clock.now()),
            });
        }
        Ok(())
    }

    async fn initiate(
        &self,
        caller: &Caller,
        user_id: UserId,
        email: Option<Email>,
    ) -> Result<InvitationSent, DomainError> {
        let action = "migration.initiate";
        let result = self.try_initiate(caller, user_id, email).await;
        if let Err(err) = &result {
            audit::record_failure(self.users.storage().as_ref(), caller, action, Some(user_id), err).await;
        }
        result
    }

    async fn try_initiate(
        &self,
        caller: &Caller,
        user_id: UserId,
        supplied: Option<Email>,
    ) -> Result<InvitationSent, DomainError> {
        if !self.config.deliverable {
            return Err(DomainError::FailedPrecondition(
                "no mail transport is configured (IDENTITY_SMTP_URL): the invitation would be lost".into(),
            ));
        }
        self.limit(caller, user_id)?;
        let storage = self.users.storage();
        let user = storage
            .find_user(&UserKey::Id(user_id))
            .await?
            .ok_or_else(|| DomainError::NotFound("user not found".into()))?;
        if user.clerk_user_id.is_some() {
            return Err(DomainError::FailedPrecondition("user already migrated to Clerk".into()));
        }
        // The address on record wins; a caller supplies one only where the
        // application's table keeps none readable (LeafLock encrypts it).
        let (email, supplied_by) = match (user.email.clone(), supplied) {
            (Some(on_record), Some(supplied)) if supplied.normalized() != Email::key_of(&on_record) => {
                return Err(DomainError::invalid(
                    "email",
                    "differs from the user's address on record; leave it empty",
                ));
            }
            (Some(on_record), _) => (on_record, None),
            (None, Some(supplied)) => (supplied.as_str().to_owned(), Some(caller.name.clone())),
            (None, None) => {
                return Err(DomainError::FailedPrecondition(
                    "user has no email address on record; the caller must supply `email`".into(),
                ));
            }
        };

        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let ttl = chrono::Duration::from_std(self.config.ttl).unwrap_or_else(|_| chrono::Duration::hours(24));
        let expires_at = Utc::now() + ttl;

        let mut link = self.config.frontend_url.clone();
        link.set_path(&format!("{}/migrate", link.path().trim_end_matches('/')));
        match self.config.link {
            LinkStyle::Fragment => link.set_fragment(Some(&format!("token={token}"))),
            LinkStyle::Query => {
                link.query_pairs_mut().clear().append_pair("token", &token);
            }
        }
        let user_name = email.split('@').next().unwrap_or(&email);
        let rendered = render_invitation(&Invitation {
            product_name: &self.config.product_name,
            user_name,
            migration_url: link.as_str(),
            expires_in: &human(self.config.ttl),
        })
        .map_err(|e| DomainError::Internal(Box::new(e)))?;

        let invitation = NewInvitation {
            user_id,
            token_hash: hash(&token),
            expires_at,
            email: NewOutboxMessage {
                kind: "migration_invite".into(),
                user_id: Some(user_id),
                recipient: email,
                subject: rendered.subject,
                body_text: rendered.text,
                body_html: rendered.html,
            },
            email_supplied_by: supplied_by.clone(),
        };
        let detail = match &supplied_by {
            Some(by) => format!(
                "invitation queued, expires {}; address supplied by caller {by}",
                expires_at.to_rfc3339()
            ),
            None => format!("invitation queued, expires {}", expires_at.to_rfc3339()),
        };
        let event = audit::event(
            caller,
            "migration.initiate",
            Some(user_id),
            AuditOutcome::Success,
            detail,
        );
        storage.create_invitation(&invitation, &event).await?;
        tracing::info!(caller = %caller.name, %user_id, "migration invitation queued");
        Ok(InvitationSent { user_id, expires_at })
    }

    /// Redeems a migration token with the user's Clerk session token.
    pub async fn complete(
        &self,
        caller: &Caller,
        migration_token: &str,
        clerk_session_token: &str,
    ) -> Result<MappingRecord, DomainError> {
        caller.require_any(&[Scope::Migrate, Scope::Admin])?;
        let migration_token = migration_token.trim();
        if migration_token.is_empty() {
            return Err(DomainError::invalid("migration_token", "must not be empty"));
        }
        if migration_token.len() > MAX_TOKEN_LEN
            || !migration_token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(DomainError::invalid("migration_token", "is not a migration token"));
        }
        let clerk_user_id = match self
            .verifier
            .clerk_subject("clerk_session_token", clerk_session_token)
            .await?
        {
            Ok(id) => id,
            Err(rejection) => {
                return Err(DomainError::invalid(
                    "clerk_session_token",
                    format!("is not a valid Clerk session token ({})", rejection.reason),
                ));
            }
        };
        let action = "migration.complete";
        let event = audit::event(
            caller,
            action,
            None,
            AuditOutcome::Success,
            format!("linked to {clerk_user_id} by invitation"),
        );
        let storage = self.users.storage();
        match storage
            .redeem_invitation(&hash(migration_token), &clerk_user_id, Utc::now(), &event)
            .await
        {
            Ok(linked) => {
                self.users.forget_link(&linked).await;
                let mapping = linked.mapping;
                tracing::info!(caller = %caller.name, user_id = %mapping.user_id, %clerk_user_id, merged_from = ?linked.merged_from, "migration completed");
                Ok(mapping)
            }
            Err(err) => {
                let err = match err {
                    StorageError::NotFound(_) => DomainError::FailedPrecondition(INVALID_TOKEN.into()),
                    StorageError::Conflict(Conflict::ClerkUserTaken) => {
                        DomainError::AlreadyExists("Clerk user is already linked to another user".into())
                    }
                    StorageError::Conflict(Conflict::UserAlreadyLinked) => {
                        DomainError::FailedPrecondition("user already migrated to Clerk".into())
                    }
                    other => other.into(),
                };
                audit::record_failure(storage.as_ref(), caller, action, None, &err).await;
                Err(err)
            }
        }
    }

    /// Forgets rate-limit state of keys that have recovered (bounded memory).
    pub fn shrink(&self) {
        self.per_user.retain_recent();
        self.per_caller.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_reads_naturally() {
        assert_eq!(human(Duration::from_secs(86_400)), "24 hours");
        assert_eq!(human(Duration::from_secs(3600)), "1 hour");
        assert_eq!(human(Duration::from_secs(172_800)), "2 days");
        assert_eq!(human(Duration::from_secs(90 * 60)), "90 minutes");
    }
}
