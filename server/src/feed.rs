//! Following the datastore's change feed.
//!
//! The server answers from two in-memory mirrors of the datastore so that no signing request
//! waits on the database: [`Authorizations`] (entries and agents: who may obtain what) and
//! [`TrustBundles`] (the own and the federated bundles). Every write another server must see
//! appends an event to the change feed in the same transaction; [`Feed`] reads the events it has
//! not applied yet and reloads the row each one names into the mirror it concerns. It runs after
//! the server's own writes (so they are visible at once), when Postgres notifies that another
//! server committed events, on a timer as a safety net (`follow_changes` in
//! `server/tasks.rs`) and, rate-limited, when a request missed in the cache.
//!
//! Every applied change bumps a revision; sync streams wake on it and send each agent the
//! difference between what it holds and what it may now use. Changes to the CA journal and to
//! federation relationships concern no mirror: they wake the CA's maintenance (which rebuilds the
//! own bundle and the tainted set from every server's authorities) and the federation refresher.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil_core::sync::MutexExt;
use tokio::sync::futures::Notified;
use tokio::sync::{Mutex, Notify, watch};

use crate::Result;
use crate::authz::{Authorizations, AuthzSources};
use crate::bundles::TrustBundles;
use sigil_core::entry::Entry;

use crate::datastore::{DataStore, Event, EventKind};

/// How many change events are read per datastore round trip.
const EVENT_PAGE: u32 = 1000;

/// Events at most this far behind the newest one seen are re-read on every catch-up: on Postgres a
/// transaction that took a lower id can commit after a higher id was already read, and re-reading
/// the recent past is how such a late event is still applied. Applying an event twice is harmless
/// (it reloads the row).
const LATE_EVENT_WINDOW: u64 = 256;

/// How often a cache miss may make the feed be read at most: refused certificates cost any caller
/// nothing, so they must not cost the datastore a query each.
const MISS_CATCH_UP_INTERVAL: Duration = Duration::from_millis(200);

/// Where the mirrors stand in the change feed.
#[derive(Debug, Default)]
struct Position {
    newest: u64,
    /// Ids already applied within the late-event window.
    recent: BTreeSet<u64>,
}

/// The change-feed follower that keeps [`Authorizations`] and [`TrustBundles`] current.
#[derive(Debug)]
pub struct Feed {
    authz: Arc<Authorizations>,
    bundles: Arc<TrustBundles>,
    position: Mutex<Position>,
    /// Counts applied changes; sync streams wake on it.
    revision: watch::Sender<u64>,
    /// When a caller last made the feed be read on a miss ([`Feed::catch_up_on_miss`]).
    last_miss_catch_up: std::sync::Mutex<Option<Instant>>,
    /// An authority of the journal changed ([`Feed::journal_changed`]).
    journal: Notify,
    /// A federation relationship changed ([`Feed::relationships_changed`]).
    relationships: Notify,
}

impl Feed {
    /// Loads both mirrors from `datastore`.
    pub async fn load<D: DataStore>(sources: AuthzSources, datastore: &D) -> Result<Self> {
        // Read the feed position first: anything written after it is applied by the next catch-up.
        let newest = datastore.latest_event_id().await?;
        let window_start = newest.saturating_sub(LATE_EVENT_WINDOW);
        let recent = datastore
            .events_after(
                window_start,
                u32::try_from(LATE_EVENT_WINDOW).unwrap_or(u32::MAX),
            )
            .await?
            .into_iter()
            .map(|event| event.id)
            .filter(|id| *id <= newest)
            .collect();
        let bundles = TrustBundles::load(sources.trust_domain.clone(), datastore).await?;
        let authz = Authorizations::load(sources, datastore).await?;
        Ok(Feed {
            authz: Arc::new(authz),
            bundles: Arc::new(bundles),
            position: Mutex::new(Position { newest, recent }),
            revision: watch::channel(newest).0,
            last_miss_catch_up: std::sync::Mutex::new(None),
            journal: Notify::new(),
            relationships: Notify::new(),
        })
    }

    /// Who may obtain what.
    pub fn authz(&self) -> &Arc<Authorizations> {
        &self.authz
    }

    /// The stored trust bundles.
    pub fn bundles(&self) -> &Arc<TrustBundles> {
        &self.bundles
    }

    /// Wakes every sync stream to recompute what its agent may use (after a change outside the
    /// datastore, such as pod churn or the tainted set).
    pub fn bump(&self) {
        self.revision.send_modify(|r| *r += 1);
    }

    /// A receiver that changes whenever either mirror does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Resolves once the feed has applied a change to the CA journal (made by any server) since
    /// the last time it resolved; the CA's maintenance is its one waiter.
    pub fn journal_changed(&self) -> Notified<'_> {
        self.journal.notified()
    }

    /// Resolves once the feed has applied a change to a federation relationship since the last
    /// time it resolved; the federation refresher is its one waiter.
    pub fn relationships_changed(&self) -> Notified<'_> {
        self.relationships.notified()
    }

    /// Applies every change-feed event not yet applied.
    pub async fn catch_up<D: DataStore>(&self, datastore: &D) -> Result<()> {
        let mut position = self.position.lock().await;
        let mut applied_any = false;
        let mut after = position.newest.saturating_sub(LATE_EVENT_WINDOW);
        loop {
            let events = datastore.events_after(after, EVENT_PAGE).await?;
            let Some(last) = events.last() else { break };
            after = last.id;
            let page_len = events.len();
            let fresh: Vec<Event> = events
                .into_iter()
                .filter(|event| {
                    event.id > position.newest.saturating_sub(LATE_EVENT_WINDOW)
                        && !position.recent.contains(&event.id)
                })
                .collect();
            // Entries changed in this page are read in one query each 500, not one per event:
            // a batch of 1 000 writes is then two reads, not a thousand.
            let entry_ids: Vec<String> = fresh
                .iter()
                .filter(|event| event.kind == EventKind::Entry)
                .map(|event| event.subject.clone())
                .collect::<BTreeSet<String>>()
                .into_iter()
                .collect();
            if !entry_ids.is_empty() {
                let mut found: HashMap<String, Entry> = datastore
                    .get_entries(&entry_ids)
                    .await?
                    .into_iter()
                    .map(|entry| (entry.id.clone(), entry))
                    .collect();
                for id in &entry_ids {
                    self.authz.apply_entry(id, found.remove(id));
                }
            }
            for event in fresh {
                self.apply(datastore, event.kind, &event.subject).await?;
                position.recent.insert(event.id);
                position.newest = position.newest.max(event.id);
                applied_any = true;
            }
            if page_len < EVENT_PAGE as usize {
                break;
            }
        }
        let floor = position.newest.saturating_sub(LATE_EVENT_WINDOW);
        position.recent = position.recent.split_off(&floor);
        if applied_any {
            self.bump();
        }
        Ok(())
    }

    /// Like [`Feed::catch_up`], for a request the cache refused that a write not yet applied
    /// (another server's renewal, say) might allow: at most once per `MISS_CATCH_UP_INTERVAL`;
    /// returns whether it caught up.
    pub async fn catch_up_on_miss<D: DataStore>(&self, datastore: &D) -> Result<bool> {
        {
            let mut last = self.last_miss_catch_up.lock_unpoisoned();
            if last.is_some_and(|at| at.elapsed() < MISS_CATCH_UP_INTERVAL) {
                return Ok(false);
            }
            *last = Some(Instant::now());
        }
        self.catch_up(datastore).await?;
        Ok(true)
    }

    async fn apply<D: DataStore>(
        &self,
        datastore: &D,
        kind: EventKind,
        subject: &str,
    ) -> Result<()> {
        match kind {
            // Read in batches by `catch_up`, a page of events at a time.
            EventKind::Entry => {}
            EventKind::Agent => {
                let agent = datastore.get_agent(subject).await?;
                self.authz.apply_agent(subject, agent);
            }
            EventKind::Bundle => self.bundles.reload(datastore, subject).await?,
            // One stored permit per waiter: a burst of events wakes it once.
            EventKind::Federation => self.relationships.notify_one(),
            EventKind::Authority => self.journal.notify_one(),
        }
        Ok(())
    }
}
