//! `patchflow`: the one binary. This file is the command line only; each command's work
//! lives in the modules beside it (the client commands), in the wiring of the `patchflow`
//! library (src/lib.rs) and in the workspace's crates (logic). The benchmarks are a
//! binary of their own (`patchflow-bench`, bench/).

mod agent_pod;
mod batch;
mod client;
mod environments;
mod grpc_client;
mod replay;
mod tokens;

use patchflow::{kafka, settings, stack};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "patchflow", version, about = "Run coding agents on durable workflows", long_about = None)]
struct Cli {
    #[command(flatten)]
    global: settings::GlobalOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Gateway and worker in one process; starts the Temporal dev server unless TEMPORAL_ADDRESS is set.
    Up,
    /// Only the worker: runs workflows and activities.
    Worker {
        /// Also consume task messages from Kafka (kafka_brokers must be set).
        #[arg(long)]
        kafka: bool,
    },
    /// Only the gateway: the HTTP API.
    Gateway,
    /// Submit a task: a git URL, a local directory or a .zip file.
    Submit(client::SubmitArgs),
    /// Show a task's record.
    Status(client::StatusArgs),
    /// Print a task's result: the diff (default), transcript, log or summary.
    Result(client::ResultArgs),
    /// Ask a running task to stop.
    Cancel(client::CancelArgs),
    /// Start a new attempt of an ended task (from the failed step, or from the start).
    Retry(client::RetryArgs),
    /// Open (or update) the pull request of a COMPLETED task now.
    Pr(client::PrArgs),
    /// Send a follow-up to a COMPLETED or FAILED task: the agent goes on from its last turn.
    Say(client::SayArgs),
    /// List a best-of-N task's candidates (status, files, cost, summary; `*` selected).
    Candidates(client::CandidatesArgs),
    /// Make candidate N's result the task's (its diff and, with open_pr, its pull request).
    Select(client::SelectArgs),
    /// Follow a task's events over gRPC until it ends; resumes after the last event.
    Watch(grpc_client::WatchArgs),
    /// List tasks, newest first.
    List(client::ListArgs),
    /// Tasks, tokens and cost per day and model (the tenant's; an admin's: every tenant's).
    Usage(client::UsageArgs),
    /// Re-run a finished task's agent on its staged code, answering the model from the
    /// recorded transcript; exit 0 when every tool result and the diff are identical.
    Replay(replay::ReplayArgs),
    /// Run the agent on a workspace (what the runner executes).
    Agent(patchflow_agent::cli::AgentArgs),
    /// What an agent Job's containers run: `fetch` the staged code, `run` the agent and upload.
    AgentPod(agent_pod::AgentPodArgs),
    /// Print the effective configuration, secrets redacted.
    Config,
    /// Which walls of the shell sandbox are in force on this machine, and why one is missing.
    Doctor {
        /// The report as JSON (what each task's summary records).
        #[arg(long)]
        json: bool,
    },
    /// Bring the task store's schema up to date (also done at start-up); safe to run twice.
    Migrate,
    /// Serve a scripted OpenAI-compatible model (tests and the key-less demo).
    ScriptedModel(ScriptedModelArgs),
    /// Submit, follow and export batches of tasks (JSONL, SWE-bench instances).
    #[command(subcommand)]
    Batch(batch::BatchCommand),
    /// Manage API tokens (admin): create, list, revoke.
    #[command(subcommand)]
    Tokens(tokens::TokensCommand),
    /// Manage the tenant's saved environments: create, update, list, show, delete, reset-cache.
    #[command(subcommand)]
    Env(environments::EnvCommand),
}

#[derive(Debug, Args)]
struct ScriptedModelArgs {
    /// The script (JSON): turns of tool calls and answers.
    #[arg(long)]
    script: PathBuf,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: std::net::SocketAddr,
    /// Write the chosen port to this file once listening.
    #[arg(long)]
    port_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    // Workers and gateways hold store and model credentials: not dumpable, so no process of
    // the same uid (a best-effort sandboxed command) reads their memory or environment.
    let _ = nix::sys::prctl::set_dumpable(false);
    let cli = Cli::parse();
    let config = match settings::load(&cli.global) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("patchflow: {e:#}");
            return ExitCode::from(2);
        }
    };
    let quiet = matches!(
        cli.command,
        Command::Submit(_)
            | Command::Status(_)
            | Command::Result(_)
            | Command::Cancel(_)
            | Command::Retry(_)
            | Command::Pr(_)
            | Command::Say(_)
            | Command::Candidates(_)
            | Command::Select(_)
            | Command::Watch(_)
            | Command::List(_)
            | Command::Usage(_)
            | Command::Replay(_)
            | Command::Config
            | Command::Doctor { .. }
            | Command::Tokens(_)
            | Command::Env(_)
            | Command::Batch(_)
    );
    let service = match &cli.command {
        Command::Up => Some("patchflow-up"),
        Command::Worker { .. } => Some("patchflow-worker"),
        Command::Gateway => Some("patchflow-gateway"),
        Command::Agent(_) => Some("patchflow-agent"),
        Command::AgentPod(_) => Some("patchflow-agent-pod"),
        _ => None,
    };
    let mut telemetry = settings::init_logging(&config, quiet, service);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("patchflow: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up => stack::up(config).await,
            Command::Worker { kafka } => stack::worker(config, kafka).await,
            Command::Gateway => stack::gateway(config).await,
            Command::Submit(a) if a.grpc => grpc_client::submit(&config, a).await,
            Command::Submit(a) => client::submit(&config, a).await,
            Command::Status(a) => client::status(&config, a).await,
            Command::Result(a) => client::result(&config, a).await,
            Command::Cancel(a) => client::cancel(&config, a).await,
            Command::Retry(a) => client::retry(&config, a).await,
            Command::Pr(a) => client::pull_request(&config, a).await,
            Command::Say(a) => client::say(&config, a).await,
            Command::Candidates(a) => client::candidates(&config, a).await,
            Command::Select(a) => client::select(&config, a).await,
            Command::Watch(a) => grpc_client::watch(&config, a).await,
            Command::List(a) => client::list(&config, a).await,
            Command::Usage(a) => client::usage(&config, a).await,
            Command::Replay(a) => replay::run(&config, a).await,
            Command::Agent(a) => patchflow_agent::cli::run(&config, a).await,
            Command::AgentPod(a) => agent_pod::run(&config, a).await,
            Command::Migrate => stack::migrate(config).await,
            Command::Config => {
                print!("{}", settings::describe(&config));
                Ok(ExitCode::SUCCESS)
            }
            Command::Doctor { json } => {
                let ok = patchflow_agent::cli::doctor(&config, json).await?;
                Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            }
            Command::ScriptedModel(a) => scripted_model(a).await,
            Command::Batch(b) => batch::run(config, b).await,
            Command::Tokens(t) => tokens::run(&config, t).await,
            Command::Env(e) => environments::run(&config, e).await,
        }
    });
    // The spans of the last moments (an agent's end, a drained worker's) are sent first.
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("patchflow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn scripted_model(a: ScriptedModelArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let text = std::fs::read_to_string(&a.script)
        .with_context(|| format!("cannot read {}", a.script.display()))?;
    let script = patchflow_scripted_model::Script::from_json(&text)
        .with_context(|| format!("{} is not a valid script", a.script.display()))?;
    let server = patchflow_scripted_model::ScriptedModel::start(script, a.addr).await?;
    if let Some(f) = &a.port_file {
        std::fs::write(f, server.addr.port().to_string())?;
    }
    println!("scripted model listening on {}", server.base_url());
    stack::shutdown_signal().await;
    let seen = server.observed();
    eprintln!(
        "scripted model: {} requests, {} answered, {} violations",
        seen.requests,
        seen.answered,
        seen.violations.len()
    );
    for v in &seen.violations {
        eprintln!("  violation: {v}");
    }
    Ok(if seen.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
