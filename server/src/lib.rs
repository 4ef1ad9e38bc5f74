//! The Sigil server: the certificate authority of one trust domain.
//!
//! It attests nodes, keeps registration entries, agents and bundles in a datastore, and signs
//! short-lived X.509 and JWT SVIDs for the workloads agents attest. Start at [`server::start`];
//! the folders follow the concepts:
//!
//! - [`config`]: the TOML configuration.
//! - [`datastore`]: one trait per concern under the [`datastore::DataStore`] umbrella, and their
//!   SQLite/Postgres implementation.
//! - [`ca`]: keys, the X.509 CA, JWT keys, the bundle, the issuance record.
//! - [`attest`]: node attestors (join tokens, Kubernetes PSAT).
//! - [`k8s`]: the pod watch behind automatic ServiceAccount identities, and the bundle ConfigMap.
//! - [`authz`]: which agent may obtain which identities, in memory.
//! - [`bundles`]: the own and federated trust bundles as stored, in memory.
//! - [`feed`]: follows the datastore's change feed into `authz` and `bundles`.
//! - [`api`]: the agent API (mTLS), the admin API (Unix socket), health and metrics.
//! - [`metrics`]: the Prometheus series.
//!
//! Errors are one enum, [`Error`].

pub mod api;
pub mod attest;
pub mod authz;
pub mod bundles;
pub mod ca;
pub mod config;
pub mod datastore;
mod error;
pub mod federation;
pub mod feed;
pub mod k8s;
pub mod metrics;
pub mod server;

pub use error::{Error, Result};
