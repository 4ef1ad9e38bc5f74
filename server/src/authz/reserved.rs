//! The reserved `/sigil/` namespace in what is already stored.
//!
//! New entries, node aliases and federation relationships are refused when they name an ID in
//! the reserved namespace, and the CA never signs a workload SVID in it. Rows written before that
//! rule existed (or by hand in the database) would still hand a workload an agent's or the
//! server's identity, so the server refuses to start while any remain, naming each one.

use sigil_core::entry::dns_names_overlap;
use sigil_core::id::{TrustDomain, is_reserved};
use sigil_core::untrusted::untrusted;

use crate::datastore::{DataStore, EndpointProfile, EntryFilter};
use crate::{Error, Result};

/// How many offending rows the start-up error lists before it says how many more there are.
const LISTED: usize = 20;

/// Fails when a stored entry (or node alias) or federation relationship names an ID in
/// `trust_domain`'s reserved namespace.
pub async fn check_stored_rows<D: DataStore>(
    datastore: &D,
    trust_domain: &TrustDomain,
    server_dns_names: &[String],
) -> Result<()> {
    let mut offending = Vec::new();
    for entry in datastore.list_entries(&EntryFilter::default()).await? {
        if is_reserved(&entry.spiffe_id, trust_domain) {
            offending.push(format!(
                "entry {} ({}) in table entries",
                untrusted(&entry.id),
                entry.spiffe_id
            ));
        }
        if let Some(name) = entry.dns_names.iter().find(|name| {
            server_dns_names
                .iter()
                .any(|server| dns_names_overlap(name, server))
        }) {
            offending.push(format!(
                "entry {} (DNS name {}, one of the server's) in table entries",
                untrusted(&entry.id),
                untrusted(name)
            ));
        }
    }
    for relationship in datastore.list_federations().await? {
        if let EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } = &relationship.profile
            && is_reserved(endpoint_spiffe_id, trust_domain)
        {
            offending.push(format!(
                "the federation relationship with {} (endpoint {endpoint_spiffe_id}) in table federation_relationships",
                relationship.trust_domain
            ));
        }
    }
    if offending.is_empty() {
        return Ok(());
    }
    let more = offending.len().saturating_sub(LISTED);
    offending.truncate(LISTED);
    let mut listing = offending.join("; ");
    if more > 0 {
        listing.push_str(&format!("; and {more} more"));
    }
    Err(Error::Integrity(format!(
        "the datastore holds IDs in the reserved namespace spiffe://{trust_domain}/sigil/, which only the server and agents may hold, or DNS names of the server's own certificate; a workload with one could impersonate them. Delete these rows from the database (after a backup) and start again: {listing}"
    )))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use sigil_core::clock::ManualClock;
    use sigil_core::entry::EntryInput;
    use sigil_core::id::{parse_spiffe_id, parse_trust_domain};
    use sigil_core::selector::Selector;

    use super::*;
    use crate::datastore::{EntryStore, SqlDataStore};

    #[tokio::test]
    async fn a_stored_reserved_entry_stops_start_up_and_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        ));
        let url = format!("sqlite://{}", dir.path().join("db.sqlite3").display());
        let datastore = SqlDataStore::connect(&url, clock).await.expect("datastore");
        let td = parse_trust_domain("trust_domain", "example.org").expect("td");
        let mut entry = EntryInput {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/sigil/agent/join_token/a".into(),
            selectors: vec![Selector::parse("unix:uid:0").expect("selector")],
            ..EntryInput::default()
        }
        .validate(&td, "e1".into(), 0)
        .expect("valid");
        datastore.create_entry(&entry).await.expect("stored");
        check_stored_rows(&datastore, &td, &[])
            .await
            .expect("nothing reserved yet");

        // As a row written before the rule existed would be.
        entry.id = "e2".into();
        entry.spiffe_id =
            parse_spiffe_id("spiffe_id", "spiffe://example.org/sigil/agent/join_token/b")
                .expect("id");
        datastore.create_entry(&entry).await.expect("stored");
        let err = check_stored_rows(&datastore, &td, &[])
            .await
            .expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("entry e2"), "{text}");
        assert!(text.contains("sigil/agent/join_token/b"), "{text}");
        assert!(!text.contains("entry e1"), "{text}");
    }
}
