//! Clerk's Backend API (`https://api.clerk.com/v1`), the parts the service
//! uses. Every call carries the secret key as bearer; transient failures
//! (timeouts, 5xx, 429) are retried with backoff.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::domain::ClerkUserId;

/// Timeout of one Clerk request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClerkApiError {
    #[error("Clerk request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("Clerk answered {status}")]
    Status {
        status: reqwest::StatusCode,
        retry_after: Option<Duration>,
    },
    #[error("Clerk's answer could not be read: {0}")]
    Decode(String),
}

impl ClerkApiError {
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Status { status, .. } => {
                status.is_server_error() || *status == reqwest::StatusCode::TOO_MANY_REQUESTS
            }
            Self::Decode(_) => false,
        }
    }
}

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

#[derive(Clone)]
pub struct ClerkApi {
    http: reqwest::Client,
    base: url::Url,
    secret: SecretString,
}

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
        Self { http, base, secret }
    }

    /// `GET /v1/users/{id}`; `None` when Clerk does not know the user.
    pub async fn get_user(&self, id: &ClerkUserId) -> Result<Option<ClerkUser>, ClerkApiError> {
        let url = self
            .base
            .join(&format!("v1/users/{}", id.as_str()))
            .map_err(|e| ClerkApiError::Decode(e.to_string()))?;
        let call = || async {
            let response = self
                .http
                .get(url.clone())
                .bearer_auth(self.secret.expose_secret())
                .send()
                .await?;
            let status = response.status();
            if status == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(ClerkApiError::Status {
                    status,
                    retry_after: retry_after(&response),
                });
            }
            response
                .json::<ClerkUser>()
                .await
                .map(Some)
                .map_err(|e| ClerkApiError::Decode(e.to_string()))
        };
        call.retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_times(3),
        )
        .when(ClerkApiError::is_transient)
        .await
    }
}
