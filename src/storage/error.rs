use std::fmt;

/// What went wrong in storage, already classified. Database error text is
/// kept as a source for the log and never shown to a client.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("conflict: {0}")]
    Conflict(Conflict),
    #[error("database unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The database is not as the configuration says (a configured column
    /// or table is missing, a migration failed): the message names what and
    /// holds no secret. At run time: FAILED_PRECONDITION.
    #[error("{0}")]
    Precondition(String),
    /// A statement met a column or table that is gone (the application
    /// dropped it while the service ran); the mapping is read again.
    #[error("the application's users table changed: {0}")]
    SchemaChanged(String),
    #[error("database error")]
    Other(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Which uniqueness rule a write broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// A user with this id or email already exists.
    UserExists,
    /// The user is already linked to a Clerk user.
    UserAlreadyLinked,
    /// The Clerk user is already linked to another user.
    ClerkUserTaken,
    /// Another bulk migration job is unfinished.
    BulkJobRunning,
    /// An admin unlinked this Clerk user: it stays unmapped until linked again.
    ClerkUserUnlinked,
    /// Another reconciliation pass is unfinished.
    ReconcileRunning,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UserExists => "a user with this id or email already exists",
            Self::UserAlreadyLinked => "user is already linked to a Clerk user",
            Self::ClerkUserTaken => "Clerk user is already linked to another user",
            Self::BulkJobRunning => "a bulk migration job is already running",
            Self::ClerkUserUnlinked => "Clerk user was unlinked by an admin and stays unmapped until linked again",
            Self::ReconcileRunning => "a reconciliation pass is already running",
        })
    }
}

/// The one place where sqlx errors are translated. `on_unique` names the
/// conflict a unique violation means for the statement at hand.
pub(crate) fn classify(err: sqlx::Error, on_unique: Option<Conflict>) -> StorageError {
    match &err {
        sqlx::Error::Database(db) => {
            if db.is_unique_violation()
                && let Some(conflict) = on_unique
            {
                return StorageError::Conflict(conflict);
            }
            if db.is_foreign_key_violation() {
                return StorageError::NotFound("user");
            }
            // A column or table the statement names is gone (PostgreSQL
            // 42703/42P01; SQLite says so in its message, code 1).
            let message = db.message();
            if matches!(db.code().as_deref(), Some("42703" | "42P01"))
                || message.starts_with("no such column")
                || message.starts_with("no such table")
            {
                return StorageError::SchemaChanged(message.to_owned());
            }
            // SQLite reports a locked/busy database; PostgreSQL reports
            // connection-class (08xxx), shutdown (57Pxx) and too-many-connections.
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if code.starts_with("08") || code.starts_with("57P") || code == "53300" || code == "5" || code == "6" {
                return StorageError::Unavailable(Box::new(err));
            }
            StorageError::Other(Box::new(err))
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StorageError::Unavailable(Box::new(err)),
        _ => StorageError::Other(Box::new(err)),
    }
}

/// Translates an insert into `identity_user_mappings`: a unique violation
/// names the side that is taken, the same on both backends. Its primary key
/// (`user_id`) means the user is linked already; its `clerk_user_id` key
/// means the Clerk user is. PostgreSQL names the constraint, SQLite the
/// column (`UNIQUE constraint failed: identity_user_mappings.clerk_user_id`).
pub(crate) fn classify_mapping_insert(err: sqlx::Error) -> StorageError {
    let conflict = match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            let clerk_side =
                db.constraint().is_some_and(|c| c.contains("clerk_user_id")) || db.message().contains("clerk_user_id");
            if clerk_side {
                Conflict::ClerkUserTaken
            } else {
                Conflict::UserAlreadyLinked
            }
        }
        _ => Conflict::ClerkUserTaken,
    };
    classify(err, Some(conflict))
}
