//! Code generated from `proto/patchflow/v1/tasks.proto` at build time (see `build.rs`).
#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

tonic::include_proto!("patchflow.v1");

/// The encoded descriptor set of the proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/patchflow_descriptor.bin"));
