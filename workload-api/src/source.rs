//! Where a Workload API server gets identities from.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use futures::future::BoxFuture;
use sigil_core::bundle::TrustBundle;
use sigil_core::selector::Selector;
use tokio::sync::watch;
use tonic::Status;

use crate::peer::PeerProcess;

/// Who is calling, from the socket's peer credentials (SO_PEERCRED) and the process held since
/// the connection was accepted.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The process id, when the kernel reports one.
    pub pid: Option<i32>,
    /// The effective user id.
    pub uid: u32,
    /// The effective group id.
    pub gid: u32,
    /// The process that connected, held since accept: read `/proc` through it, then verify it.
    /// `None` when the kernel reports no pid (a caller in a pid namespace the agent cannot see).
    pub process: Option<Arc<PeerProcess>>,
}

/// One X509-SVID with its key, as handed to a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Svid {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key (redacted in `Debug`, zeroed when dropped).
    pub key: sigil_core::secret::PrivateKey,
    /// The entry's hint.
    pub hint: String,
}

// Hashed by what tells two SVIDs apart cheaply (the leaf certificate is unique per signature);
// equality still compares everything, the key included.
impl Hash for X509Svid {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.spiffe_id.hash(state);
        self.hint.hash(state);
        self.chain.first().hash(state);
    }
}

/// Everything `FetchX509SVID` sends one caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct X509View {
    /// The caller's SVIDs; empty when it has no identity.
    pub svids: Vec<X509Svid>,
    /// The own trust domain's bundle.
    pub bundle: Arc<TrustBundle>,
    /// Bundles of foreign trust domains the caller's entries federate with.
    pub federated: Vec<Arc<TrustBundle>>,
}

/// One JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvid {
    /// The SPIFFE ID (its `sub`).
    pub spiffe_id: String,
    /// The compact JWS.
    pub token: String,
    /// The entry's hint.
    pub hint: String,
}

/// What a Workload API server needs from the agent.
pub trait IdentitySource: Send + Sync + 'static {
    /// Attests a caller into selectors. A caller that cannot be attested (e.g. it exited) gets
    /// `PermissionDenied`.
    fn attest(&self, caller: Caller) -> BoxFuture<'_, Result<Vec<Selector>, Status>>;

    /// The X509-SVIDs of a caller with these selectors, signing what is missing first.
    fn x509_view<'a>(
        &'a self,
        selectors: &'a [Selector],
    ) -> BoxFuture<'a, Result<X509View, Status>>;

    /// JWT-SVIDs for `audience`, for every identity of the caller (or only `spiffe_id`).
    fn jwt_svids<'a>(
        &'a self,
        selectors: &'a [Selector],
        audience: &'a [String],
        spiffe_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<JwtSvid>, Status>>;

    /// The bundles a caller with these selectors may use: its own domain's first, then the
    /// foreign ones its entries federate with.
    fn bundles(&self, selectors: &[Selector]) -> Result<Vec<Arc<TrustBundle>>, Status>;

    /// Changes whenever an SVID, an entry or a bundle changes: streams resend then.
    fn changes(&self) -> watch::Receiver<u64>;

    /// Unix seconds now, for JWT expiry.
    fn now(&self) -> i64;
}
