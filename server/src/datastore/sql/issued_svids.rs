//! The issuance record: the `issued_svids` table, one row per signed SVID (never a key), and how
//! its rows map to [`IssuedSvid`].

use super::{Columns, SqlDataStore, count_changed, fetch_all, fetch_optional};
use crate::Result;
use crate::datastore::{IssuedSvid, IssuedSvidStore, SvidFilter};

/// Selects every record, column by column; a `WHERE` follows.
macro_rules! select_svids {
    () => {
        "SELECT serial, kind, spiffe_id, agent_id, entry_id, authority_id, not_before, not_after FROM issued_svids"
    };
}

record_reader! {
    svid_from_row("issued SVID") -> IssuedSvid {
        serial: text, kind: text, spiffe_id: text, agent_id: text, entry_id: text,
        authority_id: text, not_before: int, not_after: int,
    }
}

/// Rows per `INSERT` statement: one statement per row made a group commit of a signing burst cost
/// a round trip per SVID (on Postgres the writer then spent its time waiting); 200 rows x 8 columns
/// stays far below both engines' limit on bound parameters (SQLite 32 766, Postgres 65 535).
const ROWS_PER_INSERT: usize = 200;

/// Columns of one record, in the order [`IssuedSvidStore::record_issued_svids`] binds them.
const COLUMNS_PER_ROW: usize = 8;

/// `INSERT ... VALUES ($1, .. $8), ($9, .. $16), ...` for `rows` records. Written out with `$n`
/// placeholders because both engines accept them, where sqlx's query builder emits `?` for the
/// `Any` driver, which Postgres refuses. Only numbers are formatted in: no input reaches the text.
fn insert_statement(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO issued_svids (serial, kind, spiffe_id, agent_id, entry_id, authority_id, not_before, not_after) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..COLUMNS_PER_ROW {
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", row * COLUMNS_PER_ROW + column + 1));
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (serial) DO NOTHING");
    sql
}

impl IssuedSvidStore for SqlDataStore {
    async fn record_issued_svids(&self, svids: &[IssuedSvid]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for rows in svids.chunks(ROWS_PER_INSERT) {
            let statement = insert_statement(rows.len());
            let mut query = sqlx::query(sqlx::AssertSqlSafe(statement));
            for svid in rows {
                query = query
                    .bind(&svid.serial)
                    .bind(&svid.kind)
                    .bind(&svid.spiffe_id)
                    .bind(&svid.agent_id)
                    .bind(&svid.entry_id)
                    .bind(&svid.authority_id)
                    .bind(svid.not_before)
                    .bind(svid.not_after);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_issued_svids(&self, filter: &SvidFilter) -> Result<Vec<IssuedSvid>> {
        let query = sqlx::query(concat!(select_svids!(), " WHERE ($1 = '' OR spiffe_id = $1) AND ($2 = '' OR agent_id = $2) AND not_after > $3 ORDER BY not_before DESC, serial"))
            .bind(filter.spiffe_id.clone().unwrap_or_default())
            .bind(filter.agent_id.clone().unwrap_or_default())
            .bind(filter.valid_at.unwrap_or(i64::MIN));
        fetch_all(&self.pool, query, svid_from_row).await
    }

    async fn get_issued_svid(&self, serial: &str) -> Result<Option<IssuedSvid>> {
        let query = sqlx::query(concat!(select_svids!(), " WHERE serial = $1")).bind(serial);
        fetch_optional(&self.pool, query, svid_from_row).await
    }

    async fn prune_issued_svids(&self, before: i64) -> Result<u64> {
        let query = sqlx::query("DELETE FROM issued_svids WHERE not_after < $1").bind(before);
        count_changed(&self.pool, query).await
    }
}
