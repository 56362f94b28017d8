//! The one mapping from domain errors to gRPC status codes.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::DomainError;
pub use crate::domain::error_chain;

/// Converts a domain error into the status a client sees. Expected errors
/// keep their short message; unexpected ones are logged with their cause
/// chain and shown as a bare "internal error".
pub fn to_status(err: DomainError) -> Status {
    match err {
        DomainError::InvalidArgument { field, message } => Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid {field}: {message}"),
            ErrorDetails::with_bad_request_violation(field, message),
        ),
        DomainError::NotFound(message) => Status::not_found(message),
        DomainError::AlreadyExists(message) => Status::already_exists(message),
        DomainError::FailedPrecondition(message) => Status::failed_precondition(message),
        DomainError::PermissionDenied(message) => Status::permission_denied(message),
        DomainError::ResourceExhausted { message, retry_after } => Status::with_error_details(
            Code::ResourceExhausted,
            message,
            ErrorDetails::with_retry_info(Some(retry_after)),
        ),
        DomainError::Unavailable { message, source } => {
            match &source {
                Some(source) => tracing::warn!(error = %error_chain(source.as_ref()), "{message}"),
                None => tracing::warn!("{message}"),
            }
            Status::unavailable(message)
        }
        DomainError::Internal(source) => {
            tracing::error!(error = %error_chain(source.as_ref()), "internal error");
            Status::internal("internal error")
        }
    }
}
