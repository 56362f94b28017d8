//! Validated identifiers. Everything past the gRPC adapter works with these,
//! so a value that reached the domain is already known to be well formed.

use std::fmt;

use uuid::Uuid;

use super::DomainError;

/// Internal user id: the application's `users.id`, a UUID that stays the
/// same before and after the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Uuid);

impl UserId {
    /// Parses a UUID given by a client; `field` names it in the error.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, DomainError> {
        if raw.trim().is_empty() {
            return Err(DomainError::invalid(field, "must not be empty"));
        }
        Uuid::parse_str(raw.trim())
            .map(Self)
            .map_err(|_| DomainError::invalid(field, "must be a UUID"))
    }

    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Clerk user id, `user_` followed by Clerk's base62 identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClerkUserId(String);

impl ClerkUserId {
    /// Longest Clerk id we accept; Clerk's are about 32 characters.
    const MAX_LEN: usize = 128;

    pub fn parse(field: &'static str, raw: &str) -> Result<Self, DomainError> {
        let rest = raw
            .strip_prefix("user_")
            .ok_or_else(|| DomainError::invalid(field, "must be a Clerk user id (`user_...`)"))?;
        if rest.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(DomainError::invalid(field, "must be a Clerk user id (`user_...`)"));
        }
        if !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(DomainError::invalid(
                field,
                "must contain only letters and digits after `user_`",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClerkUserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An email address, trimmed; compared case-insensitively by storage.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    /// RFC 5321 limit on a path.
    const MAX_LEN: usize = 254;

    /// A pragmatic check: one `@`, a non-empty local part, a domain with a
    /// dot, no whitespace or control characters. Deliverability is the mail
    /// server's business.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, DomainError> {
        let value = raw.trim();
        let bad = || DomainError::invalid(field, "must be an email address");
        if value.is_empty() || value.len() > Self::MAX_LEN {
            return Err(bad());
        }
        if value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
        {
            return Err(bad());
        }
        let (local, domain) = value.split_once('@').ok_or_else(bad)?;
        if local.is_empty()
            || domain.contains('@')
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
            || domain.contains("..")
        {
            return Err(bad());
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The form the service stores and compares, decided once, here: ASCII
    /// letters lower-cased, every other character kept as it is.
    ///
    /// ASCII only, on purpose. Both databases can compare the application's
    /// own email column in exactly this form (SQLite's `NOCASE`, PostgreSQL's
    /// `translate`), whatever their locale, where `lower()` folds ASCII only on
    /// SQLite and Unicode on PostgreSQL. And full Unicode folding merges
    /// addresses that are different mailboxes (the Kelvin sign `K` folds to
    /// `k`), which would let `link_by_email` hand an account to the owner of a
    /// look-alike address. So `ÅSA@example.com` and `åsa@example.com` are two
    /// addresses, on both backends.
    pub fn normalized(&self) -> String {
        Self::key_of(&self.0)
    }

    /// [`Email::normalized`] of an address read from elsewhere (the
    /// application's table, Clerk), trimmed as `parse` trims.
    pub fn key_of(raw: &str) -> String {
        raw.trim().to_ascii_lowercase()
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_rejects_garbage_and_names_field() {
        let err = UserId::parse("user_id", "not-a-uuid").unwrap_err();
        assert!(matches!(err, DomainError::InvalidArgument { field: "user_id", .. }));
        assert!(UserId::parse("user_id", "").is_err());
        assert!(UserId::parse("user_id", "6f1c2b9e-8a43-4f0e-9d57-0c8f3b1a2d44").is_ok());
    }

    #[test]
    fn clerk_user_id_requires_prefix_and_alphanumerics() {
        assert!(ClerkUserId::parse("f", "user_2abcDEF123").is_ok());
        for bad in ["", "user_", "usr_abc", "user_abc def", "user_abc;drop", "USER_abc"] {
            assert!(ClerkUserId::parse("f", bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("user_{}", "a".repeat(200));
        assert!(ClerkUserId::parse("f", &long).is_err());
    }

    #[test]
    fn email_is_checked_pragmatically() {
        assert_eq!(
            Email::parse("e", " Ann@Example.com ").unwrap().as_str(),
            "Ann@Example.com"
        );
        for bad in [
            "",
            "ann",
            "ann@",
            "@example.com",
            "ann@example",
            "a b@example.com",
            "ann@@x.com",
            "ann@x..com",
            "<a@x.com>",
        ] {
            assert!(Email::parse("e", bad).is_err(), "{bad:?} accepted");
        }
    }
}
