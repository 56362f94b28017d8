//! The chart's Grafana dashboard and alert rules against the real service:
//! after exercising every part that exports figures (verifications, Clerk's
//! JWKS, the token cache, gRPC calls, the outbox, a bulk job, the stats
//! flusher and the health loop), every metric name the dashboard's queries
//! and the alert rules use exists in `/metrics`.

use std::{collections::BTreeSet, time::Duration};

use identity::{
    config::VerificationConfig,
    domain::BulkConfig,
    pb::{self, StartBulkMigrationRequest},
};
use tokio_stream::StreamExt;

use crate::common::{
    TestApp, TestDb, accepted, clerk_config,
    fake_clerk::FakeClerk,
    legacy_config, rejected, test_config,
    tokens::{clerk, clerk_claims, legacy, legacy_claims},
};

const DASHBOARD: &str = include_str!("../../helm/identity/dashboards/identity.json");
const RULES: &str = include_str!("../../helm/identity/templates/prometheusrule.yaml");

/// Metric names in PromQL text: every name of the service starts with `identity_`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("identity_") {
        let before = rest[..start].chars().next_back();
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Not the tail of a longer identifier (nor a chart helper like `identity.name`).
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The PromQL of the Grafana dashboard: its panels' targets and its variables' queries.
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            queries.push(query.to_owned());
        }
    }
    queries
}

/// The alert rules' expressions (the template's `expr:` entries, one line or a block).
fn rule_expressions() -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = RULES.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let mut expr = value.trim().trim_start_matches("|-").to_owned();
        while let Some(next) = lines.peek() {
            if next.len() - next.trim_start().len() <= indent {
                break;
            }
            expr.push(' ');
            expr.push_str(next.trim());
            lines.next();
        }
        exprs.push(expr);
    }
    exprs
}

/// Sample names in a Prometheus text exposition.
fn exported(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

async fn the_dashboard_and_alerts_only_use_real_metric_names(db: TestDb) {
    let queries = dashboard_queries();
    let exprs = rule_expressions();
    assert_eq!(exprs.len(), 8, "one expression per alert: {exprs:?}");
    let mut wanted = BTreeSet::new();
    for text in queries.iter().chain(&exprs) {
        let names = names_in(text);
        assert!(!names.is_empty(), "no metric in {text}");
        wanted.extend(names);
    }

    // Exercise the service: every part that exports figures.
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
    let app = TestApp::spawn_with(db, config, keys).await;
    let ann = app.legacy_user("ann@example.com").await;
    let bob = app.legacy_user("bob@example.com").await;
    let token = legacy(legacy_claims(&ann.to_string()));
    for _ in 0..3 {
        accepted(app.verify(&token).await);
    }
    assert_eq!(
        rejected(app.verify("not-a-token").await),
        pb::RejectionReason::Malformed
    );
    accepted(
        app.verify(&clerk("clerk_a", "ins_clerk_a", clerk_claims(&fake.url(), "user_new")))
            .await,
    );
    let mut progress = app
        .admin()
        .start_bulk_migration(StartBulkMigrationRequest {
            user_ids: vec![bob.to_string()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(60), progress.next())
        .await
        .expect("bulk progress")
    {
        item.unwrap();
    }

    // Background loops (health, outbox, stats flush) publish every second in tests.
    let url = format!("http://{}/metrics", app.metrics_addr.expect("metrics served"));
    let mut missing = wanted.clone();
    for _ in 0..100 {
        let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
        let have = exported(&body);
        missing = wanted.difference(&have).cloned().collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        missing.is_empty(),
        "the chart's dashboard or alerts use metrics /metrics does not have: {missing:?}"
    );
    app.shutdown().await;
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = names_in(
        r#"sum(rate(identity_verifications_total{namespace="$namespace", outcome="error"}[5m])) / max by (pod) (identity_serving{ {{- $sel }}}) {{ include "identity.name" . }} my_identity_x"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["identity_serving", "identity_verifications_total"]
    );
    let exprs = rule_expressions();
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("outcome=\"error\"") && e.contains("> {{")),
        "{exprs:?}"
    );
    assert!(
        dashboard_queries()
            .iter()
            .any(|q| q.contains("histogram_quantile(0.99"))
    );
}

crate::backend_tests!(the_dashboard_and_alerts_only_use_real_metric_names);
