//! The sqlx implementation of [`DataStore`] for SQLite and Postgres.
//!
//! Both databases are reached through sqlx's Any driver with the same SQL (`$n` placeholders,
//! `RETURNING`, `ON CONFLICT`), so there is one implementation to reason about. Times are Unix
//! seconds and booleans are integers, the types both dialects store the same way.

use std::path::Path;
use std::str::FromStr;

use sigil_core::bundle::TrustBundle;
use sigil_core::clock::SharedClock;
use sigil_core::entry::Entry;
use sigil_core::id::{TrustDomain, parse_spiffe_id, parse_trust_domain};
use sigil_core::selector::{Selector, all_present};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

use super::{
    AgentRecord, Authority, AuthorityKind, DataStore, EndpointProfile, EntryFilter, Event,
    EventKind, FederationRelationship, IssuedSvid, JoinToken, SvidFilter, TokenRefusal,
};
use crate::{Error, Result};

/// The columns of `entries`, in the order [`entry_from_row`] reads them.
macro_rules! entry_columns {
    () => {
        "id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, federates_with, admin, downstream, hint, expires_at, created_at, revision"
    };
}

/// The columns of `agents`.
macro_rules! agent_columns {
    () => {
        "spiffe_id, attestor, selectors, svid_serial, previous_svid_serial, svid_expires_at, banned, created_at, updated_at"
    };
}

/// The columns of `issued_svids`.
macro_rules! svid_columns {
    () => {
        "serial, kind, spiffe_id, agent_id, entry_id, authority_id, not_before, not_after"
    };
}

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

fn entry_from_row(row: &AnyRow) -> Result<Entry> {
    let text = |name: &str| row.try_get::<String, _>(name);
    let int = |name: &str| row.try_get::<i64, _>(name);
    let spiffe_id = text("spiffe_id")?;
    let parent_id = text("parent_id")?;
    Ok(Entry {
        id: text("id")?,
        spiffe_id: parse_spiffe_id("spiffe_id", &spiffe_id).map_err(|e| corrupt("entry", e))?,
        parent_id: parse_spiffe_id("parent_id", &parent_id).map_err(|e| corrupt("entry", e))?,
        selectors: parse_selectors(&text("selectors")?)?,
        x509_svid_ttl: int("x509_svid_ttl")?,
        jwt_svid_ttl: int("jwt_svid_ttl")?,
        dns_names: split_lines(&text("dns_names")?)
            .map(str::to_string)
            .collect(),
        federates_with: split_lines(&text("federates_with")?)
            .map(|td| parse_trust_domain("federates_with", td).map_err(|e| corrupt("entry", e)))
            .collect::<Result<_>>()?,
        admin: int("admin")? != 0,
        downstream: int("downstream")? != 0,
        hint: text("hint")?,
        expires_at: int("expires_at")?,
        created_at: int("created_at")?,
        revision: u64::try_from(int("revision")?).unwrap_or(0),
    })
}

fn agent_from_row(row: &AnyRow) -> Result<AgentRecord> {
    Ok(AgentRecord {
        spiffe_id: row.try_get("spiffe_id")?,
        attestor: row.try_get("attestor")?,
        selectors: parse_selectors(&row.try_get::<String, _>("selectors")?)?,
        svid_serial: row.try_get("svid_serial")?,
        previous_svid_serial: row.try_get("previous_svid_serial")?,
        svid_expires_at: row.try_get("svid_expires_at")?,
        banned: row.try_get::<i64, _>("banned")? != 0,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn svid_from_row(row: &AnyRow) -> Result<IssuedSvid> {
    Ok(IssuedSvid {
        serial: row.try_get("serial")?,
        kind: row.try_get("kind")?,
        spiffe_id: row.try_get("spiffe_id")?,
        agent_id: row.try_get("agent_id")?,
        entry_id: row.try_get("entry_id")?,
        authority_id: row.try_get("authority_id")?,
        not_before: row.try_get("not_before")?,
        not_after: row.try_get("not_after")?,
    })
}

macro_rules! federation_columns {
    () => {
        "trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, created_at, updated_at"
    };
}

fn federation_from_row(row: &AnyRow) -> Result<FederationRelationship> {
    let name: String = row.try_get("trust_domain")?;
    let profile: String = row.try_get("profile")?;
    let endpoint_id: String = row.try_get("endpoint_spiffe_id")?;
    let profile = match profile.as_str() {
        "https_web" => EndpointProfile::HttpsWeb,
        "https_spiffe" => EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: parse_spiffe_id("endpoint_spiffe_id", &endpoint_id)
                .map_err(|e| corrupt("federation relationship", e))?,
        },
        other => return Err(corrupt("federation profile", other)),
    };
    Ok(FederationRelationship {
        trust_domain: parse_trust_domain("trust_domain", &name)
            .map_err(|e| corrupt("federation relationship", e))?,
        bundle_endpoint_url: row.try_get("bundle_endpoint_url")?,
        profile,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
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

/// Binds $1..$12: the entry's fields other than its timestamps and revision.
fn bind_entry_fields<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    entry: &Entry,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    query
        .bind(entry.id.clone())
        .bind(entry.spiffe_id.to_string())
        .bind(entry.parent_id.to_string())
        .bind(join_lines(&entry.selectors))
        .bind(entry.x509_svid_ttl)
        .bind(entry.jwt_svid_ttl)
        .bind(join_lines(&entry.dns_names))
        .bind(join_lines(&entry.federates_with))
        .bind(i64::from(entry.admin))
        .bind(i64::from(entry.downstream))
        .bind(entry.hint.clone())
        .bind(entry.expires_at)
}

impl SqlDataStore {
    async fn write_entry(&self, entry: &Entry, create: bool) -> Result<Entry> {
        let now = self.clock.unix_now();
        let mut tx = self.pool.begin().await?;
        let revision = append_event(&mut tx, EventKind::Entry, &entry.id, now).await?;
        let result = if create {
            bind_entry_fields(
                sqlx::query("INSERT INTO entries (id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, federates_with, admin, downstream, hint, expires_at, revision, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"),
                entry,
            )
            .bind(revision)
            .bind(entry.created_at)
            .execute(&mut *tx)
            .await
        } else {
            bind_entry_fields(
                sqlx::query("UPDATE entries SET spiffe_id = $2, parent_id = $3, selectors = $4, x509_svid_ttl = $5, jwt_svid_ttl = $6, dns_names = $7, federates_with = $8, admin = $9, downstream = $10, hint = $11, expires_at = $12, revision = $13 WHERE id = $1"),
                entry,
            )
            .bind(revision)
            .execute(&mut *tx)
            .await
        };
        match result {
            Ok(done) if done.rows_affected() == 1 => {}
            Ok(_) => return Err(Error::NotFound(format!("entry `{}`", entry.id))),
            Err(e) if is_unique_violation(&e) => {
                return Err(Error::AlreadyExists(format!(
                    "an entry with spiffe_id {}, parent_id {} and the same selectors exists; change one of them or update that entry",
                    entry.spiffe_id, entry.parent_id
                )));
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        let mut stored = entry.clone();
        stored.revision = u64::try_from(revision).unwrap_or(0);
        Ok(stored)
    }

    /// Runs `query` (which binds the agent's SPIFFE ID as $1) with an agent change event.
    async fn agent_event<'q>(
        &self,
        spiffe_id: &str,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
        now: i64,
    ) -> Result<AgentRecord> {
        let mut tx = self.pool.begin().await?;
        append_event(&mut tx, EventKind::Agent, spiffe_id, now).await?;
        let row = query
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::NotFound(format!("agent `{spiffe_id}`")))?;
        let agent = agent_from_row(&row)?;
        tx.commit().await?;
        Ok(agent)
    }
}

impl DataStore for SqlDataStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_entry(&self, entry: &Entry) -> Result<Entry> {
        self.write_entry(entry, true).await
    }

    async fn update_entry(&self, entry: &Entry) -> Result<Entry> {
        self.write_entry(entry, false).await
    }

    async fn delete_entry(&self, id: &str) -> Result<Entry> {
        let now = self.clock.unix_now();
        let mut tx = self.pool.begin().await?;
        append_event(&mut tx, EventKind::Entry, id, now).await?;
        let row = sqlx::query(concat!(
            "DELETE FROM entries WHERE id = $1 RETURNING ",
            entry_columns!()
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::NotFound(format!("entry `{id}`")))?;
        let entry = entry_from_row(&row)?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            entry_columns!(),
            " FROM entries WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(entry_from_row).transpose()
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>> {
        let rows = sqlx::query(concat!("SELECT ", entry_columns!(), " FROM entries WHERE ($1 = '' OR spiffe_id = $1) AND ($2 = '' OR parent_id = $2) ORDER BY id"))
            .bind(filter.spiffe_id.clone().unwrap_or_default())
            .bind(filter.parent_id.clone().unwrap_or_default())
            .fetch_all(&self.pool)
            .await?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in &rows {
            let entry = entry_from_row(row)?;
            if all_present(&filter.selectors, &entry.selectors) {
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    async fn put_agent(&self, agent: &AgentRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        append_event(
            &mut tx,
            EventKind::Agent,
            &agent.spiffe_id,
            agent.updated_at,
        )
        .await?;
        // The upsert's WHERE keeps a banned row untouched (and returns nothing), so no ban can be
        // overwritten by an attestation that read the row before the ban.
        let stored = sqlx::query("INSERT INTO agents (spiffe_id, attestor, selectors, svid_serial, previous_svid_serial, svid_expires_at, banned, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (spiffe_id) DO UPDATE SET attestor = $2, selectors = $3, svid_serial = $4, previous_svid_serial = $5, svid_expires_at = $6, banned = $7, updated_at = $9 WHERE agents.banned = 0 RETURNING spiffe_id")
            .bind(&agent.spiffe_id)
            .bind(&agent.attestor)
            .bind(join_lines(&agent.selectors))
            .bind(&agent.svid_serial)
            .bind(&agent.previous_svid_serial)
            .bind(agent.svid_expires_at)
            .bind(i64::from(agent.banned))
            .bind(agent.created_at)
            .bind(agent.updated_at)
            .fetch_optional(&mut *tx)
            .await?;
        if stored.is_none() {
            tx.rollback().await?;
            return Err(Error::PermissionDenied(format!(
                "agent {} is banned; an operator must evict it before it can attest again",
                agent.spiffe_id
            )));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            agent_columns!(),
            " FROM agents WHERE spiffe_id = $1"
        ))
        .bind(spiffe_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            agent_columns!(),
            " FROM agents ORDER BY spiffe_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn set_agent_svid(
        &self,
        spiffe_id: &str,
        presented_serial: &str,
        serial: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<AgentRecord> {
        let mut tx = self.pool.begin().await?;
        append_event(&mut tx, EventKind::Agent, spiffe_id, now).await?;
        // Compare and swap: only a renewal made with a certificate the row still holds is
        // written, so a renewal racing an eviction and re-attestation (or a ban) changes nothing.
        let row = sqlx::query(concat!("UPDATE agents SET previous_svid_serial = $2, svid_serial = $3, svid_expires_at = $4, updated_at = $5 WHERE spiffe_id = $1 AND banned = 0 AND $2 <> '' AND (svid_serial = $2 OR previous_svid_serial = $2) RETURNING ", agent_columns!()))
            .bind(spiffe_id)
            .bind(presented_serial)
            .bind(serial)
            .bind(expires_at)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Err(match self.get_agent(spiffe_id).await? {
                None => Error::NotFound(format!("agent `{spiffe_id}`")),
                Some(_) => Error::PermissionDenied(format!(
                    "agent {spiffe_id} renewed with a certificate it no longer holds (it was replaced, banned or attested again); restart the agent to attest again"
                )),
            });
        };
        let agent = agent_from_row(&row)?;
        tx.commit().await?;
        Ok(agent)
    }

    async fn ban_agent(&self, spiffe_id: &str, now: i64) -> Result<AgentRecord> {
        let query = sqlx::query(concat!(
            "UPDATE agents SET banned = 1, updated_at = $2 WHERE spiffe_id = $1 RETURNING ",
            agent_columns!()
        ))
        .bind(spiffe_id.to_string())
        .bind(now);
        self.agent_event(spiffe_id, query, now).await
    }

    async fn delete_agent(&self, spiffe_id: &str) -> Result<AgentRecord> {
        let now = self.clock.unix_now();
        let query = sqlx::query(concat!(
            "DELETE FROM agents WHERE spiffe_id = $1 RETURNING ",
            agent_columns!()
        ))
        .bind(spiffe_id.to_string());
        self.agent_event(spiffe_id, query, now).await
    }

    async fn create_join_token(&self, token: &JoinToken) -> Result<()> {
        sqlx::query("INSERT INTO join_tokens (token_hash, alias_spiffe_id, expires_at, used_at, created_at) VALUES ($1, $2, $3, 0, $4)")
            .bind(&token.token_hash)
            .bind(&token.alias_spiffe_id)
            .bind(token.expires_at)
            .bind(token.created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    Error::AlreadyExists("join token".into())
                } else {
                    e.into()
                }
            })?;
        Ok(())
    }

    async fn use_join_token(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<Result<JoinToken, TokenRefusal>> {
        // The conditional UPDATE is the single point of truth: of two concurrent callers, only one
        // sees a row come back.
        let used = sqlx::query("UPDATE join_tokens SET used_at = $2 WHERE token_hash = $1 AND used_at = 0 AND expires_at > $2 RETURNING token_hash, alias_spiffe_id, expires_at, created_at")
            .bind(token_hash)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = used {
            return Ok(Ok(JoinToken {
                token_hash: row.try_get("token_hash")?,
                alias_spiffe_id: row.try_get("alias_spiffe_id")?,
                expires_at: row.try_get("expires_at")?,
                created_at: row.try_get("created_at")?,
            }));
        }
        let existing =
            sqlx::query("SELECT used_at, expires_at FROM join_tokens WHERE token_hash = $1")
                .bind(token_hash)
                .fetch_optional(&self.pool)
                .await?;
        Ok(Err(match existing {
            None => TokenRefusal::Unknown,
            Some(row) if row.try_get::<i64, _>("used_at")? != 0 => TokenRefusal::AlreadyUsed,
            Some(_) => TokenRefusal::Expired,
        }))
    }

    async fn prune_join_tokens(&self, before: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM join_tokens WHERE expires_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<TrustBundle>> {
        let row = sqlx::query("SELECT document FROM bundles WHERE trust_domain = $1")
            .bind(trust_domain.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            let document: String = row.try_get("document")?;
            TrustBundle::from_spiffe_json(trust_domain.clone(), &document)
                .map_err(|e| corrupt("bundle", e))
        })
        .transpose()
    }

    async fn put_bundle(&self, bundle: &TrustBundle) -> Result<()> {
        let document = bundle.to_spiffe_json()?;
        let now = self.clock.unix_now();
        let mut tx = self.pool.begin().await?;
        append_event(
            &mut tx,
            EventKind::Bundle,
            bundle.trust_domain.as_str(),
            now,
        )
        .await?;
        sqlx::query("INSERT INTO bundles (trust_domain, document, sequence, updated_at) VALUES ($1, $2, $3, $4) ON CONFLICT (trust_domain) DO UPDATE SET document = $2, sequence = $3, updated_at = $4")
            .bind(bundle.trust_domain.as_str())
            .bind(document)
            .bind(i64::try_from(bundle.sequence).unwrap_or(i64::MAX))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_bundles(&self) -> Result<Vec<TrustBundle>> {
        let rows = sqlx::query("SELECT trust_domain, document FROM bundles ORDER BY trust_domain")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let name: String = row.try_get("trust_domain")?;
                let trust_domain =
                    parse_trust_domain("trust_domain", &name).map_err(|e| corrupt("bundle", e))?;
                let document: String = row.try_get("document")?;
                TrustBundle::from_spiffe_json(trust_domain, &document)
                    .map_err(|e| corrupt("bundle", e))
            })
            .collect()
    }

    async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM bundles WHERE trust_domain = $1")
            .bind(trust_domain.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Ok(false);
        }
        let now = self.clock.unix_now();
        append_event(&mut tx, EventKind::Bundle, trust_domain.as_str(), now).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn put_federation(&self, relationship: &FederationRelationship) -> Result<()> {
        let endpoint_id = match &relationship.profile {
            EndpointProfile::HttpsWeb => String::new(),
            EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => endpoint_spiffe_id.to_string(),
        };
        let mut tx = self.pool.begin().await?;
        append_event(
            &mut tx,
            EventKind::Federation,
            relationship.trust_domain.as_str(),
            relationship.updated_at,
        )
        .await?;
        sqlx::query("INSERT INTO federation_relationships (trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (trust_domain) DO UPDATE SET bundle_endpoint_url = $2, profile = $3, endpoint_spiffe_id = $4, updated_at = $6")
            .bind(relationship.trust_domain.as_str())
            .bind(&relationship.bundle_endpoint_url)
            .bind(relationship.profile.name())
            .bind(endpoint_id)
            .bind(relationship.created_at)
            .bind(relationship.updated_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            federation_columns!(),
            " FROM federation_relationships WHERE trust_domain = $1"
        ))
        .bind(trust_domain.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(federation_from_row).transpose()
    }

    async fn list_federations(&self) -> Result<Vec<FederationRelationship>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            federation_columns!(),
            " FROM federation_relationships ORDER BY trust_domain"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(federation_from_row).collect()
    }

    async fn delete_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            federation_columns!(),
            " FROM federation_relationships WHERE trust_domain = $1"
        ))
        .bind(trust_domain.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let relationship = federation_from_row(&row)?;
        sqlx::query("DELETE FROM federation_relationships WHERE trust_domain = $1")
            .bind(trust_domain.as_str())
            .execute(&mut *tx)
            .await?;
        let now = self.clock.unix_now();
        append_event(&mut tx, EventKind::Federation, trust_domain.as_str(), now).await?;
        tx.commit().await?;
        Ok(Some(relationship))
    }

    async fn list_authorities(&self) -> Result<Vec<Authority>> {
        let rows = sqlx::query("SELECT id, kind, key_ref, public_data, state, not_after, created_at FROM authorities ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                let state: String = row.try_get("state")?;
                Ok(Authority {
                    id: row.try_get("id")?,
                    kind: kind.parse()?,
                    key_ref: row.try_get("key_ref")?,
                    public_data: row.try_get("public_data")?,
                    state: state.parse().map_err(|e| corrupt("authority state", e))?,
                    not_after: row.try_get("not_after")?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn put_authority(&self, authority: &Authority) -> Result<()> {
        sqlx::query("INSERT INTO authorities (id, kind, key_ref, public_data, state, not_after, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET state = $5")
            .bind(&authority.id)
            .bind(authority.kind.as_str())
            .bind(&authority.key_ref)
            .bind(&authority.public_data)
            .bind(authority.state.as_str())
            .bind(authority.not_after)
            .bind(authority.created_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn record_issued_svids(&self, svids: &[IssuedSvid]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for svid in svids {
            sqlx::query("INSERT INTO issued_svids (serial, kind, spiffe_id, agent_id, entry_id, authority_id, not_before, not_after) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (serial) DO NOTHING")
                .bind(&svid.serial)
                .bind(&svid.kind)
                .bind(&svid.spiffe_id)
                .bind(&svid.agent_id)
                .bind(&svid.entry_id)
                .bind(&svid.authority_id)
                .bind(svid.not_before)
                .bind(svid.not_after)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_issued_svids(&self, filter: &SvidFilter) -> Result<Vec<IssuedSvid>> {
        let rows = sqlx::query(concat!("SELECT ", svid_columns!(), " FROM issued_svids WHERE ($1 = '' OR spiffe_id = $1) AND ($2 = '' OR agent_id = $2) AND not_after > $3 ORDER BY not_before DESC, serial"))
            .bind(filter.spiffe_id.clone().unwrap_or_default())
            .bind(filter.agent_id.clone().unwrap_or_default())
            .bind(filter.valid_at.unwrap_or(i64::MIN))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(svid_from_row).collect()
    }

    async fn get_issued_svid(&self, serial: &str) -> Result<Option<IssuedSvid>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            svid_columns!(),
            " FROM issued_svids WHERE serial = $1"
        ))
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(svid_from_row).transpose()
    }

    async fn prune_issued_svids(&self, before: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM issued_svids WHERE not_after < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>> {
        let rows =
            sqlx::query("SELECT id, kind, subject FROM events WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(i64::try_from(after).unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                Ok(Event {
                    id: u64::try_from(row.try_get::<i64, _>("id")?).unwrap_or(0),
                    kind: match kind.as_str() {
                        "entry" => EventKind::Entry,
                        "agent" => EventKind::Agent,
                        "bundle" => EventKind::Bundle,
                        "federation" => EventKind::Federation,
                        other => return Err(corrupt("event kind", other)),
                    },
                    subject: row.try_get("subject")?,
                })
            })
            .collect()
    }

    async fn latest_event_id(&self) -> Result<u64> {
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) AS latest FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(row.try_get::<i64, _>("latest")?).unwrap_or(0))
    }

    async fn prune_events(&self, before: i64) -> Result<u64> {
        // Keep the newest event whatever its age, so the feed position never goes back to 0.
        let done = sqlx::query(
            "DELETE FROM events WHERE created_at < $1 AND id < (SELECT MAX(id) FROM events)",
        )
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

impl FromStr for AuthorityKind {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "x509" => Ok(AuthorityKind::X509),
            "jwt" => Ok(AuthorityKind::Jwt),
            other => Err(corrupt("authority kind", other)),
        }
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
