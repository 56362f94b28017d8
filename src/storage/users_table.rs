//! The application's users table as the operator maps it
//! (`IDENTITY_USERS_*`): validated identifiers, the columns found at
//! start-up, and the SQL fragments every statement that reads it is built
//! from. The service only reads this table, except for one optional column
//! (`IDENTITY_USERS_CLERK_ID_COLUMN`, the seed's `users.clerk_user_id`) that
//! mirrors the link for the application's benefit.
//!
//! Identifiers are validated when configured and always quoted; no value
//! from configuration is spliced into SQL any other way.

use std::fmt;

use super::StorageError;

/// A validated SQL identifier: a table (optionally `schema.table`) or a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    schema: Option<String>,
    name: String,
}

fn valid_part(part: &str) -> bool {
    let mut chars = part.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && part.len() <= 63
}

impl Ident {
    /// A column name, or a table name with `allow_schema`.
    pub fn parse(raw: &str, allow_schema: bool) -> Result<Self, String> {
        let raw = raw.trim();
        let (schema, name) = match raw.split_once('.') {
            Some((schema, name)) if allow_schema => (Some(schema), name),
            _ => (None, raw),
        };
        if !valid_part(name) || schema.is_some_and(|s| !valid_part(s)) {
            return Err(format!(
                "{raw:?} is not a plain SQL identifier (letters, digits and _, not starting with a digit, at most 63 characters{})",
                if allow_schema { ", optionally schema.table" } else { "" }
            ));
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    fn plain(name: &str) -> Self {
        Self {
            schema: None,
            name: name.to_owned(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The identifier quoted for SQL (both databases use double quotes).
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One mapped column: its name (`None`: the table has no such column) and
/// whether the operator named it (a missing named column stops start-up; a
/// missing default one is treated as absent, with a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSetting {
    pub variable: &'static str,
    pub name: Option<Ident>,
    pub explicit: bool,
}

impl ColumnSetting {
    fn default_named(variable: &'static str, name: Option<&str>) -> Self {
        Self {
            variable,
            name: name.map(Ident::plain),
            explicit: false,
        }
    }
}

/// How to read the application's users (`IDENTITY_USERS_*`). The default is
/// the seed's layout: `users(id, email, password_hash, created_at)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersTableConfig {
    pub table: Ident,
    pub table_explicit: bool,
    pub id: ColumnSetting,
    pub email: ColumnSetting,
    pub password_hash: ColumnSetting,
    pub created_at: ColumnSetting,
    pub deleted_at: ColumnSetting,
    /// The column mirroring the link (added when missing); `None` switches it off.
    pub clerk_id: ColumnSetting,
}

impl Default for UsersTableConfig {
    fn default() -> Self {
        Self {
            table: Ident::plain("users"),
            table_explicit: false,
            id: ColumnSetting::default_named("IDENTITY_USERS_ID_COLUMN", Some("id")),
            email: ColumnSetting::default_named("IDENTITY_USERS_EMAIL_COLUMN", Some("email")),
            password_hash: ColumnSetting::default_named("IDENTITY_USERS_PASSWORD_HASH_COLUMN", Some("password_hash")),
            created_at: ColumnSetting::default_named("IDENTITY_USERS_CREATED_AT_COLUMN", Some("created_at")),
            deleted_at: ColumnSetting::default_named("IDENTITY_USERS_DELETED_AT_COLUMN", None),
            clerk_id: ColumnSetting::default_named("IDENTITY_USERS_CLERK_ID_COLUMN", Some("clerk_user_id")),
        }
    }
}

impl UsersTableConfig {
    /// The settings a start-up error or warning may name, in order.
    fn columns(&self) -> [&ColumnSetting; 6] {
        [
            &self.id,
            &self.email,
            &self.password_hash,
            &self.created_at,
            &self.deleted_at,
            &self.clerk_id,
        ]
    }

    /// Sets one column from its variable: `Some("")` means "no such column".
    pub fn set_column(&mut self, variable: &str, value: &str) -> Result<(), String> {
        let name = if value.trim().is_empty() {
            None
        } else {
            Some(Ident::parse(value, false)?)
        };
        let column = [
            &mut self.id,
            &mut self.email,
            &mut self.password_hash,
            &mut self.created_at,
            &mut self.deleted_at,
            &mut self.clerk_id,
        ]
        .into_iter()
        .find(|c| c.variable == variable)
        .ok_or_else(|| format!("{variable} is not a users-table setting"))?;
        if column.variable == "IDENTITY_USERS_ID_COLUMN" && name.is_none() {
            return Err("must name the column holding the user id".to_owned());
        }
        column.name = name;
        column.explicit = true;
        Ok(())
    }

    /// The variables of every column setting.
    pub fn variables() -> [&'static str; 6] {
        Self::default().columns().map(|c| c.variable)
    }
}

/// The type of the application's id column, as far as SQL needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdType {
    /// PostgreSQL `uuid`.
    Uuid,
    /// Text holding a UUID (PostgreSQL text/varchar, or any SQLite column).
    Text,
}

/// The application's users table as found at start-up, every name quoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppUsers {
    pub table: String,
    pub id: String,
    pub id_type: IdType,
    pub email: Option<String>,
    pub password_hash: Option<String>,
    pub created_at: Option<String>,
    pub deleted_at: Option<String>,
    pub clerk_id: Option<String>,
}

/// What start-up learned about the table: the mapping, and warnings to log.
#[derive(Debug, Clone, Default)]
pub(crate) struct Resolved {
    pub app: Option<AppUsers>,
    pub warnings: Vec<String>,
}

/// Matches the configuration against the columns the database reports
/// (`None`: the table does not exist). `(name, type)` pairs, names as stored.
/// `strict` (start-up) refuses a named column that is missing; at run time
/// (the application dropped a column under a running service, as the
/// seed's cleanup does) it is left out with a warning, so the service keeps
/// serving, and the next start asks for the configuration to be fixed.
pub(crate) fn resolve(
    config: &UsersTableConfig,
    columns: Option<&[(String, String)]>,
    postgres: bool,
    strict: bool,
) -> Result<Resolved, StorageError> {
    let mut warnings = Vec::new();
    if config.table.name().starts_with("identity_") {
        return Err(StorageError::Precondition(format!(
            "IDENTITY_USERS_TABLE: {} is one of the service's own tables; name the application's users table",
            config.table
        )));
    }
    let Some(columns) = columns else {
        if config.table_explicit {
            return Err(StorageError::Precondition(format!(
                "IDENTITY_USERS_TABLE: table {} does not exist in this database",
                config.table
            )));
        }
        return Ok(Resolved {
            app: None,
            warnings: vec![format!(
                "no application users table {} in this database: legacy users come only from `identity import-users`",
                config.table
            )],
        });
    };
    let mut found = |setting: &ColumnSetting| -> Result<Option<(String, String)>, StorageError> {
        let Some(name) = &setting.name else {
            return Ok(None);
        };
        match columns.iter().find(|(column, _)| column == name.name()) {
            Some((column, data_type)) => Ok(Some((Ident::plain(column).quoted(), data_type.to_ascii_lowercase()))),
            None if (strict && setting.explicit) || setting.variable == "IDENTITY_USERS_ID_COLUMN" => {
                Err(StorageError::Precondition(format!(
                    "{}: column {} does not exist in table {}",
                    setting.variable, name, config.table
                )))
            }
            None => {
                warnings.push(format!(
                    "table {} has no column {} (the default of {}): treated as absent",
                    config.table, name, setting.variable
                ));
                Ok(None)
            }
        }
    };
    let (id, id_data_type) = found(&config.id)?.ok_or_else(|| {
        StorageError::Precondition("IDENTITY_USERS_ID_COLUMN: must name the column holding the user id".into())
    })?;
    let id_type = if !postgres {
        IdType::Text
    } else if id_data_type == "uuid" {
        IdType::Uuid
    } else if id_data_type == "text" || id_data_type.starts_with("character") {
        IdType::Text
    } else {
        return Err(StorageError::Precondition(format!(
            "IDENTITY_USERS_ID_COLUMN: column {} of {} is {id_data_type}; the service needs uuid or text holding UUIDs",
            config.id.name.as_ref().map(Ident::name).unwrap_or_default(),
            config.table
        )));
    };
    let email = found(&config.email)?.map(|c| c.0);
    let password_hash = found(&config.password_hash)?.map(|c| c.0);
    let created_at = found(&config.created_at)?.map(|c| c.0);
    let deleted_at = found(&config.deleted_at)?.map(|c| c.0);
    let clerk_id = found(&config.clerk_id)?.map(|c| c.0);
    Ok(Resolved {
        app: Some(AppUsers {
            table: config.table.quoted(),
            id,
            id_type,
            email,
            password_hash,
            created_at,
            deleted_at,
            clerk_id,
        }),
        warnings,
    })
}

/// SQL fragments over the application's table, aliased `a`. `$n`-style
/// parameters; SQLite statements rewrite them to `?n`.
impl AppUsers {
    /// `a.id` as a UUID value (PostgreSQL) or text (SQLite).
    pub fn id_value(&self, postgres: bool) -> String {
        match (postgres, self.id_type) {
            (true, IdType::Text) => format!("a.{}::uuid", self.id),
            _ => format!("a.{}", self.id),
        }
    }

    /// `a.id` equal to the UUID parameter `param`.
    pub fn id_eq(&self, param: &str, postgres: bool) -> String {
        match (postgres, self.id_type) {
            (true, IdType::Text) => format!("a.{} = {param}::uuid::text", self.id),
            (true, IdType::Uuid) => format!("a.{} = {param}", self.id),
            (false, _) => format!("a.{} = {param}", self.id),
        }
    }

    /// `a.id` among the ids of `ids` (PostgreSQL: a `uuid[]` expression;
    /// SQLite: a sub-query of text ids).
    pub fn id_in_ids(&self, ids: &str, postgres: bool) -> String {
        match (postgres, self.id_type) {
            (true, IdType::Text) => format!("a.{} = ANY({ids}::text[])", self.id),
            (true, IdType::Uuid) => format!("a.{} = ANY({ids})", self.id),
            (false, _) => format!("a.{} IN ({ids})", self.id),
        }
    }

    /// `a.id` among the `uuid` values `query` selects.
    pub fn id_in_query(&self, query: &str, postgres: bool) -> String {
        match (postgres, self.id_type) {
            (true, IdType::Text) => format!("a.{} IN (SELECT q.user_id::text FROM ({query}) q)", self.id),
            _ => format!("a.{} IN ({query})", self.id),
        }
    }

    /// Rows that are users: not soft-deleted, and (text ids) holding a UUID.
    pub fn live(&self, postgres: bool) -> String {
        let mut conditions = Vec::new();
        if let Some(deleted) = &self.deleted_at {
            conditions.push(format!("a.{deleted} IS NULL"));
        }
        if postgres && self.id_type == IdType::Text {
            conditions.push(format!(
                "a.{} ~* '^[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$'",
                self.id
            ));
        }
        if conditions.is_empty() {
            "1 = 1".to_owned()
        } else {
            conditions.join(" AND ")
        }
    }

    pub fn email_value(&self, postgres: bool) -> String {
        match (&self.email, postgres) {
            (Some(email), true) => format!("a.{email}::text"),
            (Some(email), false) => format!("CAST(a.{email} AS TEXT)"),
            (None, true) => "NULL::text".to_owned(),
            (None, false) => "NULL".to_owned(),
        }
    }

    pub fn password_value(&self, postgres: bool) -> String {
        match (&self.password_hash, postgres) {
            (Some(password), true) => format!("NULLIF(a.{password}::text, '')"),
            (Some(password), false) => format!("NULLIF(CAST(a.{password} AS TEXT), '')"),
            (None, true) => "NULL::text".to_owned(),
            (None, false) => "NULL".to_owned(),
        }
    }

    /// `created_at` as timestamptz (PostgreSQL) or as text SQLite wrote (parsed in Rust).
    pub fn created_value(&self, postgres: bool) -> String {
        match (&self.created_at, postgres) {
            (Some(created), true) => format!("a.{created}::timestamptz"),
            (Some(created), false) => format!("CAST(a.{created} AS TEXT)"),
            (None, true) => "NULL::timestamptz".to_owned(),
            (None, false) => "NULL".to_owned(),
        }
    }
}

const ASCII_UPPER: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const ASCII_LOWER: &str = "abcdefghijklmnopqrstuvwxyz";

/// Every statement that reads users, built once per mapping (at start-up,
/// and again if the application's table changes under the service).
/// PostgreSQL statements take `$n` parameters, SQLite ones `?n`.
#[derive(Debug, Clone)]
pub(crate) struct UserSql {
    pub app: Option<AppUsers>,
    /// `$1` = user id. Columns: see [`user_rows`].
    pub by_id: String,
    /// `$1` = normalised email; the application's user first.
    pub by_email: String,
    /// `$1` = user ids (PostgreSQL `uuid[]`, SQLite a JSON array); the
    /// directory's row of an id first.
    pub by_ids: String,
    /// `$1` = Clerk user ids (PostgreSQL `text[]`, SQLite a JSON array).
    pub by_clerk_ids: String,
    /// `$1` = user ids (empty: all), `$2` = created before, `$3` = after id, `$4` = limit.
    pub candidates: String,
    /// `$1`, `$2` as for `candidates`.
    pub count_candidates: String,
    /// Columns `legacy_total`, `migrated`, `clerk_native`.
    pub counts: String,
    /// `$1` = first day. Columns `active_users`, `legacy_only_unlinked`, `lwm`.
    pub readiness: String,
    /// `$1` = Clerk id (or NULL), `$2` = user id: the mirror column, when there is one.
    pub mirror: Option<String>,
}

/// The union of the service's directory (`d`) and the application's table
/// (`a`, with what an export added about its users, `p`), each row with its
/// mapping (`m`). Columns: id, email,
/// clerk_user_id, clerk_native, password_hash, created_at, updated_at,
/// mapped_at, origin (1 directory, 0 application). `app_where` `None` leaves
/// the application's table out.
fn user_rows(app: Option<&AppUsers>, dir_where: &str, app_where: Option<&str>, pg: bool) -> String {
    let created = if pg {
        "d.created_at"
    } else {
        "CAST(d.created_at AS TEXT)"
    };
    let mut sql = format!(
        "SELECT d.id AS id, d.email AS email, m.clerk_user_id AS clerk_user_id, d.clerk_native AS clerk_native,
                d.password_hash AS password_hash, {created} AS created_at, d.updated_at AS updated_at,
                m.updated_at AS mapped_at, 1 AS origin
         FROM identity_users d LEFT JOIN identity_user_mappings m ON m.user_id = d.id
         WHERE d.merged_into IS NULL AND ({dir_where})"
    );
    if let (Some(app), Some(app_where)) = (app, app_where) {
        let (no, null_ts) = if pg {
            ("false", "NULL::timestamptz")
        } else {
            ("0", "NULL")
        };
        sql.push_str(&format!(
            "
         UNION ALL
         SELECT {id}, COALESCE({email}, p.email), m.clerk_user_id, {no}, COALESCE({password}, p.password_hash),
                {created}, {null_ts}, m.updated_at, 0
         FROM {table} a LEFT JOIN identity_user_mappings m ON m.user_id = {id}
              LEFT JOIN identity_user_profiles p ON p.user_id = {id}
         WHERE {live} AND ({app_where})",
            id = app.id_value(pg),
            email = app.email_value(pg),
            password = app.password_value(pg),
            created = app.created_value(pg),
            table = app.table,
            live = app.live(pg),
        ));
    }
    sql
}

/// `user_id` (an SQL expression holding a UUID) names a user still there:
/// a row of the service's directory not merged into another (`directory`
/// adds conditions on it, `d`), or a live row of the application's table
/// (soft-deleted and hard-deleted users are neither). Every figure that
/// counts users by an id it recorded (a mapping, an activity) applies it.
fn still_a_user(app: Option<&AppUsers>, user_id: &str, directory: &str, pg: bool) -> String {
    let mut sql =
        format!("(EXISTS (SELECT 1 FROM identity_users d WHERE d.id = {user_id} AND d.merged_into IS NULL{directory})");
    if let Some(app) = app {
        sql.push_str(&format!(
            " OR EXISTS (SELECT 1 FROM {} a WHERE {} AND {})",
            app.table,
            app.id_eq(user_id, pg),
            app.live(pg)
        ));
    }
    sql.push(')');
    sql
}

impl UserSql {
    pub fn build(app: Option<AppUsers>, pg: bool) -> Self {
        let a = app.as_ref();
        let by_id = format!(
            "SELECT * FROM ({}) u LIMIT 1",
            user_rows(a, "d.id = $1", a.map(|app| app.id_eq("$1", pg)).as_deref(), pg)
        );
        // `$1` is `Email::normalized()`: ASCII letters folded, nothing else.
        // The application's column is compared in that same form on both
        // backends (`lower()` would fold Unicode on PostgreSQL only); on
        // PostgreSQL `lower()` first, so an index on `lower(email)` serves.
        let email_where = a.map(|app| match &app.email {
            Some(email) if pg => format!(
                "(lower(a.{email}::text) = lower($1) AND translate(a.{email}::text, '{ASCII_UPPER}', '{ASCII_LOWER}') = $1)
                 OR p.email_key = $1"
            ),
            Some(email) => format!("CAST(a.{email} AS TEXT) = $1 COLLATE NOCASE OR p.email_key = $1"),
            None => "p.email_key = $1".to_owned(),
        });
        let by_email = format!(
            // One order on both backends: PostgreSQL sorts NULLs last and SQLite
            // first, and rows of one creation time need the id to break the tie.
            "SELECT * FROM ({}) u ORDER BY origin, created_at IS NULL, created_at, id LIMIT 1",
            user_rows(a, "d.email_key = $1", email_where.as_deref(), pg)
        );
        // Many keys in one statement: the user cache loads concurrent misses
        // together (one round trip, not one or two per user).
        let (ids, mapped) = if pg {
            (
                "$1::uuid[]",
                "SELECT user_id FROM identity_user_mappings WHERE clerk_user_id = ANY($1::text[])",
            )
        } else {
            (
                "SELECT value FROM json_each($1)",
                "SELECT user_id FROM identity_user_mappings WHERE clerk_user_id IN (SELECT value FROM json_each($1))",
            )
        };
        let ids_dir = if pg {
            format!("d.id = ANY({ids})")
        } else {
            format!("d.id IN ({ids})")
        };
        let by_ids = format!(
            "SELECT * FROM ({}) u ORDER BY origin DESC",
            user_rows(a, &ids_dir, a.map(|app| app.id_in_ids(ids, pg)).as_deref(), pg)
        );
        let by_clerk_ids = format!(
            "SELECT * FROM ({}) u ORDER BY origin DESC",
            user_rows(
                a,
                &format!("d.id IN ({mapped})"),
                a.map(|app| app.id_in_query(mapped, pg)).as_deref(),
                pg
            )
        );
        let filter = if pg {
            "u.clerk_user_id IS NULL AND (cardinality($1::uuid[]) = 0 OR u.id = ANY($1::uuid[]))
             AND ($2::timestamptz IS NULL OR u.created_at < $2)"
        } else {
            // SQLite: $1 is a JSON array of ids or NULL; $2 Unix microseconds or NULL.
            "u.clerk_user_id IS NULL AND ($1 IS NULL OR u.id IN (SELECT value FROM json_each($1)))
             AND ($2 IS NULL OR u.created_at < $2)"
        };
        // SQLite compares created_at as text; the candidates' filter wants numbers.
        let rows = user_rows(a, "NOT d.clerk_native", Some("1 = 1"), pg);
        let rows = if pg {
            rows
        } else {
            format!(
                "SELECT id, email, clerk_user_id, password_hash, origin,
                        CASE WHEN origin = 1 THEN CAST(created_at AS INTEGER)
                             ELSE CAST(strftime('%s', created_at) AS INTEGER) * 1000000 END AS created_at
                 FROM ({rows})"
            )
        };
        let after = if pg {
            "($3::uuid IS NULL OR u.id > $3)"
        } else {
            "($3 IS NULL OR u.id > $3)"
        };
        let candidates = format!(
            "SELECT u.id AS id, u.email AS email, u.password_hash AS password_hash FROM ({rows}) u
             WHERE {filter} AND {after} ORDER BY u.id LIMIT $4"
        );
        let count_candidates = format!("SELECT count(*) FROM ({rows}) u WHERE {filter}");
        let app_count = match a {
            Some(app) => format!("(SELECT count(*) FROM {} a WHERE {})", app.table, app.live(pg)),
            None => "0".to_owned(),
        };
        // Migrated: mappings of users counted in `legacy_total`. A mapping
        // whose user the application deleted (soft or hard) is no user: it
        // counted as migrated before, and so made `legacy_total - migrated`
        // (the legacy-only figure) too small by one.
        let mapped = still_a_user(a, "m.user_id", " AND NOT d.clerk_native", pg);
        // The service's own users in one scan (two counts scanned it twice:
        // 161 vs 75 ms at 1,000,000 imported users on PostgreSQL).
        let counts = format!(
            "SELECT {app_count} + d.legacy AS legacy_total,
                    (SELECT count(*) FROM identity_user_mappings m WHERE {mapped}) AS migrated,
                    d.clerk_native AS clerk_native
             FROM (SELECT count(*) FILTER (WHERE NOT clerk_native) AS legacy,
                          count(*) FILTER (WHERE clerk_native) AS clerk_native
                   FROM identity_users WHERE merged_into IS NULL) d"
        );
        // Readiness: the users active since day `$1` who are still users.
        // Activity is recorded per user id and outlives the user; a user
        // the application deleted after signing in would otherwise still
        // count as active, and as locked out by `clerk_only`. The check is
        // at most two primary-key probes per active user, after grouping.
        let (locked_out, by_migrated) = if pg {
            (
                "count(*) FILTER (WHERE u.legacy > 0 AND u.clerk = 0 AND m.user_id IS NULL)",
                "COALESCE(SUM(u.lwm), 0)::bigint",
            )
        } else {
            (
                "COALESCE(SUM(u.legacy > 0 AND u.clerk = 0 AND m.user_id IS NULL), 0)",
                "COALESCE(SUM(u.lwm), 0)",
            )
        };
        let readiness = format!(
            "WITH active AS (
                 SELECT user_id, SUM(legacy) AS legacy, SUM(clerk) AS clerk, SUM(legacy_while_migrated) AS lwm
                 FROM identity_auth_activity WHERE day >= $1 GROUP BY user_id)
             SELECT count(*) AS active_users, {locked_out} AS legacy_only_unlinked, {by_migrated} AS lwm
             FROM active u LEFT JOIN identity_user_mappings m ON m.user_id = u.user_id
             WHERE {}",
            still_a_user(a, "u.user_id", "", pg)
        );
        let mirror = a.and_then(|app| {
            app.clerk_id.as_ref().map(|column| {
                format!(
                    "UPDATE {} AS a SET {column} = $1 WHERE {}",
                    app.table,
                    app.id_eq("$2", pg)
                )
            })
        });
        let statements = Self {
            app,
            by_id,
            by_email,
            by_ids,
            by_clerk_ids,
            candidates,
            count_candidates,
            counts,
            readiness,
            mirror,
        };
        if pg { statements } else { statements.for_sqlite() }
    }

    fn for_sqlite(self) -> Self {
        Self {
            by_id: sqlite_params(&self.by_id),
            by_email: sqlite_params(&self.by_email),
            by_ids: sqlite_params(&self.by_ids),
            by_clerk_ids: sqlite_params(&self.by_clerk_ids),
            candidates: sqlite_params(&self.candidates),
            count_candidates: sqlite_params(&self.count_candidates),
            counts: sqlite_params(&self.counts),
            readiness: sqlite_params(&self.readiness),
            mirror: self.mirror.as_deref().map(sqlite_params),
            app: self.app,
        }
    }
}

/// A timestamp another program wrote into a SQLite column: Unix seconds,
/// milliseconds or microseconds, or any text form SQLite's own date
/// functions produce (`YYYY-MM-DD HH:MM:SS[.SSS]`, with `T`, with a zone).
pub(crate) fn parse_sqlite_time(raw: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
    let raw = raw.trim();
    if let Ok(number) = raw.parse::<f64>() {
        let magnitude = number.abs();
        let micros = if magnitude < 1e11 {
            number * 1e6
        } else if magnitude < 1e14 {
            number * 1e3
        } else {
            number
        };
        #[allow(clippy::cast_possible_truncation)]
        return DateTime::from_timestamp_micros(micros as i64);
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(raw) {
        return Some(at.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(at) = NaiveDateTime::parse_from_str(raw, format) {
            return Some(at.and_utc());
        }
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%#z"] {
        if let Ok(at) = DateTime::parse_from_str(raw, format) {
            return Some(at.with_timezone(&Utc));
        }
    }
    NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
}

/// Rewrites `$1`-style parameters to SQLite's `?1`.
pub(crate) fn sqlite_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated_and_quoted() {
        assert_eq!(Ident::parse("users", true).unwrap().quoted(), "\"users\"");
        assert_eq!(Ident::parse("app.users", true).unwrap().quoted(), "\"app\".\"users\"");
        for bad in ["", "1users", "users;drop", "us\"ers", "a.b.c", "user name", "users--"] {
            assert!(Ident::parse(bad, true).is_err(), "{bad:?} accepted");
        }
        assert!(Ident::parse("app.users", false).is_err(), "a column has no schema");
    }

    #[test]
    fn missing_columns_name_their_variable() {
        let columns = vec![
            ("id".to_owned(), "uuid".to_owned()),
            ("email_hash".to_owned(), "bytea".to_owned()),
        ];
        let mut config = UsersTableConfig::default();
        // Defaults that are missing are warned about and treated as absent.
        let resolved = resolve(&config, Some(&columns), true, true).unwrap();
        let app = resolved.app.unwrap();
        assert_eq!(app.email, None);
        assert_eq!(app.id_type, IdType::Uuid);
        assert_eq!(resolved.warnings.len(), 4, "{:?}", resolved.warnings);
        // A named column that is missing stops start-up, naming the variable.
        config
            .set_column("IDENTITY_USERS_DELETED_AT_COLUMN", "deleted_at")
            .unwrap();
        let err = resolve(&config, Some(&columns), true, true).unwrap_err().to_string();
        assert!(
            err.contains("IDENTITY_USERS_DELETED_AT_COLUMN") && err.contains("deleted_at"),
            "{err}"
        );
        // No table at all: fine by default, an error when named.
        assert!(
            resolve(&UsersTableConfig::default(), None, true, true)
                .unwrap()
                .app
                .is_none()
        );
        let explicit = UsersTableConfig {
            table_explicit: true,
            ..UsersTableConfig::default()
        };
        assert!(
            resolve(&explicit, None, true, true)
                .unwrap_err()
                .to_string()
                .contains("IDENTITY_USERS_TABLE")
        );
    }

    #[test]
    fn sqlite_times_in_every_form_sqlite_writes() {
        let expected = chrono::DateTime::parse_from_rfc3339("2026-11-30T12:34:56Z").unwrap();
        for raw in [
            "2026-11-30 12:34:56",
            "2026-11-30T12:34:56",
            "2026-11-30 12:34:56.000",
            "2026-11-30T12:34:56Z",
            "2026-11-30 12:34:56+00:00",
            "1796042096",
            "1796042096000",
            "1796042096000000",
        ] {
            assert_eq!(parse_sqlite_time(raw), Some(expected.into()), "{raw}");
        }
        assert_eq!(parse_sqlite_time("yesterday"), None);
    }

    #[test]
    fn parameters_are_rewritten_for_sqlite() {
        assert_eq!(
            sqlite_params("a = $1 AND b = $12 AND c = '$'"),
            "a = ?1 AND b = ?12 AND c = '$'"
        );
    }
}
