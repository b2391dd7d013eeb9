//! Compiles proto/ with protox (pure Rust), so no system `protoc` is needed.
use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/grpc_service.proto",
        "proto/model_config.proto",
        "proto/externalscaler.proto",
        "proto/lattice/agent/v1/agent.proto",
        "proto/google/rpc/status.proto",
        "proto/lattice/bench/v1/echo.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Encoded descriptors feed gRPC server reflection.
    fs::write(out.join("inference_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Malformed protobuf is bad client input: INVALID_ARGUMENT, as malformed JSON
        // is on REST, rather than the INTERNAL that prost's stock codec reports.
        .codec_path("crate::codec::StrictCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
