//! Middleware: a `tower::Layer` that verifies `Authorization: Bearer` with
//! the service and hands the [`Principal`] to the handler.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderMap, HeaderValue, StatusCode, header};
use tower_layer::Layer;
use tower_service::Service;

use crate::{client::IdentityClient, error::Error, pb::AuthMethod, principal::Principal};

/// How denials are written: HTTP statuses or gRPC statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    Http,
    Grpc,
}

struct Policy {
    client: IdentityClient,
    style: Style,
    audience: String,
    methods: Option<Vec<AuthMethod>>,
    optional: bool,
}

/// A `tower::Layer` that authenticates every request with `VerifyToken`.
///
/// It reads `Authorization: Bearer <token>`, verifies the token through the
/// [`IdentityClient`] (and its cache, if on) and inserts the [`Principal`]
/// into the request extensions before calling the inner service.
///
/// | outcome | [`http`](Self::http) | [`grpc`](Self::grpc) |
/// |---|---|---|
/// | no token (unless [`optional`](Self::optional)), rejected token, method not allowed | 401 with `WWW-Authenticate: Bearer error="invalid_token"` | UNAUTHENTICATED |
/// | the service is down or slow | 503 | UNAVAILABLE |
/// | this client's API key is refused or lacks the scope | 500 (logged) | INTERNAL |
///
/// A request is never let through on an error.
#[derive(Clone)]
pub struct AuthLayer {
    policy: Arc<Policy>,
}

impl fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer")
            .field("style", &self.policy.style)
            .field("audience", &self.policy.audience)
            .field("methods", &self.policy.methods)
            .field("optional", &self.policy.optional)
            .finish_non_exhaustive()
    }
}

impl AuthLayer {
    fn new(client: IdentityClient, style: Style) -> Self {
        Self {
            policy: Arc::new(Policy {
                client,
                style,
                audience: String::new(),
                methods: None,
                optional: false,
            }),
        }
    }

    /// For HTTP servers (axum, hyper): denials are 401 or 503 responses.
    pub fn http(client: IdentityClient) -> Self {
        Self::new(client, Style::Http)
    }

    /// For gRPC servers (tonic's `Server::builder().layer(...)`): denials are
    /// UNAUTHENTICATED or UNAVAILABLE statuses.
    pub fn grpc(client: IdentityClient) -> Self {
        Self::new(client, Style::Grpc)
    }

    fn edit(mut self, f: impl FnOnce(&mut Policy)) -> Self {
        match Arc::get_mut(&mut self.policy) {
            Some(policy) => f(policy),
            None => {
                let p = &self.policy;
                let mut policy = Policy {
                    client: p.client.clone(),
                    style: p.style,
                    audience: p.audience.clone(),
                    methods: p.methods.clone(),
                    optional: p.optional,
                };
                f(&mut policy);
                self.policy = Arc::new(policy);
            }
        }
        self
    }

    /// Tokens must be meant for this audience (`aud`); others get 401.
    pub fn audience(self, audience: impl Into<String>) -> Self {
        let audience = audience.into();
        self.edit(|p| p.audience = audience)
    }

    /// Only these authentication methods are let through (default: any the
    /// service accepts); a token of another method gets 401.
    pub fn allow_methods(self, methods: impl IntoIterator<Item = AuthMethod>) -> Self {
        let methods = methods.into_iter().collect();
        self.edit(|p| p.methods = Some(methods))
    }

    /// Lets requests without an `Authorization` header through, without a
    /// principal (public routes; read it as `Option<Principal>`). A token
    /// that is present is still verified: an invalid one gets 401 and an
    /// outage 503.
    pub fn optional(self) -> Self {
        self.edit(|p| p.optional = true)
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around yours.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S> fmt::Debug for AuthService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthService").finish_non_exhaustive()
    }
}

/// Why a request is turned away.
enum Denial {
    Missing,
    Invalid(String),
    Outage,
    Broken,
}

impl Policy {
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Principal>, Denial> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return if self.optional { Ok(None) } else { Err(Denial::Missing) };
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Denial::Invalid("expected a bearer token".to_owned()))?;
        match self.client.verify_token_for_audience(token, &self.audience).await {
            Ok(principal) => match &self.methods {
                Some(allowed) if !allowed.contains(&principal.auth_method) => Err(Denial::Invalid(
                    "this authentication method is not accepted here".to_owned(),
                )),
                _ => Ok(Some(principal)),
            },
            Err(Error::Rejected { message, .. }) => Err(Denial::Invalid(message)),
            Err(Error::InvalidArgument { message, .. }) => Err(Denial::Invalid(message)),
            Err(err) if err.is_outage() => {
                tracing::warn!(error = %err, "identity service unavailable; request refused");
                Err(Denial::Outage)
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot verify tokens: check this service's identity client configuration");
                Err(Denial::Broken)
            }
        }
    }

    fn respond<B: Default>(&self, denial: Denial) -> http::Response<B> {
        match self.style {
            Style::Grpc => match denial {
                Denial::Missing => tonic::Status::unauthenticated("missing bearer token"),
                Denial::Invalid(message) => tonic::Status::unauthenticated(message),
                Denial::Outage => tonic::Status::unavailable("authentication is unavailable"),
                Denial::Broken => tonic::Status::internal("authentication is misconfigured"),
            }
            .into_http(),
            Style::Http => {
                let (status, challenge) = match denial {
                    Denial::Missing => (StatusCode::UNAUTHORIZED, Some(HeaderValue::from_static("Bearer"))),
                    Denial::Invalid(message) => (StatusCode::UNAUTHORIZED, Some(challenge(&message))),
                    Denial::Outage => (StatusCode::SERVICE_UNAVAILABLE, None),
                    Denial::Broken => (StatusCode::INTERNAL_SERVER_ERROR, None),
                };
                let mut response = http::Response::new(B::default());
                *response.status_mut() = status;
                if let Some(challenge) = challenge {
                    response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
                }
                response
            }
        }
    }
}

/// `Bearer error="invalid_token", error_description="..."`, the description
/// cut down to the characters RFC 6750 allows in it.
fn challenge(description: &str) -> HeaderValue {
    let description: String = description
        .chars()
        .filter(|c| matches!(c, ' ' | '!' | '#'..='[' | ']'..='~'))
        .take(200)
        .collect();
    HeaderValue::from_str(&format!(
        "Bearer error=\"invalid_token\", error_description=\"{description}\""
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("Bearer error=\"invalid_token\""))
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let policy = self.policy.clone();
        Box::pin(async move {
            match policy.authenticate(request.headers()).await {
                Ok(principal) => {
                    if let Some(principal) = principal {
                        request.extensions_mut().insert(principal);
                    }
                    inner.call(request).await
                }
                Err(denial) => Ok(policy.respond(denial)),
            }
        })
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum::{
        extract::{FromRequestParts, OptionalFromRequestParts},
        http::request::Parts,
        response::{IntoResponse, Response},
    };

    use super::*;

    /// The rejection of the [`Principal`] extractor when no [`AuthLayer`]
    /// put one in the request: 401 with `WWW-Authenticate: Bearer`.
    #[derive(Debug, Clone, Copy)]
    pub struct MissingPrincipal;

    impl IntoResponse for MissingPrincipal {
        fn into_response(self) -> Response {
            let mut response = StatusCode::UNAUTHORIZED.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for Principal {
        type Rejection = MissingPrincipal;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
            parts.extensions.get::<Principal>().cloned().ok_or(MissingPrincipal)
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for Principal {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<Principal>().cloned())
        }
    }
}

#[cfg(feature = "axum")]
pub use extract::MissingPrincipal;
