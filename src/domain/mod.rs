//! Transport-free domain logic: validated types, the caller model, and the
//! services the gRPC adapters call.

pub(crate) mod audit;
mod auth_mode;
mod bulk;
mod caller;
mod error;
mod ids;
pub mod import;
mod invitations;
mod lease;
pub mod reconcile;
mod user_cache;
mod users;

pub use audit::{AuditLog, AuditOutcome, AuditPage, AuditPageRequest};
pub use auth_mode::{AuthMode, AuthModeState, AuthModes};
pub use bulk::{BulkConfig, BulkMigrations, BulkProgress, BulkRequest, password_hasher};
pub use caller::{ApiKey, ApiKeyRegistry, Caller, Scope, generate_api_key};
pub use error::{DomainError, error_chain};
pub use ids::{ClerkUserId, Email, UserId};
pub use invitations::{INVALID_TOKEN, InvitationSent, Invitations};
pub use reconcile::{ReconcileProgress, ReconcileRequest, ReconcileSummary, Reconciliations};
pub use user_cache::UserCache;
pub use users::{MigrationState, User, UserDirectory};
