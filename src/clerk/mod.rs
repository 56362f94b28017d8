//! Clerk's Backend API (`https://api.clerk.com/v1`), the parts the service
//! uses. Every call carries the secret key as bearer; transient failures
//! (timeouts, 5xx, 429) are retried with backoff.

use std::{sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use governor::DefaultDirectRateLimiter;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::domain::ClerkUserId;

/// Timeout of one Clerk request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClerkApiError {
    /// Without its URL: query strings such as `?email_address=` must not
    /// reach stored failure reasons, audit details or logs.
    #[error("Clerk request failed: {0}")]
    Transport(reqwest::Error),
    #[error("Clerk answered {status}")]
    Status {
        status: reqwest::StatusCode,
        retry_after: Option<Duration>,
    },
    #[error("Clerk's answer could not be read: {0}")]
    Decode(String),
    #[error("Clerk did not answer within {0:?}")]
    Deadline(Duration),
    /// Clerk refused the request as invalid (4xx other than 404/429), with its error code.
    #[error("Clerk refused the request ({status}): {code}")]
    Refused { status: reqwest::StatusCode, code: String },
}

impl From<reqwest::Error> for ClerkApiError {
    fn from(err: reqwest::Error) -> Self {
        Self::Transport(err.without_url())
    }
}

impl ClerkApiError {
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport(_) | Self::Deadline(_) => true,
            Self::Status { status, .. } => {
                status.is_server_error() || *status == reqwest::StatusCode::TOO_MANY_REQUESTS
            }
            Self::Decode(_) | Self::Refused { .. } => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Longest wait honoured from a `Retry-After` header.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
struct Verification {
    #[serde(default)]
    status: Option<String>,
}

#[derive(Debug, Deserialize)]
struct EmailAddress {
    id: String,
    email_address: String,
    #[serde(default)]
    verification: Option<Verification>,
}

/// The fields of a Clerk user the service reads.
#[derive(Debug, Deserialize)]
pub struct ClerkUser {
    pub id: String,
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    primary_email_address_id: Option<String>,
    #[serde(default)]
    email_addresses: Vec<EmailAddress>,
    /// Milliseconds since the epoch, as Clerk sends it.
    #[serde(default)]
    pub updated_at: Option<i64>,
}

impl ClerkUser {
    /// The primary email address, only when Clerk has verified it.
    pub fn verified_primary_email(&self) -> Option<&str> {
        let primary = self.primary_email_address_id.as_deref()?;
        self.email_addresses
            .iter()
            .find(|e| e.id == primary)
            .filter(|e| e.verification.as_ref().and_then(|v| v.status.as_deref()) == Some("verified"))
            .map(|e| e.email_address.as_str())
    }
}

/// A user to create in Clerk (`POST /v1/users`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewClerkUser {
    pub external_id: String,
    pub email_address: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_hasher: Option<String>,
    /// Without a password digest the user signs in another way (or resets).
    pub skip_password_requirement: bool,
    /// The digest is the user's existing password; Clerk must not re-check its strength.
    pub skip_password_checks: bool,
}

#[derive(Debug, Deserialize)]
struct ClerkErrors {
    #[serde(default)]
    errors: Vec<ClerkErrorItem>,
}

#[derive(Debug, Deserialize)]
struct ClerkErrorItem {
    #[serde(default)]
    code: String,
}

/// `GET /v1/users` answers with an array (older API versions wrap it in `data`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum UserList {
    Plain(Vec<ClerkUser>),
    Wrapped { data: Vec<ClerkUser> },
}

#[derive(Clone)]
pub struct ClerkApi {
    http: reqwest::Client,
    base: url::Url,
    secret: SecretString,
    /// Paces every request (bulk jobs), retries included.
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    budget: RetryBudget,
}

/// How long a Clerk call may keep trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RetryBudget {
    /// Jobs in the background: six retries, honouring `Retry-After` up to a minute.
    Background,
    /// A caller waits on the answer (VerifyToken's unmapped policy): one
    /// quick retry, no long `Retry-After`, and a deadline for the whole call.
    Interactive,
}

/// The longest a call on a caller's behalf takes, retries included.
pub const INTERACTIVE_DEADLINE: Duration = Duration::from_secs(8);

impl std::fmt::Debug for ClerkApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClerkApi").field("base", &self.base.as_str()).finish()
    }
}

/// The HTTP client for Clerk: rustls, timeouts, no redirects to elsewhere.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(3))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("identity/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

impl ClerkApi {
    pub fn new(http: reqwest::Client, base: url::Url, secret: SecretString) -> Self {
        Self {
            http,
            base,
            secret,
            limiter: None,
            budget: RetryBudget::Background,
        }
    }

    /// The same client for calls a caller waits on: see `RetryBudget::Interactive`.
    pub fn interactive(&self) -> Self {
        Self {
            budget: RetryBudget::Interactive,
            ..self.clone()
        }
    }

    /// The same client, pacing its requests with `limiter`.
    pub fn paced(&self, limiter: Arc<DefaultDirectRateLimiter>) -> Self {
        Self {
            limiter: Some(limiter),
            ..self.clone()
        }
    }

    fn url(&self, path: &str) -> Result<url::Url, ClerkApiError> {
        self.base.join(path).map_err(|e| ClerkApiError::Decode(e.to_string()))
    }

    /// Sends a request (rebuilt per attempt), pacing and retrying transient
    /// failures; a 429 waits for its `Retry-After`.
    async fn call<T, F, Fut>(&self, attempt: F) -> Result<T, ClerkApiError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClerkApiError>>,
    {
        let paced = || async {
            if let Some(limiter) = &self.limiter {
                limiter.until_ready().await;
            }
            attempt().await
        };
        match self.budget {
            RetryBudget::Background => {
                paced
                    .retry(
                        ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(200))
                            .with_max_delay(Duration::from_secs(10))
                            .with_max_times(6),
                    )
                    .when(ClerkApiError::is_transient)
                    .adjust(|err, delay| err.retry_after().map(|d| d.min(MAX_RETRY_AFTER)).or(delay))
                    .await
            }
            RetryBudget::Interactive => {
                let retried = paced
                    .retry(
                        ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(200))
                            .with_max_delay(Duration::from_secs(1))
                            .with_max_times(1),
                    )
                    // A long Retry-After is not worth a caller's wait.
                    .when(|err| err.is_transient() && err.retry_after().is_none_or(|d| d <= Duration::from_secs(1)));
                tokio::time::timeout(INTERACTIVE_DEADLINE, retried)
                    .await
                    .unwrap_or(Err(ClerkApiError::Deadline(INTERACTIVE_DEADLINE)))
            }
        }
    }

    /// Reads an error response into the error it means.
    async fn error_from(response: reqwest::Response) -> ClerkApiError {
        let status = response.status();
        let retry_after = retry_after(&response);
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return ClerkApiError::Status { status, retry_after };
        }
        let code = response
            .json::<ClerkErrors>()
            .await
            .ok()
            .and_then(|e| e.errors.into_iter().next().map(|e| e.code))
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "unknown".to_owned());
        ClerkApiError::Refused { status, code }
    }

    /// `GET /v1/users?<key>=<value>`: users with that external id or email address.
    pub async fn find_users(&self, key: &str, value: &str) -> Result<Vec<ClerkUser>, ClerkApiError> {
        let mut url = self.url("v1/users")?;
        url.query_pairs_mut().append_pair(key, value);
        self.call(|| async {
            let response = self
                .http
                .get(url.clone())
                .bearer_auth(self.secret.expose_secret())
                .send()
                .await?;
            if !response.status().is_success() {
                return Err(Self::error_from(response).await);
            }
            match response
                .json::<UserList>()
                .await
                .map_err(|e| ClerkApiError::Decode(e.to_string()))?
            {
                UserList::Plain(users) | UserList::Wrapped { data: users } => Ok(users),
            }
        })
        .await
    }

    /// `GET /v1/users?limit=&offset=&order_by=+created_at`: one page of every user.
    pub async fn list_users(&self, limit: u32, offset: u64) -> Result<Vec<ClerkUser>, ClerkApiError> {
        let mut url = self.url("v1/users")?;
        url.query_pairs_mut()
            .append_pair("limit", &limit.to_string())
            .append_pair("offset", &offset.to_string())
            .append_pair("order_by", "+created_at");
        self.get_list(url).await
    }

    /// `GET /v1/users?user_id=...`: which of these users exist.
    pub async fn users_by_ids(&self, ids: &[&str]) -> Result<Vec<ClerkUser>, ClerkApiError> {
        let mut url = self.url("v1/users")?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("limit", &ids.len().clamp(1, 500).to_string());
            for id in ids {
                query.append_pair("user_id", id);
            }
        }
        self.get_list(url).await
    }

    async fn get_list(&self, url: url::Url) -> Result<Vec<ClerkUser>, ClerkApiError> {
        self.call(|| async {
            let response = self
                .http
                .get(url.clone())
                .bearer_auth(self.secret.expose_secret())
                .send()
                .await?;
            if !response.status().is_success() {
                return Err(Self::error_from(response).await);
            }
            match response
                .json::<UserList>()
                .await
                .map_err(|e| ClerkApiError::Decode(e.to_string()))?
            {
                UserList::Plain(users) | UserList::Wrapped { data: users } => Ok(users),
            }
        })
        .await
    }

    /// `POST /v1/users`.
    pub async fn create_user(&self, user: &NewClerkUser) -> Result<ClerkUser, ClerkApiError> {
        let url = self.url("v1/users")?;
        self.call(|| async {
            let response = self
                .http
                .post(url.clone())
                .bearer_auth(self.secret.expose_secret())
                .json(user)
                .send()
                .await?;
            if !response.status().is_success() {
                return Err(Self::error_from(response).await);
            }
            response
                .json::<ClerkUser>()
                .await
                .map_err(|e| ClerkApiError::Decode(e.to_string()))
        })
        .await
    }

    /// `PATCH /v1/users/{id}` setting `external_id`.
    /// `PATCH /v1/users/{id}` setting (or, with `None`, clearing) `external_id`.
    pub async fn set_external_id(&self, id: &str, external_id: Option<&str>) -> Result<(), ClerkApiError> {
        let url = self.url(&format!("v1/users/{id}"))?;
        let body = serde_json::json!({ "external_id": external_id });
        self.call(|| async {
            let response = self
                .http
                .patch(url.clone())
                .bearer_auth(self.secret.expose_secret())
                .json(&body)
                .send()
                .await?;
            if !response.status().is_success() {
                return Err(Self::error_from(response).await);
            }
            Ok(())
        })
        .await
    }

    /// `GET /v1/users/{id}`; `None` when Clerk does not know the user.
    pub async fn get_user(&self, id: &ClerkUserId) -> Result<Option<ClerkUser>, ClerkApiError> {
        let url = self.url(&format!("v1/users/{}", id.as_str()))?;
        self.call(|| async {
            let response = self
                .http
                .get(url.clone())
                .bearer_auth(self.secret.expose_secret())
                .send()
                .await?;
            if response.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !response.status().is_success() {
                return Err(Self::error_from(response).await);
            }
            response
                .json::<ClerkUser>()
                .await
                .map(Some)
                .map_err(|e| ClerkApiError::Decode(e.to_string()))
        })
        .await
    }
}
