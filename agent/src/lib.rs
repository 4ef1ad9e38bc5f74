//! The Sigil agent: proves its node to the server, follows the entries the server says it may
//! use, and hands workloads on its node their SVIDs over the SPIFFE Workload API.
//!
//! Start at [`run::start`]. The folders follow the concepts:
//!
//! - [`node`]: the connection to the server, node attestation, and the agent's own SVID.
//! - [`sync`]: the entry stream from the server.
//! - [`cache`]: entries, bundle and workload SVIDs; batch signing and rotation.
//! - [`attest`]: workload attestors (unix, k8s) behind one trait, and their registry.
//! - [`workload`]: the agent as the Workload API's identity source.
//! - [`health`], [`metrics`], [`config`].
//!
//! A workload's request flows: Unix socket -> `sigil_workload_api::server` (header, peer
//! credentials) -> [`workload::AgentSource`] -> [`attest::WorkloadAttestors`] (selectors) -> [`cache`]
//! (matching entries, cached SVIDs) -> [`cache::Signer`] (CSR batch) -> the server.
//!
//! Errors are one enum, [`Error`].

pub mod attest;
pub mod cache;
pub mod config;
mod error;
pub mod health;
pub mod metrics;
pub mod node;
pub mod run;
pub mod sync;
pub mod workload;

pub use error::{Error, Result};
