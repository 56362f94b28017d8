//! Faults an operator meets in production: SIGTERM under load, Clerk
//! misbehaving, and the database going away under load. The binary runs as
//! an operator runs it wherever its logs or exit code matter.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use identity::{
    domain::{Scope, generate_api_key},
    pb::{self, identity_service_client::IdentityServiceClient},
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::common::{
    Backend, TestApp, TestDb, WithKey, accepted,
    binary::{Served, command, wait_serving},
    fake_clerk::{FakeClerk, Raw},
    legacy_config, rejected,
    tcp_proxy::TcpProxy,
    test_config,
    tokens::{clerk, clerk_claims, legacy, legacy_claims},
};

/// The binary verifying Clerk tokens of `fake`, with one verify-scoped key.
fn clerk_command(db: &TestDb, fake: &FakeClerk, key_line: &str) -> std::process::Command {
    let mut command = command(&db.url);
    command
        .env("IDENTITY_API_KEYS", key_line)
        .env("IDENTITY_LOG_FORMAT", "text")
        .env("IDENTITY_CLERK_ISSUER", fake.url())
        .env(
            "IDENTITY_CLERK_JWKS_URL",
            format!("{}/.well-known/jwks.json", fake.url()),
        )
        .env("IDENTITY_CLERK_API_URL", fake.url())
        .env("IDENTITY_CLERK_SECRET_KEY", crate::common::fake_clerk::SECRET_KEY);
    command
}

async fn verify(
    client: &mut IdentityServiceClient<tonic::service::interceptor::InterceptedService<Channel, WithKey>>,
    token: String,
) -> Result<pb::verify_token_response::Result, tonic::Status> {
    client
        .verify_token(pb::VerifyTokenRequest {
            token,
            expected_audience: String::new(),
        })
        .await
        .map(|r| r.into_inner().result.expect("a result"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_completes_every_accepted_call_and_refuses_new_connections() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let (key, line) = generate_api_key("gateway", &[Scope::Verify]);
    let mut command = clerk_command(&db, &fake, &line);
    // One key fetch per second at most, so the calls below share one fetch.
    command.env("IDENTITY_CLERK_JWKS_COOLDOWN_SECONDS", "1");
    let mut served = Served::start(command);
    assert!(wait_serving(&served.addr).await, "{}", served.logs());
    let client = served.client(&key).await;
    for _ in 0..50 {
        if fake.jwks_fetches() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Clerk rotates to a key this replica has not seen, and answers slowly:
    // 200 calls wait on that fetch, in flight when SIGTERM arrives.
    fake.publish(&["clerk_a", "clerk_b"]);
    fake.set_delay(Duration::from_secs(3));
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let mut client = client.clone();
            let token = clerk(
                "clerk_b",
                "ins_clerk_b",
                clerk_claims(&fake.url(), &format!("user_drain{i}")),
            );
            tokio::spawn(async move { verify(&mut client, token).await })
        })
        .collect();
    for _ in 0..50 {
        if fake.jwks_fetches() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fake.jwks_fetches() >= 2, "the slow fetch never started");
    tokio::time::sleep(Duration::from_millis(300)).await;
    served.terminate();

    // New connections are refused while the accepted calls finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = Channel::from_shared(format!("http://{}", served.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await;
    assert!(fresh.is_err(), "a new connection was accepted during the drain");

    let mut ok = 0;
    for call in calls {
        let result = call.await.unwrap();
        match result {
            Ok(result) => {
                accepted(result);
                ok += 1;
            }
            Err(status) => panic!(
                "an accepted call failed during the drain: {status:?}\n{}",
                served.logs()
            ),
        }
    }
    assert_eq!(ok, 200);
    let mut child = served.child.take().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", served.logs());
}

/// How Clerk's JWKS endpoint misbehaves, and what the log must say of it.
struct JwksFault {
    name: &'static str,
    delay: Duration,
    answer: Option<Raw>,
    logged: &'static str,
}

fn raw(status: u16, content_type: &'static str, body: Vec<u8>) -> Option<Raw> {
    Some(Raw {
        status: axum::http::StatusCode::from_u16(status).unwrap(),
        content_type,
        body,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_misbehaving_clerk_jwks_gives_a_clear_error_within_the_timeouts() {
    let full = std::fs::read_to_string(format!(
        "{}/tests/fixtures/clerk_a.jwk.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let document = format!("{{\"keys\":[{full}]}}");
    let mut huge = String::from("{\"keys\":[");
    while huge.len() < 5 * 1024 * 1024 {
        huge.push_str(&full);
        huge.push(',');
    }
    huge.push_str(&full);
    huge.push_str("]}");
    let html = b"<html><head><title>502 Bad Gateway</title></head><body>cloudflare</body></html>".to_vec();
    let faults = vec![
        JwksFault {
            name: "slow",
            delay: Duration::from_secs(60),
            answer: None,
            logged: "request failed",
        },
        JwksFault {
            name: "truncated JSON",
            delay: Duration::ZERO,
            answer: raw(
                200,
                "application/json",
                document.as_bytes()[..document.len() / 2].to_vec(),
            ),
            logged: "not a JWKS document",
        },
        JwksFault {
            name: "HTML error page",
            delay: Duration::ZERO,
            answer: raw(502, "text/html", html.clone()),
            logged: "server answered 502",
        },
        JwksFault {
            name: "HTML with 200",
            delay: Duration::ZERO,
            answer: raw(200, "text/html", html),
            logged: "not a JWKS document",
        },
        JwksFault {
            name: "5 MB document",
            delay: Duration::ZERO,
            answer: raw(200, "application/json", huge.into_bytes()),
            logged: "document larger than",
        },
    ];
    let cases = faults.into_iter().map(|fault| {
        tokio::spawn(async move {
            let db = TestDb::new(Backend::Sqlite).await.unwrap();
            let fake = FakeClerk::start(&["clerk_a"]).await;
            fake.set_delay(fault.delay);
            fake.set_jwks_answer(fault.answer);
            let (key, line) = generate_api_key("gateway", &[Scope::Verify]);
            let served = Served::start(clerk_command(&db, &fake, &line));
            assert!(wait_serving(&served.addr).await, "{}: {}", fault.name, served.logs());
            let mut client = served.client(&key).await;
            let started = Instant::now();
            let token = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_fault"));
            // A safety net, not a timing: three tries of 5 s and their backoff.
            let answer = tokio::time::timeout(Duration::from_secs(40), verify(&mut client, token))
                .await
                .unwrap_or_else(|_| panic!("{}: VerifyToken hung beyond the Clerk timeouts", fault.name));
            let status = answer.expect_err(fault.name);
            assert_eq!(status.code(), Code::Unavailable, "{}: {status:?}", fault.name);
            let logs = served.logs_once(fault.logged).await;
            assert!(
                logs.contains(fault.logged),
                "{}: the log does not say {:?} after {:?}:\n{logs}",
                fault.name,
                fault.logged,
                started.elapsed()
            );
            assert!(
                !logs.contains(crate::common::fake_clerk::SECRET_KEY),
                "{}: secret key logged",
                fault.name
            );
        })
    });
    for case in cases.collect::<Vec<_>>() {
        case.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_misbehaving_clerk_backend_api_gives_a_clear_error_within_the_timeouts() {
    let cases = [
        (
            "truncated JSON",
            Duration::ZERO,
            raw(200, "application/json", br#"{"id":"user_x","email_addr"#.to_vec()),
        ),
        (
            "HTML with 200",
            Duration::ZERO,
            raw(200, "text/html", b"<html>maintenance</html>".to_vec()),
        ),
        ("slow", Duration::from_secs(60), None),
    ]
    .into_iter()
    .map(|(name, delay, answer)| {
        tokio::spawn(async move {
            let db = TestDb::new(Backend::Sqlite).await.unwrap();
            let fake = FakeClerk::start(&["clerk_a"]).await;
            fake.add_user("user_fault", "ann@example.com", true);
            let (key, line) = generate_api_key("gateway", &[Scope::Verify]);
            let mut command = clerk_command(&db, &fake, &line);
            command.env("IDENTITY_UNMAPPED_CLERK_USER", "link_by_email");
            let served = Served::start(command);
            assert!(wait_serving(&served.addr).await, "{name}: {}", served.logs());
            fake.set_delay(delay);
            fake.set_user_answer(answer);
            let mut client = served.client(&key).await;
            let token = clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_fault"));
            let answer = tokio::time::timeout(Duration::from_secs(40), verify(&mut client, token))
                .await
                .unwrap_or_else(|_| panic!("{name}: VerifyToken hung beyond the Clerk timeouts"));
            let status = answer.expect_err(name);
            assert_eq!(status.code(), Code::Unavailable, "{name}: {status:?}");
            assert!(status.message().contains("Clerk"), "{name}: {status:?}");
            assert!(
                !served.logs().contains(crate::common::fake_clerk::SECRET_KEY),
                "{name}: secret key logged"
            );
        })
    });
    for case in cases.collect::<Vec<_>>() {
        case.await.unwrap();
    }
}

async fn overall_health(channel: &Channel) -> Option<ServingStatus> {
    let mut health = HealthClient::new(channel.clone());
    let answer = tokio::time::timeout(
        Duration::from_secs(2),
        health.check(HealthCheckRequest { service: String::new() }),
    )
    .await;
    match answer {
        Ok(Ok(response)) => Some(response.into_inner().status()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_going_away_under_load_loses_nothing_and_recovers() {
    crate::common::init_logs();
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let target: url::Url = db.url.parse().unwrap();
    let server_addr = tokio::net::lookup_host((target.host_str().unwrap(), target.port().unwrap_or(5432)))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = TcpProxy::start(server_addr).await;
    let mut via_proxy = target.clone();
    via_proxy.set_host(Some("127.0.0.1")).unwrap();
    via_proxy.set_port(Some(proxy.addr.port())).unwrap();
    let (mut config, keys) = test_config(&db);
    config.verification.legacy = Some(legacy_config());
    let app = TestApp::spawn_connecting(db, config, keys, via_proxy.as_str()).await;

    // Acknowledged before the outage: a user, a link and a revocation.
    let ann = app.legacy_user("ann@example.com").await;
    let bob = app.legacy_user("bob@example.com").await;
    let ann_token = legacy(legacy_claims(&ann.to_string()));
    let revoked = legacy(legacy_claims(&ann.to_string()));
    for _ in 0..2 {
        accepted(app.verify(&ann_token).await);
    }
    app.identity(&app.admin_key)
        .revoke_token(pb::RevokeTokenRequest {
            target: Some(pb::revoke_token_request::Target::Token(revoked.clone())),
            expires_at: None,
        })
        .await
        .unwrap();
    app.admin()
        .link_user(pb::LinkUserRequest {
            user_id: bob.to_string(),
            clerk_user_id: "user_bob".into(),
        })
        .await
        .unwrap();

    // Load on a cached user's token throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let successes = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let mut client = app.identity(&app.verify_key);
            let token = ann_token.clone();
            let (stop, failures, successes) = (stop.clone(), failures.clone(), successes.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match verify(&mut client, token.clone()).await {
                        Ok(pb::verify_token_response::Result::Principal(_)) => successes.fetch_add(1, Ordering::SeqCst),
                        _ => failures.fetch_add(1, Ordering::SeqCst),
                    };
                }
            })
        })
        .collect();

    proxy.set_down(true);
    let outage = Instant::now();
    let mut saw_not_serving = false;
    let mut outage_answer = None;
    while outage.elapsed() < Duration::from_secs(10) {
        if overall_health(&app.channel).await == Some(ServingStatus::NotServing) {
            saw_not_serving = true;
        }
        if outage_answer.is_none() && saw_not_serving {
            // A call that needs the database fails cleanly, without a hang.
            let status = tokio::time::timeout(
                Duration::from_secs(30),
                app.identity(&app.admin_key).get_user(pb::GetUserRequest {
                    lookup: Some(pb::get_user_request::Lookup::Email("nobody@example.com".into())),
                }),
            )
            .await
            .expect("GetUser hung during the outage")
            .unwrap_err();
            outage_answer = Some(status);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let during = successes.load(Ordering::SeqCst);
    assert!(saw_not_serving, "health never reported the database outage");
    let status = outage_answer.expect("a call during the outage");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    proxy.set_down(false);
    let mut recovered = false;
    for _ in 0..100 {
        if overall_health(&app.channel).await == Some(ServingStatus::Serving) {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "health never came back after the outage");
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "a cached user's token failed during the outage ({during} verified)"
    );
    assert!(during > 0);

    // Nothing acknowledged before the outage is lost, and writes work again.
    assert_eq!(
        rejected(app.verify(&revoked).await),
        pb::RejectionReason::Revoked,
        "the revocation survived"
    );
    let mapping = app
        .admin()
        .get_mapping(pb::GetMappingRequest {
            lookup: Some(pb::get_mapping_request::Lookup::UserId(bob.to_string())),
        })
        .await
        .unwrap()
        .into_inner()
        .mapping
        .unwrap();
    assert_eq!(mapping.clerk_user_id, "user_bob");
    app.admin()
        .link_user(pb::LinkUserRequest {
            user_id: ann.to_string(),
            clerk_user_id: "user_ann".into(),
        })
        .await
        .expect("writes work again without a restart");
    drop(proxy);
    app.shutdown().await;
}
