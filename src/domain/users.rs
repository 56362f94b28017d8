//! Users and their link to Clerk: look-ups, link (the seed's
//! `migrateUserToClerk`) and unlink (per-user rollback).

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{AuditOutcome, Caller, ClerkUserId, DomainError, Scope, UserCache, UserId, audit};
use crate::storage::{MappingKey, MappingRecord, Storage, UserKey, UserRecord};

/// Where a user stands in the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    LegacyOnly,
    Migrated,
    ClerkNative,
}

/// A user as the service presents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub email: Option<String>,
    pub clerk_user_id: Option<String>,
    pub migration_state: MigrationState,
    pub has_legacy_password: bool,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl UserRecord {
    /// Where the user stands in the move to Clerk.
    pub fn migration_state(&self) -> MigrationState {
        if self.clerk_native {
            MigrationState::ClerkNative
        } else if self.clerk_user_id.is_some() {
            MigrationState::Migrated
        } else {
            MigrationState::LegacyOnly
        }
    }
}

impl From<UserRecord> for User {
    fn from(record: UserRecord) -> Self {
        let migration_state = record.migration_state();
        Self {
            id: record.id,
            email: record.email,
            clerk_user_id: record.clerk_user_id,
            migration_state,
            has_legacy_password: record.has_password,
            created_at: record.created_at,
            updated_at: record.updated_at,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UserDirectory {
    storage: Arc<dyn Storage>,
    cache: UserCache,
}

impl UserDirectory {
    /// `cache` is the verification path's user cache; links and unlinks
    /// here invalidate it at once.
    pub fn new(cache: UserCache) -> Self {
        Self {
            storage: cache.storage().clone(),
            cache,
        }
    }

    pub async fn get_user(&self, caller: &Caller, key: &UserKey) -> Result<User, DomainError> {
        caller.require_any(&[Scope::Verify, Scope::Admin])?;
        self.storage
            .find_user(key)
            .await?
            .map(User::from)
            .ok_or_else(|| DomainError::NotFound("user not found".into()))
    }

    pub async fn get_mapping(&self, caller: &Caller, key: &MappingKey) -> Result<MappingRecord, DomainError> {
        caller.require_any(&Scope::SERVICE)?;
        self.storage
            .find_mapping(key)
            .await?
            .ok_or_else(|| DomainError::NotFound("mapping not found".into()))
    }

    /// Links a user to a Clerk user; the mapping, the mirror column and the
    /// audit event are written in one transaction. A provisional user that
    /// already holds this Clerk user is merged into this one.
    pub async fn link(
        &self,
        caller: &Caller,
        user_id: UserId,
        clerk_user_id: &ClerkUserId,
    ) -> Result<MappingRecord, DomainError> {
        caller.require(Scope::Admin)?;
        let action = "user.link";
        let event = audit::event(
            caller,
            action,
            Some(user_id),
            AuditOutcome::Success,
            format!("linked to {clerk_user_id}"),
        );
        match self.storage.link_user(user_id, clerk_user_id, &event).await {
            Ok(linked) => {
                self.cache.forget_link(&linked).await;
                tracing::info!(caller = %caller.name, %user_id, clerk_user_id = %clerk_user_id, merged_from = ?linked.merged_from, "user linked to Clerk");
                Ok(linked.mapping)
            }
            Err(err) => {
                let err = DomainError::from(err);
                audit::record_failure(self.storage.as_ref(), caller, action, Some(user_id), &err).await;
                Err(err)
            }
        }
    }

    /// Removes a user's link (per-user rollback), audited.
    pub async fn unlink(&self, caller: &Caller, user_id: UserId) -> Result<MappingRecord, DomainError> {
        caller.require(Scope::Admin)?;
        let action = "user.unlink";
        let event = audit::event(caller, action, Some(user_id), AuditOutcome::Success, "link removed");
        match self.storage.unlink_user(user_id, &event).await {
            Ok(removed) => {
                self.cache
                    .invalidate(user_id, Some(removed.clerk_user_id.as_str()))
                    .await;
                tracing::info!(caller = %caller.name, %user_id, "user unlinked from Clerk");
                Ok(removed)
            }
            Err(err) => {
                let err = DomainError::from(err);
                audit::record_failure(self.storage.as_ref(), caller, action, Some(user_id), &err).await;
                Err(err)
            }
        }
    }
}
