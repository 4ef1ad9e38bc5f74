//! The sqlx implementation of [`DataStore`] for SQLite and Postgres.
//!
//! Both databases are reached through sqlx's Any driver with the same SQL (`$n` placeholders,
//! `RETURNING`, `ON CONFLICT`), so there is one implementation to reason about. Times are Unix
//! seconds and booleans are integers, the types both dialects store the same way.
//!
//! This file holds the connection and migrations, the helpers every table shares (text columns,
//! unreadable rows, unique violations, the change event appended with each write) and the
//! [`DataStore`] impl, which hands each method to the file of its concern: [`entries`],
//! [`agents`], [`join_tokens`], [`bundles`] (with federation relationships), [`authorities`]
//! (the CA journal), [`issued_svids`] (the issuance record) and [`events`] (the change feed).

mod agents;
mod authorities;
mod bundles;
mod entries;
mod events;
mod issued_svids;
mod join_tokens;

use std::path::Path;

use sigil_core::bundle::TrustBundle;
use sigil_core::clock::SharedClock;
use sigil_core::entry::Entry;
use sigil_core::id::TrustDomain;
use sigil_core::selector::Selector;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor, Row};

use super::{
    AgentRecord, Authority, DataStore, EntryFilter, Event, EventKind, FederationRelationship,
    IssuedSvid, JoinToken, SvidFilter, TokenRefusal,
};
use crate::{Error, Result};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The datastore on SQLite or Postgres.
#[derive(Debug, Clone)]
pub struct SqlDataStore {
    pool: AnyPool,
    clock: SharedClock,
}

impl SqlDataStore {
    /// Opens the database at `url` (`sqlite://path` or `postgres://...`) and applies migrations.
    pub async fn connect(url: &str, clock: SharedClock) -> Result<Self> {
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
                .map_err(|e| Error::Datastore(format!("cannot open SQLite database {url}: {e}")))?;
            (pool, &SQLITE_MIGRATIONS)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = AnyPoolOptions::new()
                .max_connections(16)
                .connect(url)
                .await
                .map_err(|e| {
                    Error::Datastore(format!("cannot connect to Postgres ({}): {e}", redact(url)))
                })?;
            (pool, &POSTGRES_MIGRATIONS)
        } else {
            return Err(Error::Datastore(format!(
                "unsupported datastore URL `{}`; use sqlite://<path> or postgres://...",
                redact(url)
            )));
        };
        migrator
            .run(&pool)
            .await
            .map_err(|e| Error::Datastore(format!("cannot apply migrations: {e}")))?;
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
    Error::Datastore(format!("stored {what} is unreadable: {detail}"))
}

fn parse_selectors(text: &str) -> Result<Vec<Selector>> {
    split_lines(text)
        .map(|line| Selector::parse(line).map_err(|e| corrupt("selector", e)))
        .collect()
}

fn event_kind(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Entry => "entry",
        EventKind::Agent => "agent",
        EventKind::Bundle => "bundle",
        EventKind::Federation => "federation",
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

// Inherent methods come before trait methods in method resolution, so each `self.name(..)` below
// calls the `pub(super)` method of the same name in its concern's file, not itself.
impl DataStore for SqlDataStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_entry(&self, entry: &Entry) -> Result<Entry> {
        self.create_entry(entry).await
    }

    async fn update_entry(&self, entry: &Entry) -> Result<Entry> {
        self.update_entry(entry).await
    }

    async fn delete_entry(&self, id: &str) -> Result<Entry> {
        self.delete_entry(id).await
    }

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>> {
        self.get_entry(id).await
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>> {
        self.list_entries(filter).await
    }

    async fn put_agent(&self, agent: &AgentRecord) -> Result<()> {
        self.put_agent(agent).await
    }

    async fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>> {
        self.get_agent(spiffe_id).await
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        self.list_agents().await
    }

    async fn set_agent_svid(
        &self,
        spiffe_id: &str,
        presented_serial: &str,
        serial: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<AgentRecord> {
        self.set_agent_svid(spiffe_id, presented_serial, serial, expires_at, now)
            .await
    }

    async fn ban_agent(&self, spiffe_id: &str, now: i64) -> Result<AgentRecord> {
        self.ban_agent(spiffe_id, now).await
    }

    async fn delete_agent(&self, spiffe_id: &str) -> Result<AgentRecord> {
        self.delete_agent(spiffe_id).await
    }

    async fn create_join_token(&self, token: &JoinToken) -> Result<()> {
        self.create_join_token(token).await
    }

    async fn use_join_token(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<Result<JoinToken, TokenRefusal>> {
        self.use_join_token(token_hash, now).await
    }

    async fn prune_join_tokens(&self, before: i64) -> Result<u64> {
        self.prune_join_tokens(before).await
    }

    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<TrustBundle>> {
        self.get_bundle(trust_domain).await
    }

    async fn put_bundle(&self, bundle: &TrustBundle) -> Result<()> {
        self.put_bundle(bundle).await
    }

    async fn list_bundles(&self) -> Result<Vec<TrustBundle>> {
        self.list_bundles().await
    }

    async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<bool> {
        self.delete_bundle(trust_domain).await
    }

    async fn put_federation(&self, relationship: &FederationRelationship) -> Result<()> {
        self.put_federation(relationship).await
    }

    async fn get_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        self.get_federation(trust_domain).await
    }

    async fn list_federations(&self) -> Result<Vec<FederationRelationship>> {
        self.list_federations().await
    }

    async fn delete_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        self.delete_federation(trust_domain).await
    }

    async fn list_authorities(&self) -> Result<Vec<Authority>> {
        self.list_authorities().await
    }

    async fn put_authority(&self, authority: &Authority) -> Result<()> {
        self.put_authority(authority).await
    }

    async fn record_issued_svids(&self, svids: &[IssuedSvid]) -> Result<()> {
        self.record_issued_svids(svids).await
    }

    async fn list_issued_svids(&self, filter: &SvidFilter) -> Result<Vec<IssuedSvid>> {
        self.list_issued_svids(filter).await
    }

    async fn get_issued_svid(&self, serial: &str) -> Result<Option<IssuedSvid>> {
        self.get_issued_svid(serial).await
    }

    async fn prune_issued_svids(&self, before: i64) -> Result<u64> {
        self.prune_issued_svids(before).await
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>> {
        self.events_after(after, limit).await
    }

    async fn latest_event_id(&self) -> Result<u64> {
        self.latest_event_id().await
    }

    async fn prune_events(&self, before: i64) -> Result<u64> {
        self.prune_events(before).await
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
