//! Node attestation: how an agent proves which node it runs on.
//!
//! Each attestor turns an attestor-specific payload into an [`AttestedNode`]: the agent's SPIFFE
//! ID and the node selectors that node aliases match on. The agent API looks attestors up by name,
//! so adding one touches nothing else.

mod join_token;
mod k8s_psat;

use futures::future::BoxFuture;
use sigil_core::id::SpiffeId;
use sigil_core::selector::Selector;

use crate::Result;

pub use join_token::{
    JoinTokenAttestor, generate_join_token, hash_token, token_agent_id, token_selector,
};
pub use k8s_psat::{PsatAttestor, agent_node_name};

/// The outcome of a successful node attestation.
#[derive(Debug, Clone)]
pub struct AttestedNode {
    /// The agent's SPIFFE ID: `spiffe://<td>/sigil/agent/<attestor>/...`.
    pub agent_id: SpiffeId,
    /// Facts about the node, for node aliases.
    pub selectors: Vec<Selector>,
}

/// One way of proving a node.
pub trait NodeAttestor: Send + Sync + 'static {
    /// The name agents send in `AttestNodeRequest.attestor`.
    fn name(&self) -> &'static str;

    /// Checks the payload; refused payloads give [`crate::Error::Unauthenticated`].
    fn attest<'a>(&'a self, payload: &'a [u8]) -> BoxFuture<'a, Result<AttestedNode>>;
}
