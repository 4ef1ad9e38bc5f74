use std::time::{Duration, UNIX_EPOCH};

use sigil_core::clock::ManualClock;
use sigil_core::x509::BACKDATE;

use super::*;
use crate::node::fake::{empty_cache, snapshot, unix_entry};

const NOW: i64 = 1_800_000_000;

fn cache() -> (Arc<ManualClock>, Arc<Cache>) {
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(NOW.unsigned_abs()),
    ));
    let cache = empty_cache(clock.clone(), Arc::new(Metrics::default()), None);
    (clock, cache)
}

/// A cache with the entries `web` (uid 1000) and `db` (uid 2000), and an SVID for `web` from
/// `ca1` due for renewal at `NOW + 50`.
fn cache_with_web_and_db() -> (Arc<ManualClock>, Arc<Cache>) {
    let (clock, cache) = cache();
    cache.apply_sync(&snapshot(vec![
        unix_entry("web", &["uid:1000"], 1, 0),
        unix_entry("db", &["uid:2000"], 1, 0),
    ]));
    cache.store_svid(svid("web", 1, NOW + 50, "ca1"));
    (clock, cache)
}

fn svid(entry_id: &str, revision: u64, renew_at: i64, authority_id: &str) -> CachedSvid {
    let backdate = i64::try_from(BACKDATE.as_secs()).expect("small");
    CachedSvid {
        entry_id: entry_id.into(),
        entry_revision: revision,
        chain: vec![vec![1]],
        key: PrivateKey::new(vec![2]),
        not_before: NOW - backdate,
        not_after: NOW + 100,
        renew_at,
        authority_id: authority_id.into(),
    }
}

fn ids(entries: &[Arc<Entry>]) -> Vec<&str> {
    entries.iter().map(|entry| entry.id.as_str()).collect()
}

fn unix(values: &[&str]) -> Vec<Selector> {
    values
        .iter()
        .map(|value| Selector::new("unix", *value).expect("selector"))
        .collect()
}

#[test]
fn a_workload_gets_the_entries_whose_selectors_it_all_has() {
    let (_clock, cache) = cache();
    assert!(!cache.is_synced());
    cache.apply_sync(&snapshot(vec![
        unix_entry("web", &["uid:1000"], 1, 0),
        unix_entry("web-admin", &["uid:1000", "gid:50"], 1, 0),
        unix_entry("db", &["uid:2000"], 1, 0),
    ]));
    assert!(cache.is_synced());
    assert_eq!(ids(&cache.matching(&unix(&["uid:1000"]))), ["web"]);
    assert_eq!(
        ids(&cache.matching(&unix(&["gid:50", "uid:1000", "gid:60"]))),
        ["web", "web-admin"]
    );
    assert!(cache.matching(&unix(&["gid:50"])).is_empty());
    assert!(cache.matching(&[]).is_empty());
}

#[test]
fn a_changed_entry_needs_a_new_svid_and_a_removed_one_takes_its_svid_along() {
    let (_clock, cache) = cache_with_web_and_db();
    let web = cache.entry("web").expect("web");
    assert!(cache.current_svid(&web).is_some());

    cache.apply_sync(&SyncResponse {
        entries: vec![unix_entry("web", &["uid:1000"], 2, 0)],
        ..SyncResponse::default()
    });
    let changed = cache.entry("web").expect("web");
    assert_eq!(changed.revision, 2);
    assert!(
        cache.current_svid(&changed).is_none(),
        "signed for revision 1"
    );
    assert!(
        cache.any_svid("web").is_some(),
        "kept while a new one is signed"
    );

    cache.apply_sync(&SyncResponse {
        removed_entry_ids: vec!["web".into()],
        ..SyncResponse::default()
    });
    assert!(cache.entry("web").is_none() && cache.any_svid("web").is_none());
    cache.store_svid(svid("web", 2, NOW + 50, "ca1"));
    assert!(
        cache.any_svid("web").is_none(),
        "no SVID for an entry that is gone"
    );

    // A new snapshot replaces the whole set.
    cache.apply_sync(&snapshot(vec![unix_entry("cache", &["uid:3000"], 3, 0)]));
    assert!(cache.entry("db").is_none() && cache.entry("cache").is_some());
}

#[test]
fn expired_entries_and_svids_are_not_handed_out() {
    let (clock, cache) = cache();
    cache.apply_sync(&snapshot(vec![unix_entry(
        "web",
        &["uid:1000"],
        1,
        NOW + 10,
    )]));
    cache.store_svid(svid("web", 1, NOW + 50, "ca1"));
    assert_eq!(ids(&cache.matching(&unix(&["uid:1000"]))), ["web"]);
    clock.advance(Duration::from_secs(10));
    assert!(cache.matching(&unix(&["uid:1000"])).is_empty());
    let web = cache.entry("web").expect("web");
    assert!(cache.current_svid(&web).is_some());
    clock.advance(Duration::from_secs(90));
    assert!(cache.current_svid(&web).is_none() && cache.any_svid("web").is_none());
}

#[test]
fn renewals_come_at_renew_at_and_at_once_for_a_tainted_ca_but_not_within_a_second() {
    let (_clock, cache) = cache_with_web_and_db();
    cache.store_svid(svid("db", 1, NOW + 60, "ca2"));
    assert_eq!(cache.renewals(NOW), (Vec::new(), Some(NOW + 50)));
    assert_eq!(
        cache.renewals(NOW + 50),
        (vec!["web".to_string()], Some(NOW + 60))
    );

    cache.apply_sync(&SyncResponse {
        tainted_set: true,
        tainted_authority_ids: vec!["ca1".into()],
        ..SyncResponse::default()
    });
    assert!(cache.is_tainted("ca1") && !cache.is_tainted("ca2"));
    // Signed now by a tainted CA: due one second after its issue, never in the same second.
    assert_eq!(cache.renewals(NOW), (Vec::new(), Some(NOW + 1)));
    assert_eq!(
        cache.renewals(NOW + 1),
        (vec!["web".to_string()], Some(NOW + 60))
    );
}

#[test]
fn renewal_comes_at_half_life_less_up_to_a_tenth() {
    for _ in 0..200 {
        let at = renewal_time(1000, 2000);
        assert!((1400..=1500).contains(&at), "{at}");
    }
}

#[test]
fn a_jwt_svid_is_reused_for_the_same_audience_until_half_its_life() {
    let (clock, cache) = cache();
    cache.apply_sync(&snapshot(vec![unix_entry("web", &["uid:1000"], 1, 0)]));
    let audience = ["b".to_string(), "a".to_string()];
    cache.store_jwt("web", &audience, "token".into(), NOW + 100);
    let reordered = ["a".to_string(), "b".to_string()];
    assert_eq!(cache.jwt("web", &reordered).as_deref(), Some("token"));
    assert!(cache.jwt("web", &["a".to_string()]).is_none());
    clock.advance(Duration::from_secs(50));
    assert!(
        cache.jwt("web", &audience).is_none(),
        "half its life is gone"
    );

    // A changed entry drops its JWT-SVIDs.
    cache.store_jwt("web", &audience, "token2".into(), NOW + 200);
    cache.apply_sync(&SyncResponse {
        entries: vec![unix_entry("web", &["uid:1000"], 2, 0)],
        ..SyncResponse::default()
    });
    assert!(cache.jwt("web", &audience).is_none());
}

#[test]
fn the_earliest_expiry_gauge_follows_the_soonest_cached_svid_and_is_0_without_any() {
    let metrics = Arc::new(Metrics::default());
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(NOW.unsigned_abs()),
    ));
    let cache = empty_cache(clock, metrics.clone(), None);
    cache.apply_sync(&snapshot(vec![
        unix_entry("web", &["uid:1000"], 1, 0),
        unix_entry("db", &["uid:2000"], 1, 0),
    ]));
    assert_eq!(metrics.svid_earliest_expiry.get(), 0);
    cache.store_svid(CachedSvid {
        not_after: NOW + 500,
        ..svid("web", 1, NOW + 50, "ca1")
    });
    cache.store_svid(svid("db", 1, NOW + 50, "ca1"));
    assert_eq!(metrics.svid_earliest_expiry.get(), NOW + 100);
    cache.apply_sync(&SyncResponse {
        removed_entry_ids: vec!["db".into()],
        ..SyncResponse::default()
    });
    assert_eq!(metrics.svid_earliest_expiry.get(), NOW + 500);
    cache.apply_sync(&snapshot(Vec::new()));
    assert_eq!(metrics.svid_earliest_expiry.get(), 0);
    // The name an alert rule uses.
    assert!(
        metrics
            .encode()
            .contains("sigil_agent_svid_earliest_expiry_timestamp_seconds 0"),
        "{}",
        metrics.encode()
    );
}

#[test]
fn a_resumed_update_replaces_the_buckets_it_names_and_keeps_the_rest() {
    let (_clock, cache) = cache();
    assert_eq!(cache.resume(), None, "nothing held: a whole snapshot");
    let many: Vec<common::Entry> = (0..200)
        .map(|n| unix_entry(&format!("e{n}"), &["uid:1000"], 1, 0))
        .collect();
    cache.apply_sync(&snapshot(many));
    let held = cache.resume().expect("synced");
    let ids: Vec<String> = (0..200).map(|n| format!("e{n}")).collect();
    let expected = EntryDigests::of(ids.iter().map(|id| (id.as_str(), 1)));
    assert_eq!(held.entry_buckets, expected.buckets());

    // The server's view: e0 changed, e1 is gone; both their buckets come again whole.
    let buckets: BTreeSet<usize> = [entry_bucket("e0"), entry_bucket("e1")].into();
    let resent: Vec<common::Entry> = (2..200)
        .map(|n| format!("e{n}"))
        .filter(|id| buckets.contains(&entry_bucket(id)))
        .map(|id| unix_entry(&id, &["uid:1000"], 1, 0))
        .chain([unix_entry("e0", &["uid:1000"], 2, 0)])
        .collect();
    cache.apply_sync(&SyncResponse {
        resumed: true,
        replaced_buckets: buckets
            .iter()
            .map(|b| u32::try_from(*b).expect("small"))
            .collect(),
        entries: resent,
        ..SyncResponse::default()
    });
    assert_eq!(cache.entry_count(), 199);
    assert!(cache.entry("e1").is_none(), "dropped with its bucket");
    assert_eq!(cache.entry("e0").map(|e| e.revision), Some(2));
    let untouched = (2..200)
        .map(|n| format!("e{n}"))
        .find(|id| !buckets.contains(&entry_bucket(id)))
        .expect("some entry in another bucket");
    assert!(cache.entry(&untouched).is_some(), "other buckets are kept");
}
