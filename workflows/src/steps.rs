//! Declarations of the activities the workflow runs: names and types only. The bodies are
//! never called; `patchflow-activities` binds its implementations to these markers, and a
//! mismatched type there is a compile error.
#![allow(unused_variables, clippy::unused_async)]

use temporalio_macros::activity_definitions;
use temporalio_sdk::activities::ActivityError;

use crate::io::{
    CandidateUpdate, FetchInput, FetchOutput, PrepareInput, PreparedEnv, PublishCandidatesInput,
    PublishInput, PublishOutput, PullRequestInput, PullRequestOutput, RunAgentInput, SlotInput,
    StageInput, StageOutput, StatusUpdate, TurnStart,
};
use patchflow_core::AgentSummary;

pub struct Steps;

// Declarations only (their bodies never run): the macro wants inputs by value, as the
// activities that implement them take them.
#[allow(clippy::needless_pass_by_value)]
#[activity_definitions]
impl Steps {
    /// Writes a status transition to the task store.
    #[activity(name = "record_status")]
    pub fn record_status(update: StatusUpdate) -> Result<(), ActivityError> {
        unimplemented!()
    }

    /// Clones the repository or unpacks the uploaded ZIP on the worker.
    #[activity(name = "fetch_code")]
    pub fn fetch_code(input: FetchInput) -> Result<FetchOutput, ActivityError> {
        unimplemented!()
    }

    /// Packs the fetched tree as tar.zst into the object store.
    #[activity(name = "stage_code")]
    pub fn stage_code(input: StageInput) -> Result<StageOutput, ActivityError> {
        unimplemented!()
    }

    /// Sets the staged code up: restores a cached prepared state (then the maintenance
    /// script) or runs the setup script, and stores the prepared workspace.
    #[activity(name = "prepare_environment")]
    pub fn prepare_environment(input: PrepareInput) -> Result<PreparedEnv, ActivityError> {
        unimplemented!()
    }

    /// Waits (heartbeating) until the task holds one of its batch's slots.
    #[activity(name = "acquire_batch_slot")]
    pub fn acquire_batch_slot(input: SlotInput) -> Result<(), ActivityError> {
        unimplemented!()
    }

    /// Gives the task's batch slot back.
    #[activity(name = "release_batch_slot")]
    pub fn release_batch_slot(input: SlotInput) -> Result<(), ActivityError> {
        unimplemented!()
    }

    /// Runs the agent on the staged code; its result files land under `results/<task>/`.
    #[activity(name = "run_agent")]
    pub fn run_agent(input: RunAgentInput) -> Result<AgentSummary, ActivityError> {
        unimplemented!()
    }

    /// Checks the results are stored and records the final status and summary.
    #[activity(name = "publish_result")]
    pub fn publish_result(input: PublishInput) -> Result<PublishOutput, ActivityError> {
        unimplemented!()
    }

    /// A follow-up turn begins: the ended task goes back to RUNNING_AGENT and gains the turn.
    #[activity(name = "begin_turn")]
    pub fn begin_turn(input: TurnStart) -> Result<(), ActivityError> {
        unimplemented!()
    }

    /// Records that one candidate of a best-of-N task started or ended.
    #[activity(name = "record_candidate")]
    pub fn record_candidate(input: CandidateUpdate) -> Result<(), ActivityError> {
        unimplemented!()
    }

    /// Every candidate ended: selects one when `auto_select` says how, publishes it as the
    /// task's result and records the final status.
    #[activity(name = "publish_candidates")]
    pub fn publish_candidates(
        input: PublishCandidatesInput,
    ) -> Result<PublishOutput, ActivityError> {
        unimplemented!()
    }

    /// Opens (or updates) an ended task's pull request.
    #[activity(name = "open_pull_request")]
    pub fn open_pull_request(input: PullRequestInput) -> Result<PullRequestOutput, ActivityError> {
        unimplemented!()
    }
}

/// The activities' marker types, for `#[activity(definition = markers::FetchCode)]` in the
/// crate that implements them.
pub mod markers {
    pub use super::steps::{
        AcquireBatchSlot, BeginTurn, FetchCode, OpenPullRequest, PrepareEnvironment,
        PublishCandidates, PublishResult, RecordCandidate, RecordStatus, ReleaseBatchSlot,
        RunAgent, StageCode,
    };
}
