//! Attested agents: the `agents` table, how its rows map to [`AgentRecord`], and the writes,
//! each in one transaction with its [`EventKind::Agent`] change event.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlDataStore, append_event, join_lines, parse_selectors};
use crate::datastore::{AgentRecord, EventKind};
use crate::{Error, Result};

/// The columns of `agents`.
macro_rules! agent_columns {
    () => {
        "spiffe_id, attestor, selectors, svid_serial, previous_svid_serial, svid_expires_at, banned, created_at, updated_at"
    };
}

fn agent_from_row(row: &AnyRow) -> Result<AgentRecord> {
    Ok(AgentRecord {
        spiffe_id: row.try_get("spiffe_id")?,
        attestor: row.try_get("attestor")?,
        selectors: parse_selectors(&row.try_get::<String, _>("selectors")?)?,
        svid_serial: row.try_get("svid_serial")?,
        previous_svid_serial: row.try_get("previous_svid_serial")?,
        svid_expires_at: row.try_get("svid_expires_at")?,
        banned: row.try_get::<i64, _>("banned")? != 0,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl SqlDataStore {
    /// Runs `query` (which binds the agent's SPIFFE ID as $1) with an agent change event.
    async fn agent_event<'q>(
        &self,
        spiffe_id: &str,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
        now: i64,
    ) -> Result<AgentRecord> {
        let mut tx = self.pool.begin().await?;
        append_event(&mut tx, EventKind::Agent, spiffe_id, now).await?;
        let row = query
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::NotFound(format!("agent `{spiffe_id}`")))?;
        let agent = agent_from_row(&row)?;
        tx.commit().await?;
        Ok(agent)
    }

    pub(super) async fn put_agent(&self, agent: &AgentRecord) -> Result<()> {
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

    pub(super) async fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            agent_columns!(),
            " FROM agents WHERE spiffe_id = $1"
        ))
        .bind(spiffe_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    pub(super) async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            agent_columns!(),
            " FROM agents ORDER BY spiffe_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(agent_from_row).collect()
    }

    pub(super) async fn set_agent_svid(
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
        let row = sqlx::query(concat!("UPDATE agents SET previous_svid_serial = $2, svid_serial = $3, svid_expires_at = $4, updated_at = $5 WHERE spiffe_id = $1 AND banned = 0 AND $2 <> '' AND (svid_serial = $2 OR previous_svid_serial = $2) RETURNING ", agent_columns!()))
            .bind(spiffe_id)
            .bind(presented_serial)
            .bind(serial)
            .bind(expires_at)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Err(match self.get_agent(spiffe_id).await? {
                None => Error::NotFound(format!("agent `{spiffe_id}`")),
                Some(_) => Error::PermissionDenied(format!(
                    "agent {spiffe_id} renewed with a certificate it no longer holds (it was replaced, banned or attested again); restart the agent to attest again"
                )),
            });
        };
        let agent = agent_from_row(&row)?;
        tx.commit().await?;
        Ok(agent)
    }

    pub(super) async fn ban_agent(&self, spiffe_id: &str, now: i64) -> Result<AgentRecord> {
        let query = sqlx::query(concat!(
            "UPDATE agents SET banned = 1, updated_at = $2 WHERE spiffe_id = $1 RETURNING ",
            agent_columns!()
        ))
        .bind(spiffe_id.to_string())
        .bind(now);
        self.agent_event(spiffe_id, query, now).await
    }

    pub(super) async fn delete_agent(&self, spiffe_id: &str) -> Result<AgentRecord> {
        let now = self.clock.unix_now();
        let query = sqlx::query(concat!(
            "DELETE FROM agents WHERE spiffe_id = $1 RETURNING ",
            agent_columns!()
        ))
        .bind(spiffe_id.to_string());
        self.agent_event(spiffe_id, query, now).await
    }
}
