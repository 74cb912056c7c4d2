//! Errors every door reports the same way: a stable `code`, an HTTP status, a message.

use patchflow_core::{TaskId, TaskStatus, ValidationError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    #[error("{0}")]
    BadRequest(String),
    #[error("task {0} not found")]
    NotFound(TaskId),
    /// Something other than a task (a saved environment) that is not there, or is another
    /// tenant's: the message names it.
    #[error("{0}")]
    Missing(String),
    /// Creating what exists already (a saved environment's name is taken).
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotReady(String),
    #[error("task {task} is already {status}")]
    Finished { task: TaskId, status: TaskStatus },
    /// A retry of a task that has not ended.
    #[error("task {task} is still {status}: retry it once it has ended (or cancel it first)")]
    StillRunning { task: TaskId, status: TaskStatus },
    /// The request does not fit the task's state.
    #[error("{0}")]
    Conflict(String),
    #[error("upload is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("too many submissions for tenant {tenant}; retry in {retry_after_secs} s")]
    RateLimited {
        tenant: String,
        retry_after_secs: u64,
    },
    /// No token, or one that is unknown, expired or revoked.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role may not do this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// A short machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) | Self::BadRequest(_) => "invalid_request",
            Self::NotFound(_) | Self::Missing(_) => "not_found",
            Self::AlreadyExists(_) => "already_exists",
            Self::NotReady(_) => "not_ready",
            Self::Finished { .. } | Self::StillRunning { .. } | Self::Conflict(_) => "conflict",
            Self::TooLarge { .. } => "payload_too_large",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            Self::Invalid(_) | Self::BadRequest(_) => 400,
            Self::NotFound(_) | Self::Missing(_) | Self::NotReady(_) => 404,
            Self::Finished { .. }
            | Self::StillRunning { .. }
            | Self::Conflict(_)
            | Self::AlreadyExists(_) => 409,
            Self::TooLarge { .. } => 413,
            Self::RateLimited { .. } => 429,
            Self::Unauthenticated(_) => 401,
            Self::Forbidden(_) => 403,
            Self::Unavailable(_) => 503,
            Self::Internal(_) => 500,
        }
    }
}

impl From<patchflow_platform::StoreError> for ServiceError {
    fn from(e: patchflow_platform::StoreError) -> Self {
        match e {
            patchflow_platform::StoreError::NotFound(id) => Self::NotFound(id),
            other => Self::Unavailable(format!("task store: {other}")),
        }
    }
}

impl From<patchflow_platform::ObjectError> for ServiceError {
    fn from(e: patchflow_platform::ObjectError) -> Self {
        Self::Unavailable(format!("object store: {e}"))
    }
}

impl From<patchflow_api::InvalidBody> for ServiceError {
    fn from(e: patchflow_api::InvalidBody) -> Self {
        Self::BadRequest(e.to_string())
    }
}

impl From<patchflow_api::UnknownRetryMode> for ServiceError {
    fn from(e: patchflow_api::UnknownRetryMode) -> Self {
        Self::BadRequest(e.to_string())
    }
}
