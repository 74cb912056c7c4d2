//! Build settings of the `patchflow` and `patchflow-agent` binaries.

use std::hash::{DefaultHasher, Hasher};
use std::path::Path;

/// What the agent is built from. Both binaries carry a hash of it, so a runner can tell
/// a `patchflow-agent` beside it from a leftover of another build.
const AGENT_SOURCES: [&str; 8] = [
    "agent/src",
    "agent/build.rs",
    "agent/Cargo.toml",
    "core/src",
    "tools-wasm/wit",
    "tools-wasm/guest/src",
    "src/bin/patchflow-agent.rs",
    "Cargo.lock",
];

fn hash_tree(path: &Path, h: &mut DefaultHasher) {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        entries.sort();
        for e in entries {
            hash_tree(&e, h);
        }
    } else if let Ok(bytes) = std::fs::read(path) {
        h.write(path.to_string_lossy().as_bytes());
        h.write(&bytes);
    }
}

fn main() {
    // Relative relocations packed (DT_RELR, glibc 2.36+): the loader reads kilobytes
    // instead of the ~3 MB table a binary this size otherwise carries, which every
    // `patchflow` process (the agent above all) would page in at start-up.
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.ends_with("-linux-gnu") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    let mut h = DefaultHasher::new();
    for src in AGENT_SOURCES {
        println!("cargo:rerun-if-changed={src}");
        hash_tree(Path::new(src), &mut h);
    }
    println!(
        "cargo:rustc-env=PATCHFLOW_AGENT_BUILD={}-{:016x}",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default(),
        h.finish()
    );
}
