//! HTTP forward-auth (`/forward-auth`, any method) on the HTTP listener, for
//! nginx `auth_request`, Traefik ForwardAuth and Caddy `forward_auth`: the
//! same decision as Envoy's `Check` ([`crate::gateway`]).
//!
//! - reads `Authorization`, and `X-Forwarded-Method`/`-Uri`/`-Host` (logged);
//! - per-route policy from the query string (`?methods=clerk&audience=...`);
//! - 200 with the identity headers, 401 with `WWW-Authenticate`, 503 when
//!   the database or Clerk's keys cannot be reached, 500 on a malformed
//!   policy, 403 when the caller is not an allowed gateway.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};

use crate::{
    domain::{ApiKeyRegistry, Caller, DomainError, Scope, error_chain},
    gateway::{Decision, ForwardAuthAccess, GATEWAY_KEY_HEADER, Gateway, Protocol, RoutePolicy},
};

#[derive(Clone)]
struct ForwardAuth {
    gateway: Gateway,
    access: ForwardAuthAccess,
    keys: Arc<ApiKeyRegistry>,
}

/// The `/forward-auth` route, or nothing when `access` is off.
pub fn router(gateway: Gateway, access: ForwardAuthAccess, keys: Arc<ApiKeyRegistry>) -> axum::Router {
    if access == ForwardAuthAccess::Off {
        return axum::Router::new();
    }
    axum::Router::new()
        .route("/forward-auth", axum::routing::any(handle))
        .with_state(ForwardAuth { gateway, access, keys })
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

impl ForwardAuth {
    /// The gateway calling, by its key in `X-Identity-Gateway-Key`.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, &'static str> {
        if self.keys.is_empty() {
            return Ok(Caller::development());
        }
        let Some(key) = headers.get(GATEWAY_KEY_HEADER) else {
            // By network, a caller without a key is the gateway; one that
            // sends a key must still send a valid one.
            return match self.access {
                ForwardAuthAccess::Network => Ok(Caller::new("forward-auth", vec![Scope::Gateway])),
                _ => Err("missing gateway key: send X-Identity-Gateway-Key"),
            };
        };
        let key = key.to_str().map_err(|_| "malformed X-Identity-Gateway-Key")?;
        self.keys.authenticate(key.trim()).ok_or("unknown gateway key")
    }
}

async fn handle(State(state): State<ForwardAuth>, uri: Uri, headers: HeaderMap) -> Response {
    let caller = match state.caller(&headers) {
        Ok(caller) => caller,
        Err(message) => {
            tracing::warn!(%message, "forward-auth: refused a caller");
            return json(
                StatusCode::FORBIDDEN,
                serde_json::json!({ "error": "gateway_not_allowed", "message": message }).to_string(),
            );
        }
    };
    let policy = RoutePolicy::parse(url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()));
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let decision = state
        .gateway
        .decide(Protocol::ForwardAuth, &caller, authorization, policy)
        .await;
    if tracing::enabled!(tracing::Level::DEBUG) {
        let forwarded = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
        tracing::debug!(
            caller = %caller.name,
            method = forwarded("x-forwarded-method"),
            host = forwarded("x-forwarded-host"),
            path = crate::gateway::without_query(forwarded("x-forwarded-uri")),
            outcome = decision.outcome(),
            "forward-auth decision"
        );
    }
    match decision {
        Decision::Allow(principal) => {
            let identity = state.gateway.identity(principal.as_ref());
            let mut response = StatusCode::OK.into_response();
            for (name, value) in identity.set {
                if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        Decision::Deny(denial) => {
            let mut response = json(StatusCode::UNAUTHORIZED, denial.body);
            if let Ok(value) = HeaderValue::try_from(denial.www_authenticate) {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
            }
            response
        }
        Decision::BadPolicy(message) => {
            tracing::error!(%message, "forward-auth: the route's query parameters are malformed; refusing its requests");
            json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({
                    "error": "bad_route_policy",
                    "message": message,
                })
                .to_string(),
            )
        }
        Decision::Error(err) => error_response(err),
    }
}

/// No decision: 5xx for an outage, 403 for a caller without the `gateway` scope.
fn error_response(err: DomainError) -> Response {
    let (status, message) = match &err {
        DomainError::PermissionDenied(message) => (StatusCode::FORBIDDEN, message.clone()),
        DomainError::Unavailable { message, source } => {
            match source {
                Some(source) => tracing::warn!(error = %error_chain(source.as_ref()), "forward-auth: {message}"),
                None => tracing::warn!("forward-auth: {message}"),
            }
            (StatusCode::SERVICE_UNAVAILABLE, message.clone())
        }
        DomainError::Internal(source) => {
            tracing::error!(error = %error_chain(source.as_ref()), "forward-auth: internal error");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error".to_owned())
        }
        other => (StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    };
    let error = if status == StatusCode::FORBIDDEN {
        "gateway_not_allowed"
    } else {
        "unavailable"
    };
    json(
        status,
        serde_json::json!({ "error": error, "message": message }).to_string(),
    )
}
