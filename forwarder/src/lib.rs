//! The Sigil mTLS forwarder, run as `sigil-agent forward`.
//!
//! The forwarder is a workload like any other: it follows its X509-SVID and trust bundles over the
//! Workload API and puts mutual TLS in front of (inbound) or behind (outbound) an application that
//! speaks plain TCP or HTTP.
//!
//! - [`config`]: listeners, modes, limits; from flags or a TOML file.
//! - [`policy`]: SPIFFE ID patterns (exact, trust domain, path pattern), allow/deny peer policies
//!   and HTTP rules by principal, method and path (matched at segment boundaries).
//! - [`path`]: the one normal form of a request path, which HTTP rules see and the application
//!   receives.
//! - [`identity`]: the SVID and bundles, held in one atomically swapped state so that every new
//!   handshake uses the newest ones and established connections carry on.
//! - [`tls`]: the rustls certificate resolver and the peer verifiers over that state; a refused
//!   peer is refused inside the verifier, so rustls sends it a TLS alert.
//! - `proxy` and `http`: the connection handling (STRICT, PERMISSIVE, DISABLE; HTTP/1.1 and
//!   HTTP/2 with `x-forwarded-client-cert`), timeouts and byte counting.
//! - [`metrics`] and the health endpoint (`/live`, `/ready`, `/metrics`).
//! - [`Forwarder`]: starts all of it and drains it on shutdown.

#![forbid(unsafe_code)]

pub mod config;
mod error;
mod health;
mod http;
pub mod identity;
pub mod metrics;
pub mod path;
pub mod policy;
mod proxy;
mod run;
pub mod tls;

pub use error::{Error, Result};
pub use run::Forwarder;
