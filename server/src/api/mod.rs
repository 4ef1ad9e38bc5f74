//! The server's network faces.
//!
//! - [`agent`]: the agent API, gRPC over mutual TLS on TCP, served with the server's own SVID.
//! - [`admin`]: the admin API, gRPC on a Unix socket only the server's user can open.
//! - [`health`]: `/live`, `/ready` and `/metrics` over plain HTTP.
//! - [`istio`]: Istio's certificate service (Sigil as Istio's external CA), on the agent API port.
//! - [`tls`]: the server's own SVID and the TLS configuration built from it.
//!
//! A signing request flows: TLS handshake ([`tls`]) -> [`agent::AgentService`] finds the calling
//! agent from its certificate -> [`crate::authz`] says whether the agent may obtain the entry ->
//! [`sigil_core::x509::check_csr`] checks the CSR -> [`crate::ca::Issuer`] has the
//! [`crate::ca::Ca`] sign, and the [`crate::ca::IssuanceRecorder`] write the record (to the
//! datastore, or to the local spool while it is away) before the SVID is answered. Every path that hands out an SVID (agent API, server TLS, Istio CA) goes through
//! the one [`crate::ca::Issuer`].

pub mod admin;
pub mod agent;
mod convert;
mod federation;
pub mod health;
pub mod istio;
pub mod tls;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sigil_core::clock::SharedClock;

use crate::attest::NodeAttestor;
use crate::authz::Authorizations;
use crate::bundles::TrustBundles;
use crate::ca::{Ca, Issuer};
use crate::datastore::DataStore;
use crate::federation::Federation;
use crate::feed::Feed;
use crate::metrics::Metrics;

/// What every API handler shares.
pub struct ServerState<D> {
    /// The source of truth.
    pub datastore: Arc<D>,
    /// The CA.
    pub ca: Arc<Ca>,
    /// Who may obtain what (kept current by `feed`).
    pub authz: Arc<Authorizations>,
    /// The own and federated trust bundles as stored (kept current by `feed`).
    pub bundles: Arc<TrustBundles>,
    /// Follows the change feed into `authz` and `bundles`; sync streams wait on it.
    pub feed: Arc<Feed>,
    /// Signs, records and counts every SVID the server hands out.
    pub issuer: Issuer,
    /// Prometheus series.
    pub metrics: Arc<Metrics>,
    /// The federated bundles' refresher.
    pub federation: Arc<Federation>,
    /// Signalled when an operator changed the CA journal: the CA maintenance task (server SVID,
    /// bundle) runs at once instead of at its next tick.
    pub ca_changed: Arc<tokio::sync::Notify>,
    /// The clock.
    pub clock: SharedClock,
    /// Node attestors by name.
    pub attestors: HashMap<&'static str, Arc<dyn NodeAttestor>>,
    /// Lifetime of agent SVIDs.
    pub agent_svid_ttl: Duration,
    /// Lifetime of join tokens when the request sets none.
    pub join_token_ttl: Duration,
    /// DNS names of the server's own certificate.
    pub server_dns_names: Vec<String>,
    /// Turns true when the server begins to stop: long-lived streams end so the stop can finish.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl<D> std::fmt::Debug for ServerState<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("ca", &self.ca)
            .field("attestors", &self.attestors.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<D: DataStore> ServerState<D> {
    /// Applies the change feed, so a write this server just made is visible to every request
    /// (and every sync stream is woken) before the write's caller gets its answer.
    pub async fn catch_up(&self) -> crate::Result<()> {
        self.feed.catch_up(self.datastore.as_ref()).await
    }
}
