//! `patchflow agent-pod fetch|run`: the two containers of a Kubernetes agent Job. The
//! contract between them and the kube runner, and both its halves, live in
//! `patchflow_activities::runner::kube::pod_contract`; this is the command line.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use patchflow_activities::runner::kube::pod_contract;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PodStep {
    /// Bring the staged code into the workspace (the init container).
    Fetch,
    /// Run the agent and upload its results (the agent container).
    Run,
}

#[derive(Debug, Args)]
pub struct AgentPodArgs {
    #[arg(value_enum)]
    pub step: PodStep,
}

pub async fn run(config: &patchflow_core::Config, a: AgentPodArgs) -> anyhow::Result<ExitCode> {
    match a.step {
        PodStep::Fetch => pod_contract::fetch().await?,
        PodStep::Run => {
            // The agent's model requests, tokens and tool calls, counted here too, for a
            // scrape of the pod while it runs (the worker counts them from its log as well).
            // The server lives as long as this process: the container ends with the run.
            patchflow::stack::serve_metrics(config, std::future::pending()).await;
            pod_contract::run(&patchflow::stack::agent_program()?).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}
