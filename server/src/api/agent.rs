//! The agent API: node attestation, the agent's own SVID, the sync stream and SVID signing.
//!
//! Every call but `AttestNode` must come with the agent's SVID as the TLS client certificate. The
//! caller's agent ID is read from that certificate (the handshake already verified it against the
//! bundle), then checked against the in-memory authorizations: no call on this path waits on the
//! database except the writes that record an attestation or renewal.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use sigil_core::id::is_agent_id;
use sigil_core::untrusted::untrusted;
use sigil_core::x509::{certificate_facts, check_csr};
use sigil_proto::agent::agent_api_server::AgentApi;
use sigil_proto::agent::{
    AttestNodeRequest, AttestNodeResponse, BatchSignX509SvidRequest, BatchSignX509SvidResponse,
    RenewAgentSvidRequest, RenewAgentSvidResponse, SignJwtSvidRequest, SignJwtSvidResponse,
    SyncRequest, SyncResponse, X509SvidResult,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

mod sync;

pub use sync::{PAGE_BYTES, PAGE_ENTRIES};

use super::ServerState;
use super::convert::svid_to_proto;
use crate::ca::{Recipient, Unrecorded};
use crate::config::AgentApiConfig;
use crate::datastore::{AgentRecord, DataStore};
use crate::metrics::AttestationLabels;
use crate::{Error, Result};

/// The most CSRs one batch may carry.
pub const MAX_BATCH: usize = 1000;

/// How long an attestation waits for one of the `max_attestations` slots before it is turned away
/// with `ResourceExhausted` (the agent backs off with jitter and tries again).
const ATTESTATION_WAIT: Duration = Duration::from_secs(1);

/// The agent API over a [`ServerState`].
#[derive(Debug)]
pub struct AgentService<D> {
    state: Arc<ServerState<D>>,
    streams: Arc<sync::StreamCounts>,
    admission: Admission,
}

/// What the agent API takes on at once, so that a storm (a fleet restarting, a partition
/// healing: thousands of agents attesting and resyncing together) queues or is turned away with
/// `ResourceExhausted` instead of exhausting the server's memory or database. Handshakes and
/// connections are bounded where they are accepted (`api::tls`).
#[derive(Debug)]
struct Admission {
    /// `agent_api.max_attestations`: attestations being verified and written.
    attestations: Arc<Semaphore>,
    max_attestations: usize,
    /// How long an attestation waits for a slot ([`ATTESTATION_WAIT`]).
    attestation_wait: Duration,
    /// `agent_api.max_sync_page_mib`, in bytes: encoded sync pages queued for all agents.
    sync_pages: Arc<Semaphore>,
    sync_page_bytes: usize,
}

impl Admission {
    fn new(limits: &AgentApiConfig) -> Self {
        let sync_page_bytes = usize::try_from(limits.max_sync_page_mib.saturating_mul(1 << 20))
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Admission {
            attestations: Arc::new(Semaphore::new(limits.max_attestations)),
            max_attestations: limits.max_attestations,
            attestation_wait: ATTESTATION_WAIT,
            sync_pages: Arc::new(Semaphore::new(sync_page_bytes)),
            sync_page_bytes,
        }
    }

    /// One of the attestation slots, waiting at most `attestation_wait`; held until the
    /// attestation is answered.
    async fn attestation_slot(&self) -> Result<OwnedSemaphorePermit> {
        let slot = self.attestations.clone().acquire_owned();
        match tokio::time::timeout(self.attestation_wait, slot).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err(Error::Busy(format!(
                "{} node attestations are in flight (agent_api.max_attestations); retry after a backoff",
                self.max_attestations
            ))),
        }
    }

    /// The sending half of a new sync stream, drawing on the shared page budget.
    fn outbox(&self, sender: mpsc::Sender<sync::Outgoing>) -> sync::Outbox {
        sync::Outbox {
            sender,
            budget: self.sync_pages.clone(),
            budget_bytes: self.sync_page_bytes,
        }
    }
}

impl<D> AgentService<D> {
    /// The service over shared server state, admitting what `limits` allow.
    pub fn new(state: Arc<ServerState<D>>, limits: &AgentApiConfig) -> Self {
        AgentService {
            state,
            streams: Arc::default(),
            admission: Admission::new(limits),
        }
    }
}

/// The calling agent, from its verified client certificate.
#[derive(Debug, Clone)]
struct CallerAgent {
    id: String,
    /// Hex serial of the certificate it presented.
    serial: String,
}

/// The calling agent's SPIFFE ID, from its verified client certificate. The certificate must be
/// the agent's current SVID (or the one before its last renewal) as the datastore records it:
/// the handshake proves only that our CA signed it, not that it is still the agent's.
async fn caller_agent<T, D: DataStore>(
    request: &Request<T>,
    state: &ServerState<D>,
) -> Result<CallerAgent> {
    let certs = request.peer_certs().ok_or_else(|| {
        Error::Unauthenticated(
            "this call needs the agent's SVID as the TLS client certificate; attest the node first"
                .into(),
        )
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Error::Unauthenticated("no client certificate".into()))?;
    let facts = certificate_facts(leaf)?;
    let id = facts
        .spiffe_id
        .filter(|id| is_agent_id(id, state.ca.trust_domain()))
        .ok_or_else(|| {
            Error::PermissionDenied(
                "the client certificate is not an agent SVID of this trust domain".into(),
            )
        })?;
    let caller = CallerAgent {
        id: id.to_string(),
        serial: facts.serial,
    };
    if state
        .authz
        .check_agent_serial(&caller.id, &caller.serial)
        .is_err()
    {
        // A renewal just written (here or by another server) may not have reached the cache yet.
        state
            .feed
            .catch_up_on_miss(state.datastore.as_ref())
            .await?;
        state
            .authz
            .check_agent_serial(&caller.id, &caller.serial)
            .inspect_err(|e| {
                tracing::warn!(agent = %caller.id, error = %e, "agent certificate refused");
            })?;
    }
    Ok(caller)
}

impl<D: DataStore> AgentService<D> {
    /// Signs an agent SVID for the key in `csr` and waits for its issuance record.
    async fn sign_agent_svid(
        &self,
        agent_id: &sigil_core::id::SpiffeId,
        csr: &[u8],
    ) -> Result<crate::ca::SignedX509Svid> {
        if !is_agent_id(agent_id, self.state.ca.trust_domain()) {
            return Err(Error::ca(format!(
                "{agent_id} is not an agent ID; an attestor must name agents under /sigil/agent/"
            )));
        }
        let csr = check_csr(csr)?;
        self.state
            .issuer
            .agent_x509(&csr.public_key, agent_id, self.state.agent_svid_ttl)?
            .recorded()
            .await
    }

    async fn attest(&self, request: AttestNodeRequest) -> Result<AttestNodeResponse> {
        let attestor = self
            .state
            .attestors
            .get(request.attestor.as_str())
            .ok_or_else(|| {
                let mut known: Vec<&str> = self.state.attestors.keys().copied().collect();
                known.sort_unstable();
                Error::Invalid(sigil_core::Error::field(
                    "attestor",
                    format!(
                        "`{}` is not enabled on this server; enabled: {}",
                        untrusted(&request.attestor),
                        known.join(", ")
                    ),
                ))
            })?;
        // Check the CSR before the attestor uses up a one-time token on a request that would fail.
        check_csr(&request.csr)?;
        let node = attestor.attest(&request.payload).await?;
        let agent_id = node.agent_id.to_string();
        let existing = self.state.datastore.get_agent(&agent_id).await?;
        if existing.as_ref().is_some_and(|a| a.banned) {
            return Err(Error::PermissionDenied(format!(
                "agent {agent_id} is banned; an operator must evict it before it can attest again"
            )));
        }
        let svid = self.sign_agent_svid(&node.agent_id, &request.csr).await?;
        let now = self.state.clock.unix_now();
        // No previous serial: a certificate from before this attestation (an evicted agent's, say)
        // must not work again. `put_agent` refuses if a ban landed since the read above.
        self.state
            .datastore
            .put_agent(&AgentRecord {
                spiffe_id: agent_id.clone(),
                attestor: attestor.name().to_string(),
                selectors: node.selectors,
                svid_serial: svid.serial.clone(),
                previous_svid_serial: String::new(),
                svid_expires_at: svid.not_after,
                banned: false,
                created_at: existing.map_or(now, |a| a.created_at),
                updated_at: now,
            })
            .await?;
        self.state.catch_up().await?;
        tracing::info!(agent = %agent_id, attestor = attestor.name(), "node attested");
        Ok(AttestNodeResponse {
            svid: Some(svid_to_proto(agent_id, &svid)),
            bundle: Some(sigil_proto::common::Bundle::from(
                self.state.ca.bundle().as_ref(),
            )),
        })
    }

    /// Checks one CSR of a batch against the caller's authorizations and signs it; the record
    /// is awaited by the batch, so a whole batch's records are written together.
    fn sign_one(
        &self,
        agent_id: &str,
        entry_id: &str,
        csr: &[u8],
    ) -> Result<Unrecorded<sigil_proto::common::X509Svid>> {
        let started = Instant::now();
        let entry = self.state.authz.authorize(agent_id, entry_id)?;
        let csr = check_csr(csr)?;
        if let Some(requested) = csr.spiffe_id.as_ref().filter(|id| **id != entry.spiffe_id) {
            return Err(Error::PermissionDenied(format!(
                "the CSR asks for {requested}, but entry `{}` is {}; the agent is not authorized for that ID",
                untrusted(entry_id),
                entry.spiffe_id
            )));
        }
        let ttl = Duration::from_secs(u64::try_from(entry.x509_svid_ttl).unwrap_or(0));
        let svid = self.state.issuer.workload_x509(
            &csr.public_key,
            &entry.spiffe_id,
            &entry.dns_names,
            ttl,
            Recipient { agent_id, entry_id },
        )?;
        self.state
            .metrics
            .signing_seconds
            .observe(started.elapsed().as_secs_f64());
        let spiffe_id = entry.spiffe_id.to_string();
        Ok(svid.map(|svid| svid_to_proto(spiffe_id, &svid)))
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<D: DataStore> AgentApi for AgentService<D> {
    async fn attest_node(
        &self,
        request: Request<AttestNodeRequest>,
    ) -> Result<Response<AttestNodeResponse>, Status> {
        let request = request.into_inner();
        // The label takes a configured attestor's name or `unknown`, never the caller's string.
        let attestor = self
            .state
            .attestors
            .get_key_value(request.attestor.as_str())
            .map_or("unknown", |(name, _)| *name);
        let outcome = match self.admission.attestation_slot().await {
            Ok(_slot) => self.attest(request).await,
            Err(busy) => Err(busy),
        };
        let result = match &outcome {
            Ok(_) => "success",
            Err(Error::Busy(_)) => "busy",
            Err(Error::Unauthenticated(_) | Error::PermissionDenied(_) | Error::Invalid(_)) => {
                "refused"
            }
            Err(_) => "error",
        };
        self.state
            .metrics
            .attestations
            .get_or_create(&AttestationLabels { attestor, result })
            .inc();
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, "node attestation refused");
        }
        Ok(Response::new(outcome?))
    }

    async fn renew_agent_svid(
        &self,
        request: Request<RenewAgentSvidRequest>,
    ) -> Result<Response<RenewAgentSvidResponse>, Status> {
        let caller = caller_agent(&request, &self.state).await?;
        let agent_id = caller.id;
        let id = sigil_core::id::parse_spiffe_id("agent_id", &agent_id).map_err(Error::from)?;
        let svid = self
            .sign_agent_svid(&id, &request.get_ref().csr)
            .await
            .inspect_err(|e| {
                tracing::warn!(agent = %agent_id, error = %e, "agent SVID renewal refused");
            })?;
        let now = self.state.clock.unix_now();
        self.state
            .datastore
            .set_agent_svid(&agent_id, &caller.serial, &svid.serial, svid.not_after, now)
            .await?;
        // The agent reconnects with the new certificate at once; let the cache know it first.
        self.state.catch_up().await?;
        Ok(Response::new(RenewAgentSvidResponse {
            svid: Some(svid_to_proto(agent_id, &svid)),
        }))
    }

    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let caller = caller_agent(&request, &self.state).await?;
        let resume = request.into_inner().resume;
        let (sender, receiver) = mpsc::channel(sync::PAGES_IN_FLIGHT);
        let outbox = self.admission.outbox(sender);
        let state = self.state.clone();
        let streams = self.streams.clone();
        tokio::spawn(async move {
            state.metrics.sync_streams.inc();
            let first_stream = streams.open(&caller.id);
            if first_stream {
                state.metrics.agents_connected.inc();
            }
            sync::stream_changes(&state, &caller, resume, outbox).await;
            state.feed.unwatch_agent(&caller.id);
            state.metrics.sync_streams.dec();
            if streams.close(&caller.id) {
                state.metrics.agents_connected.dec();
            }
        });
        // A page's share of the budget is given back as it leaves the channel for the wire.
        let pages = ReceiverStream::new(receiver).map(|outgoing| {
            let (page, _budget) = *outgoing;
            page
        });
        Ok(Response::new(Box::pin(pages)))
    }

    async fn batch_sign_x509_svid(
        &self,
        request: Request<BatchSignX509SvidRequest>,
    ) -> Result<Response<BatchSignX509SvidResponse>, Status> {
        let agent_id = caller_agent(&request, &self.state).await?.id;
        let requests = request.into_inner().requests;
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "a batch carries at most {MAX_BATCH} CSRs; this one had {}; split it",
                requests.len()
            )));
        }
        // Sign the whole batch first: its records then reach the recorder together and are
        // written in one transaction before any SVID of the batch is answered.
        let signed: Vec<_> = requests
            .into_iter()
            .map(|item| {
                let svid = self.sign_one(&agent_id, &item.entry_id, &item.csr);
                (item.entry_id, svid)
            })
            .collect();
        let mut results = Vec::with_capacity(signed.len());
        for (entry_id, svid) in signed {
            let outcome = match svid {
                // A record that cannot be written fails the whole call (the batch shares one
                // transaction or spool append), as Unavailable, so the agent asks another server.
                Ok(unrecorded) => Ok(unrecorded.recorded().await?),
                Err(e) => Err(e),
            };
            results.push(match outcome {
                Ok(svid) => X509SvidResult {
                    entry_id,
                    svid: Some(svid),
                    error_code: 0,
                    error_message: String::new(),
                },
                Err(e) => {
                    tracing::warn!(agent = %agent_id, entry = %untrusted(&entry_id), error = %e, "X509-SVID request refused");
                    let status = e.status();
                    X509SvidResult {
                        entry_id,
                        svid: None,
                        error_code: status.code() as i32,
                        error_message: status.message().to_string(),
                    }
                }
            });
        }
        Ok(Response::new(BatchSignX509SvidResponse { results }))
    }

    async fn sign_jwt_svid(
        &self,
        request: Request<SignJwtSvidRequest>,
    ) -> Result<Response<SignJwtSvidResponse>, Status> {
        let agent_id = caller_agent(&request, &self.state).await?.id;
        let request = request.into_inner();
        let entry = self.state.authz.authorize(&agent_id, &request.entry_id)?;
        let ttl = Duration::from_secs(u64::try_from(entry.jwt_svid_ttl).unwrap_or(0));
        let signed = self
            .state
            .issuer
            .workload_jwt(
                &entry.spiffe_id,
                &request.audience,
                ttl,
                Recipient {
                    agent_id: &agent_id,
                    entry_id: &entry.id,
                },
            )?
            .recorded()
            .await?;
        let spiffe_id = entry.spiffe_id.to_string();
        Ok(Response::new(SignJwtSvidResponse {
            spiffe_id,
            token: signed.token,
            expires_at: signed.expires_at,
        }))
    }
}

#[cfg(test)]
mod admission_tests {
    use super::*;

    fn limits(max_attestations: usize, max_sync_page_mib: u64) -> AgentApiConfig {
        AgentApiConfig {
            max_attestations,
            max_sync_page_mib,
            ..AgentApiConfig::default()
        }
    }

    #[tokio::test]
    async fn an_attestation_past_the_limit_waits_then_is_turned_away_by_name() {
        let admission = Admission {
            attestation_wait: Duration::from_millis(20),
            ..Admission::new(&limits(1, 1))
        };
        let held = admission.attestation_slot().await.expect("the first slot");
        let refused = admission
            .attestation_slot()
            .await
            .expect_err("no slot is free");
        assert!(matches!(refused, Error::Busy(_)), "{refused}");
        assert_eq!(refused.status().code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.to_string().contains("agent_api.max_attestations"),
            "{refused}"
        );
        // Once the slot is given back, the next attestation gets it.
        drop(held);
        let _slot = admission.attestation_slot().await.expect("the freed slot");
    }

    #[tokio::test]
    async fn sync_pages_wait_for_the_shared_budget_and_return_it_when_taken() {
        let admission = Admission::new(&limits(1, 1));
        let (first_sender, mut first) = mpsc::channel(4);
        let (second_sender, mut second) = mpsc::channel(4);
        let (one, two) = (
            admission.outbox(first_sender),
            admission.outbox(second_sender),
        );
        // A page as large as the whole budget (1 MiB) takes all of it while it is queued.
        let big = SyncResponse {
            removed_entry_ids: vec!["x".repeat(1 << 20)],
            ..SyncResponse::default()
        };
        assert!(one.send(big).await);
        let small = SyncResponse {
            revision: 7,
            ..SyncResponse::default()
        };
        let blocked = tokio::spawn(async move { two.send(small).await });
        tokio::task::yield_now().await;
        assert!(second.try_recv().is_err(), "the budget is spent");
        // The first page leaves its channel (for the wire): its bytes return to the budget.
        let (page, permit) = *first.recv().await.expect("the big page");
        assert!(page.is_ok());
        drop(permit);
        assert!(
            blocked.await.expect("the sender"),
            "the small page went out"
        );
        let (page, _) = *second.recv().await.expect("the small page");
        assert_eq!(page.expect("a page").revision, 7);
    }
}
