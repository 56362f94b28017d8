//! The application's own HS-signed JWTs: the internal user id in a
//! configurable claim (`sub` by default; LeafLock signs `user_id`).
//!
//! The payload is read once: before the signature check to route the token
//! (its `iss`), and trusted only after [`LegacyVerifier::verify`] has checked
//! the HMAC with a key prepared at start-up.

use aws_lc_rs::hmac;
use jsonwebtoken::Algorithm;
use secrecy::ExposeSecret;
use serde::{
    Deserialize, Deserializer,
    de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor},
};

use super::{
    reason::{RejectReason, Rejection, outside_validity},
    token::{Peeked, signature_bytes},
};
use crate::{config::LegacyJwtConfig, domain::UserId};

/// Clock skew tolerated on `exp` and `nbf`.
pub(crate) const LEEWAY_SECONDS: i64 = 5;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default)]
struct Claims {
    /// The configured user-id claim.
    user: Option<String>,
    exp: Option<i64>,
    nbf: Option<i64>,
    iss: Option<String>,
    jti: Option<String>,
    aud: Option<OneOrMany>,
}

/// Reads the claims the verifier needs, the user id from the claim the
/// operator names; every other member is skipped unread.
struct ClaimsSeed<'a> {
    user_claim: &'a str,
}

impl<'de> DeserializeSeed<'de> for ClaimsSeed<'_> {
    type Value = Claims;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Claims, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ClaimsSeed<'_> {
    type Value = Claims;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object of claims")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Claims, A::Error> {
        let mut claims = Claims::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                k if k == self.user_claim => claims.user = map.next_value()?,
                "exp" => claims.exp = map.next_value()?,
                "nbf" => claims.nbf = map.next_value()?,
                "iss" => claims.iss = map.next_value()?,
                "jti" => claims.jti = map.next_value()?,
                "aud" => claims.aud = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(claims)
    }
}

/// A legacy token whose signature and claims checked out.
#[derive(Debug, Clone)]
pub(crate) struct LegacyToken {
    pub user_id: UserId,
    pub jti: Option<String>,
    pub expires_at: i64,
    pub audiences: Vec<String>,
}

/// An HS token's claims, read but not yet trusted.
pub(crate) struct Unverified<'a> {
    alg: &'a str,
    message: &'a str,
    signature: &'a str,
    claims: Claims,
}

impl<'a> Unverified<'a> {
    /// Reads the claims, the user id from `user_claim`.
    pub fn read(peeked: &'a Peeked<'a>, user_claim: &str) -> Result<Self, Rejection> {
        Ok(Self {
            alg: &peeked.header.alg,
            message: peeked.message,
            signature: peeked.signature,
            claims: peeked.claims_with(ClaimsSeed { user_claim })?,
        })
    }

    /// The `iss` the token claims (unverified: for routing only).
    pub fn issuer(&self) -> Option<&str> {
        self.claims.iss.as_deref()
    }
}

fn malformed(message: &str) -> Rejection {
    Rejection::new(RejectReason::Malformed, message)
}

pub(crate) struct LegacyVerifier {
    algorithm: Algorithm,
    key: hmac::Key,
    issuer: Option<String>,
    /// Required in every token when set; without it `aud` is not checked
    /// here (the caller's expected audience still is, per request).
    audience: Option<String>,
    user_claim: String,
}

impl LegacyVerifier {
    pub fn new(config: &LegacyJwtConfig) -> Self {
        let hmac_algorithm = match config.algorithm {
            Algorithm::HS384 => hmac::HMAC_SHA384,
            Algorithm::HS512 => hmac::HMAC_SHA512,
            // The configuration admits HS256, HS384 and HS512 only.
            _ => hmac::HMAC_SHA256,
        };
        Self {
            algorithm: config.algorithm,
            key: hmac::Key::new(hmac_algorithm, config.secret.expose_secret().as_bytes()),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            user_claim: config.user_claim.clone(),
        }
    }

    /// The claim that holds the user id.
    pub fn user_claim(&self) -> &str {
        &self.user_claim
    }

    /// Checks the algorithm, the signature and the claims; `check_time`
    /// false skips `exp` and `nbf` (revoking an expired token is harmless,
    /// and the entry expires with it).
    pub fn verify(&self, token: Unverified<'_>, check_time: bool) -> Result<LegacyToken, Rejection> {
        if token.alg.parse::<Algorithm>().ok() != Some(self.algorithm) {
            return Err(Rejection::new(
                RejectReason::AlgorithmNotAllowed,
                "algorithm not allowed",
            ));
        }
        let signature = signature_bytes(token.signature)?;
        hmac::verify(&self.key, token.message.as_bytes(), &signature)
            .map_err(|_| Rejection::new(RejectReason::BadSignature, "signature does not verify"))?;
        let claims = token.claims;

        let exp = claims.exp.ok_or_else(|| malformed("missing claim exp"))?;
        let Some(sub) = claims.user else {
            return Err(malformed(&format!("missing claim {}", self.user_claim)));
        };
        if self.issuer.is_some() && claims.iss.is_none() {
            return Err(malformed("missing claim iss"));
        }
        if self.audience.is_some() && claims.aud.is_none() {
            return Err(malformed("missing claim aud"));
        }
        if check_time
            && let Some(rejection) = outside_validity(exp, claims.nbf, LEEWAY_SECONDS, chrono::Utc::now().timestamp())
        {
            return Err(rejection);
        }
        if let Some(issuer) = &self.issuer
            && claims.iss.as_deref() != Some(issuer)
        {
            return Err(Rejection::new(RejectReason::Issuer, "issuer is not accepted"));
        }
        let audiences = match claims.aud {
            None => Vec::new(),
            Some(OneOrMany::One(aud)) => vec![aud],
            Some(OneOrMany::Many(auds)) => auds,
        };
        if let Some(audience) = &self.audience
            && !audiences.contains(audience)
        {
            return Err(Rejection::new(RejectReason::Audience, "audience is not accepted"));
        }
        let user_id = UserId::parse("sub", &sub)
            .map_err(|_| Rejection::new(RejectReason::Malformed, format!("{} is not a user id", self.user_claim)))?;
        Ok(LegacyToken {
            user_id,
            jti: claims.jti.filter(|j| !j.is_empty()),
            expires_at: exp,
            audiences,
        })
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::verification::token::peek;

    const SECRET: &str = "unit-test-secret";

    fn verifier(audience: Option<&str>) -> LegacyVerifier {
        LegacyVerifier::new(&LegacyJwtConfig {
            secret: SECRET.to_owned().into(),
            algorithm: Algorithm::HS256,
            issuer: Some("app".into()),
            audience: audience.map(str::to_owned),
            user_claim: "sub".into(),
        })
    }

    fn sign(alg: Algorithm, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    fn check(verifier: &LegacyVerifier, token: &str, check_time: bool) -> Result<LegacyToken, RejectReason> {
        let peeked = peek(token).map_err(|r| r.reason)?;
        let unverified = Unverified::read(&peeked, verifier.user_claim()).map_err(|r| r.reason)?;
        verifier.verify(unverified, check_time).map_err(|r| r.reason)
    }

    #[test]
    fn claims_algorithm_and_signature_are_checked() {
        let now = chrono::Utc::now().timestamp();
        let sub = UserId::new_random().to_string();
        let claims = |extra: serde_json::Value| {
            let mut c = json!({"sub": sub, "exp": now + 60, "iss": "app", "aud": ["a", "b"]});
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        let plain = verifier(None);
        let with_aud = verifier(Some("b"));
        let ok = check(&with_aud, &sign(Algorithm::HS256, claims(json!({}))), true).unwrap();
        assert_eq!(ok.audiences, ["a", "b"]);
        assert_eq!(ok.user_id.to_string(), sub);
        assert_eq!(
            check(&verifier(Some("c")), &sign(Algorithm::HS256, claims(json!({}))), true).unwrap_err(),
            RejectReason::Audience
        );
        assert_eq!(
            check(&plain, &sign(Algorithm::HS512, claims(json!({}))), true).unwrap_err(),
            RejectReason::AlgorithmNotAllowed
        );
        let expired = sign(Algorithm::HS256, claims(json!({"exp": now - 60})));
        assert_eq!(check(&plain, &expired, true).unwrap_err(), RejectReason::Expired);
        assert!(check(&plain, &expired, false).is_ok(), "revocation ignores expiry");
        assert_eq!(
            check(&plain, &sign(Algorithm::HS256, claims(json!({"iss": "other"}))), true).unwrap_err(),
            RejectReason::Issuer
        );
        assert_eq!(
            check(&plain, &sign(Algorithm::HS256, claims(json!({"exp": "soon"}))), true).unwrap_err(),
            RejectReason::Malformed
        );
        let mut tampered = sign(Algorithm::HS256, claims(json!({})));
        tampered.push('A');
        assert_eq!(check(&plain, &tampered, true).unwrap_err(), RejectReason::BadSignature);
    }

    #[test]
    fn the_user_id_comes_from_the_configured_claim_with_any_hs_algorithm() {
        let now = chrono::Utc::now().timestamp();
        let user = UserId::new_random().to_string();
        for algorithm in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let leaflock = LegacyVerifier::new(&LegacyJwtConfig {
                secret: SECRET.to_owned().into(),
                algorithm,
                issuer: None,
                audience: None,
                user_claim: "user_id".into(),
            });
            // LeafLock's own shape: user_id, exp, iat, nothing else.
            let token = sign(algorithm, json!({"user_id": user, "exp": now + 60, "iat": now}));
            let ok = check(&leaflock, &token, true).unwrap();
            assert_eq!(ok.user_id.to_string(), user);
            assert_eq!(ok.jti, None);
            // `sub` is not read when another claim is configured.
            let with_sub = sign(algorithm, json!({"sub": user, "exp": now + 60}));
            assert_eq!(check(&leaflock, &with_sub, true).unwrap_err(), RejectReason::Malformed);
            let not_uuid = sign(algorithm, json!({"user_id": 42, "exp": now + 60}));
            assert_eq!(check(&leaflock, &not_uuid, true).unwrap_err(), RejectReason::Malformed);
        }
    }
}
