//! `patchflow-bench tools`: the sandboxed tools per call, against the same operation done
//! natively in Rust in the same run: read 10 KiB, an exact edit, a regex search over a
//! 2,000-file tree (WASM vs native), and the shell sandbox's start-up (sandboxed `true` vs
//! a plain `bash -c true`).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchflow_agent::Workspace;
use patchflow_agent::sandbox::{SandboxMode, ShellSandbox, Walls};
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
    let mut sandbox = ShellSandbox::beside_current_exe(scratch.path(), SandboxMode::BestEffort)?;
    sandbox.toolchains =
        patchflow_agent::sandbox::toolchains::resolve("auto", |k| std::env::var(k).ok())
            .map_err(anyhow::Error::msg)?;
    let spawns = (n / 10).max(10);
    let python = which_python();
    let walls = |namespaces: bool| Walls {
        namespaces,
        report: Default::default(),
        refused: None,
    };
    let (namespaces, fallback) = (walls(true), walls(false));
    let mut k = 0u64;
    let mut sandboxed = |walls: &Walls, cmd: &[&str]| {
        time_n(spawns, || {
            k += 1;
            // One cgroup for the run, as the agent does.
            let name = sandbox.cgroup_name();
            let status = std::process::Command::new(&sandbox.program)
                .args(sandbox.exec_args(&root, name, 5, walls, false))
                .arg("--")
                .args(cmd)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .current_dir(&root)
                .stdout(std::process::Stdio::null())
                .status()?;
            patchflow_agent::sandbox::cgroup::kill_members(name);
            anyhow::ensure!(status.success(), "sandboxed {cmd:?} failed: {status} ({k})");
            Ok(())
        })
    };
    let plain = |cmd: &[&str]| {
        time_n(spawns, || {
            let status = std::process::Command::new(cmd[0])
                .args(&cmd[1..])
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .current_dir(&root)
                .status()?;
            anyhow::ensure!(status.success(), "{cmd:?} failed");
            Ok(())
        })
    };
    let true_cmd: &[&str] = &["/bin/bash", "-c", "true"];
    let py_cmd: Vec<&str> = vec![python.as_str(), "-c", "pass"];
    let shell_plain = plain(true_cmd)?;
    let py_plain = plain(&py_cmd)?;
    let shell_fallback = sandboxed(&fallback, true_cmd)?;
    let py_fallback = sandboxed(&fallback, &py_cmd)?;
    let ns = sandbox.bwrap.is_some();
    let (shell_ns, py_ns) = if ns {
        (
            Some(sandboxed(&namespaces, true_cmd)?),
            Some(sandboxed(&namespaces, &py_cmd)?),
        )
    } else {
        (None, None)
    };
    // bubblewrap alone with the same namespaces and binds (no cgroup, seccomp or rlimits):
    // what the namespaces cost to set up.
    let bwrap_alone = match &sandbox.bwrap {
        Some(b) => {
            let layout = patchflow_agent::sandbox::bwrap::Layout {
                workspace: &root,
                scratch: scratch.path(),
                read_only: &sandbox
                    .toolchains
                    .iter()
                    .map(|t| t.path.clone())
                    .collect::<Vec<_>>(),
                read_write: &[],
                masks: &[],
                network: false,
                tmp_bytes: 64 << 20,
                cwd: &root,
            };
            let args = patchflow_agent::sandbox::bwrap::args(&layout, &[]);
            Some(time_n(spawns, || {
                let status = std::process::Command::new(b)
                    .args(&args)
                    .arg("--")
                    .arg("/bin/true")
                    .env_clear()
                    .status()?;
                anyhow::ensure!(status.success(), "bwrap true failed: {status}");
                Ok(())
            })?)
        }
        None => None,
    };
    let true_alone = plain(&["/bin/true"])?;

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
    let ms = |t: (f64, f64)| t.0 / 1000.0;
    println!(
        "shell commands, p50 ms ({spawns} spawns each): plain, fallback walls (Landlock, netns, seccomp: the walls before namespaces), namespace walls (bubblewrap)"
    );
    let line = |what: &str, p: (f64, f64), f: (f64, f64), n: Option<(f64, f64)>| {
        let n_text = n.map_or("n/a".to_string(), |n| format!("{:.2}", ms(n)));
        let over = n.map_or("n/a".to_string(), |n| format!("{:+.2}", ms(n) - ms(p)));
        let vs = n.map_or("n/a".to_string(), |n| format!("{:+.2}", ms(n) - ms(f)));
        println!(
            "  {what:<18} plain {:>6.2}  fallback {:>6.2}  namespaces {n_text:>6}  overhead {over:>6} (vs fallback {vs})",
            ms(p),
            ms(f)
        );
    };
    line("`true`", shell_plain, shell_fallback, shell_ns);
    line("`python3 -c pass`", py_plain, py_fallback, py_ns);
    if let Some(b) = bwrap_alone {
        println!(
            "  namespace set-up alone (bubblewrap, same binds, `/bin/true`): {:.2} ms over a plain /bin/true ({:.2} ms)",
            ms(b) - ms(true_alone),
            ms(true_alone)
        );
    }
    println!("  targets: sandbox overhead <= 5 ms; the namespace walls <= 2 ms over the fallback");
    Ok(ExitCode::SUCCESS)
}

/// The real `python3` binary (not a version manager's shim, which would time the shim).
fn which_python() -> String {
    std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/usr/bin/python3".to_string())
}
