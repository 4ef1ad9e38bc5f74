//! The sqlx implementation of [`DataStore`] for SQLite and Postgres.
//!
//! Both databases are reached through sqlx's Any driver with the same SQL (`$n` placeholders,
//! `RETURNING`, `ON CONFLICT`), so there is one implementation to reason about. Times are Unix
//! seconds and booleans are integers, the types both dialects store the same way.
//!
//! This file holds the connection and migrations, the helpers every table shares (reading a row's
//! columns, fetching and decoding rows, unique violations, the change event appended with each
//! write) and [`DataStore::ping`]. Each narrow trait is implemented in the file of its concern:
//! [`entries`], [`agents`], [`join_tokens`], [`bundles`] (with federation relationships),
//! [`authorities`] (the CA journal), [`issued_svids`] (the issuance record) and [`events`] (the
//! change feed).

/// Writes `fn $reader(row: &AnyRow) -> Result<$record>` for a record whose every field is the
/// column of the same name, read by the [`Columns`] getter named after the field (`text`, `int`,
/// `flag`, ...). A record with a field that is no plain column (a parsed state, a profile) has
/// its reader written out by hand.
macro_rules! record_reader {
    ($reader:ident($what:literal) -> $record:ident { $($field:ident: $get:ident),+ $(,)? }) => {
        fn $reader(row: &sqlx::any::AnyRow) -> crate::Result<$record> {
            let row = Columns::of($what, row);
            Ok($record { $($field: row.$get(stringify!($field))?),+ })
        }
    };
}

mod agents;
mod authorities;
mod bundles;
mod entries;
mod events;
mod issued_svids;
mod join_tokens;

use std::path::Path;
use std::time::Duration;

use sigil_core::clock::SharedClock;
use sigil_core::id::{SpiffeId, TrustDomain, parse_spiffe_id, parse_trust_domain};
use sigil_core::selector::Selector;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

use super::{DataStore, EventKind};
use crate::{Error, Result};

pub use events::ChangeListener;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The datastore on SQLite or Postgres.
#[derive(Debug, Clone)]
pub struct SqlDataStore {
    pool: AnyPool,
    clock: SharedClock,
}

/// How long a call waits for a connection unless told otherwise (`[datastore] timeout`).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

impl SqlDataStore {
    /// Opens the database at `url` (`sqlite://path` or `postgres://...`) and applies migrations;
    /// calls wait at most `DEFAULT_TIMEOUT` (2 s) for a connection.
    pub async fn connect(url: &str, clock: SharedClock) -> Result<Self> {
        Self::connect_within(url, clock, DEFAULT_TIMEOUT).await
    }

    /// [`SqlDataStore::connect`], with calls failing as [`Error::DatastoreUnavailable`] when no
    /// connection can be had within `timeout` (the database down or every connection busy),
    /// rather than after sqlx's default of 30 s.
    pub async fn connect_within(url: &str, clock: SharedClock, timeout: Duration) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (pool, migrator) = if url.starts_with("sqlite:") {
            ensure_sqlite_dir(url)?;
            let url = if url.contains('?') {
                url.to_string()
            } else {
                format!("{url}?mode=rwc")
            };
            // One connection: SQLite serializes writers anyway, and a single connection avoids
            // `database is locked` when two deferred transactions both try to upgrade.
            let pool = AnyPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(timeout)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                        Ok(())
                    })
                })
                .connect(&url)
                .await
                .map_err(|e| Error::datastore_caused(format!("cannot open SQLite database {url}"), e))?;
            (pool, &SQLITE_MIGRATIONS)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = AnyPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(timeout)
                .connect(url)
                .await
                .map_err(|e| {
                    Error::datastore_caused(
                        format!("cannot connect to Postgres ({})", redact(url)),
                        e,
                    )
                })?;
            (pool, &POSTGRES_MIGRATIONS)
        } else {
            return Err(Error::datastore(format!(
                "unsupported datastore URL `{}`; use sqlite://<path> or postgres://...",
                redact(url)
            )));
        };
        migrator
            .run(&pool)
            .await
            .map_err(|e| Error::datastore_caused("cannot apply migrations", e))?;
        Ok(SqlDataStore { pool, clock })
    }

    /// Closes every connection (after the last write has been flushed).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn ensure_sqlite_dir(url: &str) -> Result<()> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    if let Some(parent) = Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    }
    Ok(())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// A statement and its bound arguments, as every store method builds it.
type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// Turns one row into a record (an entry, an agent, ...).
type Decode<T> = fn(&AnyRow) -> Result<T>;

/// Runs `query` and decodes the row it returns, if any.
async fn fetch_optional<'c, T>(
    executor: impl Executor<'c, Database = sqlx::Any>,
    query: AnyQuery<'_>,
    decode: Decode<T>,
) -> Result<Option<T>> {
    let row = query.fetch_optional(executor).await?;
    row.as_ref().map(decode).transpose()
}

/// Runs `query` and decodes every row it returns.
async fn fetch_all<'c, T>(
    executor: impl Executor<'c, Database = sqlx::Any>,
    query: AnyQuery<'_>,
    decode: Decode<T>,
) -> Result<Vec<T>> {
    let rows = query.fetch_all(executor).await?;
    rows.iter().map(decode).collect()
}

/// Runs a `DELETE` (or `UPDATE`) and returns how many rows it changed.
async fn count_changed<'c>(
    executor: impl Executor<'c, Database = sqlx::Any>,
    query: AnyQuery<'_>,
) -> Result<u64> {
    Ok(query.execute(executor).await?.rows_affected())
}

/// One row being read into a record: typed column getters shared by every table, which store
/// lists as newline-separated text, booleans and counters as integers, and report a value they
/// cannot read back as unreadable data of `record`.
struct Columns<'r> {
    row: &'r AnyRow,
    record: &'static str,
}

impl<'r> Columns<'r> {
    /// Reads `row` as a stored `record` (the name used in errors).
    fn of(record: &'static str, row: &'r AnyRow) -> Self {
        Columns { row, record }
    }

    fn text(&self, name: &str) -> Result<String> {
        Ok(self.row.try_get(name)?)
    }

    fn int(&self, name: &str) -> Result<i64> {
        Ok(self.row.try_get(name)?)
    }

    fn bytes(&self, name: &str) -> Result<Vec<u8>> {
        Ok(self.row.try_get(name)?)
    }

    /// A boolean stored as 0 or 1.
    fn flag(&self, name: &str) -> Result<bool> {
        Ok(self.int(name)? != 0)
    }

    /// A revision or event id: positive in the database, 0 if it somehow is not.
    fn counter(&self, name: &str) -> Result<u64> {
        Ok(u64::try_from(self.int(name)?).unwrap_or(0))
    }

    fn lines(&self, name: &str) -> Result<Vec<String>> {
        Ok(split_lines(&self.text(name)?).map(str::to_string).collect())
    }

    fn selectors(&self, name: &str) -> Result<Vec<Selector>> {
        split_lines(&self.text(name)?)
            .map(|line| Selector::parse(line).map_err(|e| corrupt("selector", e)))
            .collect()
    }

    fn spiffe_id(&self, name: &'static str) -> Result<SpiffeId> {
        parse_spiffe_id(name, &self.text(name)?).map_err(|e| corrupt(self.record, e))
    }

    fn trust_domain(&self, name: &'static str) -> Result<TrustDomain> {
        parse_trust_domain(name, &self.text(name)?).map_err(|e| corrupt(self.record, e))
    }

    fn trust_domains(&self, name: &'static str) -> Result<Vec<TrustDomain>> {
        split_lines(&self.text(name)?)
            .map(|td| parse_trust_domain(name, td).map_err(|e| corrupt(self.record, e)))
            .collect()
    }
}

fn join_lines<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

fn split_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').filter(|line| !line.is_empty())
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::datastore(format!("stored {what} is unreadable: {detail}"))
}

fn event_kind(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Entry => "entry",
        EventKind::Agent => "agent",
        EventKind::Bundle => "bundle",
        EventKind::Federation => "federation",
        EventKind::Authority => "authority",
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Appends a change event inside `tx` and returns its id (the new revision).
async fn append_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    kind: EventKind,
    subject: &str,
    now: i64,
) -> Result<i64> {
    let row = sqlx::query(
        "INSERT INTO events (kind, subject, created_at) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(event_kind(kind))
    .bind(subject)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.try_get::<i64, _>(0)?)
}

impl DataStore for SqlDataStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://u:secret@host/db"),
            "postgres://u:***@host/db"
        );
        assert_eq!(redact("postgres://host/db"), "postgres://host/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }
}
