//! `patchflow-bench`: numbers, measured here, never asserted in tests. A binary of its own
//! so that none of this ships in `patchflow`; it runs the stack through the `patchflow`
//! library (src/lib.rs) and starts the agent and the shell sandbox binaries built beside
//! it (`cargo build --workspace`).
//!
//! - `agent`: the agent alone against an instant scripted model (see `agent`).
//! - `tools`: the sandboxed tools per call (WASM vs native) and the shell sandbox's
//!   start-up (see `tools`).
//! - `pipeline`, `status`, `conversation`: an embedded stack running one-step tasks,
//!   follow-ups and best-of-N races (see `pipeline`).
//! - `watch`, `store`, `kafka`: the gateway's fan-out, the object stores, the Kafka trigger.
//! - `publish`: what opening a pull request adds to the publish step (see `publish`).
//! - `envcache`: packing and restoring a prepared environment (see `envcache`).

mod agent;
mod envcache;
mod harness;
mod kafka;
mod pipeline;
mod publish;
mod store;
mod tools;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use patchflow::settings;
use patchflow_core::Config;

#[derive(Debug, Parser)]
#[command(
    name = "patchflow-bench",
    version,
    about = "Measure the pipeline or the agent and print numbers",
    long_about = None
)]
struct Cli {
    #[command(flatten)]
    global: settings::GlobalOpts,
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The agent alone against an instant scripted model.
    Agent {
        /// Runs per measurement.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Tool steps per run for the per-step costs.
        #[arg(long, default_value_t = 40)]
        steps: usize,
    },
    /// The sandboxed tools per call: WASM vs native, sandboxed vs plain spawn.
    Tools {
        /// Calls per file-tool measurement (searches and spawns use a tenth).
        #[arg(long, default_value_t = 500)]
        iterations: usize,
    },
    /// Status reads (`GET /api/tasks/{id}`) by many concurrent readers, without and with
    /// the Redis status cache. The task store is `database_url` (SQLite by default).
    Status {
        #[arg(long, default_value_t = 200)]
        readers: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// The Redis of the cached run.
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
    },
    /// Many watchers on one task: events/s and event -> watcher latency through gRPC
    /// `WatchTask` and the SSE endpoint.
    Watch {
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        /// Agent events written as fast as the store takes them.
        #[arg(long, default_value_t = 500)]
        burst: usize,
        /// Agent events written one per 20 ms, for the latency.
        #[arg(long, default_value_t = 100)]
        paced: usize,
    },
    /// Upload and download of a large staged archive: the local directory vs S3.
    Store {
        /// Size of the archive in MiB.
        #[arg(long, default_value_t = 100)]
        mib: u64,
        /// The S3 store to measure (`s3://…`); default: a `moto_server` started here.
        #[arg(long)]
        s3_url: Option<String>,
    },
    /// Kafka: messages -> workflow starts per second (1 and 2 consumers), produce ->
    /// started latency, the DLQ path's cost, and result-message produce latency.
    Kafka {
        /// Messages per throughput round.
        #[arg(long, default_value_t = 300)]
        messages: usize,
        /// Malformed messages for the DLQ measurement.
        #[arg(long, default_value_t = 200)]
        bad: usize,
        /// An existing broker; default: kafka_brokers, else a Tansu started here.
        #[arg(long)]
        brokers: Option<String>,
    },
    /// What opening a pull request adds to a task's publish step: fetch, apply, commit and
    /// push to a local git server, then the scripted forge's API (new and updated).
    Publish {
        /// Runs per measurement.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Packing a prepared environment (a fresh virtualenv, or `--dir`) into the cache's
    /// tar.zst and restoring it: size and throughput.
    Envcache {
        /// The tree to pack, as setup's products; default: `python3 -m venv` made here.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// PREPARING_ENVIRONMENT through an embedded stack: a Python setup (venv + a package
    /// from PyPI; needs the network) without the cache and on a cache hit.
    Environment {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Follow-up turns (message -> first model request, -> COMPLETED) and best-of-N wall
    /// time for 1, 2 and 4 candidates, through an embedded stack.
    Conversation {
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Whole demo-sized tasks through a stack of its own: on the embedded default, or on
    /// the stores and Temporal the configuration names (`database_url`, `redis_url`,
    /// `object_store_url`, `temporal_address`; `scripts/bench-pipeline` runs both).
    Pipeline {
        /// Tasks run one after another first (the idle overheads).
        #[arg(long, default_value_t = 10)]
        sequential: usize,
        /// Tasks run under load (throughput, queue wait, per-step times).
        #[arg(long, default_value_t = 200)]
        tasks: usize,
        /// Tasks in flight under load: each submitter sends its next task when the last
        /// one ended.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
}

async fn run(config: Config, cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Agent { runs, steps } => agent::run(runs, steps).await,
        BenchCommand::Tools { iterations } => tools::run(iterations).await,
        BenchCommand::Kafka {
            messages,
            bad,
            brokers,
        } => kafka::run(&config, brokers, messages, bad).await,
        BenchCommand::Pipeline {
            sequential,
            tasks,
            concurrency,
        } => {
            let mode = pipeline::Drive::Pipeline {
                sequential,
                tasks,
                concurrency,
            };
            pipeline::with_stack(
                &config,
                None,
                mode,
                patchflow_core::config::AuthMode::Tokens,
            )
            .await
        }
        BenchCommand::Status {
            readers,
            seconds,
            redis_url,
        } => {
            let mode = pipeline::Drive::Status { readers, seconds };
            let store = config
                .store
                .database_url
                .as_deref()
                .map(patchflow_core::config::redact_url)
                .unwrap_or_else(|| "SQLite (a fresh file)".into());
            println!(
                "status reads: {readers} concurrent readers for {seconds} s; task store {store}"
            );
            use patchflow_core::config::AuthMode;
            for auth in [AuthMode::None, AuthMode::Tokens] {
                println!("without the cache, auth = {}:", auth.as_str());
                pipeline::with_stack(&config, None, mode, auth).await?;
                println!(
                    "with the Redis status cache ({}), auth = {}:",
                    patchflow_core::config::redact_url(&redis_url),
                    auth.as_str()
                );
                pipeline::with_stack(&config, Some(redis_url.clone()), mode, auth).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Publish { runs } => publish::run(runs).await,
        BenchCommand::Conversation { runs } => {
            pipeline::with_stack(
                &config,
                None,
                pipeline::Drive::Conversation { runs },
                patchflow_core::config::AuthMode::Tokens,
            )
            .await
        }
        BenchCommand::Envcache { dir, runs } => envcache::run(dir, runs).await,
        BenchCommand::Environment { runs } => {
            pipeline::with_stack(
                &config,
                None,
                pipeline::Drive::Environment { runs },
                patchflow_core::config::AuthMode::Tokens,
            )
            .await
        }
        BenchCommand::Store { mib, s3_url } => store::run(mib, s3_url).await,
        BenchCommand::Watch {
            watchers,
            burst,
            paced,
        } => watch::run(&config, watchers, burst, paced).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match settings::load(&cli.global) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("patchflow-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let _telemetry = settings::init_logging(&config, false, Some("patchflow-bench"));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("patchflow-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("patchflow-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
