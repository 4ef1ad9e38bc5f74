//! The change feed: reading and pruning the `events` table. Events are written by
//! [`append_event`](super::append_event), inside the transaction of the change they announce.

use sqlx::any::AnyRow;

use super::{Columns, SqlDataStore, corrupt, count_changed, fetch_all};
use crate::Result;
use crate::datastore::{ChangeFeed, Event, EventKind};

fn event_from_row(row: &AnyRow) -> Result<Event> {
    let row = Columns::of("event", row);
    Ok(Event {
        id: row.counter("id")?,
        kind: match row.text("kind")?.as_str() {
            "entry" => EventKind::Entry,
            "agent" => EventKind::Agent,
            "bundle" => EventKind::Bundle,
            "federation" => EventKind::Federation,
            other => return Err(corrupt("event kind", other)),
        },
        subject: row.text("subject")?,
    })
}

impl ChangeFeed for SqlDataStore {
    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>> {
        let query =
            sqlx::query("SELECT id, kind, subject FROM events WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(i64::try_from(after).unwrap_or(i64::MAX))
                .bind(i64::from(limit));
        fetch_all(&self.pool, query, event_from_row).await
    }

    async fn latest_event_id(&self) -> Result<u64> {
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) AS latest FROM events")
            .fetch_one(&self.pool)
            .await?;
        Columns::of("event", &row).counter("latest")
    }

    async fn prune_events(&self, before: i64) -> Result<u64> {
        // Keep the newest event whatever its age, so the feed position never goes back to 0.
        let query = sqlx::query(
            "DELETE FROM events WHERE created_at < $1 AND id < (SELECT MAX(id) FROM events)",
        )
        .bind(before);
        count_changed(&self.pool, query).await
    }
}
