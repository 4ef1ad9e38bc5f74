//! Registration entries: the `entries` table, how its rows map to [`Entry`], and the writes,
//! each in one transaction with its [`EventKind::Entry`] change event.

use sigil_core::entry::Entry;
use sigil_core::selector::all_present;

use super::{
    AnyQuery, Columns, SqlDataStore, append_event, fetch_all, fetch_optional, is_unique_violation,
    join_lines,
};
use sqlx::Row;

use crate::datastore::{EntryFilter, EntryStore, EntryWrite, EventKind};
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

/// Ids per `WHERE id IN (...)` of [`EntryStore::get_entries`].
const IDS_PER_SELECT: usize = 500;

/// Rows read per statement while a page filtered by selectors fills up.
const SCAN_CHUNK: usize = 1000;

/// The `created_at` of an updated row, as `UPDATE ... RETURNING` gives it back (none: no row).
type Written = Option<i64>;

fn duplicate(entry: &Entry) -> Error {
    Error::AlreadyExists(format!(
        "an entry with spiffe_id {}, parent_id {} and the same selectors exists; change one of them or update that entry",
        entry.spiffe_id, entry.parent_id
    ))
}

impl SqlDataStore {
    /// One write of a batch inside `tx`: `Ok(Err(..))` is this write's own failure (nothing of it
    /// stays in `tx`), `Err` a failure of the database that fails the batch.
    async fn write_one(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        write: &EntryWrite,
        now: i64,
    ) -> Result<Result<Entry>> {
        let subject = match write {
            EntryWrite::Create(entry) | EntryWrite::Update(entry) => entry.id.as_str(),
            EntryWrite::Delete(id) => id.as_str(),
        };
        if let EntryWrite::Update(entry) = write {
            // Checked first: a unique violation inside the transaction would abort all of it
            // on Postgres.
            let clash = sqlx::query("SELECT 1 FROM entries WHERE spiffe_id = $1 AND parent_id = $2 AND selectors = $3 AND id <> $4")
                .bind(entry.spiffe_id.to_string())
                .bind(entry.parent_id.to_string())
                .bind(join_lines(&entry.selectors))
                .bind(entry.id.clone())
                .fetch_optional(&mut **tx)
                .await?;
            if clash.is_some() {
                return Ok(Err(duplicate(entry)));
            }
        }
        let revision = append_event(tx, EventKind::Entry, subject, now).await?;
        let outcome = match write {
            EntryWrite::Create(entry) => {
                let inserted = bind_entry_fields(
                    sqlx::query("INSERT INTO entries (id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, federates_with, admin, downstream, hint, expires_at, revision, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) ON CONFLICT DO NOTHING"),
                    entry,
                )
                .bind(revision)
                .bind(entry.created_at)
                .execute(&mut **tx)
                .await?;
                (inserted.rows_affected() == 1)
                    .then(|| stored(entry, revision, entry.created_at))
                    .ok_or_else(|| duplicate(entry))
            }
            EntryWrite::Update(entry) => {
                let query = bind_entry_fields(
                    sqlx::query("UPDATE entries SET spiffe_id = $2, parent_id = $3, selectors = $4, x509_svid_ttl = $5, jwt_svid_ttl = $6, dns_names = $7, federates_with = $8, admin = $9, downstream = $10, hint = $11, expires_at = $12, revision = $13 WHERE id = $1 RETURNING created_at"),
                    entry,
                )
                .bind(revision);
                let created_at: Written = query
                    .fetch_optional(&mut **tx)
                    .await?
                    .map(|row| row.try_get::<i64, _>(0))
                    .transpose()?;
                created_at
                    .map(|created_at| stored(entry, revision, created_at))
                    .ok_or_else(|| Error::NotFound(format!("entry `{}`", entry.id)))
            }
            EntryWrite::Delete(id) => {
                let query = sqlx::query(concat!(
                    "DELETE FROM entries WHERE id = $1 RETURNING ",
                    entry_columns!()
                ))
                .bind(id.clone());
                fetch_optional(&mut **tx, query, entry_from_row)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("entry `{id}`")))
            }
        };
        if outcome.is_err() {
            // The write did nothing: its event must not announce a change.
            sqlx::query("DELETE FROM events WHERE id = $1")
                .bind(revision)
                .execute(&mut **tx)
                .await?;
        }
        Ok(outcome)
    }

    /// A batch of one, whose own failure is the call's.
    async fn write_single(&self, write: EntryWrite) -> Result<Entry> {
        self.write_entries(&[write])
            .await?
            .pop()
            .unwrap_or_else(|| {
                Err(Error::Unavailable(
                    "the entry write returned no result".into(),
                ))
            })
    }
}

/// `entry` as stored by the write that made `revision`.
fn stored(entry: &Entry, revision: i64, created_at: i64) -> Entry {
    let mut stored = entry.clone();
    stored.revision = u64::try_from(revision).unwrap_or(0);
    stored.created_at = created_at;
    stored
}

/// `SELECT ... WHERE id IN ($1, .., $n)` for `n` ids. Only numbers are formatted in.
fn select_ids_statement(n: usize) -> String {
    let placeholders: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    format!(
        "{} WHERE id IN ({})",
        select_entries!(),
        placeholders.join(", ")
    )
}

impl EntryStore for SqlDataStore {
    async fn create_entry(&self, entry: &Entry) -> Result<Entry> {
        self.write_single(EntryWrite::Create(entry.clone())).await
    }

    async fn update_entry(&self, entry: &Entry) -> Result<Entry> {
        self.write_single(EntryWrite::Update(entry.clone())).await
    }

    async fn delete_entry(&self, id: &str) -> Result<Entry> {
        self.write_single(EntryWrite::Delete(id.to_string())).await
    }

    async fn write_entries(&self, writes: &[EntryWrite]) -> Result<Vec<Result<Entry>>> {
        let now = self.clock.unix_now();
        let mut tx = self.pool.begin().await?;
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            results.push(Self::write_one(&mut tx, write, now).await?);
        }
        match tx.commit().await {
            Ok(()) => Ok(results),
            // Another transaction stored the same entry between our check and our commit.
            Err(e) if is_unique_violation(&e) => Err(Error::Aborted(
                "another write stored a clashing entry at the same time; nothing of this batch was written, send it again".into(),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>> {
        let query = sqlx::query(concat!(select_entries!(), " WHERE id = $1")).bind(id);
        fetch_optional(&self.pool, query, entry_from_row).await
    }

    async fn get_entries(&self, ids: &[String]) -> Result<Vec<Entry>> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_SELECT) {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(select_ids_statement(chunk.len())));
            for id in chunk {
                query = query.bind(id.clone());
            }
            found.extend(fetch_all(&self.pool, query, entry_from_row).await?);
        }
        Ok(found)
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>> {
        self.list_entries_page(filter, "", usize::MAX).await
    }

    async fn list_entries_page(
        &self,
        filter: &EntryFilter,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let mut page = Vec::new();
        let mut after = after.to_string();
        while page.len() < limit {
            let chunk = if filter.selectors.is_empty() {
                (limit - page.len()).min(SCAN_CHUNK)
            } else {
                SCAN_CHUNK
            };
            let query = sqlx::query(concat!(
                select_entries!(),
                " WHERE ($1 = '' OR spiffe_id = $1) AND ($2 = '' OR parent_id = $2) AND id > $3 ORDER BY id LIMIT $4"
            ))
            .bind(filter.spiffe_id.clone().unwrap_or_default())
            .bind(filter.parent_id.clone().unwrap_or_default())
            .bind(after.clone())
            .bind(i64::try_from(chunk).unwrap_or(i64::MAX));
            let rows = fetch_all(&self.pool, query, entry_from_row).await?;
            let Some(last) = rows.last() else { break };
            after.clone_from(&last.id);
            let exhausted = rows.len() < chunk;
            // Selector matching is "has all of these", which SQL over a text column cannot say.
            page.extend(
                rows.into_iter()
                    .filter(|entry| all_present(&filter.selectors, &entry.selectors))
                    .take(limit - page.len()),
            );
            if exhausted {
                break;
            }
        }
        Ok(page)
    }

    async fn count_entries(&self, filter: &EntryFilter) -> Result<u64> {
        if !filter.selectors.is_empty() {
            return Ok(self.list_entries(filter).await?.len() as u64);
        }
        let row = sqlx::query(
            "SELECT COUNT(*) FROM entries WHERE ($1 = '' OR spiffe_id = $1) AND ($2 = '' OR parent_id = $2)",
        )
        .bind(filter.spiffe_id.clone().unwrap_or_default())
        .bind(filter.parent_id.clone().unwrap_or_default())
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0))
    }
}
