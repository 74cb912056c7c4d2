//! `patchflow-bench agent`: the agent against an in-process scripted model that answers
//! at once: process start to first model request, the cost of a file-tool step and of a
//! trivial shell step (time between consecutive model requests), the agent's own time
//! around a context compaction (a 200-step run in an 8k-token window), and peak RSS. The agent
//! speaks the wire `PATCHFLOW_WIRE_API` names (`chat` by default, or `responses`),
//! streamed unless `PATCHFLOW_LLM_STREAM=false`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchflow_scripted_model::{Script, ScriptedModel};
use serde_json::json;

use crate::harness::{bench_repo, ms, stats};

/// The agent the runners of a `patchflow` beside this binary would start (the slim
/// `patchflow-agent` when it is of the same build, else `patchflow agent`).
fn agent_program() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the patchflow-bench executable")?;
    let patchflow = exe.with_file_name("patchflow");
    if !patchflow.is_file() {
        bail!(
            "{} is missing: build the workspace first (cargo build --workspace)",
            patchflow.display()
        );
    }
    Ok(patchflow::stack::agent_program_of(&patchflow))
}

struct AgentSample {
    to_first_request: Duration,
    step_gaps: Vec<Duration>,
    /// Whether each request was a compaction request.
    compaction: Vec<bool>,
    max_request_tokens: u64,
    /// The run's outcome as its summary.json says it, and its step count.
    outcome: String,
    steps: u64,
    max_rss_kib: i64,
}

/// Runs `patchflow agent` once against `script`; returns its timings.
async fn run_agent_once(
    exe: &Path,
    work: &Path,
    baseline: &Path,
    script: Script,
    env: &[(&str, &str)],
) -> anyhow::Result<AgentSample> {
    let model = ScriptedModel::start(script, SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let ws = work.join("ws");
    if ws.exists() {
        std::fs::remove_dir_all(&ws)?;
    }
    patchflow_platform::archive::unpack_tar_zst(baseline, &ws)?;
    let out = work.join("out");
    let task = work.join("task.json");
    let mut spec = patchflow_core::TaskSpec::new(
        patchflow_core::TaskSource::Archive {
            key: "bench".into(),
        },
        "benchmark",
    );
    spec.limits.max_steps = 1000;
    spec.limits.max_tokens = 100_000_000;
    std::fs::write(&task, serde_json::to_vec(&spec)?)?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .arg("agent")
        .arg("--task")
        .arg(&task)
        .arg("--workspace")
        .arg(&ws)
        .arg("--baseline")
        .arg(baseline)
        .arg("--out")
        .arg(&out)
        .arg("--scratch")
        .arg(work.join("tmp"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OPENAI_BASE_URL", model.base_url())
        .env("PATCHFLOW_MODEL", "bench")
        // The wire and streaming under test, as this process was given them.
        .envs(
            ["PATCHFLOW_WIRE_API", "PATCHFLOW_LLM_STREAM"]
                .into_iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (k, v))),
        )
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // The agent's own peak RSS, from its VmHWM while it runs. Not the children's
    // `ru_maxrss`: a child spawned by vfork records its parent's high-water mark at exec,
    // so that figure would be this (growing) process's. Sampled every 20 ms, seldom enough
    // not to slow the run measured; the mark only rises, so the last sample is within
    // 20 ms of the agent's end.
    let pid = child.id().context("the agent exited at once")?;
    let mut peak_kib = 0i64;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(pid) {
            peak_kib = peak_kib.max(kib);
        }
        tokio::select! {
            status = child.wait() => break status?,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    if !status.success() {
        bail!("the agent failed ({status})");
    }
    let seen = model.observed();
    if !seen.violations.is_empty() {
        bail!("scripted model violations: {:?}", seen.violations);
    }
    if seen.context_overflows > 0 {
        bail!(
            "{} requests passed the model's context window",
            seen.context_overflows
        );
    }
    let first = *seen
        .arrivals
        .first()
        .context("the agent made no model request")?;
    // The agent's own time per step: from the model's answer being ready to the next
    // request arriving (parse, run the tool, build and send the next request).
    let gaps = seen
        .answered_at
        .iter()
        .zip(seen.arrivals.iter().skip(1))
        .map(|(answered, next)| next.saturating_duration_since(*answered))
        .collect();
    let compaction = seen
        .bodies
        .iter()
        .map(|b| {
            b.to_string()
                .contains(patchflow_scripted_model::COMPACTION_MARKER)
        })
        .collect();
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join(patchflow_core::layout::SUMMARY))
            .context("the agent wrote no summary.json")?,
    )?;
    Ok(AgentSample {
        to_first_request: first.saturating_duration_since(started),
        step_gaps: gaps,
        compaction,
        max_request_tokens: seen.max_request_tokens,
        outcome: summary["outcome"].as_str().unwrap_or_default().to_string(),
        steps: summary["steps"].as_u64().unwrap_or_default(),
        max_rss_kib: peak_kib,
    })
}

/// A process's peak resident set (`VmHWM` in /proc/PID/status), in KiB.
fn vm_hwm_kib(pid: u32) -> Option<i64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

pub async fn run(runs: usize, steps: usize) -> anyhow::Result<ExitCode> {
    let exe = agent_program()?;
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    bench_repo(&repo)?;
    let baseline = dir.path().join("code.tar.zst");
    patchflow_platform::archive::pack_tar_zst(&repo, &baseline, 3)?;
    std::fs::create_dir_all(dir.path().join("tmp"))?;

    let mut first = Vec::new();
    let mut rss = 0i64;
    for _ in 0..runs.max(1) {
        let s = run_agent_once(
            &exe,
            dir.path(),
            &baseline,
            Script::calls_then_finish(vec![]),
            &[],
        )
        .await?;
        first.push(ms(s.to_first_request));
        rss = rss.max(s.max_rss_kib);
    }
    let read = vec![("read_file_content", json!({"file_path": "ten_kib.txt"})); steps];
    let s = run_agent_once(
        &exe,
        dir.path(),
        &baseline,
        Script::calls_then_finish(read),
        &[],
    )
    .await?;
    // Drop the first gap (first-use warm-up) and the last (the finish turn).
    let read_gaps: Vec<f64> = s
        .step_gaps
        .iter()
        .skip(1)
        .take(steps.saturating_sub(1))
        .map(|d| ms(*d))
        .collect();
    rss = rss.max(s.max_rss_kib);
    let shell = vec![("run_shell_command", json!({"command_string": "true"})); steps];
    let s = run_agent_once(
        &exe,
        dir.path(),
        &baseline,
        Script::calls_then_finish(shell),
        &[],
    )
    .await?;
    let shell_gaps: Vec<f64> = s
        .step_gaps
        .iter()
        .skip(1)
        .take(steps.saturating_sub(1))
        .map(|d| ms(*d))
        .collect();
    rss = rss.max(s.max_rss_kib);

    // The long run: 200 steps in an 8k-token window (each step reads 40 lines,
    // about 650 tokens), so the agent compacts every few steps. Its own time around one
    // compaction is the gap before the compaction request plus the gap after its answer
    // (the model answers both at once).
    const WINDOW: u64 = 8_000;
    const LONG_STEPS: usize = 200;
    let long = vec![
        (
            "read_file_content",
            json!({"file_path": "ten_kib.txt", "start_line": 1, "end_line": 40})
        );
        LONG_STEPS
    ];
    let mut script = Script::calls_then_finish(long);
    script.context_window = Some(WINDOW);
    let s = run_agent_once(
        &exe,
        dir.path(),
        &baseline,
        script,
        &[("PATCHFLOW_DEFAULT_CONTEXT_WINDOW", &WINDOW.to_string())],
    )
    .await?;
    rss = rss.max(s.max_rss_kib);
    let compactions: Vec<f64> = (1..s.compaction.len())
        .filter(|&i| s.compaction[i])
        .filter_map(|i| Some(ms(*s.step_gaps.get(i - 1)?) + ms(*s.step_gaps.get(i)?)))
        .collect();
    let compacted = compactions.len();
    if s.outcome != "finished" {
        bail!(
            "the {LONG_STEPS}-step run ended `{}` after {} steps",
            s.outcome,
            s.steps
        );
    }
    println!(
        "{}-step run in a {WINDOW}-token window: {}, {compacted} compactions, no request over the window, largest {} tokens",
        s.steps, s.outcome, s.max_request_tokens
    );

    let (f50, f95, _) = stats(first);
    let (r50, r95, _) = stats(read_gaps);
    let (s50, s95, _) = stats(shell_gaps);
    let (c50, c95, _) = stats(compactions);
    println!(
        "patchflow agent benchmark ({}, instant scripted model, {runs} runs, {steps} steps per step measurement)",
        exe.display()
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "measure", "p50", "p95", "target"
    );
    println!(
        "{:<44} {:>7.2}ms {:>7.2}ms {:>9}",
        "process start -> first model request", f50, f95, "<= 10 ms"
    );
    println!(
        "{:<44} {:>7.2}ms {:>7.2}ms {:>9}",
        "file-tool step (read 10 KiB), per step", r50, r95, "<= 1 ms"
    );
    println!(
        "{:<44} {:>7.2}ms {:>7.2}ms {:>9}",
        "shell step (`true`), per step", s50, s95, "<= 5 ms"
    );
    println!(
        "{:<44} {:>7.2}ms {:>7.2}ms {:>9}",
        format!("compaction, agent's own time ({compacted} in a run)"),
        c50,
        c95,
        ""
    );
    println!(
        "{:<44} {:>7.1}MB {:>9} {:>9}",
        "peak RSS (largest run)",
        rss as f64 / 1024.0,
        "",
        "<= 25 MB"
    );
    Ok(ExitCode::SUCCESS)
}
