//! The `Sync` stream: what the agent may use (its entries, the trust bundle, federated bundles,
//! tainted authorities), first whole, then every difference, until the agent goes away or loses
//! its right to call.
//!
//! Two things keep it cheap at scale. Every update goes out in pages bounded by [`PAGE_BYTES`]
//! and [`PAGE_ENTRIES`] (encoded one page at a time, so a 100 000-entry snapshot never exists as
//! one message, here or on the wire; the agent applies the pages together). And an agent that
//! says what it holds ([`SyncResume`]) gets only the buckets of entries that differ and the
//! bundles whose digests differ, so a reconnect with nothing changed moves a few hundred bytes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prost::Message;
use sigil_core::bundle::TrustBundle;
use sigil_core::entry::Entry;
use sigil_core::resume::{
    EntryDigests, bundle_digest, entry_bucket, federated_digest, tainted_digest,
};
use sigil_core::sync::MutexExt;
use sigil_proto::agent::{SyncResponse, SyncResume};
use sigil_proto::common;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Status;

use super::super::ServerState;
use super::super::convert::entry_to_proto;
use super::CallerAgent;
use crate::datastore::DataStore;

/// The most encoded bytes of entries and removed ids in one page: a quarter of gRPC's default
/// 4 MiB message limit, so every client accepts it.
pub const PAGE_BYTES: usize = 1 << 20;

/// The most entries plus removed ids in one page.
pub const PAGE_ENTRIES: usize = 5_000;

/// Pages in flight to one agent: the stream encodes the next page only when the agent has taken
/// one, so a slow agent holds at most this many pages of the server's memory.
pub(super) const PAGES_IN_FLIGHT: usize = 2;

/// What a sync stream's channel carries: a page (or the error that ends the stream) and its share
/// of the server-wide page budget, given back when the page leaves the channel for the wire.
/// Boxed because the channel allocates its slots up front (32 of them, whatever its capacity):
/// unboxed they would take about 9 KiB of every connected agent's share of server memory.
pub(super) type Outgoing = Box<(Result<SyncResponse, Status>, Option<OwnedSemaphorePermit>)>;

/// The sending half of one sync stream: pages wait for room in the server-wide budget of encoded
/// page bytes (`agent_api.max_sync_page_mib`) before they are queued, so ten thousand agents
/// reconnecting at once, each owed a snapshot, hold at most that budget of encoded pages instead
/// of one snapshot each.
pub(super) struct Outbox {
    pub(super) sender: mpsc::Sender<Outgoing>,
    pub(super) budget: Arc<Semaphore>,
    /// The budget's size in bytes (a page larger than all of it waits for all of it).
    pub(super) budget_bytes: usize,
}

impl Outbox {
    /// Queues `page` once its bytes fit in the budget. False when the agent is gone.
    pub(super) async fn send(&self, page: SyncResponse) -> bool {
        let cost = page.encoded_len().clamp(1, self.budget_bytes);
        let permit = tokio::select! {
            permit = self.budget.clone().acquire_many_owned(u32::try_from(cost).unwrap_or(u32::MAX)) => permit.ok(),
            () = self.sender.closed() => return false,
        };
        self.sender.send(Box::new((Ok(page), permit))).await.is_ok()
    }

    /// Ends the stream with `status`.
    async fn fail(&self, status: Status) {
        let _ = self.sender.send(Box::new((Err(status), None))).await;
    }
}

/// One update to send: the first page's fields (flags, bundles, revision), then the entries to add
/// or replace and the ids to drop, which go out across as many pages as they need.
struct Update {
    header: SyncResponse,
    entries: Vec<Arc<Entry>>,
    removed: Vec<String>,
}

/// What the stream last told its agent.
#[derive(Default)]
struct Sent {
    entries: HashMap<String, u64>,
    bundle_sequence: Option<u64>,
    /// Every foreign bundle (compared whole: a bundle set by hand may keep its sequence).
    federated: Option<Vec<Arc<TrustBundle>>>,
    tainted: Option<Arc<Vec<String>>>,
}

/// Sends the agent its snapshot (or, with `resume`, what differs from what it holds), then every
/// difference, until the agent goes away or loses its right to call (evicted, banned, or the
/// certificate the stream was opened with is no longer its current or previous SVID).
pub(super) async fn stream_changes<D: DataStore>(
    state: &ServerState<D>,
    caller: &CallerAgent,
    resume: Option<SyncResume>,
    outbox: Outbox,
) {
    let agent_id = caller.id.as_str();
    let mut changes = state.feed.subscribe();
    let mut own_record = state.feed.watch_agent(agent_id);
    let mut stopping = state.stopping.clone();
    let mut sent = Sent::default();
    let mut resume = resume;
    let mut first = true;
    loop {
        let revision = *changes.borrow_and_update();
        own_record.borrow_and_update();
        if let Err(e) = state.authz.check_agent_serial(agent_id, &caller.serial) {
            outbox.fail(e.status()).await;
            return;
        }
        let entries = state.authz.entries_for_agent(agent_id);
        let mut update = Update {
            header: SyncResponse {
                revision,
                ..SyncResponse::default()
            },
            entries: Vec::new(),
            removed: Vec::new(),
        };
        // What the agent said it holds, when it is well formed (otherwise: a full snapshot).
        let mut held = None;
        if first {
            match resume.take().and_then(|resume| {
                EntryDigests::from_slice(&resume.entry_buckets).map(|digests| (resume, digests))
            }) {
                Some((resume, digests)) => {
                    resumed_entries(&mut update, &entries, &digests);
                    held = Some(resume);
                }
                None => {
                    update.header.full_snapshot = true;
                    update.entries.clone_from(&entries);
                }
            }
        } else {
            update.entries = entries
                .iter()
                .filter(|entry| sent.entries.get(&entry.id) != Some(&entry.revision))
                .cloned()
                .collect();
        }
        let current: HashMap<String, u64> = entries
            .iter()
            .map(|entry| (entry.id.clone(), entry.revision))
            .collect();
        if !first {
            update.removed = sent
                .entries
                .keys()
                .filter(|id| !current.contains_key(*id))
                .cloned()
                .collect();
            update.removed.sort();
        }
        add_changed_bundles(state, &mut update.header, &mut sent, held.as_ref());
        let header = &update.header;
        let changed = first
            || header.tainted_set
            || !update.entries.is_empty()
            || !update.removed.is_empty()
            || header.bundle.is_some()
            || header.federated_bundles_set;
        if changed && !send_paged(&outbox, update).await {
            return;
        }
        sent.entries = current;
        first = false;
        let server_stopping = tokio::select! {
            changed = changes.changed() => if changed.is_err() { return } else { false },
            changed = own_record.changed() => if changed.is_err() { return } else { false },
            () = outbox.sender.closed() => return,
            _ = stopping.wait_for(|stop| *stop) => true,
        };
        if server_stopping {
            outbox
                .fail(Status::unavailable("the server is stopping; reconnect"))
                .await;
            return;
        }
    }
}

/// The entries of a resumed stream's first update: every entry of each bucket whose digest differs
/// from the agent's, the agent dropping what it holds in those buckets.
fn resumed_entries(update: &mut Update, entries: &[Arc<Entry>], theirs: &EntryDigests) {
    let ours = EntryDigests::of(
        entries
            .iter()
            .map(|entry| (entry.id.as_str(), entry.revision)),
    );
    let replaced = ours.differing(theirs);
    let replaced_set: HashSet<usize> = replaced
        .iter()
        .filter_map(|bucket| usize::try_from(*bucket).ok())
        .collect();
    update.entries = entries
        .iter()
        .filter(|entry| replaced_set.contains(&entry_bucket(&entry.id)))
        .cloned()
        .collect();
    update.header.resumed = true;
    update.header.replaced_buckets = replaced;
}

/// Puts into `header` the own bundle, the federated set and the tainted ids where they differ
/// from what the agent last got, or, on a resumed stream's first update, from what it `held`.
fn add_changed_bundles<D: DataStore>(
    state: &ServerState<D>,
    header: &mut SyncResponse,
    sent: &mut Sent,
    held: Option<&SyncResume>,
) {
    let bundle = state.bundles.own().unwrap_or_else(|| state.ca.bundle());
    let bundle_held = held.is_some_and(|held| held.bundle_digest == bundle_digest(Some(&bundle)));
    if sent.bundle_sequence != Some(bundle.sequence) {
        sent.bundle_sequence = Some(bundle.sequence);
        if !bundle_held {
            header.bundle = Some(common::Bundle::from(bundle.as_ref()));
        }
    }
    let federated = state.bundles.federated();
    let federated_held = held.is_some_and(|held| {
        held.federated_digest == federated_digest(federated.iter().map(AsRef::as_ref))
    });
    if sent.federated.as_ref() != Some(&federated) {
        if !federated_held {
            header.federated_bundles_set = true;
            header.federated_bundles = federated
                .iter()
                .map(|bundle| common::Bundle::from(bundle.as_ref()))
                .collect();
        }
        sent.federated = Some(federated);
    }
    let tainted = state.ca.tainted();
    let tainted_held = held.is_some_and(|held| {
        held.tainted_digest == tainted_digest(tainted.iter().map(String::as_str))
    });
    if sent.tainted.as_ref() != Some(&tainted) {
        if !tainted_held {
            header.tainted_set = true;
            header.tainted_authority_ids = tainted.as_ref().clone();
        }
        sent.tainted = Some(tainted);
    }
}

/// Sends `update` as pages of at most [`PAGE_BYTES`] and [`PAGE_ENTRIES`], each encoded only once
/// the previous one is queued; every page but the last has `more` set. False when the agent is
/// gone.
async fn send_paged(outbox: &Outbox, update: Update) -> bool {
    let mut pager = Pager {
        outbox,
        revision: update.header.revision,
        page: update.header,
        bytes: 0,
        items: 0,
    };
    for entry in &update.entries {
        let entry = entry_to_proto(entry);
        if !pager.make_room(entry.encoded_len()).await {
            return false;
        }
        pager.page.entries.push(entry);
    }
    for id in update.removed {
        if !pager.make_room(id.len()).await {
            return false;
        }
        pager.page.removed_entry_ids.push(id);
    }
    outbox.send(pager.page).await
}

/// The page being filled by [`send_paged`].
struct Pager<'a> {
    outbox: &'a Outbox,
    revision: u64,
    page: SyncResponse,
    bytes: usize,
    items: usize,
}

impl Pager<'_> {
    /// Counts an item of `size` encoded bytes into the page, sending the page first (with
    /// `more` set) when the item would not fit. False when the agent is gone.
    async fn make_room(&mut self, size: usize) -> bool {
        let size = size + LENGTH_PREFIX;
        if self.items > 0 && (self.bytes + size > PAGE_BYTES || self.items >= PAGE_ENTRIES) {
            let mut full = std::mem::take(&mut self.page);
            full.more = true;
            self.page.revision = self.revision;
            if !self.outbox.send(full).await {
                return false;
            }
            self.bytes = 0;
            self.items = 0;
        }
        self.bytes += size;
        self.items += 1;
        true
    }
}

/// An upper bound on the tag and length bytes protobuf puts before one repeated item.
const LENGTH_PREFIX: usize = 6;

/// Counts open sync streams per agent, for the `agents_connected` gauge.
#[derive(Debug, Default)]
pub(super) struct StreamCounts(std::sync::Mutex<HashMap<String, usize>>);

impl StreamCounts {
    /// Returns true when this is the agent's first open stream.
    pub(super) fn open(&self, agent_id: &str) -> bool {
        let mut guard = self.0.lock_unpoisoned();
        let count = guard.entry(agent_id.to_string()).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// Returns true when this was the agent's last open stream.
    pub(super) fn close(&self, agent_id: &str) -> bool {
        let mut guard = self.0.lock_unpoisoned();
        match guard.get_mut(agent_id) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                guard.remove(agent_id);
                true
            }
            None => false,
        }
    }
}
