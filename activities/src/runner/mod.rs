//! Runners start the agent for one attempt of `run_agent` (the task's agent, one of its
//! best-of-N candidates, or a follow-up turn) and bring back its summary, with the result
//! files stored under the run's prefix (`results/<task>/`, `…/candidates/<n>/`,
//! `…/turns/<t>/`). The local runner is a child process on the worker; the Kubernetes
//! runner makes one Job per run and attempt.

mod agent_runner;
pub mod kube;
mod local;

pub use agent_runner::{AgentRunner, RunTarget, RunnerError};
pub use kube::{KubeRunner, KubeRunnerConfig};
pub use local::{
    AGENT_BINARY, AgentPaths, LocalRunner, LocalRunnerConfig, agent_command, agent_program,
};
