//! The shared domain of Sigil: everything both the server and the agent must agree on.
//!
//! - [`id`]: SPIFFE IDs and trust domains (the `spiffe` crate's types, with Sigil's stricter checks
//!   and the well-known IDs of Sigil's own components).
//! - [`selector`]: `type:value` selectors that describe workloads and nodes.
//! - [`entry`]: registration entries and their validation.
//! - [`bundle`]: trust bundles and the SPIFFE bundle JSON format.
//! - [`x509`]: the X509-SVID profile: CSR checks, leaf and CA certificate parameters, parsing.
//! - [`tls`]: rustls verifiers that authenticate peers by SPIFFE ID against a bundle.
//! - [`config`]: the duration type of settings and flags, and the TOML loader every binary uses.
//! - [`resume`]: digests of what an agent holds, so a reopened sync stream sends only what differs.
//! - [`clock`]: the injectable clock that every expiry and rotation decision reads.
//! - [`health`]: the `/ready` probe behind both `healthcheck` commands.
//! - [`metrics`]: registering Prometheus series and rendering them for `/metrics`.
//! - [`secret`]: private key bytes that never print and are zeroed when dropped.
//! - [`fs`]: owner-only files written whole (keys, SVIDs).
//! - [`sync`]: locks that go on serving after a panic elsewhere.
//! - [`untrusted`]: outside strings truncated and escaped before a log line or a status shows them.
//!
//! Errors are one enum, [`Error`], whose messages name the field that was wrong.

pub mod bundle;
pub mod clock;
pub mod config;
pub mod entry;
mod error;
pub mod fs;
pub mod health;
pub mod id;
mod io;
pub mod metrics;
pub mod resume;
pub mod secret;
pub mod selector;
pub mod sync;
pub mod tls;
pub mod untrusted;
pub mod x509;

pub use error::{Error, Result};
