//! patchflow's wire types, typed once and shared by every door and every client: the
//! gateway (HTTP, the web page, Kafka, gRPC's validation), the CLI and `patchflow batch`.
//! JSON field names are the contract of the README's HTTP API; they never change here
//! without a new schema.
//!
//! | module | what | who uses it |
//! | --- | --- | --- |
//! | [`submit`] | the submit body (JSON, multipart fields, the web form) and its one conversion to a [`patchflow_core::TaskSpec`]; the short answer of submit and cancel | HTTP, web page, Kafka, gRPC; the CLI and batch send it |
//! | [`view`] | the task record as `GET /api/tasks/{task_id}` shows it, list and event pages | HTTP; the CLI and batch read it |
//! | [`control`] | retry and cancel bodies, [`RetryMode`] | HTTP, web page, gRPC; the CLI sends them |
//! | [`environment`] | saved environments: the create/update body and its one check, the view every read answers | HTTP, gRPC; the CLI sends and reads them |
//! | [`error`] | the error body `{code, message}` | HTTP; the CLI and batch read it |
//! | [`kafka`] | the task message (`patchflow.task.v1`) and the result message | Kafka trigger, results hook; batch produces task messages |
//! | [`batch`] | one line of a batch file, the SWE-bench predictions and counts | `patchflow batch` |
//! | [`usage`] | the usage report and the one reading of its `from`/`to` | HTTP, gRPC; `patchflow usage` reads it |
//!
//! Nothing here does I/O: the crate depends on patchflow-core and serde only (with
//! serde_json for the bodies and chrono for the timestamps patchflow-core already uses).

pub mod batch;
pub mod control;
pub mod environment;
pub mod error;
pub mod kafka;
pub mod submit;
pub mod usage;
pub mod view;

pub use control::{
    CancelBody, MessageBody, RetryBody, RetryMode, SelectBody, TurnAnswer, UnknownRetryMode,
};
pub use environment::{
    EnvironmentBody, EnvironmentInput, EnvironmentList, EnvironmentView, ResetCacheAnswer,
};
pub use error::{ErrorBody, InvalidBody};
pub use submit::{FormFields, LimitsBody, StatusAnswer, SubmitBody};
pub use usage::{UsageAnswer, UsageRange};
pub use view::{AttemptView, EventPage, Health, Links, TaskPage, TaskView};

#[cfg(test)]
mod tests;
