//! The CA's maintenance follows the journal of every server sharing the datastore: a change made
//! through one server's datastore handle reaches the other's bundle and tainted set through the
//! change feed, without waiting for the rotation timer.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use sigil_core::clock::{ManualClock, SharedClock};
use sigil_core::id::parse_trust_domain;

use super::keep_ca_in_step;
use crate::authz::AuthzSources;
use crate::ca::{Ca, MemoryKeyManager};
use crate::config::ServerConfig;
use crate::datastore::SqlDataStore;
use crate::feed::Feed;

/// One of two servers on one datastore: its own handle, CA and change-feed follower.
struct Server {
    datastore: SqlDataStore,
    ca: Ca,
    feed: Feed,
}

async fn server(url: &str, owner: &str, clock: &SharedClock) -> Server {
    let datastore = SqlDataStore::connect(url, clock.clone())
        .await
        .expect("datastore");
    let trust_domain = parse_trust_domain("trust_domain", "example.org").expect("td");
    let settings = ServerConfig::default()
        .ca_settings(trust_domain.clone())
        .expect("settings");
    let ca = Ca::load(
        settings,
        owner.into(),
        Arc::new(MemoryKeyManager::default()),
        clock.clone(),
        &datastore,
    )
    .await
    .expect("ca");
    let sources = AuthzSources {
        trust_domain,
        clock: clock.clone(),
        pods: None,
    };
    let feed = Feed::load(sources, &datastore).await.expect("feed");
    Server {
        datastore,
        ca,
        feed,
    }
}

impl Server {
    /// Reads the feed, as the push or the poll makes the server do, waits for the journal
    /// wake-up that `maintain_ca` waits on, and does what it does then.
    async fn follow_journal(&self) {
        self.feed.catch_up(&self.datastore).await.expect("catch up");
        tokio::time::timeout(Duration::from_secs(10), self.feed.journal_changed())
            .await
            .expect("the feed announced the journal change");
        keep_ca_in_step(&self.ca, &self.feed, &self.datastore).await;
    }

    fn roots(&self) -> (usize, usize) {
        let mirrored = self.feed.bundles().own().expect("own bundle");
        (
            self.ca.bundle().x509_authorities.len(),
            mirrored.x509_authorities.len(),
        )
    }
}

#[tokio::test]
async fn another_servers_journal_change_reaches_this_servers_bundle_through_the_feed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("shared.sqlite3").display());
    let clock: SharedClock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    ));
    let a = server(&url, "server-a", &clock).await;
    let b = server(&url, "server-b", &clock).await;
    // B's load wrote B's authority after A's feed position: A learns of it through the feed.
    a.follow_journal().await;
    assert_eq!(a.roots(), (2, 2), "A publishes both servers' CAs");
    assert_eq!(b.roots(), (2, 2), "B too");

    // A prepares: B's own bundle (what `bundle show`, its TLS and its agents use) gains the
    // root at once, and so does its mirror of the stored bundle.
    a.ca.prepare(&a.datastore).await.expect("prepare");
    b.follow_journal().await;
    assert_eq!(b.roots(), (3, 3), "A's prepared root is in B's bundle");

    // A activates and taints its first CA: the bundle stays as it is, but B's tainted set, which
    // B's agents act on, follows.
    let first = a.ca.active_x509_id();
    a.ca.activate(&a.datastore).await.expect("activate");
    a.ca.taint(&a.datastore, &first).await.expect("taint");
    let mut revision = b.feed.subscribe();
    revision.mark_unchanged();
    b.follow_journal().await;
    assert!(
        b.ca.tainted().contains(&first),
        "B knows A's tainted CA: {:?}",
        b.ca.tainted()
    );
    assert!(
        revision.has_changed().expect("feed alive"),
        "B's sync streams were woken to resend the tainted set"
    );
}
