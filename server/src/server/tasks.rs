//! The server's background tasks: following the change feed (pushed by Postgres, polled as a
//! safety net) and the pod watch, CA rotation and server SVID renewal, and pruning expired
//! records. Each ends when the server stops.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::Error;
use crate::api::ServerState;
use crate::api::tls::ServerTls;
use crate::ca::Ca;
use crate::datastore::{ChangeFeed, DataStore};
use crate::feed::Feed;
use crate::k8s::PodIdentities;

/// How often the CA checks whether an authority is due for rotation and the server SVID for
/// renewal.
const ROTATION_CHECK: Duration = Duration::from_secs(30);
/// How often expired records are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// While the Postgres `LISTEN` connection is up, other servers' writes arrive as notifications
/// and the feed is polled only every this many `change_poll_interval`s (5 s by default): a
/// safety net for a notification lost in a reconnect, not the way changes travel.
const PUSH_POLL_FACTOR: u32 = 5;
/// The first wait before listening again after a failure; it doubles up to [`LISTEN_RETRY_MAX`].
const LISTEN_RETRY_MIN: Duration = Duration::from_millis(250);
/// The longest wait between attempts to listen while Postgres is away; the feed is polled every
/// `change_poll_interval` meanwhile.
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);
/// How long one attempt to open the `LISTEN` connection may take.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Follows the change feed for writes this process did not make (other servers sharing the
/// database, or an operator's direct change): at once when Postgres notifies a commit, and by
/// polling, every `interval` where nothing pushes (SQLite, or Postgres while the listener is
/// down) and every [`PUSH_POLL_FACTOR`] `interval`s as a safety net while it is up.
pub(super) async fn follow_changes<D: DataStore>(
    state: Arc<ServerState<D>>,
    interval: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    // The listener runs beside the poll in this task rather than in a `select!` arm of it, so
    // waiting for a notification is never cancelled halfway through reading one.
    let (wake, mut woken) = mpsc::channel(1);
    let (live, is_live) = watch::channel(false);
    let listen = async {
        listen_for_changes(state.datastore.as_ref(), interval, &wake, &live).await;
        std::future::pending::<()>().await;
    };
    let poll = async {
        loop {
            let wait = if *is_live.borrow() {
                interval.saturating_mul(PUSH_POLL_FACTOR)
            } else {
                interval
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = woken.recv() => {}
            }
            if let Err(e) = state.catch_up().await {
                tracing::warn!(error = %e, "cannot read the change feed; serving from the cache and retrying");
            }
        }
    };
    tokio::select! {
        () = listen => {}
        () = poll => {}
        _ = stopped.wait_for(|stop| *stop) => {}
    }
}

/// Keeps a `LISTEN` connection open while the datastore can push, opening it again after a
/// backoff (from [`LISTEN_RETRY_MIN`], doubling up to [`LISTEN_RETRY_MAX`]) when it is lost or
/// cannot be had. Wakes the poll through `wake` on every notification, and whenever the
/// connection opens or is lost (what committed while there was none was never notified, and the
/// poll must switch between its two intervals); says in `live` whether it is open. Returns at once
/// where the datastore cannot push (SQLite).
async fn listen_for_changes<D: ChangeFeed>(
    datastore: &D,
    interval: Duration,
    wake: &mpsc::Sender<()>,
    live: &watch::Sender<bool>,
) {
    let mut backoff = LISTEN_RETRY_MIN;
    loop {
        let attempt = tokio::time::timeout(LISTEN_TIMEOUT, datastore.listen())
            .await
            .unwrap_or_else(|_| {
                Err(Error::DatastoreUnavailable(format!(
                    "no LISTEN connection within {LISTEN_TIMEOUT:?}"
                )))
            });
        match attempt {
            Ok(Some(mut listener)) => {
                tracing::info!(
                    safety_poll = ?interval.saturating_mul(PUSH_POLL_FACTOR),
                    "following other servers' writes as Postgres notifies them"
                );
                live.send_replace(true);
                // A full channel already holds a wake-up: one is as good as several.
                let _ = wake.try_send(());
                let lost = loop {
                    match listener.changed().await {
                        Ok(()) => {
                            // A notification proves the connection: the next loss starts afresh.
                            backoff = LISTEN_RETRY_MIN;
                            let _ = wake.try_send(());
                        }
                        Err(e) => break e,
                    }
                };
                live.send_replace(false);
                let _ = wake.try_send(());
                tracing::warn!(error = %lost, retry_in = ?backoff, poll = ?interval, "lost the connection that listens for other servers' writes; polling the change feed until it is back");
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, poll = ?interval, "cannot listen for other servers' writes; polling the change feed meanwhile");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = backoff.saturating_mul(2).min(LISTEN_RETRY_MAX);
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

/// Runs the CA journal's schedule every [`ROTATION_CHECK`], at once when an operator changed
/// the journal through this server, and at once when the change feed brought a journal change
/// from any server (so another server's new, tainted or revoked authority is in this server's
/// bundle within the feed's latency, not at the next check); renews the server SVID when due.
pub(super) async fn maintain_ca<D: DataStore>(
    state: Arc<ServerState<D>>,
    tls: Arc<ServerTls>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(ROTATION_CHECK) => {}
            () = state.ca_changed.notified() => {}
            () = state.feed.journal_changed() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        keep_ca_in_step(&state.ca, &state.feed, state.datastore.as_ref()).await;
        if let Err(e) = tls.refresh_if_due(&state).await {
            tracing::error!(error = %e, "cannot renew the server SVID; retrying");
        }
    }
}

/// Carries out this server's part of the journal's schedule and rebuilds the own bundle and the
/// tainted set from every server's authorities; when either changed, applies the stored bundle
/// to the mirror at once and wakes the sync streams, which resend the tainted set (another
/// server may have changed it, and no bundle event announces that).
async fn keep_ca_in_step<D: DataStore>(ca: &Ca, feed: &Feed, datastore: &D) {
    let tainted = ca.tainted();
    match ca.rotate_if_due(datastore).await {
        Ok(changed) if changed || ca.tainted() != tainted => {
            if let Err(e) = feed.catch_up(datastore).await {
                tracing::warn!(error = %e, "cannot read the change feed after a bundle change");
            }
            feed.bump();
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "CA rotation check failed; retrying"),
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

#[cfg(test)]
mod tests;
