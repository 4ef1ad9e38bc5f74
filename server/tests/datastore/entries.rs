//! [`EntryStore`]: entries round-trip, filter, refuse duplicates and report missing ones.

use sigil_core::selector::Selector;
use sigil_server::Error;
use sigil_server::datastore::{ChangeFeed, EntryFilter, EntryStore, EntryWrite};

use crate::{AGENT, entry};

on_both_backends!(
    entries_round_trip_and_filter,
    duplicate_entries_are_refused_without_writing,
    missing_entries_are_not_found,
    a_batch_reports_each_write_and_commits_the_good_ones_together,
    pages_follow_id_order_and_counts_match_the_filter,
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

async fn a_batch_reports_each_write_and_commits_the_good_ones_together(
    ds: &(impl EntryStore + ChangeFeed),
) -> anyhow::Result<()> {
    ds.create_entry(&entry(
        "e0",
        "spiffe://example.org/old",
        AGENT,
        &["unix:uid:1"],
    ))
    .await?;
    let events_before = ds.latest_event_id().await?;
    let mut moved = entry("e0", "spiffe://example.org/old", AGENT, &["unix:uid:2"]);
    moved.hint = "moved".into();
    let writes = vec![
        EntryWrite::Create(entry(
            "e1",
            "spiffe://example.org/a",
            AGENT,
            &["unix:uid:10"],
        )),
        // The same as e1 (in the same batch): a duplicate.
        EntryWrite::Create(entry(
            "e2",
            "spiffe://example.org/a",
            AGENT,
            &["unix:uid:10"],
        )),
        EntryWrite::Update(moved),
        EntryWrite::Update(entry(
            "nope",
            "spiffe://example.org/x",
            AGENT,
            &["unix:uid:3"],
        )),
        EntryWrite::Delete("missing".into()),
        EntryWrite::Create(entry(
            "e3",
            "spiffe://example.org/b",
            AGENT,
            &["unix:uid:11"],
        )),
    ];
    let results = ds.write_entries(&writes).await?;
    assert_eq!(results.len(), writes.len());
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(Error::AlreadyExists(_))),
        "{:?}",
        results[1]
    );
    let updated = results[2].as_ref().expect("e0 updated");
    assert_eq!(updated.hint, "moved");
    assert_eq!(
        updated.created_at,
        crate::NOW,
        "created_at is the stored one"
    );
    assert!(
        matches!(results[3], Err(Error::NotFound(_))),
        "{:?}",
        results[3]
    );
    assert!(
        matches!(results[4], Err(Error::NotFound(_))),
        "{:?}",
        results[4]
    );
    assert!(results[5].is_ok());
    let ids: Vec<String> = ds
        .list_entries(&EntryFilter::default())
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["e0", "e1", "e3"]);
    // Three writes succeeded; the three refused ones left no event behind.
    let events: Vec<u64> = ds
        .events_after(events_before, 100)
        .await?
        .into_iter()
        .map(|event| event.id)
        .collect();
    assert_eq!(events.len(), 3, "{events:?}");
    let found = ds
        .get_entries(&["e1".to_string(), "e3".to_string(), "missing".to_string()])
        .await?;
    assert_eq!(found.len(), 2);
    Ok(())
}

async fn pages_follow_id_order_and_counts_match_the_filter(
    ds: &impl EntryStore,
) -> anyhow::Result<()> {
    let writes: Vec<EntryWrite> = (0..25)
        .map(|n| {
            let selectors: &[&str] = if n % 2 == 0 {
                &["unix:uid:1", "k8s:ns:even"]
            } else {
                &["unix:uid:1"]
            };
            EntryWrite::Create(entry(
                &format!("e{n:02}"),
                &format!("spiffe://example.org/w{n}"),
                AGENT,
                selectors,
            ))
        })
        .collect();
    assert!(ds.write_entries(&writes).await?.iter().all(Result::is_ok));
    let all = EntryFilter::default();
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let page = ds.list_entries_page(&all, &after, 10).await?;
        let Some(last) = page.last() else { break };
        after.clone_from(&last.id);
        seen.extend(page.into_iter().map(|e| e.id));
    }
    let expected: Vec<String> = (0..25).map(|n| format!("e{n:02}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(ds.count_entries(&all).await?, 25);
    let even = EntryFilter {
        selectors: vec![Selector::parse("k8s:ns:even")?],
        ..EntryFilter::default()
    };
    let first = ds.list_entries_page(&even, "", 5).await?;
    assert_eq!(
        first.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e00", "e02", "e04", "e06", "e08"],
        "a filtered page fills up past the rows it skips"
    );
    assert_eq!(ds.count_entries(&even).await?, 13);
    let by_spiffe_id = EntryFilter {
        spiffe_id: Some("spiffe://example.org/w3".into()),
        ..EntryFilter::default()
    };
    assert_eq!(ds.count_entries(&by_spiffe_id).await?, 1);
    Ok(())
}
