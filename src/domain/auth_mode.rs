//! The auth mode: which token issuers are accepted. Stored in the settings
//! table so every replica sees the same switch; each replica keeps the value
//! in memory and refreshes it in the background (see [`AuthModes::refresh`]).

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
};

use chrono::{DateTime, Utc};

use super::{AuditOutcome, Caller, DomainError, Scope, audit};
use crate::storage::Storage;

const SETTING_KEY: &str = "auth_mode";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// Legacy JWTs and Clerk session tokens are both accepted.
    #[default]
    Dual,
    /// Only Clerk session tokens.
    ClerkOnly,
    /// Only legacy JWTs (rollback).
    LegacyOnly,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dual => "dual",
            Self::ClerkOnly => "clerk_only",
            Self::LegacyOnly => "legacy_only",
        }
    }

    pub fn accepts_legacy(self) -> bool {
        self != Self::ClerkOnly
    }

    pub fn accepts_clerk(self) -> bool {
        self != Self::LegacyOnly
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Dual => 0,
            Self::ClerkOnly => 1,
            Self::LegacyOnly => 2,
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::ClerkOnly,
            2 => Self::LegacyOnly,
            _ => Self::Dual,
        }
    }
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuthMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dual" => Ok(Self::Dual),
            "clerk_only" => Ok(Self::ClerkOnly),
            "legacy_only" => Ok(Self::LegacyOnly),
            other => Err(format!("unknown auth mode {other:?}")),
        }
    }
}

/// The stored mode with its provenance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthModeState {
    pub mode: AuthMode,
    /// `None` while the mode was never set (the default applies).
    pub updated_at: Option<DateTime<Utc>>,
    pub updated_by: String,
}

#[derive(Debug, Clone)]
pub struct AuthModes {
    storage: Arc<dyn Storage>,
    current: Arc<AtomicU8>,
}

impl AuthModes {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Self {
            storage,
            current: Arc::new(AtomicU8::new(AuthMode::default().to_u8())),
        }
    }

    /// The mode this replica enforces now, without touching the database.
    pub fn current(&self) -> AuthMode {
        AuthMode::from_u8(self.current.load(Ordering::Acquire))
    }

    /// Reads the stored mode and makes it the one this replica enforces.
    pub async fn refresh(&self) -> Result<AuthModeState, DomainError> {
        let state = self.load().await?;
        self.current.store(state.mode.to_u8(), Ordering::Release);
        Ok(state)
    }

    async fn load(&self) -> Result<AuthModeState, DomainError> {
        let Some(record) = self.storage.get_setting(SETTING_KEY).await? else {
            return Ok(AuthModeState {
                mode: AuthMode::default(),
                updated_at: None,
                updated_by: String::new(),
            });
        };
        let mode = record
            .value
            .parse::<AuthMode>()
            .map_err(|e| DomainError::Internal(format!("stored auth mode is invalid: {e}").into()))?;
        Ok(AuthModeState {
            mode,
            updated_at: Some(record.updated_at),
            updated_by: record.updated_by,
        })
    }

    pub async fn get(&self, caller: &Caller) -> Result<AuthModeState, DomainError> {
        caller.require_any(&Scope::ALL)?;
        self.refresh().await
    }

    /// Stores a new mode (audited in the same transaction) and applies it on
    /// this replica at once; returns the previous mode.
    pub async fn set(&self, caller: &Caller, mode: AuthMode) -> Result<AuthMode, DomainError> {
        caller.require(Scope::Admin)?;
        let action = "auth_mode.set";
        let event = audit::event(
            caller,
            action,
            None,
            AuditOutcome::Success,
            format!("mode set to {mode}"),
        );
        match self.storage.put_setting(SETTING_KEY, mode.as_str(), &event).await {
            Ok(prev) => {
                self.current.store(mode.to_u8(), Ordering::Release);
                // Never set before means the default was in force.
                let previous = prev.and_then(|p| p.value.parse::<AuthMode>().ok()).unwrap_or_default();
                tracing::info!(caller = %caller.name, %previous, %mode, "auth mode changed");
                Ok(previous)
            }
            Err(err) => {
                let err = DomainError::from(err);
                audit::record_failure(self.storage.as_ref(), caller, action, None, &err).await;
                Err(err)
            }
        }
    }
}
