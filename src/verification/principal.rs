//! From a verified token to one principal: the internal user, whichever
//! provider issued the token. Clerk users seen for the first time are
//! handled by the configured policy.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{
    clerk::Organization,
    reason::{RejectReason, Rejection},
};
use crate::{
    clerk::ClerkApi,
    config::UnmappedPolicy,
    domain::{AuditOutcome, Caller, ClerkUserId, DomainError, Email, MigrationState, UserCache, UserId, audit},
    storage::{Conflict, StorageError, UserKey, UserRecord},
};

/// How the token was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    LegacyJwt,
    Clerk,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LegacyJwt => "legacy_jwt",
            Self::Clerk => "clerk",
        }
    }
}

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: UserId,
    pub method: AuthMethod,
    pub clerk_user_id: Option<String>,
    pub session_id: Option<String>,
    pub email: Option<String>,
    pub migration_state: MigrationState,
    pub expires_at: DateTime<Utc>,
    pub organization: Option<Organization>,
    /// Provisioned by this service: the application has no row for the user.
    pub new_to_application: bool,
}

impl Principal {
    pub(crate) fn new(user: &UserRecord, method: AuthMethod, expires_at: i64) -> Self {
        Self {
            user_id: user.id,
            method,
            clerk_user_id: user.clerk_user_id.clone(),
            session_id: None,
            email: user.email.clone(),
            migration_state: user.migration_state(),
            expires_at: DateTime::from_timestamp(expires_at, 0).unwrap_or(DateTime::<Utc>::MAX_UTC),
            organization: None,
            new_to_application: user.clerk_native,
        }
    }
}

/// The answer for a Clerk user an admin unlinked.
fn unlinked() -> Rejection {
    Rejection::new(
        RejectReason::UnmappedUser,
        "Clerk user was unlinked by an admin; it is refused until linked again",
    )
}

pub(crate) struct PrincipalResolver {
    pub users: UserCache,
    policy: UnmappedPolicy,
    clerk_api: Option<ClerkApi>,
}

impl PrincipalResolver {
    pub fn new(users: UserCache, policy: UnmappedPolicy, clerk_api: Option<ClerkApi>) -> Self {
        Self {
            users,
            policy,
            clerk_api,
        }
    }

    pub async fn legacy(&self, user_id: UserId) -> Result<Result<Arc<UserRecord>, Rejection>, DomainError> {
        Ok(self
            .users
            .by_id(user_id)
            .await?
            .ok_or_else(|| Rejection::new(RejectReason::UserNotFound, "user not found")))
    }

    pub async fn clerk(
        &self,
        caller: &Caller,
        clerk_user_id: &ClerkUserId,
    ) -> Result<Result<Arc<UserRecord>, Rejection>, DomainError> {
        if let Some(user) = self.users.by_clerk(clerk_user_id).await? {
            return Ok(Ok(user));
        }
        // UnlinkUser is a rollback: the Clerk user stays unmapped until an
        // admin links it again, whatever the policy would do.
        if self.policy != UnmappedPolicy::Reject && self.users.storage().clerk_user_unlinked(clerk_user_id).await? {
            return Ok(Err(unlinked()));
        }
        match self.policy {
            UnmappedPolicy::Reject => Ok(Err(Rejection::new(
                RejectReason::UnmappedUser,
                "Clerk user is not mapped",
            ))),
            UnmappedPolicy::Provision => self.provision(caller, clerk_user_id, None).await,
            UnmappedPolicy::LinkByEmail => self.link_by_email(caller, clerk_user_id).await,
        }
    }

    /// Creates the user; when a concurrent first sighting won, returns its user.
    async fn provision(
        &self,
        caller: &Caller,
        clerk_user_id: &ClerkUserId,
        email: Option<&Email>,
    ) -> Result<Result<Arc<UserRecord>, Rejection>, DomainError> {
        let event = audit::event(
            caller,
            "user.provision",
            None,
            AuditOutcome::Success,
            format!("new user for {clerk_user_id}"),
        );
        match self
            .users
            .storage()
            .provision_clerk_user(clerk_user_id, email, &event)
            .await
        {
            Ok(user) => {
                tracing::info!(user_id = %user.id, clerk_user_id = %clerk_user_id, "provisioned a user for a new Clerk user");
                Ok(Ok(self.users.put(user).await))
            }
            Err(StorageError::Conflict(Conflict::ClerkUserTaken)) => self.reread(clerk_user_id).await,
            Err(StorageError::Conflict(Conflict::ClerkUserUnlinked)) => Ok(Err(unlinked())),
            Err(err) => Err(err.into()),
        }
    }

    /// The user a concurrent writer mapped; a mapping whose user is gone
    /// (soft-deleted in the application) is a user that is not found.
    async fn reread(&self, clerk_user_id: &ClerkUserId) -> Result<Result<Arc<UserRecord>, Rejection>, DomainError> {
        match self
            .users
            .storage()
            .find_user(&UserKey::ClerkUserId(clerk_user_id.clone()))
            .await?
        {
            Some(user) => Ok(Ok(self.users.put(user).await)),
            None => Ok(Err(Rejection::new(RejectReason::UserNotFound, "user not found"))),
        }
    }

    async fn link_by_email(
        &self,
        caller: &Caller,
        clerk_user_id: &ClerkUserId,
    ) -> Result<Result<Arc<UserRecord>, Rejection>, DomainError> {
        let api = self
            .clerk_api
            .as_ref()
            .ok_or_else(|| DomainError::Internal("link_by_email without a Clerk secret key".into()))?;
        let clerk_user = api
            .get_user(clerk_user_id)
            .await
            .map_err(|e| DomainError::Unavailable {
                message: "Clerk's Backend API is unavailable".into(),
                source: Some(Box::new(e)),
            })?;
        let email = clerk_user
            .as_ref()
            .and_then(|u| u.verified_primary_email())
            .and_then(|e| Email::parse("email", e).ok());
        let Some(email) = email else {
            return self.provision(caller, clerk_user_id, None).await;
        };
        let storage = self.users.storage();
        let mut candidate = storage.find_user(&UserKey::Email(email.clone())).await?;
        // A user whose Clerk link was removed (an admin's unlink, its Clerk
        // account deleted) is not handed to another Clerk account by email.
        if let Some(user) = &candidate
            && user.clerk_user_id.is_none()
            && storage.user_was_unlinked(user.id).await?
        {
            tracing::info!(user_id = %user.id, clerk_user_id = %clerk_user_id,
                "not linking by email: the user lost a Clerk link before; provisioning instead");
            return self.provision(caller, clerk_user_id, None).await;
        }
        match candidate.take() {
            Some(user) if user.clerk_user_id.is_none() && !user.clerk_native => {
                let event = audit::event(
                    caller,
                    "user.link",
                    Some(user.id),
                    AuditOutcome::Success,
                    format!("linked to {clerk_user_id} by verified email"),
                );
                match storage.link_user(user.id, clerk_user_id, &event).await {
                    Ok(linked) => {
                        tracing::info!(user_id = %user.id, clerk_user_id = %clerk_user_id, "linked a legacy user by verified email");
                        self.users.forget_link(&linked).await;
                        self.reread(clerk_user_id).await
                    }
                    Err(StorageError::Conflict(Conflict::ClerkUserTaken)) => self.reread(clerk_user_id).await,
                    // Linked elsewhere meanwhile: this Clerk user gets a user of its own.
                    Err(StorageError::Conflict(Conflict::UserAlreadyLinked)) => {
                        self.provision(caller, clerk_user_id, None).await
                    }
                    Err(err) => Err(err.into()),
                }
            }
            // The email belongs to a user who is linked already: do not take it over.
            Some(_) => self.provision(caller, clerk_user_id, None).await,
            None => self.provision(caller, clerk_user_id, Some(&email)).await,
        }
    }
}
