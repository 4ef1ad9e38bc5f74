//! The server's background tasks: following the change feed and the pod watch, CA rotation and
//! server SVID renewal, and pruning expired records. Each ends when the server stops.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::Error;
use crate::api::ServerState;
use crate::api::tls::ServerTls;
use crate::datastore::DataStore;
use crate::feed::Feed;
use crate::k8s::PodIdentities;

/// How often the CA checks whether an authority is due for rotation and the server SVID for
/// renewal.
const ROTATION_CHECK: Duration = Duration::from_secs(30);
/// How often expired records are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Follows the change feed for writes this process did not make (other servers sharing the
/// database, or an operator's direct change).
pub(super) async fn follow_changes<D: DataStore>(
    state: Arc<ServerState<D>>,
    interval: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        if let Err(e) = state.catch_up().await {
            tracing::warn!(error = %e, "cannot read the change feed; serving from the cache and retrying");
        }
    }
}

/// Wakes the sync streams whenever the pods behind automatic identities change.
pub(super) async fn follow_pods(
    pods: Arc<PodIdentities>,
    feed: Arc<Feed>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut changes = pods.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        feed.bump();
    }
}

/// Runs the CA journal's schedule every [`ROTATION_CHECK`] or at once when an operator changed
/// the journal, wakes the sync streams when the bundle or the tainted set changed, and renews the
/// server SVID when due.
pub(super) async fn maintain_ca<D: DataStore>(
    state: Arc<ServerState<D>>,
    tls: Arc<ServerTls>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(ROTATION_CHECK) => {}
            () = state.ca_changed.notified() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let tainted = state.ca.tainted();
        match state.ca.rotate_if_due(state.datastore.as_ref()).await {
            Ok(changed) if changed || state.ca.tainted() != tainted => {
                if let Err(e) = state.catch_up().await {
                    tracing::warn!(error = %e, "cannot read the change feed after a bundle change");
                }
                // Sync streams resend the tainted set (another server may have changed it).
                state.feed.bump();
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "CA rotation check failed; retrying"),
        }
        if let Err(e) = tls.refresh_if_due(&state) {
            tracing::error!(error = %e, "cannot renew the server SVID; retrying");
        }
    }
}

/// Removes issuance records past `retention` and day-old join tokens and change-feed events,
/// every [`PRUNE_INTERVAL`].
pub(super) async fn prune<D: DataStore>(
    state: Arc<ServerState<D>>,
    retention: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let retention = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX / 2);
    loop {
        tokio::select! {
            () = tokio::time::sleep(PRUNE_INTERVAL) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let now = state.clock.unix_now();
        let datastore = state.datastore.as_ref();
        let outcome = async {
            let svids = datastore.prune_issued_svids(now - retention).await?;
            let tokens = datastore.prune_join_tokens(now - 24 * 3600).await?;
            let events = datastore.prune_events(now - 24 * 3600).await?;
            Ok::<_, Error>((svids, tokens, events))
        }
        .await;
        match outcome {
            Ok((svids, tokens, events)) => {
                tracing::debug!(svids, tokens, events, "pruned expired records")
            }
            Err(e) => tracing::warn!(error = %e, "pruning failed; retrying later"),
        }
    }
}
