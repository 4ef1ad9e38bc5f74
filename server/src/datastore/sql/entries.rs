//! Registration entries: the `entries` table, how its rows map to [`Entry`], and the writes,
//! each in one transaction with its [`EventKind::Entry`] change event.

use sigil_core::entry::Entry;
use sigil_core::selector::all_present;

use super::{
    AnyQuery, Columns, SqlDataStore, append_event, fetch_all, fetch_optional, is_unique_violation,
    join_lines,
};
use crate::datastore::{EntryFilter, EntryStore, EventKind};
use crate::{Error, Result};

/// The columns of `entries`, in the order [`entry_from_row`] reads them.
macro_rules! entry_columns {
    () => {
        "id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, federates_with, admin, downstream, hint, expires_at, created_at, revision"
    };
}

/// Selects every entry; a `WHERE` or `ORDER BY` follows.
macro_rules! select_entries {
    () => {
        concat!("SELECT ", entry_columns!(), " FROM entries")
    };
}

record_reader! {
    entry_from_row("entry") -> Entry {
        id: text, spiffe_id: spiffe_id, parent_id: spiffe_id, selectors: selectors,
        x509_svid_ttl: int, jwt_svid_ttl: int, dns_names: lines, federates_with: trust_domains,
        admin: flag, downstream: flag, hint: text, expires_at: int, created_at: int,
        revision: counter,
    }
}

/// Binds $1..$12: the entry's fields other than its timestamps and revision.
fn bind_entry_fields<'q>(query: AnyQuery<'q>, entry: &Entry) -> AnyQuery<'q> {
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
    /// Inserts (`create`) or updates an entry, with its change event whose id is the revision.
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
}

impl EntryStore for SqlDataStore {
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
        let query = sqlx::query(concat!(
            "DELETE FROM entries WHERE id = $1 RETURNING ",
            entry_columns!()
        ))
        .bind(id);
        let entry = fetch_optional(&mut *tx, query, entry_from_row)
            .await?
            .ok_or_else(|| Error::NotFound(format!("entry `{id}`")))?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>> {
        let query = sqlx::query(concat!(select_entries!(), " WHERE id = $1")).bind(id);
        fetch_optional(&self.pool, query, entry_from_row).await
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>> {
        let query = sqlx::query(concat!(
            select_entries!(),
            " WHERE ($1 = '' OR spiffe_id = $1) AND ($2 = '' OR parent_id = $2) ORDER BY id"
        ))
        .bind(filter.spiffe_id.clone().unwrap_or_default())
        .bind(filter.parent_id.clone().unwrap_or_default());
        let mut entries = fetch_all(&self.pool, query, entry_from_row).await?;
        // Selector matching is "has all of these", which SQL over a text column cannot say.
        entries.retain(|entry| all_present(&filter.selectors, &entry.selectors));
        Ok(entries)
    }
}
