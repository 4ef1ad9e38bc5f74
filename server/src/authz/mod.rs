//! The authorized-identity cache: which agent may obtain which SPIFFE IDs.
//!
//! The datastore is the source of truth; this cache mirrors the entries and agents it holds and
//! follows the change feed, so no signing request waits on the database. An agent may obtain the
//! entries parented to its own ID, and those parented to a node alias whose selectors its node
//! selectors include. A node alias is an entry parented to the server's own ID.
//!
//! Every change bumps a revision on a watch channel; sync streams wake on it and send each agent
//! the difference between what it holds and what it may now use.

pub mod reserved;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use sigil_core::bundle::TrustBundle;
use sigil_core::clock::SharedClock;
use sigil_core::entry::Entry;
use sigil_core::id::{TrustDomain, parse_trust_domain, server_id};
use sigil_core::selector::{Selector, all_present};
use sigil_core::untrusted::untrusted;
use tokio::sync::{Mutex, watch};

use crate::attest::agent_node_name;
use crate::datastore::{AgentRecord, DataStore, EntryFilter, EventKind};
use crate::k8s::{AUTO_ENTRY_PREFIX, PodIdentities};
use crate::{Error, Result};

/// How many change events are read per datastore round trip.
const EVENT_PAGE: u32 = 1000;

/// Events at most this far behind the newest one seen are re-read on every catch-up: on Postgres a
/// transaction that took a lower id can commit after a higher id was already read, and re-reading
/// the recent past is how such a late event is still applied. Applying an event twice is harmless
/// (it reloads the row).
const LATE_EVENT_WINDOW: u64 = 256;

#[derive(Debug, Clone)]
struct AgentState {
    selectors: Vec<Selector>,
    banned: bool,
    /// The serials of the agent's current SVID and of the one before its last renewal: the only
    /// agent certificates the agent API accepts for this agent.
    serials: [String; 2],
}

impl AgentState {
    fn from_record(agent: AgentRecord) -> Self {
        AgentState {
            selectors: agent.selectors,
            banned: agent.banned,
            serials: [agent.svid_serial, agent.previous_svid_serial],
        }
    }

    fn holds(&self, serial: &str) -> bool {
        !serial.is_empty() && self.serials.iter().any(|s| s == serial)
    }
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Arc<Entry>>,
    /// Entry ids by parent ID.
    children: HashMap<String, BTreeSet<String>>,
    /// Node-alias entry ids by the alias's SPIFFE ID.
    aliases: HashMap<String, BTreeSet<String>>,
    agents: HashMap<String, AgentState>,
    bundle: Option<Arc<TrustBundle>>,
    /// Bundles of foreign trust domains (federation), by trust domain name.
    federated: BTreeMap<String, Arc<TrustBundle>>,
}

/// Where the cache stands in the change feed.
#[derive(Debug, Default)]
struct FeedPosition {
    newest: u64,
    /// Ids already applied within the late-event window.
    recent: BTreeSet<u64>,
}

/// The in-memory view of who may obtain what.
#[derive(Debug)]
pub struct Authorizations {
    trust_domain: TrustDomain,
    server_id: String,
    clock: SharedClock,
    state: RwLock<State>,
    position: Mutex<FeedPosition>,
    /// Counts changes; sync streams wake on it.
    revision: watch::Sender<u64>,
    /// Automatic Kubernetes identities, when enabled.
    pods: Option<Arc<PodIdentities>>,
    /// When a caller last made the cache catch up on a miss ([`Authorizations::catch_up_on_miss`]).
    last_miss_catch_up: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How often a cache miss may make the cache read the change feed at most: refused certificates
/// cost any caller nothing, so they must not cost the datastore a query each.
const MISS_CATCH_UP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

impl Authorizations {
    /// Loads every entry and agent and the own bundle from `datastore`.
    pub async fn load<D: DataStore>(
        trust_domain: TrustDomain,
        clock: SharedClock,
        datastore: &D,
    ) -> Result<Self> {
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
        let mut state = State::default();
        let server_id = server_id(&trust_domain).to_string();
        for entry in datastore.list_entries(&EntryFilter::default()).await? {
            state.insert_entry(&server_id, Arc::new(entry));
        }
        for agent in datastore.list_agents().await? {
            state
                .agents
                .insert(agent.spiffe_id.clone(), AgentState::from_record(agent));
        }
        for bundle in datastore.list_bundles().await? {
            if bundle.trust_domain == trust_domain {
                state.bundle = Some(Arc::new(bundle));
            } else {
                state
                    .federated
                    .insert(bundle.trust_domain.to_string(), Arc::new(bundle));
            }
        }
        let (revision, _) = watch::channel(newest);
        Ok(Authorizations {
            trust_domain,
            server_id,
            clock,
            state: RwLock::new(state),
            position: Mutex::new(FeedPosition { newest, recent }),
            revision,
            pods: None,
            last_miss_catch_up: std::sync::Mutex::new(None),
        })
    }

    /// Adds automatic Kubernetes identities to what agents may obtain.
    pub fn with_pod_identities(mut self, pods: Arc<PodIdentities>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// Wakes every sync stream to recompute what its agent may use (after a change outside the
    /// datastore, such as pod churn).
    pub fn bump(&self) {
        self.revision.send_modify(|r| *r += 1);
    }

    /// Applies every change-feed event not yet applied. Called after the server's own writes (so
    /// they are visible at once) and periodically (to see other servers' writes).
    pub async fn catch_up<D: DataStore>(&self, datastore: &D) -> Result<()> {
        let mut position = self.position.lock().await;
        let mut applied_any = false;
        let mut after = position.newest.saturating_sub(LATE_EVENT_WINDOW);
        loop {
            let events = datastore.events_after(after, EVENT_PAGE).await?;
            let Some(last) = events.last() else { break };
            after = last.id;
            let page_len = events.len();
            for event in events {
                if event.id <= position.newest.saturating_sub(LATE_EVENT_WINDOW)
                    || position.recent.contains(&event.id)
                {
                    continue;
                }
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

    /// Like [`Authorizations::catch_up`], for a request the cache refused that a write not yet
    /// applied (another server's renewal, say) might allow: at most once per
    /// `MISS_CATCH_UP_INTERVAL`; returns whether it caught up.
    pub async fn catch_up_on_miss<D: DataStore>(&self, datastore: &D) -> Result<bool> {
        {
            let mut last = self
                .last_miss_catch_up
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < MISS_CATCH_UP_INTERVAL) {
                return Ok(false);
            }
            *last = Some(std::time::Instant::now());
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
            EventKind::Entry => {
                let entry = datastore.get_entry(subject).await?;
                let mut state = self.write();
                state.remove_entry(subject);
                if let Some(entry) = entry {
                    state.insert_entry(&self.server_id, Arc::new(entry));
                }
            }
            EventKind::Agent => {
                let agent = datastore.get_agent(subject).await?;
                let mut state = self.write();
                match agent {
                    Some(agent) => {
                        state
                            .agents
                            .insert(agent.spiffe_id.clone(), AgentState::from_record(agent));
                    }
                    None => {
                        state.agents.remove(subject);
                    }
                }
            }
            EventKind::Bundle if subject == self.trust_domain.as_str() => {
                let bundle = datastore.get_bundle(&self.trust_domain).await?;
                self.write().bundle = bundle.map(Arc::new);
            }
            EventKind::Bundle => {
                let trust_domain = parse_trust_domain("trust_domain", subject).map_err(|e| {
                    Error::Datastore(format!("a bundle event names {subject}: {e}"))
                })?;
                let bundle = datastore.get_bundle(&trust_domain).await?;
                let mut state = self.write();
                match bundle {
                    Some(bundle) => state
                        .federated
                        .insert(subject.to_string(), Arc::new(bundle)),
                    None => state.federated.remove(subject),
                };
            }
            // Relationships concern the refresher, not who may obtain what.
            EventKind::Federation => {}
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than stopping service would, so a poisoned lock is used as is.
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receiver that changes whenever the cache does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// The own trust bundle as last seen in the datastore.
    pub fn bundle(&self) -> Option<Arc<TrustBundle>> {
        self.read().bundle.clone()
    }

    /// The bundles of foreign trust domains, by trust domain name.
    pub fn federated_bundles(&self) -> Vec<Arc<TrustBundle>> {
        self.read().federated.values().cloned().collect()
    }

    /// Whether an agent may call the server: it must be attested and not banned.
    pub fn check_agent(&self, agent_id: &str) -> Result<()> {
        match self.read().agents.get(agent_id) {
            Some(agent) if agent.banned => Err(Error::PermissionDenied(format!(
                "agent {agent_id} is banned; an operator must evict it before it can attest again"
            ))),
            Some(_) => Ok(()),
            None => Err(Error::PermissionDenied(format!(
                "agent {agent_id} is not attested (it was evicted or never attested); attest the node again"
            ))),
        }
    }

    /// Like [`Authorizations::check_agent`], and the client certificate with `serial` must be the
    /// agent's current SVID or the one it renewed last: a certificate stolen from an earlier
    /// generation, minted outside the renewal path, or held from before an eviction is refused.
    pub fn check_agent_serial(&self, agent_id: &str, serial: &str) -> Result<()> {
        self.check_agent(agent_id)?;
        match self.read().agents.get(agent_id) {
            Some(agent) if agent.holds(serial) => Ok(()),
            _ => Err(Error::PermissionDenied(format!(
                "the client certificate (serial {}) is not the current SVID of agent {agent_id}: it was replaced by renewal or by a new attestation; restart the agent to attest again",
                untrusted(serial)
            ))),
        }
    }

    /// Every unexpired entry `agent_id` may use, ordered by id.
    pub fn entries_for_agent(&self, agent_id: &str) -> Vec<Arc<Entry>> {
        let state = self.read();
        let now = self.clock.unix_now();
        let Some(agent) = state.agents.get(agent_id) else {
            return Vec::new();
        };
        let mut parents: HashSet<&str> = HashSet::from([agent_id]);
        for (alias_id, alias_entries) in &state.aliases {
            if alias_entries.iter().any(|id| {
                state.entries.get(id).is_some_and(|alias| {
                    !alias.is_expired(now) && all_present(&alias.selectors, &agent.selectors)
                })
            }) {
                parents.insert(alias_id.as_str());
            }
        }
        let mut found: Vec<Arc<Entry>> = parents
            .iter()
            .filter_map(|parent| state.children.get(*parent))
            .flatten()
            .filter_map(|id| state.entries.get(id))
            .filter(|entry| !entry.is_expired(now))
            .cloned()
            .collect();
        if let (Some(pods), Some(node)) = (&self.pods, agent_node_name(&agent.selectors))
            && let Ok(id) = sigil_core::id::parse_spiffe_id("agent_id", agent_id)
        {
            match pods.entries_for(&id, node) {
                Ok(auto) => found.extend(auto.into_iter().map(Arc::new)),
                Err(e) => {
                    tracing::warn!(agent = agent_id, error = %e, "leaving out automatic identities")
                }
            }
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found
    }

    /// The entry `entry_id` if `agent_id` may obtain it; otherwise why not.
    pub fn authorize(&self, agent_id: &str, entry_id: &str) -> Result<Arc<Entry>> {
        self.check_agent(agent_id)?;
        let state = self.read();
        let now = self.clock.unix_now();
        let denied = || {
            Error::PermissionDenied(format!(
                "agent {agent_id} is not authorized for entry `{}` (no such entry under this agent or its node aliases)",
                untrusted(entry_id)
            ))
        };
        if entry_id.starts_with(AUTO_ENTRY_PREFIX)
            && let Some(pods) = &self.pods
        {
            let node = state
                .agents
                .get(agent_id)
                .and_then(|agent| agent_node_name(&agent.selectors))
                .ok_or_else(denied)?;
            let id = sigil_core::id::parse_spiffe_id("agent_id", agent_id)?;
            return pods.authorize(&id, node, entry_id).map(Arc::new);
        }
        let entry = state
            .entries
            .get(entry_id)
            .filter(|e| !e.is_expired(now))
            .ok_or_else(denied)?;
        let parent = entry.parent_id.to_string();
        if parent == agent_id {
            return Ok(entry.clone());
        }
        let agent = state.agents.get(agent_id).ok_or_else(denied)?;
        let via_alias = state.aliases.get(&parent).is_some_and(|alias_entries| {
            alias_entries.iter().any(|id| {
                state.entries.get(id).is_some_and(|alias| {
                    !alias.is_expired(now) && all_present(&alias.selectors, &agent.selectors)
                })
            })
        });
        if via_alias {
            Ok(entry.clone())
        } else {
            Err(denied())
        }
    }

    /// The trust domain the cache serves.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
}

impl State {
    fn insert_entry(&mut self, server_id: &str, entry: Arc<Entry>) {
        let parent = entry.parent_id.to_string();
        if parent == server_id {
            self.aliases
                .entry(entry.spiffe_id.to_string())
                .or_default()
                .insert(entry.id.clone());
        }
        self.children
            .entry(parent)
            .or_default()
            .insert(entry.id.clone());
        self.entries.insert(entry.id.clone(), entry);
    }

    fn remove_entry(&mut self, id: &str) {
        let Some(entry) = self.entries.remove(id) else {
            return;
        };
        let parent = entry.parent_id.to_string();
        if let Some(children) = self.children.get_mut(&parent) {
            children.remove(id);
            if children.is_empty() {
                self.children.remove(&parent);
            }
        }
        let alias = entry.spiffe_id.to_string();
        if let Some(aliases) = self.aliases.get_mut(&alias) {
            aliases.remove(id);
            if aliases.is_empty() {
                self.aliases.remove(&alias);
            }
        }
    }
}

#[cfg(test)]
mod tests;
