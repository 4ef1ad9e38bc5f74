//! The admin API: join tokens, registration entries, agents, bundles (own and federated),
//! federation relationships and the issuance record.
//!
//! It listens on a Unix socket with owner-only permissions: whoever can open the socket is the
//! operator. It is also served on the agent API port over mTLS, to workloads whose entry has
//! `admin = true` only (see `remote`). Every write goes to the datastore first and then into the in-memory
//! authorizations, so an entry created here is visible to sync streams before the call returns.

use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};
use sigil_core::entry::EntryInput;
use sigil_core::id::{parse_member_id, parse_trust_domain, server_id};
use sigil_proto::admin::admin_api_server::AdminApi;
use sigil_proto::admin::{
    Agent, AgentId, Authority, AuthorityId, BatchCreateEntriesRequest, BatchDeleteEntriesRequest,
    BatchEntriesResponse, BatchUpdateEntriesRequest, CountAgentsRequest, CountEntriesRequest,
    CountResponse, CreateEntryRequest, CreateJoinTokenRequest, CreateJoinTokenResponse, EntryId,
    FederationRelationship, GetBundleRequest, IssuedSvid, ListAgentsRequest, ListAgentsResponse,
    ListAuthoritiesRequest, ListAuthoritiesResponse, ListBundlesRequest, ListBundlesResponse,
    ListEntriesRequest, ListEntriesResponse, ListFederationsRequest, ListFederationsResponse,
    ListSvidsRequest, ListSvidsResponse, SetBundleRequest, SvidSerial, TrustDomainName,
    UpdateEntryRequest,
};
use sigil_proto::common;
use tonic::{Request, Response, Status};

mod entries;
mod remote;

pub use entries::{DEFAULT_PAGE_SIZE, MAX_BATCH, MAX_PAGE_SIZE};
pub use remote::admin_workloads_only;

use entries::{BatchItem, entry_filter, into_page, page_size};

use super::convert::{agent_to_proto, entry_to_proto, issued_to_proto};
use super::{ServerState, federation};
use crate::attest::{generate_join_token, hash_token, token_agent_id, token_selector};
use crate::datastore::{DataStore, JoinToken, SvidFilter};
use crate::{Error, Result};

/// The admin API over a [`ServerState`].
#[derive(Debug)]
pub struct AdminService<D> {
    state: Arc<ServerState<D>>,
}

impl<D> AdminService<D> {
    /// The service over shared server state.
    pub fn new(state: Arc<ServerState<D>>) -> Self {
        AdminService { state }
    }
}

impl<D: DataStore> AdminService<D> {
    /// After a journal change: agents see the new bundle and tainted set on their sync streams
    /// before the call returns.
    async fn after_ca_change(&self) -> Result<()> {
        self.state.catch_up().await?;
        self.state.feed.bump();
        self.state.ca_changed.notify_one();
        Ok(())
    }
}

fn authority_to_proto(authority: &crate::datastore::Authority) -> Authority {
    Authority {
        id: authority.id.clone(),
        kind: match authority.kind {
            crate::datastore::AuthorityKind::X509 => "x509".into(),
            crate::datastore::AuthorityKind::Jwt => "jwt".into(),
        },
        state: authority.state.to_string(),
        not_after: authority.not_after,
        created_at: authority.created_at,
        public_data: authority.public_data.clone(),
        owner: authority.owner.clone(),
    }
}

/// A new entry id: 128 random bits in hex.
fn new_entry_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::ca("the system random source failed"))?;
    Ok(hex::encode(bytes))
}

fn required(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        Err(Error::Invalid(sigil_core::Error::field(
            field,
            "is required",
        )))
    } else {
        Ok(())
    }
}

impl<D: DataStore> AdminService<D> {
    async fn create_token(
        &self,
        request: CreateJoinTokenRequest,
    ) -> Result<CreateJoinTokenResponse> {
        let trust_domain = self.state.ca.trust_domain();
        if request.ttl < 0 {
            return Err(Error::Invalid(sigil_core::Error::field(
                "ttl",
                "must be positive",
            )));
        }
        let now = self.state.clock.unix_now();
        let ttl = if request.ttl == 0 {
            i64::try_from(self.state.join_token_ttl.as_secs()).unwrap_or(600)
        } else {
            request.ttl
        };
        let token = generate_join_token()?;
        let token_hash = hash_token(&token);
        if !request.alias_spiffe_id.is_empty() {
            // The alias is a node-alias entry: parented to the server, matching this token's
            // selector, so the agent that uses the token also obtains the alias's entries.
            let alias = parse_member_id("spiffe_id", &request.alias_spiffe_id, trust_domain)?;
            let entry = EntryInput {
                spiffe_id: alias.to_string(),
                parent_id: server_id(trust_domain).to_string(),
                selectors: vec![token_selector(&token_hash)?],
                ..EntryInput::default()
            }
            .validate(trust_domain, new_entry_id()?, now)?;
            self.state.datastore.create_entry(&entry).await?;
        }
        self.state
            .datastore
            .create_join_token(&JoinToken {
                token_hash: token_hash.clone(),
                alias_spiffe_id: request.alias_spiffe_id,
                expires_at: now + ttl,
                created_at: now,
            })
            .await?;
        self.state.catch_up().await?;
        Ok(CreateJoinTokenResponse {
            token,
            expires_at: now + ttl,
            agent_spiffe_id: token_agent_id(trust_domain, &token_hash)?.to_string(),
        })
    }
}

#[tonic::async_trait]
impl<D: DataStore> AdminApi for AdminService<D> {
    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        Ok(Response::new(
            self.create_token(request.into_inner()).await?,
        ))
    }

    async fn create_entry(
        &self,
        request: Request<CreateEntryRequest>,
    ) -> Result<Response<common::Entry>, Status> {
        Ok(Response::new(
            self.write_entry(request.into_inner().entry, true).await?,
        ))
    }

    async fn update_entry(
        &self,
        request: Request<UpdateEntryRequest>,
    ) -> Result<Response<common::Entry>, Status> {
        Ok(Response::new(
            self.write_entry(request.into_inner().entry, false).await?,
        ))
    }

    async fn delete_entry(
        &self,
        request: Request<EntryId>,
    ) -> Result<Response<common::Entry>, Status> {
        let id = request.into_inner().id;
        required("id", &id)?;
        let deleted = self.state.datastore.delete_entry(&id).await?;
        self.state.catch_up().await?;
        Ok(Response::new(entry_to_proto(&deleted)))
    }

    async fn batch_create_entries(
        &self,
        request: Request<BatchCreateEntriesRequest>,
    ) -> Result<Response<BatchEntriesResponse>, Status> {
        let items = request
            .into_inner()
            .entries
            .into_iter()
            .map(BatchItem::Create);
        Ok(Response::new(self.write_batch(items.collect()).await?))
    }

    async fn batch_update_entries(
        &self,
        request: Request<BatchUpdateEntriesRequest>,
    ) -> Result<Response<BatchEntriesResponse>, Status> {
        let items = request
            .into_inner()
            .entries
            .into_iter()
            .map(BatchItem::Update);
        Ok(Response::new(self.write_batch(items.collect()).await?))
    }

    async fn batch_delete_entries(
        &self,
        request: Request<BatchDeleteEntriesRequest>,
    ) -> Result<Response<BatchEntriesResponse>, Status> {
        let items = request.into_inner().ids.into_iter().map(BatchItem::Delete);
        Ok(Response::new(self.write_batch(items.collect()).await?))
    }

    async fn get_entry(
        &self,
        request: Request<EntryId>,
    ) -> Result<Response<common::Entry>, Status> {
        let id = request.into_inner().id;
        required("id", &id)?;
        let entry = self
            .state
            .datastore
            .get_entry(&id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("entry `{id}`")))?;
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size, &request.page_token)?;
        let filter = entry_filter(request.spiffe_id, request.parent_id, request.selectors)?;
        let fetched = self
            .state
            .datastore
            .list_entries_page(&filter, &request.page_token, limit + 1)
            .await?;
        let (entries, next_page_token) = into_page(fetched, limit, |entry| entry.id.clone());
        Ok(Response::new(ListEntriesResponse {
            entries: entries.iter().map(entry_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn count_entries(
        &self,
        request: Request<CountEntriesRequest>,
    ) -> Result<Response<CountResponse>, Status> {
        let request = request.into_inner();
        let filter = entry_filter(request.spiffe_id, request.parent_id, request.selectors)?;
        let count = self.state.datastore.count_entries(&filter).await?;
        Ok(Response::new(CountResponse { count }))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size, &request.page_token)?;
        let fetched = self
            .state
            .datastore
            .list_agents_page(&request.page_token, limit + 1)
            .await?;
        let (agents, next_page_token) = into_page(fetched, limit, |agent| agent.spiffe_id.clone());
        Ok(Response::new(ListAgentsResponse {
            agents: agents.iter().map(agent_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn count_agents(
        &self,
        _request: Request<CountAgentsRequest>,
    ) -> Result<Response<CountResponse>, Status> {
        let count = self.state.datastore.count_agents().await?;
        Ok(Response::new(CountResponse { count }))
    }

    async fn get_agent(&self, request: Request<AgentId>) -> Result<Response<Agent>, Status> {
        let id = request.into_inner().spiffe_id;
        let agent = self
            .state
            .datastore
            .get_agent(&id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("agent `{id}`")))?;
        Ok(Response::new(agent_to_proto(&agent)))
    }

    async fn evict_agent(&self, request: Request<AgentId>) -> Result<Response<Agent>, Status> {
        let id = request.into_inner().spiffe_id;
        let agent = self.state.datastore.delete_agent(&id).await?;
        self.state.catch_up().await?;
        tracing::info!(agent = %id, "agent evicted; it must attest again");
        Ok(Response::new(agent_to_proto(&agent)))
    }

    async fn ban_agent(&self, request: Request<AgentId>) -> Result<Response<Agent>, Status> {
        let id = request.into_inner().spiffe_id;
        let agent = self
            .state
            .datastore
            .ban_agent(&id, self.state.clock.unix_now())
            .await?;
        self.state.catch_up().await?;
        tracing::info!(agent = %id, "agent banned");
        Ok(Response::new(agent_to_proto(&agent)))
    }

    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<common::Bundle>, Status> {
        let name = request.into_inner().trust_domain;
        if name.is_empty() || name == self.state.ca.trust_domain().as_str() {
            return Ok(Response::new(common::Bundle::from(
                self.state.ca.bundle().as_ref(),
            )));
        }
        let td = parse_trust_domain("trust_domain", &name).map_err(Error::from)?;
        let bundle = self
            .state
            .datastore
            .get_bundle(&td)
            .await?
            .ok_or_else(|| Error::NotFound(format!("the bundle of {td}")))?;
        Ok(Response::new(common::Bundle::from(&bundle)))
    }

    async fn list_bundles(
        &self,
        _request: Request<ListBundlesRequest>,
    ) -> Result<Response<ListBundlesResponse>, Status> {
        let bundles = self.state.datastore.list_bundles().await?;
        Ok(Response::new(ListBundlesResponse {
            bundles: bundles.iter().map(common::Bundle::from).collect(),
        }))
    }

    async fn set_bundle(
        &self,
        request: Request<SetBundleRequest>,
    ) -> Result<Response<common::Bundle>, Status> {
        let request = request.into_inner();
        let bundle = federation::set_bundle(
            &self.state,
            &request.trust_domain,
            &request.spiffe_bundle_json,
        )
        .await?;
        tracing::info!(trust_domain = %bundle.trust_domain, sequence = bundle.sequence, "bundle set by the operator");
        Ok(Response::new(common::Bundle::from(&bundle)))
    }

    async fn delete_bundle(
        &self,
        request: Request<TrustDomainName>,
    ) -> Result<Response<common::Bundle>, Status> {
        let bundle =
            federation::delete_bundle(&self.state, &request.into_inner().trust_domain).await?;
        Ok(Response::new(common::Bundle::from(&bundle)))
    }

    async fn create_federation(
        &self,
        request: Request<FederationRelationship>,
    ) -> Result<Response<FederationRelationship>, Status> {
        Ok(Response::new(
            federation::put_relationship(&self.state, request.into_inner(), false).await?,
        ))
    }

    async fn update_federation(
        &self,
        request: Request<FederationRelationship>,
    ) -> Result<Response<FederationRelationship>, Status> {
        Ok(Response::new(
            federation::put_relationship(&self.state, request.into_inner(), true).await?,
        ))
    }

    async fn get_federation(
        &self,
        request: Request<TrustDomainName>,
    ) -> Result<Response<FederationRelationship>, Status> {
        Ok(Response::new(
            federation::get_relationship(&self.state, &request.into_inner().trust_domain).await?,
        ))
    }

    async fn list_federations(
        &self,
        _request: Request<ListFederationsRequest>,
    ) -> Result<Response<ListFederationsResponse>, Status> {
        Ok(Response::new(ListFederationsResponse {
            relationships: federation::list_relationships(&self.state).await?,
        }))
    }

    async fn delete_federation(
        &self,
        request: Request<TrustDomainName>,
    ) -> Result<Response<FederationRelationship>, Status> {
        Ok(Response::new(
            federation::delete_relationship(&self.state, &request.into_inner().trust_domain)
                .await?,
        ))
    }

    async fn refresh_federation(
        &self,
        request: Request<TrustDomainName>,
    ) -> Result<Response<common::Bundle>, Status> {
        Ok(Response::new(
            federation::refresh(&self.state, &request.into_inner().trust_domain).await?,
        ))
    }

    async fn list_authorities(
        &self,
        _request: Request<ListAuthoritiesRequest>,
    ) -> Result<Response<ListAuthoritiesResponse>, Status> {
        let journal = self.state.datastore.list_authorities().await?;
        Ok(Response::new(ListAuthoritiesResponse {
            authorities: journal.iter().map(authority_to_proto).collect(),
        }))
    }

    async fn prepare_authorities(
        &self,
        _request: Request<ListAuthoritiesRequest>,
    ) -> Result<Response<ListAuthoritiesResponse>, Status> {
        let prepared = self.state.ca.prepare(self.state.datastore.as_ref()).await?;
        self.after_ca_change().await?;
        Ok(Response::new(ListAuthoritiesResponse {
            authorities: prepared.iter().map(authority_to_proto).collect(),
        }))
    }

    async fn activate_authorities(
        &self,
        _request: Request<ListAuthoritiesRequest>,
    ) -> Result<Response<ListAuthoritiesResponse>, Status> {
        let activated = self
            .state
            .ca
            .activate(self.state.datastore.as_ref())
            .await?;
        self.after_ca_change().await?;
        Ok(Response::new(ListAuthoritiesResponse {
            authorities: activated.iter().map(authority_to_proto).collect(),
        }))
    }

    async fn taint_authority(
        &self,
        request: Request<AuthorityId>,
    ) -> Result<Response<Authority>, Status> {
        let tainted = self
            .state
            .ca
            .taint(self.state.datastore.as_ref(), &request.into_inner().id)
            .await?;
        self.after_ca_change().await?;
        Ok(Response::new(authority_to_proto(&tainted)))
    }

    async fn revoke_authority(
        &self,
        request: Request<AuthorityId>,
    ) -> Result<Response<Authority>, Status> {
        let revoked = self
            .state
            .ca
            .revoke(self.state.datastore.as_ref(), &request.into_inner().id)
            .await?;
        self.after_ca_change().await?;
        Ok(Response::new(authority_to_proto(&revoked)))
    }

    async fn list_svids(
        &self,
        request: Request<ListSvidsRequest>,
    ) -> Result<Response<ListSvidsResponse>, Status> {
        let request = request.into_inner();
        let filter = SvidFilter {
            spiffe_id: Some(request.spiffe_id).filter(|s| !s.is_empty()),
            agent_id: Some(request.agent_id).filter(|s| !s.is_empty()),
            valid_at: request.valid_only.then(|| self.state.clock.unix_now()),
        };
        let svids = self.state.datastore.list_issued_svids(&filter).await?;
        Ok(Response::new(ListSvidsResponse {
            svids: svids.iter().map(issued_to_proto).collect(),
        }))
    }

    async fn get_svid(&self, request: Request<SvidSerial>) -> Result<Response<IssuedSvid>, Status> {
        let serial = request.into_inner().serial.to_ascii_lowercase();
        let svid = self
            .state
            .datastore
            .get_issued_svid(&serial)
            .await?
            .ok_or_else(|| Error::NotFound(format!("issued SVID with serial `{serial}`")))?;
        Ok(Response::new(issued_to_proto(&svid)))
    }
}

/// A client of the admin API on the Unix socket at `socket` (what the CLI and the quickstart use).
pub async fn connect(
    socket: &std::path::Path,
) -> Result<sigil_proto::admin::admin_api_client::AdminApiClient<tonic::transport::Channel>> {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: every connection goes to the Unix socket.
    let channel = tonic::transport::Endpoint::from_static("http://admin.sock")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| {
            Error::Unavailable(format!(
                "cannot reach the server's admin socket {} ({e}); is `sigil-server run` running, and is --socket (or SIGIL_ADMIN_SOCKET) right?",
                socket.display()
            ))
        })?;
    Ok(
        sigil_proto::admin::admin_api_client::AdminApiClient::new(channel)
            .max_decoding_message_size(usize::MAX),
    )
}
