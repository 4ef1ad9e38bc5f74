//! A fake server for the agent's unit tests: a CA in memory that signs every CSR it is sent (or
//! refuses the entries it was told to), records each batch, and can be taken away.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use rcgen::{Issuer, KeyPair};
use sigil_core::bundle::TrustBundle;
use sigil_core::clock::SharedClock;
use sigil_core::id::parse_trust_domain;
use sigil_core::x509::{KeyType, check_csr, leaf_params, root_ca_params};
use sigil_proto::agent::{
    SignJwtSvidResponse, SyncRequest, SyncResponse, X509SvidRequest, X509SvidResult,
};
use sigil_proto::common;
use tonic::{Code, Status};

use super::{ServerApi, SyncStream};
use crate::cache::{Cache, Signer, SignerSettings};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// The fake server.
pub(crate) struct FakeServer {
    issuer: Issuer<'static, KeyPair>,
    /// The entry ids of each `BatchSignX509Svid` call, in call order.
    pub(crate) batches: Mutex<Vec<Vec<String>>>,
    /// Entries the server refuses, with the status it answers.
    pub(crate) refused: Mutex<HashMap<String, (Code, String)>>,
    /// While true every call fails with `Unavailable`.
    pub(crate) down: AtomicBool,
    /// What a `Sync` stream sends before it goes quiet.
    pub(crate) sync_messages: Mutex<Vec<SyncResponse>>,
    /// The entry ids of each `SignJwtSvid` call, in call order.
    pub(crate) jwt_calls: Mutex<Vec<String>>,
    /// How many `Sync` calls were made (answered or not).
    pub(crate) sync_opens: AtomicUsize,
    /// The request of every `Sync` call, in call order.
    pub(crate) sync_requests: Mutex<Vec<SyncRequest>>,
    /// Ends every open `Sync` stream with an error, as a server that dies would.
    breaker: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for FakeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeServer").finish_non_exhaustive()
    }
}

impl FakeServer {
    /// A server for `example.org` with a fresh CA.
    pub(crate) fn new() -> Self {
        let trust_domain = parse_trust_domain("trust_domain", "example.org").expect("td");
        let key = KeyType::EcP256.generate().expect("key");
        let params = root_ca_params(
            &trust_domain,
            SystemTime::now(),
            Duration::from_secs(86_400),
        )
        .expect("ca params");
        FakeServer {
            issuer: Issuer::new(params, key),
            batches: Mutex::default(),
            refused: Mutex::default(),
            down: AtomicBool::new(false),
            sync_messages: Mutex::default(),
            jwt_calls: Mutex::default(),
            sync_opens: AtomicUsize::new(0),
            sync_requests: Mutex::default(),
            breaker: Arc::default(),
        }
    }

    /// Breaks every open `Sync` stream.
    pub(crate) fn break_streams(&self) {
        self.breaker.notify_waiters();
    }

    /// The entry ids of every call so far, each batch sorted.
    pub(crate) fn calls(&self) -> Vec<Vec<String>> {
        let mut calls = self.batches.lock().expect("lock").clone();
        for call in &mut calls {
            call.sort();
        }
        calls
    }

    fn sign(&self, request: &X509SvidRequest) -> X509SvidResult {
        if let Some((code, message)) = self.refused.lock().expect("lock").get(&request.entry_id) {
            return X509SvidResult {
                entry_id: request.entry_id.clone(),
                svid: None,
                error_code: *code as i32,
                error_message: message.clone(),
            };
        }
        let csr = check_csr(&request.csr).expect("the agent sends valid CSRs");
        let id = csr.spiffe_id.expect("the agent names the entry's ID");
        let now = SystemTime::now();
        let params = leaf_params(&id, &[], now, now + Duration::from_secs(3600)).expect("params");
        let certificate = params
            .signed_by(&csr.public_key, &self.issuer)
            .expect("signed");
        X509SvidResult {
            entry_id: request.entry_id.clone(),
            svid: Some(common::X509Svid {
                spiffe_id: id.to_string(),
                cert_chain: vec![certificate.der().to_vec()],
                expires_at: 0,
                serial: String::new(),
            }),
            error_code: 0,
            error_message: String::new(),
        }
    }

    /// Fails `call` as a transport error would while the server is down.
    fn check_up(&self, call: &'static str) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Refused {
                call,
                status: Status::unavailable("connection refused"),
            });
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ServerApi for FakeServer {
    async fn batch_sign_x509(&self, requests: Vec<X509SvidRequest>) -> Result<Vec<X509SvidResult>> {
        self.check_up("BatchSignX509Svid")?;
        self.batches
            .lock()
            .expect("lock")
            .push(requests.iter().map(|r| r.entry_id.clone()).collect());
        Ok(requests.iter().map(|request| self.sign(request)).collect())
    }

    async fn sign_jwt(&self, entry_id: &str, _audience: &[String]) -> Result<SignJwtSvidResponse> {
        self.check_up("SignJwtSvid")?;
        if let Some((code, message)) = self.refused.lock().expect("lock").get(entry_id) {
            return Err(Error::Refused {
                call: "SignJwtSvid",
                status: Status::new(*code, message.clone()),
            });
        }
        let mut calls = self.jwt_calls.lock().expect("lock");
        calls.push(entry_id.to_string());
        let expires_at = sigil_core::clock::unix_seconds(SystemTime::now()) + 300;
        Ok(SignJwtSvidResponse {
            spiffe_id: format!("spiffe://example.org/{entry_id}"),
            token: format!("jwt-{entry_id}-{}", calls.len()),
            expires_at,
        })
    }

    async fn sync(&self, request: SyncRequest) -> Result<SyncStream> {
        self.sync_opens.fetch_add(1, Ordering::SeqCst);
        self.sync_requests.lock().expect("lock").push(request);
        self.check_up("Sync")?;
        let messages: Vec<Result<SyncResponse>> = self
            .sync_messages
            .lock()
            .expect("lock")
            .iter()
            .cloned()
            .map(Ok)
            .collect();
        // Registered now, so a break that comes before the stream is polled still ends it.
        let broken = self.breaker.clone().notified_owned();
        let broken = futures::stream::once(async move {
            broken.await;
            Err(Error::Refused {
                call: "Sync",
                status: Status::unavailable("connection reset"),
            })
        });
        Ok(Box::pin(futures::stream::iter(messages).chain(broken)))
    }

    async fn trust(&self, _bundle: &TrustBundle) -> Result<()> {
        Ok(())
    }
}

/// Spawns the task `start` makes from a stop signal, with the sender that stops it: how the
/// tests run the agent's background loops.
pub(crate) fn spawn_stoppable<F>(
    start: impl FnOnce(tokio::sync::watch::Receiver<bool>) -> F,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<F::Output>,
)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (stop, stopping) = tokio::sync::watch::channel(false);
    (stop, tokio::spawn(start(stopping)))
}

/// An entry as the server sends it: `spiffe://example.org/<id>` for the callers with
/// `unix:uid:<uid>`, under one agent.
pub(crate) fn sync_entry(id: &str, uid: &str, revision: u64) -> common::Entry {
    unix_entry(id, &[&format!("uid:{uid}")], revision, 0)
}

/// An entry as the server sends it: `spiffe://example.org/<id>` for the callers with all the
/// `unix` selectors `values` (e.g. `uid:1000`), under one agent, expiring at `expires_at` (0:
/// never).
pub(crate) fn unix_entry(
    id: &str,
    values: &[&str],
    revision: u64,
    expires_at: i64,
) -> common::Entry {
    common::Entry {
        id: id.into(),
        spiffe_id: format!("spiffe://example.org/{id}"),
        parent_id: "spiffe://example.org/sigil/agent/x".into(),
        selectors: values
            .iter()
            .map(|value| common::Selector {
                r#type: "unix".into(),
                value: (*value).into(),
            })
            .collect(),
        revision,
        expires_at,
        ..common::Entry::default()
    }
}

/// The first message of a sync stream: the whole set of `entries`.
pub(crate) fn snapshot(entries: Vec<common::Entry>) -> SyncResponse {
    SyncResponse {
        full_snapshot: true,
        entries,
        ..SyncResponse::default()
    }
}

/// An empty cache for `example.org` on `clock`.
pub(crate) fn empty_cache(
    clock: SharedClock,
    metrics: Arc<Metrics>,
    bundle: Option<TrustBundle>,
) -> Arc<Cache> {
    let trust_domain = parse_trust_domain("trust_domain", "example.org").expect("td");
    Arc::new(Cache::new(trust_domain, clock, metrics, bundle))
}

/// A signer over `server` batching up to 10 requests in a 5 ms window.
pub(crate) fn test_signer(
    server: &Arc<FakeServer>,
    cache: &Arc<Cache>,
    metrics: &Arc<Metrics>,
) -> Signer {
    Signer::start(
        server.clone(),
        cache.clone(),
        metrics.clone(),
        SignerSettings {
            max_batch: 10,
            window: Duration::from_millis(5),
        },
    )
}

/// Asserts that a client would get `code` with a message containing every one of `parts`.
pub(crate) fn assert_status(refusal: impl Into<Status>, code: Code, parts: &[&str]) {
    let status = refusal.into();
    assert_eq!(status.code(), code, "{status:?}");
    for part in parts {
        assert!(
            status.message().contains(part),
            "{part:?} not in {status:?}"
        );
    }
}
