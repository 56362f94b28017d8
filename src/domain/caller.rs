//! Service-to-service callers: API keys, stored as SHA-256 hashes, each with
//! a name (recorded in the audit log) and a set of scopes.

use std::{collections::HashMap, fmt, str::FromStr};

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::DomainError;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// IdentityService reads: verify tokens, look users up.
    Verify,
    /// Per-user migration calls (invitations, completion).
    Migrate,
    /// Linking, auth mode, audit log, bulk jobs.
    Admin,
    /// A gateway: Envoy's ext_authz `Check` and HTTP `/forward-auth`, and
    /// nothing else (no IdentityService or MigrationService call).
    Gateway,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Verify, Scope::Migrate, Scope::Admin, Scope::Gateway];
    /// The scopes of IdentityService and MigrationService callers: the calls
    /// any of them may make (reading the auth mode or the stats, revoking
    /// one's own token) are not a gateway's.
    pub const SERVICE: [Scope; 3] = [Scope::Verify, Scope::Migrate, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verify => "verify",
            Self::Migrate => "migrate",
            Self::Admin => "admin",
            Self::Gateway => "gateway",
        }
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "verify" => Ok(Self::Verify),
            "migrate" => Ok(Self::Migrate),
            "admin" => Ok(Self::Admin),
            "gateway" => Ok(Self::Gateway),
            other => Err(format!(
                "unknown scope {other:?} (expected verify, migrate, admin or gateway)"
            )),
        }
    }
}

/// A configured key: its name and scopes. The key itself is never kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub scopes: Vec<Scope>,
}

/// The caller of one request, after its key was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    scopes: Vec<Scope>,
}

impl Caller {
    pub fn new(name: impl Into<String>, scopes: Vec<Scope>) -> Self {
        Self {
            name: name.into(),
            scopes,
        }
    }

    /// The caller used when no keys are configured (loopback development only).
    pub fn development() -> Self {
        Self::new("development", Scope::ALL.to_vec())
    }

    /// The operator at the command line.
    pub fn cli() -> Self {
        Self::new("cli", Scope::ALL.to_vec())
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// PERMISSION_DENIED unless the caller holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), DomainError> {
        self.require_any(&[scope])
    }

    /// PERMISSION_DENIED unless the caller holds one of `scopes`.
    pub fn require_any(&self, scopes: &[Scope]) -> Result<(), DomainError> {
        if scopes.iter().any(|s| self.has(*s)) {
            Ok(())
        } else {
            let names: Vec<_> = scopes.iter().map(|s| s.as_str()).collect();
            Err(DomainError::PermissionDenied(format!(
                "API key {:?} lacks the {} scope",
                self.name,
                names.join(" or ")
            )))
        }
    }
}

/// The configured keys, looked up by the SHA-256 of the presented key.
#[derive(Clone, Default)]
pub struct ApiKeyRegistry {
    by_hash: HashMap<[u8; 32], ApiKey>,
}

impl fmt::Debug for ApiKeyRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.by_hash.values().map(|k| k.name.as_str()).collect();
        f.debug_struct("ApiKeyRegistry").field("keys", &names).finish()
    }
}

impl ApiKeyRegistry {
    /// Parses the configuration: entries separated by `;` or new lines, each
    /// `name:sha256-hex:scope[,scope...]`. Blank lines and `#` comments are skipped.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut by_hash = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for (index, entry) in spec.split([';', '\n']).enumerate() {
            let entry = entry.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let n = index + 1;
            let mut parts = entry.splitn(3, ':');
            let (Some(name), Some(hash), Some(scopes)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("entry {n}: expected name:sha256-hex:scopes"));
            };
            let name = name.trim();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(format!("entry {n}: the name must be letters, digits, '-', '_' or '.'"));
            }
            let mut digest = [0u8; 32];
            hex::decode_to_slice(hash.trim(), &mut digest)
                .map_err(|_| format!("entry {n} ({name}): the hash must be 64 hex characters (SHA-256 of the key)"))?;
            let scopes = scopes
                .split(',')
                .map(Scope::from_str)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("entry {n} ({name}): {e}"))?;
            if !names.insert(name.to_owned()) {
                return Err(format!("entry {n}: the name {name:?} is used twice"));
            }
            if by_hash
                .insert(
                    digest,
                    ApiKey {
                        name: name.to_owned(),
                        scopes,
                    },
                )
                .is_some()
            {
                return Err(format!("entry {n} ({name}): the same key hash is configured twice"));
            }
        }
        Ok(Self { by_hash })
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// The caller a presented key belongs to, if any.
    pub fn authenticate(&self, presented: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // The map is keyed by hash, so lookup timing reveals nothing about the
        // key; the final comparison is constant time anyway.
        let (stored, key) = self.by_hash.get_key_value(&digest)?;
        bool::from(stored.ct_eq(&digest)).then(|| Caller::new(key.name.clone(), key.scopes.clone()))
    }
}

/// A new random key and the configuration line that admits it.
pub fn generate_api_key(name: &str, scopes: &[Scope]) -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!("idk_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    let scopes: Vec<_> = scopes.iter().map(|s| s.as_str()).collect();
    let line = format!("{name}:{hash}:{}", scopes.join(","));
    (key, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_authenticates_with_its_line() {
        let (key, line) = generate_api_key("billing", &[Scope::Verify]);
        let registry = ApiKeyRegistry::parse(&line).unwrap();
        let caller = registry.authenticate(&key).unwrap();
        assert_eq!(caller.name, "billing");
        assert!(caller.has(Scope::Verify));
        assert!(!caller.has(Scope::Admin));
        assert!(registry.authenticate("idk_wrong").is_none());
        assert!(!line.contains(&key));
    }

    #[test]
    fn bad_entries_are_refused_with_position() {
        let hash = "a".repeat(64);
        assert!(
            ApiKeyRegistry::parse(&format!("a:{hash}:verify;b:{hash}:admin"))
                .unwrap_err()
                .contains("twice")
        );
        assert!(ApiKeyRegistry::parse("a:zz:verify").unwrap_err().contains("entry 1"));
        assert!(
            ApiKeyRegistry::parse(&format!("a:{hash}:root"))
                .unwrap_err()
                .contains("unknown scope")
        );
        assert!(ApiKeyRegistry::parse("justone").is_err());
        assert_eq!(ApiKeyRegistry::parse("\n# comment\n").unwrap().len(), 0);
    }

    #[test]
    fn scope_check_names_the_missing_scope() {
        let caller = Caller::new("svc", vec![Scope::Verify]);
        assert!(caller.require(Scope::Verify).is_ok());
        let err = caller.require(Scope::Admin).unwrap_err();
        assert!(err.to_string().contains("admin"));
    }
}
