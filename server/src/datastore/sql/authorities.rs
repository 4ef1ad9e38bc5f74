//! The CA journal: the `authorities` table, one row per X.509 CA certificate or JWT key and
//! where it is in its life. Every write appends an [`EventKind::Authority`] event, so the other
//! servers sharing the journal rebuild the bundle (which publishes every server's authorities)
//! and the tainted set as soon as one of them prepares, activates, taints or revokes.

use std::str::FromStr;

use sqlx::any::AnyRow;

use super::{Columns, SqlDataStore, append_event, corrupt, fetch_all};
use crate::datastore::{Authority, AuthorityJournal, AuthorityKind, EventKind};
use crate::{Error, Result};

fn authority_from_row(row: &AnyRow) -> Result<Authority> {
    let row = Columns::of("authority", row);
    Ok(Authority {
        id: row.text("id")?,
        kind: row.text("kind")?.parse()?,
        key_ref: row.text("key_ref")?,
        public_data: row.bytes("public_data")?,
        state: row
            .text("state")?
            .parse()
            .map_err(|e| corrupt("authority state", e))?,
        not_after: row.int("not_after")?,
        created_at: row.int("created_at")?,
        owner: row.text("owner")?,
    })
}

impl AuthorityJournal for SqlDataStore {
    async fn list_authorities(&self) -> Result<Vec<Authority>> {
        let query = sqlx::query(
            "SELECT id, kind, key_ref, public_data, state, not_after, created_at, owner FROM authorities ORDER BY created_at, id",
        );
        fetch_all(&self.pool, query, authority_from_row).await
    }

    async fn put_authority(&self, authority: &Authority) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        append_event(
            &mut tx,
            EventKind::Authority,
            &authority.id,
            self.clock.unix_now(),
        )
        .await?;
        sqlx::query("INSERT INTO authorities (id, kind, key_ref, public_data, state, not_after, created_at, owner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET state = $5, owner = $8")
            .bind(&authority.id)
            .bind(authority.kind.as_str())
            .bind(&authority.key_ref)
            .bind(&authority.public_data)
            .bind(authority.state.as_str())
            .bind(authority.not_after)
            .bind(authority.created_at)
            .bind(&authority.owner)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
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
