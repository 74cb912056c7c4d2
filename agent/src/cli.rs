//! The agent's command line: what a runner executes, as `patchflow agent` or as the slim
//! `patchflow-agent` binary (the same code without the platform linked in: about a
//! third less memory and a faster start). Reads the task spec, works in the given
//! workspace, prints progress events as JSON lines on stdout, writes result files to
//! `--out`. Shell commands go through `patchflow-sandbox-exec`, which the agent finds
//! beside its own binary (see crate::sandbox).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use patchflow_core::config::DocSearchProvider;
use patchflow_core::{Config, TaskSpec};
use tracing::Instrument as _;

use crate::sandbox::{ShellSandbox, toolchains};
use crate::tools::{DocSearch, GuestRunner, HostHandle, HttpDocs, WorkspaceDocs};
use crate::wasm::egress::Egress;
use crate::wasm::{CallLimits, HostOptions, TOOLS_COMPONENT};
use crate::{AgentRun, SandboxedTools, ShellEnv, Workspace};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The task spec (JSON).
    #[arg(long)]
    pub task: PathBuf,
    /// The restored repository to work in.
    #[arg(long)]
    pub workspace: PathBuf,
    /// The staged archive the workspace came from (for the diff).
    #[arg(long)]
    pub baseline: PathBuf,
    /// Where diff.patch, transcript.jsonl and summary.json go.
    #[arg(long)]
    pub out: PathBuf,
    /// Private HOME and TMPDIR for shell commands (default: a temporary directory).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// The task id, for logs.
    #[arg(long, default_value = "")]
    pub task_id: String,
    /// A follow-up turn: the directory holding the previous turn's `conversation.json`
    /// and `changes.tar.zst` (laid over the workspace before the run starts).
    #[arg(long, requires = "followup")]
    pub resume: Option<PathBuf>,
    /// The follow-up message (a UTF-8 text file).
    #[arg(long, requires = "resume")]
    pub followup: Option<PathBuf>,
    /// The follow-up's turn number (2 for the first follow-up).
    #[arg(long, default_value_t = 2, requires = "resume")]
    pub turn: u32,
    /// A best-of-N candidate's number: sent as the model's sampling `seed`.
    #[arg(long)]
    pub candidate: Option<u32>,
}

/// Reads what a follow-up turn resumes and lays the previous changes over the workspace.
fn resume_of(a: &AgentArgs) -> anyhow::Result<Option<crate::run::Resume>> {
    let (Some(dir), Some(message)) = (&a.resume, &a.followup) else {
        return Ok(None);
    };
    let message = std::fs::read_to_string(message)
        .with_context(|| format!("cannot read the follow-up {}", message.display()))?;
    let conversation = dir.join(patchflow_core::layout::CONVERSATION);
    let conversation: Vec<crate::model::Item> = match std::fs::read(&conversation) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a conversation", conversation.display()))?,
        // A turn that left no conversation (it died): go on from the task alone.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).context("cannot read the conversation"),
    };
    let changes = dir.join(patchflow_core::layout::CHANGES);
    let prior = if changes.exists() {
        crate::changes::apply_changes(&changes, &a.workspace)
            .context("cannot restore the previous turn's changes")?
    } else {
        Default::default()
    };
    Ok(Some(crate::run::Resume {
        turn: a.turn.max(2),
        message,
        conversation,
        prior,
    }))
}

pub async fn run(config: &Config, a: AgentArgs) -> anyhow::Result<ExitCode> {
    // This process holds the model key: not dumpable, so no process of the same uid can
    // read its memory or /proc/<pid>/environ, nor attach to it (the fallback walls leave
    // /proc readable; the namespace walls do not even show it).
    let _ = nix::sys::prctl::set_dumpable(false);
    die_with_runner()?;
    let spec_text =
        std::fs::read(&a.task).with_context(|| format!("cannot read {}", a.task.display()))?;
    let spec: TaskSpec = serde_json::from_slice(&spec_text)
        .with_context(|| format!("{} is not a task spec", a.task.display()))?;
    let ws = Workspace::new(&a.workspace)
        .with_context(|| format!("workspace {} does not exist", a.workspace.display()))?;
    let resume = resume_of(&a)?;
    let scratch = match &a.scratch {
        Some(s) => s.clone(),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&scratch)?;
    let scratch = scratch.canonicalize()?;
    let deadline = Instant::now() + Duration::from_secs(spec.limits.wall_seconds);
    let tools = Arc::new(build_tools(config, &spec, ws, &scratch, deadline).await?);
    let run = AgentRun {
        spec,
        workspace: a.workspace.clone(),
        baseline: a.baseline.clone(),
        out_dir: a.out.clone(),
        settings: crate::ModelSettings {
            seed: a.candidate.map(u64::from),
            ..crate::ModelSettings::from_config(config)
        },
        model_override: None,
        max_retries: config.llm.llm_max_retries,
        retry_backoff: Duration::from_millis(config.llm.llm_retry_backoff_ms),
        resume,
    };
    let stdout = std::io::stdout();
    let summary = run
        .run(tools, |event| {
            let mut out = stdout.lock();
            if let Ok(line) = serde_json::to_string(event) {
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        })
        .instrument(crate::telemetry::agent_span(&a.task_id))
        .await
        .context("cannot write the agent's results")?;
    tracing::info!(
        task_id = %a.task_id,
        outcome = ?summary.outcome,
        steps = summary.steps,
        tokens = summary.total_tokens,
        files_changed = summary.files_changed.len(),
        "agent finished"
    );
    Ok(ExitCode::SUCCESS)
}

/// The variable the local runner names itself in (its pid): the agent dies with it.
pub const PARENT_PID_VAR: &str = "PATCHFLOW_PARENT_PID";

/// With [`PARENT_PID_VAR`] set, the agent asks for SIGKILL when its parent dies and then
/// checks its parent is still that one (it may have died before the request): so a worker
/// that crashes leaves no agent behind. Done here rather than in the runner between fork
/// and exec, so the runner spawns without copying its own address space (posix_spawn).
fn die_with_runner() -> anyhow::Result<()> {
    let Some(expected) = std::env::var(PARENT_PID_VAR)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return Ok(());
    };
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .context("cannot ask to die with the runner")?;
    if nix::unistd::getppid().as_raw() != expected {
        anyhow::bail!("the runner that started this agent (pid {expected}) is gone");
    }
    Ok(())
}

/// The directories of a replay: the restored code, its archive, and where the replayed
/// run's result files and its commands' HOME go.
pub struct ReplayPaths {
    pub workspace: PathBuf,
    pub baseline: PathBuf,
    pub out: PathBuf,
    pub scratch: PathBuf,
}

/// Runs the agent again on `paths.workspace` with the same sandboxed tools, answering every
/// model request from `recorded` (the run's `transcript.jsonl`) instead of a model, then
/// compares each tool result and the diff with the recorded ones. No model endpoint is
/// asked. The replayed run's own files are in `paths.out`.
pub async fn replay(
    config: &Config,
    spec: TaskSpec,
    paths: &ReplayPaths,
    recorded: &str,
    recorded_diff: &str,
) -> anyhow::Result<crate::model::replay::ReplayReport> {
    let wire =
        crate::model::replay::ReplayWire::from_transcript(recorded).map_err(anyhow::Error::msg)?;
    let ws = Workspace::new(&paths.workspace)
        .with_context(|| format!("workspace {} does not exist", paths.workspace.display()))?;
    std::fs::create_dir_all(&paths.scratch)?;
    let scratch = paths.scratch.canonicalize()?;
    let deadline = Instant::now() + Duration::from_secs(spec.limits.wall_seconds);
    let tools = Arc::new(build_tools(config, &spec, ws, &scratch, deadline).await?);
    let run = AgentRun {
        spec,
        workspace: paths.workspace.clone(),
        baseline: paths.baseline.clone(),
        out_dir: paths.out.clone(),
        settings: replay_settings(config, recorded),
        model_override: Some(Arc::new(wire)),
        // A recorded answer never fails transiently: no retries, no waiting.
        max_retries: 0,
        retry_backoff: Duration::ZERO,
        resume: None,
    };
    run.run(tools, |_| {})
        .await
        .context("cannot write the replayed run's results")?;
    let read = |file: &str| {
        let path = paths.out.join(file);
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let replayed = read(patchflow_core::layout::TRANSCRIPT)?;
    let replayed_diff = read(patchflow_core::layout::DIFF)?;
    Ok(crate::model::replay::compare(
        recorded,
        &replayed,
        recorded_diff,
        &replayed_diff,
    ))
}

/// This machine's model settings with the recorded run's context window, so the replay
/// compacts where the run did whatever model table this machine has.
fn replay_settings(config: &Config, recorded: &str) -> crate::ModelSettings {
    let mut settings = crate::ModelSettings::from_config(config);
    let start = recorded
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["type"] == "start");
    if let Some(start) = start
        && let Some(window) = start["context_window"].as_u64()
    {
        let model = start["model"]
            .as_str()
            .unwrap_or(&settings.model)
            .to_string();
        settings.models.0.entry(model).or_default().context_window = Some(window);
    }
    settings
}

/// Where compiled components may be cached. The cache holds native code that is loaded
/// without recompiling, so it must be a directory only this user can write and no
/// sandboxed command can reach: never inside the workspace or the temp dir (Landlock lets
/// commands write those), and owned by us with no group or world write bit. Default:
/// `<data_dir>/cache/wasm` when `data_dir` is absolute, else `/var/tmp/patchflow-wasm-<uid>`.
fn tool_cache_dir(config: &Config, ws: &Workspace, scratch: &std::path::Path) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let uid = nix::unistd::Uid::effective().as_raw();
    let dir = match &config.sandbox.tool_cache_dir {
        Some(d) => d.clone(),
        None if config.server.data_dir.is_absolute() => {
            config.server.data_dir.join("cache").join("wasm")
        }
        None => PathBuf::from(format!("/var/tmp/patchflow-wasm-{uid}")),
    };
    let dir = std::path::absolute(dir).ok()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .ok()?;
    let real = dir.canonicalize().ok()?;
    let meta = std::fs::metadata(&real).ok()?;
    let safe = meta.uid() == uid && meta.mode() & 0o022 == 0;
    if !safe || real.starts_with(ws.root()) || real.starts_with(scratch) {
        tracing::warn!(dir = %real.display(), "not using this tool cache dir (inside the workspace or temp dir, or writable by others); compiling in memory");
        return None;
    }
    Some(real)
}

/// The WebAssembly host's settings: the per-call limits from `config`.
fn host_options(config: &Config, cache_dir: Option<PathBuf>) -> HostOptions {
    HostOptions {
        limits: CallLimits {
            memory_bytes: usize::try_from(config.sandbox.tool_memory_mb << 20)
                .unwrap_or(usize::MAX),
            timeout: Duration::from_millis(config.sandbox.tool_timeout_ms),
        },
        cache_dir,
    }
}

/// `patchflow-agent --precompile-tools DIR`: compiles the tool component for this
/// machine and these settings into `DIR` (an image build does it once, so no pod
/// compiles it); prints the file.
pub fn precompile_tools(config: &Config, dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let path =
        crate::wasm::ToolHost::precompile_into(TOOLS_COMPONENT, &host_options(config, None), dir)?;
    Ok(path)
}

/// The sandboxed tools for one run: the WebAssembly host (loading in the background while
/// the first model request goes out), the task's egress policy and the shell sandbox.
async fn build_tools(
    config: &Config,
    spec: &TaskSpec,
    ws: Workspace,
    scratch: &std::path::Path,
    deadline: Instant,
) -> anyhow::Result<SandboxedTools> {
    let options = host_options(config, tool_cache_dir(config, &ws, scratch));
    let guest = GuestRunner {
        host: HostHandle::load(TOOLS_COMPONENT, options),
        root: ws.root().to_path_buf(),
    };
    let sandbox = shell_sandbox(config, spec.policy.network, scratch)?;
    // The probe (which walls work here) runs beside the first model request; the first
    // command waits for it. In strict mode a missing layer refuses every command.
    {
        let (probe, root) = (sandbox.clone(), ws.root().to_path_buf());
        tokio::spawn(async move {
            if let Err(e) = probe.probe(&root).await {
                tracing::error!(error = %e, "shell sandbox");
            }
        });
    }
    let egress = Egress::from_policy(&spec.policy, |name| std::env::var(name).ok())
        .map_err(anyhow::Error::msg)?;
    let docs: Arc<dyn DocSearch> = match (
        config.sandbox.doc_search_provider,
        &config.sandbox.doc_search_url,
    ) {
        (DocSearchProvider::Http, Some(url)) => {
            Arc::new(HttpDocs::new(guest.clone(), url).map_err(anyhow::Error::msg)?)
        }
        _ => Arc::new(WorkspaceDocs {
            guest: guest.clone(),
            ws: ws.clone(),
        }),
    };
    Ok(SandboxedTools::new(
        ws,
        guest,
        shell_env(config, scratch, &sandbox),
        sandbox,
        egress,
        docs,
        deadline,
    ))
}

/// The environment of shell commands (and setup scripts): PATH, HOME in `scratch`, the
/// toolchains' variables and what `shell_env_passthrough` keeps of this process's own.
pub fn shell_env(config: &Config, scratch: &std::path::Path, sandbox: &ShellSandbox) -> ShellEnv {
    let mut env = ShellEnv::with_toolchains(scratch, &sandbox.toolchains);
    env.vars.extend(patchflow_core::environment::passthrough(
        &config.sandbox.shell_env_passthrough,
        |k| std::env::var(k).ok(),
    ));
    env
}

/// The shell sandbox the settings describe, for a task whose policy allows network or not.
pub fn shell_sandbox(
    config: &Config,
    network: bool,
    scratch: &std::path::Path,
) -> anyhow::Result<ShellSandbox> {
    let s = &config.sandbox;
    let mut sandbox = ShellSandbox::beside_current_exe(scratch, s.sandbox_mode)?;
    sandbox.network = network;
    sandbox.max_processes = s.shell_max_processes;
    sandbox.max_memory_bytes = s.shell_max_memory_mb << 20;
    sandbox.max_disk_bytes = s.shell_max_disk_mb << 20;
    // No single file may be bigger than the whole cap (the watcher checks every 200 ms or
    // more; a fast disk writes a gigabyte in less).
    sandbox.max_file_bytes = sandbox.max_file_bytes.min(sandbox.max_disk_bytes);
    sandbox.tmp_bytes = s.sandbox_tmp_mb << 20;
    if s.sandbox_bwrap.is_some() {
        sandbox.bwrap = crate::sandbox::find_bwrap(s.sandbox_bwrap.as_deref(), None);
    }
    sandbox.toolchains =
        crate::sandbox::toolchains::resolve(&s.sandbox_toolchains, |k| std::env::var(k).ok())
            .map_err(anyhow::Error::msg)?;
    Ok(sandbox)
}

/// Settings from `file` (TOML), if any, then the `PATCHFLOW_*` variables over them: the
/// layers both binaries start from.
pub fn config_from(file: Option<&std::path::Path>) -> anyhow::Result<Config> {
    let mut config = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            Config::from_toml(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => Config::default(),
    };
    config.apply_env(|k| std::env::var(k).ok())?;
    Ok(config)
}

/// The agent's settings as the slim binary reads them: the file `PATCHFLOW_CONFIG`
/// names, if any, then `PATCHFLOW_*` variables (what both runners pass).
pub fn load_config() -> anyhow::Result<Config> {
    let file = std::env::var_os("PATCHFLOW_CONFIG").map(PathBuf::from);
    let config = config_from(file.as_deref())?;
    config.validate()?;
    Ok(config)
}

/// `patchflow doctor`: which walls of the shell sandbox are in force on this machine, and
/// why one is missing; `Ok(false)` when commands would be refused (strict mode) or run
/// with a layer missing.
pub async fn doctor(config: &Config, json: bool) -> anyhow::Result<bool> {
    let ws = tempfile::tempdir().context("cannot make a probe workspace")?;
    let scratch = tempfile::tempdir().context("cannot make a probe temp dir")?;
    let sandbox = shell_sandbox(config, false, scratch.path())?;
    let walls = sandbox.walls(ws.path()).await;
    let report = &walls.report;
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(report.missing.is_empty());
    }
    let mark = |on: bool| if on { "[x]" } else { "[ ]" };
    println!(
        "shell sandbox (sandbox_mode = {}): {} walls{}",
        config.sandbox.sandbox_mode.as_str(),
        report.walls,
        match &sandbox.bwrap {
            Some(b) if walls.namespaces => format!(", by {}", b.display()),
            _ => String::new(),
        }
    );
    let rows = [
        (
            report.mount_namespace,
            "a minimal root of its own (mount namespace)",
        ),
        (
            report.pid_namespace,
            "its own processes only, under a reaper (PID namespace)",
        ),
        (
            report.user_namespace,
            "an unprivileged uid (user namespace)",
        ),
        (report.no_capabilities, "no capabilities"),
        (
            report.new_session,
            "no controlling terminal (a session of its own)",
        ),
        (
            report.seccomp,
            "seccomp: socket families allow-listed; ptrace, keyctl, bpf, mount, namespaces, io_uring, TIOCSTI refused",
        ),
        (
            report.network_confined,
            "no network unless the task's policy allows it",
        ),
        (
            report.pids_cgroup,
            "a pids cgroup (fork bombs end at shell_max_processes)",
        ),
        (
            report.memory_cgroup,
            "a memory cgroup (shell_max_memory_mb)",
        ),
        (
            report.rlimits,
            "rlimits: CPU seconds, address space, file size, no core dumps",
        ),
        (
            report.no_new_privs,
            "no new privileges (setuid binaries gain nothing)",
        ),
        (report.landlock, "Landlock (the fallback walls)"),
    ];
    for (on, what) in rows {
        println!("  {} {what}", mark(on));
    }
    let toolchains = toolchains::to_setting(&sandbox.toolchains);
    println!("  toolchains (read-only): {toolchains}");
    for m in &report.missing {
        println!("  missing: {m}");
    }
    match &walls.refused {
        Some(_) => println!(
            "strict mode: commands would be REFUSED here (install bubblewrap, or set sandbox_mode=best-effort)"
        ),
        None if !report.missing.is_empty() => {
            println!("best-effort mode: commands run WITHOUT the layers above marked missing")
        }
        None => println!("every layer is in force"),
    }
    Ok(report.missing.is_empty())
}

/// What a worker with the local runner checks at start-up: in strict mode, an error when
/// commands would be refused (better than every task failing at its first command); in
/// best-effort mode the probe's loud warning.
pub async fn check_sandbox(config: &Config) -> anyhow::Result<patchflow_core::SandboxReport> {
    let ws = tempfile::tempdir().context("cannot make a probe workspace")?;
    let scratch = tempfile::tempdir().context("cannot make a probe temp dir")?;
    let sandbox = shell_sandbox(config, false, scratch.path())?;
    let report = sandbox.probe(ws.path()).await?;
    tracing::info!(walls = %report.walls, missing = report.missing.len(), "shell sandbox");
    Ok(report)
}
