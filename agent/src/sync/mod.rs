//! The entry stream from the server: one long-lived `Sync` call that delivers a full snapshot, then
//! every change, into the cache. When the stream breaks the agent opens it again at once (on
//! another server when its own is gone: the link fails over); while no server answers it keeps
//! serving what it has and retries with exponential backoff and jitter, never waiting more than
//! [`MAX_RETRY`], so a server that answers again is used within that.
//!
//! Each stream is opened with the digests of what the cache holds (`sigil_core::resume`), so a
//! server sends only the buckets of entries that differ instead of a whole snapshot. Updates come
//! in pages; `PendingUpdate` collects them and the cache applies an update only whole, so a
//! workload never sees half a snapshot.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;

use sigil_proto::agent::{SyncRequest, SyncResponse};

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::node::ServerApi;

/// The backoff after the first failure (the wait is between half of it and all of it).
pub const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between two tries, jitter included.
pub const MAX_RETRY: Duration = Duration::from_secs(5);

/// The most entries plus removed ids one update may carry across its pages (the server sends at
/// most 5 000 per page): a bound on what a server, or something posing as one, can make the agent
/// hold before it applies anything. Ten times the 100 000 entries per node Sigil is measured at.
pub const MAX_UPDATE_ITEMS: usize = 1_000_000;

/// An update whose pages are still arriving.
#[derive(Debug, Default)]
struct PendingUpdate {
    update: Option<SyncResponse>,
}

impl PendingUpdate {
    /// Adds one page; returns the whole update once its last page is in. The first page's flags
    /// and bundles are the update's; later pages add entries and removed ids.
    fn add(&mut self, page: SyncResponse) -> Result<Option<SyncResponse>, String> {
        let more = page.more;
        let update = match self.update.take() {
            None => page,
            Some(mut update) => {
                update.entries.extend(page.entries);
                update.removed_entry_ids.extend(page.removed_entry_ids);
                update.revision = page.revision;
                update
            }
        };
        let items = update.entries.len() + update.removed_entry_ids.len();
        if items > MAX_UPDATE_ITEMS {
            return Err(format!(
                "the server's update holds over {MAX_UPDATE_ITEMS} entries and removals (the agent's limit, MAX_UPDATE_ITEMS)"
            ));
        }
        if more {
            self.update = Some(update);
            Ok(None)
        } else {
            Ok(Some(update))
        }
    }
}

/// Follows the server's sync stream until `stopping` turns true.
pub async fn follow(
    server: Arc<dyn ServerApi>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut backoff = FIRST_RETRY;
    loop {
        let request = SyncRequest {
            resume: cache.resume(),
        };
        match server.sync(request).await {
            Ok(mut stream) => {
                metrics.sync_connected.set(1);
                let mut pending = PendingUpdate::default();
                loop {
                    let message = tokio::select! {
                        message = stream.next() => message.transpose(),
                        _ = stopping.wait_for(|stop| *stop) => {
                            metrics.sync_connected.set(0);
                            return;
                        }
                    };
                    match message {
                        Ok(Some(page)) => {
                            backoff = FIRST_RETRY;
                            let update = match pending.add(page) {
                                Ok(Some(update)) => update,
                                Ok(None) => continue,
                                Err(why) => {
                                    tracing::error!(reason = %why, "refusing the server's update; reconnecting");
                                    backoff = MAX_RETRY;
                                    break;
                                }
                            };
                            metrics.sync_updates.inc();
                            if let Some(bundle) = cache.apply_sync(&update)
                                && let Err(e) = server.trust(&bundle).await
                            {
                                tracing::warn!(error = %e, "cannot store the new trust bundle");
                            }
                        }
                        Ok(None) => {
                            tracing::info!("the server closed the sync stream; reconnecting");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the sync stream broke; serving cached SVIDs and reconnecting");
                            break;
                        }
                    }
                }
                metrics.sync_connected.set(0);
            }
            Err(e) if e.code() == tonic::Code::PermissionDenied => {
                tracing::error!(error = %e, "the server refuses this agent (evicted or banned); it keeps serving cached SVIDs until they expire");
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach the server; serving cached SVIDs");
            }
        }
        let wait = with_jitter(backoff);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        backoff = (backoff * 2).min(MAX_RETRY);
    }
}

/// Between half of `base` and all of it, so agents that lost their servers together do not
/// return together, and the wait never exceeds `base`.
pub fn with_jitter(base: Duration) -> Duration {
    let mut random = [0u8; 2];
    let fraction = if SystemRandom::new().fill(&mut random).is_ok() {
        f64::from(u16::from_le_bytes(random)) / f64::from(u16::MAX)
    } else {
        0.5
    };
    base / 2 + (base / 2).mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use sigil_core::clock::ManualClock;

    use super::*;
    use crate::node::fake::{FakeServer, empty_cache, snapshot, spawn_stoppable, sync_entry};

    #[tokio::test(start_paused = true)]
    async fn the_agent_retries_an_absent_server_and_applies_its_snapshot() {
        let server = Arc::new(FakeServer::new());
        server.down.store(true, Ordering::SeqCst);
        server
            .sync_messages
            .lock()
            .expect("lock")
            .push(snapshot(vec![sync_entry("web", "1000", 1)]));
        let metrics = Arc::new(Metrics::default());
        let cache = empty_cache(
            Arc::new(ManualClock::new(std::time::SystemTime::now())),
            metrics.clone(),
            None,
        );
        let (stop, follower) = spawn_stoppable(|stopping| {
            follow(server.clone(), cache.clone(), metrics.clone(), stopping)
        });

        // Away for ten seconds: nothing arrives, and the agent keeps trying.
        assert!(!cache.wait_synced(Duration::from_secs(10)).await);
        assert_eq!(metrics.sync_connected.get(), 0);
        server.down.store(false, Ordering::SeqCst);
        // Back: within the longest backoff (5 s, jitter included) the snapshot is in.
        assert!(cache.wait_synced(MAX_RETRY).await);
        assert!(cache.entry("web").is_some());
        assert_eq!(metrics.sync_connected.get(), 1);
        assert_eq!(metrics.sync_updates.get(), 1);

        stop.send(true).expect("follower listening");
        follower.await.expect("follower ends");
        assert_eq!(metrics.sync_connected.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_stream_is_opened_again_within_a_second_and_retries_never_wait_over_5_s() {
        let server = Arc::new(FakeServer::new());
        server
            .sync_messages
            .lock()
            .expect("lock")
            .push(snapshot(vec![sync_entry("web", "1000", 1)]));
        let metrics = Arc::new(Metrics::default());
        let cache = empty_cache(
            Arc::new(ManualClock::new(std::time::SystemTime::now())),
            metrics.clone(),
            None,
        );
        let (stop, follower) = spawn_stoppable(|stopping| {
            follow(server.clone(), cache.clone(), metrics.clone(), stopping)
        });
        assert!(cache.wait_synced(Duration::from_secs(1)).await);
        assert_eq!(server.sync_opens.load(Ordering::SeqCst), 1);

        // The stream breaks (its server died): a new one is open within a second.
        server.break_streams();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(server.sync_opens.load(Ordering::SeqCst), 2);
        assert_eq!(metrics.sync_connected.get(), 1);

        // No server for a minute: the backoff grows, but never past 5 s.
        server.down.store(true, Ordering::SeqCst);
        server.break_streams();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let tries = server.sync_opens.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(20)).await;
        let later = server.sync_opens.load(Ordering::SeqCst);
        assert!(later - tries >= 4, "{tries} then {later} tries in 20 s");
        server.down.store(false, Ordering::SeqCst);
        let updates = metrics.sync_updates.get();
        tokio::time::sleep(MAX_RETRY).await;
        assert_eq!(metrics.sync_connected.get(), 1);
        assert_eq!(metrics.sync_updates.get(), updates + 1, "a new snapshot");

        stop.send(true).expect("follower listening");
        follower.await.expect("follower ends");
    }

    #[tokio::test(start_paused = true)]
    async fn pages_are_applied_together_and_a_reopened_stream_says_what_the_cache_holds() {
        let server = Arc::new(FakeServer::new());
        let mut pages = vec![
            snapshot(vec![sync_entry("a", "1000", 1)]),
            SyncResponse {
                entries: vec![sync_entry("b", "1000", 1)],
                ..SyncResponse::default()
            },
            SyncResponse {
                entries: vec![sync_entry("c", "1000", 1)],
                ..SyncResponse::default()
            },
        ];
        pages[0].more = true;
        pages[1].more = true;
        *server.sync_messages.lock().expect("lock") = pages;
        let metrics = Arc::new(Metrics::default());
        let cache = empty_cache(
            Arc::new(ManualClock::new(std::time::SystemTime::now())),
            metrics.clone(),
            None,
        );
        let (stop, follower) = spawn_stoppable(|stopping| {
            follow(server.clone(), cache.clone(), metrics.clone(), stopping)
        });
        assert!(cache.wait_synced(Duration::from_secs(1)).await);
        assert_eq!(cache.entry_count(), 3, "synced means every page is in");
        assert_eq!(metrics.sync_updates.get(), 1, "three pages, one update");

        server.break_streams();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let requests = server.sync_requests.lock().expect("lock").clone();
        assert_eq!(requests.len(), 2);
        assert_eq!(
            requests[0].resume, None,
            "an empty cache asks for a snapshot"
        );
        assert_eq!(
            requests[1].resume,
            cache.resume(),
            "the second stream says what the cache holds"
        );
        assert!(requests[1].resume.is_some());

        stop.send(true).expect("follower listening");
        follower.await.expect("follower ends");
    }

    #[test]
    fn an_update_whose_pages_hold_too_much_is_refused() {
        let mut pending = PendingUpdate::default();
        let mut page = SyncResponse {
            more: true,
            removed_entry_ids: vec![String::new(); MAX_UPDATE_ITEMS / 2],
            ..SyncResponse::default()
        };
        assert_eq!(pending.add(page.clone()), Ok(None));
        assert_eq!(pending.add(page.clone()), Ok(None));
        page.removed_entry_ids.truncate(1);
        let refused = pending.add(page).expect_err("over the limit");
        assert!(refused.contains("MAX_UPDATE_ITEMS"), "{refused}");
    }

    #[test]
    fn the_jittered_wait_lies_between_half_the_backoff_and_all_of_it() {
        for _ in 0..200 {
            let wait = with_jitter(MAX_RETRY);
            assert!(wait >= MAX_RETRY / 2 && wait <= MAX_RETRY, "{wait:?}");
        }
    }
}
