//! The agent's standing connection to the server: established from the stored identity, or by
//! attesting with a join token on first start, and kept fresh afterwards: the agent SVID is renewed
//! at half-life and the connection is rebuilt when the SVID or the trust bundle changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sigil_core::bundle::TrustBundle;
use sigil_core::clock::SharedClock;
use sigil_core::id::TrustDomain;
use sigil_core::x509::{BACKDATE, certificate_facts};
use sigil_proto::agent::agent_api_client::AgentApiClient;
use tokio::sync::watch;

use crate::cache::Cache;
use tonic::transport::Channel;

use super::{
    AgentIdentity, IdentityStore, ServerConnection, Servers, attest_node, connect,
    connect_insecure, renew,
};
use crate::{Error, Result};

/// The longest wait between two tries to renew the agent SVID: a server that answers again is
/// used within this.
const MAX_RENEW_RETRY: Duration = Duration::from_secs(5);

/// How the agent trusts the server before it holds the server's bundle.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// The PEM roots in this file (what `sigil-server bundle show` prints).
    BundleFile(PathBuf),
    /// Trust whatever answers. Development only.
    Insecure,
    /// No bootstrap configured: only a stored identity will do.
    None,
}

/// How the node proves itself when the agent has no usable stored identity.
#[derive(Debug, Clone)]
pub enum NodeAttestation {
    /// A one-time join token.
    JoinToken(String),
    /// A projected Kubernetes ServiceAccount token read from `token_path`, for `cluster`. Unlike a
    /// join token it can be used again, so an agent whose SVID expired re-attests by itself.
    KubernetesPsat {
        /// The name the server knows the cluster by.
        cluster: String,
        /// The projected token file (kubelet refreshes it).
        token_path: PathBuf,
    },
}

impl NodeAttestation {
    fn request(&self) -> Result<(&'static str, Vec<u8>)> {
        match self {
            NodeAttestation::JoinToken(token) => Ok(("join_token", token.as_bytes().to_vec())),
            NodeAttestation::KubernetesPsat {
                cluster,
                token_path,
            } => {
                let token = std::fs::read_to_string(token_path).map_err(|e| {
                    Error::io(
                        format!(
                            "reading the projected ServiceAccount token {}",
                            token_path.display()
                        ),
                        e,
                    )
                })?;
                let payload = serde_json::json!({"cluster": cluster, "token": token.trim()});
                Ok(("k8s_psat", payload.to_string().into_bytes()))
            }
        }
    }
}

/// What the link needs to know.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// The servers' agent API: `host:port`s, each name possibly resolving to several servers.
    pub addresses: Vec<String>,
    /// The server's trust domain.
    pub trust_domain: TrustDomain,
    /// Where the identity is stored.
    pub data_dir: PathBuf,
    /// First-contact trust.
    pub bootstrap: Bootstrap,
    /// How to attest when there is no usable stored identity.
    pub attestation: Option<NodeAttestation>,
}

/// The agent's connection to the server and the identity it uses on it.
#[derive(Debug)]
pub struct ServerLink {
    settings: LinkSettings,
    servers: Servers,
    store: IdentityStore,
    identity: ArcSwap<AgentIdentity>,
    connection: ArcSwap<ServerConnection>,
    roots: ArcSwap<Vec<Vec<u8>>>,
}

impl ServerLink {
    /// Loads the stored identity, or attests with the join token when there is none (or it has
    /// expired). Returns the link and the bundle it trusts.
    pub async fn establish(
        settings: LinkSettings,
        clock: &SharedClock,
    ) -> Result<(Self, TrustBundle)> {
        let store = IdentityStore::open(&settings.data_dir)?;
        let servers = Servers::new(settings.addresses.clone());
        let now = clock.unix_now();
        let stored = store.load(&settings.trust_domain)?;
        let (identity, bundle) = match stored {
            Some((identity, bundle)) if identity.expires_at > now => {
                tracing::info!(agent = %identity.spiffe_id, "using the stored agent identity");
                (identity, bundle)
            }
            stored => {
                let expired = stored.is_some();
                let attestation = settings.attestation.clone().ok_or_else(|| {
                    Error::Startup(format!(
                        "{} in {}, and no join token: generate one with `sigil-server token generate` and pass --join-token",
                        if expired { "the stored agent SVID has expired" } else { "there is no stored agent identity" },
                        settings.data_dir.display()
                    ))
                })?;
                let mut anonymous = match &settings.bootstrap {
                    Bootstrap::BundleFile(path) => {
                        let pem = std::fs::read_to_string(path).map_err(|e| {
                            Error::io(
                                format!("reading the bootstrap bundle {}", path.display()),
                                e,
                            )
                        })?;
                        let roots = pem_roots(&pem).map_err(|why| {
                            Error::Startup(format!(
                                "the bootstrap bundle {} is unusable: {why}",
                                path.display()
                            ))
                        })?;
                        connect(&servers, &settings.trust_domain, &roots, None).await?
                    }
                    Bootstrap::Insecure => connect_insecure(&servers).await?,
                    Bootstrap::None => {
                        return Err(Error::Startup(
                            "a first attestation needs trust_bundle_path (the PEM `sigil-server bundle show` prints) or, for development only, insecure_bootstrap = true".into(),
                        ));
                    }
                };
                let (attestor, payload) = attestation.request()?;
                let (identity, bundle) =
                    attest_while_busy(&mut anonymous, attestor, &payload).await?;
                store.save_identity(&identity)?;
                store.save_bundle(&bundle)?;
                tracing::info!(agent = %identity.spiffe_id, "node attested");
                (identity, bundle)
            }
        };
        let roots = bundle.x509_authorities.clone();
        let connection = connect(&servers, &settings.trust_domain, &roots, Some(&identity)).await?;
        Ok((
            ServerLink {
                settings,
                servers,
                store,
                identity: ArcSwap::from_pointee(identity),
                connection: ArcSwap::from_pointee(connection),
                roots: ArcSwap::from_pointee(roots),
            },
            bundle,
        ))
    }

    /// A client on the current connection.
    pub fn client(&self) -> AgentApiClient<Channel> {
        self.connection.load().client.clone()
    }

    /// The current connection, to hand to [`ServerLink::fail_over`] when a call on it fails.
    pub(super) fn connection(&self) -> Arc<ServerConnection> {
        self.connection.load_full()
    }

    /// A call on `failed` could not reach its server (or the server could not serve it): puts
    /// that server last and starts a new channel, so the next call connects afresh, to another
    /// server if one answers. Calls that failed together on one connection replace it once.
    pub(super) fn fail_over(&self, failed: &Arc<ServerConnection>) {
        if !Arc::ptr_eq(&self.connection.load(), failed) {
            return;
        }
        self.servers.demote_current();
        if let Err(e) = self.reconnect() {
            tracing::warn!(error = %e, "cannot make a new channel to the servers");
        }
    }

    /// The agent's current identity.
    pub fn identity(&self) -> Arc<AgentIdentity> {
        self.identity.load_full()
    }

    fn reconnect(&self) -> Result<()> {
        let identity = self.identity.load();
        let channel = super::server_channel(
            &self.servers,
            &self.settings.trust_domain,
            &self.roots.load(),
            Some(&identity),
        )?;
        self.connection.store(Arc::new(ServerConnection {
            client: AgentApiClient::new(channel),
        }));
        Ok(())
    }

    /// Stores a new bundle from the server and, when its roots changed, trusts them from the next
    /// connection on.
    pub async fn trust(&self, bundle: &TrustBundle) -> Result<()> {
        self.store.save_bundle(bundle)?;
        if **self.roots.load() != bundle.x509_authorities {
            self.roots.store(Arc::new(bundle.x509_authorities.clone()));
            // A server that did not verify against the old roots may against the new ones.
            self.servers.forget_skipped();
            self.reconnect()?;
        }
        Ok(())
    }

    /// Renews the agent SVID, stores it and reconnects with it.
    pub async fn renew(&self) -> Result<()> {
        let used = self.connection();
        let mut connection = (*used).clone();
        let identity = match renew(&mut connection).await {
            Ok(identity) => identity,
            Err(e) => {
                if super::api::another_server_may_answer(e.code()) {
                    self.fail_over(&used);
                }
                return Err(e);
            }
        };
        self.store.save_identity(&identity)?;
        tracing::info!(agent = %identity.spiffe_id, expires_at = identity.expires_at, "renewed the agent SVID");
        self.identity.store(Arc::new(identity));
        self.reconnect()
    }
}

/// Renews the agent SVID at half its remaining life, or at once when its CA is tainted, retrying
/// with backoff (at most `MAX_RENEW_RETRY`, 5 s) when no server answers; runs until `stopping` turns
/// true.
pub async fn keep_agent_svid_fresh(
    link: Arc<ServerLink>,
    cache: Arc<Cache>,
    clock: SharedClock,
    mut stopping: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut changes = cache.subscribe();
    loop {
        changes.borrow_and_update();
        let identity = link.identity();
        // The server back-dates NotBefore by BACKDATE; half-life counts from the real issue time.
        let backdate = i64::try_from(BACKDATE.as_secs()).unwrap_or(0);
        let facts = identity
            .chain
            .first()
            .and_then(|leaf| certificate_facts(leaf).ok());
        let issued_at = facts
            .as_ref()
            .map_or(clock.unix_now(), |facts| facts.not_before + backdate);
        // Signed by a tainted CA: renew now (but not within a second of its issue, so a server
        // that still signs with that CA is not asked in a tight loop).
        let tainted = facts
            .as_ref()
            .is_some_and(|facts| cache.is_tainted(&facts.authority_key_id));
        let renew_at = if tainted {
            issued_at + 1
        } else {
            issued_at + (identity.expires_at - issued_at) / 2
        };
        let wait = Duration::from_secs(u64::try_from(renew_at - clock.unix_now()).unwrap_or(0));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            // A sync may have tainted the CA that signed this SVID: look again.
            changed = changes.changed() => {
                if changed.is_err() { return }
                continue;
            }
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        match link.renew().await {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot renew the agent SVID; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stopping.wait_for(|stop| *stop) => return,
                }
                backoff = (backoff * 2).min(MAX_RENEW_RETRY);
            }
        }
    }
}

fn pem_roots(pem: &str) -> std::result::Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let roots: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|cert| cert.map(|c| c.to_vec()).map_err(|e| e.to_string()))
        .collect::<std::result::Result<_, _>>()?;
    if roots.is_empty() {
        return Err("it holds no PEM certificate".into());
    }
    Ok(roots)
}

/// Attests, trying again after a jittered backoff (at most 5 s) while the server answers
/// `ResourceExhausted`: it is at `agent_api.max_attestations` because a fleet attests at once, and
/// the node should come up when its turn comes rather than exit. Any other failure is final.
async fn attest_while_busy(
    connection: &mut ServerConnection,
    attestor: &str,
    payload: &[u8],
) -> Result<(AgentIdentity, TrustBundle)> {
    let mut backoff = crate::sync::FIRST_RETRY;
    loop {
        match attest_node(connection, attestor, payload.to_vec()).await {
            Err(Error::Refused { status, .. })
                if status.code() == tonic::Code::ResourceExhausted =>
            {
                tracing::info!(reason = status.message(), retry_in = ?backoff, "the server is busy attesting other nodes; trying again");
                tokio::time::sleep(crate::sync::with_jitter(backoff)).await;
                backoff = (backoff * 2).min(crate::sync::MAX_RETRY);
            }
            outcome => return outcome,
        }
    }
}
