//! `identity.v1.MigrationService` adapter.

use tonic::{Request, Response, Status};

use super::{caller, convert, to_status};
use crate::{
    domain::{
        AuditLog, AuditPageRequest, AuthModes, BulkMigrations, BulkRequest, ClerkUserId, DomainError, Email,
        Invitations, ReconcileRequest, Reconciliations, UserDirectory, UserId,
    },
    metrics::MigrationStats,
    pb::{self, migration_service_server::MigrationService},
};

/// Bounds of StreamMigrationMetrics' interval.
const MIN_INTERVAL_SECONDS: u32 = 1;
const MAX_INTERVAL_SECONDS: u32 = 3600;
const DEFAULT_INTERVAL_SECONDS: u32 = 5;

#[derive(Debug, Clone)]
pub struct MigrationApi {
    users: UserDirectory,
    modes: AuthModes,
    audit: AuditLog,
    invitations: Invitations,
    bulk: BulkMigrations,
    reconcile: Reconciliations,
    stats: MigrationStats,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// Everything the migration service needs.
#[derive(Debug, Clone)]
pub struct MigrationParts {
    pub users: UserDirectory,
    pub modes: AuthModes,
    pub audit: AuditLog,
    pub invitations: Invitations,
    pub bulk: BulkMigrations,
    pub reconcile: Reconciliations,
    pub stats: MigrationStats,
    /// Flips at shutdown: open metric streams end.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

impl MigrationApi {
    pub fn new(parts: MigrationParts) -> Self {
        let MigrationParts {
            users,
            modes,
            audit,
            invitations,
            bulk,
            reconcile,
            stats,
            stop,
        } = parts;
        Self {
            users,
            modes,
            audit,
            invitations,
            bulk,
            reconcile,
            stats,
            stop,
        }
    }
}

fn parse_job_id(field: &'static str, raw: &str) -> Result<uuid::Uuid, DomainError> {
    uuid::Uuid::parse_str(raw.trim()).map_err(|_| DomainError::invalid(field, "must be a job id (UUID)"))
}

fn bulk_request(body: pb::StartBulkMigrationRequest) -> Result<BulkRequest, DomainError> {
    let user_ids = body
        .user_ids
        .iter()
        .map(|id| UserId::parse("user_ids", id).map(|u| *u.as_uuid()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(BulkRequest {
        dry_run: body.dry_run,
        batch_size: u32::try_from(body.batch_size)
            .map_err(|_| DomainError::invalid("batch_size", "must not be negative"))?,
        max_requests_per_second: body.max_requests_per_second,
        filter: crate::storage::BulkFilter {
            user_ids,
            created_before: body
                .created_before
                .as_ref()
                .map(|t| convert::from_timestamp("created_before", t))
                .transpose()?,
        },
        resume_job_id: (!body.resume_job_id.is_empty())
            .then(|| parse_job_id("resume_job_id", &body.resume_job_id))
            .transpose()?,
    })
}

#[tonic::async_trait]
impl MigrationService for MigrationApi {
    type StreamMigrationMetricsStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::StreamMigrationMetricsResponse, Status>>;

    #[tracing::instrument(name = "MigrationService/GetMigrationStats", skip_all)]
    async fn get_migration_stats(
        &self,
        mut request: Request<pb::GetMigrationStatsRequest>,
    ) -> Result<Response<pb::GetMigrationStatsResponse>, Status> {
        let caller = caller(&mut request)?;
        let body = request.into_inner();
        let window = convert::window(body.window).map_err(to_status)?;
        let snapshot = self
            .stats
            .snapshot(&caller, window, body.readiness_days)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetMigrationStatsResponse {
            stats: Some(convert::stats(snapshot)),
        }))
    }

    #[tracing::instrument(name = "MigrationService/StreamMigrationMetrics", skip_all)]
    async fn stream_migration_metrics(
        &self,
        mut request: Request<pb::StreamMigrationMetricsRequest>,
    ) -> Result<Response<Self::StreamMigrationMetricsStream>, Status> {
        let caller = caller(&mut request)?;
        let body = request.into_inner();
        let window = convert::window(body.window).map_err(to_status)?;
        let interval = match body.interval_seconds {
            0 => DEFAULT_INTERVAL_SECONDS,
            n if (MIN_INTERVAL_SECONDS..=MAX_INTERVAL_SECONDS).contains(&n) => n,
            _ => {
                return Err(to_status(DomainError::invalid(
                    "interval_seconds",
                    format!("must be {MIN_INTERVAL_SECONDS} to {MAX_INTERVAL_SECONDS}"),
                )));
            }
        };
        // Fail before streaming when the caller may not read stats or holds
        // as many streams as it may; the slot is freed when the stream ends.
        let slot = self.stats.open_stream(&caller).map_err(to_status)?;
        let first = self
            .stats
            .shared_snapshot(&caller, window, body.readiness_days)
            .await
            .map_err(to_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let stats = self.stats.clone();
        let mut stop = self.stop.clone();
        let readiness_days = body.readiness_days;
        tokio::spawn(async move {
            let _slot = slot;
            let mut next = Ok(first);
            loop {
                let message = next
                    .map(|s| pb::StreamMigrationMetricsResponse {
                        stats: Some(convert::stats(s)),
                    })
                    .map_err(to_status);
                let failed = message.is_err();
                if tx.send(message).await.is_err() || failed {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(u64::from(interval))) => {}
                    // The client went away, or the server is shutting down.
                    _ = tx.closed() => return,
                    _ = stop.changed() => return,
                }
                next = stats.shared_snapshot(&caller, window, readiness_days).await;
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    type StartBulkMigrationStream = tokio_stream::wrappers::ReceiverStream<Result<pb::BulkMigrationProgress, Status>>;

    #[tracing::instrument(name = "MigrationService/StartBulkMigration", skip_all)]
    async fn start_bulk_migration(
        &self,
        mut request: Request<pb::StartBulkMigrationRequest>,
    ) -> Result<Response<Self::StartBulkMigrationStream>, Status> {
        let caller = caller(&mut request)?;
        let bulk_request = bulk_request(request.into_inner()).map_err(to_status)?;
        let mut progress = self.bulk.start(&caller, bulk_request).await.map_err(to_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // Forwards snapshots until the job ends or the client goes away (the job goes on).
        tokio::spawn(async move {
            loop {
                let snapshot = progress.borrow_and_update().clone();
                let done = snapshot.state != crate::storage::BulkJobState::Running;
                if tx.send(Ok(convert::bulk_progress(snapshot))).await.is_err() || done {
                    return;
                }
                if progress.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    type ReconcileMappingsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ReconcileProgress, Status>>;

    #[tracing::instrument(name = "MigrationService/ReconcileMappings", skip_all)]
    async fn reconcile_mappings(
        &self,
        mut request: Request<pb::ReconcileMappingsRequest>,
    ) -> Result<Response<Self::ReconcileMappingsStream>, Status> {
        let caller = caller(&mut request)?;
        let body = request.into_inner();
        let reconcile_request = ReconcileRequest {
            fix: body.fix,
            max_requests_per_second: body.max_requests_per_second,
            page_size: u32::try_from(body.page_size)
                .map_err(|_| to_status(DomainError::invalid("page_size", "must not be negative")))?,
            resume_job_id: (!body.resume_job_id.is_empty())
                .then(|| parse_job_id("resume_job_id", &body.resume_job_id))
                .transpose()
                .map_err(to_status)?,
        };
        let mut progress = self
            .reconcile
            .start(&caller, reconcile_request)
            .await
            .map_err(to_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // Forwards snapshots until the pass ends or the client goes away (the pass goes on).
        tokio::spawn(async move {
            loop {
                let snapshot = progress.borrow_and_update().clone();
                let done = snapshot.state != crate::storage::BulkJobState::Running;
                if tx.send(Ok(convert::reconcile_progress(snapshot))).await.is_err() || done {
                    return;
                }
                if progress.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    #[tracing::instrument(name = "MigrationService/CancelBulkMigration", skip_all)]
    async fn cancel_bulk_migration(
        &self,
        mut request: Request<pb::CancelBulkMigrationRequest>,
    ) -> Result<Response<pb::CancelBulkMigrationResponse>, Status> {
        let caller = caller(&mut request)?;
        let id = parse_job_id("job_id", &request.into_inner().job_id).map_err(to_status)?;
        let job = self.bulk.cancel(&caller, id).await.map_err(to_status)?;
        Ok(Response::new(pb::CancelBulkMigrationResponse {
            state: convert::bulk_state(job.state) as i32,
            processed: job.counters.processed,
        }))
    }

    #[tracing::instrument(name = "MigrationService/LinkUser", skip_all)]
    async fn link_user(
        &self,
        mut request: Request<pb::LinkUserRequest>,
    ) -> Result<Response<pb::LinkUserResponse>, Status> {
        let caller = caller(&mut request)?;
        let body = request.into_inner();
        let user_id = UserId::parse("user_id", &body.user_id).map_err(to_status)?;
        let clerk_user_id = ClerkUserId::parse("clerk_user_id", &body.clerk_user_id).map_err(to_status)?;
        let mapping = self
            .users
            .link(&caller, user_id, &clerk_user_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::LinkUserResponse {
            mapping: Some(convert::mapping(mapping)),
        }))
    }

    #[tracing::instrument(name = "MigrationService/UnlinkUser", skip_all)]
    async fn unlink_user(
        &self,
        mut request: Request<pb::UnlinkUserRequest>,
    ) -> Result<Response<pb::UnlinkUserResponse>, Status> {
        let caller = caller(&mut request)?;
        let user_id = UserId::parse("user_id", &request.into_inner().user_id).map_err(to_status)?;
        let removed = self.users.unlink(&caller, user_id).await.map_err(to_status)?;
        Ok(Response::new(pb::UnlinkUserResponse {
            removed: Some(convert::mapping(removed)),
        }))
    }

    #[tracing::instrument(name = "MigrationService/InitiateMigration", skip_all)]
    async fn initiate_migration(
        &self,
        mut request: Request<pb::InitiateMigrationRequest>,
    ) -> Result<Response<pb::InitiateMigrationResponse>, Status> {
        use pb::initiate_migration_request::Subject;
        let caller = caller(&mut request)?;
        let body = request.into_inner();
        let email = match body.email.trim() {
            "" => None,
            raw => Some(Email::parse("email", raw).map_err(to_status)?),
        };
        let sent = match body.subject {
            Some(Subject::LegacyToken(token)) => {
                self.invitations
                    .initiate_with_legacy_token(&caller, &token, email)
                    .await
            }
            Some(Subject::UserId(id)) => {
                let user_id = UserId::parse("user_id", &id).map_err(to_status)?;
                self.invitations.initiate_for_user(&caller, user_id, email).await
            }
            None => Err(DomainError::invalid("subject", "set legacy_token or user_id")),
        }
        .map_err(to_status)?;
        Ok(Response::new(pb::InitiateMigrationResponse {
            user_id: sent.user_id.to_string(),
            expires_at: Some(convert::timestamp(sent.expires_at)),
        }))
    }

    #[tracing::instrument(name = "MigrationService/CompleteMigration", skip_all)]
    async fn complete_migration(
        &self,
        mut request: Request<pb::CompleteMigrationRequest>,
    ) -> Result<Response<pb::CompleteMigrationResponse>, Status> {
        let caller = caller(&mut request)?;
        let body = request.into_inner();
        let mapping = self
            .invitations
            .complete(&caller, &body.migration_token, &body.clerk_session_token)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CompleteMigrationResponse {
            mapping: Some(convert::mapping(mapping)),
        }))
    }

    #[tracing::instrument(name = "MigrationService/GetMapping", skip_all)]
    async fn get_mapping(
        &self,
        mut request: Request<pb::GetMappingRequest>,
    ) -> Result<Response<pb::GetMappingResponse>, Status> {
        let caller = caller(&mut request)?;
        let key = convert::mapping_key(request.into_inner().lookup).map_err(to_status)?;
        let mapping = self.users.get_mapping(&caller, &key).await.map_err(to_status)?;
        Ok(Response::new(pb::GetMappingResponse {
            mapping: Some(convert::mapping(mapping)),
        }))
    }

    #[tracing::instrument(name = "MigrationService/GetAuthMode", skip_all)]
    async fn get_auth_mode(
        &self,
        mut request: Request<pb::GetAuthModeRequest>,
    ) -> Result<Response<pb::GetAuthModeResponse>, Status> {
        let caller = caller(&mut request)?;
        let state = self.modes.get(&caller).await.map_err(to_status)?;
        Ok(Response::new(pb::GetAuthModeResponse {
            mode: convert::auth_mode(state.mode) as i32,
            updated_at: state.updated_at.map(convert::timestamp),
            updated_by: state.updated_by,
        }))
    }

    #[tracing::instrument(name = "MigrationService/SetAuthMode", skip_all)]
    async fn set_auth_mode(
        &self,
        mut request: Request<pb::SetAuthModeRequest>,
    ) -> Result<Response<pb::SetAuthModeResponse>, Status> {
        let caller = caller(&mut request)?;
        let mode = convert::auth_mode_from("mode", request.into_inner().mode).map_err(to_status)?;
        let previous = self.modes.set(&caller, mode).await.map_err(to_status)?;
        Ok(Response::new(pb::SetAuthModeResponse {
            mode: convert::auth_mode(mode) as i32,
            previous_mode: convert::auth_mode(previous) as i32,
        }))
    }

    #[tracing::instrument(name = "MigrationService/ListAuditEvents", skip_all)]
    async fn list_audit_events(
        &self,
        mut request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = caller(&mut request)?;
        let page_request = audit_page_request(request.into_inner()).map_err(to_status)?;
        let page = self.audit.list(&caller, page_request).await.map_err(to_status)?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: page.events.into_iter().map(convert::audit_event).collect(),
            next_page_token: page.next_page_token,
        }))
    }
}

fn audit_page_request(body: pb::ListAuditEventsRequest) -> Result<AuditPageRequest, DomainError> {
    Ok(AuditPageRequest {
        user_id: (!body.user_id.is_empty())
            .then(|| UserId::parse("user_id", &body.user_id))
            .transpose()?,
        action: (!body.action.is_empty()).then_some(body.action),
        since: body
            .since
            .as_ref()
            .map(|t| convert::from_timestamp("since", t))
            .transpose()?,
        until: body
            .until
            .as_ref()
            .map(|t| convert::from_timestamp("until", t))
            .transpose()?,
        page_size: u32::try_from(body.page_size)
            .map_err(|_| DomainError::invalid("page_size", "must not be negative"))?,
        page_token: body.page_token,
    })
}
