//! Renews cached SVIDs when they are due, so workloads always receive the new SVID well before the
//! old one expires.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Cache, Signer};
use crate::metrics::Metrics;

/// After a failed renewal, wait this long before trying again (the old SVID stays in use).
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Runs until `stopping` turns true.
pub async fn keep_svids_fresh(
    cache: Arc<Cache>,
    signer: Signer,
    metrics: Arc<Metrics>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut changes = cache.subscribe();
    loop {
        changes.borrow_and_update();
        let now = cache.clock().unix_now();
        let (due, next) = cache.renewals(now);
        let mut failed = false;
        let renewals = due
            .into_iter()
            .filter_map(|id| cache.entry(&id))
            .map(|entry| {
                let signer = signer.clone();
                async move { (entry.id.clone(), signer.sign(entry).await) }
            });
        for (entry_id, outcome) in futures::future::join_all(renewals).await {
            match outcome {
                Ok(_) => {
                    metrics.svid_renewals.inc();
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(entry = %entry_id, error = %e, "SVID renewal failed; keeping the current SVID and retrying");
                }
            }
        }
        let wait = if failed {
            RETRY_AFTER
        } else {
            next.map_or(Duration::from_secs(3600), |at| {
                Duration::from_secs(u64::try_from(at - cache.clock().unix_now()).unwrap_or(0))
            })
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            changed = changes.changed() => if changed.is_err() { return },
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::node::fake::{
        FakeServer, empty_cache, snapshot, spawn_stoppable, sync_entry, test_signer,
    };
    use sigil_core::clock::{Clock, ManualClock};

    #[tokio::test(start_paused = true)]
    async fn an_svid_is_renewed_when_due_and_a_failed_renewal_keeps_the_old_one() {
        // The fake server signs for the real time; the cache's clock starts there and is moved
        // by hand.
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let start = clock.unix_now();
        let server = Arc::new(FakeServer::new());
        let metrics = Arc::new(Metrics::default());
        let cache = empty_cache(clock.clone(), metrics.clone(), None);
        cache.apply_sync(&snapshot(vec![sync_entry("web", "1000", 1)]));
        let signer = test_signer(&server, &cache, &metrics);
        let web = cache.entry("web").expect("web");
        let first = signer.sign(web.clone()).await.expect("signed");
        let due = first.renew_at - start;
        assert!(due > 0, "renewal lies ahead");

        let (stop, task) = spawn_stoppable(|stopping| {
            keep_svids_fresh(cache.clone(), signer.clone(), metrics.clone(), stopping)
        });
        // Not yet due: nothing happens however long the task sleeps.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(server.calls().len(), 1);

        // Due, but the server is away: the old SVID stays, the task retries.
        server.down.store(true, std::sync::atomic::Ordering::SeqCst);
        clock.advance(Duration::from_secs(due.unsigned_abs()));
        cache.bump();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(cache.any_svid("web").expect("kept").chain, first.chain);
        assert_eq!(metrics.svid_renewals.get(), 0);

        // Back: the next retry renews it.
        server
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(RETRY_AFTER * 2).await;
        let renewed = cache.current_svid(&web).expect("renewed");
        assert_ne!(renewed.chain, first.chain);
        assert_eq!(metrics.svid_renewals.get(), 1);

        stop.send(true).expect("task listening");
        task.await.expect("task ends");
    }
}
