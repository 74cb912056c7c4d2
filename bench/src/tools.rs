//! `patchflow-bench tools`: the sandboxed tools per call, against the same operation done
//! natively in Rust in the same run: read 10 KiB, an exact edit, a regex search over a
//! 2,000-file tree (WASM vs native), and the shell sandbox's start-up (sandboxed `true` vs
//! a plain `bash -c true`).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchflow_agent::Workspace;
use patchflow_agent::sandbox::{SandboxMode, ShellSandbox};
use patchflow_agent::tools::search::{candidate_files, search_code_in};
use patchflow_agent::wasm::egress::Egress;
use patchflow_agent::wasm::{HostOptions, TOOLS_COMPONENT, ToolHost};

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn time_n(n: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<(f64, f64)> {
    f()?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        v.push(micros(t.elapsed()));
    }
    let (p50, _, p99) = crate::harness::stats(v);
    Ok((p50, p99))
}

fn tree(root: &Path) -> anyhow::Result<()> {
    let line = "let value = compute(input, options); // a typical line of source code\n";
    for d in 0..40 {
        let dir = root.join(format!("src/mod{d:02}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..50 {
            let mut text = line.repeat(40);
            if (d * 50 + f) % 97 == 0 {
                text.push_str("fn needle_function() {}\n");
            }
            std::fs::write(dir.join(format!("file{f:02}.rs")), text)?;
        }
    }
    std::fs::write(root.join("ten_kib.txt"), "0123456789abcdef\n".repeat(602))?;
    std::fs::write(root.join("edit.txt"), "alpha\nbeta\ngamma\n")?;
    Ok(())
}

fn row(name: &str, wasm: (f64, f64), native: (f64, f64), target: &str) {
    println!(
        "{name:<34} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7.1}x  {target}",
        wasm.0,
        wasm.1,
        native.0,
        native.1,
        wasm.0 / native.0
    );
}

pub async fn run(iterations: usize) -> anyhow::Result<ExitCode> {
    // Guest calls block (wasi's sync bindings drive their own futures): off the runtime.
    tokio::task::spawn_blocking(move || measure(iterations)).await?
}

fn measure(iterations: usize) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().canonicalize()?;
    tree(&root)?;
    let ws = Workspace::new(&root)?;
    let loaded = Instant::now();
    let host = Arc::new(ToolHost::new(TOOLS_COMPONENT, &HostOptions::default())?);
    let compile_ms = loaded.elapsed().as_secs_f64() * 1000.0;
    let none = Arc::new(Egress::none());
    let n = iterations.max(10);

    let read_wasm = time_n(n, || {
        host.call(&root, none.clone(), |g, s| {
            g.call_read_file(s, "ten_kib.txt", None, None)
        })?;
        Ok(())
    })?;
    let read_native = time_n(n, || {
        let p = ws.resolve("ten_kib.txt")?;
        let text = std::fs::read_to_string(p)?;
        std::hint::black_box(text.split_inclusive('\n').count());
        Ok(())
    })?;

    let mut flip = false;
    let edit_wasm = time_n(n, || {
        flip = !flip;
        let (old, new) = if flip {
            ("beta", "BETA")
        } else {
            ("BETA", "beta")
        };
        host.call(&root, none.clone(), move |g, s| {
            g.call_edit_file(s, "edit.txt", old, new)
        })?;
        Ok(())
    })?;
    let edit_native = time_n(n, || {
        flip = !flip;
        let (old, new) = if flip {
            ("beta", "BETA")
        } else {
            ("BETA", "beta")
        };
        let p = ws.resolve("edit.txt")?;
        let text = std::fs::read_to_string(&p)?;
        anyhow::ensure!(text.matches(old).count() == 1, "no unique match");
        std::fs::write(&p, text.replacen(old, new, 1))?;
        Ok(())
    })?;

    let searches = (n / 10).max(5);
    let search_wasm = time_n(searches, || {
        let r = host.call(&root, none.clone(), |g, s| {
            search_code_in(g, s, &ws, "needle_\\w+", None, 50)
        })?;
        anyhow::ensure!(r.hits.len() == 21, "the search found {} hits", r.hits.len());
        Ok(())
    })?;
    let re = regex::Regex::new("needle_\\w+")?;
    let search_native = time_n(searches, || {
        let mut hits = 0;
        for rel in candidate_files(&ws) {
            let text = std::fs::read_to_string(root.join(&rel))?;
            if re.is_match(&text) {
                hits += text.lines().filter(|l| re.is_match(l)).count();
            }
        }
        std::hint::black_box(hits);
        Ok(())
    })?;

    let scratch = tempfile::tempdir()?;
    let sandbox = ShellSandbox::beside_current_exe(scratch.path(), SandboxMode::BestEffort)?;
    let spawns = (n / 10).max(10);
    let mut k = 0u64;
    let shell_sandboxed = time_n(spawns, || {
        k += 1;
        let name = format!("bench-{}-{k}", std::process::id());
        let status = std::process::Command::new(&sandbox.program)
            .args(sandbox.exec_args(&root, &name, 5, false))
            .arg("--")
            .args(["/bin/bash", "-c", "true"])
            .env_clear()
            .current_dir(&root)
            .status()?;
        patchflow_agent::sandbox::remove_cgroup(&name);
        anyhow::ensure!(status.success(), "sandboxed true failed: {status}");
        Ok(())
    })?;
    let shell_plain = time_n(spawns, || {
        let status = std::process::Command::new("/bin/bash")
            .args(["-c", "true"])
            .env_clear()
            .current_dir(&root)
            .status()?;
        anyhow::ensure!(status.success(), "true failed");
        Ok(())
    })?;

    println!(
        "patchflow tool benchmark ({n} calls per file measure, {searches} searches over 2,000 files, {spawns} spawns); times in microseconds"
    );
    println!("component compile/load: {compile_ms:.1} ms (in memory, no cache)");
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9} {:>8}  target",
        "operation", "wasm p50", "wasm p99", "nat p50", "nat p99", "ratio"
    );
    row(
        "read_file 10 KiB",
        read_wasm,
        read_native,
        "wasm p50 <= 100 us",
    );
    row("edit_file (exact replace)", edit_wasm, edit_native, "");
    row(
        "search_code, 2,000 files",
        search_wasm,
        search_native,
        "<= 2x native",
    );
    row(
        "shell `true`: sandboxed vs plain",
        shell_sandboxed,
        shell_plain,
        "overhead <= 5 ms",
    );
    println!(
        "sandbox start-up overhead p50: {:.2} ms",
        (shell_sandboxed.0 - shell_plain.0) / 1000.0
    );
    Ok(ExitCode::SUCCESS)
}
