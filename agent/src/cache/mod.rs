//! The agent's cache: the entries the server says this agent may use, the trust bundle, and the
//! workload SVIDs signed so far, with their renewal times.
//!
//! Keys are generated here, on the node, and never leave it. An SVID is signed the first time a
//! workload that matches its entry asks (through the [`Signer`], which batches CSRs), and from then
//! on renewed at half its lifetime minus a random jitter of up to a tenth of it, so a fleet does not
//! renew at one instant, and so the new SVID is delivered well before the old one expires.
//!
//! Every change bumps a counter on a watch channel: Workload API streams resend on it.

mod persist;
mod rotation;
mod signer;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use ring::rand::{SecureRandom, SystemRandom};
use sigil_core::bundle::TrustBundle;
use sigil_core::clock::SharedClock;
use sigil_core::entry::{Entry, EntryInput};
use sigil_core::id::TrustDomain;
use sigil_core::resume::{
    EntryDigests, bundle_digest, entry_bucket, federated_digest, tainted_digest,
};
use sigil_core::secret::PrivateKey;
use sigil_core::selector::{Selector, all_present};
use sigil_proto::agent::{SyncResponse, SyncResume};
use sigil_proto::common;
use tokio::sync::watch;

use crate::metrics::Metrics;
use sigil_core::sync::RwLockExt;

pub use persist::{CACHE_FILE, CacheStore, keep_cache_on_disk};
pub use rotation::keep_svids_fresh;
pub use signer::{Signer, SignerSettings};

/// A workload SVID held by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedSvid {
    /// The entry it was signed for.
    pub entry_id: String,
    /// The entry's revision when it was signed; a newer revision means sign again.
    pub entry_revision: u64,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key (redacted in `Debug`, zeroed when dropped).
    pub key: PrivateKey,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds at which the rotation task renews it.
    pub renew_at: i64,
    /// The signing CA's subject key identifier (hex): renewed at once if that CA is tainted.
    pub authority_id: String,
}

/// A cached JWT-SVID.
#[derive(Debug, Clone)]
struct CachedJwt {
    token: String,
    issued_at: i64,
    expires_at: i64,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Arc<Entry>>,
    bundle: Option<Arc<TrustBundle>>,
    /// Foreign trust domains' bundles (federation), by trust domain name.
    federated: BTreeMap<String, Arc<TrustBundle>>,
    svids: HashMap<String, Arc<CachedSvid>>,
    jwts: HashMap<(String, Vec<String>), CachedJwt>,
    /// Tainted authority ids from the server: what they signed is renewed at once.
    tainted: BTreeSet<String>,
    synced: bool,
}

/// What the agent knows and holds.
#[derive(Debug)]
pub struct Cache {
    trust_domain: TrustDomain,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    state: RwLock<State>,
    changes: watch::Sender<u64>,
}

/// Seconds an SVID must have left to be handed out. The clock is read in whole seconds, so an
/// SVID served in its last second could reach the workload already expired (seen when every
/// server was down past a 20 s SVID's life); one with at most this left is treated as gone.
pub const USABLE_MARGIN: i64 = 1;

/// When an SVID valid from `not_before` to `not_after` should be renewed: at half its life, less
/// a random jitter of up to a tenth of it.
pub fn renewal_time(not_before: i64, not_after: i64) -> i64 {
    let lifetime = (not_after - not_before).max(0);
    let mut random = [0u8; 4];
    let jitter = if SystemRandom::new().fill(&mut random).is_ok() {
        i64::from(u32::from_le_bytes(random)) % (lifetime / 10 + 1)
    } else {
        0
    };
    not_before + lifetime / 2 - jitter
}

impl Cache {
    /// An empty cache.
    pub fn new(
        trust_domain: TrustDomain,
        clock: SharedClock,
        metrics: Arc<Metrics>,
        bundle: Option<TrustBundle>,
    ) -> Self {
        let state = State {
            bundle: bundle.map(Arc::new),
            ..State::default()
        };
        Cache {
            trust_domain,
            clock,
            metrics,
            state: RwLock::new(state),
            changes: watch::channel(0).0,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read_unpoisoned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write_unpoisoned()
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Sets the SVID gauges from what `state` holds.
    fn count_svids(&self, state: &State) {
        self.metrics
            .svids_cached
            .set(i64::try_from(state.svids.len()).unwrap_or(i64::MAX));
        let earliest = state.svids.values().map(|svid| svid.not_after).min();
        self.metrics.svid_earliest_expiry.set(earliest.unwrap_or(0));
    }

    /// A receiver that changes whenever the cache does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The clock the cache decides expiry with.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Applies one message of the server's sync stream. Returns the bundle when it changed.
    pub fn apply_sync(&self, message: &SyncResponse) -> Option<Arc<TrustBundle>> {
        let now = self.clock.unix_now();
        let mut state = self.write();
        if message.full_snapshot {
            state.entries.clear();
            state.synced = true;
        } else if message.resumed {
            // The server found these buckets differ from what the agent holds; the entries it sent
            // are all the buckets now hold.
            let replaced: HashSet<usize> = message
                .replaced_buckets
                .iter()
                .filter_map(|bucket| usize::try_from(*bucket).ok())
                .collect();
            state
                .entries
                .retain(|id, _| !replaced.contains(&entry_bucket(id)));
            state.synced = true;
        }
        for entry in &message.entries {
            match entry_from_proto(entry, &self.trust_domain, now) {
                Ok(entry) => {
                    state.entries.insert(entry.id.clone(), Arc::new(entry));
                }
                Err(e) => {
                    tracing::warn!(entry = %entry.id, error = %e, "ignoring an entry the server sent")
                }
            }
        }
        for id in &message.removed_entry_ids {
            state.entries.remove(id);
        }
        // Drop what no longer has an entry, and JWTs of entries that changed.
        let State {
            entries,
            svids,
            jwts,
            ..
        } = &mut *state;
        svids.retain(|id, _| entries.contains_key(id));
        let sent: HashSet<&str> = message.entries.iter().map(|e| e.id.as_str()).collect();
        jwts.retain(|(id, _), _| entries.contains_key(id) && !sent.contains(id.as_str()));
        let mut new_bundle = None;
        if let Some(bundle) = &message.bundle {
            match TrustBundle::try_from(bundle) {
                Ok(bundle) if bundle.trust_domain == self.trust_domain => {
                    let bundle = Arc::new(bundle);
                    state.bundle = Some(bundle.clone());
                    new_bundle = Some(bundle);
                }
                Ok(bundle) => {
                    tracing::warn!(trust_domain = %bundle.trust_domain, "ignoring a bundle of another trust domain")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an unreadable bundle from the server")
                }
            }
        }
        if message.tainted_set {
            let tainted: BTreeSet<String> = message.tainted_authority_ids.iter().cloned().collect();
            if tainted != state.tainted {
                if !tainted.is_empty() {
                    tracing::warn!(authorities = ?tainted, "the server tainted authorities; renewing what they signed now");
                }
                // A JWT-SVID does not say its key's fate cheaply: fetch all of them again.
                state.jwts.clear();
                state.tainted = tainted;
            }
        }
        if message.federated_bundles_set {
            state.federated.clear();
            for bundle in &message.federated_bundles {
                match TrustBundle::try_from(bundle) {
                    // Never let a foreign bundle stand in for the own one.
                    Ok(bundle) if bundle.trust_domain == self.trust_domain => {
                        tracing::warn!(
                            "ignoring a federated bundle for the agent's own trust domain"
                        )
                    }
                    Ok(bundle) => {
                        state
                            .federated
                            .insert(bundle.trust_domain.to_string(), Arc::new(bundle));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring an unreadable federated bundle from the server")
                    }
                }
            }
        }
        self.count_svids(&state);
        self.metrics
            .entries
            .set(i64::try_from(state.entries.len()).unwrap_or(i64::MAX));
        drop(state);
        self.bump();
        new_bundle
    }

    /// What the cache holds, as digests for the next `Sync` call, so the server sends only what
    /// differs; `None` before any snapshot (from a server or from disk): then a whole one.
    pub fn resume(&self) -> Option<SyncResume> {
        let state = self.read();
        if !state.synced {
            return None;
        }
        let entries = EntryDigests::of(
            state
                .entries
                .values()
                .map(|entry| (entry.id.as_str(), entry.revision)),
        );
        Some(SyncResume {
            entry_buckets: entries.buckets().to_vec(),
            bundle_digest: bundle_digest(state.bundle.as_deref()),
            federated_digest: federated_digest(state.federated.values().map(AsRef::as_ref)),
            tainted_digest: tainted_digest(state.tainted.iter().map(String::as_str)),
        })
    }

    /// Whether the first full snapshot has arrived.
    pub fn is_synced(&self) -> bool {
        self.read().synced
    }

    /// Waits (at most `limit`) for the first full snapshot, so a workload that asks right after the
    /// agent started is not told it has no identity just because the entries are still on their
    /// way. Returns whether the snapshot arrived.
    pub async fn wait_synced(&self, limit: std::time::Duration) -> bool {
        let mut changes = self.subscribe();
        let wait = async {
            while !self.is_synced() {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
        self.is_synced()
    }

    /// The own trust bundle.
    pub fn bundle(&self) -> Option<Arc<TrustBundle>> {
        self.read().bundle.clone()
    }

    /// The bundles of the foreign trust domains `entries` federate with (those the server has),
    /// by trust domain name.
    pub fn federated_bundles(&self, entries: &[Arc<Entry>]) -> Vec<Arc<TrustBundle>> {
        let wanted: BTreeSet<String> = entries
            .iter()
            .flat_map(|entry| entry.federates_with.iter().map(ToString::to_string))
            .collect();
        let state = self.read();
        wanted
            .iter()
            .filter_map(|td| state.federated.get(td).cloned())
            .collect()
    }

    /// The unexpired entries whose selectors are all among `selectors`, ordered by id.
    pub fn matching(&self, selectors: &[Selector]) -> Vec<Arc<Entry>> {
        let now = self.clock.unix_now();
        let mut found: Vec<Arc<Entry>> = self
            .read()
            .entries
            .values()
            .filter(|entry| !entry.is_expired(now) && all_present(&entry.selectors, selectors))
            .cloned()
            .collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found
    }

    /// How many entries the agent holds.
    pub fn entry_count(&self) -> usize {
        self.read().entries.len()
    }

    /// The entry with this id, if the agent still has it.
    pub fn entry(&self, id: &str) -> Option<Arc<Entry>> {
        self.read().entries.get(id).cloned()
    }

    /// The SVID of `entry` if it is still valid (see [`USABLE_MARGIN`]) and was signed for the
    /// entry as it is now.
    pub fn current_svid(&self, entry: &Entry) -> Option<Arc<CachedSvid>> {
        let now = self.clock.unix_now();
        self.read()
            .svids
            .get(&entry.id)
            .filter(|svid| {
                svid.not_after > now + USABLE_MARGIN && svid.entry_revision == entry.revision
            })
            .cloned()
    }

    /// The SVID of `entry_id`, whatever its state (for keeping an old one while renewal fails).
    pub fn any_svid(&self, entry_id: &str) -> Option<Arc<CachedSvid>> {
        let now = self.clock.unix_now();
        self.read()
            .svids
            .get(entry_id)
            .filter(|svid| svid.not_after > now + USABLE_MARGIN)
            .cloned()
    }

    /// Stores a freshly signed SVID (unless its entry is gone meanwhile) and tells every stream.
    pub fn store_svid(&self, svid: CachedSvid) {
        let mut state = self.write();
        if !state.entries.contains_key(&svid.entry_id) {
            return;
        }
        state.svids.insert(svid.entry_id.clone(), Arc::new(svid));
        self.count_svids(&state);
        drop(state);
        self.bump();
    }

    /// Entry ids whose SVIDs are due for renewal at `now`, and the earliest renewal time of the
    /// rest.
    pub fn renewals(&self, now: i64) -> (Vec<String>, Option<i64>) {
        let state = self.read();
        let mut due = Vec::new();
        let mut next: Option<i64> = None;
        // NotBefore is back-dated; a tainted SVID renewed less than a second ago (a server that
        // still signs with that CA) waits rather than spin.
        let backdate = i64::try_from(sigil_core::x509::BACKDATE.as_secs()).unwrap_or(0);
        for svid in state.svids.values() {
            let renew_at = if state.tainted.contains(&svid.authority_id) {
                svid.renew_at.min(svid.not_before + backdate + 1)
            } else {
                svid.renew_at
            };
            if renew_at <= now {
                due.push(svid.entry_id.clone());
            } else {
                next = Some(next.map_or(renew_at, |n| n.min(renew_at)));
            }
        }
        (due, next)
    }

    /// Whether the authority with this id (a CA's subject key identifier) is tainted.
    pub fn is_tainted(&self, authority_id: &str) -> bool {
        self.read().tainted.contains(authority_id)
    }

    /// A cached JWT-SVID for `entry_id` and `audience` that has more than half its life left.
    pub fn jwt(&self, entry_id: &str, audience: &[String]) -> Option<String> {
        let now = self.clock.unix_now();
        let key = (entry_id.to_string(), sorted(audience));
        self.read()
            .jwts
            .get(&key)
            .filter(|jwt| jwt.expires_at - now > (jwt.expires_at - jwt.issued_at) / 2)
            .map(|jwt| jwt.token.clone())
    }

    /// Keeps a JWT-SVID for reuse.
    pub fn store_jwt(&self, entry_id: &str, audience: &[String], token: String, expires_at: i64) {
        let issued_at = self.clock.unix_now();
        let mut state = self.write();
        let now = issued_at;
        state.jwts.retain(|_, jwt| jwt.expires_at > now);
        state.jwts.insert(
            (entry_id.to_string(), sorted(audience)),
            CachedJwt {
                token,
                issued_at,
                expires_at,
            },
        );
    }
}

fn sorted(audience: &[String]) -> Vec<String> {
    let mut audience = audience.to_vec();
    audience.sort();
    audience.dedup();
    audience
}

/// Checks an entry from the server with the same rules the server applied when it was written.
fn entry_from_proto(
    entry: &common::Entry,
    trust_domain: &TrustDomain,
    now: i64,
) -> sigil_core::Result<Entry> {
    let input = EntryInput {
        spiffe_id: entry.spiffe_id.clone(),
        parent_id: entry.parent_id.clone(),
        selectors: entry
            .selectors
            .iter()
            .cloned()
            .map(Selector::from)
            .collect(),
        x509_svid_ttl: entry.x509_svid_ttl,
        jwt_svid_ttl: entry.jwt_svid_ttl,
        dns_names: entry.dns_names.clone(),
        federates_with: entry.federates_with.clone(),
        admin: entry.admin,
        downstream: entry.downstream,
        hint: entry.hint.clone(),
        // Expiry is applied when matching; the entry may legitimately be close to it.
        expires_at: 0,
    };
    let mut checked = input.validate(trust_domain, entry.id.clone(), now)?;
    checked.expires_at = entry.expires_at;
    checked.created_at = entry.created_at;
    checked.revision = entry.revision;
    Ok(checked)
}

#[cfg(test)]
mod tests;
