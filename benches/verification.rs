//! In-process micro-benchmarks of the verification pipeline (no gRPC):
//!
//! - `verify/legacy_hs256_cold`: a legacy token never seen before (routing,
//!   HS256 signature and claims, principal from the user cache; seen once,
//!   it is not inserted in the token cache yet);
//! - `verify/legacy_hs256_cold_full_cache`: the same against a verifier whose
//!   token cache is full (the default 50,000 entries): the steady state of a
//!   replica that sees new tokens all the time (a legacy token seen once is
//!   not inserted; it enters the cache on its second sighting);
//! - `verify/clerk_rs256_cold`: a new Clerk RS256 session token
//!   (networkless key from a PEM) whose Clerk user is mapped;
//! - `verify/legacy_cached_hit`, `verify/clerk_cached_hit`: a token seen before
//!   (hash, cache hit, per-call checks, principal);
//! - `principal/by_clerk_cached`, `principal/by_id_cached`: principal
//!   resolution with the mapping (and user) already in the user cache;
//! - `reference/*`: jsonwebtoken alone on the same tokens, the floor; and
//!   the RS256 signature check alone through aws-lc-rs, with the key parsed
//!   on every call (what `jsonwebtoken` does) and parsed once (what the
//!   service does).
//!
//! A "cold" iteration gets a verifier with an empty token cache (built outside
//! the timed section) and a token it has not seen, so every iteration misses.
//!
//! Run: `cargo bench --bench verification` (add `-- --quick` for a short run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use identity::{
    config::Config,
    domain::{AuditOutcome, AuthModes, Caller, ClerkUserId, Email, UserCache, UserId},
    storage::{self, DatabaseOptions, NewAuditEvent, NewLegacyUser, Storage},
    verification::{Verdict, Verifier},
};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey, Header, Validation};
use serde_json::json;

const LEGACY_SECRET: &str = "bench-legacy-secret-0123456789abcdef";
const ISSUER: &str = "https://clerk.bench.example.com";
const USER_ID: &str = "6f1c2b9e-8a43-4f0e-9d57-0c8f3b1a2d44";
const CLERK_USER_ID: &str = "user_2benchmark0000000000000000";
/// Distinct RS256 tokens minted before measuring (RSA signing is slow).
const RS256_POOL: usize = 2_000;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

struct Setup {
    config: identity::config::VerificationConfig,
    storage: Arc<dyn Storage>,
    users: UserCache,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let storage = storage::connect(&url, &DatabaseOptions::default(), true).await.unwrap();
        let user_id = UserId::parse("id", USER_ID).unwrap();
        storage
            .insert_legacy_user(&NewLegacyUser {
                id: user_id,
                email: Email::parse("email", "bench@example.com").unwrap(),
                password_hash: Some("$2b$12$abc".into()),
            })
            .await
            .unwrap();
        let event = NewAuditEvent {
            caller: "bench".into(),
            action: "user.link".into(),
            user_id: Some(user_id),
            outcome: AuditOutcome::Success,
            detail: "bench".into(),
        };
        storage
            .link_user(
                user_id,
                &ClerkUserId::parse("clerk_user_id", CLERK_USER_ID).unwrap(),
                &event,
            )
            .await
            .unwrap();
        // The same variables the server reads, so new settings keep their defaults.
        let config = Config::from_vars(
            [
                ("IDENTITY_LEGACY_JWT_SECRET", LEGACY_SECRET.to_owned()),
                ("IDENTITY_CLERK_ISSUER", ISSUER.to_owned()),
                ("IDENTITY_CLERK_JWT_KEY", fixture("clerk_a.pub.pem")),
                ("IDENTITY_UNMAPPED_CLERK_USER", "reject".to_owned()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        )
        .unwrap()
        .verification;
        let users = UserCache::new(storage.clone(), config.user_cache_ttl.max(Duration::from_secs(3600)));
        Self {
            config,
            storage,
            users,
            _dir: dir,
        }
    }

    fn verifier(&self) -> Verifier {
        Verifier::new(
            &self.config,
            AuthModes::starting_with(self.storage.clone(), identity::domain::AuthMode::Dual),
            self.users.clone(),
            reqwest::Client::new(),
            std::sync::Arc::new(identity::metrics::AuthRecorder::default()),
        )
        .unwrap()
    }
}

fn legacy_token(i: usize) -> String {
    let claims = json!({ "sub": USER_ID, "exp": now() + 7200, "iat": now(), "jti": format!("bench-{i}") });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(LEGACY_SECRET.as_bytes()),
    )
    .unwrap()
}

fn clerk_tokens(count: usize) -> Vec<String> {
    let key = EncodingKey::from_rsa_pem(fixture("clerk_a.key.pem").as_bytes()).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("ins_clerk_a".into());
    header.typ = Some("JWT".into());
    (0..count)
        .map(|i| {
            let claims = json!({
                "sub": CLERK_USER_ID, "sid": format!("sess_bench{i}"), "iss": ISSUER,
                "azp": "https://app.example.com", "exp": now() + 7200, "nbf": now() - 5,
                "iat": now(), "jti": format!("bench{i}"), "v": 2, "sts": "active",
            });
            jsonwebtoken::encode(&header, &claims, &key).unwrap()
        })
        .collect()
}

fn accepted(verdict: Verdict) {
    assert!(matches!(verdict, Verdict::Accepted(_)), "{verdict:?}");
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let setup = rt.block_on(Setup::new());
    let caller = Caller::development();
    let rs_tokens = clerk_tokens(RS256_POOL);
    let next_rs = AtomicUsize::new(0);
    let next_legacy = AtomicUsize::new(0);

    // Warm the user cache (mapping and user), as on a running replica.
    let warm = setup.verifier();
    rt.block_on(async {
        accepted(warm.verify(&caller, &legacy_token(0), None).await.unwrap());
        accepted(warm.verify(&caller, &rs_tokens[0], None).await.unwrap());
    });

    let mut group = c.benchmark_group("verify");
    group.bench_function("legacy_hs256_cold", |b| {
        b.to_async(&rt).iter_batched(
            || {
                (
                    setup.verifier(),
                    legacy_token(next_legacy.fetch_add(1, Ordering::Relaxed)),
                )
            },
            |(verifier, token)| {
                let caller = &caller;
                async move {
                    accepted(verifier.verify(caller, &token, None).await.unwrap());
                    verifier
                }
            },
            BatchSize::SmallInput,
        );
    });
    let churn = setup.verifier();
    rt.block_on(async {
        let capacity = usize::try_from(setup.config.token_cache_size).unwrap_or(100_000);
        for _ in 0..capacity + capacity / 10 {
            let token = legacy_token(next_legacy.fetch_add(1, Ordering::Relaxed));
            // Twice: a legacy token enters the cache on its second sighting.
            accepted(churn.verify(&caller, &token, None).await.unwrap());
            accepted(churn.verify(&caller, &token, None).await.unwrap());
        }
    });
    group.bench_function("legacy_hs256_cold_full_cache", |b| {
        b.to_async(&rt).iter_batched(
            || legacy_token(next_legacy.fetch_add(1, Ordering::Relaxed)),
            |token| {
                let (churn, caller) = (&churn, &caller);
                async move { accepted(churn.verify(caller, &token, None).await.unwrap()) }
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("clerk_rs256_cold", |b| {
        b.to_async(&rt).iter_batched(
            || {
                let i = next_rs.fetch_add(1, Ordering::Relaxed) % rs_tokens.len();
                (setup.verifier(), rs_tokens[i].as_str())
            },
            |(verifier, token)| {
                let caller = &caller;
                async move {
                    accepted(verifier.verify(caller, token, None).await.unwrap());
                    verifier
                }
            },
            BatchSize::SmallInput,
        );
    });
    let hot = setup.verifier();
    let legacy = legacy_token(usize::MAX);
    let clerk = rs_tokens[1].clone();
    rt.block_on(async {
        accepted(hot.verify(&caller, &legacy, None).await.unwrap());
        accepted(hot.verify(&caller, &clerk, None).await.unwrap());
    });
    group.bench_function("legacy_cached_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { accepted(hot.verify(&caller, &legacy, None).await.unwrap()) });
    });
    group.bench_function("clerk_cached_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { accepted(hot.verify(&caller, &clerk, None).await.unwrap()) });
    });
    group.finish();

    let mut group = c.benchmark_group("principal");
    let clerk_id = ClerkUserId::parse("clerk_user_id", CLERK_USER_ID).unwrap();
    let user_id = UserId::parse("id", USER_ID).unwrap();
    group.bench_function("by_clerk_cached", |b| {
        b.to_async(&rt)
            .iter(|| async { assert!(setup.users.by_clerk(&clerk_id).await.unwrap().is_some()) });
    });
    group.bench_function("by_id_cached", |b| {
        b.to_async(&rt)
            .iter(|| async { assert!(setup.users.by_id(user_id).await.unwrap().is_some()) });
    });
    group.finish();

    let mut group = c.benchmark_group("reference");
    let rsa = DecodingKey::from_rsa_pem(fixture("clerk_a.pub.pem").as_bytes()).unwrap();
    let mut rs_validation = Validation::new(Algorithm::RS256);
    rs_validation.set_issuer(&[ISSUER]);
    group.bench_function("jsonwebtoken_rs256_decode", |b| {
        b.iter(|| jsonwebtoken::decode::<serde_json::Value>(&clerk, &rsa, &rs_validation).unwrap());
    });
    // The signature check alone, as aws-lc-rs does it for jsonwebtoken (the
    // key parsed on every call) and with the key parsed once.
    let (message, signature) = clerk.rsplit_once('.').unwrap();
    let signature = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, signature).unwrap();
    let DecodingKeyKind::SecretOrDer(der) = rsa.kind() else {
        panic!("a PEM key is DER")
    };
    let params = &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256;
    group.bench_function("aws_lc_rs256_key_parsed_per_call", |b| {
        b.iter(|| {
            aws_lc_rs::signature::UnparsedPublicKey::new(params, der)
                .verify(message.as_bytes(), &signature)
                .unwrap()
        });
    });
    let prepared = aws_lc_rs::signature::ParsedPublicKey::new(params, der).unwrap();
    group.bench_function("aws_lc_rs256_key_prepared", |b| {
        b.iter(|| prepared.verify_sig(message.as_bytes(), &signature).unwrap());
    });
    let hmac = DecodingKey::from_secret(LEGACY_SECRET.as_bytes());
    let mut hs_validation = Validation::new(Algorithm::HS256);
    hs_validation.validate_aud = false;
    group.bench_function("jsonwebtoken_hs256_decode", |b| {
        b.iter(|| jsonwebtoken::decode::<serde_json::Value>(&legacy, &hmac, &hs_validation).unwrap());
    });
    group.finish();
}

criterion_group! {
    name = verification;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(verification);
