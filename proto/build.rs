//! Generates the tonic code for Sigil's protobuf APIs with a vendored `protoc` (and its bundled
//! well-known types), so a fresh machine needs no system package.

use std::path::PathBuf;

use tonic_build::manual::{Method, Service};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];
    let protos = [
        "proto/common.proto",
        "proto/agent.proto",
        "proto/admin.proto",
        "proto/istio_ca.proto",
    ]
    .map(PathBuf::from);
    // Small starting buffers per stream (see src/codec.rs): what idle streams hold.
    tonic_prost_build::configure()
        .codec_path("crate::codec::LeanCodec")
        .compile_with_config(protoc_config()?, &protos, &includes)?;
    // The Workload API's messages and client come from its proto file; its server is listed by
    // hand below so that its streams send responses encoded once and shared (src/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::codec::LeanCodec")
        .build_server(false)
        .compile_with_config(
            protoc_config()?,
            &[PathBuf::from("proto/workload.proto")],
            &includes,
        )?;
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[workload_api_server()]);
    Ok(())
}

fn protoc_config() -> Result<prost_build::Config, Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    Ok(config)
}

/// The `SpiffeWorkloadAPI` service of workload.proto (no package, as the standard has it). The
/// three streams answer with `Encoded` responses: what every stream of one identity shares.
fn workload_api_server() -> Service {
    let streamed = |name: &str, route: &str, input: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::workload::{input}"))
            .output_type("crate::codec::Encoded")
            .codec_path("crate::codec::SharedCodec")
            .server_streaming()
            .build()
    };
    let unary = |name: &str, route: &str, input: &str, output: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::workload::{input}"))
            .output_type(format!("crate::workload::{output}"))
            .codec_path("crate::codec::LeanCodec")
            .build()
    };
    Service::builder()
        .name("SpiffeWorkloadAPI")
        .package("")
        .method(streamed(
            "fetch_x509svid",
            "FetchX509SVID",
            "X509svidRequest",
        ))
        .method(streamed(
            "fetch_x509_bundles",
            "FetchX509Bundles",
            "X509BundlesRequest",
        ))
        .method(unary(
            "fetch_jwtsvid",
            "FetchJWTSVID",
            "JwtsvidRequest",
            "JwtsvidResponse",
        ))
        .method(streamed(
            "fetch_jwt_bundles",
            "FetchJWTBundles",
            "JwtBundlesRequest",
        ))
        .method(unary(
            "validate_jwtsvid",
            "ValidateJWTSVID",
            "ValidateJwtsvidRequest",
            "ValidateJwtsvidResponse",
        ))
        .build()
}
