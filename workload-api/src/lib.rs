//! The SPIFFE Workload API, served on a Unix socket and generic over where identities come from.
//!
//! - [`source`]: the [`source::IdentitySource`] a server asks: attest this caller, give me its
//!   SVIDs and bundles, tell me when anything changes. The agent implements it.
//! - [`server`]: the tonic service and the socket it listens on (permissions, stale sockets, the
//!   `workload.spiffe.io` header, peer credentials).
//! - [`peer`]: the process on the other end of a connection, held by a pidfd from accept, so
//!   attestation reads the `/proc` of the process that connected and nothing else.
//! - [`jwt`]: JWT-SVID validation against JWT bundles.
//! - [`sds`]: Envoy's Secret Discovery Service (SDS v3) on the same socket, for Envoy and Istio.
//! - [`client`]: a Workload API client, used by `sigil-agent api ...`.
//! - [`authority`]: the HTTP/2 adapter in front of the server, which rewrites the `:authority` that
//!   grpc C-core and grpc-java clients send (a Unix socket path) and bounds every client's header
//!   blocks (HPACK table, header list size); [`authority::HeaderRewriter`] is its IO-free core.
//!
//! The wire format is the SPIFFE standard's, so any SPIFFE client (go-spiffe, py-spiffe, the
//! `spiffe` crate) talks to it.

pub mod authority;
pub mod client;
mod error;
mod hpack;
pub mod http2;
pub mod jwt;
pub mod peer;
pub mod sds;
pub mod server;
mod shared;
mod socket;
pub mod source;

pub use error::{Error, Result};

/// The metadata key every Workload API call carries, with the value `true`.
pub const HEADER: &str = "workload.spiffe.io";

/// The environment variable SPIFFE clients read the socket address from.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// The socket path of a `unix:///path` (or `unix:/path`) endpoint address; a bare path is taken
/// as is.
pub fn socket_path(address: &str) -> Result<std::path::PathBuf> {
    let path = match address.strip_prefix("unix://") {
        Some(rest) => rest,
        None => address.strip_prefix("unix:").unwrap_or(address),
    };
    if path.is_empty() || !path.starts_with('/') && address.starts_with("unix:") {
        return Err(Error::Endpoint(format!(
            "`{address}` is not a unix socket address; expected unix:///path/to/socket"
        )));
    }
    Ok(std::path::PathBuf::from(path))
}

/// The `unix://` address of a socket path, as `SPIFFE_ENDPOINT_SOCKET` takes it.
pub fn endpoint_address(path: &std::path::Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!("unix://{}", absolute.display())
}

/// A fixed-seed xorshift generator: the hostile-input unit tests' source of noise, the same on
/// every run.
#[cfg(test)]
fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addresses() {
        assert_eq!(
            socket_path("unix:///tmp/a.sock").expect("ok"),
            std::path::PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            socket_path("unix:/tmp/a.sock").expect("ok"),
            std::path::PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            socket_path("/tmp/a.sock").expect("ok"),
            std::path::PathBuf::from("/tmp/a.sock")
        );
        assert!(socket_path("unix://relative").is_err());
        assert!(socket_path("").is_err());
        assert_eq!(
            endpoint_address(std::path::Path::new("/tmp/a.sock")),
            "unix:///tmp/a.sock"
        );
    }
}
