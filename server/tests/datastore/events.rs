//! [`ChangeFeed`]: every write to entries, agents and bundles appears in the feed, in order,
//! and pruning never moves the feed position back.

use sigil_core::bundle::TrustBundle;
use sigil_core::id::parse_trust_domain;
use sigil_server::datastore::{AgentStore, BundleStore, ChangeFeed, EntryStore, EventKind};

use crate::{AGENT, NOW, agent, web_entry};

on_both_backends!(change_feed_follows_every_write);

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
    // Pruning keeps the newest event so the feed position never goes back.
    assert_eq!(ds.prune_events(NOW + 1).await?, 4);
    assert_eq!(ds.latest_event_id().await?, events[4].id);
    Ok(())
}
