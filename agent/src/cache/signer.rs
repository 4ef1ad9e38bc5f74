//! Batches CSRs to the server: requests that arrive within a short window (or until a batch is
//! full) go out as one `BatchSignX509Svid` call. Several waiters for the same entry share one
//! signature.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sigil_core::entry::Entry;
use sigil_core::secret::PrivateKey;
use sigil_core::x509::{KeyType, certificate_facts, csr_for};
use sigil_proto::agent::X509SvidRequest;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

use super::{Cache, CachedSvid, renewal_time};
use crate::metrics::Metrics;
use crate::node::ServerApi;
use crate::{Error, Result};

/// How batches are formed.
#[derive(Debug, Clone, Copy)]
pub struct SignerSettings {
    /// CSRs per call at most.
    pub max_batch: usize,
    /// How long the first request waits for company.
    pub window: Duration,
}

/// Every waiter for an entry gets the same outcome, so a failure is shared.
type Outcome = Result<Arc<CachedSvid>, Arc<Error>>;

type Reply = oneshot::Sender<Outcome>;

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
        server: Arc<dyn ServerApi>,
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        settings: SignerSettings,
    ) -> Self {
        let (sender, receiver) = mpsc::channel(4096);
        tokio::spawn(batch_requests(server, cache, metrics, settings, receiver));
        Signer { sender }
    }

    /// Signs a fresh SVID for `entry` (with a new key) and stores it in the cache.
    pub async fn sign(&self, entry: Arc<Entry>) -> Result<Arc<CachedSvid>> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request { entry, reply })
            .await
            .map_err(|_| Error::Stopping)?;
        answer
            .await
            .map_err(|_| Error::Stopping)?
            .map_err(Error::Shared)
    }
}

async fn batch_requests(
    server: Arc<dyn ServerApi>,
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
            server.clone(),
            cache.clone(),
            metrics.clone(),
            batch,
        ));
    }
}

async fn sign_batch(
    server: Arc<dyn ServerApi>,
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
            .and_then(|key| Ok((csr_for(&key, Some(&entry.spiffe_id))?, key)));
        match prepared {
            Ok((csr, key)) => {
                requests.push(X509SvidRequest {
                    entry_id: entry.id.clone(),
                    csr,
                });
                pending.push((entry, key, waiters));
            }
            Err(e) => answer(waiters, Err(Arc::new(e.into()))),
        }
    }
    if requests.is_empty() {
        return;
    }
    let results = match server.batch_sign_x509(requests).await {
        Ok(results) => results,
        Err(e) => {
            let failure = Arc::new(e.server_away("an SVID"));
            for (_, _, waiters) in pending {
                answer(waiters, Err(failure.clone()));
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
                    Some(Err(e)) => Err(Arc::new(Error::UnreadableSvid(e))),
                    None => Err(Arc::new(Error::EmptyChain)),
                }
            }
            _ => {
                tracing::warn!(entry = %entry.id, code = result.error_code, error = %result.error_message, "the server refused an SVID");
                Err(Arc::new(Error::Refused {
                    call: "BatchSignX509Svid",
                    status: Status::new(Code::from(result.error_code), result.error_message),
                }))
            }
        };
        answer(waiters, outcome);
    }
}

fn answer(waiters: Vec<Reply>, outcome: Outcome) {
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use sigil_core::clock::{ManualClock, SharedClock};

    use super::*;
    use crate::node::fake::{FakeServer, assert_status, empty_cache, snapshot, sync_entry};

    /// Asks `signer` for the SVIDs of the cached entries `ids` at once, in that order.
    async fn sign_together(
        signer: &Signer,
        cache: &Cache,
        ids: &[&str],
    ) -> Vec<Result<Arc<CachedSvid>>> {
        let requests = ids
            .iter()
            .map(|id| signer.sign(cache.entry(id).expect("a test entry")));
        futures::future::join_all(requests).await
    }

    fn signer(max_batch: usize) -> (Arc<FakeServer>, Arc<Cache>, Signer) {
        let server = Arc::new(FakeServer::new());
        let clock: SharedClock = Arc::new(ManualClock::new(std::time::SystemTime::now()));
        let metrics = Arc::new(Metrics::default());
        let cache = empty_cache(clock, metrics.clone(), None);
        // The cache keeps SVIDs only of entries it holds.
        cache.apply_sync(&snapshot(
            ["web", "db", "a", "b", "c", "d", "one", "two"]
                .iter()
                .map(|id| sync_entry(id, "1000", 1))
                .collect(),
        ));
        let signer = Signer::start(
            server.clone(),
            cache.clone(),
            metrics,
            SignerSettings {
                max_batch,
                window: Duration::from_millis(5),
            },
        );
        (server, cache, signer)
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_one_window_share_a_call_and_an_entry_shares_one_csr() {
        let (server, cache, signer) = signer(100);
        let signed = sign_together(&signer, &cache, &["web", "db", "web"]).await;
        let [web, db, web_again] = <[_; 3]>::try_from(signed).expect("three answers");
        let (web, db, web_again) = (web.expect("web"), db.expect("db"), web_again.expect("web"));
        assert_eq!(
            server.calls(),
            vec![vec!["db".to_string(), "web".to_string()]]
        );
        assert_eq!(web.chain, web_again.chain, "two waiters, one signature");
        assert_ne!(web.chain, db.chain);
        assert!(cache.any_svid("web").is_some() && cache.any_svid("db").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_at_once_and_a_late_request_makes_a_new_call() {
        let (server, cache, signer) = signer(2);
        let signed = sign_together(&signer, &cache, &["a", "b", "c"]).await;
        assert!(signed.iter().all(Result::is_ok));
        assert_eq!(
            server.calls(),
            vec![
                vec!["a".to_string(), "b".to_string()],
                vec!["c".to_string()]
            ]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(sign_together(&signer, &cache, &["d"]).await[0].is_ok());
        assert_eq!(server.calls().len(), 3, "{:?}", server.calls());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_reaches_its_entry_only_and_an_absent_server_every_waiter() {
        let (server, cache, signer) = signer(100);
        server.refused.lock().expect("lock").insert(
            "db".into(),
            (Code::PermissionDenied, "not authorized for db".into()),
        );
        let [web, db] = <[_; 2]>::try_from(sign_together(&signer, &cache, &["web", "db"]).await)
            .expect("two answers");
        assert!(web.is_ok());
        assert_status(
            db.expect_err("db is refused"),
            Code::PermissionDenied,
            &["not authorized for db"],
        );
        assert!(
            cache.any_svid("db").is_none(),
            "nothing stored for a refusal"
        );

        server.down.store(true, Ordering::SeqCst);
        for outcome in sign_together(&signer, &cache, &["one", "two"]).await {
            assert_status(
                outcome.expect_err("the server is away"),
                Code::Unavailable,
                &["cannot get an SVID from the server now"],
            );
        }
    }
}
