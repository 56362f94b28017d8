//! Configuration from `IDENTITY_*` environment variables. Secrets may come
//! from a file named by the same variable with `_FILE` appended. A missing
//! or malformed value stops start-up with a message naming the variable.

use std::{collections::HashMap, fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use secrecy::{ExposeSecret, SecretString};

use crate::{
    domain::ApiKeyRegistry,
    storage::{Backend, DatabaseOptions, Ident, UsersTableConfig, redact_url},
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
    "IDENTITY_LEGACY_JWT_SECRET",
    "IDENTITY_LEGACY_JWT_ALGORITHM",
    "IDENTITY_LEGACY_JWT_ISSUER",
    "IDENTITY_LEGACY_JWT_AUDIENCE",
    "IDENTITY_CLERK_SECRET_KEY",
    "IDENTITY_CLERK_PUBLISHABLE_KEY",
    "IDENTITY_CLERK_JWT_KEY",
    "IDENTITY_CLERK_ISSUER",
    "IDENTITY_CLERK_JWKS_URL",
    "IDENTITY_CLERK_API_URL",
    "IDENTITY_CLERK_AUTHORIZED_PARTIES",
    "IDENTITY_CLERK_LEEWAY_SECONDS",
    "IDENTITY_CLERK_JWKS_REFRESH_SECONDS",
    "IDENTITY_CLERK_JWKS_COOLDOWN_SECONDS",
    "IDENTITY_CLERK_JWKS_MAX_STALENESS_SECONDS",
    "IDENTITY_UNMAPPED_CLERK_USER",
    "IDENTITY_REJECT_LEGACY_AFTER_MIGRATION",
    "IDENTITY_MAX_TOKEN_BYTES",
    "IDENTITY_TOKEN_CACHE_SIZE",
    "IDENTITY_USER_CACHE_SECONDS",
    "IDENTITY_REVOCATION_DEFAULT_SECONDS",
    "IDENTITY_FRONTEND_URL",
    "IDENTITY_PRODUCT_NAME",
    "IDENTITY_INVITATION_TTL_SECONDS",
    "IDENTITY_INVITES_PER_USER_PER_HOUR",
    "IDENTITY_INVITES_PER_CALLER_PER_MINUTE",
    "IDENTITY_MAIL_TRANSPORT",
    "IDENTITY_SMTP_URL",
    "IDENTITY_MAIL_FROM",
    "IDENTITY_MAIL_DIR",
    "IDENTITY_OUTBOX_POLL_SECONDS",
    "IDENTITY_OUTBOX_MAX_ATTEMPTS",
    "IDENTITY_OUTBOX_RETRY_BASE_SECONDS",
    "IDENTITY_OUTBOX_SEND_TIMEOUT_SECONDS",
    "IDENTITY_CLERK_API_RATE",
    "IDENTITY_BULK_LEASE_SECONDS",
    "IDENTITY_METRICS_ADDR",
    "IDENTITY_DASHBOARD",
    "IDENTITY_STATS_FLUSH_SECONDS",
    "IDENTITY_LEGACY_JWT_USER_CLAIM",
    "IDENTITY_SMTP_ALLOW_PLAINTEXT",
    "IDENTITY_MIGRATION_LINK",
    "IDENTITY_USERS_TABLE",
    "IDENTITY_USERS_ID_COLUMN",
    "IDENTITY_USERS_EMAIL_COLUMN",
    "IDENTITY_USERS_PASSWORD_HASH_COLUMN",
    "IDENTITY_USERS_CREATED_AT_COLUMN",
    "IDENTITY_USERS_DELETED_AT_COLUMN",
    "IDENTITY_USERS_CLERK_ID_COLUMN",
    "IDENTITY_GATEWAY_HEADER_PREFIX",
    "IDENTITY_GATEWAY_HEADERS",
    "IDENTITY_GATEWAY_REMOVE_AUTHORIZATION",
    "IDENTITY_FORWARD_AUTH",
    "IDENTITY_EXT_AUTHZ",
    "IDENTITY_CLERK_WEBHOOK_SECRET",
    "IDENTITY_CLERK_WEBHOOK_RETENTION_DAYS",
];

/// The standard OpenTelemetry variables the binary reads (the exporter reads
/// the endpoint and headers itself); the Helm chart may set only these
/// outside `KNOWN_VARIABLES`.
pub const OTEL_VARIABLES: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_SERVICE_NAME",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
];

/// Variables that may instead be given as `<NAME>_FILE`.
const SECRET_VARIABLES: &[&str] = &[
    "IDENTITY_DATABASE_URL",
    "IDENTITY_API_KEYS",
    "IDENTITY_LEGACY_JWT_SECRET",
    "IDENTITY_CLERK_SECRET_KEY",
    "IDENTITY_CLERK_JWT_KEY",
    "IDENTITY_SMTP_URL",
    "IDENTITY_CLERK_WEBHOOK_SECRET",
];

/// The seed application's own variable names, accepted when the
/// `IDENTITY_*` one is unset so an existing environment works unchanged.
const SEED_FALLBACKS: &[(&str, &str)] = &[
    ("IDENTITY_LEGACY_JWT_SECRET", "JWT_SECRET"),
    ("IDENTITY_CLERK_SECRET_KEY", "CLERK_SECRET_KEY"),
    ("IDENTITY_CLERK_PUBLISHABLE_KEY", "CLERK_PUBLISHABLE_KEY"),
    ("IDENTITY_CLERK_JWT_KEY", "CLERK_JWT_KEY"),
];

pub const DEFAULT_DATABASE_URL: &str = "sqlite://identity.db";
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:50051";
/// `IDENTITY_CLERK_WEBHOOK_RETENTION_DAYS`: more than Svix retries a
/// delivery for (about 28 hours after the first attempt), at most ten years.
const RETENTION_DAYS: std::ops::RangeInclusive<u64> = 4..=3650;
/// Verified tokens cached at most (the cache reserves its table up front).
const MAX_TOKEN_CACHE_SIZE: u64 = 10_000_000;

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
    /// OTLP trace export and sampling, from the standard `OTEL_*` variables.
    pub traces: TraceConfig,
    pub shutdown_grace: Duration,
    pub health_interval: Duration,
    pub settings_refresh: Duration,
    pub max_request_bytes: usize,
    pub verification: VerificationConfig,
    pub invitations: InvitationConfig,
    pub mail: MailConfig,
    pub bulk: crate::domain::BulkConfig,
    /// The HTTP listener: Prometheus scrapes `/metrics` there, and gateways
    /// call `/forward-auth`; `None` turns it off.
    pub metrics_addr: Option<SocketAddr>,
    /// Serve the migration dashboard (`/dashboard`) beside `/metrics`.
    pub dashboard: bool,
    /// Envoy ext_authz and forward-auth: identity headers, caller access.
    pub gateway: crate::gateway::GatewayConfig,
    /// How often this replica adds its auth figures to the shared buckets.
    pub stats_flush: Duration,
    /// Clerk's webhook endpoint (`POST /webhooks/clerk` on the HTTP listener),
    /// when a signing secret is configured.
    pub clerk_webhook: Option<ClerkWebhookConfig>,
    /// How long a processed Clerk event's row is kept (duplicate detection
    /// for Svix's retries); each Clerk object's newest version stays longer.
    pub clerk_webhook_retention: Duration,
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
            .field("traces", &self.traces)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("health_interval", &self.health_interval)
            .field("settings_refresh", &self.settings_refresh)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("verification", &self.verification)
            .field("invitations", &self.invitations)
            .field("mail", &self.mail)
            .field("bulk", &self.bulk)
            .field("metrics_addr", &self.metrics_addr)
            .field("dashboard", &self.dashboard)
            .field("gateway", &self.gateway)
            .field("stats_flush", &self.stats_flush)
            .field("clerk_webhook_retention", &self.clerk_webhook_retention)
            .finish()
    }
}

/// A view of the environment that can be built from the process or from a map (tests).
struct Vars(HashMap<String, String>);

impl Vars {
    fn plain(&self, name: &str) -> Option<&str> {
        let own = self.0.get(name).map(String::as_str).filter(|v| !v.trim().is_empty());
        own.or_else(|| {
            let (_, seed) = SEED_FALLBACKS.iter().find(|(ours, _)| *ours == name)?;
            self.0.get(*seed).map(String::as_str).filter(|v| !v.trim().is_empty())
        })
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

        let verification = VerificationConfig::load(&vars)?;
        let mut invitations = InvitationConfig::load(&vars)?;
        let mail = MailConfig::load(&vars)?;
        // Outside development mode, the log transport only by explicit choice.
        invitations.deliverable = api_keys.is_empty()
            || !matches!(mail.transport, MailTransportConfig::Log)
            || vars.plain("IDENTITY_MAIL_TRANSPORT").is_some();
        let default_rate: f64 = vars.parse("IDENTITY_CLERK_API_RATE", 9.0, "requests per second, e.g. 9 or 90")?;
        if !(default_rate.is_finite() && default_rate > 0.0 && default_rate <= 100.0) {
            return Err(ConfigError::new(
                "IDENTITY_CLERK_API_RATE",
                "must be above 0 and at most 100 (Clerk allows 100 requests per 10 s on development keys, 1000 on production)",
            ));
        }
        let bulk = crate::domain::BulkConfig {
            default_rate,
            max_rate: 100.0,
            lease: vars.seconds("IDENTITY_BULK_LEASE_SECONDS", 30, 2..=600)?,
        };

        let metrics_addr = match vars.plain("IDENTITY_METRICS_ADDR").map(str::trim) {
            Some("off") => None,
            Some(raw) => Some(raw.parse::<SocketAddr>().map_err(|_| {
                ConfigError::new(
                    "IDENTITY_METRICS_ADDR",
                    format!("invalid value {raw:?}: expected an address like 0.0.0.0:9464, or off"),
                )
            })?),
            None => Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        };

        let retention_days: u64 = vars.parse("IDENTITY_CLERK_WEBHOOK_RETENTION_DAYS", 30, "a whole number of days")?;
        if !RETENTION_DAYS.contains(&retention_days) {
            return Err(ConfigError::new(
                "IDENTITY_CLERK_WEBHOOK_RETENTION_DAYS",
                format!(
                    "{retention_days} is out of range: expected {} to {} days (longer than Svix's retries of about \
                     28 hours, so a retried delivery is still recognised)",
                    RETENTION_DAYS.start(),
                    RETENTION_DAYS.end()
                ),
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
                users: users_table(&vars)?,
                ..DatabaseOptions::default()
            },
            migrate_on_start: vars.bool("IDENTITY_MIGRATE_ON_START", true)?,
            api_keys,
            log_format,
            log_level,
            traces: TraceConfig::from_vars(&vars)?,
            shutdown_grace: vars.seconds("IDENTITY_SHUTDOWN_GRACE_SECONDS", 20, 0..=3600)?,
            health_interval: vars.seconds("IDENTITY_HEALTH_INTERVAL_SECONDS", 5, 1..=300)?,
            settings_refresh: vars.seconds("IDENTITY_SETTINGS_REFRESH_SECONDS", 2, 1..=300)?,
            max_request_bytes,
            verification,
            invitations,
            mail,
            bulk,
            metrics_addr,
            dashboard: vars.bool("IDENTITY_DASHBOARD", true)?,
            gateway: gateway_config(&vars)?,
            stats_flush: vars.seconds("IDENTITY_STATS_FLUSH_SECONDS", 10, 1..=300)?,
            clerk_webhook: ClerkWebhookConfig::load(&vars)?,
            clerk_webhook_retention: Duration::from_secs(retention_days * 24 * 3600),
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

/// `IDENTITY_GATEWAY_*` and `IDENTITY_FORWARD_AUTH`.
fn gateway_config(vars: &Vars) -> Result<crate::gateway::GatewayConfig, ConfigError> {
    use crate::gateway::{ForwardAuthAccess, GatewayConfig, IdentityHeader};
    let mut config = GatewayConfig::default();
    if let Some(raw) = vars.plain("IDENTITY_GATEWAY_HEADER_PREFIX") {
        let prefix = raw.trim().to_ascii_lowercase();
        if prefix.len() > 64
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::new(
                "IDENTITY_GATEWAY_HEADER_PREFIX",
                format!("invalid value {raw:?}: expected at most 64 letters, digits, '-' or '_', e.g. x-identity-"),
            ));
        }
        config.header_prefix = prefix;
    }
    if let Some(raw) = vars.plain("IDENTITY_GATEWAY_HEADERS") {
        let mut headers = Vec::new();
        for name in raw.split(',').filter(|n| !n.trim().is_empty()) {
            let header: IdentityHeader = name
                .parse()
                .map_err(|e| ConfigError::new("IDENTITY_GATEWAY_HEADERS", e))?;
            if !headers.contains(&header) {
                headers.push(header);
            }
        }
        config.headers = headers;
    }
    config.remove_authorization = vars.bool("IDENTITY_GATEWAY_REMOVE_AUTHORIZATION", false)?;
    let access = |name: &str| match vars.plain(name).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(ForwardAuthAccess::Key),
        Some(v) if v == "key" => Ok(ForwardAuthAccess::Key),
        Some(v) if v == "network" => Ok(ForwardAuthAccess::Network),
        Some(v) if v == "off" => Ok(ForwardAuthAccess::Off),
        Some(v) => Err(ConfigError::new(
            name,
            format!("invalid value {v:?}: expected key, network or off"),
        )),
    };
    config.forward_auth = access("IDENTITY_FORWARD_AUTH")?;
    config.ext_authz = access("IDENTITY_EXT_AUTHZ")?;
    Ok(config)
}

/// Trace export: on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `_TRACES_ENDPOINT`)
/// is set and `OTEL_SDK_DISABLED` is not `true`; sampled per
/// `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` as the OpenTelemetry
/// specification defines them (default `parentbased_always_on`).
#[derive(Clone, Debug)]
pub struct TraceConfig {
    pub otlp: bool,
    pub sampler: opentelemetry_sdk::trace::Sampler,
    /// What sampled RPC spans are exported with, when `otlp` is on: not read
    /// from the environment, but set from the tracer provider that
    /// `telemetry::init` builds (a test sets its own).
    pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            otlp: false,
            sampler: opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
                opentelemetry_sdk::trace::Sampler::AlwaysOn,
            )),
            tracer: None,
        }
    }
}

impl TraceConfig {
    /// The SDK reads the sampler variables too, but falls back to its default
    /// on an unknown name or a bad ratio; here either stops start-up.
    fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        use opentelemetry_sdk::trace::Sampler;
        let set = |name: &str| vars.0.get(name).is_some_and(|v| !v.trim().is_empty());
        let disabled = vars
            .0
            .get("OTEL_SDK_DISABLED")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let otlp = !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"));
        // The specification's default ratio when the argument is unset is 1.0.
        let ratio = || -> Result<f64, ConfigError> {
            match vars
                .0
                .get("OTEL_TRACES_SAMPLER_ARG")
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
            {
                None => Ok(1.0),
                Some(raw) => raw
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        ConfigError::new(
                            "OTEL_TRACES_SAMPLER_ARG",
                            format!("invalid value {raw:?}: expected the sampled fraction, from 0 to 1 (e.g. 0.01)"),
                        )
                    }),
            }
        };
        let name = vars
            .0
            .get("OTEL_TRACES_SAMPLER")
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty());
        let sampler = match name.as_deref().unwrap_or("parentbased_always_on") {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
            "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?))),
            other => {
                return Err(ConfigError::new(
                    "OTEL_TRACES_SAMPLER",
                    format!(
                        "unknown sampler {other:?}: expected always_on, always_off, traceidratio, \
                         parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                    ),
                ));
            }
        };
        Ok(Self {
            otlp,
            sampler,
            tracer: None,
        })
    }
}

/// Clerk's webhooks: the endpoint's signing secrets (`whsec_...`), several
/// at once while one is rotated.
#[derive(Clone)]
pub struct ClerkWebhookConfig {
    pub secrets: Vec<SecretString>,
}

impl fmt::Debug for ClerkWebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClerkWebhookConfig")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl ClerkWebhookConfig {
    /// `IDENTITY_CLERK_WEBHOOK_SECRET`: one or more signing secrets, separated by spaces.
    fn load(vars: &Vars) -> Result<Option<Self>, ConfigError> {
        let Some(raw) = vars.secret("IDENTITY_CLERK_WEBHOOK_SECRET")? else {
            return Ok(None);
        };
        let secrets: Vec<SecretString> = raw
            .expose_secret()
            .split_whitespace()
            .map(|s| SecretString::from(s.to_owned()))
            .collect();
        if secrets.is_empty() {
            return Ok(None);
        }
        for (n, secret) in secrets.iter().enumerate() {
            // The message never shows the secret, only which one is wrong.
            if !secret.expose_secret().starts_with("whsec_")
                || standardwebhooks::Webhook::new(secret.expose_secret()).is_err()
            {
                return Err(ConfigError::new(
                    "IDENTITY_CLERK_WEBHOOK_SECRET",
                    format!(
                        "secret {} is not a signing secret: expected whsec_ followed by base64, as Clerk's dashboard shows it",
                        n + 1
                    ),
                ));
            }
        }
        Ok(Some(Self { secrets }))
    }
}

/// The legacy HS-signed JWTs of the application.
#[derive(Clone)]
pub struct LegacyJwtConfig {
    pub secret: SecretString,
    pub algorithm: jsonwebtoken::Algorithm,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim holding the user id (`IDENTITY_LEGACY_JWT_USER_CLAIM`).
    pub user_claim: String,
}

impl fmt::Debug for LegacyJwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LegacyJwtConfig")
            .field("secret", &"*****")
            .field("algorithm", &self.algorithm)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("user_claim", &self.user_claim)
            .finish()
    }
}

/// Where Clerk's signing keys come from.
#[derive(Clone)]
pub enum ClerkKeySource {
    /// A JWKS document (Frontend API `/.well-known/jwks.json`, or the
    /// Backend API `/v1/jwks` with the secret key as bearer).
    Jwks {
        url: url::Url,
        bearer: Option<SecretString>,
    },
    /// A PEM public key: networkless verification.
    Pem(String),
}

impl fmt::Debug for ClerkKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Jwks { url, bearer } => f
                .debug_struct("Jwks")
                .field("url", &url.as_str())
                .field("bearer", &bearer.as_ref().map(|_| "*****"))
                .finish(),
            Self::Pem(_) => f.write_str("Pem"),
        }
    }
}

/// What to do with a valid Clerk token whose user has no mapping yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmappedPolicy {
    /// Create a new internal user linked to the Clerk user.
    Provision,
    /// Link to the unlinked legacy user with the Clerk user's verified
    /// primary email, else provision.
    LinkByEmail,
    /// Reject the token (reason UNMAPPED_USER).
    Reject,
}

#[derive(Clone)]
pub struct ClerkConfig {
    /// The instance's Frontend API URL; tokens must carry exactly this `iss`.
    pub issuer: String,
    pub keys: ClerkKeySource,
    /// Backend API base (user look-ups, bulk import).
    pub api_url: url::Url,
    pub secret_key: Option<SecretString>,
    /// When not empty, `azp` must be one of these.
    pub authorized_parties: Vec<String>,
    pub leeway_seconds: u64,
    pub jwks_refresh: Duration,
    pub jwks_cooldown: Duration,
    pub jwks_max_staleness: Duration,
    pub unmapped_policy: UnmappedPolicy,
}

impl fmt::Debug for ClerkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClerkConfig")
            .field("issuer", &self.issuer)
            .field("keys", &self.keys)
            .field("api_url", &self.api_url.as_str())
            .field("secret_key", &self.secret_key.as_ref().map(|_| "*****"))
            .field("authorized_parties", &self.authorized_parties)
            .field("leeway_seconds", &self.leeway_seconds)
            .field("jwks_refresh", &self.jwks_refresh)
            .field("jwks_cooldown", &self.jwks_cooldown)
            .field("jwks_max_staleness", &self.jwks_max_staleness)
            .field("unmapped_policy", &self.unmapped_policy)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct VerificationConfig {
    pub legacy: Option<LegacyJwtConfig>,
    pub clerk: Option<ClerkConfig>,
    pub reject_legacy_after_migration: bool,
    pub max_token_bytes: usize,
    /// Verified tokens kept in memory (each entry is small); the cache evicts beyond this.
    pub token_cache_size: u64,
    /// How long a user or mapping read from the database is trusted by this
    /// replica; the delay before another replica's unlink takes effect here.
    pub user_cache_ttl: Duration,
    /// How long a revocation by `jti` alone is kept when the token's expiry is unknown.
    pub revocation_default_ttl: Duration,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        Self {
            legacy: None,
            clerk: None,
            reject_legacy_after_migration: false,
            max_token_bytes: 8 * 1024,
            token_cache_size: 50_000,
            user_cache_ttl: Duration::from_secs(10),
            revocation_default_ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Migration invitations.
#[derive(Debug, Clone)]
pub struct InvitationConfig {
    /// The application's frontend; links go to `{frontend_url}/migrate#token=...`.
    pub frontend_url: url::Url,
    pub product_name: String,
    pub ttl: Duration,
    pub per_user_per_hour: u32,
    pub per_caller_per_minute: u32,
    /// Where the token goes in the link (`IDENTITY_MIGRATION_LINK`).
    pub link: LinkStyle,
    /// False outside development mode when no mail transport was chosen:
    /// invitations are then refused rather than "sent" to the log and lost.
    pub deliverable: bool,
}

/// Where the migration token goes in the emailed link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkStyle {
    /// `/migrate#token=...`: never sent to a server, so it stays out of
    /// proxy logs and `Referer` headers (the page reads `location.hash`).
    #[default]
    Fragment,
    /// `/migrate?token=...`, the seed's form.
    Query,
}

impl Default for InvitationConfig {
    fn default() -> Self {
        Self {
            frontend_url: url::Url::parse("http://localhost:3000").unwrap_or_else(|_| unreachable!("valid URL")),
            product_name: "LeafLock".into(),
            ttl: Duration::from_secs(24 * 3600),
            per_user_per_hour: 3,
            per_caller_per_minute: 600,
            link: LinkStyle::Fragment,
            deliverable: true,
        }
    }
}

impl InvitationConfig {
    fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let frontend_url = match vars.plain("IDENTITY_FRONTEND_URL") {
            None => defaults.frontend_url,
            Some(raw) => {
                let url = url::Url::parse(raw.trim())
                    .map_err(|e| ConfigError::new("IDENTITY_FRONTEND_URL", format!("invalid URL: {e}")))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(ConfigError::new("IDENTITY_FRONTEND_URL", "must be an http(s) URL"));
                }
                url
            }
        };
        let product_name = vars
            .plain("IDENTITY_PRODUCT_NAME")
            .map(|v| v.trim().to_owned())
            .unwrap_or(defaults.product_name);
        if product_name.len() > 100 {
            return Err(ConfigError::new(
                "IDENTITY_PRODUCT_NAME",
                "must be at most 100 characters",
            ));
        }
        let per_user_per_hour: u32 = vars.parse("IDENTITY_INVITES_PER_USER_PER_HOUR", 3, "a number of invitations")?;
        let per_caller_per_minute: u32 =
            vars.parse("IDENTITY_INVITES_PER_CALLER_PER_MINUTE", 600, "a number of invitations")?;
        if per_user_per_hour == 0 {
            return Err(ConfigError::new(
                "IDENTITY_INVITES_PER_USER_PER_HOUR",
                "must be at least 1",
            ));
        }
        if per_caller_per_minute == 0 {
            return Err(ConfigError::new(
                "IDENTITY_INVITES_PER_CALLER_PER_MINUTE",
                "must be at least 1",
            ));
        }
        Ok(Self {
            frontend_url,
            product_name,
            ttl: vars.seconds("IDENTITY_INVITATION_TTL_SECONDS", 24 * 3600, 60..=30 * 86_400)?,
            per_user_per_hour,
            per_caller_per_minute,
            link: match vars.plain("IDENTITY_MIGRATION_LINK").map(str::trim) {
                None | Some("fragment") => LinkStyle::Fragment,
                Some("query") => LinkStyle::Query,
                Some(other) => {
                    return Err(ConfigError::new(
                        "IDENTITY_MIGRATION_LINK",
                        format!("invalid value {other:?}: expected fragment or query"),
                    ));
                }
            },
            deliverable: true,
        })
    }
}

/// How invitation emails leave the service.
#[derive(Clone)]
pub enum MailTransportConfig {
    /// SMTP, e.g. `smtp://user:pass@mail:587?tls=required` or `smtps://mail:465`.
    Smtp(SecretString),
    /// One `.eml` file per message in a folder (development).
    File(PathBuf),
    /// The log, without the message body (development).
    Log,
}

impl fmt::Debug for MailTransportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Smtp(url) => write!(f, "Smtp({})", redact_url(url.expose_secret())),
            Self::File(dir) => write!(f, "File({})", dir.display()),
            Self::Log => f.write_str("Log"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MailConfig {
    pub transport: MailTransportConfig,
    pub from: String,
    pub poll_interval: Duration,
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to an hour.
    pub retry_base: Duration,
    /// Longest one delivery may take; a message's lease outlives it.
    pub send_timeout: Duration,
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            transport: MailTransportConfig::Log,
            from: "LeafLock <no-reply@localhost>".into(),
            poll_interval: Duration::from_secs(2),
            max_attempts: 10,
            retry_base: Duration::from_secs(5),
            send_timeout: Duration::from_secs(20),
        }
    }
}

impl MailConfig {
    fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let smtp = vars.secret("IDENTITY_SMTP_URL")?;
        let transport = match vars.plain("IDENTITY_MAIL_TRANSPORT").map(str::trim) {
            None if smtp.is_some() => "smtp",
            None => "log",
            Some(other) => other,
        };
        let transport = match transport {
            "smtp" => {
                let url = smtp.ok_or_else(|| {
                    ConfigError::new(
                        "IDENTITY_SMTP_URL",
                        "IDENTITY_MAIL_TRANSPORT=smtp needs IDENTITY_SMTP_URL",
                    )
                })?;
                let parsed = url::Url::parse(url.expose_secret())
                    .map_err(|_| ConfigError::new("IDENTITY_SMTP_URL", "is not a URL (the value is not shown)"))?;
                if !matches!(parsed.scheme(), "smtp" | "smtps") {
                    return Err(ConfigError::new(
                        "IDENTITY_SMTP_URL",
                        "must start with smtp:// or smtps://",
                    ));
                }
                // smtp:// without `tls=` is plaintext: the links would cross
                // the network in clear. Loopback (a local relay) is fine.
                let tls = parsed
                    .query_pairs()
                    .any(|(k, v)| k == "tls" && matches!(v.as_ref(), "required" | "opportunistic"));
                let loopback = match parsed.host() {
                    // smtp:// is not a special scheme: its host stays text.
                    Some(url::Host::Domain(host)) => {
                        host == "localhost"
                            || host
                                .trim_start_matches('[')
                                .trim_end_matches(']')
                                .parse::<std::net::IpAddr>()
                                .is_ok_and(|ip| ip.is_loopback())
                    }
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    None => false,
                };
                if parsed.scheme() == "smtp"
                    && !tls
                    && !loopback
                    && !vars.bool("IDENTITY_SMTP_ALLOW_PLAINTEXT", false)?
                {
                    return Err(ConfigError::new(
                        "IDENTITY_SMTP_URL",
                        "smtp:// without TLS would send migration links in clear: use smtps://, add ?tls=required, \
                         or set IDENTITY_SMTP_ALLOW_PLAINTEXT=true (the value is not shown)",
                    ));
                }
                MailTransportConfig::Smtp(url)
            }
            "file" => {
                MailTransportConfig::File(PathBuf::from(vars.plain("IDENTITY_MAIL_DIR").unwrap_or("mail").trim()))
            }
            "log" => MailTransportConfig::Log,
            other => {
                return Err(ConfigError::new(
                    "IDENTITY_MAIL_TRANSPORT",
                    format!("invalid value {other:?}: expected smtp, file or log"),
                ));
            }
        };
        let from = vars
            .plain("IDENTITY_MAIL_FROM")
            .map(|v| v.trim().to_owned())
            .unwrap_or(defaults.from);
        if from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(ConfigError::new(
                "IDENTITY_MAIL_FROM",
                format!("{from:?} is not a mailbox like Name <a@b.c>"),
            ));
        }
        let max_attempts: u32 = vars.parse(
            "IDENTITY_OUTBOX_MAX_ATTEMPTS",
            defaults.max_attempts,
            "a number of attempts",
        )?;
        if !(1..=100).contains(&max_attempts) {
            return Err(ConfigError::new(
                "IDENTITY_OUTBOX_MAX_ATTEMPTS",
                "must be between 1 and 100",
            ));
        }
        Ok(Self {
            transport,
            from,
            poll_interval: vars.seconds("IDENTITY_OUTBOX_POLL_SECONDS", 2, 1..=300)?,
            max_attempts,
            retry_base: vars.seconds("IDENTITY_OUTBOX_RETRY_BASE_SECONDS", 5, 1..=3600)?,
            send_timeout: vars.seconds("IDENTITY_OUTBOX_SEND_TIMEOUT_SECONDS", 20, 1..=300)?,
        })
    }
}

/// Whether a URL may be used for Clerk: `https`, or `http` to a loopback host.
fn clerk_url(name: &str, raw: &str) -> Result<url::Url, ConfigError> {
    let url = url::Url::parse(raw.trim()).map_err(|e| ConfigError::new(name, format!("invalid URL: {e}")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(&url) => Ok(url),
        "http" => Err(ConfigError::new(
            name,
            "must use https:// (plain http:// only for loopback hosts)",
        )),
        other => Err(ConfigError::new(
            name,
            format!("unsupported scheme {other:?}: expected https://"),
        )),
    }
}

fn is_loopback_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The Frontend API host encoded in a publishable key: `pk_test_`/`pk_live_`
/// followed by base64 of `host$`.
pub fn frontend_api_from_publishable_key(key: &str) -> Result<String, String> {
    use base64::Engine;
    let encoded = key
        .trim()
        .strip_prefix("pk_test_")
        .or_else(|| key.trim().strip_prefix("pk_live_"))
        .ok_or("must start with pk_test_ or pk_live_")?;
    let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .map_err(|_| "is not a Clerk publishable key (bad base64)")?;
    let text = String::from_utf8(decoded).map_err(|_| "is not a Clerk publishable key (not UTF-8)")?;
    let host = text
        .strip_suffix('$')
        .ok_or("is not a Clerk publishable key (no trailing $)")?;
    if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c)) {
        return Err("is not a Clerk publishable key (bad host)".into());
    }
    Ok(host.to_owned())
}

/// The application's users table (`IDENTITY_USERS_*`). A variable set to
/// an empty value says the table has no such column; an unset one keeps the
/// seed's default.
fn users_table(vars: &Vars) -> Result<UsersTableConfig, ConfigError> {
    let mut config = UsersTableConfig::default();
    if let Some(table) = vars.plain("IDENTITY_USERS_TABLE") {
        config.table = Ident::parse(table, true).map_err(|e| ConfigError::new("IDENTITY_USERS_TABLE", e))?;
        config.table_explicit = true;
    }
    for variable in UsersTableConfig::variables() {
        if let Some(value) = vars.0.get(variable) {
            config
                .set_column(variable, value)
                .map_err(|e| ConfigError::new(variable, e))?;
        }
    }
    Ok(config)
}

impl VerificationConfig {
    fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let legacy = match vars.secret("IDENTITY_LEGACY_JWT_SECRET")? {
            None => None,
            Some(secret) => {
                let algorithm = match vars
                    .plain("IDENTITY_LEGACY_JWT_ALGORITHM")
                    .map(str::trim)
                    .unwrap_or("HS256")
                {
                    "HS256" => jsonwebtoken::Algorithm::HS256,
                    "HS384" => jsonwebtoken::Algorithm::HS384,
                    "HS512" => jsonwebtoken::Algorithm::HS512,
                    other => {
                        return Err(ConfigError::new(
                            "IDENTITY_LEGACY_JWT_ALGORITHM",
                            format!("invalid value {other:?}: expected HS256, HS384 or HS512"),
                        ));
                    }
                };
                let user_claim = vars
                    .plain("IDENTITY_LEGACY_JWT_USER_CLAIM")
                    .map_or("sub", str::trim)
                    .to_owned();
                if user_claim.len() > 128 || user_claim.chars().any(char::is_control) {
                    return Err(ConfigError::new(
                        "IDENTITY_LEGACY_JWT_USER_CLAIM",
                        "must be a claim name such as sub or user_id",
                    ));
                }
                Some(LegacyJwtConfig {
                    secret,
                    algorithm,
                    issuer: vars.plain("IDENTITY_LEGACY_JWT_ISSUER").map(|v| v.trim().to_owned()),
                    audience: vars.plain("IDENTITY_LEGACY_JWT_AUDIENCE").map(|v| v.trim().to_owned()),
                    user_claim,
                })
            }
        };

        let secret_key = vars.secret("IDENTITY_CLERK_SECRET_KEY")?;
        let pem = vars.secret("IDENTITY_CLERK_JWT_KEY")?;
        let frontend = vars
            .plain("IDENTITY_CLERK_PUBLISHABLE_KEY")
            .map(|key| {
                frontend_api_from_publishable_key(key)
                    .map_err(|e| ConfigError::new("IDENTITY_CLERK_PUBLISHABLE_KEY", e))
            })
            .transpose()?;
        let explicit_issuer = vars
            .plain("IDENTITY_CLERK_ISSUER")
            .map(|v| v.trim().trim_end_matches('/').to_owned());
        let explicit_jwks = vars.plain("IDENTITY_CLERK_JWKS_URL");
        let clerk_wanted = secret_key.is_some()
            || pem.is_some()
            || frontend.is_some()
            || explicit_issuer.is_some()
            || explicit_jwks.is_some();

        let clerk = if !clerk_wanted {
            None
        } else {
            let issuer = match (explicit_issuer, &frontend) {
                (Some(issuer), _) => {
                    clerk_url("IDENTITY_CLERK_ISSUER", &issuer)?;
                    issuer
                }
                (None, Some(host)) => format!("https://{host}"),
                (None, None) => {
                    return Err(ConfigError::new(
                        "IDENTITY_CLERK_ISSUER",
                        "Clerk is configured but its issuer is unknown: set IDENTITY_CLERK_PUBLISHABLE_KEY or IDENTITY_CLERK_ISSUER",
                    ));
                }
            };
            let api_url = clerk_url(
                "IDENTITY_CLERK_API_URL",
                vars.plain("IDENTITY_CLERK_API_URL").unwrap_or("https://api.clerk.com"),
            )?;
            let keys = if let Some(pem) = pem {
                let text = secrecy::ExposeSecret::expose_secret(&pem).replace("\\n", "\n");
                jsonwebtoken::DecodingKey::from_rsa_pem(text.as_bytes())
                    .map_err(|_| ConfigError::new("IDENTITY_CLERK_JWT_KEY", "is not an RSA public key in PEM form"))?;
                ClerkKeySource::Pem(text)
            } else if let Some(url) = explicit_jwks {
                let url = clerk_url("IDENTITY_CLERK_JWKS_URL", url)?;
                // The secret key goes only to the Backend API's own JWKS endpoint.
                let bearer = (url.origin() == api_url.origin()).then(|| secret_key.clone()).flatten();
                ClerkKeySource::Jwks { url, bearer }
            } else if let Some(host) = &frontend {
                let url = clerk_url(
                    "IDENTITY_CLERK_PUBLISHABLE_KEY",
                    &format!("https://{host}/.well-known/jwks.json"),
                )?;
                ClerkKeySource::Jwks { url, bearer: None }
            } else if let Some(secret) = &secret_key {
                let url = api_url
                    .join("v1/jwks")
                    .map_err(|e| ConfigError::new("IDENTITY_CLERK_API_URL", format!("invalid URL: {e}")))?;
                ClerkKeySource::Jwks {
                    url,
                    bearer: Some(secret.clone()),
                }
            } else {
                return Err(ConfigError::new(
                    "IDENTITY_CLERK_JWKS_URL",
                    "no source for Clerk's keys: set IDENTITY_CLERK_PUBLISHABLE_KEY, IDENTITY_CLERK_JWKS_URL, \
                     IDENTITY_CLERK_SECRET_KEY or IDENTITY_CLERK_JWT_KEY",
                ));
            };
            let authorized_parties = vars
                .plain("IDENTITY_CLERK_AUTHORIZED_PARTIES")
                .map(|v| {
                    v.split(',')
                        .map(|p| p.trim().trim_end_matches('/').to_owned())
                        .filter(|p| !p.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            let unmapped_policy = match vars
                .plain("IDENTITY_UNMAPPED_CLERK_USER")
                .map(str::trim)
                .unwrap_or("provision")
            {
                "provision" => UnmappedPolicy::Provision,
                "link_by_email" => UnmappedPolicy::LinkByEmail,
                "reject" => UnmappedPolicy::Reject,
                other => {
                    return Err(ConfigError::new(
                        "IDENTITY_UNMAPPED_CLERK_USER",
                        format!("invalid value {other:?}: expected provision, link_by_email or reject"),
                    ));
                }
            };
            if unmapped_policy == UnmappedPolicy::LinkByEmail && secret_key.is_none() {
                return Err(ConfigError::new(
                    "IDENTITY_UNMAPPED_CLERK_USER",
                    "link_by_email reads the user's email from Clerk's Backend API and needs IDENTITY_CLERK_SECRET_KEY",
                ));
            }
            Some(ClerkConfig {
                issuer,
                keys,
                api_url,
                secret_key,
                authorized_parties,
                leeway_seconds: vars.seconds("IDENTITY_CLERK_LEEWAY_SECONDS", 5, 0..=300)?.as_secs(),
                jwks_refresh: vars.seconds("IDENTITY_CLERK_JWKS_REFRESH_SECONDS", 300, 1..=86_400)?,
                jwks_cooldown: vars.seconds("IDENTITY_CLERK_JWKS_COOLDOWN_SECONDS", 30, 0..=3600)?,
                jwks_max_staleness: vars.seconds(
                    "IDENTITY_CLERK_JWKS_MAX_STALENESS_SECONDS",
                    86_400,
                    60..=30 * 86_400,
                )?,
                unmapped_policy,
            })
        };

        let max_token_bytes: usize = vars.parse(
            "IDENTITY_MAX_TOKEN_BYTES",
            defaults.max_token_bytes,
            "a number of bytes",
        )?;
        if !(512..=65_536).contains(&max_token_bytes) {
            return Err(ConfigError::new(
                "IDENTITY_MAX_TOKEN_BYTES",
                "must be between 512 and 65536",
            ));
        }
        let token_cache_size: u64 = vars.parse(
            "IDENTITY_TOKEN_CACHE_SIZE",
            defaults.token_cache_size,
            "a number of entries",
        )?;
        if token_cache_size > MAX_TOKEN_CACHE_SIZE {
            return Err(ConfigError::new(
                "IDENTITY_TOKEN_CACHE_SIZE",
                "must be at most 10000000 (entries; 0 disables the cache)",
            ));
        }
        Ok(Self {
            legacy,
            clerk,
            reject_legacy_after_migration: vars.bool("IDENTITY_REJECT_LEGACY_AFTER_MIGRATION", false)?,
            max_token_bytes,
            token_cache_size,
            user_cache_ttl: vars.seconds("IDENTITY_USER_CACHE_SECONDS", 10, 0..=3600)?,
            revocation_default_ttl: vars.seconds(
                "IDENTITY_REVOCATION_DEFAULT_SECONDS",
                defaults.revocation_default_ttl.as_secs(),
                60..=366 * 86_400,
            )?,
        })
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
    fn clerk_events_are_kept_longer_than_svix_retries() {
        let day = Duration::from_secs(86_400);
        assert_eq!(load(&[]).unwrap().clerk_webhook_retention, 30 * day);
        let set = |days: &str| load(&[("IDENTITY_CLERK_WEBHOOK_RETENTION_DAYS", days)]);
        assert_eq!(set("4").unwrap().clerk_webhook_retention, 4 * day);
        assert_eq!(set(" 90 ").unwrap().clerk_webhook_retention, 90 * day);
        for bad in ["3", "0", "3651", "-1", "1.5", "a week"] {
            let err = set(bad).unwrap_err();
            assert_eq!(err.variable, "IDENTITY_CLERK_WEBHOOK_RETENTION_DAYS", "{bad}");
        }
    }

    #[test]
    fn plaintext_smtp_needs_an_opt_in_outside_loopback() {
        let smtp = |url: &str, extra: &[(&str, &str)]| {
            let mut pairs = vec![("IDENTITY_SMTP_URL", url)];
            pairs.extend_from_slice(extra);
            load(&pairs)
        };
        let err = smtp("smtp://user:pw@mail.example.com:25", &[]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_SMTP_URL");
        assert!(!err.message.contains("pw@"), "{err}");
        assert!(smtp("smtp://mail.example.com:587?tls=required", &[]).is_ok());
        assert!(smtp("smtps://mail.example.com", &[]).is_ok());
        smtp("smtp://127.0.0.1:2525", &[]).unwrap();
        assert!(
            smtp(
                "smtp://mail.example.com:25",
                &[("IDENTITY_SMTP_ALLOW_PLAINTEXT", "true")]
            )
            .is_ok()
        );
    }

    #[test]
    fn invitations_are_not_lost_to_the_log_outside_development() {
        let (_, line) = crate::domain::generate_api_key("svc", &[crate::domain::Scope::Admin]);
        let production = load(&[("IDENTITY_API_KEYS", &line), ("IDENTITY_LISTEN_ADDR", "0.0.0.0:50051")]).unwrap();
        assert!(!production.invitations.deliverable);
        let chosen = load(&[
            ("IDENTITY_API_KEYS", &line),
            ("IDENTITY_LISTEN_ADDR", "0.0.0.0:50051"),
            ("IDENTITY_MAIL_TRANSPORT", "log"),
        ])
        .unwrap();
        assert!(chosen.invitations.deliverable);
        assert!(load(&[]).unwrap().invitations.deliverable, "development mode");
        assert_eq!(load(&[]).unwrap().invitations.link, LinkStyle::Fragment);
        assert_eq!(
            load(&[("IDENTITY_MIGRATION_LINK", "query")]).unwrap().invitations.link,
            LinkStyle::Query
        );
    }

    #[test]
    fn errors_name_the_variable() {
        let err = load(&[("IDENTITY_LISTEN_ADDR", "nowhere")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_LISTEN_ADDR");
        let err = load(&[("IDENTITY_LOG_FORMAT", "xml")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_LOG_FORMAT");
        let err = load(&[("IDENTITY_MIGRATE_ON_START", "maybe")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_MIGRATE_ON_START");
        let err = load(&[("IDENTITY_TOKEN_CACHE_SIZE", "100000000000")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_TOKEN_CACHE_SIZE");
        assert!(load(&[("IDENTITY_TOKEN_CACHE_SIZE", "0")]).is_ok());
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
    fn clerk_settings_derive_from_the_publishable_key() {
        use base64::Engine;
        let pk = format!(
            "pk_test_{}",
            base64::engine::general_purpose::STANDARD.encode("clean-mole-12.clerk.accounts.dev$")
        );
        let config = load(&[("CLERK_PUBLISHABLE_KEY", &pk), ("JWT_SECRET", "s3cret")]).unwrap();
        let clerk = config.verification.clerk.clone().unwrap();
        assert_eq!(clerk.issuer, "https://clean-mole-12.clerk.accounts.dev");
        match clerk.keys {
            ClerkKeySource::Jwks { url, bearer } => {
                assert_eq!(
                    url.as_str(),
                    "https://clean-mole-12.clerk.accounts.dev/.well-known/jwks.json"
                );
                assert!(bearer.is_none());
            }
            ClerkKeySource::Pem(_) => panic!("expected JWKS"),
        }
        assert_eq!(clerk.leeway_seconds, 5);
        assert!(
            config.verification.legacy.is_some(),
            "JWT_SECRET is the seed's fallback"
        );
        assert!(!format!("{:?}", config.verification).contains("s3cret"));
    }

    #[test]
    fn clerk_misconfiguration_names_the_variable() {
        let err = load(&[("IDENTITY_CLERK_PUBLISHABLE_KEY", "pk_test_!!!")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_CLERK_PUBLISHABLE_KEY");
        let err = load(&[("IDENTITY_CLERK_ISSUER", "http://clerk.example.com")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_CLERK_ISSUER");
        let err = load(&[("IDENTITY_CLERK_SECRET_KEY", "sk_test_x")]).unwrap_err();
        assert_eq!(err.variable, "IDENTITY_CLERK_ISSUER");
        let err = load(&[
            ("IDENTITY_CLERK_ISSUER", "https://c.example.com"),
            ("IDENTITY_CLERK_JWT_KEY", "nope"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "IDENTITY_CLERK_JWT_KEY");
        let err = load(&[
            ("IDENTITY_LEGACY_JWT_SECRET", "x"),
            ("IDENTITY_LEGACY_JWT_ALGORITHM", "RS256"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "IDENTITY_LEGACY_JWT_ALGORITHM");
        let ok = load(&[
            ("IDENTITY_CLERK_ISSUER", "http://127.0.0.1:9999"),
            ("IDENTITY_CLERK_JWKS_URL", "http://127.0.0.1:9999/.well-known/jwks.json"),
        ]);
        assert!(ok.is_ok(), "loopback http is allowed: {ok:?}");
    }

    #[test]
    fn gateway_settings_parse_and_refuse_bad_values() {
        use crate::gateway::{ForwardAuthAccess, IdentityHeader};
        let defaults = load(&[]).unwrap().gateway;
        assert_eq!(defaults, crate::gateway::GatewayConfig::default());
        assert_eq!(defaults.header_prefix, "x-identity-");
        assert_eq!(defaults.forward_auth, ForwardAuthAccess::Key);
        let config = load(&[
            ("IDENTITY_GATEWAY_HEADER_PREFIX", "X-Auth-"),
            ("IDENTITY_GATEWAY_HEADERS", "user-id, email,user-id"),
            ("IDENTITY_GATEWAY_REMOVE_AUTHORIZATION", "true"),
            ("IDENTITY_FORWARD_AUTH", "network"),
            ("IDENTITY_EXT_AUTHZ", "off"),
        ])
        .unwrap()
        .gateway;
        assert_eq!(config.header_prefix, "x-auth-");
        assert_eq!(config.headers, vec![IdentityHeader::UserId, IdentityHeader::Email]);
        assert!(config.remove_authorization);
        assert_eq!(config.forward_auth, ForwardAuthAccess::Network);
        assert_eq!(config.ext_authz, ForwardAuthAccess::Off);
        for (variable, value) in [
            ("IDENTITY_GATEWAY_HEADER_PREFIX", "x identity"),
            ("IDENTITY_GATEWAY_HEADERS", "user-id,password"),
            ("IDENTITY_GATEWAY_REMOVE_AUTHORIZATION", "perhaps"),
            ("IDENTITY_FORWARD_AUTH", "open"),
            ("IDENTITY_EXT_AUTHZ", "mtls"),
        ] {
            assert_eq!(load(&[(variable, value)]).unwrap_err().variable, variable);
        }
    }

    #[test]
    fn trace_sampler_follows_the_standard_variables() {
        use opentelemetry_sdk::trace::Sampler;
        let traces = |pairs: &[(&str, &str)]| load(pairs).map(|c| c.traces);
        let default = traces(&[]).unwrap();
        assert!(!default.otlp);
        assert_eq!(format!("{:?}", default.sampler), "ParentBased(AlwaysOn)");
        let on = traces(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")]).unwrap();
        assert!(on.otlp);
        let off = traces(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ])
        .unwrap();
        assert!(!off.otlp);
        let ratio = traces(&[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
        ])
        .unwrap();
        assert_eq!(format!("{:?}", ratio.sampler), "ParentBased(TraceIdRatioBased(0.01))");
        let unset_arg = traces(&[("OTEL_TRACES_SAMPLER", "traceidratio")]).unwrap();
        assert!(matches!(unset_arg.sampler, Sampler::TraceIdRatioBased(r) if r == 1.0));
        assert!(matches!(
            traces(&[("OTEL_TRACES_SAMPLER", "Always_Off")]).unwrap().sampler,
            Sampler::AlwaysOff
        ));

        let err = traces(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")]).unwrap_err();
        assert_eq!(err.variable, "OTEL_TRACES_SAMPLER");
        assert!(err.message.contains("parentbased_traceidratio"), "{err}");
        for bad in ["1.5", "-0.1", "one percent", "NaN"] {
            let err = traces(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", bad),
            ])
            .unwrap_err();
            assert_eq!(err.variable, "OTEL_TRACES_SAMPLER_ARG", "{bad}");
        }
    }

    #[test]
    fn unknown_prefixed_variables_are_reported() {
        let config = load(&[("IDENTITY_LISTEN_ADRR", "x"), ("IDENTITY_API_KEYS_FILE", "")]).unwrap();
        assert_eq!(config.unknown_variables, vec!["IDENTITY_LISTEN_ADRR".to_owned()]);
    }
}
