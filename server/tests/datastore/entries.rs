//! [`EntryStore`]: entries round-trip, filter, refuse duplicates and report missing ones.

use sigil_core::selector::Selector;
use sigil_server::Error;
use sigil_server::datastore::{ChangeFeed, EntryFilter, EntryStore};

use crate::{AGENT, entry};

on_both_backends!(
    entries_round_trip_and_filter,
    duplicate_entries_are_refused_without_writing,
    missing_entries_are_not_found,
);

async fn entries_round_trip_and_filter(ds: &impl EntryStore) -> anyhow::Result<()> {
    let web = ds
        .create_entry(&entry(
            "e1",
            "spiffe://example.org/web",
            AGENT,
            &["unix:uid:1000", "k8s:ns:prod"],
        ))
        .await?;
    assert!(web.revision > 0);
    assert_eq!(ds.get_entry("e1").await?, Some(web.clone()));
    ds.create_entry(&entry(
        "e2",
        "spiffe://example.org/db",
        AGENT,
        &["unix:uid:1001"],
    ))
    .await?;
    ds.create_entry(&entry(
        "e3",
        "spiffe://example.org/web",
        "spiffe://example.org/other",
        &["unix:uid:1000"],
    ))
    .await?;

    let all = ds.list_entries(&EntryFilter::default()).await?;
    assert_eq!(
        all.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e1", "e2", "e3"]
    );
    let by_id = ds
        .list_entries(&EntryFilter {
            spiffe_id: Some("spiffe://example.org/web".into()),
            ..EntryFilter::default()
        })
        .await?;
    assert_eq!(by_id.len(), 2);
    let by_parent = ds
        .list_entries(&EntryFilter {
            parent_id: Some(AGENT.into()),
            ..EntryFilter::default()
        })
        .await?;
    assert_eq!(by_parent.len(), 2);
    let by_selector = ds
        .list_entries(&EntryFilter {
            selectors: vec![Selector::parse("k8s:ns:prod")?],
            ..EntryFilter::default()
        })
        .await?;
    assert_eq!(
        by_selector
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        ["e1"]
    );

    let mut changed = web.clone();
    changed.selectors = vec![Selector::parse("unix:uid:2000")?];
    changed.hint = "external".into();
    let updated = ds.update_entry(&changed).await?;
    assert!(updated.revision > web.revision);
    let stored = ds.get_entry("e1").await?.expect("still there");
    assert_eq!(stored.hint, "external");
    assert_eq!(stored.created_at, web.created_at);
    assert_eq!(stored.revision, updated.revision);

    let deleted = ds.delete_entry("e2").await?;
    assert_eq!(deleted.spiffe_id.to_string(), "spiffe://example.org/db");
    assert_eq!(ds.get_entry("e2").await?, None);
    Ok(())
}

/// Also reads the change feed, to check that a refused write leaves no event.
async fn duplicate_entries_are_refused_without_writing(
    ds: &(impl EntryStore + ChangeFeed),
) -> anyhow::Result<()> {
    ds.create_entry(&entry(
        "e1",
        "spiffe://example.org/web",
        AGENT,
        &["unix:uid:1000", "unix:gid:1"],
    ))
    .await?;
    let events_before = ds.latest_event_id().await?;
    // Same ID, parent and selectors (in another order): refused.
    let duplicate = ds
        .create_entry(&entry(
            "e2",
            "spiffe://example.org/web",
            AGENT,
            &["unix:gid:1", "unix:uid:1000"],
        ))
        .await;
    assert!(
        matches!(duplicate, Err(Error::AlreadyExists(_))),
        "{duplicate:?}"
    );
    assert_eq!(ds.list_entries(&EntryFilter::default()).await?.len(), 1);
    assert_eq!(
        ds.latest_event_id().await?,
        events_before,
        "the refused write left no event"
    );
    // An update into a duplicate is refused too.
    ds.create_entry(&entry(
        "e3",
        "spiffe://example.org/web",
        AGENT,
        &["unix:uid:1000"],
    ))
    .await?;
    let clash = ds
        .update_entry(&entry(
            "e3",
            "spiffe://example.org/web",
            AGENT,
            &["unix:uid:1000", "unix:gid:1"],
        ))
        .await;
    assert!(matches!(clash, Err(Error::AlreadyExists(_))), "{clash:?}");
    assert_eq!(ds.get_entry("e3").await?.expect("kept").selectors.len(), 1);
    Ok(())
}

async fn missing_entries_are_not_found(ds: &impl EntryStore) -> anyhow::Result<()> {
    assert_eq!(ds.get_entry("nope").await?, None);
    assert!(matches!(
        ds.delete_entry("nope").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        ds.update_entry(&entry("nope", "spiffe://example.org/x", AGENT, &["a:b"]))
            .await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}
