//! `patchflow-bench store`: upload and download of a large staged archive through each
//! object store, with the process's peak RSS after each step (it must stay flat: the stores
//! stream, they never hold an archive in memory).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchflow_platform::ObjectStore;

/// Peak and current resident set size of this process, in MiB (`/proc/self/status`).
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Writes `mib` MiB of incompressible bytes.
fn write_random(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        f.write_all(&chunk)?;
    }
    f.flush()?;
    Ok(())
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

pub async fn run(mib: u64, s3_url: Option<String>) -> anyhow::Result<ExitCode> {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        bail!(
            "set AWS credentials for the S3 store (any values for the local moto_server): \
             AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test patchflow-bench store"
        );
    }
    let dir = tempfile::tempdir()?;
    let mut moto = None;
    let url = match s3_url {
        Some(u) => u,
        None => {
            let port = crate::harness::free_port()?;
            let child = tokio::process::Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start moto_server (python3 -m pip install 'moto[server]')")?;
            moto = Some(child);
            let deadline = Instant::now() + Duration::from_secs(30);
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                if Instant::now() > deadline {
                    bail!("moto_server did not start");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            format!(
                "s3://bench?endpoint=http://127.0.0.1:{port}&region=us-east-1&path_style=true&create_bucket=true"
            )
        }
    };
    let sizes = [10u64.min(mib), mib];
    for size in sizes {
        write_random(&dir.path().join(format!("{size}.bin")), size)?;
    }
    let local: Arc<dyn ObjectStore> = Arc::new(
        patchflow_platform::objectstore::FsObjectStore::open(&dir.path().join("objects")).await?,
    );
    let s3 = patchflow_platform::objectstore::open(&url).await?;
    println!(
        "object store benchmark: staged archive upload and download (peak RSS of this process after each step)"
    );
    println!(
        "{:<34} {:>8} {:>12} {:>12} {:>14}",
        "store", "size", "upload", "download", "peak RSS"
    );
    for (name, store) in [("local directory", local), ("S3 API", s3)] {
        for size in sizes {
            let src = dir.path().join(format!("{size}.bin"));
            let key = format!("staged/bench-{size}/code.tar.zst");
            let bytes = size << 20;
            let t0 = Instant::now();
            store.put_file(&key, &src).await?;
            let up = t0.elapsed();
            let down_path = dir.path().join("down.bin");
            let t1 = Instant::now();
            let got = store.get_to_file(&key, &down_path).await?;
            let down = t1.elapsed();
            if got != bytes {
                bail!("{name}: downloaded {got} bytes of {bytes}");
            }
            let (peak, _) = rss_mib();
            println!(
                "{:<34} {:>5} MiB {:>7.1} MiB/s {:>7.1} MiB/s {:>10.1} MiB",
                format!(
                    "{name} ({})",
                    store.describe().chars().take(20).collect::<String>()
                ),
                size,
                mib_per_s(bytes, up),
                mib_per_s(bytes, down),
                peak
            );
            let _ = std::fs::remove_file(&down_path);
        }
    }
    drop(moto);
    Ok(ExitCode::SUCCESS)
}
