//! The domain's error type. Expected errors (the caller's mistakes, missing
//! or conflicting records) carry a short message that is safe to show;
//! unexpected ones keep their cause for the log and show the client nothing.

use std::time::Duration;

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// A request field is missing or malformed.
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller's key lacks the scope the call needs.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{message}")]
    ResourceExhausted { message: String, retry_after: Duration },
    /// A dependency (the database, Clerk) cannot be reached right now.
    #[error("{message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A bug or an unexpected failure; the client only learns that it happened.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl DomainError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    /// A short label for logs and audit entries; never contains input values.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::NotFound(_) => "not_found",
            Self::AlreadyExists(_) => "already_exists",
            Self::FailedPrecondition(_) => "failed_precondition",
            Self::PermissionDenied(_) => "permission_denied",
            Self::ResourceExhausted { .. } => "resource_exhausted",
            Self::Unavailable { .. } => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<StorageError> for DomainError {
    fn from(err: StorageError) -> Self {
        match err {
            StorageError::NotFound(what) => Self::NotFound(format!("{what} not found")),
            StorageError::Conflict(conflict) => Self::AlreadyExists(conflict.to_string()),
            StorageError::Unavailable(source) => Self::Unavailable {
                message: "database unavailable".into(),
                source: Some(source),
            },
            StorageError::Precondition(message) => Self::FailedPrecondition(message),
            StorageError::SchemaChanged(message) => Self::FailedPrecondition(format!(
                "the application's users table no longer matches the service's configuration ({message}); \
                 check the IDENTITY_USERS_* settings"
            )),
            StorageError::Other(source) => Self::Internal(source),
        }
    }
}

/// "outer: inner: innermost", for the log.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
