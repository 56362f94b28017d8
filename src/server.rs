//! Wires configuration, storage, domain services and the gRPC transport
//! into a running server, and takes it down gracefully.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use secrecy::ExposeSecret;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

use crate::{
    config::Config,
    domain::{AuditLog, AuthModes, BulkMigrations, Invitations, UserCache, UserDirectory},
    gateway::{ForwardAuthAccess, Gateway, GatewayRecorder},
    grpc::{ApiKeyInterceptor, ExtAuthzApi, GatewayInterceptor, IdentityApi, MigrationApi, MigrationParts},
    health,
    mail::{Mailer, OutboxWorker},
    metrics::{AuthRecorder, MigrationStats, prometheus},
    pb::{self, identity_service_server::IdentityServiceServer, migration_service_server::MigrationServiceServer},
    storage::{self, Storage, redact_url},
    verification::{KeyError, Verifier},
};

/// Concurrent calls one HTTP/2 connection may have open; a client beyond
/// it waits for a slot (HTTP/2 flow control), it is not refused.
const MAX_CONCURRENT_STREAMS: u32 = 256;

/// Why the server could not start; each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the database at {url}: {source}")]
    Database { url: String, source: storage::StorageError },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Keys(#[from] KeyError),
    #[error("{0}")]
    Mail(String),
    #[error("{variable}: {message}")]
    Config { variable: &'static str, message: String },
}

/// A server running in the background (what tests and `serve` hold).
#[derive(Debug)]
pub struct RunningServer {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// Where `/metrics` is served, when it is.
    pub metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
}

impl RunningServer {
    /// Stops accepting calls, lets in-flight calls finish within the grace
    /// period, then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        match tokio::time::timeout(self.grace, &mut task).await {
            Ok(Ok(Ok(()))) => tracing::info!("server stopped"),
            Ok(Ok(Err(err))) => tracing::error!(error = %err, "server stopped with an error"),
            Ok(Err(err)) => tracing::error!(error = %err, "server task failed"),
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "in-flight calls did not finish within the grace period; aborting them");
                task.abort();
            }
        }
    }

    /// Waits until the server stops on its own (it only does on error).
    pub async fn wait(&mut self) -> Result<(), String> {
        match (&mut self.task).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        }
    }
}

/// Opens the database (applying migrations when configured), binds the
/// listener and serves in the background.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    let url = config.database_url.expose_secret().to_owned();
    let storage = storage::connect(&url, &config.database, config.migrate_on_start)
        .await
        .map_err(|source| StartError::Database {
            url: redact_url(&url),
            source,
        })?;
    start_with_storage(config, storage).await
}

/// Like [`start`], with storage that is already open.
pub async fn start_with_storage(config: Config, storage: Arc<dyn Storage>) -> Result<RunningServer, StartError> {
    // Installs the recorder first, so every figure from here on is exported.
    let exporting = prometheus::handle().is_some();
    for name in &config.unknown_variables {
        tracing::warn!(variable = %name, "ignoring unknown configuration variable");
    }
    if config.api_keys.is_empty() {
        tracing::warn!(
            addr = %config.listen_addr,
            "no API keys configured: development mode, every caller has every scope (loopback only)"
        );
    }

    if config
        .verification
        .clerk
        .as_ref()
        .is_some_and(|c| c.unmapped_policy == crate::config::UnmappedPolicy::LinkByEmail)
        && !storage.users_have_emails()
    {
        return Err(StartError::Config {
            variable: "IDENTITY_UNMAPPED_CLERK_USER",
            message: "link_by_email needs the users' emails, but the application's users table has no readable \
                      email column (IDENTITY_USERS_EMAIL_COLUMN); use provision or reject"
                .into(),
        });
    }
    let user_cache = UserCache::new(storage.clone(), config.verification.user_cache_ttl);
    let users = UserDirectory::new(user_cache.clone());
    let modes = AuthModes::new(storage.clone());
    let audit = AuditLog::new(storage.clone());
    if let Err(err) = modes.refresh().await {
        tracing::warn!(error = %err, "cannot read the auth mode yet; verification answers UNAVAILABLE until it is read");
    }
    let recorder = Arc::new(AuthRecorder::default());
    let stats = MigrationStats::new(storage.clone(), recorder.clone(), modes.clone());
    let verifier = Verifier::new(
        &config.verification,
        modes.clone(),
        user_cache.clone(),
        crate::clerk::http_client(),
        recorder.clone(),
    )?;
    let invitations = Invitations::new(user_cache.clone(), verifier.clone(), config.invitations.clone());
    let mailer =
        Mailer::new(&config.mail.transport, &config.mail.from, config.mail.send_timeout).map_err(StartError::Mail)?;
    if let Err(err) = verifier.load_revocations().await {
        tracing::warn!(error = %err, "cannot load revocations yet; retrying in the background");
    }
    log_verification_setup(&config);

    let (stop_tx, stop_rx) = watch::channel(false);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::set_all(&reporter, ServingStatus::NotServing).await;
    // Liveness follows the process alone, never the database (see health.rs).
    reporter
        .set_service_status(health::LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    ::metrics::gauge!("identity_db_pool_connections", "state" => "max").set(f64::from(config.database.max_connections));
    tokio::spawn(health::watch_database(
        reporter.clone(),
        storage.clone(),
        modes.clone(),
        config.health_interval,
        stop_rx.clone(),
    ));
    tokio::spawn(refresh_auth_mode(
        modes.clone(),
        config.settings_refresh,
        stop_rx.clone(),
    ));
    verifier.spawn_background(config.settings_refresh, config.clerk_webhook_retention, stop_rx.clone());
    tokio::spawn(health::watch_clerk_keys(
        reporter.clone(),
        verifier.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(OutboxWorker::new(storage.clone(), mailer, config.mail.clone()).run(stop_rx.clone()));
    tokio::spawn(shrink_rate_limits(invitations.clone(), stop_rx.clone()));
    tokio::spawn(stats.clone().run_flusher(config.stats_flush, stop_rx.clone()));
    let gateway_recorder = Arc::new(GatewayRecorder::default());
    let gateway = Gateway::new(&config.gateway, verifier.clone(), gateway_recorder.clone());
    let api_keys = Arc::new(config.api_keys.clone());
    let grpc_metrics = prometheus::GrpcMetricsLayer::new(crate::telemetry::RpcTracing::new(&config.traces));
    let exposition = prometheus::Exposition {
        auth: recorder.clone(),
        grpc: grpc_metrics.clone(),
        verifier: verifier.clone(),
        gateway: gateway_recorder,
    };
    let mut http_app = prometheus::router(exposition);
    if let Some(webhook) = &config.clerk_webhook {
        if config.metrics_addr.is_none() || !exporting {
            return Err(StartError::Config {
                variable: "IDENTITY_CLERK_WEBHOOK_SECRET",
                message:
                    "Clerk's webhook endpoint is served on the HTTP listener, which IDENTITY_METRICS_ADDR=off turns off"
                        .into(),
            });
        }
        let policy = config
            .verification
            .clerk
            .as_ref()
            .map_or(crate::config::UnmappedPolicy::Reject, |c| c.unmapped_policy);
        let hooks = crate::webhooks::ClerkWebhooks::new(webhook, storage.clone(), verifier.clone(), policy).map_err(
            |message| StartError::Config {
                variable: "IDENTITY_CLERK_WEBHOOK_SECRET",
                message,
            },
        )?;
        http_app = http_app.merge(hooks.router());
        tracing::info!(
            path = crate::webhooks::PATH,
            "Clerk webhooks accepted on the HTTP listener"
        );
    }
    let metrics_addr = match config.metrics_addr {
        Some(addr) if exporting => Some(
            // Each HTTP feature merges its own router here.
            crate::http::serve(
                addr,
                http_app
                    .merge(crate::dashboard::router(
                        config.dashboard,
                        crate::dashboard::Dashboard::new(
                            stats.clone(),
                            modes.clone(),
                            storage.clone(),
                            stop_rx.clone(),
                        ),
                    ))
                    .merge(crate::forward_auth::router(
                        gateway.clone(),
                        config.gateway.forward_auth,
                        api_keys.clone(),
                    )),
                stop_rx.clone(),
            )
            .await
            .map_err(|source| StartError::Bind { addr, source })?,
        ),
        _ => None,
    };
    let clerk_api = config.verification.clerk.as_ref().and_then(|c| {
        c.secret_key
            .as_ref()
            .map(|secret| crate::clerk::ClerkApi::new(crate::clerk::http_client(), c.api_url.clone(), secret.clone()))
    });
    let reconcile = crate::domain::Reconciliations::new(
        storage.clone(),
        clerk_api.clone(),
        Some(verifier.clone()),
        config.bulk.clone(),
        stop_rx.clone(),
    );
    let bulk = BulkMigrations::new(
        storage.clone(),
        user_cache,
        clerk_api,
        config.bulk.clone(),
        stop_rx.clone(),
    );

    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let interceptor = ApiKeyInterceptor::new(api_keys);
    let limit = config.max_request_bytes;
    let identity =
        IdentityServiceServer::new(IdentityApi::new(users.clone(), verifier)).max_decoding_message_size(limit);
    let migration = MigrationServiceServer::new(MigrationApi::new(MigrationParts {
        users,
        modes,
        audit,
        invitations,
        bulk,
        reconcile,
        stats: stats.clone(),
        stop: stop_rx.clone(),
    }))
    .max_decoding_message_size(limit);
    // A CheckRequest carries every header of the proxied request (Envoy
    // allows up to 60 KiB of them by default); only a caller whose key passed
    // the interceptor gets it decoded.
    let ext_authz = (config.gateway.ext_authz != ForwardAuthAccess::Off).then(|| {
        let api = AuthorizationServer::new(ExtAuthzApi::new(gateway)).max_decoding_message_size(limit.max(1 << 20));
        let by_network = config.gateway.ext_authz == ForwardAuthAccess::Network;
        InterceptedService::new(api, GatewayInterceptor::new(interceptor.clone(), by_network))
    });

    let listener = TcpListener::bind(config.listen_addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen_addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen_addr,
        source,
    })?;

    let mut shutdown_rx = stop_rx;
    let drain_reporter = reporter.clone();
    let router = tonic::transport::Server::builder()
        // HTTP/2 bounds: tonic leaves streams per connection unbounded.
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .http2_max_pending_accept_reset_streams(Some(64))
        .http2_max_header_list_size(Some(16 * 1024))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .layer(grpc_metrics)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(identity, interceptor.clone()))
        .add_service(InterceptedService::new(migration, interceptor))
        .add_optional_service(ext_authz);
    let task = tokio::spawn(router.serve_with_incoming_shutdown(
        // Small gRPC frames must not wait for Nagle's algorithm (a 40 ms stall).
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        async move {
            let _ = shutdown_rx.changed().await;
            // Tell load balancers first, then stop accepting.
            health::set_all(&drain_reporter, ServingStatus::NotServing).await;
            tracing::info!("shutting down: draining in-flight calls");
        },
    ));
    tracing::info!(%addr, database = %redact_url(config.database_url.expose_secret()), "identity service listening");
    Ok(RunningServer {
        addr,
        metrics_addr,
        stop: stop_tx,
        task,
        grace: config.shutdown_grace,
    })
}

fn log_verification_setup(config: &Config) {
    if !config.invitations.deliverable {
        tracing::warn!(
            "no mail transport configured (IDENTITY_SMTP_URL): InitiateMigration answers FAILED_PRECONDITION \
             rather than lose invitations; set IDENTITY_MAIL_TRANSPORT=log to log them on purpose"
        );
    }
    let v = &config.verification;
    match (&v.legacy, &v.clerk) {
        (None, None) => tracing::warn!("neither legacy JWTs nor Clerk are configured: VerifyToken rejects every token"),
        _ => tracing::info!(
            legacy = v.legacy.as_ref().map(|l| format!("{:?}", l.algorithm)),
            clerk_issuer = v.clerk.as_ref().map(|c| c.issuer.as_str()),
            "token verification configured"
        ),
    }
}

/// Drops rate-limit state of keys that have recovered, so it stays bounded.
async fn shrink_rate_limits(invitations: Invitations, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => invitations.shrink(),
            _ = stop.changed() => return,
        }
    }
}

/// Keeps this replica's auth mode in step with the database.
async fn refresh_auth_mode(modes: AuthModes, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let before = modes.current();
        let known = modes.known();
        match modes.refresh().await {
            Ok(state) if !known => tracing::info!(mode = %state.mode, "auth mode read; verification enabled"),
            Ok(state) if state.mode != before => {
                tracing::info!(from = %before, to = %state.mode, "auth mode changed by another replica");
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot refresh the auth mode; keeping the last known one"),
        }
    }
}

/// Server reflection describing every service, both reflection versions
/// included, so `grpcurl list` shows them whichever version it speaks.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc error details (BadRequest, RetryInfo...), so grpcurl
        // decodes the details every INVALID_ARGUMENT carries.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
