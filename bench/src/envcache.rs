//! `patchflow-bench envcache`: what caching a prepared environment costs. The tree packed
//! is what a setup leaves (a fresh virtualenv with pip, or `--dir`), through the same
//! functions `prepare_environment` uses: the snapshot before setup, the products packed
//! as tar.zst, and the restore of a cache hit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use patchflow_activities::environment::{pack_products, restore_cached, snapshot};

use crate::harness::stats;

/// Bytes and files of a tree (files only, links not followed).
fn size_of(dir: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() {
                bytes += meta.len();
                files += 1;
            }
        }
    }
    (bytes, files)
}

pub async fn run(dir: Option<PathBuf>, runs: usize) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::tempdir()?;
    let workspace = tmp.path().join("workspace");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home)?;
    std::fs::create_dir_all(&workspace)?;
    std::fs::write(workspace.join("app.py"), "print('hi')\n")?;
    let before = snapshot(&workspace);
    let products = match dir {
        Some(d) => {
            let target = workspace.join("products");
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg(&d)
                .arg(&target)
                .status()?;
            anyhow::ensure!(status.success(), "cannot copy {}", d.display());
            target
        }
        None => {
            let venv = workspace.join(".venv");
            let status = std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()?;
            anyhow::ensure!(status.success(), "python3 -m venv failed");
            venv
        }
    };
    let (bytes, files) = size_of(&products);
    println!(
        "envcache: {} files, {:.1} MiB of setup products ({})",
        files,
        bytes as f64 / (1 << 20) as f64,
        products.display()
    );
    let out = tmp.path().join("products.tar.zst");
    let (mut pack, mut restore) = (Vec::new(), Vec::new());
    let mut archive = 0;
    for i in 0..runs.max(1) {
        let t = Instant::now();
        let (w, h, o, b) = (workspace.clone(), home.clone(), out.clone(), before.clone());
        tokio::task::spawn_blocking(move || pack_products(&w, &h, &b, &[], &o)).await??;
        pack.push(t.elapsed().as_secs_f64());
        archive = std::fs::metadata(&out)?.len();
        let dest = tmp.path().join(format!("restore-{i}"));
        let (dw, dh) = (dest.join("workspace"), dest.join("home"));
        std::fs::create_dir_all(&dw)?;
        std::fs::create_dir_all(&dh)?;
        let t = Instant::now();
        restore_cached(&out, &dw, &dh)
            .await
            .map_err(anyhow::Error::msg)?;
        restore.push(t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&dest)?;
    }
    let mib = bytes as f64 / (1 << 20) as f64;
    let (p50, p95, _) = stats(pack.iter().map(|s| s * 1000.0).collect());
    println!(
        "  store (snapshot diff + tar + zstd -3): p50 {p50:.0} ms, p95 {p95:.0} ms, {:.0} MiB/s",
        mib / (p50 / 1000.0)
    );
    let (r50, r95, _) = stats(restore.iter().map(|s| s * 1000.0).collect());
    println!(
        "  restore (unzstd + checked unpack): p50 {r50:.0} ms, p95 {r95:.0} ms, {:.0} MiB/s",
        mib / (r50 / 1000.0)
    );
    println!(
        "  archive: {:.1} MiB ({:.0}% of the tree)",
        archive as f64 / (1 << 20) as f64,
        archive as f64 * 100.0 / bytes.max(1) as f64
    );
    Ok(ExitCode::SUCCESS)
}
