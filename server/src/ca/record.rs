//! The issuance record: every SVID the server signs is written to the datastore, in batches, by a
//! background task, so signing never waits on a row.
//!
//! On a clean stop the recorder is closed and flushed before the datastore closes, so every SVID
//! signed before the stop is listed afterwards. A failed write is retried, never dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::datastore::{DataStore, IssuedSvid};

/// How many records go into one transaction at most.
const BATCH: usize = 1000;

/// Hands signed-SVID records to the background writer.
#[derive(Debug, Clone)]
pub struct IssuanceRecorder {
    sender: mpsc::UnboundedSender<IssuedSvid>,
}

impl IssuanceRecorder {
    /// Starts the writer task over `datastore`. The task ends, after writing everything, once
    /// every clone of the recorder has been dropped; await the handle to know it is flushed.
    pub fn start<D: DataStore>(datastore: Arc<D>) -> (Self, JoinHandle<()>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(write_batches(datastore, receiver));
        (IssuanceRecorder { sender }, task)
    }

    /// Queues one record. Never blocks.
    pub fn record(&self, svid: IssuedSvid) {
        if self.sender.send(svid).is_err() {
            tracing::error!("the issuance recorder has stopped; an issued SVID was not recorded");
        }
    }
}

async fn write_batches<D: DataStore>(
    datastore: Arc<D>,
    mut receiver: mpsc::UnboundedReceiver<IssuedSvid>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while receiver.recv_many(&mut batch, BATCH).await > 0 {
        let mut backoff = Duration::from_millis(100);
        loop {
            match datastore.record_issued_svids(&batch).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, records = batch.len(), "cannot write issued-SVID records; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        batch.clear();
    }
}
