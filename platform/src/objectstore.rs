//! Object storage for staged code and results, keyed as DESIGN.md lays out
//! (`uploads/…`, `staged/…`, `results/…`).

mod fs;

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use thiserror::Error;
use tokio::io::AsyncRead;

pub use fs::FsObjectStore;

#[derive(Debug, Error)]
pub enum ObjectError {
    #[error("object `{0}` not found")]
    NotFound(String),
    #[error("invalid object key `{0}`")]
    InvalidKey(String),
    #[error("object store I/O on `{key}`: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unsupported object store URL `{0}` (file:///PATH)")]
    UnsupportedUrl(String),
}

/// A reader over one object's bytes.
pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
}

#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Uploads a local file; returns its size. Readers never see a partial object.
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError>;

    async fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<(), ObjectError>;

    /// Downloads an object into a local file; returns its size.
    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError>;

    /// A whole small object (summaries, diffs) in memory.
    async fn get_bytes(&self, key: &str) -> Result<Vec<u8>, ObjectError>;

    /// Streams an object, for serving it over HTTP without buffering; also returns its size.
    async fn open_read(&self, key: &str) -> Result<(ObjectReader, u64), ObjectError>;

    async fn exists(&self, key: &str) -> Result<bool, ObjectError>;

    /// Objects under a prefix, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError>;

    /// Deletes every object under a prefix; returns how many.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, ObjectError>;

    /// Where the store lives, for `patchflow config` and logs (no credentials).
    fn describe(&self) -> String;
}

/// A key is a relative `/`-separated path of safe characters: no `..`, no leading `/`.
pub fn validate_key(key: &str) -> Result<(), ObjectError> {
    let ok = !key.is_empty()
        && key.len() <= 1024
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ObjectError::InvalidKey(key.to_string()))
    }
}

/// Opens the store a URL names.
pub async fn open(url: &str) -> Result<Arc<dyn ObjectStore>, ObjectError> {
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Arc::new(FsObjectStore::open(Path::new(path)).await?));
    }
    Err(ObjectError::UnsupportedUrl(url.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        assert!(validate_key("results/tsk_1/diff.patch").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "a//b",
            "a/./b",
            "a b",
            "..",
            "results/",
        ] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
    }
}
