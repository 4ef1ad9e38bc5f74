//! The agent as the Workload API's identity source: it attests callers with the unix attestor,
//! matches their selectors against the cached entries, and hands out SVIDs from the cache,
//! signing what is missing through the batching signer.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use sigil_core::bundle::TrustBundle;
use sigil_core::selector::Selector;
use sigil_proto::agent::SignJwtSvidRequest;
use sigil_workload_api::source::{Caller, IdentitySource, JwtSvid, X509Svid, X509View};
use tokio::sync::watch;
use tonic::Status;

use crate::attest::k8s::K8sAttestor;
use crate::attest::unix::UnixAttestor;
use crate::cache::{Cache, Signer};
use crate::metrics::{Metrics, ResultLabels};
use crate::node::ServerLink;

/// How long a first request waits for its SVID to be signed before giving up with `Unavailable`.
const SIGNING_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request made right after start waits for the first entries from the server.
const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's identity source.
#[derive(Debug)]
pub struct AgentSource {
    attestor: UnixAttestor,
    k8s: Option<K8sAttestor>,
    cache: Arc<Cache>,
    signer: Signer,
    link: Arc<ServerLink>,
    metrics: Arc<Metrics>,
}

impl AgentSource {
    /// The source over the agent's parts.
    pub fn new(
        attestor: UnixAttestor,
        k8s: Option<K8sAttestor>,
        cache: Arc<Cache>,
        signer: Signer,
        link: Arc<ServerLink>,
        metrics: Arc<Metrics>,
    ) -> Self {
        AgentSource {
            attestor,
            k8s,
            cache,
            signer,
            link,
            metrics,
        }
    }

    /// The entries matching `selectors`, once the agent knows its entries at all.
    async fn matching(
        &self,
        selectors: &[Selector],
    ) -> Result<Vec<Arc<sigil_core::entry::Entry>>, Status> {
        if !self.cache.wait_synced(FIRST_SYNC_TIMEOUT).await {
            return Err(Status::unavailable(
                "the agent has not received its entries from the server yet; retry shortly",
            ));
        }
        Ok(self.cache.matching(selectors))
    }

    fn own_bundle(&self) -> Result<Arc<TrustBundle>, Status> {
        self.cache
            .bundle()
            .ok_or_else(|| Status::unavailable("the agent has no trust bundle yet; retry shortly"))
    }
}

impl IdentitySource for AgentSource {
    fn attest(&self, caller: Caller) -> BoxFuture<'_, Result<Vec<Selector>, Status>> {
        async move {
            let mut outcome = self.attestor.attest(&caller);
            if let (Ok(selectors), Some(k8s), Some(process)) =
                (&mut outcome, &self.k8s, &caller.process)
            {
                match k8s.attest(process).await {
                    Ok(more) => {
                        selectors.extend(more);
                        selectors.sort();
                        selectors.dedup();
                    }
                    Err(status) => outcome = Err(status),
                }
            }
            let result = if outcome.is_ok() { "success" } else { "failure" };
            self.metrics.workload_attestations.get_or_create(&ResultLabels { result }).inc();
            if let Err(status) = &outcome {
                tracing::info!(uid = caller.uid, pid = ?caller.pid, error = %status.message(), "workload attestation failed");
            }
            outcome
        }
        .boxed()
    }

    fn x509_view<'a>(
        &'a self,
        selectors: &'a [Selector],
    ) -> BoxFuture<'a, Result<X509View, Status>> {
        async move {
            let bundle = self.own_bundle()?;
            let entries = self.matching(selectors).await?;
            let fetches = entries.iter().map(|entry| async move {
                if let Some(svid) = self.cache.current_svid(entry) {
                    return Ok(svid);
                }
                match tokio::time::timeout(SIGNING_TIMEOUT, self.signer.sign(entry.clone())).await {
                    Ok(Ok(svid)) => Ok(svid),
                    // A still-valid SVID from before (e.g. the entry changed while the server is
                    // away) is better than none.
                    Ok(Err(status)) => self.cache.any_svid(&entry.id).ok_or(status),
                    Err(_) => Err(Status::unavailable("timed out waiting for the server to sign an SVID")),
                }
            });
            let signed = futures::future::join_all(fetches).await;
            let mut svids = Vec::with_capacity(signed.len());
            for (entry, outcome) in entries.iter().zip(signed) {
                match outcome {
                    Ok(svid) => svids.push(X509Svid {
                        spiffe_id: entry.spiffe_id.to_string(),
                        chain: svid.chain.clone(),
                        key: svid.key.clone(),
                        hint: entry.hint.clone(),
                    }),
                    // An identity the server refuses is left out; the workload gets the others.
                    Err(status) if status.code() == tonic::Code::PermissionDenied => {
                        tracing::warn!(entry = %entry.id, error = %status.message(), "the server refused an SVID");
                    }
                    Err(status) => return Err(status),
                }
            }
            Ok(X509View {
                svids,
                bundle,
                federated: self.cache.federated_bundles(&entries),
            })
        }
        .boxed()
    }

    fn jwt_svids<'a>(
        &'a self,
        selectors: &'a [Selector],
        audience: &'a [String],
        spiffe_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<JwtSvid>, Status>> {
        async move {
            let entries: Vec<_> = self
                .matching(selectors)
                .await?
                .into_iter()
                .filter(|entry| spiffe_id.is_none_or(|id| entry.spiffe_id.to_string() == id))
                .collect();
            let mut svids = Vec::with_capacity(entries.len());
            for entry in entries {
                let token = match self.cache.jwt(&entry.id, audience) {
                    Some(token) => token,
                    None => {
                        let signed =
                            self.link
                                .client()
                                .sign_jwt_svid(SignJwtSvidRequest {
                                    entry_id: entry.id.clone(),
                                    audience: audience.to_vec(),
                                })
                                .await
                                .map_err(|status| match status.code() {
                                    tonic::Code::PermissionDenied
                                    | tonic::Code::InvalidArgument => status,
                                    _ => Status::unavailable(format!(
                                        "cannot get a JWT-SVID from the server now: {}",
                                        status.message()
                                    )),
                                })?
                                .into_inner();
                        self.cache.store_jwt(
                            &entry.id,
                            audience,
                            signed.token.clone(),
                            signed.expires_at,
                        );
                        signed.token
                    }
                };
                svids.push(JwtSvid {
                    spiffe_id: entry.spiffe_id.to_string(),
                    token,
                    hint: entry.hint.clone(),
                });
            }
            Ok(svids)
        }
        .boxed()
    }

    fn bundles(&self, selectors: &[Selector]) -> Result<Vec<Arc<TrustBundle>>, Status> {
        let mut bundles = vec![self.own_bundle()?];
        let entries = self.cache.matching(selectors);
        bundles.extend(self.cache.federated_bundles(&entries));
        Ok(bundles)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.cache.subscribe()
    }

    fn now(&self) -> i64 {
        self.cache.clock().unix_now()
    }
}
