//! Runners start the agent for one attempt of `run_agent` and bring back its summary, with
//! the result files stored under `results/<task>/`. The local runner is a child process on
//! the worker; a Kubernetes Job runner implements the same trait.

mod agent_runner;
pub mod kube;
mod local;

pub use agent_runner::{AgentRunner, RunTarget, RunnerError};
pub use kube::{KubeRunner, KubeRunnerConfig};
pub use local::{
    AGENT_BINARY, AgentPaths, LocalRunner, LocalRunnerConfig, agent_command, agent_program,
};
