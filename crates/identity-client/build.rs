//! Generates the client stubs from the service's protos with a vendored
//! `protoc`, so the crate does not depend on the service itself.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    // `proto` is a link to the repository's proto/ folder, the single source
    // of truth; `cargo package` copies the files it points to.
    let root = manifest.join("proto");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;
    let protos = [
        "identity/v1/types.proto",
        "identity/v1/identity_service.proto",
        "identity/v1/migration_service.proto",
    ]
    .map(|p| root.join(p));
    tonic_prost_build::configure().build_server(false).compile_with_config(
        config,
        &protos,
        &[root.clone(), well_known],
    )?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
