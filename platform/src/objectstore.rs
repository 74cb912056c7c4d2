//! Object storage for staged code and results, keyed as ARCHITECTURE.md lays out
//! (`uploads/…`, `staged/…`, `results/…`).
//!
//! Two back-ends sit behind [`ObjectStore`], chosen by URL in [`open`]: a local directory
//! ([`FsObjectStore`], the embedded default) and any S3-compatible service
//! ([`S3ObjectStore`]: AWS S3, Tencent COS, MinIO), which several machines can share.

mod fs;
mod s3;

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;
use tokio::io::AsyncRead;

pub use fs::FsObjectStore;
pub use s3::S3ObjectStore;

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
    /// The back-end refused or failed an operation; `op` names it (`put`, `get`, …).
    #[error("object store {op} of `{key}` failed: {message}")]
    Backend {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error(
        "object store bucket `{0}` does not exist (create it, or add `create_bucket=true` \
         to the URL for tests and development)"
    )]
    BucketMissing(String),
    #[error("invalid object store URL `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "unsupported object store URL `{0}` (file:///PATH or \
         s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION&path_style=true|false&create_bucket=true|false)"
    )]
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

    /// A URL that lets its holder download the object without credentials until `expires`
    /// passes (for a Kubernetes Job, say). `None` where the store has no URLs (a directory).
    async fn presigned_get(
        &self,
        key: &str,
        expires: Duration,
    ) -> Result<Option<String>, ObjectError> {
        validate_key(key)?;
        let _ = expires;
        Ok(None)
    }

    /// A URL that lets its holder upload the object (HTTP `PUT`, body = the bytes, sent
    /// with `Content-Type: application/octet-stream`) until `expires` passes. `None` where
    /// the store has no URLs.
    async fn presigned_put(
        &self,
        key: &str,
        expires: Duration,
    ) -> Result<Option<String>, ObjectError> {
        validate_key(key)?;
        let _ = expires;
        Ok(None)
    }

    /// Where the store lives, for `patchflow config` and logs (no credentials).
    fn describe(&self) -> String;
}

/// A key is a relative `/`-separated path of safe characters: no `..`, no leading `/`.
/// Copies each of `files` from under the key prefix `from` to under `to` (a candidate's or
/// a turn's results to the task's own); a file absent at `from` is skipped. Answers how many
/// were copied.
pub async fn copy_files(
    objects: &dyn ObjectStore,
    from: &str,
    to: &str,
    files: &[&str],
) -> Result<usize, ObjectError> {
    let mut copied = 0;
    for file in files {
        match objects.get_bytes(&format!("{from}{file}")).await {
            Ok(bytes) => {
                objects.put_bytes(&format!("{to}{file}"), &bytes).await?;
                copied += 1;
            }
            Err(ObjectError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(copied)
}

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
    if url.starts_with("s3://") {
        return Ok(Arc::new(S3ObjectStore::open(url).await?));
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

    #[tokio::test]
    async fn a_directory_has_no_presigned_urls() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&format!("file://{}", dir.path().display()))
            .await
            .unwrap();
        let hour = Duration::from_secs(3600);
        assert_eq!(
            store
                .presigned_get("results/t/diff.patch", hour)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .presigned_put("results/t/diff.patch", hour)
                .await
                .unwrap(),
            None
        );
        assert!(matches!(
            store.presigned_get("../x", hour).await,
            Err(ObjectError::InvalidKey(_))
        ));
    }
}
