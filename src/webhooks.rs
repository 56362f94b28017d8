//! Clerk's webhooks: `POST /webhooks/clerk` on the HTTP listener
//! (`IDENTITY_METRICS_ADDR`), enabled by `IDENTITY_CLERK_WEBHOOK_SECRET`.
//!
//! Clerk delivers through Svix: `svix-id`, `svix-timestamp` and
//! `svix-signature` (one or more `v1,<base64>`), an HMAC-SHA256 over
//! `{id}.{timestamp}.{body}`. The `standardwebhooks` crate checks it (the
//! same scheme under `webhook-*` names, as Clerk's own SDK maps them), with
//! a tolerance of ±5 minutes, against each configured secret in turn.
//!
//! A verified event is recorded by its `svix-id` and applied in one
//! transaction (see `storage::ClerkEvent`), then answered 2xx; a failure on
//! our side is answered 5xx, so Svix delivers it again later. A body over
//! [`MAX_BODY_BYTES`] is refused before it is read whole.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, State,
        rejection::{BytesRejection, FailedToBufferBody},
    },
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::{
    clerk::ClerkUser,
    config::{ClerkWebhookConfig, UnmappedPolicy},
    domain::{ClerkUserId, Email},
    storage::{ClerkChange, ClerkEvent, ClerkEventOutcome, DELETED_VERSION, Storage, StorageError},
    verification::Verifier,
};

/// Where Clerk delivers.
pub const PATH: &str = "/webhooks/clerk";

/// The largest body accepted (Clerk's user payloads are a few KiB).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// How long an ended session or a deleted user is refused: longer than any
/// Clerk session token lives (60 s by default, configurable in Clerk's
/// dashboard), so that no token issued before the event verifies after it.
pub const REFUSAL: Duration = Duration::from_secs(24 * 3600);

/// The answer comes well within Svix's 15 s; past this the delivery is
/// answered 503 and retried.
const DEADLINE: Duration = Duration::from_secs(10);

/// Who the audit log names for webhook changes.
pub const CALLER: &str = "clerk-webhook";

/// The longest `svix-id` accepted.
const MAX_ID_LEN: usize = 256;

/// Rows one statement of the retention purge deletes at most: each batch is
/// a short transaction of its own, so deliveries are never held up long.
pub const PURGE_BATCH: u32 = 500;

/// Event types the service acts on.
const KNOWN_TYPES: &[&str] = &[
    "user.created",
    "user.updated",
    "user.deleted",
    "session.revoked",
    "session.ended",
    "session.removed",
];

/// A webhook body, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEvent {
    pub event_type: String,
    /// The event's `timestamp` (milliseconds), when it has one.
    pub timestamp_ms: Option<i64>,
    pub payload: Payload,
}

/// What an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    User {
        clerk_user_id: ClerkUserId,
        external_id: Option<String>,
        verified_email: Option<Email>,
        /// `data.updated_at`, milliseconds.
        updated_at: Option<i64>,
    },
    UserDeleted {
        clerk_user_id: ClerkUserId,
    },
    SessionEnded {
        session_id: String,
    },
    /// A type this service does not act on.
    Other,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Identified {
    id: String,
}

/// A JSON error without the values serde quotes in it (`invalid type:
/// string "…"`): a missing field by name, anything else by kind and place.
fn without_values(err: &serde_json::Error) -> String {
    let text = err.to_string();
    if text.starts_with("missing field") {
        return text;
    }
    let kind = match err.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "malformed JSON",
        serde_json::error::Category::Data => "unexpected value",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    match (err.line(), err.column()) {
        (0, _) => kind.to_owned(),
        (line, column) => format!("{kind} at line {line}, column {column}"),
    }
}

/// An event's `data` as the type its event type names (read in place).
fn read_data<T: serde::de::DeserializeOwned>(event_type: &str, data: Option<&serde_json::Value>) -> Result<T, String> {
    let data = data.ok_or_else(|| format!("{event_type} has no data"))?;
    T::deserialize(data).map_err(|e| format!("{event_type}: {}", without_values(&e)))
}

/// Reads a webhook body; the error says what is wrong with it (never echoing it).
pub fn parse_event(body: &[u8]) -> Result<ParsedEvent, String> {
    let envelope: Envelope =
        serde_json::from_slice(body).map_err(|e| format!("not a Clerk event: {}", without_values(&e)))?;
    let event_type = envelope.event_type;
    if event_type.is_empty() || event_type.len() > 100 {
        return Err("the event type is empty or too long".into());
    }
    let data = envelope.data.as_ref();
    let clerk_id =
        |raw: &str| ClerkUserId::parse("data.id", raw).map_err(|_| "data.id is not a Clerk user id".to_owned());
    let payload = match event_type.as_str() {
        "user.created" | "user.updated" => {
            let user: ClerkUser = read_data(&event_type, data)?;
            Payload::User {
                clerk_user_id: clerk_id(&user.id)?,
                external_id: user.external_id.clone().filter(|e| !e.trim().is_empty()),
                verified_email: user
                    .verified_primary_email()
                    .and_then(|e| Email::parse("email", e).ok()),
                updated_at: user.updated_at,
            }
        }
        "user.deleted" => {
            let user: Identified = read_data(&event_type, data)?;
            Payload::UserDeleted {
                clerk_user_id: clerk_id(&user.id)?,
            }
        }
        "session.revoked" | "session.ended" | "session.removed" => {
            let session: Identified = read_data(&event_type, data)?;
            let id = session.id.trim();
            if id.is_empty() || id.len() > MAX_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("data.id is not a session id".into());
            }
            Payload::SessionEnded {
                session_id: id.to_owned(),
            }
        }
        _ => Payload::Other,
    };
    Ok(ParsedEvent {
        event_type,
        timestamp_ms: envelope.timestamp,
        payload,
    })
}

/// How far `svix-timestamp` may be from the clock (Standard Webhooks' tolerance).
const TIMESTAMP_TOLERANCE_SECONDS: u64 = 5 * 60;

/// Why a delivery was refused before anything was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    MissingHeaders,
    BadSignature,
    StaleTimestamp,
    Malformed,
    TooLarge,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Self::MissingHeaders => "missing_headers",
            Self::BadSignature => "bad_signature",
            Self::StaleTimestamp => "stale_timestamp",
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::BadSignature | Self::StaleTimestamp => StatusCode::UNAUTHORIZED,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MissingHeaders | Self::Malformed => StatusCode::BAD_REQUEST,
        }
    }

    fn respond(self) -> Response {
        ::metrics::counter!("identity_webhook_rejections_total", "reason" => self.reason()).increment(1);
        if matches!(self, Self::BadSignature | Self::StaleTimestamp) {
            ::metrics::counter!("identity_webhook_signature_failures_total").increment(1);
        }
        tracing::warn!(reason = self.reason(), "Clerk webhook refused");
        (self.status(), self.reason()).into_response()
    }
}

struct Inner {
    secrets: Vec<standardwebhooks::Webhook>,
    storage: Arc<dyn Storage>,
    verifier: Verifier,
    policy: UnmappedPolicy,
}

/// The webhook endpoint's state.
#[derive(Clone)]
pub struct ClerkWebhooks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClerkWebhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClerkWebhooks")
            .field("secrets", &self.inner.secrets.len())
            .finish()
    }
}

impl ClerkWebhooks {
    /// `policy` is what `user.created` does for a Clerk user no mapping or
    /// `external_id` names (the verifier's `IDENTITY_UNMAPPED_CLERK_USER`).
    pub fn new(
        config: &ClerkWebhookConfig,
        storage: Arc<dyn Storage>,
        verifier: Verifier,
        policy: UnmappedPolicy,
    ) -> Result<Self, String> {
        let secrets = config
            .secrets
            .iter()
            .enumerate()
            .map(|(n, s)| {
                standardwebhooks::Webhook::new(s.expose_secret())
                    .map_err(|_| format!("secret {} is not a signing secret", n + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                secrets,
                storage,
                verifier,
                policy,
            }),
        })
    }

    /// `POST /webhooks/clerk`.
    pub fn router(self) -> Router {
        Router::new()
            .route(PATH, post(receive))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self)
    }

    /// Checks the signature against every configured secret; any one is enough.
    fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<String, Refusal> {
        let mut mapped = HeaderMap::new();
        for (svix, standard) in [
            ("svix-id", standardwebhooks::HEADER_WEBHOOK_ID),
            ("svix-timestamp", standardwebhooks::HEADER_WEBHOOK_TIMESTAMP),
            ("svix-signature", standardwebhooks::HEADER_WEBHOOK_SIGNATURE),
        ] {
            let value: &HeaderValue = headers.get(svix).ok_or(Refusal::MissingHeaders)?;
            mapped.insert(standard, value.clone());
        }
        let id = headers
            .get("svix-id")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|id| !id.is_empty() && id.len() <= MAX_ID_LEN)
            .ok_or(Refusal::MissingHeaders)?
            .to_owned();
        // standardwebhooks subtracts the timestamp from the clock unchecked
        // (`svix-timestamp: -9223372036854775808` overflows it): a timestamp
        // outside its tolerance is refused here, as it would refuse it.
        let timestamp = mapped
            .get(standardwebhooks::HEADER_WEBHOOK_TIMESTAMP)
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.parse::<i64>().ok());
        if timestamp.is_some_and(|ts| Utc::now().timestamp().abs_diff(ts) > TIMESTAMP_TOLERANCE_SECONDS) {
            return Err(Refusal::StaleTimestamp);
        }
        let mut refusal = Refusal::BadSignature;
        for secret in &self.inner.secrets {
            match secret.verify(body, &mapped) {
                Ok(()) => return Ok(id),
                Err(
                    standardwebhooks::WebhookError::TimestampTooOldError
                    | standardwebhooks::WebhookError::FutureTimestampError,
                ) => refusal = Refusal::StaleTimestamp,
                Err(
                    standardwebhooks::WebhookError::InvalidTimestamp
                    | standardwebhooks::WebhookError::InvalidHeader(_)
                    | standardwebhooks::WebhookError::MissingHeader(_),
                ) => return Err(Refusal::MissingHeaders),
                Err(_) => {}
            }
        }
        Err(refusal)
    }

    async fn handle(&self, headers: &HeaderMap, body: &[u8]) -> Response {
        let id = match self.verify(headers, body) {
            Ok(id) => id,
            Err(refusal) => return refusal.respond(),
        };
        let parsed = match parse_event(body) {
            Ok(parsed) => parsed,
            Err(why) => {
                tracing::warn!(svix_id = %id, error = %why, "a signed Clerk webhook could not be read");
                return Refusal::Malformed.respond();
            }
        };
        let type_label = if KNOWN_TYPES.contains(&parsed.event_type.as_str()) {
            parsed.event_type.clone()
        } else {
            "other".to_owned()
        };
        let now = Utc::now();
        let occurred_at = parsed.timestamp_ms.and_then(DateTime::from_timestamp_millis);
        if let Some(at) = occurred_at {
            ::metrics::histogram!("identity_webhook_lag_seconds")
                .record((now - at).num_milliseconds().max(0) as f64 / 1000.0);
        }
        let event = self.event(id, parsed, occurred_at, now);
        let applied = tokio::time::timeout(DEADLINE, self.inner.storage.apply_clerk_event(&event)).await;
        let result = match applied {
            Ok(Ok(result)) => result,
            Ok(Err(err)) => {
                let status = match err {
                    StorageError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                ::metrics::counter!("identity_webhook_events_total", "type" => type_label, "outcome" => "failed")
                    .increment(1);
                tracing::error!(svix_id = %event.id, error = %crate::domain::error_chain(&err), "cannot record a Clerk webhook; Svix will deliver it again");
                return (status, "not recorded; retry later").into_response();
            }
            Err(_) => {
                ::metrics::counter!("identity_webhook_events_total", "type" => type_label, "outcome" => "failed")
                    .increment(1);
                tracing::error!(svix_id = %event.id, "recording a Clerk webhook took too long; Svix will deliver it again");
                return (StatusCode::SERVICE_UNAVAILABLE, "not recorded; retry later").into_response();
            }
        };
        // What this replica holds changes at once; the others read the
        // refusal within their revocation reload interval.
        if let Some(revocation) = &result.revocation {
            self.inner.verifier.apply_revocation(revocation);
        }
        let users = self.inner.verifier.users();
        for user in &result.users {
            users.invalidate(*user, None).await;
        }
        for clerk_user_id in &result.clerk_user_ids {
            users.forget_clerk(clerk_user_id).await;
        }
        if result.outcome == ClerkEventOutcome::Duplicate {
            ::metrics::counter!("identity_webhook_duplicates_total").increment(1);
        }
        ::metrics::counter!("identity_webhook_events_total", "type" => type_label, "outcome" => result.outcome.as_str())
            .increment(1);
        tracing::info!(svix_id = %event.id, event_type = %event.event_type, outcome = result.outcome.as_str(), "Clerk webhook processed");
        (StatusCode::OK, result.outcome.as_str()).into_response()
    }

    fn event(
        &self,
        id: String,
        parsed: ParsedEvent,
        occurred_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> ClerkEvent {
        let refuse_until = now + chrono::Duration::from_std(REFUSAL).unwrap_or_else(|_| chrono::Duration::days(1));
        let (version, change) = match parsed.payload {
            Payload::User {
                clerk_user_id,
                external_id,
                verified_email,
                updated_at,
            } => (
                updated_at,
                ClerkChange::User {
                    clerk_user_id,
                    external_id,
                    verified_email,
                    unmapped: self.inner.policy,
                },
            ),
            Payload::UserDeleted { clerk_user_id } => (
                Some(DELETED_VERSION),
                ClerkChange::UserDeleted {
                    clerk_user_id,
                    refuse_until,
                },
            ),
            Payload::SessionEnded { session_id } => (
                None,
                ClerkChange::SessionEnded {
                    session_id,
                    refuse_until,
                },
            ),
            Payload::Other => (None, ClerkChange::Ignored),
        };
        ClerkEvent {
            id,
            event_type: parsed.event_type,
            occurred_at,
            version,
            change,
            caller: CALLER.to_owned(),
        }
    }
}

/// The retention purge: deletes the recorded deliveries (and
/// reconciliation repairs) received before `before`, in batches of `batch`
/// rows, except each Clerk object's newest version, which orders later
/// events; returns how many went. A delivery Svix retries within the
/// retention is still found and answered as a duplicate.
pub async fn purge_events(storage: &dyn Storage, before: DateTime<Utc>, batch: u32) -> Result<u64, StorageError> {
    let batch = batch.max(1);
    let mut purged = 0;
    loop {
        let deleted = storage.purge_clerk_events(before, batch).await?;
        purged += deleted;
        if deleted < u64::from(batch) {
            return Ok(purged);
        }
        // Lets waiting writers (SQLite has one at a time) in between batches.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn receive(
    State(hooks): State<ClerkWebhooks>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match body {
        Ok(body) => hooks.handle(&headers, &body).await,
        // Over the limit: refused by its Content-Length, or as soon as the
        // stream passes the limit, never read whole.
        Err(BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_))) => Refusal::TooLarge.respond(),
        Err(_) => Refusal::Malformed.respond(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_by_type() {
        let created = br#"{"type":"user.created","timestamp":1700000000000,"object":"event","data":{
            "id":"user_abc","external_id":"7a2d3c0f-9b54-4a1f-8e68-1d903c2b3e55","updated_at":1700000000001,
            "primary_email_address_id":"idn_1",
            "email_addresses":[{"id":"idn_1","email_address":"Ann@Example.com","verification":{"status":"verified"}}]}}"#;
        let parsed = parse_event(created).unwrap();
        assert_eq!(parsed.timestamp_ms, Some(1_700_000_000_000));
        match parsed.payload {
            Payload::User {
                clerk_user_id,
                external_id,
                verified_email,
                updated_at,
            } => {
                assert_eq!(clerk_user_id.as_str(), "user_abc");
                assert_eq!(external_id.as_deref(), Some("7a2d3c0f-9b54-4a1f-8e68-1d903c2b3e55"));
                assert_eq!(verified_email.unwrap().as_str(), "Ann@Example.com");
                assert_eq!(updated_at, Some(1_700_000_000_001));
            }
            other => panic!("{other:?}"),
        }
        let deleted = parse_event(br#"{"type":"user.deleted","data":{"id":"user_abc","deleted":true}}"#).unwrap();
        assert!(matches!(deleted.payload, Payload::UserDeleted { .. }));
        let session =
            parse_event(br#"{"type":"session.revoked","data":{"id":"sess_1","user_id":"user_abc"}}"#).unwrap();
        assert_eq!(
            session.payload,
            Payload::SessionEnded {
                session_id: "sess_1".into()
            }
        );
        assert_eq!(
            parse_event(br#"{"type":"organization.created","data":{}}"#)
                .unwrap()
                .payload,
            Payload::Other
        );
        for bad in [
            &b"not json"[..],
            br#"{"data":{}}"#,
            br#"{"type":"user.created"}"#,
            br#"{"type":"user.created","data":{"id":"nope"}}"#,
            br#"{"type":"user.deleted","data":{}}"#,
            br#"{"type":"session.ended","data":{"id":" "}}"#,
            br#"{"type":"","data":{}}"#,
        ] {
            assert!(parse_event(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn errors_name_what_is_wrong_without_quoting_the_body() {
        for (body, expected) in [
            (
                &br#"{"type":"user.created","data":{"id":"secret-value-1","email_addresses":"secret-value-2"}}"#[..],
                "user.created: unexpected value",
            ),
            (
                br#"{"type":"secret-value-3"#,
                "not a Clerk event: truncated JSON at line 1, column 23",
            ),
            (
                br#"{"type":["secret-value-4"]}"#,
                "not a Clerk event: unexpected value at line 1, column 8",
            ),
            (
                br#"{"data":{}}"#,
                "not a Clerk event: missing field `type` at line 1 column 11",
            ),
        ] {
            let err = parse_event(body).err().unwrap_or_default();
            assert_eq!(err, expected, "{}", String::from_utf8_lossy(body));
            assert!(!err.contains("secret-value"), "{err}");
        }
    }
}
