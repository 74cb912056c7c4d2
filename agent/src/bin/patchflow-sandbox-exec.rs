//! The shell sandbox on its own: the same entry point as `patchflow sandbox-exec`, for
//! embedding the agent crate without the `patchflow` binary (and for this crate's tests).

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    if args
        .peek()
        .is_some_and(|a| a == patchflow_agent::sandbox::SUBCOMMAND)
    {
        args.next();
    }
    ExitCode::from(patchflow_agent::sandbox::main_with_args(args))
}
