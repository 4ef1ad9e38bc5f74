//! The entry stream from the server: one long-lived `Sync` call that delivers a full snapshot, then
//! every change, into the cache. When the server is away the agent keeps serving what it has and
//! reconnects with exponential backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::node::ServerApi;

const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(30);

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

/// `base` plus up to half of it again, so agents that lost the server together do not return
/// together.
fn with_jitter(base: Duration) -> Duration {
    let mut random = [0u8; 2];
    let fraction = if SystemRandom::new().fill(&mut random).is_ok() {
        f64::from(u16::from_le_bytes(random)) / f64::from(u16::MAX)
    } else {
        0.5
    };
    base + base.mul_f64(fraction / 2.0)
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
        // Back: within the longest backoff (30 s plus half of it as jitter) the snapshot is in.
        assert!(cache.wait_synced(Duration::from_secs(46)).await);
        assert!(cache.entry("web").is_some());
        assert_eq!(metrics.sync_connected.get(), 1);
        assert_eq!(metrics.sync_updates.get(), 1);

        stop.send(true).expect("follower listening");
        follower.await.expect("follower ends");
        assert_eq!(metrics.sync_connected.get(), 0);
    }
}
