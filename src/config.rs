//! Configuration from `IDENTITY_*` environment variables. Secrets may come
//! from a file named by the same variable with `_FILE` appended. A missing
//! or malformed value stops start-up with a message naming the variable.

use std::{collections::HashMap, fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use secrecy::{ExposeSecret, SecretString};

use crate::{
    domain::ApiKeyRegistry,
    storage::{Backend, DatabaseOptions, redact_url},
};

/// Every variable the binary reads; anything else with the prefix is warned about.
pub const KNOWN_VARIABLES: &[&str] = &[
    "IDENTITY_LISTEN_ADDR",
    "IDENTITY_DATABASE_URL",
    "IDENTITY_DATABASE_MAX_CONNECTIONS",
    "IDENTITY_MIGRATE_ON_START",
    "IDENTITY_API_KEYS",
    "IDENTITY_LOG_FORMAT",
    "IDENTITY_LOG_LEVEL",
    "IDENTITY_SHUTDOWN_GRACE_SECONDS",
    "IDENTITY_HEALTH_INTERVAL_SECONDS",
    "IDENTITY_SETTINGS_REFRESH_SECONDS",
    "IDENTITY_MAX_REQUEST_BYTES",
];

/// Variables that may instead be given as `<NAME>_FILE`.
const SECRET_VARIABLES: &[&str] = &["IDENTITY_DATABASE_URL", "IDENTITY_API_KEYS"];

pub const DEFAULT_DATABASE_URL: &str = "sqlite://identity.db";
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:50051";

/// A start-up error that names the variable at fault.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: String,
    pub message: String,
}

impl ConfigError {
    fn new(variable: &str, message: impl Into<String>) -> Self {
        Self {
            variable: variable.to_owned(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub database_url: SecretString,
    pub database: DatabaseOptions,
    pub migrate_on_start: bool,
    pub api_keys: ApiKeyRegistry,
    pub log_format: LogFormat,
    pub log_level: String,
    pub shutdown_grace: Duration,
    pub health_interval: Duration,
    pub settings_refresh: Duration,
    pub max_request_bytes: usize,
    /// Unknown `IDENTITY_*` names seen at load time (likely typos), to warn about.
    pub unknown_variables: Vec<String>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field("database_url", &redact_url(self.database_url.expose_secret()))
            .field("database", &self.database)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("api_keys", &self.api_keys)
            .field("log_format", &self.log_format)
            .field("log_level", &self.log_level)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("health_interval", &self.health_interval)
            .field("settings_refresh", &self.settings_refresh)
            .field("max_request_bytes", &self.max_request_bytes)
            .finish()
    }
}

/// A view of the environment that can be built from the process or from a map (tests).
struct Vars(HashMap<String, String>);

impl Vars {
    fn plain(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str).filter(|v| !v.trim().is_empty())
    }

    fn parse<T: FromStr>(&self, name: &str, default: T, expected: &str) -> Result<T, ConfigError> {
        match self.plain(name) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|_| ConfigError::new(name, format!("invalid value {raw:?}: expected {expected}"))),
        }
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.plain(name).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if ["1", "true", "yes", "on"].contains(&v.as_str()) => Ok(true),
            Some(v) if ["0", "false", "no", "off"].contains(&v.as_str()) => Ok(false),
            Some(v) => Err(ConfigError::new(
                name,
                format!("invalid value {v:?}: expected true or false"),
            )),
        }
    }

    fn seconds(&self, name: &str, default: u64, range: std::ops::RangeInclusive<u64>) -> Result<Duration, ConfigError> {
        let value: u64 = self.parse(name, default, "a whole number of seconds")?;
        if !range.contains(&value) {
            return Err(ConfigError::new(
                name,
                format!(
                    "{value} is out of range: expected {} to {} seconds",
                    range.start(),
                    range.end()
                ),
            ));
        }
        Ok(Duration::from_secs(value))
    }

    /// A secret from `NAME` or from the file `NAME_FILE` names; both set is an error.
    /// The value is never part of an error message.
    fn secret(&self, name: &str) -> Result<Option<SecretString>, ConfigError> {
        let file_var = format!("{name}_FILE");
        match (self.plain(name), self.plain(&file_var)) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                name,
                format!("set either {name} or {file_var}, not both"),
            )),
            (Some(value), None) => Ok(Some(SecretString::from(value.to_owned()))),
            (None, Some(path)) => {
                let content = std::fs::read_to_string(PathBuf::from(path))
                    .map_err(|e| ConfigError::new(&file_var, format!("cannot read {path:?}: {e}")))?;
                let trimmed = content.trim_end_matches(['\n', '\r']);
                if trimmed.trim().is_empty() {
                    return Err(ConfigError::new(&file_var, format!("{path:?} is empty")));
                }
                Ok(Some(SecretString::from(trimmed.to_owned())))
            }
            (None, None) => Ok(None),
        }
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads configuration from the given variables (the environment, or a test's map).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let vars = Vars(vars.into_iter().collect());

        let listen_addr: SocketAddr = vars.parse(
            "IDENTITY_LISTEN_ADDR",
            SocketAddr::from(([127, 0, 0, 1], 50051)),
            "an address like 127.0.0.1:50051 or [::]:50051",
        )?;

        let database_url = vars
            .secret("IDENTITY_DATABASE_URL")?
            .unwrap_or_else(|| SecretString::from(DEFAULT_DATABASE_URL.to_owned()));
        if Backend::from_url(database_url.expose_secret()).is_none() {
            return Err(ConfigError::new(
                "IDENTITY_DATABASE_URL",
                "must start with sqlite: or postgres:// (the value is not shown because it may hold a password)",
            ));
        }
        let max_connections: u32 = vars.parse("IDENTITY_DATABASE_MAX_CONNECTIONS", 10, "a number of connections")?;
        if !(1..=1000).contains(&max_connections) {
            return Err(ConfigError::new(
                "IDENTITY_DATABASE_MAX_CONNECTIONS",
                "must be between 1 and 1000",
            ));
        }

        let api_keys = match vars.secret("IDENTITY_API_KEYS")? {
            Some(spec) => {
                ApiKeyRegistry::parse(spec.expose_secret()).map_err(|e| ConfigError::new("IDENTITY_API_KEYS", e))?
            }
            None => ApiKeyRegistry::default(),
        };
        if api_keys.is_empty() && !listen_addr.ip().is_loopback() {
            return Err(ConfigError::new(
                "IDENTITY_API_KEYS",
                format!(
                    "no API keys are configured, and without keys the service only listens on a loopback address \
                     (IDENTITY_LISTEN_ADDR is {listen_addr}); create one with `identity gen-api-key`"
                ),
            ));
        }

        let log_format = match vars.plain("IDENTITY_LOG_FORMAT").map(str::trim) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "IDENTITY_LOG_FORMAT",
                    format!("invalid value {other:?}: expected text or json"),
                ));
            }
        };
        let log_level = vars.plain("IDENTITY_LOG_LEVEL").unwrap_or("info").trim().to_owned();
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::new(
                "IDENTITY_LOG_LEVEL",
                format!("invalid filter {log_level:?}: expected e.g. info or identity=debug,warn"),
            ));
        }

        let max_request_bytes: usize = vars.parse("IDENTITY_MAX_REQUEST_BYTES", 64 * 1024, "a number of bytes")?;
        if !(1024..=16 * 1024 * 1024).contains(&max_request_bytes) {
            return Err(ConfigError::new(
                "IDENTITY_MAX_REQUEST_BYTES",
                "must be between 1024 and 16777216",
            ));
        }

        let mut unknown_variables: Vec<String> = vars
            .0
            .keys()
            .filter(|k| k.starts_with("IDENTITY_"))
            .filter(|k| {
                !KNOWN_VARIABLES.contains(&k.as_str())
                    && !k
                        .strip_suffix("_FILE")
                        .is_some_and(|base| SECRET_VARIABLES.contains(&base))
            })
            .cloned()
            .collect();
        unknown_variables.sort();

        Ok(Self {
            listen_addr,
            database_url,
            database: DatabaseOptions {
                max_connections,
                ..DatabaseOptions::default()
            },
            migrate_on_start: vars.bool("IDENTITY_MIGRATE_ON_START", true)?,
            api_keys,
            log_format,
            log_level,
            shutdown_grace: vars.seconds("IDENTITY_SHUTDOWN_GRACE_SECONDS", 20, 0..=3600)?,
            health_interval: vars.seconds("IDENTITY_HEALTH_INTERVAL_SECONDS", 5, 1..=300)?,
            settings_refresh: vars.seconds("IDENTITY_SETTINGS_REFRESH_SECONDS", 2, 1..=300)?,
            max_request_bytes,
            unknown_variables,
        })
    }

    /// Development defaults: loopback on an ephemeral port, no keys, the given database.
    pub fn for_development(database_url: &str) -> Self {
        let mut config = Self::from_vars([("IDENTITY_LISTEN_ADDR".to_owned(), "127.0.0.1:0".to_owned())])
            .unwrap_or_else(|e| unreachable!("development defaults are valid: {e}"));
        config.database_url = SecretString::from(database_url.to_owned());
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_run_on_loopback_with_sqlite() {
        let config = load(&[]).unwrap();
        assert_eq!(config.listen_addr.to_string(), DEFAULT_LISTEN_ADDR);
        assert_eq!(config.database_url.expose_secret(), DEFAULT_DATABASE_URL);
        assert!(config.api_keys.is_empty());
    }

    #[test]
    fn errors_name_the_variable() {
        let err = load(&[("IDENTITY_LISTEN_ADDR", "nowhere")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_LISTEN_ADDR");
        let err = load(&[("IDENTITY_LOG_FORMAT", "xml")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_LOG_FORMAT");
        let err = load(&[("IDENTITY_MIGRATE_ON_START", "maybe")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_MIGRATE_ON_START");
        let err = load(&[("IDENTITY_DATABASE_URL", "mysql://u:hunter2@h/db")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_DATABASE_URL");
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn public_address_without_keys_is_refused() {
        let err = load(&[("IDENTITY_LISTEN_ADDR", "0.0.0.0:50051")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_API_KEYS");
        let (_, line) = crate::domain::generate_api_key("svc", &[crate::domain::Scope::Verify]);
        assert!(load(&[("IDENTITY_LISTEN_ADDR", "0.0.0.0:50051"), ("IDENTITY_API_KEYS", &line)]).is_ok());
    }

    #[test]
    fn secrets_come_from_files_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, "postgres://app:s3cret@db/app\n").unwrap();
        let config = load(&[("IDENTITY_DATABASE_URL_FILE", path.to_str().unwrap())]).unwrap();
        assert_eq!(config.database_url.expose_secret(), "postgres://app:s3cret@db/app");
        assert!(!format!("{config:?}").contains("s3cret"));
        let err = load(&[
            ("IDENTITY_DATABASE_URL", "sqlite::memory:"),
            ("IDENTITY_DATABASE_URL_FILE", "/x"),
        ])
        .unwrap_err();
        assert!(err.message.contains("not both"));
        let err = load(&[("IDENTITY_API_KEYS_FILE", "/nonexistent/keys")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_API_KEYS_FILE");
    }

    #[test]
    fn unknown_prefixed_variables_are_reported() {
        let config = load(&[("IDENTITY_LISTEN_ADRR", "x"), ("IDENTITY_API_KEYS_FILE", "")]).unwrap();
        assert_eq!(config.unknown_variables, vec!["IDENTITY_LISTEN_ADRR".to_owned()]);
    }
}
