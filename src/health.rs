//! `grpc.health.v1`: SERVING for "" and each service while the database
//! answers, NOT_SERVING while it does not or while the server drains.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    domain::AuthModes,
    grpc::{IdentityApi, MigrationApi},
    pb::{identity_service_server::IdentityServiceServer, migration_service_server::MigrationServiceServer},
    storage::Storage,
    verification::Verifier,
};

/// The health entry for Clerk token verification: NOT_SERVING only while no
/// usable signing keys exist (legacy tokens and the rest keep working).
pub(crate) const CLERK_KEYS_SERVICE: &str = "identity.v1.ClerkKeys";

/// The health entry for a liveness probe: SERVING for as long as the
/// process serves gRPC at all, whatever the database does, so that a
/// database outage makes pods unready, not restarted in a crash loop.
pub const LIVENESS_SERVICE: &str = "liveness";

/// The names health answers for: the whole server and each service.
pub(crate) const SERVICE_NAMES: [&str; 3] = [
    "",
    <IdentityServiceServer<IdentityApi> as NamedService>::NAME,
    <MigrationServiceServer<MigrationApi> as NamedService>::NAME,
];

pub(crate) async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Pings the database every `interval` and reports the result, until `stop` flips.
pub(crate) async fn watch_database(
    reporter: HealthReporter,
    storage: Arc<dyn Storage>,
    modes: AuthModes,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut healthy: Option<bool> = None;
    loop {
        let (open, idle) = storage.pool_status();
        ::metrics::gauge!("identity_db_pool_connections", "state" => "open").set(f64::from(open));
        ::metrics::gauge!("identity_db_pool_connections", "state" => "idle").set(f64::from(idle));
        let ok = match tokio::time::timeout(interval.max(Duration::from_secs(1)), storage.ping()).await {
            Ok(Ok(())) => true,
            Ok(Err(err)) => {
                if healthy != Some(false) {
                    tracing::warn!(error = %err, "database health check failed; reporting NOT_SERVING");
                }
                false
            }
            Err(_) => {
                if healthy != Some(false) {
                    tracing::warn!("database health check timed out; reporting NOT_SERVING");
                }
                false
            }
        };
        // Serving also needs the auth mode: without it verification fails closed.
        let ok = ok && modes.known();
        ::metrics::gauge!("identity_serving").set(if ok { 1.0 } else { 0.0 });
        if healthy != Some(ok) {
            if ok && healthy.is_some() {
                tracing::info!("database reachable again; reporting SERVING");
            }
            set_all(
                &reporter,
                if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                },
            )
            .await;
            healthy = Some(ok);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Reports whether Clerk's keys are usable, when Clerk is configured.
pub(crate) async fn watch_clerk_keys(reporter: HealthReporter, verifier: Verifier, mut stop: watch::Receiver<bool>) {
    if verifier.clerk_keys_usable().is_none() {
        return;
    }
    let mut last: Option<bool> = None;
    loop {
        let usable = verifier.clerk_keys_usable().unwrap_or(false);
        if last != Some(usable) {
            if last.is_some() {
                tracing::info!(usable, "Clerk signing keys changed availability");
            }
            let status = if usable {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(CLERK_KEYS_SERVICE, status).await;
            last = Some(usable);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}
