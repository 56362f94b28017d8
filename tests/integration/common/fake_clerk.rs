//! A fake Clerk instance on loopback: the Frontend API JWKS, the Backend
//! API's `/v1/jwks` and `/v1/users/{id}`, with key rotation, an outage
//! switch and request counters.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};

pub const SECRET_KEY: &str = "sk_test_fake_secret";

#[derive(Default)]
pub struct FakeState {
    pub jwks: Mutex<Vec<Value>>,
    pub users: Mutex<HashMap<String, Value>>,
    pub down: AtomicBool,
    pub jwks_fetches: AtomicUsize,
    pub user_fetches: AtomicUsize,
    pub other_requests: AtomicUsize,
    /// Users of the Backend API's user management (bulk import).
    pub directory: Mutex<Vec<Value>>,
    pub creates: AtomicUsize,
    /// `GET /v1/users` lists answered (faults excluded).
    pub list_requests: AtomicUsize,
    /// Backend API requests seen (user management), for fault injection.
    pub api_requests: AtomicUsize,
    /// Request numbers answered with 429 (Retry-After: `retry_after`, 1 s when 0) and with 500.
    pub throttle_at: Mutex<Vec<usize>>,
    pub retry_after: AtomicUsize,
    pub error_at: Mutex<Vec<usize>>,
    /// Fault injection: a delay before every JWKS and user answer, and a
    /// raw answer (status, content type, body) in place of the real one.
    pub delay: Mutex<std::time::Duration>,
    pub jwks_answer: Mutex<Option<Raw>>,
    pub user_answer: Mutex<Option<Raw>>,
}

/// An answer as a misbehaving server sends it.
#[derive(Clone)]
pub struct Raw {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Raw {
    fn respond(self) -> Response {
        (self.status, [("content-type", self.content_type)], self.body).into_response()
    }
}

async fn injected_delay(state: &FakeState) {
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

pub struct FakeClerk {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeClerk {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn jwk(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}.jwk.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn jwks(State(state): State<Arc<FakeState>>) -> Response {
    if state.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    injected_delay(&state).await;
    if let Some(raw) = state.jwks_answer.lock().unwrap().clone() {
        return raw.respond();
    }
    let keys = state.jwks.lock().unwrap().clone();
    Json(json!({ "keys": keys })).into_response()
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {SECRET_KEY}"))
}

async fn backend_jwks(State(state): State<Arc<FakeState>>, headers: HeaderMap) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    jwks(State(state)).await
}

async fn user(State(state): State<Arc<FakeState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if state.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    state.user_fetches.fetch_add(1, Ordering::SeqCst);
    injected_delay(&state).await;
    if let Some(raw) = state.user_answer.lock().unwrap().clone() {
        return raw.respond();
    }
    let in_directory = || {
        state
            .directory
            .lock()
            .unwrap()
            .iter()
            .find(|u| u["id"].as_str() == Some(id.as_str()))
            .cloned()
    };
    let known = state.users.lock().unwrap().get(&id).cloned();
    match known.or_else(in_directory) {
        Some(user) => Json(user).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"errors":[{"code":"resource_not_found"}]})),
        )
            .into_response(),
    }
}

/// Counts a user-management request and answers with an injected fault when due.
fn injected_fault(state: &FakeState) -> Option<Response> {
    let n = state.api_requests.fetch_add(1, Ordering::SeqCst) + 1;
    if state.throttle_at.lock().unwrap().contains(&n) {
        let seconds = state.retry_after.load(Ordering::SeqCst).max(1).to_string();
        return Some((StatusCode::TOO_MANY_REQUESTS, [("retry-after", seconds)], "slow down").into_response());
    }
    if state.error_at.lock().unwrap().contains(&n) {
        return Some(StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    None
}

async fn list_users(State(state): State<Arc<FakeState>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if let Some(fault) = injected_fault(&state) {
        return fault;
    }
    state.list_requests.fetch_add(1, Ordering::SeqCst);
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .into_owned()
        .collect();
    let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let ids: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "user_id")
        .map(|(_, v)| v.as_str())
        .collect();
    let directory = state.directory.lock().unwrap();
    let found: Vec<Value> = directory
        .iter()
        .filter(|u| match (get("external_id"), get("email_address")) {
            (Some(external), _) => u["external_id"].as_str() == Some(external.as_str()),
            (None, Some(email)) => {
                u["email_addresses"][0]["email_address"].as_str().map(str::to_lowercase) == Some(email.to_lowercase())
            }
            (None, None) => true,
        })
        .filter(|u| ids.is_empty() || ids.contains(&u["id"].as_str().unwrap_or_default()))
        .cloned()
        .collect();
    // Paging as Clerk's: `offset` then at most `limit` (Clerk caps it at 500).
    let offset = get("offset").and_then(|o| o.parse().ok()).unwrap_or(0usize);
    let limit = get("limit").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX).min(500);
    let page: Vec<Value> = found.into_iter().skip(offset).take(limit).collect();
    Json(Value::Array(page)).into_response()
}

async fn create_user(State(state): State<Arc<FakeState>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if let Some(fault) = injected_fault(&state) {
        return fault;
    }
    let email = body["email_address"][0].as_str().unwrap_or_default().to_lowercase();
    let mut directory = state.directory.lock().unwrap();
    if directory
        .iter()
        .any(|u| u["email_addresses"][0]["email_address"].as_str().map(str::to_lowercase) == Some(email.clone()))
    {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"errors": [{"code": "form_identifier_exists"}]})),
        )
            .into_response();
    }
    let n = state.creates.fetch_add(1, Ordering::SeqCst) + 1;
    let user = fake_user(&format!("user_created{n}"), body["external_id"].as_str(), &email);
    let mut stored = user.clone();
    stored["password_digest"] = body["password_digest"].clone();
    stored["password_hasher"] = body["password_hasher"].clone();
    directory.push(stored);
    Json(user).into_response()
}

async fn patch_user(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if let Some(fault) = injected_fault(&state) {
        return fault;
    }
    let mut directory = state.directory.lock().unwrap();
    match directory.iter_mut().find(|u| u["id"].as_str() == Some(id.as_str())) {
        Some(user) => {
            user["external_id"] = body["external_id"].clone();
            Json(user.clone()).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A Clerk user as the Backend API shows it.
pub fn fake_user(id: &str, external_id: Option<&str>, email: &str) -> Value {
    json!({
        "id": id,
        "external_id": external_id,
        "primary_email_address_id": "idn_1",
        "email_addresses": [{"id": "idn_1", "email_address": email, "verification": {"status": "verified"}}]
    })
}

async fn fallback(State(state): State<Arc<FakeState>>) -> Response {
    state.other_requests.fetch_add(1, Ordering::SeqCst);
    StatusCode::NOT_FOUND.into_response()
}

impl FakeClerk {
    /// Starts with the given keys published (fixture names, e.g. "clerk_a").
    pub async fn start(keys: &[&str]) -> Self {
        let state = Arc::new(FakeState::default());
        *state.jwks.lock().unwrap() = keys.iter().map(|k| jwk(k)).collect();
        let app = Router::new()
            .route("/.well-known/jwks.json", get(jwks))
            .route("/v1/jwks", get(backend_jwks))
            .route("/v1/users", get(list_users).post(create_user))
            .route("/v1/users/{id}", get(user).patch(patch_user))
            .fallback(fallback)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn publish(&self, keys: &[&str]) {
        *self.state.jwks.lock().unwrap() = keys.iter().map(|k| jwk(k)).collect();
    }

    /// Delays every JWKS and user answer by `delay`.
    pub fn set_delay(&self, delay: std::time::Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// Answers JWKS requests with `raw` (None: the published keys again).
    pub fn set_jwks_answer(&self, raw: Option<Raw>) {
        *self.state.jwks_answer.lock().unwrap() = raw;
    }

    /// Answers user look-ups with `raw` (None: the real users again).
    pub fn set_user_answer(&self, raw: Option<Raw>) {
        *self.state.user_answer.lock().unwrap() = raw;
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Adds a Backend API user with a primary email.
    pub fn add_user(&self, id: &str, email: &str, verified: bool) {
        let user = json!({
            "id": id,
            "external_id": null,
            "primary_email_address_id": "idn_1",
            "email_addresses": [{
                "id": "idn_1",
                "email_address": email,
                "verification": { "status": if verified { "verified" } else { "unverified" } }
            }]
        });
        self.state.users.lock().unwrap().insert(id.to_owned(), user);
    }
}
