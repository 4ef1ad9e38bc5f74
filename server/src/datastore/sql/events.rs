//! The change feed: reading and pruning the `events` table, and listening for new events.
//! Events are written by [`append_event`](super::append_event), inside the transaction of the
//! change they announce. On Postgres a statement trigger on `events` (migration
//! `0005_event_notify.sql`) sends `NOTIFY sigil_events` in that same transaction, which Postgres
//! delivers when it commits; [`ChangeListener`] is the `LISTEN` side.

use sqlx::ConnectOptions;
use sqlx::any::AnyRow;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};

use super::{Columns, SqlDataStore, corrupt, count_changed, fetch_all};
use crate::datastore::{ChangeFeed, Event, EventKind, MAX_EVENT_IDS};
use crate::{Error, Result};

/// The channel the trigger of migration `0005_event_notify.sql` notifies.
const CHANNEL: &str = "sigil_events";

fn event_from_row(row: &AnyRow) -> Result<Event> {
    let row = Columns::of("event", row);
    Ok(Event {
        id: row.counter("id")?,
        kind: match row.text("kind")?.as_str() {
            "entry" => EventKind::Entry,
            "agent" => EventKind::Agent,
            "bundle" => EventKind::Bundle,
            "federation" => EventKind::Federation,
            "authority" => EventKind::Authority,
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

    async fn events_with_ids(&self, ids: &[u64]) -> Result<Vec<Event>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        if ids.len() > MAX_EVENT_IDS {
            return Err(Error::Invalid(sigil_core::Error::field(
                "ids",
                format!(
                    "{} event ids are over the limit of {MAX_EVENT_IDS} per call",
                    ids.len()
                ),
            )));
        }
        // `$n` placeholders, as both engines take them; only numbers are formatted in.
        let placeholders: Vec<String> = (1..=ids.len()).map(|n| format!("${n}")).collect();
        let sql = format!(
            "SELECT id, kind, subject FROM events WHERE id IN ({}) ORDER BY id",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in ids {
            query = query.bind(i64::try_from(*id).unwrap_or(i64::MAX));
        }
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

    async fn listen(&self) -> Result<Option<ChangeListener>> {
        let options = self.pool.connect_options();
        let url = &options.database_url;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Ok(None);
        }
        // A pool of its own with one connection that never ages out: LISTEN belongs to a
        // session, and the datastore's pool recycles its connections. Waiting for it is bounded
        // like every other datastore call, so a Postgres that is down fails this quickly.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.pool.options().get_acquire_timeout())
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(PgConnectOptions::from_url(url)?);
        let mut listener = PgListener::connect_with(&pool).await?;
        // A lost connection is reported to the caller (which reads the feed, since whatever was
        // notified meanwhile is gone, and listens again with its own backoff) rather than
        // reconnected inside `try_recv`.
        listener.eager_reconnect(false);
        listener.listen(CHANNEL).await?;
        Ok(Some(ChangeListener { listener }))
    }
}

/// A `LISTEN` on the change feed's channel: told whenever a transaction that appended events
/// commits, on any server sharing the database. Notifications say only that the feed grew; the
/// events themselves are read from the feed, so a missed notification costs latency, never a
/// change.
pub struct ChangeListener {
    listener: PgListener,
}

impl std::fmt::Debug for ChangeListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeListener").finish_non_exhaustive()
    }
}

impl ChangeListener {
    /// Waits until events were committed since the last call (the notifications that arrived
    /// meanwhile count as one). Fails when the connection is lost: what was notified in the
    /// meantime is gone, so the caller reads the feed and listens again.
    pub async fn changed(&mut self) -> Result<()> {
        match self.listener.try_recv().await? {
            Some(_) => {
                while self.listener.next_buffered().is_some() {}
                Ok(())
            }
            None => Err(Error::DatastoreUnavailable(
                "the change-feed listener lost its connection to Postgres".into(),
            )),
        }
    }
}
