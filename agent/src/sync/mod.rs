//! The entry stream from the server: one long-lived `Sync` call that delivers a full snapshot, then
//! every change, into the cache. When the stream breaks the agent opens it again at once (on
//! another server when its own is gone: the link fails over); while no server answers it keeps
//! serving what it has and retries with exponential backoff and jitter, never waiting more than
//! [`MAX_RETRY`], so a server that answers again is used within that.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::node::ServerApi;

/// The backoff after the first failure (the wait is between half of it and all of it).
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between two tries, jitter included.
pub const MAX_RETRY: Duration = Duration::from_secs(5);

/// Follows the server's sync stream until `stopping` turns true.
pub async fn follow(
    server: Arc<dyn ServerApi>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut backoff = FIRST_RETRY;
    loop {
        match server.sync().await {
            Ok(mut stream) => {
                metrics.sync_connected.set(1);
                loop {
                    let message = tokio::select! {
                        message = stream.next() => message.transpose(),
                        _ = stopping.wait_for(|stop| *stop) => {
                            metrics.sync_connected.set(0);
                            return;
                        }
                    };
                    match message {
                        Ok(Some(update)) => {
                            backoff = FIRST_RETRY;
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
fn with_jitter(base: Duration) -> Duration {
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

    #[test]
    fn the_jittered_wait_lies_between_half_the_backoff_and_all_of_it() {
        for _ in 0..200 {
            let wait = with_jitter(MAX_RETRY);
            assert!(wait >= MAX_RETRY / 2 && wait <= MAX_RETRY, "{wait:?}");
        }
    }
}
