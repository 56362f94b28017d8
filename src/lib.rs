//! The identity service: one gRPC service that verifies bearer tokens from
//! the legacy JWT login and from Clerk, maps legacy users to Clerk users and
//! runs the migration between them.
//!
//! Layout: [`grpc`] is the transport, [`domain`] the rules, [`verification`]
//! the token hot path, [`storage`] the databases, [`clerk`] Clerk's Backend
//! API, [`config`] the environment, [`server`] wires them together.

pub mod clerk;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod domain;
pub mod forward_auth;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod grpc;
mod health;
pub mod http;
pub mod mail;
pub mod metrics;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod verification;
pub mod webhooks;

/// Code generated from `proto/identity/v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("identity.v1");

    /// Encoded descriptors of the service's protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("identity_descriptor");
}
