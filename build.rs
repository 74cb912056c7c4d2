//! Link flags of the `patchflow` binary.

fn main() {
    // Relative relocations packed (DT_RELR, glibc 2.36+): the loader reads kilobytes
    // instead of the ~3 MB table a binary this size otherwise carries, which every
    // `patchflow` process (the agent above all) would page in at start-up.
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.ends_with("-linux-gnu") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
