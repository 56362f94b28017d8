//! The built-in migration dashboard on the HTTP listener (beside `/metrics`):
//! `GET /dashboard` is a self-contained page (HTML, CSS and JavaScript
//! embedded in the binary, nothing fetched from elsewhere, a strict
//! Content-Security-Policy), `GET /` redirects to it, and
//! `GET /dashboard/events` streams its figures as server-sent events.
//!
//! The figures are the cluster-wide ones of `GetMigrationStats`, taken from
//! the snapshots `StreamMigrationMetrics` shares
//! ([`MigrationStats::shared_snapshot`]): however many tabs are open, a
//! replica computes one snapshot per window per second. Each open page holds
//! a stream slot like a `StreamMigrationMetrics` stream, within the same
//! bounds: 8 per caller (here, per client address) and 256 per replica in all.
//! A stream is the response body itself, with no task of its own: a closed
//! tab drops it, and with it the slot.
//!
//! Only aggregates leave: counts, rates and percentiles, never an email, a
//! user id or a token.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{ConnectInfo, State},
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{
        IntoResponse, Redirect, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    domain::{AuthModeState, AuthModes, Caller, DomainError, Scope},
    metrics::{MigrationStats, StatsSnapshot, Window},
    storage::{AuthPoint, BulkJobRecord, BulkJobState, Storage},
};

const PAGE: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/icon.svg");

/// Only this origin's own files; no inline code, no frames, no forms.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Time between two snapshots on one page.
const INTERVAL: Duration = Duration::from_secs(2);
/// The per-minute chart covers this many minutes.
const SERIES_MINUTES: i64 = 60;
/// Extras (chart, auth mode provenance, failed deliveries) are shared like
/// snapshots: computed at most once per this, however many pages are open.
const EXTRAS_TTL: Duration = Duration::from_secs(1);

/// What the dashboard reads.
#[derive(Clone)]
pub struct Dashboard {
    stats: MigrationStats,
    modes: AuthModes,
    storage: Arc<dyn Storage>,
    extras: moka::future::Cache<(), Arc<Extras>>,
    stop: watch::Receiver<bool>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard").finish_non_exhaustive()
    }
}

impl Dashboard {
    pub fn new(
        stats: MigrationStats,
        modes: AuthModes,
        storage: Arc<dyn Storage>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            stats,
            modes,
            storage,
            extras: moka::future::Cache::builder()
                .max_capacity(1)
                .time_to_live(EXTRAS_TTL)
                .build(),
            stop,
        }
    }
}

/// The dashboard's routes, or none when `enabled` is false (`IDENTITY_DASHBOARD=false`).
pub fn router(enabled: bool, dashboard: Dashboard) -> Router {
    if !enabled {
        return Router::new();
    }
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard", get(|| async { asset(PAGE, "text/html; charset=utf-8") }))
        .route("/dashboard/", get(|| async { Redirect::to("/dashboard") }))
        .route(
            "/dashboard/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/dashboard/icon.svg", get(|| async { asset(ICON, "image/svg+xml") }))
        .route("/dashboard/events", get(events))
        .with_state(dashboard)
}

/// The security headers every dashboard response carries.
fn security_headers(headers: &mut HeaderMap) {
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
        (
            header::HeaderName::from_static("cross-origin-resource-policy"),
            "same-origin",
        ),
        (
            header::HeaderName::from_static("permissions-policy"),
            "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    security_headers(response.headers_mut());
    response
}

/// `?window=5m|1h|1d|all` (default 1h).
fn window_of(uri: &Uri) -> Result<Window, String> {
    let raw = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "window")
        .map(|(_, v)| v.into_owned());
    match raw.as_deref() {
        None | Some("1h") => Ok(Window::LastHour),
        Some("5m") => Ok(Window::Last5Minutes),
        Some("1d") => Ok(Window::LastDay),
        Some("all") => Ok(Window::AllTime),
        Some(_) => Err("window must be 5m, 1h, 1d or all".into()),
    }
}

fn window_name(window: Window) -> &'static str {
    match window {
        Window::Last5Minutes => "5m",
        Window::LastHour => "1h",
        Window::LastDay => "1d",
        Window::AllTime => "all",
    }
}

/// `GET /dashboard/events`: a `snapshot` event at once and every two
/// seconds; an `unavailable` event instead while the figures cannot be read
/// (the stream stays open and recovers by itself).
async fn events(State(dashboard): State<Dashboard>, ConnectInfo(peer): ConnectInfo<SocketAddr>, uri: Uri) -> Response {
    let window = match window_of(&uri) {
        Ok(window) => window,
        Err(message) => return plain(StatusCode::BAD_REQUEST, message),
    };
    // The page holds a slot like a StreamMigrationMetrics stream; its
    // "caller" is the client address, a read-only one.
    let caller = Caller::new(format!("dashboard {}", peer.ip()), vec![Scope::Verify]);
    let slot = match dashboard.stats.open_stream(&caller) {
        Ok(slot) => slot,
        Err(DomainError::ResourceExhausted { message, retry_after }) => {
            let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, message);
            if let Ok(value) = HeaderValue::from_str(&retry_after.as_secs().to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return response;
        }
        Err(err) => return plain(StatusCode::FORBIDDEN, err.to_string()),
    };
    let feed = Feed {
        dashboard,
        caller,
        window,
        first: true,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        if !feed.first {
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                // The server is shutting down: end the stream, so the HTTP
                // listener's graceful shutdown does not wait for the tab.
                _ = feed.dashboard.stop.changed() => return None,
            }
        }
        feed.first = false;
        let event = feed.next_event().await;
        Some((Ok::<Event, Infallible>(event), feed))
    });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    security_headers(response.headers_mut());
    response
}

fn plain(status: StatusCode, message: String) -> Response {
    let mut response = (status, message).into_response();
    security_headers(response.headers_mut());
    response
}

/// One open page: what it reads, and its stream slot (freed on drop).
struct Feed {
    dashboard: Dashboard,
    caller: Caller,
    window: Window,
    first: bool,
    _slot: crate::metrics::StreamSlot,
}

impl Feed {
    async fn next_event(&self) -> Event {
        let d = &self.dashboard;
        let read = async {
            let snapshot = d.stats.shared_snapshot(&self.caller, self.window, 0).await?;
            let extras = d
                .extras
                .try_get_with((), read_extras(d.storage.clone(), d.modes.clone()))
                .await
                .map_err(|e| match e.as_ref() {
                    DomainError::Unavailable { message, .. } => DomainError::Unavailable {
                        message: message.clone(),
                        source: None,
                    },
                    other => DomainError::Internal(crate::domain::error_chain(other).into()),
                })?;
            Ok::<_, DomainError>(View::new(snapshot, &extras))
        };
        match read.await {
            Ok(view) => match serde_json::to_string(&view) {
                Ok(json) => Event::default().event("snapshot").data(json),
                Err(err) => unavailable(&err.to_string()),
            },
            Err(err) => {
                tracing::debug!(error = %err, "dashboard figures unavailable");
                unavailable(match err {
                    DomainError::Unavailable { .. } => "the database is unreachable",
                    _ => "the figures cannot be read",
                })
            }
        }
    }
}

fn unavailable(reason: &str) -> Event {
    let body = serde_json::json!({ "at": Utc::now().to_rfc3339(), "reason": reason });
    Event::default().event("unavailable").data(body.to_string())
}

/// What the page shows beyond a stats snapshot.
#[derive(Debug)]
struct Extras {
    series: Vec<AuthPoint>,
    series_from: i64,
    failed_deliveries: i64,
    mode: AuthModeState,
}

async fn read_extras(storage: Arc<dyn Storage>, modes: AuthModes) -> Result<Arc<Extras>, DomainError> {
    let now = Utc::now().timestamp();
    let current_minute = now - now.rem_euclid(60);
    let series_from = current_minute - (SERIES_MINUTES - 1) * 60;
    let (series, outbox, mode) = tokio::try_join!(
        async { storage.auth_series(series_from).await.map_err(DomainError::from) },
        async { storage.outbox_counts().await.map_err(DomainError::from) },
        modes.stored(),
    )?;
    Ok(Arc::new(Extras {
        series,
        series_from,
        failed_deliveries: outbox.failed,
        mode,
    }))
}

// The page's data: aggregates only (no email, user id, token, nor the
// API key names of callers other than the one that set the auth mode).

#[derive(Debug, Serialize)]
struct View {
    at: DateTime<Utc>,
    window: &'static str,
    users: UsersView,
    auth: AuthView,
    methods: Vec<MethodView>,
    latency_us: LatencyView,
    series: SeriesView,
    invitations: InvitationsView,
    bulk_job: Option<BulkView>,
    readiness: ReadinessView,
    auth_mode: ModeView,
    /// The last reconciliation pass with Clerk: counts only (no Clerk ids).
    clerk_sync: Option<std::collections::BTreeMap<&'static str, std::collections::BTreeMap<String, String>>>,
}

#[derive(Debug, Serialize)]
struct UsersView {
    total: i64,
    legacy_only: i64,
    migrated: i64,
    clerk_native: i64,
    /// (migrated + Clerk-native) / total, as GetMigrationStats' migrated_ratio.
    migrated_ratio: f64,
}

#[derive(Debug, Serialize)]
struct AuthView {
    attempts: i64,
    successes: i64,
    rejections: i64,
    errors: i64,
    success_rate: f64,
    error_rate: f64,
}

#[derive(Debug, Serialize)]
struct MethodView {
    method: String,
    attempts: i64,
    successes: i64,
    errors: i64,
    rejections: Vec<ReasonView>,
}

#[derive(Debug, Serialize)]
struct ReasonView {
    reason: String,
    count: i64,
}

#[derive(Debug, Serialize)]
struct LatencyView {
    p50: u64,
    p95: u64,
    p99: u64,
}

/// Verifications per minute over the last hour: `from` is the first
/// minute (Unix seconds), each array has one value per minute.
#[derive(Debug, Serialize)]
struct SeriesView {
    from: i64,
    step_seconds: i64,
    methods: Vec<MethodSeries>,
}

#[derive(Debug, Serialize)]
struct MethodSeries {
    method: String,
    attempts: Vec<i64>,
    successes: Vec<i64>,
}

#[derive(Debug, Serialize)]
struct InvitationsView {
    sent: i64,
    pending: i64,
    completed: i64,
    expired: i64,
    /// Emails the outbox gave up on.
    failed_deliveries: i64,
}

#[derive(Debug, Serialize)]
struct BulkView {
    state: &'static str,
    total: i64,
    processed: i64,
    created: i64,
    linked_existing: i64,
    skipped: i64,
    failed: i64,
    started_at: DateTime<Utc>,
    /// processed / total (0 when the job had nothing to do).
    ratio: f64,
    /// Seconds left at the job's average pace so far, while it runs.
    eta_seconds: Option<i64>,
}

#[derive(Debug, Serialize)]
struct ReadinessView {
    days: u32,
    active_users: i64,
    would_be_locked_out: i64,
    legacy_verifications_by_migrated: i64,
}

#[derive(Debug, Serialize)]
struct ModeView {
    /// The mode this replica enforces.
    mode: &'static str,
    /// The caller (API key name, or `cli`) that last set it; `None` while never set.
    set_by: Option<String>,
    set_at: Option<DateTime<Utc>>,
}

impl View {
    fn new(s: StatsSnapshot, extras: &Extras) -> Self {
        let users = s.users;
        let total = users.legacy_only + users.migrated + users.clerk_native;
        let migrated_ratio = if total > 0 {
            (users.migrated + users.clerk_native) as f64 / total as f64
        } else {
            0.0
        };
        let set = extras.mode.updated_at.is_some();
        Self {
            at: s.at,
            window: window_name(s.window),
            users: UsersView {
                total,
                legacy_only: users.legacy_only,
                migrated: users.migrated,
                clerk_native: users.clerk_native,
                migrated_ratio,
            },
            auth: AuthView {
                attempts: s.attempts,
                successes: s.successes,
                rejections: s.rejections,
                errors: s.errors,
                success_rate: s.success_rate,
                error_rate: s.error_rate,
            },
            methods: s
                .methods
                .into_iter()
                .map(|m| MethodView {
                    method: m.method,
                    attempts: m.attempts,
                    successes: m.successes,
                    errors: m.errors,
                    rejections: m
                        .rejections
                        .into_iter()
                        .map(|(reason, count)| ReasonView { reason, count })
                        .collect(),
                })
                .collect(),
            latency_us: LatencyView {
                p50: s.p50_us,
                p95: s.p95_us,
                p99: s.p99_us,
            },
            series: series(&extras.series, extras.series_from),
            invitations: InvitationsView {
                sent: s.invitations.sent,
                pending: s.invitations.pending,
                completed: s.invitations.redeemed,
                expired: s.invitations.expired,
                failed_deliveries: extras.failed_deliveries,
            },
            bulk_job: s.bulk_job.as_ref().map(|job| bulk(job, s.at)),
            readiness: ReadinessView {
                days: s.readiness_days,
                active_users: s.readiness.active_users,
                would_be_locked_out: s.readiness.legacy_only_unlinked,
                legacy_verifications_by_migrated: s.readiness.legacy_verifications_by_migrated,
            },
            auth_mode: ModeView {
                mode: s.auth_mode.as_str(),
                set_by: set.then(|| extras.mode.updated_by.clone()),
                set_at: extras.mode.updated_at,
            },
            clerk_sync: s.reconciliation.as_ref().map(clerk_sync),
        }
    }
}

/// The page's "Clerk sync" card: the last reconciliation pass, by counts.
fn clerk_sync(
    job: &crate::storage::ReconcileJobRecord,
) -> std::collections::BTreeMap<&'static str, std::collections::BTreeMap<String, String>> {
    let pass = crate::domain::ReconcileProgress::from_record(job);
    let mut figures = std::collections::BTreeMap::new();
    figures.insert("1 state".to_owned(), pass.state.as_db().to_owned());
    figures.insert("2 mode".to_owned(), if pass.fix { "fix" } else { "dry run" }.to_owned());
    figures.insert(
        "3 Clerk users seen".to_owned(),
        pass.summary.clerk_users_seen.to_string(),
    );
    figures.insert(
        "4 mappings checked".to_owned(),
        pass.summary.mappings_checked.to_string(),
    );
    for kind in crate::domain::reconcile::DRIFT_KINDS {
        let drift = pass.summary.drift.get(kind).cloned().unwrap_or_default();
        figures.insert(
            format!("5 {kind}"),
            format!("{} found, {} fixed", drift.count, drift.fixed),
        );
    }
    if let Some(finished) = pass.finished_at {
        figures.insert("6 finished".to_owned(), finished.to_rfc3339());
    }
    std::collections::BTreeMap::from([("reconciliation", figures)])
}

fn series(points: &[AuthPoint], from: i64) -> SeriesView {
    let len = usize::try_from(SERIES_MINUTES).unwrap_or(60);
    let mut methods: Vec<MethodSeries> = Vec::new();
    for point in points {
        let Ok(i) = usize::try_from((point.bucket - from) / 60) else {
            continue;
        };
        if i >= len {
            continue;
        }
        let entry = match methods.iter().position(|m| m.method == point.method) {
            Some(found) => &mut methods[found],
            None => {
                methods.push(MethodSeries {
                    method: point.method.clone(),
                    attempts: vec![0; len],
                    successes: vec![0; len],
                });
                let last = methods.len() - 1;
                &mut methods[last]
            }
        };
        entry.attempts[i] += point.attempts;
        entry.successes[i] += point.successes;
    }
    methods.sort_by(|a, b| a.method.cmp(&b.method));
    SeriesView {
        from,
        step_seconds: 60,
        methods,
    }
}

fn bulk(job: &BulkJobRecord, now: DateTime<Utc>) -> BulkView {
    let c = job.counters;
    let elapsed = (now - job.started_at).num_milliseconds().max(1) as f64 / 1000.0;
    let rate = c.processed as f64 / elapsed;
    let remaining = (job.total - c.processed).max(0) as f64;
    BulkView {
        state: job.state.as_db(),
        total: job.total,
        processed: c.processed,
        created: c.created,
        linked_existing: c.linked_existing,
        skipped: c.skipped,
        failed: c.failed,
        started_at: job.started_at,
        ratio: if job.total > 0 {
            (c.processed as f64 / job.total as f64).min(1.0)
        } else {
            0.0
        },
        eta_seconds: (job.state == BulkJobState::Running && rate > 0.0).then(|| (remaining / rate).ceil() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_one_value_per_minute_and_method() {
        let from = 1_000_020;
        let points = vec![
            AuthPoint {
                bucket: from,
                method: "legacy_jwt".into(),
                attempts: 3,
                successes: 2,
            },
            AuthPoint {
                bucket: from + 59 * 60,
                method: "clerk".into(),
                attempts: 5,
                successes: 5,
            },
            // Outside the hour: ignored.
            AuthPoint {
                bucket: from - 60,
                method: "clerk".into(),
                attempts: 7,
                successes: 7,
            },
        ];
        let view = series(&points, from);
        assert_eq!(view.methods.len(), 2);
        assert_eq!(view.methods[0].method, "clerk");
        assert_eq!(view.methods[0].attempts.len(), 60);
        assert_eq!(view.methods[0].attempts[59], 5);
        assert_eq!(view.methods[1].attempts[0], 3);
        assert_eq!(view.methods[1].successes[0], 2);
        assert_eq!(view.methods[0].attempts.iter().sum::<i64>(), 5);
    }

    #[test]
    fn windows_parse_from_the_query() {
        let uri = |q: &str| q.parse::<Uri>().unwrap();
        assert_eq!(window_of(&uri("/dashboard/events")).unwrap(), Window::LastHour);
        assert_eq!(
            window_of(&uri("/dashboard/events?window=5m")).unwrap(),
            Window::Last5Minutes
        );
        assert_eq!(
            window_of(&uri("/dashboard/events?window=all")).unwrap(),
            Window::AllTime
        );
        assert!(window_of(&uri("/dashboard/events?window=2y")).is_err());
    }
}
