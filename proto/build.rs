//! Generates the Rust types for every `.proto` file under `notifications/` (and the test-only
//! schemas under `testdata/`) without a system `protoc`: `protox` parses the files into a
//! `FileDescriptorSet`, `prost-build` turns it into structs, `pbjson-build` adds serde impls that
//! follow the proto3 JSON mapping. Output goes to `OUT_DIR`, one `<package>.rs` and one
//! `<package>.serde.rs` per protobuf package, plus `file_descriptor_set.bin` (the contract's
//! descriptors only, without the test schemas) for readers that work by reflection. Nothing
//! generated is committed.

use std::path::{Path, PathBuf};

/// Schema root of the contract, relative to this crate.
const CONTRACT_ROOT: &str = "notifications";
/// Schema root of the test-only schemas; their Rust code is included by `tests/` only.
const TEST_ROOT: &str = "testdata";

type BoxError = Box<dyn std::error::Error>;

fn main() -> Result<(), BoxError> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // A directory makes cargo rerun this script when anything below it changes.
    println!("cargo::rerun-if-changed={CONTRACT_ROOT}");
    println!("cargo::rerun-if-changed={TEST_ROOT}");
    let mut contract_files = Vec::new();
    collect_protos(&manifest_dir.join(CONTRACT_ROOT), &mut contract_files)?;
    let mut test_files = Vec::new();
    collect_protos(&manifest_dir.join(TEST_ROOT), &mut test_files)?;

    // Import paths: test schemas from `testdata/` (listed first so that `testdata/x.proto` is
    // named `x.proto`, not `testdata/x.proto`), the contract from the crate root, and
    // `google/protobuf/*.proto` from the copies bundled in protox.
    let includes = [manifest_dir.join(TEST_ROOT), manifest_dir.clone()];

    // The contract alone, imports included, without source info: what `FILE_DESCRIPTOR_SET` is.
    let mut contract = protox::Compiler::new(&includes)?;
    contract.include_imports(true).include_source_info(false);
    contract.open_files(&contract_files)?;
    std::fs::write(
        out_dir.join("file_descriptor_set.bin"),
        contract.encode_file_descriptor_set(),
    )?;

    // Everything, with comments (they become doc comments), for code generation.
    let mut compiler = protox::Compiler::new(&includes)?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(contract_files.iter().chain(&test_files))?;
    let descriptors = compiler.encode_file_descriptor_set();

    prost_build::Config::new()
        // Well-known types (Timestamp) come from pbjson-types: the same wire type as
        // prost-types' one, plus serde impls with the RFC 3339 JSON form. Without
        // `compile_well_known_types` prost-build maps them to prost-types itself.
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        // `impl prost::Name` (full type names in error messages).
        .enable_type_names()
        .compile_fds(compiler.file_descriptor_set())?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        // Readers ignore unknown fields in JSON as they do in protobuf (forward compatibility).
        .ignore_unknown_fields()
        .build(&[".notifications"])?;

    Ok(())
}

/// Every `*.proto` below `dir`, recursively, sorted (the output must not depend on the order
/// the file system lists entries in).
fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), BoxError> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}
