//! The agent's seam to the server: every call the agent makes once it is attested. The signer,
//! the sync follower and the workload source see only [`ServerApi`]; [`ServerLink`] implements it
//! over the agent API, and unit tests implement it with a fake server. A failed call comes back
//! as [`Error::Refused`](crate::Error::Refused), which keeps the server's status.
//!
//! A call that cannot reach its server, or that the server cannot serve now, is made again on a
//! new connection (to another server when one answers): up to [`ATTEMPTS`] times in all.

use std::future::Future;
use std::sync::Arc;

use super::{ServerConnection, ServerLink};
use crate::{Error, Result};
use futures::StreamExt;
use futures::stream::BoxStream;
use sigil_core::bundle::TrustBundle;
use sigil_proto::agent::{
    BatchSignX509SvidRequest, SignJwtSvidRequest, SignJwtSvidResponse, SyncRequest, SyncResponse,
    X509SvidRequest, X509SvidResult,
};
use tonic::{Code, Status};

/// The stream of a `Sync` call: a snapshot, then every change.
pub type SyncStream = BoxStream<'static, Result<SyncResponse>>;

/// What the agent asks of the server.
#[tonic::async_trait]
pub trait ServerApi: std::fmt::Debug + Send + Sync + 'static {
    /// `BatchSignX509Svid`: one result per request, in the order given.
    async fn batch_sign_x509(&self, requests: Vec<X509SvidRequest>) -> Result<Vec<X509SvidResult>>;

    /// `SignJwtSvid` for the entry and audience.
    async fn sign_jwt(&self, entry_id: &str, audience: &[String]) -> Result<SignJwtSvidResponse>;

    /// Opens the `Sync` stream; `request` may say what the agent already holds.
    async fn sync(&self, request: SyncRequest) -> Result<SyncStream>;

    /// Keeps a bundle the server sent and trusts its roots from the next connection on.
    async fn trust(&self, bundle: &TrustBundle) -> Result<()>;
}

/// How many times one call is tried, each on a fresh connection after the first: with two
/// servers, one of them dead, the second try reaches the live one.
const ATTEMPTS: usize = 3;

/// Whether a call that failed with `code` may succeed on another server: the transport failed
/// (`Unavailable`, or `Unknown` for a connection that broke mid-call) or the server cannot serve
/// now. A refusal of the request itself would be the same everywhere.
pub(super) fn another_server_may_answer(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown)
}

impl ServerLink {
    /// Runs `call` on the current connection and, while it fails in a way another server may not,
    /// again on a new one.
    async fn with_failover<T, F, Fut>(&self, name: &'static str, call: F) -> Result<T>
    where
        F: Fn(Arc<ServerConnection>) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let mut attempt = 1;
        loop {
            let connection = self.connection();
            match call(connection.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(status) if attempt < ATTEMPTS && another_server_may_answer(status.code()) => {
                    tracing::debug!(call = name, attempt, error = %status.message(), "the call failed; trying it on a new connection");
                    self.fail_over(&connection);
                    attempt += 1;
                }
                Err(status) => {
                    if another_server_may_answer(status.code()) {
                        self.fail_over(&connection);
                    }
                    return Err(Error::Refused { call: name, status });
                }
            }
        }
    }
}

#[tonic::async_trait]
impl ServerApi for ServerLink {
    async fn batch_sign_x509(&self, requests: Vec<X509SvidRequest>) -> Result<Vec<X509SvidResult>> {
        let answer = self
            .with_failover("BatchSignX509Svid", |connection| {
                let requests = requests.clone();
                async move {
                    let mut client = connection.client.clone();
                    client
                        .batch_sign_x509_svid(BatchSignX509SvidRequest { requests })
                        .await
                }
            })
            .await?;
        Ok(answer.into_inner().results)
    }

    async fn sign_jwt(&self, entry_id: &str, audience: &[String]) -> Result<SignJwtSvidResponse> {
        let request = SignJwtSvidRequest {
            entry_id: entry_id.to_string(),
            audience: audience.to_vec(),
        };
        let answer = self
            .with_failover("SignJwtSvid", |connection| {
                let request = request.clone();
                async move { connection.client.clone().sign_jwt_svid(request).await }
            })
            .await?;
        Ok(answer.into_inner())
    }

    async fn sync(&self, request: SyncRequest) -> Result<SyncStream> {
        let answer = self
            .with_failover("Sync", |connection| {
                let request = request.clone();
                async move { connection.client.clone().sync(request).await }
            })
            .await?;
        Ok(answer
            .into_inner()
            .map(|message| message.map_err(Error::refused("Sync")))
            .boxed())
    }

    async fn trust(&self, bundle: &TrustBundle) -> Result<()> {
        ServerLink::trust(self, bundle).await
    }
}
