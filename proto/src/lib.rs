//! Sigil's gRPC APIs, generated from the `.proto` files in `proto/proto`.
//!
//! - [`agent`]: what an agent asks of the server (mTLS on TCP).
//! - [`admin`]: what an operator asks of the server (a local Unix socket).
//! - [`common`]: messages both share (entries, SVIDs, bundles).
//! - [`workload`]: the SPIFFE Workload API (no protobuf package, as the standard has it).
//! - [`istio_ca`]: Istio's certificate service, for Sigil as Istio's external CA.
//!
//! Conversions to and from the `sigil-core` domain types are `From`/`TryFrom` impls here.

#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

pub mod codec;
mod convert;

/// The generated code, nested as the protobuf packages are so cross-package references resolve.
mod generated {
    pub mod sigil {
        pub mod common {
            pub mod v1 {
                tonic::include_proto!("sigil.common.v1");
            }
        }
        pub mod agent {
            pub mod v1 {
                tonic::include_proto!("sigil.agent.v1");
            }
        }
        pub mod admin {
            pub mod v1 {
                tonic::include_proto!("sigil.admin.v1");
            }
        }
    }
    pub mod istio {
        pub mod v1 {
            pub mod auth {
                tonic::include_proto!("istio.v1.auth");
            }
        }
    }
}

/// The SPIFFE Workload API: messages and client from workload.proto, the server as `build.rs`
/// lists it (its streams send [`codec::Encoded`] responses).
pub mod workload {
    tonic::include_proto!("_");

    /// The server, under the names prost would give it (tonic's manual generator keeps the
    /// proto's spelling, `SpiffeWorkloadAPI`).
    pub mod spiffe_workload_api_server {
        mod generated {
            include!(concat!(env!("OUT_DIR"), "/.SpiffeWorkloadAPI.rs"));
        }
        pub use generated::spiffe_workload_a_p_i_server::{
            SpiffeWorkloadAPI as SpiffeWorkloadApi,
            SpiffeWorkloadAPIServer as SpiffeWorkloadApiServer,
        };
    }
}

pub use generated::istio::v1::auth as istio_ca;
pub use generated::sigil::admin::v1 as admin;
pub use generated::sigil::agent::v1 as agent;
pub use generated::sigil::common::v1 as common;
