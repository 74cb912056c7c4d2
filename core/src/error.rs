//! Errors of the domain model: a rejected input names the field and why.

use thiserror::Error;

/// A task or setting that cannot be accepted as given. The message is shown to users as is.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Error)]
pub enum CoreError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("config file: {0}")]
    ConfigFile(String),
    #[error("unknown setting `{0}`")]
    UnknownSetting(String),
}
