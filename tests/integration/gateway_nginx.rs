//! HTTP forward-auth through a real nginx (Debian's package, `auth_request`)
//! running examples/gateway/nginx.conf in front of an echoing upstream; and
//! `/forward-auth` called directly, for its callers and its answers.
//! The full nginx case runs on both databases, the others on SQLite.

use identity::gateway::ForwardAuthAccess;

use crate::{
    common::{
        Backend,
        gateway::{Gateway, example, fill, nginx_binary},
        tokens::{legacy, legacy_claims},
    },
    gateway_envoy::{Setup, common_cases},
};

pub(crate) fn nginx_config(setup: &Setup, port: u16) -> String {
    fill(
        &example("nginx.conf"),
        &[
            ("LISTEN_PORT", format!("127.0.0.1:{port}")),
            ("UPSTREAM_ADDR", setup.upstream.addr.to_string()),
            (
                "IDENTITY_HTTP_ADDR",
                setup.app.metrics_addr.expect("HTTP listener").to_string(),
            ),
            ("IDENTITY_GATEWAY_KEY", setup.gateway_key.clone()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_allows_denies_and_strips_sqlite() {
    nginx_auth_request_allows_denies_and_strips(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_allows_denies_and_strips_postgres() {
    nginx_auth_request_allows_denies_and_strips(Backend::Postgres).await;
}

async fn nginx_auth_request_allows_denies_and_strips(backend: Backend) {
    let Some(nginx) = nginx_binary() else { return };
    let Some(setup) = Setup::start_on(backend, |_, _| {}).await else {
        return;
    };
    let gateway = Gateway::nginx(&nginx, |port| nginx_config(&setup, port)).await;
    common_cases(&setup, &gateway).await;

    // The service stopped: nginx answers 500 and the upstream is not reached.
    let ann = setup.app.legacy_user("bob@example.com").await.to_string();
    let token = format!("Bearer {}", legacy(legacy_claims(&ann)));
    setup.passes(&gateway, "/", Some(&token), &[]).await;
    let Setup {
        app, upstream, client, ..
    } = setup;
    app.shutdown().await;
    let hits = upstream.hits();
    let response = client
        .get(gateway.url("/"))
        .header("authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(upstream.hits(), hits);
}

pub(crate) async fn forward_auth(
    setup: &Setup,
    query: &str,
    authorization: Option<&str>,
    gateway_key: Option<&str>,
) -> reqwest::Response {
    let addr = setup.app.metrics_addr.expect("HTTP listener");
    let mut request = setup.client.post(format!("http://{addr}/forward-auth{query}"));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    if let Some(key) = gateway_key {
        request = request.header("x-identity-gateway-key", key);
    }
    request
        .header("x-forwarded-method", "DELETE")
        .header("x-forwarded-uri", "/orders/7")
        .header("x-forwarded-host", "shop.example.com")
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_answers_and_its_callers() {
    let setup = Setup::start().await;
    let ann = setup.app.legacy_user("ann@example.com").await.to_string();
    let token = format!("Bearer {}", legacy(legacy_claims(&ann)));
    let key = Some(setup.gateway_key.as_str());

    // Any method; 200 with the identity headers.
    let response = forward_auth(&setup, "", Some(&token), key).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-identity-user-id"], ann.as_str());
    assert_eq!(response.headers()["x-identity-auth-method"], "legacy_jwt");
    assert!(response.headers().get("x-identity-org-role").is_none());

    // The route's policy from the query string.
    let response = forward_auth(&setup, "?methods=clerk", Some(&token), key).await;
    assert_eq!(response.status(), 401);
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("method_disabled")
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["reason"], "method_disabled");
    let response = forward_auth(&setup, "?audience=https%3A%2F%2Fother.example.com", Some(&token), key).await;
    assert_eq!(response.status(), 401);
    let response = forward_auth(&setup, "?allow_anonymous=true", None, key).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-identity-user-id").is_none());
    let response = forward_auth(&setup, "?methods=saml", Some(&token), key).await;
    assert_eq!(response.status(), 500);

    // Callers: no key, an unknown key or a key of another scope is refused,
    // and nothing is said about the token.
    for other in [None, Some("idk_made_up"), Some(setup.app.verify_key.as_str())] {
        let response = forward_auth(&setup, "", Some(&token), other).await;
        assert_eq!(response.status(), 403, "{other:?}");
        assert!(response.headers().get("x-identity-user-id").is_none());
    }
    let text = setup
        .client
        .get(format!("http://{}/metrics", setup.app.metrics_addr.unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#"identity_gateway_decisions_total{protocol="forward_auth",decision="allow"} 2"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_by_network_or_off() {
    let open = Setup::start_with(|config, _| config.gateway.forward_auth = ForwardAuthAccess::Network).await;
    let ann = open.app.legacy_user("ann@example.com").await.to_string();
    let token = format!("Bearer {}", legacy(legacy_claims(&ann)));
    let response = forward_auth(&open, "", Some(&token), None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-identity-user-id"], ann.as_str());
    let response = forward_auth(&open, "", Some(&token), Some("idk_made_up")).await;
    assert_eq!(response.status(), 403);

    let off = Setup::start_with(|config, _| config.gateway.forward_auth = ForwardAuthAccess::Off).await;
    let response = forward_auth(&off, "", Some(&token), Some(&off.gateway_key)).await;
    assert_eq!(response.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_outage_is_a_503() {
    let setup = Setup::start_with(|_, fake| fake.set_down(true)).await;
    let token = format!("Bearer {}", setup.clerk_token("user_new"));
    let response = forward_auth(&setup, "", Some(&token), Some(&setup.gateway_key)).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("x-identity-user-id").is_none());
}
