//! Attested agents: the `agents` table, how its rows map to [`AgentRecord`], and the writes,
//! each in one transaction with its [`EventKind::Agent`] change event.

use super::{AnyQuery, Columns, SqlDataStore, append_event, fetch_all, fetch_optional, join_lines};
use crate::datastore::{AgentRecord, AgentStore, EventKind};
use crate::{Error, Result};

/// The columns of `agents`.
macro_rules! agent_columns {
    () => {
        "spiffe_id, attestor, selectors, svid_serial, previous_svid_serial, svid_expires_at, banned, created_at, updated_at"
    };
}

/// Selects every agent; a `WHERE` or `ORDER BY` follows.
macro_rules! select_agents {
    () => {
        concat!("SELECT ", agent_columns!(), " FROM agents")
    };
}

record_reader! {
    agent_from_row("agent") -> AgentRecord {
        spiffe_id: text, attestor: text, selectors: selectors, svid_serial: text,
        previous_svid_serial: text, svid_expires_at: int, banned: flag, created_at: int,
        updated_at: int,
    }
}

impl SqlDataStore {
    /// Runs `query` (which binds the agent's SPIFFE ID as $1) with an agent change event.
    async fn agent_event<'q>(
        &self,
        spiffe_id: &str,
        query: AnyQuery<'q>,
        now: i64,
    ) -> Result<AgentRecord> {
        let mut tx = self.pool.begin().await?;
        append_event(&mut tx, EventKind::Agent, spiffe_id, now).await?;
        let agent = fetch_optional(&mut *tx, query, agent_from_row)
            .await?
            .ok_or_else(|| Error::NotFound(format!("agent `{spiffe_id}`")))?;
        tx.commit().await?;
        Ok(agent)
    }
}

impl AgentStore for SqlDataStore {
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
        let query = sqlx::query(concat!(select_agents!(), " WHERE spiffe_id = $1")).bind(spiffe_id);
        fetch_optional(&self.pool, query, agent_from_row).await
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let query = sqlx::query(concat!(select_agents!(), " ORDER BY spiffe_id"));
        fetch_all(&self.pool, query, agent_from_row).await
    }

    async fn list_agents_page(&self, after: &str, limit: usize) -> Result<Vec<AgentRecord>> {
        let query = sqlx::query(concat!(
            select_agents!(),
            " WHERE spiffe_id > $1 ORDER BY spiffe_id LIMIT $2"
        ))
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        fetch_all(&self.pool, query, agent_from_row).await
    }

    async fn count_agents(&self) -> Result<u64> {
        let row = sqlx::query("SELECT COUNT(*) FROM agents")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(sqlx::Row::try_get::<i64, _>(&row, 0)?).unwrap_or(0))
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
        let query = sqlx::query(concat!("UPDATE agents SET previous_svid_serial = $2, svid_serial = $3, svid_expires_at = $4, updated_at = $5 WHERE spiffe_id = $1 AND banned = 0 AND $2 <> '' AND (svid_serial = $2 OR previous_svid_serial = $2) RETURNING ", agent_columns!()))
            .bind(spiffe_id)
            .bind(presented_serial)
            .bind(serial)
            .bind(expires_at)
            .bind(now);
        let Some(agent) = fetch_optional(&mut *tx, query, agent_from_row).await? else {
            tx.rollback().await?;
            return Err(match self.get_agent(spiffe_id).await? {
                None => Error::NotFound(format!("agent `{spiffe_id}`")),
                Some(_) => Error::PermissionDenied(format!(
                    "agent {spiffe_id} renewed with a certificate it no longer holds (it was replaced, banned or attested again); restart the agent to attest again"
                )),
            });
        };
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
}
