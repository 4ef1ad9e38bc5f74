//! Generates the tonic code for Sigil's protobuf APIs with a vendored `protoc` (and its bundled
//! well-known types), so a fresh machine needs no system package.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let protos = [
        "proto/common.proto",
        "proto/agent.proto",
        "proto/admin.proto",
        "proto/workload.proto",
        "proto/istio_ca.proto",
    ]
    .map(PathBuf::from);
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];
    // Small starting buffers per stream (see src/codec.rs): what idle streams hold.
    tonic_prost_build::configure()
        .codec_path("crate::codec::LeanCodec")
        .compile_with_config(config, &protos, &includes)?;
    Ok(())
}
