//! Batches CSRs to the server: requests that arrive within a short window (or until a batch is
//! full) go out as one `BatchSignX509Svid` call. Several waiters for the same entry share one
//! signature.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sigil_core::entry::Entry;
use sigil_core::secret::PrivateKey;
use sigil_core::x509::{KeyType, certificate_facts, csr_for};
use sigil_proto::agent::{BatchSignX509SvidRequest, X509SvidRequest};
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

use super::{Cache, CachedSvid, renewal_time};
use crate::metrics::Metrics;
use crate::node::ServerLink;

/// How batches are formed.
#[derive(Debug, Clone, Copy)]
pub struct SignerSettings {
    /// CSRs per call at most.
    pub max_batch: usize,
    /// How long the first request waits for company.
    pub window: Duration,
}

type Reply = oneshot::Sender<Result<Arc<CachedSvid>, Status>>;

struct Request {
    entry: Arc<Entry>,
    reply: Reply,
}

/// Hands entries to the batching task and awaits their SVIDs.
#[derive(Debug, Clone)]
pub struct Signer {
    sender: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("entry", &self.entry.id)
            .finish()
    }
}

impl Signer {
    /// Starts the batching task; it ends when every `Signer` clone is dropped.
    pub fn start(
        link: Arc<ServerLink>,
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        settings: SignerSettings,
    ) -> Self {
        let (sender, receiver) = mpsc::channel(4096);
        tokio::spawn(batch_requests(link, cache, metrics, settings, receiver));
        Signer { sender }
    }

    /// Signs a fresh SVID for `entry` (with a new key) and stores it in the cache.
    pub async fn sign(&self, entry: Arc<Entry>) -> Result<Arc<CachedSvid>, Status> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request { entry, reply })
            .await
            .map_err(|_| Status::unavailable("the agent is stopping"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the agent is stopping"))?
    }
}

async fn batch_requests(
    link: Arc<ServerLink>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    settings: SignerSettings,
    mut receiver: mpsc::Receiver<Request>,
) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + settings.window;
        while batch.len() < settings.max_batch {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(request)) => batch.push(request),
                Ok(None) | Err(_) => break,
            }
        }
        tokio::spawn(sign_batch(
            link.clone(),
            cache.clone(),
            metrics.clone(),
            batch,
        ));
    }
}

async fn sign_batch(
    link: Arc<ServerLink>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    batch: Vec<Request>,
) {
    // One CSR per entry, however many waiters it has.
    let mut by_entry: HashMap<String, (Arc<Entry>, Vec<Reply>)> = HashMap::new();
    for request in batch {
        by_entry
            .entry(request.entry.id.clone())
            .or_insert_with(|| (request.entry.clone(), Vec::new()))
            .1
            .push(request.reply);
    }
    let mut pending = Vec::with_capacity(by_entry.len());
    let mut requests = Vec::with_capacity(by_entry.len());
    for (_, (entry, waiters)) in by_entry {
        let prepared = KeyType::EcP256
            .generate()
            .map_err(|e| Status::internal(e.to_string()))
            .and_then(|key| {
                Ok((
                    csr_for(&key, Some(&entry.spiffe_id))
                        .map_err(|e| Status::internal(e.to_string()))?,
                    key,
                ))
            });
        match prepared {
            Ok((csr, key)) => {
                requests.push(X509SvidRequest {
                    entry_id: entry.id.clone(),
                    csr,
                });
                pending.push((entry, key, waiters));
            }
            Err(status) => answer(waiters, Err(status)),
        }
    }
    if requests.is_empty() {
        return;
    }
    let response = link
        .client()
        .batch_sign_x509_svid(BatchSignX509SvidRequest { requests })
        .await;
    let results = match response {
        Ok(response) => response.into_inner().results,
        Err(status) => {
            let status = Status::unavailable(format!(
                "cannot get an SVID from the server now: {}",
                status.message()
            ));
            for (_, _, waiters) in pending {
                answer(waiters, Err(status.clone()));
            }
            return;
        }
    };
    let now = cache.clock().unix_now();
    for ((entry, key, waiters), result) in pending.into_iter().zip(results) {
        let outcome = match result.svid {
            Some(svid) if result.error_code == 0 => {
                match svid.cert_chain.first().map(|leaf| certificate_facts(leaf)) {
                    Some(Ok(facts)) => {
                        let cached = CachedSvid {
                            entry_id: entry.id.clone(),
                            entry_revision: entry.revision,
                            chain: svid.cert_chain,
                            key: PrivateKey::new(key.serialize_der()),
                            not_before: facts.not_before,
                            not_after: facts.not_after,
                            // From now, not from the back-dated NotBefore, so renewal comes at half the
                            // lifetime actually left.
                            renew_at: renewal_time(now, facts.not_after),
                            authority_id: facts.authority_key_id,
                        };
                        metrics.svids_signed.inc();
                        cache.store_svid(cached.clone());
                        Ok(Arc::new(cached))
                    }
                    Some(Err(e)) => Err(Status::internal(format!(
                        "the server sent an unreadable SVID: {e}"
                    ))),
                    None => Err(Status::internal("the server sent an empty chain")),
                }
            }
            _ => {
                tracing::warn!(entry = %entry.id, code = result.error_code, error = %result.error_message, "the server refused an SVID");
                Err(Status::new(
                    Code::from(result.error_code),
                    result.error_message,
                ))
            }
        };
        answer(waiters, outcome);
    }
}

fn answer(waiters: Vec<Reply>, outcome: Result<Arc<CachedSvid>, Status>) {
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}
