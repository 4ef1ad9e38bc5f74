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
                Err(status) => {
                    failed = true;
                    tracing::warn!(entry = %entry_id, error = %status.message(), "SVID renewal failed; keeping the current SVID and retrying");
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
