//! Registration entries: the `entries` table, how its rows map to [`Entry`], and the writes,
//! each in one transaction with its [`EventKind::Entry`] change event.

use sigil_core::entry::Entry;
use sigil_core::id::{parse_spiffe_id, parse_trust_domain};
use sigil_core::selector::all_present;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{
    SqlDataStore, append_event, corrupt, is_unique_violation, join_lines, parse_selectors,
    split_lines,
};
use crate::datastore::{EntryFilter, EventKind};
use crate::{Error, Result};

/// The columns of `entries`, in the order [`entry_from_row`] reads them.
macro_rules! entry_columns {
    () => {
        "id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, federates_with, admin, downstream, hint, expires_at, created_at, revision"
    };
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
    pub(super) async fn create_entry(&self, entry: &Entry) -> Result<Entry> {
        self.write_entry(entry, true).await
    }

    pub(super) async fn update_entry(&self, entry: &Entry) -> Result<Entry> {
        self.write_entry(entry, false).await
    }

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

    pub(super) async fn delete_entry(&self, id: &str) -> Result<Entry> {
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

    pub(super) async fn get_entry(&self, id: &str) -> Result<Option<Entry>> {
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

    pub(super) async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>> {
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
}
