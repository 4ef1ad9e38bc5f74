//! The issuance record: the `issued_svids` table, one row per signed SVID (never a key), and how
//! its rows map to [`IssuedSvid`].

use sqlx::Row;
use sqlx::any::AnyRow;

use super::SqlDataStore;
use crate::Result;
use crate::datastore::{IssuedSvid, SvidFilter};

/// The columns of `issued_svids`.
macro_rules! svid_columns {
    () => {
        "serial, kind, spiffe_id, agent_id, entry_id, authority_id, not_before, not_after"
    };
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

impl SqlDataStore {
    pub(super) async fn record_issued_svids(&self, svids: &[IssuedSvid]) -> Result<()> {
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

    pub(super) async fn list_issued_svids(&self, filter: &SvidFilter) -> Result<Vec<IssuedSvid>> {
        let rows = sqlx::query(concat!("SELECT ", svid_columns!(), " FROM issued_svids WHERE ($1 = '' OR spiffe_id = $1) AND ($2 = '' OR agent_id = $2) AND not_after > $3 ORDER BY not_before DESC, serial"))
            .bind(filter.spiffe_id.clone().unwrap_or_default())
            .bind(filter.agent_id.clone().unwrap_or_default())
            .bind(filter.valid_at.unwrap_or(i64::MIN))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(svid_from_row).collect()
    }

    pub(super) async fn get_issued_svid(&self, serial: &str) -> Result<Option<IssuedSvid>> {
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

    pub(super) async fn prune_issued_svids(&self, before: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM issued_svids WHERE not_after < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
