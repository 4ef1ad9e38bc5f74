//! A workload that fetches its X509-SVIDs continuously with the `spiffe` crate's client and
//! judges every answer as a workload would: each SVID unexpired and its chain verifying (webpki,
//! through rustls' client-certificate verifier) against the bundle the same answer carries. Every
//! answer is kept with its time, so a fault step can ask afterwards what the workload saw while the
//! fault lasted; every serial it was handed is kept for the issuance-record check.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls_pki_types::{CertificateDer, UnixTime};

/// How often the workload fetches.
const FETCH_INTERVAL: Duration = Duration::from_millis(100);

/// How long one fetch may take before it counts as failed: an agent that hangs fails the workload
/// as surely as one that refuses.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One fetch and what the workload made of it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// When the answer (or the error) arrived.
    pub at: Instant,
    /// Why the fetch failed, if it did.
    pub failure: Option<Failure>,
    /// The SPIFFE IDs of the SVIDs served (all valid when there is no failure).
    pub ids: Vec<String>,
    /// The serials of those SVIDs, lower-case hex.
    pub serials: Vec<String>,
    /// The authority key id of each SVID's issuer (the id `sigil-server ca show` lists).
    pub issuers: Vec<String>,
    /// How many X.509 roots the own trust domain's bundle held.
    pub roots: usize,
}

/// A failed fetch.
#[derive(Debug, Clone)]
pub enum Failure {
    /// No answer: the call failed or timed out (agent down, `Unavailable`, ...).
    Fetch(String),
    /// An answer a workload must not accept: an expired SVID, or a chain that does not verify
    /// against the bundle served with it.
    Invalid(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Fetch(why) => write!(f, "fetch failed: {why}"),
            Failure::Invalid(why) => write!(f, "invalid answer: {why}"),
        }
    }
}

#[derive(Debug, Default)]
struct Seen {
    answers: Vec<Answer>,
    /// Every serial ever served, with its SPIFFE ID.
    serials: BTreeMap<String, String>,
}

/// A workload fetching from one agent's socket, in a task of its own until dropped.
#[derive(Debug)]
pub struct Watcher {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

impl Watcher {
    /// Starts fetching from the agent at `endpoint` (`unix://...`), trusting the bundle of
    /// `trust_domain` that each answer carries.
    pub fn start(endpoint: String, trust_domain: &str) -> anyhow::Result<Self> {
        let trust_domain = spiffe::TrustDomain::new(trust_domain)?;
        let watcher = Watcher {
            seen: Arc::default(),
            stop: Arc::default(),
        };
        let (seen, stop) = (watcher.seen.clone(), watcher.stop.clone());
        tokio::spawn(async move {
            let mut client = None;
            while !stop.load(Ordering::Relaxed) {
                let answer = fetch_once(&mut client, &endpoint, &trust_domain).await;
                if let Ok(mut seen) = seen.lock() {
                    for (serial, id) in answer.serials.iter().zip(&answer.ids) {
                        seen.serials.insert(serial.clone(), id.clone());
                    }
                    seen.answers.push(answer);
                }
                tokio::time::sleep(FETCH_INTERVAL).await;
            }
        });
        Ok(watcher)
    }

    /// A mark in the answers: [`Watcher::since`] gives the ones that came after it.
    pub fn mark(&self) -> usize {
        self.seen.lock().map(|s| s.answers.len()).unwrap_or(0)
    }

    /// The answers after `mark`.
    pub fn since(&self, mark: usize) -> Vec<Answer> {
        self.seen
            .lock()
            .map(|s| s.answers.get(mark..).unwrap_or_default().to_vec())
            .unwrap_or_default()
    }

    /// Every serial the workload was ever served, with its SPIFFE ID.
    pub fn serials(&self) -> BTreeMap<String, String> {
        self.seen
            .lock()
            .map(|s| s.serials.clone())
            .unwrap_or_default()
    }

    /// Waits (at most `timeout`) for an answer after `mark` that `wanted` accepts; its time.
    pub async fn wait_for(
        &self,
        mark: usize,
        timeout: Duration,
        wanted: impl Fn(&Answer) -> bool,
    ) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.since(mark).iter().find(|a| wanted(a)) {
                return Some(found.at);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One `FetchX509SVID` (the first message of the stream, as `fetch_x509_context` takes it), with
/// a new connection whenever the last one failed (the agent may have restarted).
async fn fetch_once(
    client: &mut Option<spiffe::WorkloadApiClient>,
    endpoint: &str,
    trust_domain: &spiffe::TrustDomain,
) -> Answer {
    let fetched = tokio::time::timeout(FETCH_TIMEOUT, async {
        if client.is_none() {
            *client = Some(spiffe::WorkloadApiClient::connect_to(endpoint).await?);
        }
        match client.as_ref() {
            Some(connected) => connected.fetch_x509_context().await,
            None => unreachable!("connected just above"),
        }
    })
    .await;
    let failed = |why: String| Answer {
        at: Instant::now(),
        failure: Some(Failure::Fetch(why)),
        ids: Vec::new(),
        serials: Vec::new(),
        issuers: Vec::new(),
        roots: 0,
    };
    match fetched {
        Err(_) => {
            *client = None;
            failed(format!("no answer within {FETCH_TIMEOUT:?}"))
        }
        Ok(Err(e)) => {
            *client = None;
            failed(e.to_string())
        }
        Ok(Ok(context)) => judge(&context, trust_domain),
    }
}

/// What a careful workload makes of an answer: every SVID unexpired and verifying against the
/// bundle of its trust domain served with it.
fn judge(context: &spiffe::X509Context, trust_domain: &spiffe::TrustDomain) -> Answer {
    let roots = context
        .bundle_set()
        .get(trust_domain)
        .map(|b| b.authorities().to_vec())
        .unwrap_or_default();
    let mut answer = Answer {
        at: Instant::now(),
        failure: None,
        ids: Vec::new(),
        serials: Vec::new(),
        issuers: Vec::new(),
        roots: roots.len(),
    };
    for svid in context.svids() {
        let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
        let id = svid.spiffe_id().to_string();
        match check_svid(&chain, &roots) {
            Ok((serial, issuer)) => {
                answer.serials.push(serial);
                answer.issuers.push(issuer);
                answer.ids.push(id);
            }
            Err(e) => {
                answer.failure = Some(Failure::Invalid(format!("{id}: {e:#}")));
                return answer;
            }
        }
    }
    if context.svids().is_empty() {
        answer.failure = Some(Failure::Invalid("an answer without SVIDs".into()));
    }
    answer
}

/// The serial and issuer key id of the leaf of `chain` once it is unexpired and verifies against
/// `roots`.
fn check_svid(
    chain: &[&[u8]],
    roots: &[spiffe::cert::Certificate],
) -> anyhow::Result<(String, String)> {
    let leaf = chain.first().context("an empty chain")?;
    let facts = sigil_core::x509::certificate_facts(leaf)?;
    let now = sigil_core::clock::unix_seconds(std::time::SystemTime::now());
    anyhow::ensure!(
        now < facts.not_after,
        "expired at {} (now {now})",
        facts.not_after
    );
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(CertificateDer::from(root.as_bytes().to_vec()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        sigil_core::tls::crypto_provider(),
    )
    .build()?;
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|der| CertificateDer::from(*der))
        .collect();
    verifier
        .verify_client_cert(
            &CertificateDer::from(*leaf),
            &intermediates,
            UnixTime::now(),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "the chain does not verify against the {} root(s) served with it: {e}",
                roots.len()
            )
        })?;
    Ok((facts.serial, facts.authority_key_id))
}
