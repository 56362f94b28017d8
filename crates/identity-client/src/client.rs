//! The typed client: connection, deadlines, retries and one method per RPC.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use backon::{ExponentialBuilder, Retryable};
use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::{
    cache::{self, CacheOptions, Hit, VerdictCache},
    error::{Error, retry_delay, transient},
    pb::{
        self, identity_service_client::IdentityServiceClient, migration_service_client::MigrationServiceClient,
        verify_token_response,
    },
    principal::{Principal, system_time},
};

/// Adds `authorization: Bearer <key>` to every call; the value is marked
/// sensitive so that neither `Debug` nor tonic's logs print it.
#[derive(Clone)]
struct ApiKey(AsciiMetadataValue);

impl Interceptor for ApiKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Transport = InterceptedService<Channel, ApiKey>;

/// A client of the identity service (both `IdentityService` and
/// `MigrationService`).
///
/// Cheap to clone: clones share the connections and the verdict cache.
///
/// Every unary call gets the [default deadline](Builder::deadline). Idempotent
/// calls (`VerifyToken`, `RevokeToken`, `GetUser`, `GetMapping`,
/// `GetAuthMode`, `GetMigrationStats`, `ListAuditEvents`,
/// `CancelBulkMigration`) are retried with exponential backoff on
/// UNAVAILABLE and RESOURCE_EXHAUSTED, waiting at least as long as the
/// service's google.rpc.RetryInfo asks; the others are sent once.
#[derive(Clone)]
pub struct IdentityClient {
    identity: IdentityServiceClient<Transport>,
    migration: MigrationServiceClient<Transport>,
    settings: Arc<Settings>,
}

struct Settings {
    deadline: Duration,
    retries: usize,
    min_backoff: Duration,
    max_backoff: Duration,
    max_retry_after: Duration,
    cache: Option<VerdictCache>,
}

impl fmt::Debug for IdentityClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityClient")
            .field("deadline", &self.settings.deadline)
            .field("retries", &self.settings.retries)
            .field("cache", &self.settings.cache.is_some())
            .finish_non_exhaustive()
    }
}

/// Configures an [`IdentityClient`]; start with [`IdentityClient::builder`].
#[derive(Clone)]
pub struct Builder {
    endpoints: Vec<String>,
    api_key: String,
    deadline: Duration,
    connect_timeout: Duration,
    retries: usize,
    min_backoff: Duration,
    max_backoff: Duration,
    max_retry_after: Duration,
    cache: Option<CacheOptions>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("endpoints", &self.endpoints)
            .field("api_key", &"*****")
            .field("deadline", &self.deadline)
            .field("connect_timeout", &self.connect_timeout)
            .field("retries", &self.retries)
            .field("cache", &self.cache)
            .finish()
    }
}

impl Builder {
    /// Adds a replica (`http://host:port` or `https://...`). With several,
    /// calls are load-balanced over them (power of two choices) and a
    /// replica that fails is taken out until it reconnects.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoints.push(url.into());
        self
    }

    /// Adds several replicas; see [`endpoint`](Self::endpoint).
    pub fn endpoints<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints.extend(urls.into_iter().map(Into::into));
        self
    }

    /// The deadline of each unary call, retries included (default 2 s). It
    /// is sent to the service as `grpc-timeout` and enforced here too.
    /// Streams have no deadline once they are open.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// How long establishing a connection may take (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many times an idempotent call is retried on UNAVAILABLE or
    /// RESOURCE_EXHAUSTED (default 2; 0 turns retries off).
    pub fn retries(mut self, retries: usize) -> Self {
        self.retries = retries;
        self
    }

    /// The exponential backoff between retries, with jitter (default 50 ms to 1 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// The longest google.rpc.RetryInfo delay honoured by waiting (default
    /// 2 s); when the service asks for longer, the call fails with
    /// [`Error::Unavailable`] carrying `retry_after` instead.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Turns on the local verdict cache for [`IdentityClient::verify_token`].
    ///
    /// Its [`max_staleness`](CacheOptions::max_staleness) (default 5 s)
    /// bounds how late this caller sees a revocation, a deleted user or an
    /// auth-mode switch; nothing is served past the token's `exp`.
    pub fn cache(mut self, options: CacheOptions) -> Self {
        self.cache = Some(options);
        self
    }

    fn channel(&self) -> Result<(Channel, Vec<Endpoint>), Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("no endpoint given".to_owned()));
        }
        let endpoints = self
            .endpoints
            .iter()
            .map(|url| {
                Endpoint::from_shared(url.clone())
                    .map(|e| {
                        e.connect_timeout(self.connect_timeout)
                            .tcp_nodelay(true)
                            .http2_keep_alive_interval(Duration::from_secs(30))
                            .keep_alive_while_idle(true)
                    })
                    .map_err(|_| Error::Config(format!("invalid endpoint URL {url:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = match endpoints.as_slice() {
            [one] => one.connect_lazy(),
            many => Channel::balance_list(many.iter().cloned()),
        };
        Ok((channel, endpoints))
    }

    fn finish(self, channel: Channel) -> Result<IdentityClient, Error> {
        let mut key: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {}", self.api_key))
            .map_err(|_| Error::Config("the API key is not valid header text".to_owned()))?;
        key.set_sensitive(true);
        let transport = InterceptedService::new(channel, ApiKey(key));
        Ok(IdentityClient {
            identity: IdentityServiceClient::new(transport.clone()),
            migration: MigrationServiceClient::new(transport),
            settings: Arc::new(Settings {
                deadline: self.deadline,
                retries: self.retries,
                min_backoff: self.min_backoff,
                max_backoff: self.max_backoff,
                max_retry_after: self.max_retry_after,
                cache: self.cache.map(VerdictCache::new),
            }),
        })
    }

    /// Builds the client without connecting: connections open on the first
    /// call, and a replica that is down only fails the calls routed to it.
    pub fn connect_lazy(self) -> Result<IdentityClient, Error> {
        let (channel, _) = self.channel()?;
        self.finish(channel)
    }

    /// Builds the client and, with a single endpoint, connects to it first
    /// so a wrong address fails here rather than on the first call.
    pub async fn connect(self) -> Result<IdentityClient, Error> {
        let (channel, endpoints) = self.channel()?;
        let channel = match endpoints.as_slice() {
            [one] => one.connect().await.map_err(|err| Error::Unavailable {
                code: tonic::Code::Unavailable,
                message: format!("cannot connect to {}: {err}", one.uri()),
                retry_after: None,
            })?,
            _ => channel,
        };
        self.finish(channel)
    }
}

/// A server stream whose items carry this crate's [`Error`].
pub struct ResponseStream<T> {
    inner: tonic::Streaming<T>,
}

impl<T> fmt::Debug for ResponseStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseStream")
    }
}

impl<T> ResponseStream<T> {
    /// The next message; `Ok(None)` when the server ended the stream.
    pub async fn message(&mut self) -> Result<Option<T>, Error> {
        self.inner.message().await.map_err(Error::from)
    }
}

impl<T> futures_core::Stream for ResponseStream<T> {
    type Item = Result<T, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner)
            .poll_next(cx)
            .map(|item| item.map(|r| r.map_err(Error::from)))
    }
}

/// Whether a call may be sent again without changing its effect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Idempotent {
    Yes,
    No,
}

impl IdentityClient {
    /// Connects to one replica with an API key, with the default settings.
    pub async fn connect(url: impl Into<String>, api_key: impl Into<String>) -> Result<Self, Error> {
        Self::builder(api_key).endpoint(url).connect().await
    }

    /// A builder for several replicas, deadlines, retries and the cache.
    pub fn builder(api_key: impl Into<String>) -> Builder {
        Builder {
            endpoints: Vec::new(),
            api_key: api_key.into(),
            deadline: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            retries: 2,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(2),
            cache: None,
        }
    }

    /// One unary call with the deadline and, when idempotent, retries.
    async fn unary<Req, Resp, Fut>(
        &self,
        idempotent: Idempotent,
        message: Req,
        rpc: impl Fn(Request<Req>) -> Fut,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let settings = &self.settings;
        let deadline = tokio::time::Instant::now() + settings.deadline;
        let attempt = || async {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let mut request = Request::new(message.clone());
            request.set_timeout(left);
            match tokio::time::timeout_at(deadline, rpc(request)).await {
                Ok(result) => result.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(
                    "the identity service did not answer within the deadline",
                )),
            }
        };
        if idempotent == Idempotent::No || settings.retries == 0 {
            return attempt().await.map_err(Error::from);
        }
        let backoff = ExponentialBuilder::default()
            .with_min_delay(settings.min_backoff)
            .with_max_delay(settings.max_backoff)
            .with_max_times(settings.retries)
            .with_jitter();
        attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(transient)
            .adjust(|status: &Status, next: Option<Duration>| {
                let next = next?;
                let wait = match retry_delay(status) {
                    Some(asked) if asked > settings.max_retry_after => return None,
                    Some(asked) => asked.max(next),
                    None => next,
                };
                // No point sleeping past the deadline.
                (tokio::time::Instant::now() + wait < deadline).then_some(wait)
            })
            .await
            .map_err(Error::from)
    }

    /// Opens a server stream; the deadline covers opening it only.
    async fn stream<Req, Resp, Fut>(
        &self,
        message: Req,
        rpc: impl FnOnce(Request<Req>) -> Fut,
    ) -> Result<ResponseStream<Resp>, Error>
    where
        Fut: Future<Output = Result<tonic::Response<tonic::Streaming<Resp>>, Status>>,
    {
        match tokio::time::timeout(self.settings.deadline, rpc(Request::new(message))).await {
            Ok(Ok(response)) => Ok(ResponseStream {
                inner: response.into_inner(),
            }),
            Ok(Err(status)) => Err(status.into()),
            Err(_) => Err(Status::deadline_exceeded(
                "the identity service did not open the stream within the deadline",
            )
            .into()),
        }
    }

    // ---- IdentityService ----

    /// Verifies a bearer token (`VerifyToken`) with no expected audience.
    ///
    /// `Ok` holds the principal; a rejected token is [`Error::Rejected`] with
    /// its reason. With the [cache](Builder::cache) on, a recent verdict for
    /// the same token is served without calling the service.
    pub async fn verify_token(&self, token: &str) -> Result<Principal, Error> {
        self.verify_token_for_audience(token, "").await
    }

    /// Verifies a bearer token that must be meant for `audience` (empty: any).
    pub async fn verify_token_for_audience(&self, token: &str, audience: &str) -> Result<Principal, Error> {
        let cache = self.settings.cache.as_ref();
        let key = cache.map(|_| cache::digest(token, audience));
        if let (Some(cache), Some(key)) = (cache, key.as_ref()) {
            match cache.get(key) {
                Some(Hit::Accepted(principal)) => return Ok(principal),
                Some(Hit::Rejected(reason, message)) => return Err(Error::Rejected { reason, message }),
                None => {}
            }
        }
        let request = pb::VerifyTokenRequest {
            token: token.to_owned(),
            expected_audience: audience.to_owned(),
        };
        let response = self
            .unary(Idempotent::Yes, request, |r| {
                let mut client = self.identity.clone();
                async move { client.verify_token(r).await }
            })
            .await?;
        match response.result {
            Some(verify_token_response::Result::Principal(p)) => {
                let principal = Principal::from(p);
                if let (Some(cache), Some(key)) = (cache, key) {
                    cache.put_accepted(key, audience, &principal);
                }
                Ok(principal)
            }
            Some(verify_token_response::Result::Rejection(r)) => {
                let reason = r.reason();
                if let (Some(cache), Some(key)) = (cache, key) {
                    cache.put_rejected(key, audience, reason, &r.message);
                }
                Err(Error::Rejected {
                    reason,
                    message: r.message,
                })
            }
            None => Err(Error::Other {
                code: tonic::Code::Internal,
                message: "VerifyToken answered with neither a principal nor a rejection".to_owned(),
            }),
        }
    }

    /// Revokes a token until it expires (`RevokeToken`); returns how long the
    /// revocation is kept. Also drops the token from this client's cache.
    pub async fn revoke_token(&self, token: &str) -> Result<Option<SystemTime>, Error> {
        if let Some(cache) = &self.settings.cache {
            cache.forget(token);
        }
        self.revoke(pb::RevokeTokenRequest {
            target: Some(pb::revoke_token_request::Target::Token(token.to_owned())),
            expires_at: None,
        })
        .await
    }

    /// `RevokeToken` with the full request (by `jti`, with an explicit expiry).
    pub async fn revoke(&self, request: pb::RevokeTokenRequest) -> Result<Option<SystemTime>, Error> {
        let response = self
            .unary(Idempotent::Yes, request, |r| {
                let mut client = self.identity.clone();
                async move { client.revoke_token(r).await }
            })
            .await?;
        Ok(response.expires_at.as_ref().and_then(system_time))
    }

    /// Looks a user up (`GetUser`) by id, Clerk user id or email; a missing
    /// user is [`Error::NotFound`].
    pub async fn get_user(&self, lookup: pb::get_user_request::Lookup) -> Result<pb::User, Error> {
        let response = self
            .unary(Idempotent::Yes, pb::GetUserRequest { lookup: Some(lookup) }, |r| {
                let mut client = self.identity.clone();
                async move { client.get_user(r).await }
            })
            .await?;
        response.user.ok_or_else(|| Error::NotFound {
            message: "GetUser answered without a user".to_owned(),
        })
    }

    // ---- MigrationService ----

    /// Links a legacy user to a Clerk user (`LinkUser`).
    pub async fn link_user(&self, user_id: &str, clerk_user_id: &str) -> Result<pb::UserMapping, Error> {
        let request = pb::LinkUserRequest {
            user_id: user_id.to_owned(),
            clerk_user_id: clerk_user_id.to_owned(),
        };
        let response = self
            .unary(Idempotent::No, request, |r| {
                let mut client = self.migration.clone();
                async move { client.link_user(r).await }
            })
            .await?;
        response.mapping.ok_or_else(|| missing("LinkUser", "mapping"))
    }

    /// Removes a user's link to Clerk (`UnlinkUser`); returns the removed mapping.
    pub async fn unlink_user(&self, user_id: &str) -> Result<pb::UserMapping, Error> {
        let request = pb::UnlinkUserRequest {
            user_id: user_id.to_owned(),
        };
        let response = self
            .unary(Idempotent::No, request, |r| {
                let mut client = self.migration.clone();
                async move { client.unlink_user(r).await }
            })
            .await?;
        response.removed.ok_or_else(|| missing("UnlinkUser", "removed"))
    }

    /// Starts a user's migration (`InitiateMigration`): a migration token is mailed.
    pub async fn initiate_migration(
        &self,
        request: pb::InitiateMigrationRequest,
    ) -> Result<pb::InitiateMigrationResponse, Error> {
        self.unary(Idempotent::No, request, |r| {
            let mut client = self.migration.clone();
            async move { client.initiate_migration(r).await }
        })
        .await
    }

    /// Completes a migration with the mailed token and a Clerk session (`CompleteMigration`).
    pub async fn complete_migration(
        &self,
        migration_token: &str,
        clerk_session_token: &str,
    ) -> Result<pb::UserMapping, Error> {
        let request = pb::CompleteMigrationRequest {
            migration_token: migration_token.to_owned(),
            clerk_session_token: clerk_session_token.to_owned(),
        };
        let response = self
            .unary(Idempotent::No, request, |r| {
                let mut client = self.migration.clone();
                async move { client.complete_migration(r).await }
            })
            .await?;
        response.mapping.ok_or_else(|| missing("CompleteMigration", "mapping"))
    }

    /// Starts (or resumes) a bulk migration and streams its progress (`StartBulkMigration`).
    pub async fn start_bulk_migration(
        &self,
        request: pb::StartBulkMigrationRequest,
    ) -> Result<ResponseStream<pb::BulkMigrationProgress>, Error> {
        let mut client = self.migration.clone();
        self.stream(request, |r| async move { client.start_bulk_migration(r).await })
            .await
    }

    /// Starts (or resumes) a reconciliation with Clerk and streams its
    /// progress and drift (`ReconcileMappings`).
    pub async fn reconcile_mappings(
        &self,
        request: pb::ReconcileMappingsRequest,
    ) -> Result<ResponseStream<pb::ReconcileProgress>, Error> {
        let mut client = self.migration.clone();
        self.stream(request, |r| async move { client.reconcile_mappings(r).await })
            .await
    }

    /// Cancels a running bulk migration (`CancelBulkMigration`).
    pub async fn cancel_bulk_migration(&self, job_id: &str) -> Result<pb::CancelBulkMigrationResponse, Error> {
        let request = pb::CancelBulkMigrationRequest {
            job_id: job_id.to_owned(),
        };
        self.unary(Idempotent::Yes, request, |r| {
            let mut client = self.migration.clone();
            async move { client.cancel_bulk_migration(r).await }
        })
        .await
    }

    /// Migration and authentication figures over a window (`GetMigrationStats`).
    pub async fn get_migration_stats(
        &self,
        request: pb::GetMigrationStatsRequest,
    ) -> Result<pb::MigrationStats, Error> {
        let response = self
            .unary(Idempotent::Yes, request, |r| {
                let mut client = self.migration.clone();
                async move { client.get_migration_stats(r).await }
            })
            .await?;
        response.stats.ok_or_else(|| missing("GetMigrationStats", "stats"))
    }

    /// The same figures as a stream of snapshots (`StreamMigrationMetrics`).
    pub async fn stream_migration_metrics(
        &self,
        request: pb::StreamMigrationMetricsRequest,
    ) -> Result<ResponseStream<pb::StreamMigrationMetricsResponse>, Error> {
        let mut client = self.migration.clone();
        self.stream(request, |r| async move { client.stream_migration_metrics(r).await })
            .await
    }

    /// A user's mapping to Clerk (`GetMapping`); none is [`Error::NotFound`].
    pub async fn get_mapping(&self, lookup: pb::get_mapping_request::Lookup) -> Result<pb::UserMapping, Error> {
        let response = self
            .unary(Idempotent::Yes, pb::GetMappingRequest { lookup: Some(lookup) }, |r| {
                let mut client = self.migration.clone();
                async move { client.get_mapping(r).await }
            })
            .await?;
        response.mapping.ok_or_else(|| Error::NotFound {
            message: "no mapping".to_owned(),
        })
    }

    /// The auth mode every replica follows (`GetAuthMode`).
    pub async fn get_auth_mode(&self) -> Result<pb::GetAuthModeResponse, Error> {
        self.unary(Idempotent::Yes, pb::GetAuthModeRequest {}, |r| {
            let mut client = self.migration.clone();
            async move { client.get_auth_mode(r).await }
        })
        .await
    }

    /// Switches the auth mode for every replica (`SetAuthMode`).
    pub async fn set_auth_mode(&self, mode: pb::AuthMode) -> Result<pb::SetAuthModeResponse, Error> {
        let request = pb::SetAuthModeRequest { mode: mode.into() };
        self.unary(Idempotent::No, request, |r| {
            let mut client = self.migration.clone();
            async move { client.set_auth_mode(r).await }
        })
        .await
    }

    /// A page of the audit trail (`ListAuditEvents`).
    pub async fn list_audit_events(
        &self,
        request: pb::ListAuditEventsRequest,
    ) -> Result<pb::ListAuditEventsResponse, Error> {
        self.unary(Idempotent::Yes, request, |r| {
            let mut client = self.migration.clone();
            async move { client.list_audit_events(r).await }
        })
        .await
    }
}

fn missing(rpc: &str, field: &str) -> Error {
    Error::Other {
        code: tonic::Code::Internal,
        message: format!("{rpc} answered without {field}"),
    }
}
