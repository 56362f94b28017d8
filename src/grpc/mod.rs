//! The gRPC transport: thin adapters that convert requests into domain
//! types, call the domain services and map the result back.

pub(crate) mod auth;
mod convert;
mod ext_authz;
mod identity;
mod migration;
mod status;

pub use auth::{ApiKeyInterceptor, GatewayInterceptor, caller};
pub use ext_authz::ExtAuthzApi;
pub use identity::IdentityApi;
pub use migration::{MigrationApi, MigrationParts};
pub use status::{error_chain, to_status};
