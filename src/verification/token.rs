//! Reading just enough of an untrusted token to route it: the header's
//! `alg`, `kid`, `typ` and `cat`, and (for HMAC tokens only) the payload's
//! `iss`. Nothing read here is trusted beyond choosing a verifier; `jku`,
//! `x5u` and `jwk` are never read.

use base64::Engine;
use serde::Deserialize;

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

#[derive(Debug, Deserialize)]
struct PeekedPayload {
    #[serde(default)]
    iss: Option<serde_json::Value>,
}

/// The routing view of a token: its decoded header, and its payload still
/// encoded (an RS token's payload is read once, by the verifier).
#[derive(Debug)]
pub(crate) struct Peeked<'a> {
    pub header: PeekedHeader,
    payload: &'a str,
}

impl Peeked<'_> {
    /// The payload's `iss` when it is a string.
    pub fn issuer(&self) -> Result<Option<String>, Rejection> {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|_| malformed("payload is not base64url"))?;
        let payload: PeekedPayload =
            serde_json::from_slice(&payload).map_err(|_| malformed("payload is not a JSON object"))?;
        match payload.iss {
            Some(serde_json::Value::String(iss)) => Ok(Some(iss)),
            Some(_) => Err(malformed("iss is not a string")),
            None => Ok(None),
        }
    }
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
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not a JWT (expected three dot-separated parts)"));
    };
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = engine
        .decode(header)
        .map_err(|_| malformed("header is not base64url"))?;
    let header: PeekedHeader = serde_json::from_slice(&header).map_err(|_| malformed("header is not a JWT header"))?;
    Ok(Peeked { header, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn peeks_header_and_issuer_only() {
        let token = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256","kid":"k1","jku":"https://evil"}"#),
            b64(r#"{"iss":"https://x"}"#)
        );
        let peeked = peek(&token).unwrap();
        assert_eq!(peeked.header.alg, "RS256");
        assert_eq!(peeked.header.kid.as_deref(), Some("k1"));
        assert_eq!(peeked.issuer().unwrap().as_deref(), Some("https://x"));
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
        ] {
            assert_eq!(peek(token).unwrap_err().reason, RejectReason::Malformed, "{token:?}");
        }
        for token in [
            format!("{}.{}.x", b64(r#"{"alg":"HS256"}"#), b64(r#"{"iss":5}"#)),
            format!("{}.!!.x", b64(r#"{"alg":"HS256"}"#)),
            format!("{}.{}.x", b64(r#"{"alg":"HS256"}"#), b64("[1]")),
        ] {
            let peeked = peek(&token).expect("the header is fine");
            assert_eq!(
                peeked.issuer().unwrap_err().reason,
                RejectReason::Malformed,
                "{token:?}"
            );
        }
    }

    #[test]
    fn bearer_prefix_is_optional() {
        assert_eq!(strip_bearer("  Bearer abc \n"), "abc");
        assert_eq!(strip_bearer("abc"), "abc");
    }
}
