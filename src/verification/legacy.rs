//! The application's own HS-signed JWTs (`sub` = internal user id).

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde::Deserialize;

use super::reason::{RejectReason, Rejection, from_jwt_error};
use crate::{config::LegacyJwtConfig, domain::UserId};

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 5;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    aud: Option<OneOrMany>,
}

/// A legacy token whose signature and claims checked out.
#[derive(Debug, Clone)]
pub(crate) struct LegacyToken {
    pub user_id: UserId,
    pub jti: Option<String>,
    pub expires_at: i64,
    pub audiences: Vec<String>,
}

pub(crate) struct LegacyVerifier {
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

impl LegacyVerifier {
    pub fn new(config: &LegacyJwtConfig) -> Self {
        let mut validation = Validation::new(config.algorithm);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Without a configured audience `aud` is not checked here (the
            // caller's expected audience still is, per request).
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Self {
            algorithm: config.algorithm,
            key: DecodingKey::from_secret(config.secret.expose_secret().as_bytes()),
            validation,
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn verify(&self, token: &str) -> Result<LegacyToken, Rejection> {
        self.verify_with(token, &self.validation)
    }

    /// Checks the signature and claims but not the expiry: revoking an
    /// expired token is harmless, and the entry expires with it.
    pub fn verify_ignoring_expiry(&self, token: &str) -> Result<LegacyToken, Rejection> {
        let mut validation = self.validation.clone();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        self.verify_with(token, &validation)
    }

    fn verify_with(&self, token: &str, validation: &Validation) -> Result<LegacyToken, Rejection> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, validation).map_err(|e| from_jwt_error(&e))?;
        let claims = data.claims;
        let user_id = UserId::parse("sub", &claims.sub)
            .map_err(|_| Rejection::new(RejectReason::Malformed, "sub is not a user id"))?;
        let audiences = match claims.aud {
            None => Vec::new(),
            Some(OneOrMany::One(aud)) => vec![aud],
            Some(OneOrMany::Many(auds)) => auds,
        };
        Ok(LegacyToken {
            user_id,
            jti: claims.jti.filter(|j| !j.is_empty()),
            expires_at: claims.exp,
            audiences,
        })
    }
}
