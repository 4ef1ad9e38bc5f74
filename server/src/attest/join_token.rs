//! Join-token node attestation: an operator generates a one-time token; the first agent that
//! presents it before it expires becomes `spiffe://<td>/sigil/agent/join_token/<token-id>`.
//!
//! Only the token's SHA-256 is stored; the token id in the agent ID is a prefix of that hash, so
//! neither the database nor the agent's ID reveals the token.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use sigil_core::clock::SharedClock;
use sigil_core::id::{SpiffeId, TrustDomain, agent_id};
use sigil_core::selector::Selector;

use super::{AttestedNode, NodeAttestor};
use crate::datastore::{DataStore, TokenRefusal};
use crate::{Error, Result};

/// The attestor's name on the wire and in agent IDs.
const NAME: &str = "join_token";

/// The longest token accepted, in bytes (generated tokens are 32).
const MAX_TOKEN_LEN: usize = 256;

/// A fresh random token: 128 bits as 32 hex characters.
pub fn generate_join_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::ca("the system random source failed"))?;
    Ok(hex::encode(bytes))
}

/// The stored form of a token: lower-case hex SHA-256.
pub fn hash_token(token: &str) -> String {
    hex::encode(digest(&SHA256, token.as_bytes()))
}

/// The agent ID a token leads to.
pub fn token_agent_id(trust_domain: &TrustDomain, token_hash: &str) -> Result<SpiffeId> {
    Ok(agent_id(trust_domain, NAME, &[token_id(token_hash)])?)
}

/// The node selector an agent attested with this token carries (what a token's node alias
/// matches on).
pub fn token_selector(token_hash: &str) -> Result<Selector> {
    Ok(Selector::new(NAME, token_id(token_hash))?)
}

fn token_id(token_hash: &str) -> &str {
    token_hash.get(..16).unwrap_or(token_hash)
}

/// Checks join tokens against the datastore and uses each up.
pub struct JoinTokenAttestor<D> {
    datastore: Arc<D>,
    trust_domain: TrustDomain,
    clock: SharedClock,
}

impl<D> JoinTokenAttestor<D> {
    /// An attestor over `datastore`.
    pub fn new(datastore: Arc<D>, trust_domain: TrustDomain, clock: SharedClock) -> Self {
        JoinTokenAttestor {
            datastore,
            trust_domain,
            clock,
        }
    }
}

impl<D: DataStore> NodeAttestor for JoinTokenAttestor<D> {
    fn name(&self) -> &'static str {
        NAME
    }

    fn attest<'a>(&'a self, payload: &'a [u8]) -> BoxFuture<'a, Result<AttestedNode>> {
        async move {
            let token = std::str::from_utf8(payload)
                .ok()
                .map(str::trim)
                .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN)
                .ok_or_else(|| Error::Unauthenticated("the join token is empty, too long or not text".into()))?;
            let token_hash = hash_token(token);
            let outcome = self.datastore.use_join_token(&token_hash, self.clock.unix_now()).await?;
            match outcome {
                Ok(_) => Ok(AttestedNode {
                    agent_id: token_agent_id(&self.trust_domain, &token_hash)?,
                    selectors: vec![token_selector(&token_hash)?],
                }),
                Err(TokenRefusal::Unknown) => Err(Error::Unauthenticated(
                    "unknown join token; generate one with `sigil-server token generate`".into(),
                )),
                Err(TokenRefusal::AlreadyUsed) => Err(Error::Unauthenticated(
                    "the join token was already used; each token attests one agent once, so generate a new one".into(),
                )),
                Err(TokenRefusal::Expired) => Err(Error::Unauthenticated(
                    "the join token has expired; generate a new one".into(),
                )),
            }
        }
        .boxed()
    }
}
