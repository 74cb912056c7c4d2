//! What the benchmarks share: percentiles, free ports, the small repository and scripted
//! model every agent run uses, and a stack (stores and Temporal) to run on.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use patchflow::stack::Stores;
use patchflow_core::Config;

/// The `p` quantile (0..=1) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// p50, p95 and p99 of the measured values (a value that could not be measured, NaN, is
/// left out).
pub fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.retain(|x| !x.is_nan());
    v.sort_by(|a, b| a.total_cmp(b));
    (
        percentile(&v, 0.5),
        percentile(&v, 0.95),
        percentile(&v, 0.99),
    )
}

/// Milliseconds, as the reports print them.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The demo's scripted model: five requests (read, search, edit, the tests, finish).
pub const DEMO_SCRIPT: &str = include_str!("../../examples/demo-script.json");
const DEMO_CALC: &str = include_str!("../../examples/demo-repo/calc.py");
const DEMO_TEST: &str = include_str!("../../examples/demo-repo/test_calc.py");

/// A small repository with a 10 KiB file to read.
pub fn bench_repo(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("calc.py"), DEMO_CALC)?;
    std::fs::write(dir.join("test_calc.py"), DEMO_TEST)?;
    let line = "# padding line to make a ten kibibyte file for the read benchmark\n";
    std::fs::write(dir.join("ten_kib.txt"), line.repeat(10 * 1024 / line.len()))?;
    Ok(())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `body` on the stores `config` names and a Temporal client: on a dev server of its
/// own when `config` names no Temporal cluster, stopped afterwards whatever `body` returned.
pub async fn on_stack(
    config: &Config,
    body: impl AsyncFnOnce(Stores, temporalio_client::Client) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    let dev = if config.embedded_temporal() {
        Some(patchflow::devserver::DevServer::start(config).await?)
    } else {
        None
    };
    let result = async {
        let stores = patchflow::stack::open_stores(config).await?;
        let client = patchflow::devserver::connect(config).await?;
        body(stores, client).await
    }
    .await;
    if let Some(dev) = dev {
        dev.stop().await;
    }
    result?;
    Ok(ExitCode::SUCCESS)
}
