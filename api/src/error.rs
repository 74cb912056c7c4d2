//! Errors on the wire. [`ErrorBody`] is what the HTTP API answers when it refuses a request
//! (written by the gateway, read by the CLI and `patchflow batch`); [`InvalidBody`] is why
//! a body could not be read, with the text every door shows for it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// `{"code": "...", "message": "..."}`: a stable machine-readable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// Why a request body (JSON, multipart fields, the web form) is refused before any task
/// is looked at. Every variant is the caller's mistake (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidBody {
    #[error("invalid JSON body: {0}")]
    Json(String),
    #[error("give either git_url or a zip_file upload, not both")]
    TwoSources,
    #[error("a source is required: git_url, or a zip_file part in a multipart upload")]
    NoSource,
    #[error("{0}: {1}")]
    Token(&'static str, &'static str),
    #[error("field `limits` is not JSON: {0}")]
    LimitsNotJson(String),
    #[error("field `{0}` is not a number")]
    NotANumber(String),
    #[error("invalid form fields: {0}")]
    FormFields(String),
}

/// Reads a JSON body; the error names what serde found wrong.
pub fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, InvalidBody> {
    serde_json::from_slice(bytes).map_err(|e| InvalidBody::Json(e.to_string()))
}
