use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use sigil_core::clock::ManualClock;
use sigil_core::selector::Selector;

use super::*;
use crate::metrics::Metrics;
use crate::node::fake::{
    FakeServer, empty_cache, snapshot, spawn_stoppable, sync_entry, test_signer, unix_entry,
};

fn store(dir: &Path) -> CacheStore {
    CacheStore::new(IdentityStore::open(dir).expect("data dir"))
}

fn ids(entries: &[Arc<Entry>]) -> Vec<&str> {
    entries.iter().map(|entry| entry.id.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_serves_its_stored_svids_to_the_same_workloads_until_they_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let server = Arc::new(FakeServer::new());
    let metrics = Arc::new(Metrics::default());
    let cache = empty_cache(clock.clone(), metrics.clone(), None);
    let store = store(dir.path());
    // Before the first snapshot there is nothing worth writing.
    store.save(&cache).expect("nothing to save");
    assert!(!dir.path().join(CACHE_FILE).exists());

    cache.apply_sync(&SyncResponse {
        tainted_set: true,
        tainted_authority_ids: vec!["ca9".into()],
        ..snapshot(vec![
            sync_entry("web", "1000", 3),
            unix_entry("db", &["uid:2000", "gid:5"], 1, 0),
        ])
    });
    let signer = test_signer(&server, &cache, &metrics);
    let web = signer
        .sign(cache.entry("web").expect("web"))
        .await
        .expect("signed");
    store.save(&cache).expect("saved");
    let mode = std::fs::metadata(dir.path().join(CACHE_FILE))
        .expect("written")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "workload keys are the agent's alone");

    // A new agent on the same directory, no server anywhere.
    let restarted_metrics = Arc::new(Metrics::default());
    let restarted = empty_cache(clock.clone(), restarted_metrics.clone(), None);
    assert_eq!(store.restore(&restarted).expect("readable"), Some(1));
    assert!(restarted.is_synced(), "workloads are served at once");
    let uid_1000 = [Selector::new("unix", "uid:1000").expect("selector")];
    let matched = restarted.matching(&uid_1000);
    assert_eq!(ids(&matched), ["web"]);
    let served = restarted.current_svid(&matched[0]).expect("current");
    assert_eq!(served.chain, web.chain);
    assert_eq!(served.key.as_bytes(), web.key.as_bytes());
    assert_eq!(
        (served.not_after, served.renew_at),
        (web.not_after, web.renew_at)
    );
    assert_eq!(
        restarted.entry("db").expect("db").selectors,
        cache.entry("db").expect("db").selectors
    );
    assert!(restarted.is_tainted("ca9"));
    assert_eq!(restarted_metrics.svid_earliest_expiry.get(), web.not_after);

    // Past the SVID's expiry a restart brings back the entries only.
    clock.advance(Duration::from_secs(3601));
    let later = empty_cache(clock.clone(), Arc::new(Metrics::default()), None);
    assert_eq!(store.restore(&later).expect("readable"), Some(0));
    assert!(later.any_svid("web").is_none() && later.entry("web").is_some());

    // persist_svid_cache = false: the file goes.
    assert!(store.remove().expect("removed"));
    assert!(!dir.path().join(CACHE_FILE).exists());
    assert!(!store.remove().expect("nothing to remove"));
}

#[test]
fn an_unreadable_or_foreign_cache_file_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(dir.path());
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    for text in [
        "not json",
        "{\"format\":99,\"snapshot\":\"\",\"svids\":[]}",
        "{\"format\":1,\"snapshot\":\"!!\",\"svids\":[]}",
    ] {
        std::fs::write(dir.path().join(CACHE_FILE), text).expect("write");
        let cache = empty_cache(clock.clone(), Arc::new(Metrics::default()), None);
        assert_eq!(store.restore(&cache).expect("ignored"), None, "{text}");
        assert!(!cache.is_synced());
    }
}

/// Waits (real time, at most 10 s) until the stored cache, loaded into a fresh cache, satisfies
/// `done`.
async fn wait_for_stored(store: &CacheStore, done: impl Fn(&Cache) -> bool) -> bool {
    for _ in 0..500 {
        let loaded = empty_cache(
            Arc::new(ManualClock::new(SystemTime::now())),
            Arc::new(Metrics::default()),
            None,
        );
        if store.restore(&loaded).ok().flatten().is_some() && done(&loaded) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn every_change_reaches_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(dir.path());
    let cache = empty_cache(
        Arc::new(ManualClock::new(SystemTime::now())),
        Arc::new(Metrics::default()),
        None,
    );
    let (stop, task) =
        spawn_stoppable(|stopping| keep_cache_on_disk(cache.clone(), store.clone(), stopping));
    cache.apply_sync(&snapshot(vec![sync_entry("web", "1000", 1)]));
    assert!(wait_for_stored(&store, |stored| stored.entry("web").is_some()).await);
    cache.apply_sync(&SyncResponse {
        entries: vec![sync_entry("db", "2000", 2)],
        removed_entry_ids: vec!["web".into()],
        ..SyncResponse::default()
    });
    assert!(
        wait_for_stored(&store, |stored| stored.entry("db").is_some()
            && stored.entry("web").is_none())
        .await
    );
    stop.send(true).expect("task listening");
    task.await.expect("task ends");
}
