//! `patchflow-sandbox-exec`: the one entry to the shell tool's OS sandbox. The agent
//! starts it beside its own binary for every `run_shell_command`
//! (`patchflow_agent::sandbox::ShellSandbox`); it puts up the walls in this fresh,
//! single-threaded process and becomes the command, or exits 126 with the reason.

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(patchflow_agent::sandbox::main_with_args(
        std::env::args_os().skip(1),
    ))
}
