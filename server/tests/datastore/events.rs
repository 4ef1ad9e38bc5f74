//! [`ChangeFeed`]: every write to entries, agents, bundles and the CA journal appears in the
//! feed, in order; pruning never moves the feed position back; and on Postgres a commit made
//! through one handle wakes a listener on another (how servers sharing the database push).

use std::time::Duration;

use sigil_core::bundle::TrustBundle;
use sigil_core::id::parse_trust_domain;
use sigil_server::ca::AuthorityState;
use sigil_server::datastore::{
    AgentStore, Authority, AuthorityJournal, AuthorityKind, BundleStore, ChangeFeed, EntryStore,
    EventKind, SqlDataStore,
};

use crate::{AGENT, Backend, NOW, agent, web_entry};

on_both_backends!(
    change_feed_follows_every_write,
    journal_writes_are_in_the_feed,
    a_commit_wakes_a_listener_on_another_handle(backend) => {
        super::a_commit_wakes_a_listener_on_another_handle(&backend).await
    },
);

async fn change_feed_follows_every_write(
    ds: &(impl EntryStore + AgentStore + BundleStore + ChangeFeed),
) -> anyhow::Result<()> {
    assert_eq!(ds.latest_event_id().await?, 0);
    ds.create_entry(&web_entry()).await?;
    ds.put_agent(&agent(AGENT)).await?;
    let td = parse_trust_domain("trust_domain", "example.org")?;
    ds.put_bundle(&TrustBundle::new(td)).await?;
    ds.delete_entry("e1").await?;
    ds.ban_agent(AGENT, NOW).await?;
    let events = ds.events_after(0, 100).await?;
    let seen: Vec<(EventKind, &str)> = events
        .iter()
        .map(|e| (e.kind, e.subject.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (EventKind::Entry, "e1"),
            (EventKind::Agent, AGENT),
            (EventKind::Bundle, "example.org"),
            (EventKind::Entry, "e1"),
            (EventKind::Agent, AGENT),
        ]
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    assert_eq!(ds.latest_event_id().await?, events[4].id);
    let page = ds.events_after(events[1].id, 2).await?;
    assert_eq!(
        page.iter().map(|e| e.id).collect::<Vec<_>>(),
        [events[2].id, events[3].id]
    );
    // Looking up ids: those that exist come back in order, missing ones are left out, and
    // more than the limit is refused by name.
    let looked_up = ds
        .events_with_ids(&[events[3].id, events[0].id, events[4].id + 1000])
        .await?;
    assert_eq!(
        looked_up.iter().map(|e| e.id).collect::<Vec<_>>(),
        [events[0].id, events[3].id]
    );
    assert_eq!(looked_up[1].kind, EventKind::Entry);
    assert!(ds.events_with_ids(&[]).await?.is_empty());
    let too_many: Vec<u64> = (1..=501).collect();
    let refused = ds
        .events_with_ids(&too_many)
        .await
        .expect_err("over the limit");
    assert!(refused.to_string().contains("500"), "{refused}");
    // Pruning keeps the newest event so the feed position never goes back.
    assert_eq!(ds.prune_events(NOW + 1).await?, 4);
    assert_eq!(ds.latest_event_id().await?, events[4].id);
    Ok(())
}

async fn journal_writes_are_in_the_feed(
    ds: &(impl AuthorityJournal + ChangeFeed),
) -> anyhow::Result<()> {
    let mut authority = Authority {
        id: "aa".into(),
        kind: AuthorityKind::X509,
        key_ref: "x509-aa".into(),
        public_data: vec![1, 2, 3],
        state: AuthorityState::Prepared,
        not_after: NOW + 100,
        created_at: NOW,
        owner: "server-a".into(),
    };
    ds.put_authority(&authority).await?;
    authority.state = AuthorityState::Active;
    ds.put_authority(&authority).await?;
    let seen: Vec<(EventKind, String)> = ds
        .events_after(0, 100)
        .await?
        .into_iter()
        .map(|e| (e.kind, e.subject))
        .collect();
    assert_eq!(
        seen,
        [
            (EventKind::Authority, "aa".to_string()),
            (EventKind::Authority, "aa".to_string()),
        ]
    );
    Ok(())
}

/// Postgres: a write through one handle (one server) wakes a listener opened through another,
/// when it commits. SQLite has no push and says so.
async fn a_commit_wakes_a_listener_on_another_handle(backend: &Backend) -> anyhow::Result<()> {
    let other = SqlDataStore::connect(&backend.url, backend.clock.clone()).await?;
    let Some(mut listener) = other.listen().await? else {
        anyhow::ensure!(
            backend.url.starts_with("sqlite:"),
            "only SQLite may lack a listener"
        );
        return Ok(());
    };
    backend.store.create_entry(&web_entry()).await?;
    // A generous deadline: the point is that the wake-up comes, not how fast.
    tokio::time::timeout(Duration::from_secs(30), listener.changed())
        .await
        .map_err(|_| anyhow::anyhow!("no notification within 30 s of the commit"))??;
    // Events are read through the listener's own handle, as another server would.
    let events = other.events_after(0, 10).await?;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, EventKind::Entry);
    Ok(())
}
