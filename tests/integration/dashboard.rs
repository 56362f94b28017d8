//! The built-in dashboard on the HTTP listener: its headers and assets, its
//! stream's bounds, and a real browser (Debian's Chromium through
//! chromedriver) against a server on PostgreSQL: the page shows what
//! GetMigrationStats says, moves without a reload, sends no request off
//! its origin, logs no console error, and reports a database outage.

use std::time::Duration;

use identity::{
    config::{Config, VerificationConfig},
    domain::BulkConfig,
    pb::{self, GetMigrationStatsRequest, StartBulkMigrationRequest, StatsWindow},
};
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use crate::common::{
    Backend, TestApp, TestDb, accepted,
    browser::Browser,
    clerk_config,
    fake_clerk::FakeClerk,
    legacy_config, rejected,
    tcp_proxy::TcpProxy,
    test_config,
    tokens::{clerk, clerk_claims, legacy, legacy_claims, now},
};

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A server-sent event stream, read event by event.
pub(crate) struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    pub(crate) async fn open(url: &str) -> Result<Self, reqwest::Response> {
        let response = reqwest::get(url).await.unwrap();
        if response.status() != 200 {
            return Err(response);
        }
        Ok(Self {
            response,
            buffer: String::new(),
        })
    }

    /// The next event's name and data (comments and keep-alives skipped).
    pub(crate) async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return (name, serde_json::from_str(&data).unwrap());
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.response.chunk())
                .await
                .expect("an event within 30 s")
                .unwrap()
                .expect("the stream stays open");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

fn assert_security_headers(response: &reqwest::Response) {
    let csp = header(response, "content-security-policy");
    assert_eq!(csp, identity::dashboard::CONTENT_SECURITY_POLICY);
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe") && !csp.contains("http"), "{csp}");
    assert_eq!(header(response, "x-content-type-options"), "nosniff");
    assert_eq!(header(response, "x-frame-options"), "DENY");
    assert_eq!(header(response, "referrer-policy"), "no-referrer");
    assert_eq!(header(response, "cache-control"), "no-store");
}

async fn the_page_is_self_contained_and_sends_strict_headers(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let origin = format!("http://{}", app.metrics_addr.expect("HTTP listener"));
    let client = no_redirects();

    let root = client.get(format!("{origin}/")).send().await.unwrap();
    assert!(root.status().is_redirection(), "{}", root.status());
    assert_eq!(header(&root, "location"), "/dashboard");

    let page = client.get(format!("{origin}/dashboard")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(header(&page, "content-type").starts_with("text/html"));
    assert_security_headers(&page);
    let html = page.text().await.unwrap();
    // Everything the page loads is its own: no CDN, no external font or script.
    let references: Vec<&str> = html
        .split(['"', '\''])
        .filter(|s| s.starts_with('/') || s.contains("://"))
        .collect();
    assert!(!references.is_empty());
    for reference in &references {
        assert!(
            reference.starts_with("/dashboard/"),
            "{reference} is not the page's own"
        );
    }
    assert!(!html.contains("<style") && !html.contains(" style=") && !html.contains("<script>"));

    for (path, kind) in [
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
        ("/dashboard/icon.svg", "image/svg+xml"),
    ] {
        let asset = client.get(format!("{origin}{path}")).send().await.unwrap();
        assert_eq!(asset.status(), 200, "{path}");
        assert!(header(&asset, "content-type").starts_with(kind), "{path}");
        assert_security_headers(&asset);
        let body = asset.text().await.unwrap();
        // The only URL in the code is SVG's namespace, which is never fetched.
        let urls = body.matches("://").count();
        let namespace = body.matches("http://www.w3.org/2000/svg").count();
        assert_eq!(urls, namespace, "{path} names another origin");
        assert!(!body.contains("fetch(") && !body.contains("XMLHttpRequest"), "{path}");
    }

    let bad = client
        .get(format!("{origin}/dashboard/events?window=2y"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    app.shutdown().await;
}

async fn the_dashboard_can_be_turned_off(db: TestDb) {
    let (mut config, keys) = test_config(&db);
    config.dashboard = false;
    let app = TestApp::spawn_with(db, config, keys).await;
    let origin = format!("http://{}", app.metrics_addr.expect("HTTP listener"));
    let client = no_redirects();
    for path in ["/", "/dashboard", "/dashboard/events", "/dashboard/app.js"] {
        let response = client.get(format!("{origin}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    assert_eq!(
        client.get(format!("{origin}/metrics")).send().await.unwrap().status(),
        200
    );
    app.shutdown().await;

    let off = Config::from_vars([("IDENTITY_DASHBOARD".to_owned(), "false".to_owned())]).unwrap();
    assert!(!off.dashboard);
    assert!(Config::from_vars([]).unwrap().dashboard, "on by default");
    let err = Config::from_vars([("IDENTITY_DASHBOARD".to_owned(), "maybe".to_owned())]).unwrap_err();
    assert_eq!(err.variable, "IDENTITY_DASHBOARD");
}

async fn streams_are_shared_bounded_and_closed_tabs_leave_nothing(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let ann = app.legacy_user("ann@example.com").await;
    let origin = format!("http://{}", app.metrics_addr.expect("HTTP listener"));
    let url = format!("{origin}/dashboard/events");
    let metrics = tokio::runtime::Handle::current().metrics();
    {
        let mut warm = Events::open(&url).await.ok().unwrap();
        warm.next().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = metrics.num_alive_tasks();

    for round in 0..3 {
        // A client address may hold 8 pages, like a caller's metric streams.
        let mut open = Vec::new();
        for _ in 0..8 {
            let mut events = open_when_free(&url).await;
            let (name, data) = events.next().await;
            assert_eq!(name, "snapshot");
            assert_eq!(data["users"]["total"], 1, "{data}");
            // Aggregates only: no email, no user id.
            let text = data.to_string();
            assert!(
                !text.contains("example.com") && !text.contains(&ann.to_string()),
                "{text}"
            );
            open.push(events);
        }
        let refused = Events::open(&url).await.err().expect("a ninth page is refused");
        assert_eq!(refused.status(), 503, "round {round}");
        assert_eq!(header(&refused, "retry-after"), "5");
        // The streams are response bodies, with no task of their own: what
        // runs is the connections' tasks (the server's and reqwest's).
        let alive = metrics.num_alive_tasks();
        assert!(
            alive <= baseline + 4 * 8 + 4,
            "{alive} tasks with 8 pages open (baseline {baseline})"
        );
        drop(open);
    }
    let mut alive = metrics.num_alive_tasks();
    for _ in 0..100 {
        if alive <= baseline + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        alive = metrics.num_alive_tasks();
    }
    assert!(
        alive <= baseline + 2,
        "{alive} tasks alive after closing every page (baseline {baseline})"
    );
    // Every slot was freed: 8 pages open again.
    let mut again = Vec::new();
    for _ in 0..8 {
        again.push(open_when_free(&url).await);
    }
    drop(again);
    app.shutdown().await;
}

/// Opens the stream, waiting while the slots of closed pages are freed.
async fn open_when_free(url: &str) -> Events {
    for _ in 0..100 {
        match Events::open(url).await {
            Ok(events) => return events,
            Err(response) if response.status() == 503 => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(response) => panic!("cannot open the stream: {}", response.status()),
        }
    }
    panic!("the slots of closed pages were never freed")
}

crate::backend_tests!(
    the_page_is_self_contained_and_sends_strict_headers,
    the_dashboard_can_be_turned_off,
    streams_are_shared_bounded_and_closed_tabs_leave_nothing,
);

// --- The real browser ------------------------------------------------------

/// What the page shows, by name, as numbers (from the elements' data-value).
const READ_PAGE: &str = r#"
const v = (id) => {
  const el = document.getElementById(id);
  return el && el.dataset.value !== undefined ? Number(el.dataset.value) : null;
};
const text = (id) => { const el = document.getElementById(id); return el ? el.dataset.value || null : null; };
const methods = {};
for (const row of document.querySelectorAll('#methods-body tr[data-method]')) {
  methods[row.dataset.method] = [1, 2, 3].map((i) => Number(row.cells[i].dataset.value));
}
return {
  numbers: {
    migrated: v('users-migrated'), total: v('users-total'), ratio: v('migrated-percent'),
    legacy_only: v('users-legacy'), linked: v('users-linked'), clerk_native: v('users-clerk-native'),
    attempts: v('auth-attempts'), successes: v('auth-successes'), errors: v('auth-errors'),
    rejections: v('auth-rejections'), success_rate: v('success-rate'), error_rate: v('error-rate'),
    p50: v('latency-p50'), p95: v('latency-p95'), p99: v('latency-p99'),
    sent: v('inv-sent'), pending: v('inv-pending'), completed: v('inv-completed'), expired: v('inv-expired'),
    locked_out: v('readiness-locked-out'), active: v('readiness-active'), days: v('readiness-days'),
    legacy_by_migrated: v('readiness-legacy-by-migrated'),
  },
  methods,
  mode: text('auth-mode'),
  bulk: document.getElementById('bulk-job').hidden ? null :
    { state: text('bulk-state'), processed: v('bulk-processed'), total: v('bulk-total'),
      created: v('bulk-created'), failed: v('bulk-failed') },
  snapshots: Number(document.body.dataset.snapshots || 0),
};
"#;

fn expected(s: &pb::MigrationStats) -> Value {
    let readiness = s.readiness.unwrap();
    let invitations = s.invitations.unwrap();
    let methods: serde_json::Map<String, Value> = s
        .methods
        .iter()
        .map(|m| (m.method.clone(), json!([m.attempts, m.successes, m.errors])))
        .collect();
    json!({
        "numbers": {
            "migrated": s.migrated_users + s.clerk_native_users, "total": s.total_users, "ratio": s.migrated_ratio,
            "legacy_only": s.legacy_users, "linked": s.migrated_users, "clerk_native": s.clerk_native_users,
            "attempts": s.auth_attempts, "successes": s.auth_successes, "errors": s.auth_errors,
            "rejections": s.auth_rejections, "success_rate": s.success_rate, "error_rate": s.error_rate,
            "p50": s.latency_p50_us, "p95": s.latency_p95_us, "p99": s.latency_p99_us,
            "sent": invitations.sent, "pending": invitations.pending, "completed": invitations.redeemed,
            "expired": invitations.expired,
            "locked_out": readiness.would_be_locked_out, "active": readiness.active_users, "days": readiness.days,
            "legacy_by_migrated": readiness.legacy_verifications_by_migrated_users,
        },
        "methods": methods,
        "mode": match s.auth_mode() {
            pb::AuthMode::ClerkOnly => "clerk_only",
            pb::AuthMode::LegacyOnly => "legacy_only",
            _ => "dual",
        },
        "bulk": s.bulk_job.as_ref().map(|job| json!({
            "state": match job.state() {
                pb::BulkJobState::Running => "running",
                pb::BulkJobState::Completed => "completed",
                pb::BulkJobState::Cancelled => "cancelled",
                _ => "failed",
            },
            "processed": job.processed, "total": job.total, "created": job.created, "failed": job.failed,
        })),
    })
}

/// Numbers equal (floats to 1e-9), the rest identical.
pub(crate) fn same(shown: &Value, wanted: &Value) -> bool {
    match (shown, wanted) {
        (Value::Number(a), Value::Number(b)) => (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-9,
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && b.iter().all(|(k, v)| a.get(k).is_some_and(|shown| same(shown, v)))
        }
        (Value::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y)),
        (a, b) => a == b,
    }
}

async fn stats(app: &TestApp) -> pb::MigrationStats {
    app.migration(&app.verify_key)
        .get_migration_stats(GetMigrationStatsRequest {
            window: StatsWindow::LastHour as i32,
            readiness_days: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
}

/// Waits until the page shows what GetMigrationStats says; returns both.
async fn page_matches_stats(app: &TestApp, browser: &Browser) -> (Value, pb::MigrationStats) {
    let mut last = (Value::Null, Value::Null);
    for _ in 0..100 {
        let s = stats(app).await;
        let mut shown = browser.eval(READ_PAGE, json!([])).await;
        let wanted = expected(&s);
        let snapshots = shown.as_object_mut().unwrap().remove("snapshots").unwrap_or_default();
        if same(&shown, &wanted) {
            shown["snapshots"] = snapshots;
            return (shown, s);
        }
        last = (shown, wanted);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "the page never showed GetMigrationStats' figures:\nshown:  {}\nwanted: {}",
        last.0, last.1
    );
}

/// Polls `script` until it returns true.
async fn until(browser: &Browser, what: &str, script: &str) {
    for _ in 0..240 {
        if browser.eval(script, json!([])).await == Value::Bool(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for {what}");
}

fn artifact(name: &str) -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("test-artifacts").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_in_a_real_browser() {
    crate::common::init_logs();
    let Some(browser) = Browser::start().await else {
        return;
    };
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    // The server reaches PostgreSQL through a proxy that can go down.
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
    let fake = FakeClerk::start(&["clerk_a"]).await;
    let (mut config, keys) = test_config(&db);
    config.verification = VerificationConfig {
        legacy: Some(legacy_config()),
        clerk: Some(clerk_config(&fake)),
        ..VerificationConfig::default()
    };
    config.bulk = BulkConfig {
        default_rate: 1000.0,
        max_rate: 10_000.0,
        lease: Duration::from_secs(2),
    };
    let app = TestApp::spawn_connecting(db, config, keys, via_proxy.as_str()).await;

    // Before the page opens: five users, one linked, a few verifications.
    let ann = app.legacy_user("ann@example.com").await;
    let bob = app.legacy_user("bob@example.com").await;
    let cat = app.legacy_user("cat@example.com").await;
    let dan = app.legacy_user("dan@example.com").await;
    app.legacy_user("eve@example.com").await;
    app.admin()
        .link_user(pb::LinkUserRequest {
            user_id: bob.to_string(),
            clerk_user_id: "user_bob".into(),
        })
        .await
        .unwrap();
    for _ in 0..2 {
        accepted(app.verify(&legacy(legacy_claims(&ann.to_string()))).await);
    }
    let mut expired = legacy_claims(&ann.to_string());
    expired["exp"] = json!(now() - 600);
    assert_eq!(
        rejected(app.verify(&legacy(expired)).await),
        pb::RejectionReason::Expired
    );
    assert_eq!(
        rejected(app.verify("not-a-token").await),
        pb::RejectionReason::Malformed
    );

    let origin = format!("http://{}", app.metrics_addr.expect("HTTP listener"));
    // Reading a log empties it: what the browser did before the page opened is dropped.
    browser.log("performance").await;
    browser.log("browser").await;
    browser.goto(&format!("{origin}/")).await;
    assert_eq!(
        browser.current_url().await,
        format!("{origin}/dashboard"),
        "/ redirects"
    );
    browser
        .eval("window.__sameDocument = 'still here'; return null;", json!([]))
        .await;

    let (before, first) = page_matches_stats(&app, &browser).await;
    assert_eq!(first.total_users, 5);
    assert_eq!(first.auth_attempts, 4);
    assert!(before["bulk"].is_null(), "no bulk job yet");

    // The test acts; the page follows without a reload.
    accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_new")))
            .await,
    );
    accepted(app.verify(&legacy(legacy_claims(&cat.to_string()))).await);
    app.admin()
        .link_user(pb::LinkUserRequest {
            user_id: cat.to_string(),
            clerk_user_id: "user_cat".into(),
        })
        .await
        .unwrap();
    let mut progress = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest {
            user_ids: vec![dan.to_string()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(item) = tokio::time::timeout(Duration::from_secs(60), progress.next())
        .await
        .expect("bulk progress")
    {
        last = Some(item.unwrap());
    }
    assert_eq!(last.unwrap().state(), pb::BulkJobState::Completed);

    let (after, now_stats) = page_matches_stats(&app, &browser).await;
    assert_eq!(
        (
            now_stats.total_users,
            now_stats.migrated_users,
            now_stats.clerk_native_users
        ),
        (6, 3, 1),
        "bob and cat linked, dan by the bulk job, one Clerk-native user"
    );
    assert_eq!(after["bulk"]["state"], "completed");
    assert_eq!(after["bulk"]["processed"], 1);
    assert!(
        after["snapshots"].as_u64() > before["snapshots"].as_u64(),
        "{before} {after}"
    );
    let same_document = browser
        .eval(
            "return [window.__sameDocument, performance.getEntriesByType('navigation').length];",
            json!([]),
        )
        .await;
    assert_eq!(same_document, json!(["still here", 1]), "the page was reloaded");

    // The progress bar's width is the migrated ratio.
    let ratio = now_stats.migrated_ratio;
    until(
        &browser,
        "the progress bar to show the migrated ratio",
        &format!(
            "const bar = document.getElementById('progress-bar').getBoundingClientRect().width;
             const fill = document.getElementById('progress-fill').getBoundingClientRect().width;
             return bar > 100 && Math.abs(fill / bar - {ratio}) < 0.005;"
        ),
    )
    .await;
    // The chart of the last hour has a line per method that verified.
    let lines = browser
        .eval(
            "return [...document.querySelectorAll('#chart polyline')].map((l) => [l.dataset.method, Number(l.dataset.total)]);",
            json!([]),
        )
        .await;
    assert_eq!(
        lines,
        json!([["clerk", 1], ["legacy_jwt", 4], ["unknown", 1]]),
        "{lines}"
    );
    browser.screenshot(&artifact("dashboard.png")).await;

    // The database goes away: the page says so, keeps the last figures, and recovers.
    proxy.set_down(true);
    until(
        &browser,
        "the page to report the outage",
        "const banner = document.getElementById('banner');
         return !banner.hidden && banner.textContent.includes('database is unreachable')
           && document.getElementById('status').dataset.state === 'unavailable'
           && document.getElementById('users-total').dataset.value === '6';",
    )
    .await;
    browser.screenshot(&artifact("dashboard-database-down.png")).await;
    proxy.set_down(false);
    until(
        &browser,
        "the page to recover",
        "return document.getElementById('banner').hidden
           && document.getElementById('status').dataset.state === 'live';",
    )
    .await;
    page_matches_stats(&app, &browser).await;

    // No request left the origin: the page's own resource timings, and every
    // request the browser's network layer saw for the page.
    let resources = browser
        .eval(
            "return performance.getEntriesByType('resource').map((e) => e.name);",
            json!([]),
        )
        .await;
    let resources: Vec<String> = serde_json::from_value(resources).unwrap();
    // (An open event stream has no timing entry until it ends: the network log below has it.)
    assert!(
        resources.iter().any(|r| r.ends_with("/dashboard/app.js")),
        "{resources:?}"
    );
    for name in &resources {
        assert!(name.starts_with(&format!("{origin}/")), "{name} is off the origin");
    }
    let mut requests = Vec::new();
    for entry in browser.log("performance").await {
        let message: Value = serde_json::from_str(entry["message"].as_str().unwrap()).unwrap();
        let method = message["message"]["method"].as_str().unwrap_or_default();
        if method == "Network.requestWillBeSent" {
            requests.push(
                message["message"]["params"]["request"]["url"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        assert_ne!(method, "Network.webSocketCreated");
    }
    assert!(
        requests.iter().any(|r| r.ends_with("/dashboard/app.js")),
        "{requests:?}"
    );
    assert!(
        requests.iter().any(|r| r.contains("/dashboard/events?window=1h")),
        "{requests:?}"
    );
    for url in &requests {
        assert!(url.starts_with(&format!("{origin}/")), "{url} is off the origin");
    }
    // No console errors (a CSP violation would be one).
    let errors: Vec<Value> = browser
        .log("browser")
        .await
        .into_iter()
        .filter(|e| e["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");

    drop(browser);
    app.shutdown().await;
    drop(proxy);
}
