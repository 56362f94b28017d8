//! The audit log: every migration and admin action, who did it, to which
//! user, and how it ended. Writers append in the same transaction as the
//! change; this module reads it back in pages.

use std::sync::Arc;

use base64::Engine;
use chrono::{DateTime, Utc};

use super::{Caller, DomainError, UserId};
use crate::storage::{AuditQuery, AuditRecord, NewAuditEvent, Storage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    Success,
    Failure,
}

impl AuditOutcome {
    pub fn as_db(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }

    pub fn from_db(value: &str) -> Option<Self> {
        match value {
            "success" => Some(Self::Success),
            "failure" => Some(Self::Failure),
            _ => None,
        }
    }
}

/// Builds the audit event for an action by `caller`.
pub(crate) fn event(
    caller: &Caller,
    action: &str,
    user_id: Option<UserId>,
    outcome: AuditOutcome,
    detail: impl Into<String>,
) -> NewAuditEvent {
    NewAuditEvent {
        caller: caller.name.clone(),
        action: action.to_owned(),
        user_id,
        outcome,
        detail: detail.into(),
    }
}

/// Records a failed action on its own (the change itself rolled back). A
/// failure to write it is logged, not returned: the caller's error matters more.
pub(crate) async fn record_failure(
    storage: &dyn Storage,
    caller: &Caller,
    action: &str,
    user_id: Option<UserId>,
    error: &DomainError,
) {
    let detail = match error {
        // Safe, short messages only; internal causes stay in the log.
        DomainError::Internal(_) | DomainError::Unavailable { .. } => error.kind().to_owned(),
        other => format!("{}: {other}", other.kind()),
    };
    let event = event(caller, action, user_id, AuditOutcome::Failure, detail);
    if let Err(err) = storage.append_audit(&event).await {
        tracing::warn!(action, error = %err, "could not write the audit event for a failed action");
    }
}

/// What the caller asks for.
#[derive(Debug, Clone, Default)]
pub struct AuditPageRequest {
    pub user_id: Option<UserId>,
    pub action: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// 0 means the default.
    pub page_size: u32,
    pub page_token: String,
}

#[derive(Debug, Clone)]
pub struct AuditPage {
    pub events: Vec<AuditRecord>,
    pub next_page_token: String,
}

#[derive(Debug, Clone)]
pub struct AuditLog {
    storage: Arc<dyn Storage>,
}

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
const MAX_ACTION_LEN: usize = 100;

impl AuditLog {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Self { storage }
    }

    pub async fn list(&self, caller: &Caller, request: AuditPageRequest) -> Result<AuditPage, DomainError> {
        caller.require(super::Scope::Admin)?;
        let limit = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            _ => {
                return Err(DomainError::invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE_SIZE}"),
                ));
            }
        };
        if let (Some(since), Some(until)) = (request.since, request.until)
            && since > until
        {
            return Err(DomainError::invalid("since", "must not be after until"));
        }
        if request.action.as_ref().is_some_and(|a| a.len() > MAX_ACTION_LEN) {
            return Err(DomainError::invalid("action", "is too long"));
        }
        let before_id = decode_page_token(&request.page_token)?;
        // One extra row tells whether another page follows.
        let mut events = self
            .storage
            .list_audit(&AuditQuery {
                user_id: request.user_id,
                action: request.action,
                since: request.since,
                until: request.until,
                before_id,
                limit: limit + 1,
            })
            .await?;
        let next_page_token = if events.len() > limit as usize {
            events.truncate(limit as usize);
            events.last().map(|e| encode_page_token(e.id)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(AuditPage {
            events,
            next_page_token,
        })
    }
}

const TOKEN_PREFIX: &str = "audit:v1:";

fn encode_page_token(id: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{TOKEN_PREFIX}{id}"))
}

fn decode_page_token(token: &str) -> Result<Option<i64>, DomainError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || DomainError::invalid("page_token", "is not a token this service issued");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let id = text
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(bad)?;
    Ok(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_forgeries() {
        assert_eq!(decode_page_token(&encode_page_token(42)).unwrap(), Some(42));
        assert_eq!(decode_page_token("").unwrap(), None);
        for bad in [
            "!!",
            "YWJj",
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("audit:v1:-5"),
        ] {
            assert!(decode_page_token(bad).is_err(), "{bad} accepted");
        }
    }
}
