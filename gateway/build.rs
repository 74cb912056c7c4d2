//! Compiles `proto/patchflow/v1/tasks.proto` into Rust with protox (a protobuf compiler in
//! Rust), so building patchflow needs no system `protoc`. The encoded descriptor set is
//! kept in OUT_DIR for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let proto = root.join("patchflow/v1/tasks.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("patchflow_descriptor.bin");
    let descriptors = protox::compile([&proto], [&root])?;
    std::fs::write(&descriptor_path, descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .skip_protoc_run()
        .file_descriptor_set_path(&descriptor_path)
        .compile_protos(&[proto], &[root])?;
    Ok(())
}
