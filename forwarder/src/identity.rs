//! The forwarder's identity: its X509-SVID and the trust bundles, followed over the Workload API.
//!
//! Everything a handshake needs sits in one [`State`] behind an [`ArcSwap`]: a Workload API update
//! builds a whole new state and swaps it in at once, so the next handshake sees the new SVID and the
//! new bundles together, and handshakes already done keep what they used.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use rustls_pki_types::TrustAnchor;
use sigil_core::id::{SpiffeId, TrustDomain};
use sigil_core::tls::{crypto_provider, trust_anchors};
use sigil_proto::workload::X509svidResponse;
use sigil_workload_api::client::WorkloadClient;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::{Error, Result};

/// The SVID in use.
#[derive(Debug)]
pub struct Svid {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// The chain and key, as rustls presents them.
    pub key: Arc<CertifiedKey>,
    /// The leaf's serial (hex), for logs.
    pub serial: String,
    /// The leaf's expiry, Unix seconds.
    pub not_after: i64,
}

/// One consistent view: the SVID and the roots of every trust domain, never merged across domains.
#[derive(Debug, Default)]
pub struct State {
    /// The SVID, once the Workload API delivered one.
    pub svid: Option<Svid>,
    /// Roots by trust domain name (the own one and the federated ones).
    pub bundles: HashMap<String, Vec<TrustAnchor<'static>>>,
}

impl State {
    /// The roots of `trust_domain`, if the forwarder holds its bundle.
    pub fn roots(&self, trust_domain: &TrustDomain) -> Option<&[TrustAnchor<'static>]> {
        self.bundles.get(trust_domain.as_str()).map(Vec::as_slice)
    }

    /// The own trust domain.
    pub fn trust_domain(&self) -> Option<TrustDomain> {
        self.svid
            .as_ref()
            .map(|svid| svid.id.trust_domain().clone())
    }
}

/// The shared, atomically swapped identity state.
#[derive(Debug)]
pub struct IdentityStore {
    state: ArcSwap<State>,
    ready: watch::Sender<bool>,
    wanted: Option<SpiffeId>,
}

impl IdentityStore {
    /// An empty store that will pick `wanted` among the workload's SVIDs (or the first one).
    pub fn new(wanted: Option<SpiffeId>) -> Self {
        IdentityStore {
            state: ArcSwap::from_pointee(State::default()),
            ready: watch::channel(false).0,
            wanted,
        }
    }

    /// The current state.
    pub fn load(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// The current certificate and key, for the resolvers.
    pub fn current_key(&self) -> Option<Arc<CertifiedKey>> {
        self.state.load().svid.as_ref().map(|svid| svid.key.clone())
    }

    /// True once the first SVID is held.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Why the forwarder cannot serve at `now` (Unix seconds): no SVID yet, or the one it holds
    /// has expired (the agent has been away too long); `None` when it can.
    pub fn not_ready_at(&self, now: i64) -> Option<String> {
        match &self.state.load().svid {
            None => Some("waiting for the first X509-SVID from the Workload API".into()),
            Some(svid) if svid.not_after <= now => Some(format!(
                "the SVID {} expired at {} and no new one arrived; is the agent running?",
                svid.id, svid.not_after
            )),
            Some(_) => None,
        }
    }

    /// Waits until the first SVID is held.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// Builds a new state from a Workload API message and swaps it in.
    pub fn apply(&self, response: &X509svidResponse) -> Result<Arc<State>> {
        let svid = match &self.wanted {
            Some(wanted) => response
                .svids
                .iter()
                .find(|svid| svid.spiffe_id == wanted.to_string())
                .ok_or_else(|| {
                    Error::Identity(format!(
                        "this workload holds no SVID for {wanted} (it holds: {}); register an entry for it or drop --spiffe-id",
                        response
                            .svids
                            .iter()
                            .map(|s| s.spiffe_id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?,
            // Without --spiffe-id, keep the identity already held while the workload still has
            // it: "the first" depends on the order the agent sends, which may change.
            None => {
                let held = self.state.load().svid.as_ref().map(|svid| svid.id.to_string());
                response
                    .svids
                    .iter()
                    .find(|svid| Some(&svid.spiffe_id) == held.as_ref())
                    .or_else(|| response.svids.first())
                    .ok_or_else(|| {
                        Error::Identity("the Workload API sent no SVID for this workload".into())
                    })?
            }
        };
        let chain = split_der(&svid.x509_svid)?;
        let leaf = chain
            .first()
            .ok_or_else(|| Error::Identity("the SVID has an empty certificate chain".into()))?;
        let facts = sigil_core::x509::certificate_facts(leaf)
            .map_err(|e| Error::Identity(format!("the SVID's leaf: {e}")))?;
        let id = facts.spiffe_id.ok_or_else(|| {
            Error::Identity("the SVID's leaf has no single SPIFFE ID URI SAN".into())
        })?;
        let (certificates, private_key) =
            sigil_core::tls::chain_and_key(&chain, svid.x509_svid_key.clone());
        let key = CertifiedKey::from_der(certificates, private_key, &crypto_provider())
            .map_err(|e| Error::Identity(format!("the SVID's key does not load or match: {e}")))?;
        let mut bundles = HashMap::new();
        let own = id.trust_domain().clone();
        bundles.insert(
            own.as_str().to_string(),
            anchors(&svid.bundle, own.as_str())?,
        );
        for (name, der) in &response.federated_bundles {
            let td = TrustDomain::new(name).map_err(|e| {
                Error::Identity(format!(
                    "federated bundle key `{name}` is not a trust domain: {e}"
                ))
            })?;
            // The own domain's roots come only from the SVID's bundle, never from a federated entry.
            if td != own {
                bundles.insert(td.as_str().to_string(), anchors(der, td.as_str())?);
            }
        }
        let state = Arc::new(State {
            svid: Some(Svid {
                id,
                key: Arc::new(key),
                serial: facts.serial,
                not_after: facts.not_after,
            }),
            bundles,
        });
        self.state.store(state.clone());
        self.ready.send_replace(true);
        Ok(state)
    }
}

fn anchors(der: &[u8], trust_domain: &str) -> Result<Vec<TrustAnchor<'static>>> {
    let roots = split_der(der)?;
    if roots.is_empty() {
        return Err(Error::Identity(format!(
            "the bundle of {trust_domain} is empty"
        )));
    }
    trust_anchors(&roots).map_err(|e| Error::Identity(format!("the bundle of {trust_domain}: {e}")))
}

/// Splits concatenated DER certificates (the Workload API's wire format).
fn split_der(mut der: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut certificates = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| Error::Identity(format!("a certificate does not parse: {e}")))?;
        certificates.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    Ok(certificates)
}

/// Follows the Workload API at `socket` until `shutdown` turns true, applying every update;
/// reconnects (1 s, doubling to 10 s) when the agent goes away.
pub async fn follow(
    store: Arc<IdentityStore>,
    socket: PathBuf,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut serial = String::new();
    loop {
        // A session that delivered an update starts the next retry from 1 s again.
        let backoff_slot = &mut backoff;
        let session = async {
            let backoff = backoff_slot;
            let mut client = WorkloadClient::connect(&socket).await?;
            let mut stream = client.watch_x509().await?;
            loop {
                let message = stream.message().await.map_err(|status| {
                    Error::WorkloadApi(sigil_workload_api::Error::Refused {
                        call: "FetchX509SVID",
                        status,
                    })
                })?;
                let Some(message) = message else {
                    return Err::<(), Error>(Error::Identity(
                        "the agent closed the X509-SVID stream".into(),
                    ));
                };
                match store.apply(&message) {
                    Ok(state) => {
                        *backoff = Duration::from_secs(1);
                        metrics.svid_updates.inc();
                        let Some(svid) = &state.svid else { continue };
                        metrics.svid_expiry.set(svid.not_after);
                        // The stream also speaks when another SVID of this workload or a bundle
                        // changes: say "holds" only for a new certificate of our own.
                        if svid.serial == serial {
                            tracing::debug!(
                                trust_domains = state.bundles.len(),
                                "Workload API update applied; own SVID unchanged"
                            );
                        } else {
                            serial.clone_from(&svid.serial);
                            tracing::info!(
                                spiffe_id = %svid.id,
                                serial = %svid.serial,
                                not_after = svid.not_after,
                                trust_domains = state.bundles.len(),
                                "forwarder holds SVID"
                            );
                        }
                    }
                    // A bad update keeps the last good state: better an SVID that is still valid
                    // than none.
                    Err(e) => tracing::error!("ignoring a Workload API update: {e}"),
                }
            }
        };
        tokio::select! {
            result = session => {
                if let Err(e) = result {
                    tracing::warn!("Workload API at {}: {e}; retrying in {backoff:?}", socket.display());
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
