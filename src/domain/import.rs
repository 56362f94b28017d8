//! Loading legacy users from CSV or JSON Lines (`id`, `email`,
//! `password_hash`), for development and for rehearsing a bulk migration.
//! Each bad row is reported with its line number; good rows still load.

use std::io::BufRead;

use serde::Deserialize;

use super::{AuditOutcome, Caller, DomainError, Email, UserId, audit};
use crate::storage::{NewLegacyUser, Storage, StorageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    Csv,
    JsonLines,
}

impl ImportFormat {
    /// Guesses from a file name: `.csv` is CSV, `.jsonl`/`.ndjson`/`.json` JSON Lines.
    pub fn from_path(path: &std::path::Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" => Some(Self::Csv),
            "jsonl" | "ndjson" | "json" => Some(Self::JsonLines),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Row {
    id: String,
    email: String,
    #[serde(default)]
    password_hash: Option<String>,
}

/// One row that did not load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub line: u64,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub imported: u64,
    pub errors: Vec<RowError>,
}

/// Longest password hash accepted (bcrypt is 60, argon2 about 100).
const MAX_HASH_LEN: usize = 1024;

fn validate(row: Row) -> Result<NewLegacyUser, String> {
    let id = UserId::parse("id", &row.id).map_err(|e| e.to_string())?;
    let email = Email::parse("email", &row.email).map_err(|e| e.to_string())?;
    let password_hash = row.password_hash.map(|h| h.trim().to_owned()).filter(|h| !h.is_empty());
    if password_hash.as_ref().is_some_and(|h| h.len() > MAX_HASH_LEN) {
        return Err(format!("invalid password_hash: longer than {MAX_HASH_LEN} characters"));
    }
    Ok(NewLegacyUser {
        id,
        email,
        password_hash,
    })
}

/// Rows that passed validation, each with its line number, and the rows that did not.
pub type Parsed = (Vec<(u64, NewLegacyUser)>, Vec<RowError>);

/// Parses the input into validated rows and per-line errors, without touching storage.
pub fn parse(input: impl BufRead, format: ImportFormat) -> Result<Parsed, DomainError> {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    match format {
        ImportFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .trim(csv::Trim::All)
                .flexible(false)
                .from_reader(input);
            let headers = reader
                .headers()
                .map_err(|e| DomainError::invalid("file", format!("cannot read the CSV header: {e}")))?
                .clone();
            for column in ["id", "email"] {
                if !headers.iter().any(|h| h == column) {
                    return Err(DomainError::invalid(
                        "file",
                        format!("the CSV header has no {column:?} column"),
                    ));
                }
            }
            for result in reader.records() {
                match result {
                    Ok(record) => {
                        let line = record.position().map(|p| p.line()).unwrap_or(0);
                        match record
                            .deserialize::<Row>(Some(&headers))
                            .map_err(|e| e.to_string())
                            .and_then(validate)
                        {
                            Ok(user) => rows.push((line, user)),
                            Err(message) => errors.push(RowError { line, message }),
                        }
                    }
                    Err(err) => {
                        let line = err.position().map(|p| p.line()).unwrap_or(0);
                        errors.push(RowError {
                            line,
                            message: format!("unreadable row: {}", csv_reason(&err)),
                        });
                    }
                }
            }
        }
        ImportFormat::JsonLines => {
            for (index, line) in input.lines().enumerate() {
                let number = index as u64 + 1;
                let line = line.map_err(|e| DomainError::invalid("file", format!("cannot read line {number}: {e}")))?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Row>(&line) {
                    Ok(row) => match validate(row) {
                        Ok(user) => rows.push((number, user)),
                        Err(message) => errors.push(RowError { line: number, message }),
                    },
                    Err(err) => errors.push(RowError {
                        line: number,
                        message: format!("not a JSON object with id and email: {err}"),
                    }),
                }
            }
        }
    }
    Ok((rows, errors))
}

fn csv_reason(err: &csv::Error) -> String {
    match err.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("expected {expected_len} fields, found {len}")
        }
        csv::ErrorKind::Deserialize { err, .. } => err.to_string(),
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_owned(),
        _ => "malformed CSV".to_owned(),
    }
}

/// Parses and loads the users; rows that exist already are reported, not overwritten.
pub async fn import_users(
    storage: &dyn Storage,
    caller: &Caller,
    input: impl BufRead,
    format: ImportFormat,
) -> Result<ImportReport, DomainError> {
    let (rows, mut errors) = parse(input, format)?;
    let mut imported = 0;
    for (line, user) in rows {
        match storage.insert_legacy_user(&user).await {
            Ok(()) => imported += 1,
            Err(StorageError::Conflict(conflict)) => errors.push(RowError {
                line,
                message: conflict.to_string(),
            }),
            Err(err) => return Err(err.into()),
        }
    }
    errors.sort_by_key(|e| e.line);
    let event = audit::event(
        caller,
        "users.import",
        None,
        if errors.is_empty() {
            AuditOutcome::Success
        } else {
            AuditOutcome::Failure
        },
        format!("{imported} imported, {} rejected", errors.len()),
    );
    storage.append_audit(&event).await?;
    Ok(ImportReport { imported, errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "6f1c2b9e-8a43-4f0e-9d57-0c8f3b1a2d44";

    #[test]
    fn csv_reports_bad_rows_with_their_line() {
        let input = format!(
            "id,email,password_hash\n{GOOD},ann@example.com,$2b$10$abc\nnot-a-uuid,bob@example.com,\n{GOOD},broken\n"
        );
        let (rows, errors) = parse(input.as_bytes(), ImportFormat::Csv).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0, 2);
        assert_eq!(rows[0].1.password_hash.as_deref(), Some("$2b$10$abc"));
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), vec![3, 4]);
        assert!(errors[0].message.contains("invalid id"));
    }

    #[test]
    fn jsonl_reports_bad_rows_with_their_line() {
        let input = format!(
            "{{\"id\":\"{GOOD}\",\"email\":\"ann@example.com\"}}\n\n{{\"id\":\"{GOOD}\"}}\n[1,2]\n{{\"id\":\"{GOOD}\",\"email\":\"nope\"}}\n"
        );
        let (rows, errors) = parse(input.as_bytes(), ImportFormat::JsonLines).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1.password_hash, None);
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn csv_without_required_columns_is_refused() {
        assert!(parse("name,mail\nx,y\n".as_bytes(), ImportFormat::Csv).is_err());
    }
}
