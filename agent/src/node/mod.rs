//! The agent's side of the agent API: connecting to the server, proving the node, and keeping
//! the agent's own SVID (on disk, so a restart needs no new token) fresh.
//!
//! The server is authenticated by its SPIFFE ID (`spiffe://<td>/sigil/server`) against the
//! trust bundle: the bootstrap bundle on first contact, the bundle the server hands out after.
//! Once attested, the agent presents its own SVID as the TLS client certificate.

mod api;
mod connect;
#[cfg(test)]
pub(crate) mod fake;
mod link;
mod servers;
mod store;

use rcgen::KeyPair;
use sigil_core::bundle::TrustBundle;
use sigil_core::id::{SpiffeId, parse_spiffe_id};
use sigil_core::x509::{KeyType, csr_for};
use sigil_proto::agent::{AttestNodeRequest, RenewAgentSvidRequest};
use sigil_proto::common;

pub use api::{ServerApi, SyncStream};
pub use connect::{ServerConnection, connect, connect_insecure, server_channel};
pub use link::{Bootstrap, LinkSettings, NodeAttestation, ServerLink, keep_agent_svid_fresh};
pub use servers::{CONNECT_TIMEOUT, SKIP_FOR, Servers};
pub use store::IdentityStore;

use crate::{Error, Result};

/// The agent's own identity: its key and the SVID the server issued for it.
#[derive(Debug)]
pub struct AgentIdentity {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// Unix seconds.
    pub expires_at: i64,
    /// The agent's private key (never leaves the node).
    pub key: KeyPair,
}

fn identity_from(
    call: &'static str,
    key: KeyPair,
    svid: Option<common::X509Svid>,
) -> Result<AgentIdentity> {
    let svid = svid.ok_or_else(|| Error::BadAnswer {
        call,
        what: "no SVID".into(),
    })?;
    if svid.cert_chain.is_empty() {
        return Err(Error::BadAnswer {
            call,
            what: "an empty certificate chain".into(),
        });
    }
    Ok(AgentIdentity {
        spiffe_id: parse_spiffe_id("svid.spiffe_id", &svid.spiffe_id)?,
        chain: svid.cert_chain,
        expires_at: svid.expires_at,
        key,
    })
}

/// Attests the node with a join token over a connection made without a client certificate.
/// Returns the agent's identity and the trust bundle the server handed out.
pub async fn attest_with_join_token(
    connection: &mut ServerConnection,
    token: &str,
) -> Result<(AgentIdentity, TrustBundle)> {
    attest_node(connection, "join_token", token.as_bytes().to_vec()).await
}

/// Attests the node with `attestor` and its `payload` over a connection made without a client
/// certificate. Returns the agent's identity and the trust bundle the server handed out.
pub async fn attest_node(
    connection: &mut ServerConnection,
    attestor: &str,
    payload: Vec<u8>,
) -> Result<(AgentIdentity, TrustBundle)> {
    let key = KeyType::EcP256.generate()?;
    let response = connection
        .client
        .attest_node(AttestNodeRequest {
            attestor: attestor.into(),
            payload,
            csr: csr_for(&key, None)?,
        })
        .await
        .map_err(Error::refused("AttestNode"))?
        .into_inner();
    let bundle = response
        .bundle
        .as_ref()
        .map(TrustBundle::try_from)
        .transpose()?
        .ok_or_else(|| Error::BadAnswer {
            call: "AttestNode",
            what: "no trust bundle".into(),
        })?;
    Ok((identity_from("AttestNode", key, response.svid)?, bundle))
}

/// Renews the agent SVID for a fresh key over an authenticated connection.
pub async fn renew(connection: &mut ServerConnection) -> Result<AgentIdentity> {
    let key = KeyType::EcP256.generate()?;
    let response = connection
        .client
        .renew_agent_svid(RenewAgentSvidRequest {
            csr: csr_for(&key, None)?,
        })
        .await
        .map_err(Error::refused("RenewAgentSvid"))?
        .into_inner();
    identity_from("RenewAgentSvid", key, response.svid)
}
