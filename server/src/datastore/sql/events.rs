//! The change feed: reading and pruning the `events` table. Events are written by
//! [`append_event`](super::append_event), inside the transaction of the change they announce.

use sqlx::Row;

use super::{SqlDataStore, corrupt};
use crate::Result;
use crate::datastore::{Event, EventKind};

impl SqlDataStore {
    pub(super) async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>> {
        let rows =
            sqlx::query("SELECT id, kind, subject FROM events WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(i64::try_from(after).unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                Ok(Event {
                    id: u64::try_from(row.try_get::<i64, _>("id")?).unwrap_or(0),
                    kind: match kind.as_str() {
                        "entry" => EventKind::Entry,
                        "agent" => EventKind::Agent,
                        "bundle" => EventKind::Bundle,
                        "federation" => EventKind::Federation,
                        other => return Err(corrupt("event kind", other)),
                    },
                    subject: row.try_get("subject")?,
                })
            })
            .collect()
    }

    pub(super) async fn latest_event_id(&self) -> Result<u64> {
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) AS latest FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(row.try_get::<i64, _>("latest")?).unwrap_or(0))
    }

    pub(super) async fn prune_events(&self, before: i64) -> Result<u64> {
        // Keep the newest event whatever its age, so the feed position never goes back to 0.
        let done = sqlx::query(
            "DELETE FROM events WHERE created_at < $1 AND id < (SELECT MAX(id) FROM events)",
        )
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
