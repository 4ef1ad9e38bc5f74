//! The entry stream from the server: one long-lived `Sync` call that delivers a full snapshot, then
//! every change, into the cache. When the server is away the agent keeps serving what it has and
//! reconnects with exponential backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use sigil_proto::agent::SyncRequest;
use tokio::sync::watch;

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::node::ServerLink;

const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Follows the server's sync stream until `stopping` turns true.
pub async fn follow(
    link: Arc<ServerLink>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut backoff = FIRST_RETRY;
    loop {
        match link.client().sync(SyncRequest {}).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                metrics.sync_connected.set(1);
                loop {
                    let message = tokio::select! {
                        message = stream.message() => message,
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
                                && let Err(e) = link.trust(&bundle).await
                            {
                                tracing::warn!(error = %e, "cannot store the new trust bundle");
                            }
                        }
                        Ok(None) => {
                            tracing::info!("the server closed the sync stream; reconnecting");
                            break;
                        }
                        Err(status) => {
                            tracing::warn!(error = %status.message(), "the sync stream broke; serving cached SVIDs and reconnecting");
                            break;
                        }
                    }
                }
                metrics.sync_connected.set(0);
            }
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                tracing::error!(error = %status.message(), "the server refuses this agent (evicted or banned); it keeps serving cached SVIDs until they expire");
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), retry_in = ?backoff, "cannot reach the server; serving cached SVIDs");
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
