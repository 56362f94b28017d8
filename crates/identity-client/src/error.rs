//! What can go wrong when calling the service, sorted by who must act.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::pb::RejectionReason;

/// An error from the identity service or the way to it.
///
/// The variants separate who has to act: the token's holder
/// ([`Error::Rejected`]), the operator of the service ([`Error::Unavailable`]),
/// the caller's own configuration ([`Error::BadApiKey`],
/// [`Error::MissingScope`], [`Error::Config`]) or the caller's code
/// ([`Error::InvalidArgument`] and the other request errors).
///
/// Messages never contain the token or the API key.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service looked at the token and rejected it.
    #[error("token rejected ({reason:?}): {message}")]
    Rejected {
        /// Why the token was rejected.
        reason: RejectionReason,
        /// The service's explanation, safe to show to the token's holder.
        message: String,
    },
    /// The service could not be reached or could not answer in time
    /// (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, a
    /// transport error): an outage, never a reason to let a request through.
    #[error("identity service unavailable ({code:?}): {message}")]
    Unavailable {
        /// The gRPC code (UNAVAILABLE for transport errors).
        code: Code,
        /// What went wrong.
        message: String,
        /// The retry delay the service asked for (google.rpc.RetryInfo), if any.
        retry_after: Option<Duration>,
    },
    /// The service did not accept this client's API key (UNAUTHENTICATED).
    #[error("the identity service rejected this client's API key: {message}")]
    BadApiKey {
        /// The service's message.
        message: String,
    },
    /// The API key lacks the scope this call needs (PERMISSION_DENIED).
    #[error("this client's API key lacks a scope for the call: {message}")]
    MissingScope {
        /// The service's message, naming the scope.
        message: String,
    },
    /// The request was invalid (INVALID_ARGUMENT), with the fields at fault.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// The service's message.
        message: String,
        /// The fields named by google.rpc.BadRequest.
        fields: Vec<FieldViolation>,
    },
    /// What the request names does not exist (NOT_FOUND).
    #[error("not found: {message}")]
    NotFound {
        /// The service's message.
        message: String,
    },
    /// The request conflicts with the current state (ALREADY_EXISTS,
    /// FAILED_PRECONDITION, ABORTED).
    #[error("conflict ({code:?}): {message}")]
    Conflict {
        /// The gRPC code.
        code: Code,
        /// The service's message.
        message: String,
    },
    /// Any other status the service returned.
    #[error("identity service returned {code:?}: {message}")]
    Other {
        /// The gRPC code.
        code: Code,
        /// The service's message.
        message: String,
    },
    /// The client was configured wrongly (an endpoint URL, an API key that is
    /// not valid header text).
    #[error("invalid client configuration: {0}")]
    Config(String),
}

/// One field named in a google.rpc.BadRequest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The request field, e.g. `user_id`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl Error {
    /// Whether this is an outage (retrying later may help; never allow a request on it).
    pub fn is_outage(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// Whether the caller's own configuration is at fault (bad key, missing scope, bad URL).
    pub fn is_misconfiguration(&self) -> bool {
        matches!(
            self,
            Self::BadApiKey { .. } | Self::MissingScope { .. } | Self::Config(_)
        )
    }

    /// The rejection reason, when the token itself was rejected.
    pub fn rejection(&self) -> Option<RejectionReason> {
        match self {
            Self::Rejected { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// The delay a status asks for in google.rpc.RetryInfo.
pub(crate) fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info().and_then(|info| info.retry_delay)
}

/// Whether a status is worth retrying for an idempotent call.
pub(crate) fn transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::ResourceExhausted)
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::Unauthenticated => Self::BadApiKey { message },
            Code::PermissionDenied => Self::MissingScope { message },
            Code::InvalidArgument => Self::InvalidArgument {
                fields: status
                    .get_details_bad_request()
                    .map(|br| {
                        br.field_violations
                            .into_iter()
                            .map(|v| FieldViolation {
                                field: v.field,
                                description: v.description,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                message,
            },
            Code::NotFound => Self::NotFound { message },
            code @ (Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted) => Self::Conflict { code, message },
            code @ (Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Unknown
            | Code::Cancelled
            | Code::DataLoss) => Self::Unavailable {
                code,
                retry_after: retry_delay(&status),
                message,
            },
            code => Self::Other { code, message },
        }
    }
}
