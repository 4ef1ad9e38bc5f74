//! The authorized-identity cache: which agent may obtain which SPIFFE IDs.
//!
//! The datastore is the source of truth; this cache mirrors the entries and agents it holds, so no
//! signing request waits on the database. [`crate::feed::Feed`] keeps it current from the change
//! feed. An agent may obtain the entries parented to its own ID, and those parented to a node
//! alias whose selectors its node selectors include. A node alias is an entry parented to the
//! server's own ID.

pub mod reserved;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use sigil_core::clock::SharedClock;
use sigil_core::entry::Entry;
use sigil_core::id::{TrustDomain, server_id};
use sigil_core::selector::{Selector, all_present};
use sigil_core::sync::RwLockExt;
use sigil_core::untrusted::untrusted;

use crate::attest::agent_node_name;
use crate::datastore::{AgentRecord, DataStore, EntryFilter};
use crate::k8s::{AUTO_ENTRY_PREFIX, PodIdentities};
use crate::{Error, Result};

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
    /// Node-alias entry ids by their first selector (selectors are sorted and never empty): an
    /// agent matches an alias entry only if it has that selector, so finding an agent's aliases
    /// looks up its own few selectors instead of scanning every alias entry. A join token per
    /// node under one alias makes one alias entry per node: scanning them all, for each of
    /// 10 000 agents, cost the square of the fleet.
    aliases_by_selector: HashMap<Selector, BTreeSet<String>>,
    /// Ids of entries with `admin = true`, by their SPIFFE ID: who may call the admin API over
    /// mTLS.
    admins: HashMap<String, BTreeSet<String>>,
    agents: HashMap<String, AgentState>,
}

/// The in-memory view of who may obtain what.
#[derive(Debug)]
pub struct Authorizations {
    trust_domain: TrustDomain,
    server_id: String,
    clock: SharedClock,
    state: RwLock<State>,
    /// Automatic Kubernetes identities, when enabled.
    pods: Option<Arc<PodIdentities>>,
}

/// What the authorization cache is built from besides the datastore.
#[derive(Clone)]
pub struct AuthzSources {
    /// The server's own trust domain.
    pub trust_domain: TrustDomain,
    /// Decides which entries have expired.
    pub clock: SharedClock,
    /// Automatic Kubernetes identities, when the pod watch is on.
    pub pods: Option<Arc<PodIdentities>>,
}

impl Authorizations {
    /// Loads every entry and agent from `datastore`.
    pub async fn load<D: DataStore>(sources: AuthzSources, datastore: &D) -> Result<Self> {
        let AuthzSources {
            trust_domain,
            clock,
            pods,
        } = sources;
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
        Ok(Authorizations {
            trust_domain,
            server_id,
            clock,
            state: RwLock::new(state),
            pods,
        })
    }

    /// Replaces the entry `id` with what the datastore now holds (`None`: it was deleted).
    pub fn apply_entry(&self, id: &str, stored: Option<Entry>) {
        let mut state = self.state.write_unpoisoned();
        state.remove_entry(id);
        if let Some(entry) = stored {
            state.insert_entry(&self.server_id, Arc::new(entry));
        }
    }

    /// Replaces the agent `spiffe_id` with what the datastore now holds (`None`: it was evicted).
    pub fn apply_agent(&self, spiffe_id: &str, stored: Option<AgentRecord>) {
        let mut state = self.state.write_unpoisoned();
        match stored {
            Some(agent) => {
                state
                    .agents
                    .insert(agent.spiffe_id.clone(), AgentState::from_record(agent));
            }
            None => {
                state.agents.remove(spiffe_id);
            }
        }
    }

    /// Whether a workload with this SPIFFE ID may call the admin API over mTLS: some unexpired
    /// entry for that ID has `admin = true` (SPIRE's rule: the flag is on the identity).
    pub fn is_admin(&self, spiffe_id: &str) -> bool {
        let state = self.state.read_unpoisoned();
        let now = self.clock.unix_now();
        state.admins.get(spiffe_id).is_some_and(|ids| {
            ids.iter()
                .filter_map(|id| state.entries.get(id))
                .any(|entry| !entry.is_expired(now))
        })
    }

    /// Whether an agent may call the server: it must be attested and not banned.
    pub fn check_agent(&self, agent_id: &str) -> Result<()> {
        match self.state.read_unpoisoned().agents.get(agent_id) {
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
        match self.state.read_unpoisoned().agents.get(agent_id) {
            Some(agent) if agent.holds(serial) => Ok(()),
            _ => Err(Error::PermissionDenied(format!(
                "the client certificate (serial {}) is not the current SVID of agent {agent_id}: it was replaced by renewal or by a new attestation; restart the agent to attest again",
                untrusted(serial)
            ))),
        }
    }

    /// Every unexpired entry `agent_id` may use, ordered by id.
    pub fn entries_for_agent(&self, agent_id: &str) -> Vec<Arc<Entry>> {
        let state = self.state.read_unpoisoned();
        let now = self.clock.unix_now();
        let Some(agent) = state.agents.get(agent_id) else {
            return Vec::new();
        };
        let mut parents: HashSet<String> = HashSet::from([agent_id.to_string()]);
        parents.extend(
            state
                .matching_aliases(agent, now)
                .map(|alias| alias.spiffe_id.to_string()),
        );
        let mut found: Vec<Arc<Entry>> = parents
            .iter()
            .filter_map(|parent| state.children.get(parent))
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
        let state = self.state.read_unpoisoned();
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
        let via_alias = state
            .matching_aliases(agent, now)
            .any(|alias| alias.spiffe_id.to_string() == parent);
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
    /// The unexpired node-alias entries whose selectors `agent` all has.
    fn matching_aliases<'a>(
        &'a self,
        agent: &'a AgentState,
        now: i64,
    ) -> impl Iterator<Item = &'a Arc<Entry>> + 'a {
        agent
            .selectors
            .iter()
            .filter_map(|selector| self.aliases_by_selector.get(selector))
            .flatten()
            .filter_map(|id| self.entries.get(id))
            .filter(move |alias| {
                !alias.is_expired(now) && all_present(&alias.selectors, &agent.selectors)
            })
    }

    fn insert_entry(&mut self, server_id: &str, entry: Arc<Entry>) {
        let parent = entry.parent_id.to_string();
        if parent == server_id
            && let Some(first) = entry.selectors.first()
        {
            self.aliases_by_selector
                .entry(first.clone())
                .or_default()
                .insert(entry.id.clone());
        }
        self.children
            .entry(parent)
            .or_default()
            .insert(entry.id.clone());
        if entry.admin {
            self.admins
                .entry(entry.spiffe_id.to_string())
                .or_default()
                .insert(entry.id.clone());
        }
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
        let spiffe_id = entry.spiffe_id.to_string();
        if let Some(ids) = self.admins.get_mut(&spiffe_id) {
            ids.remove(id);
            if ids.is_empty() {
                self.admins.remove(&spiffe_id);
            }
        }
        if let Some(first) = entry.selectors.first()
            && let Some(ids) = self.aliases_by_selector.get_mut(first)
        {
            ids.remove(id);
            if ids.is_empty() {
                self.aliases_by_selector.remove(first);
            }
        }
    }
}

#[cfg(test)]
mod tests;
