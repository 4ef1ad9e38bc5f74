//! The issuance record: every SVID the server signs is written down durably before it leaves the
//! server, because `ca revoke`'s safety check and `svid list` trust the record to know what a CA
//! still has out there.
//!
//! Signing hands each record to one writer task and waits for its receipt ([`Unrecorded`]). The
//! writer takes whatever has queued up (group commit: a batch of 100 CSRs, or 100 concurrent
//! callers, is one transaction) and writes it to the datastore. When the datastore fails or does
//! not answer within the write timeout, the batch goes to the spool instead ([`spool`], a file in
//! the data directory, fsynced before the receipts are sent), so signing keeps working through a
//! database outage; while the spool holds records every new batch joins it, and the writer
//! replays it into the datastore every [`REPLAY_INTERVAL`] until the datastore takes it all. A
//! record whose receipt was sent survives `kill -9`; a spool that is full refuses the record, and
//! with it the SVID.

mod spool;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::datastore::{IssuedSvid, IssuedSvidStore};
use crate::metrics::Metrics;
use crate::{Error, Result};
use spool::Spool;

pub use spool::SPOOL_FILE;

/// How many records go into one transaction at most.
const BATCH: usize = 1000;

/// How often a non-empty spool is offered to the datastore.
const REPLAY_INTERVAL: Duration = Duration::from_secs(1);

/// Where and how the writer keeps records.
#[derive(Debug, Clone)]
pub struct RecorderSettings {
    /// The data directory; the spool is [`SPOOL_FILE`] in it.
    pub data_dir: PathBuf,
    /// The most the spool may hold, in bytes; past it signing is refused.
    pub spool_max_bytes: u64,
    /// How long one datastore write may take before its batch is spooled instead.
    pub write_timeout: Duration,
}

/// One record on its way to the writer, with where to send its receipt.
#[derive(Debug)]
struct Pending {
    svid: IssuedSvid,
    receipt: oneshot::Sender<std::result::Result<(), String>>,
}

/// Hands signed-SVID records to the writer task.
#[derive(Debug, Clone)]
pub struct IssuanceRecorder {
    sender: mpsc::UnboundedSender<Pending>,
}

/// A signed SVID (or anything carrying one) whose record may not be durable yet. It must not
/// leave the server before [`Unrecorded::recorded`] says the record is written.
#[must_use = "an SVID leaves the server only once its record is durable: await `recorded()`"]
#[derive(Debug)]
pub struct Unrecorded<T> {
    value: T,
    receipt: oneshot::Receiver<std::result::Result<(), String>>,
}

impl<T> Unrecorded<T> {
    /// The same record's receipt, carrying `f` of the value (a proto message made from the SVID).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Unrecorded<U> {
        Unrecorded {
            value: f(self.value),
            receipt: self.receipt,
        }
    }

    /// Waits until the record is in the datastore or the spool, then gives the SVID out. Fails
    /// (and the SVID must be dropped) when neither could take it.
    pub async fn recorded(self) -> Result<T> {
        match self.receipt.await {
            Ok(Ok(())) => Ok(self.value),
            Ok(Err(reason)) => Err(Error::Unavailable(format!(
                "the SVID was signed but its issuance record could not be written, so it is not handed out: {reason}"
            ))),
            Err(_) => Err(Error::Unavailable(
                "the issuance recorder has stopped (the server is shutting down); retry on another server".into(),
            )),
        }
    }
}

impl IssuanceRecorder {
    /// Opens the spool (replaying what a previous run left there once the datastore answers)
    /// and starts the writer task over `datastore`. The task ends, after writing everything,
    /// once every clone of the recorder has been dropped; await the handle to know it is flushed.
    pub fn start<S: IssuedSvidStore + Send + Sync + 'static>(
        datastore: Arc<S>,
        settings: &RecorderSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, JoinHandle<()>)> {
        let spool = Spool::open(settings.data_dir.join(SPOOL_FILE), settings.spool_max_bytes)?;
        if !spool.is_empty() {
            tracing::warn!(
                records = spool.records(),
                "issuance records from an earlier run are waiting in the spool; they go to the datastore once it answers"
            );
        }
        metrics.issuance_spool_records.set(spool_gauge(&spool));
        let (sender, receiver) = mpsc::unbounded_channel();
        let writer = Writer {
            datastore,
            spool,
            write_timeout: settings.write_timeout,
            metrics,
        };
        let task = tokio::spawn(writer.run(receiver));
        Ok((IssuanceRecorder { sender }, task))
    }

    /// Queues one record; its receipt comes through the returned value.
    pub fn record<T>(&self, value: T, svid: IssuedSvid) -> Unrecorded<T> {
        let (receipt, waiting) = oneshot::channel();
        // A send error drops the receipt's sender, and `recorded` then says the recorder stopped.
        let _ = self.sender.send(Pending { svid, receipt });
        Unrecorded {
            value,
            receipt: waiting,
        }
    }
}

/// The writer task's state: the only owner of the spool, so appends and replays never race.
struct Writer<S> {
    datastore: Arc<S>,
    spool: Spool,
    write_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl<S: IssuedSvidStore + Send + Sync + 'static> Writer<S> {
    async fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Pending>) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut replay = tokio::time::interval(REPLAY_INTERVAL);
        replay.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = receiver.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        break;
                    }
                    self.write(&mut batch).await;
                }
                _ = replay.tick(), if !self.spool.is_empty() => self.replay().await,
            }
        }
        // Shutting down: one more chance for the datastore to take what is spooled.
        if !self.spool.is_empty() {
            self.replay().await;
        }
    }

    /// Writes one batch to the datastore, or to the spool when the datastore cannot take it or
    /// older records wait in the spool, then sends every receipt.
    async fn write(&mut self, batch: &mut Vec<Pending>) {
        let records: Vec<IssuedSvid> = batch.iter().map(|p| p.svid.clone()).collect();
        let outcome = if self.spool.is_empty() {
            match self.write_to_datastore(&records).await {
                Ok(()) => Ok(()),
                Err(reason) => {
                    tracing::warn!(
                        records = records.len(),
                        %reason,
                        "cannot write issuance records to the datastore; spooling them on local disk until it answers"
                    );
                    self.spool_records(&records)
                }
            }
        } else {
            self.spool_records(&records)
        };
        for pending in batch.drain(..) {
            let _ = pending.receipt.send(outcome.clone());
        }
    }

    async fn write_to_datastore(&self, records: &[IssuedSvid]) -> std::result::Result<(), String> {
        match tokio::time::timeout(
            self.write_timeout,
            self.datastore.record_issued_svids(records),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.write_timeout)),
        }
    }

    fn spool_records(&mut self, records: &[IssuedSvid]) -> std::result::Result<(), String> {
        let outcome = self.spool.append(records).map_err(|e| e.to_string());
        if let Err(reason) = &outcome {
            tracing::error!(records = records.len(), %reason, "cannot spool issuance records; their SVIDs are refused");
        }
        self.metrics
            .issuance_spool_records
            .set(spool_gauge(&self.spool));
        outcome
    }

    /// Offers the spool to the datastore, a batch at a time; empties it once every record is in.
    /// A batch that fails leaves the spool as it was (rows already written are skipped by the
    /// next replay, as a serial is written once).
    async fn replay(&mut self) {
        let records = match self.spool.read_all() {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the issuance spool; it stays for the next try");
                return;
            }
        };
        for chunk in records.chunks(BATCH) {
            if let Err(reason) = self.write_to_datastore(chunk).await {
                tracing::debug!(%reason, "the datastore does not take the spooled issuance records yet");
                return;
            }
        }
        match self.spool.clear() {
            Ok(()) => tracing::info!(
                records = records.len(),
                "the spooled issuance records are in the datastore"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot empty the issuance spool; it will be replayed again")
            }
        }
        self.metrics
            .issuance_spool_records
            .set(spool_gauge(&self.spool));
    }
}

fn spool_gauge(spool: &Spool) -> i64 {
    i64::try_from(spool.records()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
