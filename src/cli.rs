//! The command line. Every subcommand reads the same `IDENTITY_*`
//! configuration as the server.

use std::{
    io::{BufReader, Write},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use secrecy::ExposeSecret;

use crate::{
    config::Config,
    domain::{Caller, Scope, generate_api_key, import},
    server, storage, telemetry,
};

#[derive(Debug, Parser)]
#[command(
    name = "identity",
    version,
    about = "gRPC identity service for the move from legacy JWT login to Clerk"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server (applies database migrations first unless IDENTITY_MIGRATE_ON_START=false).
    Serve,
    /// Apply database migrations and exit (for a deployment's migration job).
    Migrate,
    /// Load legacy users (id, email, password_hash) from CSV or JSON Lines.
    ImportUsers {
        /// The file to read; `-` reads standard input.
        file: PathBuf,
        /// The input format; guessed from the file extension when omitted.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
    },
    /// Mint a legacy JWT for a user with the configured IDENTITY_LEGACY_JWT_SECRET
    /// (development and debugging: the application's login normally issues them).
    LegacyToken {
        /// The user id (UUID) the token speaks for.
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Compare Clerk's users with the mappings and report the drift by kind
    /// (a dry run unless --fix); runs in this process, one pass at a time
    /// across the cluster, and resumes an interrupted pass with --resume.
    Reconcile {
        /// Apply the safe repairs (remove mappings of deleted Clerk users,
        /// fill missing mappings from a matching external_id).
        #[arg(long)]
        fix: bool,
        /// Clerk requests per second; the configured IDENTITY_CLERK_API_RATE when omitted.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Resume this interrupted pass (its id).
        #[arg(long)]
        resume: Option<String>,
    },
    /// Generate an API key and print the configuration line that admits it.
    GenApiKey {
        /// A name for the caller, recorded in the audit log.
        #[arg(long)]
        name: String,
        /// Comma-separated scopes: verify, migrate, admin, gateway (Envoy ext_authz and /forward-auth only).
        #[arg(long, value_delimiter = ',', default_value = "verify")]
        scopes: Vec<ScopeArg>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Csv,
    Jsonl,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScopeArg {
    Verify,
    Migrate,
    Admin,
    Gateway,
}

impl From<ScopeArg> for Scope {
    fn from(value: ScopeArg) -> Self {
        match value {
            ScopeArg::Verify => Scope::Verify,
            ScopeArg::Migrate => Scope::Migrate,
            ScopeArg::Admin => Scope::Admin,
            ScopeArg::Gateway => Scope::Gateway,
        }
    }
}

/// Runs a parsed command line; the binary's `main` calls only this.
pub async fn run(cli: Cli) -> ExitCode {
    if let Command::GenApiKey { name, scopes } = &cli.command {
        return gen_api_key(name, scopes);
    }
    let mut config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("configuration error: {err}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    let telemetry = match telemetry::init(config.log_format, &config.log_level, &config.traces) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("configuration error: {err}");
            return ExitCode::from(78);
        }
    };
    config.traces.tracer = telemetry.tracer();
    let result = match cli.command {
        Command::Serve => serve(config).await,
        Command::Migrate => migrate(config).await,
        Command::ImportUsers { file, format } => import_users(config, file, format).await,
        Command::LegacyToken { user, ttl } => legacy_token(&config, &user, ttl),
        Command::Reconcile { fix, rate, resume } => reconcile(config, fix, rate, resume).await,
        Command::GenApiKey { .. } => Ok(ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|message| {
        tracing::error!("{message}");
        eprintln!("error: {message}");
        ExitCode::FAILURE
    })
}

async fn serve(config: Config) -> Result<ExitCode, String> {
    let running = server::start(config).await.map_err(|e| e.to_string())?;
    let mut running = running;
    tokio::select! {
        _ = server::shutdown_signal() => {
            tracing::info!("signal received");
            running.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        result = running.wait() => result.map(|()| ExitCode::SUCCESS).map_err(|e| format!("server failed: {e}")),
    }
}

async fn migrate(config: Config) -> Result<ExitCode, String> {
    let url = config.database_url.expose_secret();
    storage::connect(url, &config.database, true).await.map_err(|e| {
        format!(
            "migration of {} failed: {}",
            storage::redact_url(url),
            crate::grpc::error_chain(&e)
        )
    })?;
    tracing::info!(database = %storage::redact_url(url), "migrations applied");
    Ok(ExitCode::SUCCESS)
}

async fn import_users(config: Config, file: PathBuf, format: Option<FormatArg>) -> Result<ExitCode, String> {
    let format = match format {
        Some(FormatArg::Csv) => import::ImportFormat::Csv,
        Some(FormatArg::Jsonl) => import::ImportFormat::JsonLines,
        None => import::ImportFormat::from_path(&file)
            .ok_or("cannot tell the format from the file name; pass --format csv or --format jsonl")?,
    };
    let url = config.database_url.expose_secret();
    let storage = storage::connect(url, &config.database, config.migrate_on_start)
        .await
        .map_err(|e| {
            format!(
                "cannot open {}: {}",
                storage::redact_url(url),
                crate::grpc::error_chain(&e)
            )
        })?;
    let report = if file.as_os_str() == "-" {
        let stdin = std::io::stdin();
        import::import_users(storage.as_ref(), &Caller::cli(), stdin.lock(), format).await
    } else {
        let reader = std::fs::File::open(&file).map_err(|e| format!("cannot open {}: {e}", file.display()))?;
        import::import_users(storage.as_ref(), &Caller::cli(), BufReader::new(reader), format).await
    }
    .map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    for error in &report.errors {
        let _ = writeln!(out, "line {}: {}", error.line, error.message);
    }
    let _ = writeln!(
        out,
        "imported {} users, rejected {} rows",
        report.imported,
        report.errors.len()
    );
    Ok(if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn reconcile(config: Config, fix: bool, rate: f64, resume: Option<String>) -> Result<ExitCode, String> {
    let clerk = config
        .verification
        .clerk
        .as_ref()
        .and_then(|c| {
            c.secret_key.as_ref().map(|secret| {
                crate::clerk::ClerkApi::new(crate::clerk::http_client(), c.api_url.clone(), secret.clone())
            })
        })
        .ok_or("reconciliation needs Clerk's Backend API: set IDENTITY_CLERK_SECRET_KEY")?;
    let url = config.database_url.expose_secret();
    let storage = storage::connect(url, &config.database, config.migrate_on_start)
        .await
        .map_err(|e| {
            format!(
                "cannot open {}: {}",
                storage::redact_url(url),
                crate::grpc::error_chain(&e)
            )
        })?;
    let resume_job_id = resume
        .map(|id| uuid::Uuid::parse_str(id.trim()).map_err(|_| "--resume must be a pass id (UUID)".to_owned()))
        .transpose()?;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let passes = crate::domain::Reconciliations::new(storage, Some(clerk), None, config.bulk.clone(), stop_rx);
    let mut progress = passes
        .start(
            &Caller::cli(),
            crate::domain::ReconcileRequest {
                fix,
                max_requests_per_second: rate,
                page_size: 0,
                resume_job_id,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    // Not `stdout().lock()`: the pass logs to stdout from its own task while
    // this loop waits, and a lock held across the wait would stall both.
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "reconciliation {} ({})",
        progress.borrow().job_id,
        if fix { "fix" } else { "dry run" }
    );
    loop {
        let snapshot = progress.borrow_and_update().clone();
        let _ = writeln!(
            out,
            "{} Clerk users, {} mappings checked",
            snapshot.summary.clerk_users_seen, snapshot.summary.mappings_checked
        );
        if snapshot.state != storage::BulkJobState::Running {
            for kind in crate::domain::reconcile::DRIFT_KINDS {
                let drift = snapshot.summary.drift.get(kind).cloned().unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{kind}: {} found, {} fixed{}{}",
                    drift.count,
                    drift.fixed,
                    if drift.ids.is_empty() { "" } else { ": " },
                    drift.ids.join(" ")
                );
            }
            let _ = writeln!(out, "{}: {}", snapshot.state.as_db(), snapshot.message);
            return Ok(if snapshot.state == storage::BulkJobState::Completed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        if progress.changed().await.is_err() {
            return Err("the reconciliation stopped without a result".into());
        }
    }
}

fn legacy_token(config: &Config, user: &str, ttl: u64) -> Result<ExitCode, String> {
    let legacy = config
        .verification
        .legacy
        .as_ref()
        .ok_or("IDENTITY_LEGACY_JWT_SECRET (or JWT_SECRET) is not set")?;
    let user = crate::domain::UserId::parse("--user", user).map_err(|e| e.to_string())?;
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "iat": now,
        "exp": now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX / 2)),
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    // The claim the verifier reads the user id from (IDENTITY_LEGACY_JWT_USER_CLAIM).
    claims[legacy.user_claim.as_str()] = user.to_string().into();
    if let Some(issuer) = &legacy.issuer {
        claims["iss"] = issuer.clone().into();
    }
    if let Some(audience) = &legacy.audience {
        claims["aud"] = audience.clone().into();
    }
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(legacy.algorithm),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(legacy.secret.expose_secret().as_bytes()),
    )
    .map_err(|e| format!("cannot sign: {e}"))?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

fn gen_api_key(name: &str, scopes: &[ScopeArg]) -> ExitCode {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        eprintln!("error: --name must be letters, digits, '-', '_' or '.'");
        return ExitCode::from(64);
    }
    let mut scopes: Vec<Scope> = scopes.iter().map(|s| Scope::from(*s)).collect();
    scopes.sort();
    scopes.dedup();
    let (key, line) = generate_api_key(name, &scopes);
    println!("API key (give it to the caller; it is not stored anywhere):\n  {key}");
    println!("Configuration entry (add to IDENTITY_API_KEYS, entries separated by ';'):\n  {line}");
    ExitCode::SUCCESS
}
