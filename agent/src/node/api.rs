//! The agent's seam to the server: every call the agent makes once it is attested. The signer,
//! the sync follower and the workload source see only [`ServerApi`]; [`ServerLink`] implements it
//! over the agent API, and unit tests implement it with a fake server. A failed call comes back
//! as [`Error::Refused`](crate::Error::Refused), which keeps the server's status.

use super::ServerLink;
use crate::{Error, Result};
use futures::StreamExt;
use futures::stream::BoxStream;
use sigil_core::bundle::TrustBundle;
use sigil_proto::agent::{
    BatchSignX509SvidRequest, SignJwtSvidRequest, SignJwtSvidResponse, SyncRequest, SyncResponse,
    X509SvidRequest, X509SvidResult,
};

/// The stream of a `Sync` call: a snapshot, then every change.
pub type SyncStream = BoxStream<'static, Result<SyncResponse>>;

/// What the agent asks of the server.
#[tonic::async_trait]
pub trait ServerApi: std::fmt::Debug + Send + Sync + 'static {
    /// `BatchSignX509Svid`: one result per request, in the order given.
    async fn batch_sign_x509(&self, requests: Vec<X509SvidRequest>) -> Result<Vec<X509SvidResult>>;

    /// `SignJwtSvid` for the entry and audience.
    async fn sign_jwt(&self, entry_id: &str, audience: &[String]) -> Result<SignJwtSvidResponse>;

    /// Opens the `Sync` stream.
    async fn sync(&self) -> Result<SyncStream>;

    /// Keeps a bundle the server sent and trusts its roots from the next connection on.
    async fn trust(&self, bundle: &TrustBundle) -> Result<()>;
}

#[tonic::async_trait]
impl ServerApi for ServerLink {
    async fn batch_sign_x509(&self, requests: Vec<X509SvidRequest>) -> Result<Vec<X509SvidResult>> {
        Ok(self
            .client()
            .batch_sign_x509_svid(BatchSignX509SvidRequest { requests })
            .await
            .map_err(Error::refused("BatchSignX509Svid"))?
            .into_inner()
            .results)
    }

    async fn sign_jwt(&self, entry_id: &str, audience: &[String]) -> Result<SignJwtSvidResponse> {
        Ok(self
            .client()
            .sign_jwt_svid(SignJwtSvidRequest {
                entry_id: entry_id.to_string(),
                audience: audience.to_vec(),
            })
            .await
            .map_err(Error::refused("SignJwtSvid"))?
            .into_inner())
    }

    async fn sync(&self) -> Result<SyncStream> {
        Ok(self
            .client()
            .sync(SyncRequest {})
            .await
            .map_err(Error::refused("Sync"))?
            .into_inner()
            .map(|message| message.map_err(Error::refused("Sync")))
            .boxed())
    }

    async fn trust(&self, bundle: &TrustBundle) -> Result<()> {
        ServerLink::trust(self, bundle).await
    }
}
