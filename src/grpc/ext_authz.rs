//! Envoy external authorization (`envoy.service.auth.v3.Authorization/Check`)
//! on the service's gRPC port, for Envoy and what embeds it (Istio, Contour,
//! Emissary, Gloo). The caller is authenticated like any other: Envoy sends
//! an API key with the `gateway` scope as `grpc_service.initial_metadata`.
//!
//! - allowed: OK, the identity headers set with `OverwriteIfExistsOrAdd`
//!   (in `value`: Envoy 1.40 forwards a header given only in `raw_value` as
//!   empty) and every identity header not set listed in `headers_to_remove`
//!   (never one that is set: Envoy applies the removals after the additions);
//! - refused: a `DeniedHttpResponse`, 401 with `WWW-Authenticate` and a JSON body;
//! - no decision (an outage): an RPC error, so Envoy's `failure_mode_allow`
//!   and `status_on_error` decide.

use std::borrow::Cow;

use envoy_types::{
    ext_authz::v3::pb::{
        Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue,
        HeaderValueOption, HttpResponse, HttpStatus, HttpStatusCode, OkHttpResponse,
    },
    pb::{envoy::service::auth::v3::attribute_context::HttpRequest, google::rpc},
};
use tonic::{Code, Request, Response, Status};

use super::{caller, to_status};
use crate::gateway::{Decision, Denial, Gateway, Protocol, RoutePolicy};

#[derive(Debug, Clone)]
pub struct ExtAuthzApi {
    gateway: Gateway,
}

impl ExtAuthzApi {
    pub fn new(gateway: Gateway) -> Self {
        Self { gateway }
    }
}

/// The `authorization` header of the proxied request, from whichever
/// encoding Envoy used: the `headers` map, or `header_map` (with `raw_value`
/// when `encode_raw_headers: true`).
fn authorization(http: &HttpRequest) -> Option<Cow<'_, str>> {
    if let Some(value) = http.headers.get("authorization") {
        return Some(Cow::Borrowed(value));
    }
    let header = http
        .header_map
        .as_ref()?
        .headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case("authorization"))?;
    if header.raw_value.is_empty() {
        Some(Cow::Borrowed(&header.value))
    } else {
        Some(String::from_utf8_lossy(&header.raw_value))
    }
}

fn header(key: &str, value: String) -> HeaderValueOption {
    #[allow(deprecated)]
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            raw_value: Vec::new(),
        }),
        append: None,
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        keep_empty_value: false,
    }
}

fn rpc_status(code: Code, message: impl Into<String>) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: code as i32,
        message: message.into(),
        details: Vec::new(),
    })
}

fn denied(code: Code, http: HttpStatusCode, headers: Vec<HeaderValueOption>, body: String) -> CheckResponse {
    CheckResponse {
        // Not a bare UNAUTHENTICATED: Envoy would answer it with a 403.
        status: rpc_status(code, ""),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: http.into() }),
            headers,
            body,
        })),
        dynamic_metadata: None,
    }
}

impl ExtAuthzApi {
    fn allowed(&self, principal: Option<&crate::verification::Principal>) -> CheckResponse {
        let identity = self.gateway.identity(principal);
        let headers = identity
            .set
            .into_iter()
            .map(|(name, value)| header(name, value))
            .collect();
        let mut headers_to_remove: Vec<String> = identity.unset.into_iter().map(str::to_owned).collect();
        if self.gateway.remove_authorization() {
            headers_to_remove.push("authorization".to_owned());
        }
        #[allow(deprecated)]
        let ok = OkHttpResponse {
            headers,
            headers_to_remove,
            ..Default::default()
        };
        CheckResponse {
            status: rpc_status(Code::Ok, ""),
            http_response: Some(HttpResponse::OkResponse(ok)),
            dynamic_metadata: None,
        }
    }

    fn refused(denial: Denial) -> CheckResponse {
        denied(
            Code::Unauthenticated,
            HttpStatusCode::Unauthorized,
            vec![
                header("www-authenticate", denial.www_authenticate),
                header("content-type", "application/json".to_owned()),
            ],
            denial.body,
        )
    }

    fn bad_policy(message: String) -> CheckResponse {
        tracing::error!(%message, "ext_authz: the route's context_extensions are malformed; refusing its requests");
        denied(
            Code::InvalidArgument,
            HttpStatusCode::InternalServerError,
            vec![header("content-type", "application/json".to_owned())],
            serde_json::json!({
                "error": "bad_route_policy",
                "message": "the gateway's route configuration is invalid",
            })
            .to_string(),
        )
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthzApi {
    #[tracing::instrument(name = "Authorization/Check", level = "debug", skip_all)]
    async fn check(&self, mut request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let caller = caller(&mut request)?;
        let body = request.into_inner();
        let attributes = body.attributes.unwrap_or_default();
        let http = attributes.request.as_ref().and_then(|r| r.http.as_ref());
        let authorization = http.and_then(authorization);
        let policy = RoutePolicy::parse(&attributes.context_extensions);
        let decision = self
            .gateway
            .decide(Protocol::ExtAuthz, &caller, authorization.as_deref(), policy)
            .await;
        let outcome = decision.outcome();
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                caller = %caller.name,
                method = http.map(|h| h.method.as_str()),
                host = http.map(|h| h.host.as_str()),
                path = http.map(|h| crate::gateway::without_query(&h.path)),
                outcome,
                "ext_authz decision"
            );
        }
        let answer = match decision {
            Decision::Allow(principal) => self.allowed(principal.as_ref()),
            Decision::Deny(denial) => Self::refused(denial),
            Decision::BadPolicy(message) => Self::bad_policy(message),
            Decision::Error(err) => return Err(to_status(err)),
        };
        let mut response = Response::new(answer);
        if !tracing::Span::current().is_none() {
            response.extensions_mut().insert(crate::telemetry::Outcome(outcome));
        }
        Ok(response)
    }
}
