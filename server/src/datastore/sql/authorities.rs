//! The CA journal: the `authorities` table, one row per X.509 CA certificate or JWT key and
//! where it is in its life.

use std::str::FromStr;

use sqlx::Row;

use super::{SqlDataStore, corrupt};
use crate::datastore::{Authority, AuthorityKind};
use crate::{Error, Result};

impl SqlDataStore {
    pub(super) async fn list_authorities(&self) -> Result<Vec<Authority>> {
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

    pub(super) async fn put_authority(&self, authority: &Authority) -> Result<()> {
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
