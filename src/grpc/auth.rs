//! Caller authentication: `authorization: Bearer <api key>` metadata checked
//! against the configured key hashes before a handler runs.

use std::sync::Arc;

use tonic::{Request, Status, service::Interceptor};

use crate::domain::{ApiKeyRegistry, Caller};

/// Checks the API key and stores the [`Caller`] in the request extensions.
/// With no keys configured (loopback development only) every call is the
/// development caller.
#[derive(Debug, Clone)]
pub struct ApiKeyInterceptor {
    keys: Arc<ApiKeyRegistry>,
}

impl ApiKeyInterceptor {
    pub fn new(keys: Arc<ApiKeyRegistry>) -> Self {
        Self { keys }
    }
}

/// The interceptor of Envoy's `Check`: like [`ApiKeyInterceptor`], and
/// with `IDENTITY_EXT_AUTHZ=network` a call without a key is the gateway
/// (the network, e.g. Istio mTLS, decides who reaches the port).
#[derive(Debug, Clone)]
pub struct GatewayInterceptor {
    keys: ApiKeyInterceptor,
    by_network: bool,
}

impl GatewayInterceptor {
    pub fn new(keys: ApiKeyInterceptor, by_network: bool) -> Self {
        Self { keys, by_network }
    }
}

impl Interceptor for GatewayInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if self.by_network && request.metadata().get("authorization").is_none() {
            request
                .extensions_mut()
                .insert(Caller::new("ext-authz", vec![crate::domain::Scope::Gateway]));
            return Ok(request);
        }
        self.keys.call(request)
    }
}

impl Interceptor for ApiKeyInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = if self.keys.is_empty() {
            Caller::development()
        } else {
            let header = request.metadata().get("authorization").ok_or_else(|| {
                Status::unauthenticated("missing API key: send `authorization: Bearer <key>` metadata")
            })?;
            let value = header
                .to_str()
                .map_err(|_| Status::unauthenticated("malformed authorization metadata"))?;
            let key = bearer_key(value)
                .ok_or_else(|| Status::unauthenticated("authorization metadata must be `Bearer <key>`"))?;
            self.keys
                .authenticate(key)
                .ok_or_else(|| Status::unauthenticated("unknown API key"))?
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The key of an `authorization: Bearer <key>` value, if it has that form.
pub fn bearer_key(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// The caller the interceptor admitted, taken out of the request (a
/// handler reads it once).
pub fn caller<T>(request: &mut Request<T>) -> Result<Caller, Status> {
    request
        .extensions_mut()
        .remove::<Caller>()
        .ok_or_else(|| Status::unauthenticated("missing API key"))
}
