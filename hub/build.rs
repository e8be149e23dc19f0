//! Generates the gRPC `Publisher` service (server and client stubs) from the contract in
//! `proto/notifications/hub/v1/publisher.proto`, without a system `protoc`: `protox` parses the
//! file, `tonic-prost-build` writes the service code. The messages themselves are the `proto`
//! crate's (`proto::hub::v1`); only the service is generated here. Nothing generated is
//! committed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../proto");
    let file = proto_root.join("notifications/hub/v1/publisher.proto");
    println!("cargo::rerun-if-changed={}", file.display());
    let mut compiler = protox::Compiler::new([&proto_root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files([&file])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".notifications.hub.v1", "::proto::hub::v1")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
