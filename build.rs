//! Generates the gRPC code from `proto/` and the descriptor set that server
//! reflection serves. Uses a vendored `protoc` so a fresh machine needs no
//! system package.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        "proto/identity/v1/types.proto",
        "proto/identity/v1/identity_service.proto",
        "proto/identity/v1/migration_service.proto",
    ];
    let includes = [PathBuf::from("proto"), well_known];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("identity_descriptor.bin"))
        .compile_with_config(config, &protos.map(PathBuf::from), &includes)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
