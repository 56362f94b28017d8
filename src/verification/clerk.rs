//! Clerk session tokens: RS256/384/512 with the instance's keys, `iss`
//! pinned to the configured instance, `azp` against the allow-list, `sts`
//! not pending, and only session tokens (not JWT templates, M2M or OAuth).

use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::{
    jwks::{Key, KeyLookup, KeyStore},
    reason::{RejectReason, Rejection, outside_validity},
    token::{Peeked, signature_bytes},
};
use crate::domain::ClerkUserId;

/// The `cat` header values of Clerk's JWT classes.
const CAT_SESSION: &str = "cl_B7d4PD111AAA";
/// Instances that stamp this on every class carry no class information.
const CAT_IGNORE: &str = "cl_I7d4PD111III";

#[derive(Debug, Clone, Deserialize)]
struct OrgV2 {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    rol: Option<String>,
    #[serde(default)]
    slg: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    sid: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    sts: Option<String>,
    /// Version 2 organization claim.
    #[serde(default)]
    o: Option<OrgV2>,
    /// Version 1 organization claims.
    #[serde(default)]
    org_id: Option<String>,
    #[serde(default)]
    org_role: Option<String>,
    #[serde(default)]
    org_slug: Option<String>,
}

/// The active organization of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organization {
    pub id: String,
    pub role: String,
    pub slug: String,
}

/// A Clerk token whose signature and claims checked out.
#[derive(Debug, Clone)]
pub(crate) struct ClerkToken {
    pub clerk_user_id: ClerkUserId,
    pub session_id: Option<String>,
    pub expires_at: i64,
    pub not_before: Option<i64>,
    pub authorized_party: Option<String>,
    pub organization: Option<Organization>,
}

/// Why a Clerk token could not be judged.
pub(crate) enum ClerkFailure {
    Rejected(Rejection),
    /// No usable keys: an outage, not the token's fault.
    KeysUnavailable,
}

impl From<Rejection> for ClerkFailure {
    fn from(rejection: Rejection) -> Self {
        Self::Rejected(rejection)
    }
}

pub(crate) struct ClerkVerifier {
    pub issuer: String,
    pub keys: KeyStore,
    authorized_parties: Vec<String>,
    pub leeway: i64,
}

pub(crate) fn is_rsa(alg: &str) -> Option<Algorithm> {
    match alg {
        "RS256" => Some(Algorithm::RS256),
        "RS384" => Some(Algorithm::RS384),
        "RS512" => Some(Algorithm::RS512),
        _ => None,
    }
}

impl ClerkVerifier {
    pub fn new(issuer: String, keys: KeyStore, authorized_parties: Vec<String>, leeway: u64) -> Self {
        Self {
            issuer,
            keys,
            authorized_parties,
            leeway: i64::try_from(leeway).unwrap_or(5),
        }
    }

    pub async fn verify(&self, token: &Peeked<'_>) -> Result<ClerkToken, ClerkFailure> {
        let header = &token.header;
        if header.typ.as_deref().is_some_and(|t| !t.eq_ignore_ascii_case("JWT")) {
            return Err(Rejection::new(RejectReason::NotSessionToken, "not a session token (typ)").into());
        }
        if header
            .cat
            .as_deref()
            .is_some_and(|c| c != CAT_SESSION && c != CAT_IGNORE)
        {
            return Err(Rejection::new(RejectReason::NotSessionToken, "not a session token (cat)").into());
        }
        let algorithm = is_rsa(&header.alg)
            .ok_or_else(|| Rejection::new(RejectReason::AlgorithmNotAllowed, "algorithm not allowed"))?;
        let key = match self.keys.key(header.kid.as_deref()).await {
            KeyLookup::Found(key) => key,
            KeyLookup::Unknown => return Err(Rejection::new(RejectReason::UnknownKey, "no key with this kid").into()),
            KeyLookup::Unavailable => return Err(ClerkFailure::KeysUnavailable),
        };
        if key.algorithm.is_some_and(|pinned| pinned != algorithm) {
            return Err(Rejection::new(RejectReason::AlgorithmNotAllowed, "algorithm does not match the key").into());
        }
        let claims = verified_claims(token, &key, algorithm)?;
        let now = chrono::Utc::now().timestamp();
        if let Some(rejection) = outside_validity(claims.exp, claims.nbf, self.leeway, now) {
            return Err(rejection.into());
        }
        match claims.iss.as_deref() {
            Some(iss) if iss == self.issuer => {}
            Some(_) => return Err(Rejection::new(RejectReason::Issuer, "issuer is not accepted").into()),
            None => return Err(Rejection::new(RejectReason::Malformed, "missing claim iss").into()),
        }
        if claims.iat.is_some_and(|iat| iat > now + self.leeway) {
            return Err(Rejection::new(RejectReason::IssuedInFuture, "token is issued in the future (iat)").into());
        }
        if claims.sts.as_deref() == Some("pending") {
            return Err(Rejection::new(RejectReason::SessionPending, "session is pending").into());
        }
        let authorized_party = claims.azp.map(|azp| azp.trim_end_matches('/').to_owned());
        if !self.authorized_parties.is_empty() {
            match &authorized_party {
                Some(azp) if self.authorized_parties.iter().any(|p| p == azp) => {}
                Some(_) => return Err(Rejection::new(RejectReason::Audience, "azp is not an authorized party").into()),
                None => return Err(Rejection::new(RejectReason::Audience, "azp is missing").into()),
            }
        }
        let clerk_user_id = ClerkUserId::parse("sub", &claims.sub)
            .map_err(|_| Rejection::new(RejectReason::Malformed, "sub is not a Clerk user id"))?;
        let organization = match claims.o {
            Some(OrgV2 { id: Some(id), rol, slg }) => Some(Organization {
                id,
                role: rol.unwrap_or_default(),
                slug: slg.unwrap_or_default(),
            }),
            _ => claims.org_id.map(|id| Organization {
                id,
                role: claims.org_role.unwrap_or_default(),
                slug: claims.org_slug.unwrap_or_default(),
            }),
        };
        Ok(ClerkToken {
            clerk_user_id,
            session_id: claims.sid,
            expires_at: claims.exp,
            not_before: claims.nbf,
            authorized_party,
            organization,
        })
    }
}

/// Checks the signature with the key prepared for aws-lc-rs, then reads the
/// claims once. (`jsonwebtoken::decode` would parse the header twice and the
/// claims twice more, and the RSA key on every call.)
fn verified_claims(token: &Peeked<'_>, key: &Key, algorithm: Algorithm) -> Result<Claims, Rejection> {
    let signature = signature_bytes(token.signature)?;
    if key.verifies(algorithm, token.message.as_bytes(), &signature) {
        token.claims()
    } else {
        Err(Rejection::new(RejectReason::BadSignature, "signature does not verify"))
    }
}
