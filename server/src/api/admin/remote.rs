//! The admin API over mTLS on the agent API port, for workloads whose entry has `admin = true`:
//! in-cluster controllers that manage entries, as SPIRE lets them. The handshake has verified the
//! client certificate against the bundle; every call must then present an X509-SVID of this trust
//! domain whose SPIFFE ID has an unexpired admin entry. Agent SVIDs and the server's own never
//! qualify. Everything else about the admin API stays on the owner-only local socket.

use std::sync::Arc;

use sigil_core::id::{is_agent_id, server_id};
use sigil_core::untrusted::untrusted;
use sigil_core::x509::certificate_facts;
use tonic::{Request, Status};

use super::super::ServerState;
use crate::datastore::DataStore;

/// The check run before every remote admin call (a tonic interceptor).
pub fn admin_workloads_only<D: DataStore>(
    state: Arc<ServerState<D>>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let certs = request.peer_certs().ok_or_else(|| {
            Status::unauthenticated(
                "the admin API on this port needs the workload's X509-SVID as the TLS client certificate",
            )
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let facts = certificate_facts(leaf)
            .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?;
        let trust_domain = state.ca.trust_domain();
        let id = facts.spiffe_id.ok_or_else(|| {
            Status::permission_denied("the client certificate carries no SPIFFE ID")
        })?;
        let allowed = id.is_member_of(trust_domain)
            && !is_agent_id(&id, trust_domain)
            && id != server_id(trust_domain)
            && state.authz.is_admin(&id.to_string());
        if !allowed {
            tracing::warn!(caller = %untrusted(&id.to_string()), "admin call over mTLS refused");
            return Err(Status::permission_denied(format!(
                "{id} may not call the admin API: no entry for this SPIFFE ID has admin = true (an operator sets it with `entry create|update --admin`)"
            )));
        }
        Ok(request)
    }
}
