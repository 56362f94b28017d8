//! Gateway integration: what Envoy's external authorization
//! ([`crate::grpc::ExtAuthzApi`], `envoy.service.auth.v3.Authorization/Check`)
//! and the HTTP forward-auth endpoint ([`crate::forward_auth`], nginx
//! `auth_request`, Traefik ForwardAuth, Caddy `forward_auth`) share: the
//! bearer token of the proxied request, the per-route policy, the decision
//! (made by the same [`Verifier`] path as `VerifyToken`, so figures, stats,
//! metrics and audit are the same) and the identity headers the upstream gets.

use std::{fmt, str::FromStr, sync::Arc};

use crate::{
    domain::{Caller, DomainError, MigrationState, Scope},
    metrics::{per_thread::PerThreadCounters, prometheus::Text},
    verification::{AcceptedMethods, Principal, Rejection, Verdict, Verifier},
};

/// One identity header the upstream may receive; its name is the configured
/// prefix (`x-identity-` by default) followed by [`IdentityHeader::suffix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityHeader {
    UserId,
    AuthMethod,
    ClerkUserId,
    SessionId,
    Email,
    MigrationState,
    OrgId,
    OrgRole,
    OrgSlug,
}

impl IdentityHeader {
    pub const ALL: [IdentityHeader; 9] = [
        Self::UserId,
        Self::AuthMethod,
        Self::ClerkUserId,
        Self::SessionId,
        Self::Email,
        Self::MigrationState,
        Self::OrgId,
        Self::OrgRole,
        Self::OrgSlug,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Self::UserId => "user-id",
            Self::AuthMethod => "auth-method",
            Self::ClerkUserId => "clerk-user-id",
            Self::SessionId => "session-id",
            Self::Email => "email",
            Self::MigrationState => "migration-state",
            Self::OrgId => "org-id",
            Self::OrgRole => "org-role",
            Self::OrgSlug => "org-slug",
        }
    }

    /// This header's value for `principal`, when it has one.
    fn value(self, principal: &Principal) -> Option<String> {
        let organization = principal.organization.as_ref();
        let value = match self {
            Self::UserId => principal.user_id.to_string(),
            Self::AuthMethod => principal.method.as_str().to_owned(),
            Self::ClerkUserId => principal.clerk_user_id.clone()?,
            Self::SessionId => principal.session_id.clone()?,
            Self::Email => principal.email.clone()?,
            Self::MigrationState => match principal.migration_state {
                MigrationState::LegacyOnly => "legacy_only",
                MigrationState::Migrated => "migrated",
                MigrationState::ClerkNative => "clerk_native",
            }
            .to_owned(),
            Self::OrgId => organization?.id.clone(),
            Self::OrgRole => organization?.role.clone(),
            Self::OrgSlug => organization?.slug.clone(),
        };
        // Printable ASCII only: a value that is not (a non-ASCII email, say)
        // is left out rather than mangled.
        (!value.is_empty() && value.bytes().all(|b| (0x20..0x7f).contains(&b))).then_some(value)
    }
}

impl FromStr for IdentityHeader {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        Self::ALL.into_iter().find(|h| h.suffix() == s).ok_or_else(|| {
            let known: Vec<_> = Self::ALL.iter().map(|h| h.suffix()).collect();
            format!("unknown identity header {s:?} (expected {})", known.join(", "))
        })
    }
}

/// Who may call `/forward-auth` (`IDENTITY_FORWARD_AUTH`) or `Check`
/// (`IDENTITY_EXT_AUTHZ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardAuthAccess {
    /// Not served.
    Off,
    /// Callers present an API key with the `gateway` scope: in
    /// [`GATEWAY_KEY_HEADER`] for forward-auth, as `authorization` metadata
    /// for Check (any caller in development mode, with no keys).
    Key,
    /// Any caller that reaches the port: restrict it by network (listener
    /// address, NetworkPolicy, Istio mTLS with an AuthorizationPolicy), for
    /// gateways that cannot send a key (Traefik, Istio's extension provider).
    /// A caller that does send a key must still send a valid one.
    Network,
}

/// The same setting under the name that reads better for Check.
pub type GatewayAccess = ForwardAuthAccess;

/// The header a forward-auth caller sends its API key in (not `Authorization`:
/// that one carries the end user's token).
pub const GATEWAY_KEY_HEADER: &str = "x-identity-gateway-key";

/// The gateway settings (`IDENTITY_GATEWAY_*`, `IDENTITY_FORWARD_AUTH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Lower-case prefix of every identity header.
    pub header_prefix: String,
    /// The identity headers set on an allowed request; the others are only removed.
    pub headers: Vec<IdentityHeader>,
    /// Envoy: also remove the `authorization` header from the upstream request.
    pub remove_authorization: bool,
    pub forward_auth: ForwardAuthAccess,
    pub ext_authz: GatewayAccess,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            header_prefix: "x-identity-".to_owned(),
            headers: IdentityHeader::ALL.to_vec(),
            remove_authorization: false,
            forward_auth: ForwardAuthAccess::Key,
            ext_authz: GatewayAccess::Key,
        }
    }
}

/// Per-route options, from Envoy's `context_extensions` or the forward-auth
/// query string (the same names in both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicy {
    /// `audience`: the required `aud` (legacy) or `azp` (Clerk).
    pub audience: Option<String>,
    /// `methods`: the kinds of token the route accepts, `legacy` and/or `clerk`.
    pub methods: AcceptedMethods,
    /// `allow_anonymous`: a request without a (valid) token passes, with no identity.
    pub allow_anonymous: bool,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self {
            audience: None,
            methods: AcceptedMethods::ALL,
            allow_anonymous: false,
        }
    }
}

impl RoutePolicy {
    /// Reads the known keys; other keys are ignored (a gateway may add its
    /// own). A malformed value is an error naming the key.
    pub fn parse<K: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Self, String> {
        let mut policy = Self::default();
        for (key, value) in pairs {
            let value = value.as_ref().trim();
            match key.as_ref() {
                "audience" => policy.audience = (!value.is_empty()).then(|| value.to_owned()),
                "methods" => {
                    let mut methods = AcceptedMethods {
                        legacy: false,
                        clerk: false,
                    };
                    for method in value.split(',').map(str::trim) {
                        match method.to_ascii_lowercase().as_str() {
                            "legacy" | "legacy_jwt" => methods.legacy = true,
                            "clerk" => methods.clerk = true,
                            other => {
                                return Err(format!(
                                    "methods: unknown method {:?} (expected legacy and/or clerk, comma-separated)",
                                    shown(other)
                                ));
                            }
                        }
                    }
                    policy.methods = methods;
                }
                "allow_anonymous" => {
                    policy.allow_anonymous = match value.to_ascii_lowercase().as_str() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" | "" => false,
                        other => {
                            return Err(format!("allow_anonymous: {:?} is not true or false", shown(other)));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(policy)
    }
}

/// A route parameter's value as a refusal repeats it: at most 40 characters
/// (a request can carry any query string; an error line should not).
fn shown(value: &str) -> &str {
    value.char_indices().nth(40).map_or(value, |(at, _)| &value[..at])
}

/// A request path for a debug line, without its query string: a query can
/// carry credentials (`?access_token=`, `?code=`, a magic link's `?token=`).
pub fn without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(path, _)| path)
}

/// The bearer token of an `Authorization` value: any capitalisation of
/// `Bearer`, then the token. Another scheme (Basic...) is no bearer token.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A refusal: HTTP 401 with `WWW-Authenticate` and a small JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub www_authenticate: String,
    pub body: String,
    /// The rejection reason; `None` when no token was sent.
    pub reason: Option<&'static str>,
}

impl Denial {
    /// No bearer token: no `error=` (RFC 6750, section 3.1).
    fn missing() -> Self {
        Self {
            www_authenticate: "Bearer".to_owned(),
            body: serde_json::json!({
                "error": "missing_token",
                "message": "a bearer token is required",
            })
            .to_string(),
            reason: None,
        }
    }

    fn rejected(rejection: &Rejection) -> Self {
        let reason = rejection.reason.as_str();
        Self {
            www_authenticate: format!("Bearer error=\"invalid_token\", error_description=\"{reason}\""),
            body: serde_json::json!({
                "error": "invalid_token",
                "reason": reason,
                "message": rejection.message,
            })
            .to_string(),
            reason: Some(reason),
        }
    }
}

/// What the gateway is told.
#[derive(Debug)]
pub enum Decision {
    /// Let the request through: with the principal's identity, or anonymously
    /// (`allow_anonymous` without a valid token).
    Allow(Option<Principal>),
    /// 401: no token, or a token that was rejected.
    Deny(Denial),
    /// The route's policy is malformed (a configuration mistake): refused
    /// with a 500, never let through whatever the failure mode.
    BadPolicy(String),
    /// No decision (the database or Clerk's keys unreachable, the caller not
    /// allowed): the gateway's failure mode decides.
    Error(DomainError),
}

impl Decision {
    fn kind(&self) -> DecisionKind {
        match self {
            Self::Allow(_) => DecisionKind::Allow,
            Self::Deny(_) => DecisionKind::Deny,
            Self::BadPolicy(_) | Self::Error(_) => DecisionKind::Error,
        }
    }

    /// A short label for logs and spans.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Allow(Some(_)) => "allow",
            Self::Allow(None) => "allow_anonymous",
            Self::Deny(denial) => denial.reason.unwrap_or("missing_token"),
            Self::BadPolicy(_) => "bad_policy",
            Self::Error(_) => "error",
        }
    }
}

/// Which gateway protocol a decision was made for (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    ExtAuthz,
    ForwardAuth,
}

impl Protocol {
    const ALL: [Protocol; 2] = [Protocol::ExtAuthz, Protocol::ForwardAuth];

    fn as_str(self) -> &'static str {
        match self {
            Self::ExtAuthz => "ext_authz",
            Self::ForwardAuth => "forward_auth",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecisionKind {
    Allow,
    Deny,
    Error,
}

impl DecisionKind {
    const ALL: [DecisionKind; 3] = [DecisionKind::Allow, DecisionKind::Deny, DecisionKind::Error];

    fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Error => "error",
        }
    }
}

/// Gateway decisions by protocol and decision, for `/metrics`
/// (`identity_gateway_decisions_total`); counted per thread like the
/// verification figures.
#[derive(Default)]
pub struct GatewayRecorder {
    cells: PerThreadCounters<6>,
}

impl fmt::Debug for GatewayRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewayRecorder")
    }
}

impl GatewayRecorder {
    fn record(&self, protocol: Protocol, kind: DecisionKind) {
        self.cells.add(protocol as usize * 3 + kind as usize, 1);
    }

    pub fn render_prometheus(&self, out: &mut Text) {
        let totals = self.cells.sum();
        out.family("identity_gateway_decisions_total", "counter");
        for protocol in Protocol::ALL {
            for kind in DecisionKind::ALL {
                out.sample(
                    "identity_gateway_decisions_total",
                    &[("protocol", protocol.as_str()), ("decision", kind.as_str())],
                    totals[protocol as usize * 3 + kind as usize],
                );
            }
        }
    }
}

/// The identity headers of one answer: those to set, and every other
/// identity header name, to remove from the client's request.
#[derive(Debug, Default)]
pub struct IdentityHeaders<'a> {
    pub set: Vec<(&'a str, String)>,
    pub unset: Vec<&'a str>,
}

struct Inner {
    verifier: Verifier,
    /// Every identity header with its full name, and whether it is sent.
    names: Vec<(IdentityHeader, String, bool)>,
    remove_authorization: bool,
    recorder: Arc<GatewayRecorder>,
}

/// Decides gateway requests; shared by the ext_authz and forward-auth endpoints.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(config: &GatewayConfig, verifier: Verifier, recorder: Arc<GatewayRecorder>) -> Self {
        let names = IdentityHeader::ALL
            .into_iter()
            .map(|h| {
                (
                    h,
                    format!("{}{}", config.header_prefix, h.suffix()),
                    config.headers.contains(&h),
                )
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                verifier,
                names,
                remove_authorization: config.remove_authorization,
                recorder,
            }),
        }
    }

    /// Whether the upstream request loses its `authorization` header (Envoy only).
    pub fn remove_authorization(&self) -> bool {
        self.inner.remove_authorization
    }

    /// Decides one proxied request from its `Authorization` value and the
    /// route's policy, and counts the decision.
    pub async fn decide(
        &self,
        protocol: Protocol,
        caller: &Caller,
        authorization: Option<&str>,
        policy: Result<RoutePolicy, String>,
    ) -> Decision {
        let decision = self.decide_uncounted(caller, authorization, policy).await;
        self.inner.recorder.record(protocol, decision.kind());
        decision
    }

    async fn decide_uncounted(
        &self,
        caller: &Caller,
        authorization: Option<&str>,
        policy: Result<RoutePolicy, String>,
    ) -> Decision {
        // Before anything else, even on a public route: only gateways ask.
        if let Err(err) = caller.require(Scope::Gateway) {
            return Decision::Error(err);
        }
        let policy = match policy {
            Ok(policy) => policy,
            Err(message) => return Decision::BadPolicy(message),
        };
        let Some(token) = authorization.and_then(bearer_token) else {
            return if policy.allow_anonymous {
                Decision::Allow(None)
            } else {
                Decision::Deny(Denial::missing())
            };
        };
        let verdict = self
            .inner
            .verifier
            .verify_at_gateway(caller, token, policy.audience.as_deref(), policy.methods)
            .await;
        match verdict {
            Ok(Verdict::Accepted(principal)) => Decision::Allow(Some(principal)),
            Ok(Verdict::Rejected(_)) if policy.allow_anonymous => Decision::Allow(None),
            Ok(Verdict::Rejected(rejection)) => Decision::Deny(Denial::rejected(&rejection)),
            Err(err) => Decision::Error(err),
        }
    }

    /// The headers to set for `principal` (none when anonymous) and the
    /// identity headers to remove: every one not set, so nothing a client
    /// sent under those names reaches the upstream.
    pub fn identity(&self, principal: Option<&Principal>) -> IdentityHeaders<'_> {
        let mut headers = IdentityHeaders::default();
        for (header, name, enabled) in &self.inner.names {
            match principal.filter(|_| *enabled).and_then(|p| header.value(p)) {
                Some(value) => headers.set.push((name.as_str(), value)),
                None => headers.unset.push(name.as_str()),
            }
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_in_any_capitalisation() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("bEaReR\tabc"), Some("abc"));
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn route_policy_from_pairs() {
        assert_eq!(
            RoutePolicy::parse(Vec::<(&str, &str)>::new()).unwrap(),
            RoutePolicy::default()
        );
        let policy = RoutePolicy::parse([
            ("methods", "clerk"),
            ("audience", "https://app.example.com"),
            ("allow_anonymous", "true"),
            ("something_else", "ignored"),
        ])
        .unwrap();
        assert_eq!(
            policy.methods,
            AcceptedMethods {
                legacy: false,
                clerk: true
            }
        );
        assert_eq!(policy.audience.as_deref(), Some("https://app.example.com"));
        assert!(policy.allow_anonymous);
        assert_eq!(
            RoutePolicy::parse([("methods", "Legacy, clerk")]).unwrap().methods,
            AcceptedMethods::ALL
        );
        assert!(
            RoutePolicy::parse([("methods", "saml")])
                .unwrap_err()
                .contains("methods")
        );
        assert!(RoutePolicy::parse([("methods", "")]).is_err());
        assert!(
            RoutePolicy::parse([("allow_anonymous", "maybe")])
                .unwrap_err()
                .contains("allow_anonymous")
        );
        // A refusal repeats at most 40 characters of the value (cut on a character boundary).
        let long = format!("{}{}", "é".repeat(39), "x".repeat(10_000));
        for (name, value) in [("methods", long.as_str()), ("allow_anonymous", long.as_str())] {
            let message = RoutePolicy::parse([(name, value)]).unwrap_err();
            assert!(message.contains(&format!("{}x\"", "é".repeat(39))), "{message}");
            assert!(message.len() < 200, "{message}");
        }
    }

    #[test]
    fn debug_paths_leave_the_query_out() {
        assert_eq!(without_query("/callback?code=secret&state=1"), "/callback");
        assert_eq!(without_query("/a/b"), "/a/b");
        assert_eq!(without_query("?token=secret"), "");
    }

    #[test]
    fn denials_follow_rfc_6750() {
        let missing = Denial::missing();
        assert_eq!(missing.www_authenticate, "Bearer");
        assert!(!missing.www_authenticate.contains("error="));
        let expired = Denial::rejected(&Rejection::new(
            crate::verification::RejectReason::Expired,
            "token has expired",
        ));
        assert_eq!(
            expired.www_authenticate,
            r#"Bearer error="invalid_token", error_description="expired""#
        );
        let body: serde_json::Value = serde_json::from_str(&expired.body).unwrap();
        assert_eq!(body["reason"], "expired");
        assert_eq!(body["error"], "invalid_token");
    }

    #[test]
    fn the_readme_shows_the_tested_gateway_configurations() {
        let readme = include_str!("../README.md");
        for (name, example) in [
            ("envoy.yaml", include_str!("../examples/gateway/envoy.yaml")),
            ("nginx.conf", include_str!("../examples/gateway/nginx.conf")),
        ] {
            assert!(
                readme.contains(example),
                "README.md must show examples/gateway/{name} as is"
            );
        }
    }

    #[test]
    fn identity_header_names_parse() {
        assert_eq!("Org-Role".parse::<IdentityHeader>().unwrap(), IdentityHeader::OrgRole);
        assert!("x-identity-user-id".parse::<IdentityHeader>().is_err());
    }
}
