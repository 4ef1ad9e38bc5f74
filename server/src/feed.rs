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
//! Every applied change to entries or bundles bumps a revision; sync streams wake on it and send
//! each agent the difference between what it holds and what it may now use. A change to an agent
//! record wakes only that agent's streams ([`Feed::watch_agent`]): with 10 000 agents attesting
//! after a restart, waking every stream for every other agent's attestation made the storm cost
//! the square of the fleet. Changes to the CA journal and to
//! federation relationships concern no mirror: they wake the CA's maintenance (which rebuilds the
//! own bundle and the tainted set from every server's authorities) and the federation refresher.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil_core::sync::MutexExt;
use tokio::sync::futures::Notified;
use tokio::sync::{Mutex, Notify, watch};

use crate::Result;
use crate::authz::{Authorizations, AuthzSources};
use crate::bundles::TrustBundles;
use sigil_core::entry::Entry;

use crate::datastore::{DataStore, Event, EventKind, MAX_EVENT_IDS};

/// How many change events are read per datastore round trip.
const EVENT_PAGE: u32 = 1000;

/// How far behind the newest event a server that starts looks for ids not committed yet (ids
/// missing there become gaps, below).
const START_WINDOW: u64 = 256;

/// How long the feed keeps looking for an event id it skipped over. On Postgres a transaction
/// takes its ids when it inserts and becomes visible when it commits, so four servers writing
/// batches of 1 000 entries at once commit their ids out of order; a reader that has seen a
/// higher id must look again for the lower ones. An id still missing after this long belonged to
/// a transaction that rolled back (ids are never reused) and is given up.
const GAP_PATIENCE: Duration = Duration::from_secs(60);

/// The most skipped ids looked for at once (the oldest are given up first).
const MAX_GAPS: usize = 100_000;

/// How often a cache miss may make the feed be read at most: refused certificates cost any caller
/// nothing, so they must not cost the datastore a query each.
const MISS_CATCH_UP_INTERVAL: Duration = Duration::from_millis(200);

/// Where the mirrors stand in the change feed.
#[derive(Debug, Default)]
struct Position {
    /// The newest event id read.
    newest: u64,
    /// Ids below `newest` not read yet, and since when they are missing (see [`GAP_PATIENCE`]).
    gaps: BTreeMap<u64, Instant>,
}

impl Position {
    /// Records as gaps the ids between `newest` and `next` (a page's next event) and moves past it.
    fn skip_to(&mut self, next: u64, now: Instant) {
        let first_missing = (self.newest + 1).max(next.saturating_sub(MAX_GAPS as u64));
        for id in first_missing..next {
            self.gaps.insert(id, now);
        }
        self.newest = self.newest.max(next);
    }

    /// Gives up gaps older than [`GAP_PATIENCE`] and the oldest beyond [`MAX_GAPS`].
    fn expire_gaps(&mut self) {
        let before = self.gaps.len();
        self.gaps.retain(|_, since| since.elapsed() < GAP_PATIENCE);
        while self.gaps.len() > MAX_GAPS {
            self.gaps.pop_first();
        }
        if self.gaps.len() < before {
            tracing::debug!(
                given_up = before - self.gaps.len(),
                "change-feed ids never committed (rolled-back transactions) are no longer looked for"
            );
        }
    }
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
    /// Per agent with an open sync stream: signalled when its own record changed (banned,
    /// evicted, re-attested, renewed).
    agent_watches: std::sync::Mutex<HashMap<String, watch::Sender<()>>>,
}

impl Feed {
    /// Loads both mirrors from `datastore`.
    pub async fn load<D: DataStore>(sources: AuthzSources, datastore: &D) -> Result<Self> {
        // Read the feed position first: anything written after it is applied by the next catch-up.
        // Ids just below it that are missing may belong to transactions still open: gaps.
        let newest = datastore.latest_event_id().await?;
        let mut position = Position {
            newest: newest.saturating_sub(START_WINDOW),
            gaps: BTreeMap::new(),
        };
        let now = Instant::now();
        let window = u32::try_from(START_WINDOW).unwrap_or(u32::MAX);
        for event in datastore.events_after(position.newest, window).await? {
            if event.id <= newest {
                position.skip_to(event.id, now);
            }
        }
        position.skip_to(newest, now);
        let bundles = TrustBundles::load(sources.trust_domain.clone(), datastore).await?;
        let authz = Authorizations::load(sources, datastore).await?;
        Ok(Feed {
            authz: Arc::new(authz),
            bundles: Arc::new(bundles),
            position: Mutex::new(position),
            revision: watch::channel(newest).0,
            last_miss_catch_up: std::sync::Mutex::new(None),
            journal: Notify::new(),
            relationships: Notify::new(),
            agent_watches: std::sync::Mutex::default(),
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

    /// A receiver that changes whenever the entries or the bundles do (agent records: see
    /// [`Feed::watch_agent`]).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// A receiver that changes whenever the record of agent `agent_id` does; give it back with
    /// [`Feed::unwatch_agent`] once dropped.
    pub fn watch_agent(&self, agent_id: &str) -> watch::Receiver<()> {
        let mut watches = self.agent_watches.lock_unpoisoned();
        watches
            .entry(agent_id.to_string())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe()
    }

    /// Forgets the watch of `agent_id` once nobody holds a receiver of it.
    pub fn unwatch_agent(&self, agent_id: &str) {
        let mut watches = self.agent_watches.lock_unpoisoned();
        if watches
            .get(agent_id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            watches.remove(agent_id);
        }
    }

    fn agent_changed(&self, agent_id: &str) {
        if let Some(sender) = self.agent_watches.lock_unpoisoned().get(agent_id) {
            sender.send_replace(());
        }
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

    /// Applies every change-feed event not yet applied: the ids skipped over before that have
    /// committed since, then everything after the newest one read.
    pub async fn catch_up<D: DataStore>(&self, datastore: &D) -> Result<()> {
        let mut position = self.position.lock().await;
        let mut streams_concerned = false;
        position.expire_gaps();
        let gaps: Vec<u64> = position.gaps.keys().copied().collect();
        for ids in gaps.chunks(MAX_EVENT_IDS) {
            let found = datastore.events_with_ids(ids).await?;
            for event in &found {
                position.gaps.remove(&event.id);
            }
            streams_concerned |= self.apply_events(datastore, found).await?;
        }
        loop {
            let events = datastore.events_after(position.newest, EVENT_PAGE).await?;
            let page_len = events.len();
            let now = Instant::now();
            for event in &events {
                position.skip_to(event.id, now);
            }
            streams_concerned |= self.apply_events(datastore, events).await?;
            if page_len < EVENT_PAGE as usize {
                break;
            }
        }
        if streams_concerned {
            self.bump();
        }
        Ok(())
    }

    /// Applies `events` to the mirrors; whether any concerns sync streams (anything but an
    /// agent record, which wakes only that agent's streams).
    async fn apply_events<D: DataStore>(&self, datastore: &D, events: Vec<Event>) -> Result<bool> {
        // Entries changed among these are read in one query each 500, not one per event: a batch
        // of 1 000 writes is then two reads, not a thousand.
        let entry_ids: Vec<String> = events
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
        let mut streams_concerned = false;
        for event in events {
            self.apply(datastore, event.kind, &event.subject).await?;
            streams_concerned |= event.kind != EventKind::Agent;
        }
        Ok(streams_concerned)
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
                self.agent_changed(subject);
            }
            EventKind::Bundle => self.bundles.reload(datastore, subject).await?,
            // One stored permit per waiter: a burst of events wakes it once.
            EventKind::Federation => self.relationships.notify_one(),
            EventKind::Authority => self.journal.notify_one(),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_ids_become_gaps_and_a_huge_jump_keeps_only_the_newest_of_them() {
        let now = Instant::now();
        let mut position = Position::default();
        position.skip_to(1, now);
        position.skip_to(4, now);
        assert_eq!(position.newest, 4);
        assert_eq!(position.gaps.keys().copied().collect::<Vec<_>>(), [2, 3]);

        // An id far ahead (a sequence moved on by millions) records at most MAX_GAPS gaps.
        let far = 4 + 10 * MAX_GAPS as u64;
        position.skip_to(far, now);
        position.expire_gaps();
        assert_eq!(position.gaps.len(), MAX_GAPS);
        assert_eq!(position.gaps.keys().next_back(), Some(&(far - 1)));
        assert!(
            !position.gaps.contains_key(&2),
            "the oldest gaps went first"
        );
    }

    #[test]
    fn gaps_older_than_the_patience_are_given_up() {
        let mut position = Position::default();
        let long_ago = Instant::now()
            .checked_sub(GAP_PATIENCE + Duration::from_secs(1))
            .expect("a monotonic clock past the patience");
        position.skip_to(3, long_ago);
        position.skip_to(5, Instant::now());
        position.expire_gaps();
        assert_eq!(position.gaps.keys().copied().collect::<Vec<_>>(), [4]);
    }
}
