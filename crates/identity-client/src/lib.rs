//! A Rust client for the identity service.
//!
//! - [`IdentityClient`]: typed methods for every RPC of `IdentityService` and
//!   `MigrationService`, the API key sent as `authorization: Bearer ...`,
//!   load balancing over several replicas, per-call deadlines and retries of
//!   idempotent calls on transient errors.
//! - [`CacheOptions`]: an optional, bounded local cache
//!   of verdicts keyed by the token's SHA-256.
//! - [`AuthLayer`]: a `tower::Layer` that turns `Authorization: Bearer` into a
//!   [`Principal`] in the request extensions, for HTTP (axum, hyper) and gRPC
//!   (tonic) servers, plus axum extractors for [`Principal`] and
//!   `Option<Principal>` (feature `axum`, on by default).
//!
//! ```no_run
//! # async fn run() -> Result<(), identity_client::Error> {
//! let client = identity_client::IdentityClient::connect("http://127.0.0.1:50051", "idk_...").await?;
//! let principal = client.verify_token("eyJ...").await?;
//! println!("{} via {:?}", principal.user_id, principal.auth_method);
//! # Ok(())
//! # }
//! ```

mod cache;
mod client;
mod error;
mod layer;
mod principal;

/// The generated protobuf messages and tonic clients of `identity.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("identity.v1");
}

pub use cache::CacheOptions;
pub use client::{Builder, IdentityClient, ResponseStream};
pub use error::{Error, FieldViolation};
#[cfg(feature = "axum")]
pub use layer::MissingPrincipal;
pub use layer::{AuthLayer, AuthService};
pub use pb::{AuthMethod, AuthMode, MigrationState, RejectionReason};
pub use principal::{Organization, Principal};
