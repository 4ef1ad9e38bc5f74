//! Join tokens: the `join_tokens` table, which stores only each token's hash, and the single
//! conditional update that uses a token at most once.

use sqlx::any::AnyRow;

use super::{Columns, SqlDataStore, count_changed, fetch_optional, is_unique_violation};
use crate::datastore::{JoinToken, JoinTokenStore, TokenRefusal};
use crate::{Error, Result};

record_reader! {
    token_from_row("join token") -> JoinToken {
        token_hash: text, alias_spiffe_id: text, expires_at: int, created_at: int,
    }
}

/// Why a stored token could not be used: `used_at` stays 0 until it is used, so a token that is
/// unused yet refused has expired.
fn refusal_from_row(row: &AnyRow) -> Result<TokenRefusal> {
    Ok(if Columns::of("join token", row).int("used_at")? != 0 {
        TokenRefusal::AlreadyUsed
    } else {
        TokenRefusal::Expired
    })
}

impl JoinTokenStore for SqlDataStore {
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
        let query = sqlx::query("UPDATE join_tokens SET used_at = $2 WHERE token_hash = $1 AND used_at = 0 AND expires_at > $2 RETURNING token_hash, alias_spiffe_id, expires_at, created_at")
            .bind(token_hash)
            .bind(now);
        if let Some(token) = fetch_optional(&self.pool, query, token_from_row).await? {
            return Ok(Ok(token));
        }
        let query =
            sqlx::query("SELECT used_at FROM join_tokens WHERE token_hash = $1").bind(token_hash);
        let refusal = fetch_optional(&self.pool, query, refusal_from_row).await?;
        Ok(Err(refusal.unwrap_or(TokenRefusal::Unknown)))
    }

    async fn prune_join_tokens(&self, before: i64) -> Result<u64> {
        let query = sqlx::query("DELETE FROM join_tokens WHERE expires_at < $1").bind(before);
        count_changed(&self.pool, query).await
    }
}
