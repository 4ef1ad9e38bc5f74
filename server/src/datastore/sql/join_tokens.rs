//! Join tokens: the `join_tokens` table, which stores only each token's hash, and the single
//! conditional update that uses a token at most once.

use sqlx::Row;

use super::{SqlDataStore, is_unique_violation};
use crate::datastore::{JoinToken, TokenRefusal};
use crate::{Error, Result};

impl SqlDataStore {
    pub(super) async fn create_join_token(&self, token: &JoinToken) -> Result<()> {
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

    pub(super) async fn use_join_token(
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

    pub(super) async fn prune_join_tokens(&self, before: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM join_tokens WHERE expires_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
