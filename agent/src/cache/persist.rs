//! The cache on disk, so an agent restarted while no server answers still serves its workloads:
//! the entries of the last sync (their selectors decide which workload gets which SVID), the
//! federated bundles and tainted authorities that came with them, and every X509-SVID with its
//! private key. JWT-SVIDs are not kept: they live minutes and the server signs them on demand.
//!
//! One file, [`CACHE_FILE`], in the agent's data directory (mode 0700), written as the agent's
//! own identity is (mode 0600, a synced temporary file renamed over the old one), so a crash
//! leaves the old cache or the new one. At start the agent loads it as if it were a first
//! snapshot; SVIDs that expired meanwhile are left out, and the server's first snapshot replaces
//! the rest as usual. `persist_svid_cache = false` keeps workload keys off the disk: the file is
//! deleted at start and never written.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use prost::Message;
use serde::{Deserialize, Serialize};
use sigil_core::entry::Entry;
use sigil_core::secret::PrivateKey;
use sigil_core::x509::certificate_facts;
use sigil_proto::agent::SyncResponse;
use sigil_proto::common;
use tokio::sync::watch;

use super::{Cache, CachedSvid};
use crate::node::IdentityStore;
use crate::{Error, Result};

/// The cache file's name in the data directory.
pub const CACHE_FILE: &str = "svid-cache.json";

/// The layout of [`CACHE_FILE`]; a file of another layout is ignored (and later replaced).
const FORMAT: u32 = 1;

/// How long a change waits before it is written, so a snapshot followed by a batch of SVIDs
/// makes one write, not dozens.
const WRITE_DELAY: Duration = Duration::from_millis(200);

/// What [`CACHE_FILE`] holds.
#[derive(Serialize, Deserialize)]
struct Stored {
    format: u32,
    /// The entries, federated bundles and tainted authorities as one full-snapshot
    /// `SyncResponse` (protobuf, base64): restored through the same checks as a server's.
    snapshot: String,
    svids: Vec<StoredSvid>,
}

/// One X509-SVID; validity and authority are read again from the certificate.
#[derive(Serialize, Deserialize)]
struct StoredSvid {
    entry_id: String,
    entry_revision: u64,
    /// DER certificates, leaf first, base64.
    chain: Vec<String>,
    /// PKCS#8 DER, base64.
    key: String,
    renew_at: i64,
}

/// The cache file in the agent's data directory.
#[derive(Debug, Clone)]
pub struct CacheStore {
    store: IdentityStore,
}

impl CacheStore {
    /// The cache file beside the identity in `store`.
    pub fn new(store: IdentityStore) -> Self {
        CacheStore { store }
    }

    /// Loads the stored cache into `cache` (which has not synced yet). Returns how many SVIDs it
    /// restored; `None` when there was no usable file (an unreadable one is logged and ignored:
    /// the server's next snapshot rebuilds everything).
    pub fn restore(&self, cache: &Cache) -> Result<Option<usize>> {
        let Some(bytes) = self.store.read_file(CACHE_FILE)? else {
            return Ok(None);
        };
        match cache.restore_stored(&bytes) {
            Ok(restored) => Ok(Some(restored)),
            Err(why) => {
                tracing::warn!(file = CACHE_FILE, reason = %why, "ignoring the stored SVID cache");
                Ok(None)
            }
        }
    }

    /// Writes what `cache` holds, once it has entries to write.
    pub fn save(&self, cache: &Cache) -> Result<()> {
        match cache.to_stored()? {
            Some(bytes) => self.store.write_file(CACHE_FILE, &bytes),
            None => Ok(()),
        }
    }

    /// Deletes the stored cache; returns whether there was one.
    pub fn remove(&self) -> Result<bool> {
        self.store.remove_file(CACHE_FILE)
    }
}

/// Writes the cache to disk after every change (coalesced over `WRITE_DELAY`, 200 ms) until `stopping`
/// turns true; a change pending then is still written.
pub async fn keep_cache_on_disk(
    cache: Arc<Cache>,
    store: CacheStore,
    mut stopping: watch::Receiver<bool>,
) {
    let mut changes = cache.subscribe();
    // A change made before this task subscribed is written too.
    changes.mark_changed();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(WRITE_DELAY) => {}
            _ = stopping.wait_for(|stop| *stop) => {}
        }
        changes.borrow_and_update();
        let (cache, store) = (cache.clone(), store.clone());
        // fsync blocks: keep it off the runtime's threads.
        match tokio::task::spawn_blocking(move || store.save(&cache)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot store the SVID cache"),
            Err(e) => tracing::warn!(error = %e, "storing the SVID cache failed"),
        }
    }
}

impl Cache {
    /// The cache as [`CACHE_FILE`] holds it, or `None` before the first snapshot (nothing the
    /// stored one should be replaced with).
    fn to_stored(&self) -> Result<Option<Vec<u8>>> {
        let state = self.read();
        if !state.synced {
            return Ok(None);
        }
        let snapshot = SyncResponse {
            full_snapshot: true,
            entries: state.entries.values().map(|e| entry_to_proto(e)).collect(),
            federated_bundles: state
                .federated
                .values()
                .map(|bundle| common::Bundle::from(&**bundle))
                .collect(),
            federated_bundles_set: true,
            tainted_authority_ids: state.tainted.iter().cloned().collect(),
            tainted_set: true,
            ..SyncResponse::default()
        };
        let svids = state
            .svids
            .values()
            .map(|svid| StoredSvid {
                entry_id: svid.entry_id.clone(),
                entry_revision: svid.entry_revision,
                chain: svid.chain.iter().map(|der| BASE64.encode(der)).collect(),
                key: BASE64.encode(svid.key.as_bytes()),
                renew_at: svid.renew_at,
            })
            .collect();
        drop(state);
        let stored = Stored {
            format: FORMAT,
            snapshot: BASE64.encode(snapshot.encode_to_vec()),
            svids,
        };
        serde_json::to_vec(&stored)
            .map(Some)
            .map_err(|e| Error::Startup(format!("cannot encode the SVID cache: {e}")))
    }

    /// Applies a stored cache: its snapshot as a first sync, then its unexpired SVIDs. Returns
    /// how many SVIDs it restored.
    fn restore_stored(&self, bytes: &[u8]) -> std::result::Result<usize, String> {
        let stored: Stored = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if stored.format != FORMAT {
            return Err(format!(
                "format {} (this agent writes {FORMAT})",
                stored.format
            ));
        }
        let snapshot = BASE64
            .decode(&stored.snapshot)
            .map_err(|e| e.to_string())
            .and_then(|bytes| SyncResponse::decode(bytes.as_slice()).map_err(|e| e.to_string()))
            .map_err(|e| format!("unreadable entries: {e}"))?;
        if !snapshot.full_snapshot {
            return Err("the entries are not a full snapshot".into());
        }
        self.apply_sync(&snapshot);
        let now = self.clock.unix_now();
        let mut restored = 0;
        for svid in stored.svids {
            match svid_from_stored(svid) {
                Ok(svid) if svid.not_after > now => {
                    self.store_svid(svid);
                    restored += 1;
                }
                Ok(_) => {}
                Err(why) => tracing::warn!(reason = %why, "ignoring a stored SVID"),
            }
        }
        Ok(restored)
    }
}

fn svid_from_stored(stored: StoredSvid) -> std::result::Result<CachedSvid, String> {
    let chain = stored
        .chain
        .iter()
        .map(|der| BASE64.decode(der))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("entry {}: unreadable chain: {e}", stored.entry_id))?;
    let leaf = chain
        .first()
        .ok_or_else(|| format!("entry {}: an empty chain", stored.entry_id))?;
    let facts = certificate_facts(leaf).map_err(|e| format!("entry {}: {e}", stored.entry_id))?;
    let key = BASE64
        .decode(&stored.key)
        .map_err(|e| format!("entry {}: unreadable key: {e}", stored.entry_id))?;
    Ok(CachedSvid {
        entry_id: stored.entry_id,
        entry_revision: stored.entry_revision,
        chain,
        key: PrivateKey::new(key),
        not_before: facts.not_before,
        not_after: facts.not_after,
        renew_at: stored.renew_at,
        authority_id: facts.authority_key_id,
    })
}

/// An entry as the server sent it, for the stored snapshot.
fn entry_to_proto(entry: &Entry) -> common::Entry {
    common::Entry {
        id: entry.id.clone(),
        spiffe_id: entry.spiffe_id.to_string(),
        parent_id: entry.parent_id.to_string(),
        selectors: entry.selectors.iter().map(common::Selector::from).collect(),
        x509_svid_ttl: entry.x509_svid_ttl,
        jwt_svid_ttl: entry.jwt_svid_ttl,
        dns_names: entry.dns_names.clone(),
        federates_with: entry
            .federates_with
            .iter()
            .map(ToString::to_string)
            .collect(),
        admin: entry.admin,
        downstream: entry.downstream,
        hint: entry.hint.clone(),
        expires_at: entry.expires_at,
        created_at: entry.created_at,
        revision: entry.revision,
    }
}

#[cfg(test)]
#[path = "persist_tests.rs"]
mod tests;
