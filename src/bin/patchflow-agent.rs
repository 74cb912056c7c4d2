//! `patchflow-agent`: the agent alone, what the runners start when it sits beside the
//! `patchflow` binary. The same code as `patchflow agent` (patchflow_agent::cli), without
//! the gateway, worker and stores linked in: it starts faster and needs about a third
//! less memory, which matters when one machine runs many agents.
//!
//! `patchflow-agent [agent] --task … --workspace … --baseline … --out …`; the settings
//! come from `PATCHFLOW_CONFIG` and `PATCHFLOW_*` variables. Shell commands go through
//! `patchflow-sandbox-exec` beside it, as for `patchflow agent`.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use patchflow_agent::cli::{self, AgentArgs};

#[derive(Debug, Parser)]
#[command(name = "patchflow-agent", version, about = "The patchflow agent alone")]
struct Cli {
    #[command(flatten)]
    args: AgentArgs,
}

fn main() -> ExitCode {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    // Runners ask which build this is before they use it (see agent_program).
    if argv.get(1).is_some_and(|a| a == "--build-id") {
        println!("{}", env!("PATCHFLOW_AGENT_BUILD"));
        return ExitCode::SUCCESS;
    }
    // An image build compiles the tools once: `--precompile-tools DIR`.
    if argv.get(1).is_some_and(|a| a == "--precompile-tools") {
        let Some(dir) = argv.get(2) else {
            eprintln!("patchflow-agent: --precompile-tools needs a directory");
            return ExitCode::from(2);
        };
        let result =
            cli::load_config().and_then(|c| cli::precompile_tools(&c, std::path::Path::new(dir)));
        return match result {
            Ok(path) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("patchflow-agent: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // The runners write `<program> agent …` whichever binary they start.
    if argv.get(1).is_some_and(|a| a == "agent") {
        argv.remove(1);
    }
    let cli = Cli::parse_from(argv);
    let config = match cli::load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("patchflow-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut telemetry = patchflow_agent::telemetry::init(
        config.server.log_format,
        "info",
        patchflow_agent::telemetry::Tracing::new(
            "patchflow-agent",
            config.server.otlp_endpoint.as_deref(),
        ),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("patchflow-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli::run(&config, cli.args));
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("patchflow-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
