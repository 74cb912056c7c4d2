//! Builds the tool guests in `tools-wasm/` for `wasm32-wasip2` so that a plain `cargo build`
//! of the workspace yields a binary with its WebAssembly tools inside. The guests build in
//! their own target directory: a nested cargo on the workspace's directory would wait
//! forever for the lock its parent holds.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: [&str; 2] = ["patchflow_tools_guest", "patchflow_tools_probe"];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let tools = manifest_dir.join("../tools-wasm");
    for p in [
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
        "wit",
        "guest/Cargo.toml",
        "guest/src",
        "probe/Cargo.toml",
        "probe/src",
    ] {
        println!("cargo:rerun-if-changed={}", tools.join(p).display());
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d).join("wasm-guests"),
        None => out_dir.join("wasm-guests"),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&tools)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // The parent's flags are for the host target; the guests get their own profile.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_MAKEFLAGS")
            || key == "RUSTFLAGS"
            || key.starts_with("RUSTC_")
            || key == "RUSTC"
            || key == "RUSTDOC"
        {
            cmd.env_remove(&key);
        }
    }
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => fail(&format!("cannot run cargo for the tool guests: {e}")),
    };
    if !status.success() {
        fail(
            "building the tool guests (tools-wasm/) for wasm32-wasip2 failed; \
             if the target is missing, run `rustup target add wasm32-wasip2`",
        );
    }
    for name in GUESTS {
        let built = target_dir.join(format!("wasm32-wasip2/release/{name}.wasm"));
        let dest = out_dir.join(format!("{name}.wasm"));
        if let Err(e) = std::fs::copy(&built, &dest) {
            fail(&format!("cannot copy {}: {e}", built.display()));
        }
    }
    // Tests load the hostile probe guest from here; the binary embeds only the real one.
    println!(
        "cargo:rustc-env=PATCHFLOW_TOOLS_PROBE_WASM={}",
        Path::new(&out_dir)
            .join("patchflow_tools_probe.wasm")
            .display()
    );
}

fn fail(msg: &str) -> ! {
    println!("cargo:warning={msg}");
    std::process::exit(1);
}
