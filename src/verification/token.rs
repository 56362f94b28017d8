//! Reading just enough of an untrusted token to route it: the header's
//! `alg`, `kid`, `typ` and `cat`, and the token's three parts. Nothing read
//! here is trusted beyond choosing a verifier; `jku`, `x5u` and `jwk` are
//! never read. The verifier the header routes to reads the claims, once.

use base64::Engine;
use serde::{Deserialize, de::DeserializeOwned};

use super::reason::{RejectReason, Rejection};

#[derive(Debug, Deserialize)]
pub(crate) struct PeekedHeader {
    pub alg: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub typ: Option<String>,
    #[serde(default)]
    pub cat: Option<String>,
}

/// The routing view of a token: its decoded header, and its parts as sent
/// (the payload is read once, by the verifier the header routes to).
#[derive(Debug)]
pub(crate) struct Peeked<'a> {
    pub header: PeekedHeader,
    /// `header.payload`, the signed part.
    pub message: &'a str,
    pub payload: &'a str,
    pub signature: &'a str,
}

impl Peeked<'_> {
    /// The payload decoded into the verifier's claims (not trusted until
    /// the verifier has checked the signature).
    pub fn claims<T: DeserializeOwned>(&self) -> Result<T, Rejection> {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|_| malformed("payload is not base64url"))?;
        serde_json::from_slice(&payload).map_err(|_| malformed("claims are missing or malformed"))
    }

    /// The payload decoded through a seed (claims whose names are configured).
    pub fn claims_with<T, S>(&self, seed: S) -> Result<T, Rejection>
    where
        S: for<'de> serde::de::DeserializeSeed<'de, Value = T>,
    {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|_| malformed("payload is not base64url"))?;
        let mut deserializer = serde_json::Deserializer::from_slice(&payload);
        let value = seed
            .deserialize(&mut deserializer)
            .and_then(|value| deserializer.end().map(|()| value))
            .map_err(|_| malformed("claims are missing or malformed"))?;
        Ok(value)
    }
}

/// A token's signature part decoded (base64url, unpadded), for the verifier
/// that checks it.
pub(crate) fn signature_bytes(signature: &str) -> Result<Vec<u8>, Rejection> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| malformed("signature is not base64url"))
}

/// Strips an optional `Bearer ` prefix and surrounding whitespace.
pub(crate) fn strip_bearer(raw: &str) -> &str {
    let trimmed = raw.trim();
    trimmed
        .strip_prefix("Bearer ")
        .or_else(|| trimmed.strip_prefix("bearer "))
        .map(str::trim)
        .unwrap_or(trimmed)
}

fn malformed(message: &str) -> Rejection {
    Rejection::new(RejectReason::Malformed, message)
}

/// Splits the token and decodes its header.
pub(crate) fn peek(token: &str) -> Result<Peeked<'_>, Rejection> {
    let not_a_jwt = || malformed("not a JWT (expected three dot-separated parts)");
    let (message, signature) = token.rsplit_once('.').ok_or_else(not_a_jwt)?;
    let (header, payload) = message.split_once('.').ok_or_else(not_a_jwt)?;
    if payload.contains('.') {
        return Err(not_a_jwt());
    }
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| malformed("header is not base64url"))?;
    let header: PeekedHeader = serde_json::from_slice(&header).map_err(|_| malformed("header is not a JWT header"))?;
    Ok(Peeked {
        header,
        message,
        payload,
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn peeks_the_header_and_splits_the_parts() {
        let token = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256","kid":"k1","jku":"https://evil"}"#),
            b64(r#"{"iss":"https://x"}"#)
        );
        let peeked = peek(&token).unwrap();
        assert_eq!(peeked.header.alg, "RS256");
        assert_eq!(peeked.header.kid.as_deref(), Some("k1"));
        assert_eq!(peeked.payload, b64(r#"{"iss":"https://x"}"#));
        assert_eq!(peeked.signature, "sig");
        assert_eq!(peeked.message, token.rsplit_once('.').unwrap().0);
    }

    #[test]
    fn garbage_is_malformed() {
        for token in [
            "",
            "a",
            "a.b",
            "a.b.c.d",
            "!!.!!.!!",
            &format!("{}.{}.x", b64("[]"), b64("{}")),
            &format!("{}.{}.x.y", b64(r#"{"alg":"HS256"}"#), b64("{}")),
        ] {
            assert_eq!(peek(token).unwrap_err().reason, RejectReason::Malformed, "{token:?}");
        }
    }

    #[test]
    fn bearer_prefix_is_optional() {
        assert_eq!(strip_bearer("  Bearer abc \n"), "abc");
        assert_eq!(strip_bearer("abc"), "abc");
    }
}
