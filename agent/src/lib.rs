//! The agent that runs inside a task's sandbox (a local child process or a Kubernetes Job):
//! an OpenAI-compatible function-calling loop ([`run::AgentRun`]) over tools reached through
//! one trait ([`tools::ToolDispatch`]), confined to the task workspace: file, search and
//! API tools run as WebAssembly components ([`wasm`]), shell commands in an OS sandbox
//! ([`sandbox`]).
//!
//! It writes the run's results as files in an output directory (the object layout's
//! `diff.patch`, `transcript.jsonl`, `summary.json`) and reports progress as
//! [`patchflow_core::AgentEvent`] lines; uploading them is the runner's job.

pub mod changes;
pub mod cli;
pub mod context;
pub mod diff;
pub mod instructions;
pub mod model;
pub mod run;
pub mod sandbox;
pub mod setup;
pub mod telemetry;
pub mod tools;
pub mod transcript;
pub mod truncate;
pub mod wasm;
pub mod workspace;

pub use run::{AgentRun, ModelSettings};
pub use tools::{SandboxedTools, ShellEnv, ToolDispatch};
pub use workspace::Workspace;
