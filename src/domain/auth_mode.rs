//! The auth mode: which token issuers are accepted. Stored in the settings
//! table so every replica sees the same switch; each replica keeps the value
//! in memory and refreshes it in the background (see [`AuthModes::refresh`]).

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
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

/// The mode byte of a replica that has not read the mode yet.
const UNKNOWN: u64 = 0xff;

/// A mode and the generation of the write that set it, in one word, so a
/// refresh that read the database before a `set` on this replica cannot
/// overwrite the newer mode: it only lands if nothing changed meanwhile.
fn pack(generation: u64, mode: AuthMode) -> u64 {
    (generation << 8) | u64::from(mode.to_u8())
}

fn generation(state: u64) -> u64 {
    state >> 8
}

#[derive(Debug, Clone)]
pub struct AuthModes {
    storage: Arc<dyn Storage>,
    state: Arc<AtomicU64>,
}

impl AuthModes {
    /// Until the first read of the stored mode succeeds the mode is
    /// unknown: verification answers UNAVAILABLE and health NOT_SERVING,
    /// rather than enforce a default that could reopen legacy tokens after
    /// a `clerk_only` cutover.
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Self {
            storage,
            state: Arc::new(AtomicU64::new(UNKNOWN)),
        }
    }

    /// Modes that start as `mode`, as if it had been read (benchmarks and
    /// embedders that drive the verifier without a server).
    pub fn starting_with(storage: Arc<dyn Storage>, mode: AuthMode) -> Self {
        Self {
            storage,
            state: Arc::new(AtomicU64::new(pack(0, mode))),
        }
    }

    /// Whether this replica has read the mode at least once.
    pub fn known(&self) -> bool {
        self.state.load(Ordering::Acquire) & 0xff != UNKNOWN
    }

    /// The mode this replica enforces now, without touching the database
    /// (the default while [`Self::known`] is false; callers check it first).
    pub fn current(&self) -> AuthMode {
        AuthMode::from_u8((self.state.load(Ordering::Acquire) & 0xff) as u8)
    }

    /// Reads the stored mode and makes it the one this replica enforces,
    /// unless a `set` on this replica landed while the read was under way.
    pub async fn refresh(&self) -> Result<AuthModeState, DomainError> {
        let seen = self.state.load(Ordering::Acquire);
        let state = self.load().await?;
        let next = pack(generation(seen).wrapping_add(1), state.mode);
        if self
            .state
            .compare_exchange(seen, next, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            tracing::debug!("a newer auth mode was set while refreshing; keeping it");
        }
        Ok(state)
    }

    fn apply(&self, mode: AuthMode) {
        let _ = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            Some(pack(generation(s).wrapping_add(1), mode))
        });
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

    /// The stored mode with who set it and when, read without changing what
    /// this replica enforces (the dashboard).
    pub async fn stored(&self) -> Result<AuthModeState, DomainError> {
        self.load().await
    }

    pub async fn get(&self, caller: &Caller) -> Result<AuthModeState, DomainError> {
        caller.require_any(&Scope::SERVICE)?;
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
                self.apply(mode);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_refresh_does_not_overwrite_a_newer_set() {
        let state = AtomicU64::new(UNKNOWN);
        let seen = state.load(Ordering::Acquire);
        // A set lands while a refresh is reading the database...
        state.store(pack(generation(seen) + 1, AuthMode::ClerkOnly), Ordering::Release);
        // ...so the refresh's compare-and-swap fails and the set stands.
        let stale = pack(generation(seen) + 1, AuthMode::Dual);
        assert!(
            state
                .compare_exchange(seen, stale, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        );
        assert_eq!(
            AuthMode::from_u8((state.load(Ordering::Acquire) & 0xff) as u8),
            AuthMode::ClerkOnly
        );
        assert_eq!(UNKNOWN & 0xff, 0xff);
    }
}
