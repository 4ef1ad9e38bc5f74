//! The agent as the Workload API's identity source: it attests callers with the enabled workload
//! attestors, matches their selectors against the cached entries, and hands out SVIDs from the
//! cache, signing what is missing through the batching signer.
//!
//! This is the gRPC edge of the Workload API and SDS: everything below returns [`Error`], and the
//! [`IdentitySource`] methods turn it into the client's status with `Status::from`, here only.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use sigil_core::bundle::TrustBundle;
use sigil_core::entry::Entry;
use sigil_core::selector::Selector;
use sigil_workload_api::source::{Caller, IdentitySource, JwtSvid, X509Svid, X509View};
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::attest::WorkloadAttestors;
use crate::cache::{Cache, CachedSvid, Signer};
use crate::metrics::{Metrics, ResultLabels};
use crate::node::ServerApi;
use crate::{Error, Result};

/// How long a first request waits for its SVID to be signed before giving up with `Unavailable`.
const SIGNING_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request made right after start waits for the first entries from the server.
const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's identity source.
#[derive(Debug)]
pub struct AgentSource {
    attestors: WorkloadAttestors,
    cache: Arc<Cache>,
    signer: Signer,
    server: Arc<dyn ServerApi>,
    metrics: Arc<Metrics>,
}

impl AgentSource {
    /// The source over the agent's parts.
    pub fn new(
        attestors: WorkloadAttestors,
        cache: Arc<Cache>,
        signer: Signer,
        server: Arc<dyn ServerApi>,
        metrics: Arc<Metrics>,
    ) -> Self {
        AgentSource {
            attestors,
            cache,
            signer,
            server,
            metrics,
        }
    }

    /// The caller's selectors from every enabled attestor, counted and, when refused, logged.
    async fn attest_caller(&self, caller: &Caller) -> Result<Vec<Selector>> {
        let outcome = self.attestors.attest(caller).await;
        let result = if outcome.is_ok() {
            "success"
        } else {
            "failure"
        };
        self.metrics
            .workload_attestations
            .get_or_create(&ResultLabels { result })
            .inc();
        if let Err(e) = &outcome {
            tracing::info!(uid = caller.uid, pid = ?caller.pid, error = %e, "workload attestation failed");
        }
        outcome
    }

    /// The entries matching `selectors`, once the agent knows its entries at all.
    async fn matching(&self, selectors: &[Selector]) -> Result<Vec<Arc<Entry>>> {
        if !self.cache.wait_synced(FIRST_SYNC_TIMEOUT).await {
            return Err(Error::NotSynced);
        }
        Ok(self.cache.matching(selectors))
    }

    fn own_bundle(&self) -> Result<Arc<TrustBundle>> {
        self.cache.bundle().ok_or(Error::NoBundle)
    }

    /// The entry's SVID: the cached one if it is current, else a new one from the server, else
    /// (the server cannot sign now) a still-valid one from before.
    async fn svid_for(&self, entry: &Arc<Entry>) -> Result<Arc<CachedSvid>> {
        if let Some(svid) = self.cache.current_svid(entry) {
            return Ok(svid);
        }
        match tokio::time::timeout(SIGNING_TIMEOUT, self.signer.sign(entry.clone())).await {
            Ok(Ok(svid)) => Ok(svid),
            // A still-valid SVID from before (e.g. the entry changed while the server is away)
            // is better than none.
            Ok(Err(e)) => self.cache.any_svid(&entry.id).ok_or(e),
            Err(_) => Err(Error::SigningTimedOut),
        }
    }

    /// The caller's X509-SVIDs and bundles.
    async fn x509_for(&self, selectors: &[Selector]) -> Result<X509View> {
        let bundle = self.own_bundle()?;
        let entries = self.matching(selectors).await?;
        let signed =
            futures::future::join_all(entries.iter().map(|entry| self.svid_for(entry))).await;
        let mut svids = Vec::with_capacity(signed.len());
        let mut cannot_sign = None;
        for (entry, outcome) in entries.iter().zip(signed) {
            match outcome {
                Ok(svid) => svids.push(X509Svid {
                    spiffe_id: entry.spiffe_id.to_string(),
                    chain: svid.chain.clone(),
                    key: svid.key.clone(),
                    hint: entry.hint.clone(),
                }),
                // An identity the server refuses is left out; the workload gets the others.
                Err(e) if e.code() == Code::PermissionDenied => {
                    tracing::warn!(entry = %entry.id, error = %e, "the server refused an SVID");
                }
                // No valid SVID for this entry and no server to sign one (they are all away and
                // its SVID expired): the workload keeps the identities that are still valid,
                // and fails only when it has none.
                Err(e) => {
                    tracing::warn!(entry = %entry.id, error = %e, "no valid SVID for this entry until a server answers; serving the workload's others");
                    cannot_sign.get_or_insert(e);
                }
            }
        }
        if let (true, Some(e)) = (svids.is_empty(), cannot_sign) {
            return Err(e);
        }
        Ok(X509View {
            svids,
            bundle,
            federated: self.cache.federated_bundles(&entries),
        })
    }

    /// The entry's JWT-SVID for `audience`, from the cache or the server.
    async fn jwt_for(&self, entry: &Entry, audience: &[String]) -> Result<String> {
        if let Some(token) = self.cache.jwt(&entry.id, audience) {
            return Ok(token);
        }
        let signed = self
            .server
            .sign_jwt(&entry.id, audience)
            .await
            .map_err(|e| match e.code() {
                // The server's answer about the request itself reaches the workload as it is.
                Code::PermissionDenied | Code::InvalidArgument => e,
                _ => e.server_away("a JWT-SVID"),
            })?;
        self.cache
            .store_jwt(&entry.id, audience, signed.token.clone(), signed.expires_at);
        Ok(signed.token)
    }

    /// The caller's JWT-SVIDs for `audience`, of every identity or only `spiffe_id`.
    async fn jwts_for(
        &self,
        selectors: &[Selector],
        audience: &[String],
        spiffe_id: Option<&str>,
    ) -> Result<Vec<JwtSvid>> {
        let entries: Vec<_> = self
            .matching(selectors)
            .await?
            .into_iter()
            .filter(|entry| spiffe_id.is_none_or(|id| entry.spiffe_id.to_string() == id))
            .collect();
        let mut svids = Vec::with_capacity(entries.len());
        for entry in entries {
            svids.push(JwtSvid {
                spiffe_id: entry.spiffe_id.to_string(),
                token: self.jwt_for(&entry, audience).await?,
                hint: entry.hint.clone(),
            });
        }
        Ok(svids)
    }

    fn bundles_for(&self, selectors: &[Selector]) -> Result<Vec<Arc<TrustBundle>>> {
        let mut bundles = vec![self.own_bundle()?];
        let entries = self.cache.matching(selectors);
        bundles.extend(self.cache.federated_bundles(&entries));
        Ok(bundles)
    }
}

impl IdentitySource for AgentSource {
    fn attest(&self, caller: Caller) -> BoxFuture<'_, Result<Vec<Selector>, Status>> {
        async move { Ok(self.attest_caller(&caller).await?) }.boxed()
    }

    fn x509_view<'a>(
        &'a self,
        selectors: &'a [Selector],
    ) -> BoxFuture<'a, Result<X509View, Status>> {
        async move { Ok(self.x509_for(selectors).await?) }.boxed()
    }

    fn jwt_svids<'a>(
        &'a self,
        selectors: &'a [Selector],
        audience: &'a [String],
        spiffe_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<JwtSvid>, Status>> {
        async move { Ok(self.jwts_for(selectors, audience, spiffe_id).await?) }.boxed()
    }

    fn bundles(&self, selectors: &[Selector]) -> Result<Vec<Arc<TrustBundle>>, Status> {
        Ok(self.bundles_for(selectors)?)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.cache.subscribe()
    }

    fn now(&self) -> i64 {
        self.cache.clock().unix_now()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use sigil_core::clock::ManualClock;
    use sigil_core::id::parse_trust_domain;
    use sigil_proto::agent::SyncResponse;
    use tonic::Code;

    use super::*;
    use crate::attest::unix::UnixAttestor;
    use crate::node::fake::{
        FakeServer, assert_status, empty_cache, snapshot, sync_entry, test_signer,
    };

    fn source() -> (Arc<FakeServer>, Arc<Cache>, AgentSource) {
        let server = Arc::new(FakeServer::new());
        let td = parse_trust_domain("trust_domain", "example.org").expect("td");
        let metrics = Arc::new(Metrics::default());
        let cache = empty_cache(
            Arc::new(ManualClock::new(SystemTime::now())),
            metrics.clone(),
            Some(TrustBundle::new(td)),
        );
        let signer = test_signer(&server, &cache, &metrics);
        let source = AgentSource::new(
            WorkloadAttestors::default().with(UnixAttestor::new(
                "/nonexistent/passwd".into(),
                "/nonexistent/group".into(),
            )),
            cache.clone(),
            signer,
            server.clone(),
            metrics,
        );
        (server, cache, source)
    }

    fn uid(value: &str) -> Vec<Selector> {
        vec![Selector::new("unix", format!("uid:{value}")).expect("selector")]
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_before_the_first_sync_waits_then_is_told_to_retry() {
        let (_server, _cache, source) = source();
        let refused = source
            .x509_view(&uid("1000"))
            .await
            .expect_err("no entries yet");
        assert_status(
            refused,
            Code::Unavailable,
            &["has not received its entries"],
        );
    }

    #[tokio::test(start_paused = true)]
    async fn svids_are_signed_once_then_served_from_the_cache_and_a_refused_one_is_left_out() {
        let (server, cache, source) = source();
        cache.apply_sync(&snapshot(vec![
            sync_entry("web", "1000", 1),
            sync_entry("web-debug", "1000", 1),
            sync_entry("db", "2000", 1),
        ]));
        server.refused.lock().expect("lock").insert(
            "web-debug".into(),
            (Code::PermissionDenied, "not on this node".into()),
        );
        let view = source.x509_view(&uid("1000")).await.expect("view");
        let ids: Vec<&str> = view
            .svids
            .iter()
            .map(|svid| svid.spiffe_id.as_str())
            .collect();
        assert_eq!(ids, ["spiffe://example.org/web"]);
        assert_eq!(
            server.calls(),
            vec![vec!["web".to_string(), "web-debug".to_string()]]
        );

        let again = source.x509_view(&uid("1000")).await.expect("view");
        assert_eq!(again.svids[0].chain, view.svids[0].chain);
        assert_eq!(
            server.calls().len(),
            2,
            "only the refused entry is asked for again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_server_away_a_changed_entry_keeps_its_valid_svid() {
        let (server, cache, source) = source();
        cache.apply_sync(&snapshot(vec![sync_entry("web", "1000", 1)]));
        let first = source.x509_view(&uid("1000")).await.expect("view");
        server.down.store(true, std::sync::atomic::Ordering::SeqCst);
        cache.apply_sync(&SyncResponse {
            entries: vec![sync_entry("web", "1000", 2)],
            ..SyncResponse::default()
        });
        let view = source.x509_view(&uid("1000")).await.expect("the old SVID");
        assert_eq!(view.svids[0].chain, first.svids[0].chain);
    }

    #[tokio::test(start_paused = true)]
    async fn jwt_svids_are_reused_per_audience_and_an_absent_server_is_unavailable() {
        let (server, cache, source) = source();
        cache.apply_sync(&snapshot(vec![sync_entry("web", "1000", 1)]));
        let audience = vec!["db".to_string()];
        let first = source
            .jwt_svids(&uid("1000"), &audience, None)
            .await
            .expect("jwt");
        let second = source
            .jwt_svids(&uid("1000"), &audience, None)
            .await
            .expect("jwt");
        assert_eq!(first, second);
        assert_eq!(server.jwt_calls.lock().expect("lock").len(), 1);
        let other = vec!["cache".to_string()];
        server.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let refused = source
            .jwt_svids(&uid("1000"), &other, None)
            .await
            .expect_err("away");
        assert_status(refused, Code::Unavailable, &["cannot get a JWT-SVID"]);
        assert!(
            source
                .jwt_svids(&uid("1000"), &audience, Some("spiffe://example.org/other"))
                .await
                .expect("none")
                .is_empty()
        );
    }
}
