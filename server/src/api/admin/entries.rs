//! Registration entries through the admin API: one at a time, in batches of up to
//! [`MAX_BATCH`] (each entry judged on its own, every valid one committed in one transaction), and
//! in pages of at most [`MAX_PAGE_SIZE`] with a count beside them, so that automation managing
//! 100 000 entries never needs one call per entry nor one message holding them all.

use sigil_core::entry::Entry;
use sigil_core::selector::Selector;
use sigil_proto::admin::{BatchEntriesResponse, EntryResult};
use sigil_proto::common;

use super::super::convert::{entry_input, entry_to_proto};
use super::{AdminService, new_entry_id, required};
use crate::datastore::{DataStore, EntryFilter, EntryWrite};
use crate::{Error, Result};

/// The most entries (or ids) one batch call may carry.
pub const MAX_BATCH: usize = 1000;

/// The page size of a list call that asks for none.
pub const DEFAULT_PAGE_SIZE: usize = 1000;

/// The largest page a list call may ask for (5 000 entries encode to well under 4 MiB).
pub const MAX_PAGE_SIZE: usize = 5000;

/// The longest page token accepted: a token is the last id (or SPIFFE ID) of the page before.
const MAX_PAGE_TOKEN: usize = 2048;

/// One item of a batch as the caller sent it.
pub(super) enum BatchItem {
    Create(common::Entry),
    Update(common::Entry),
    Delete(String),
}

/// The page size a request asked for, checked.
pub(super) fn page_size(requested: i32, page_token: &str) -> Result<usize> {
    if page_token.len() > MAX_PAGE_TOKEN {
        return Err(invalid(
            "page_token",
            format!(
                "is over {MAX_PAGE_TOKEN} bytes; pass the next_page_token of the previous page"
            ),
        ));
    }
    match usize::try_from(requested) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size) if size <= MAX_PAGE_SIZE => Ok(size),
        Ok(size) => Err(invalid(
            "page_size",
            format!(
                "{size} is over the limit of {MAX_PAGE_SIZE}; ask for fewer and follow next_page_token"
            ),
        )),
        Err(_) => Err(invalid("page_size", "must not be negative".into())),
    }
}

fn invalid(field: &'static str, reason: String) -> Error {
    Error::Invalid(sigil_core::Error::field(field, reason))
}

/// A page of `limit` items from `fetched` (fetched with one more than `limit`) and the token of
/// the next page, empty when there is none.
pub(super) fn into_page<T>(
    mut fetched: Vec<T>,
    limit: usize,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, String) {
    if fetched.len() > limit {
        fetched.truncate(limit);
        let token = fetched.last().map(key).unwrap_or_default();
        (fetched, token)
    } else {
        (fetched, String::new())
    }
}

/// The filter of a list or count request, its selectors checked.
pub(super) fn entry_filter(
    spiffe_id: String,
    parent_id: String,
    selectors: Vec<common::Selector>,
) -> Result<EntryFilter> {
    let selectors: Vec<Selector> = selectors.into_iter().map(Selector::from).collect();
    for selector in &selectors {
        selector.check().map_err(Error::from)?;
    }
    Ok(EntryFilter {
        spiffe_id: Some(spiffe_id).filter(|s| !s.is_empty()),
        parent_id: Some(parent_id).filter(|s| !s.is_empty()),
        selectors,
    })
}

impl<D: DataStore> AdminService<D> {
    /// An entry as a caller wrote it, checked for this server and given `id`.
    fn check_entry(&self, entry: common::Entry, id: String) -> Result<Entry> {
        if entry.downstream {
            return Err(invalid(
                "downstream",
                "is not supported: Sigil has no nested (downstream) servers yet, so such an entry would mean nothing; remove the flag".into(),
            ));
        }
        let now = self.state.clock.unix_now();
        let checked = entry_input(entry).validate(self.state.ca.trust_domain(), id, now)?;
        self.state.ca.check_workload_dns_names(&checked.dns_names)?;
        Ok(checked)
    }

    /// The write one item asks for, or why it cannot be made.
    fn check_item(&self, item: BatchItem) -> Result<EntryWrite> {
        match item {
            BatchItem::Create(entry) => Ok(EntryWrite::Create(
                self.check_entry(entry, new_entry_id()?)?,
            )),
            BatchItem::Update(entry) => {
                required("id", &entry.id)?;
                let id = entry.id.clone();
                Ok(EntryWrite::Update(self.check_entry(entry, id)?))
            }
            BatchItem::Delete(id) => {
                required("id", &id)?;
                Ok(EntryWrite::Delete(id))
            }
        }
    }

    /// `CreateEntry` (`create`) or `UpdateEntry`.
    pub(super) async fn write_entry(
        &self,
        entry: Option<common::Entry>,
        create: bool,
    ) -> Result<common::Entry> {
        let entry = entry
            .ok_or_else(|| Error::Invalid(sigil_core::Error::field("entry", "is required")))?;
        let write = self.check_item(if create {
            BatchItem::Create(entry)
        } else {
            BatchItem::Update(entry)
        })?;
        let stored = match write {
            EntryWrite::Create(entry) => self.state.datastore.create_entry(&entry).await?,
            EntryWrite::Update(entry) => self.state.datastore.update_entry(&entry).await?,
            EntryWrite::Delete(id) => self.state.datastore.delete_entry(&id).await?,
        };
        self.state.catch_up().await?;
        Ok(entry_to_proto(&stored))
    }

    /// A batch call: each item checked on its own, every valid one written in one transaction,
    /// one result per item in request order.
    pub(super) async fn write_batch(&self, items: Vec<BatchItem>) -> Result<BatchEntriesResponse> {
        if items.len() > MAX_BATCH {
            return Err(invalid(
                "entries",
                format!(
                    "{} items are over the limit of {MAX_BATCH} per batch; split them into several calls",
                    items.len()
                ),
            ));
        }
        let mut results: Vec<Option<Result<Entry>>> = Vec::with_capacity(items.len());
        let mut writes = Vec::new();
        let mut slots = Vec::new();
        for item in items {
            match self.check_item(item) {
                Ok(write) => {
                    slots.push(results.len());
                    writes.push(write);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if !writes.is_empty() {
            let written = self.state.datastore.write_entries(&writes).await?;
            for (slot, result) in slots.into_iter().zip(written) {
                results[slot] = Some(result);
            }
            self.state.catch_up().await?;
        }
        Ok(BatchEntriesResponse {
            results: results
                .into_iter()
                .map(|result| match result {
                    Some(Ok(entry)) => EntryResult {
                        code: 0,
                        message: String::new(),
                        entry: Some(entry_to_proto(&entry)),
                    },
                    Some(Err(e)) => {
                        let status = e.status();
                        EntryResult {
                            code: status.code() as i32,
                            message: status.message().to_string(),
                            entry: None,
                        }
                    }
                    // Every slot was filled above; a missing one would be a datastore that
                    // returned fewer results than writes.
                    None => EntryResult {
                        code: tonic::Code::Internal as i32,
                        message: "the datastore returned no result for this entry".into(),
                        entry: None,
                    },
                })
                .collect(),
        })
    }
}
