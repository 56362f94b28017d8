//! Minting test tokens: legacy HS JWTs and Clerk-style RS session tokens.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

pub const LEGACY_SECRET: &str = "legacy-test-secret-0123456789abcdef";

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn legacy(claims: Value) -> String {
    legacy_with(Algorithm::HS256, LEGACY_SECRET.as_bytes(), claims)
}

pub fn legacy_with(alg: Algorithm, secret: &[u8], claims: Value) -> String {
    encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// Standard legacy claims for a user, valid for an hour.
pub fn legacy_claims(user_id: &str) -> Value {
    json!({ "sub": user_id, "exp": now() + 3600, "iat": now(), "jti": uuid::Uuid::new_v4().to_string() })
}

fn private_pem(key: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{key}.key.pem", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

pub fn public_pem(key: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/{key}.pub.pem", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// A Clerk session token signed by fixture `key` with `kid`.
pub fn clerk(key: &str, kid: &str, claims: Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    header.typ = Some("JWT".into());
    encode(&header, &claims, &EncodingKey::from_rsa_pem(&private_pem(key)).unwrap()).unwrap()
}

/// A token with a hand-written header (for `cat`, `typ`, `jku`, `alg: none`...).
pub fn raw(header: Value, claims: Value, sign_with: Option<(&str, Algorithm)>) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!(
        "{}.{}",
        engine.encode(header.to_string()),
        engine.encode(claims.to_string())
    );
    let signature = match sign_with {
        None => String::new(),
        Some((key, alg)) => {
            let key = EncodingKey::from_rsa_pem(&private_pem(key)).unwrap();
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, alg).unwrap()
        }
    };
    format!("{message}.{signature}")
}

/// Standard Clerk session claims for `sub`, valid for a minute.
pub fn clerk_claims(issuer: &str, sub: &str) -> Value {
    json!({
        "sub": sub,
        "sid": "sess_2abc",
        "iss": issuer,
        "azp": "https://app.example.com",
        "exp": now() + 60,
        "nbf": now() - 5,
        "iat": now(),
        "jti": uuid::Uuid::new_v4().simple().to_string(),
        "v": 2,
        "sts": "active",
    })
}
