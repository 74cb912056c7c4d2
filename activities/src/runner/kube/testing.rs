//! Test support for the kube runner (unit tests and `benches/kube_runner.rs`): a directory
//! store that hands out presigned URLs nobody will fetch, since no pod ever runs here.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use patchflow_platform::ObjectStore;
use patchflow_platform::objectstore::{
    FsObjectStore, ObjectError, ObjectMeta as StoreMeta, ObjectReader,
};

/// The directory store with fake presigned URLs: the pod is never run here.
pub struct Presigning(pub FsObjectStore);

#[async_trait]
impl ObjectStore for Presigning {
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError> {
        self.0.put_file(key, path).await
    }
    async fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<(), ObjectError> {
        self.0.put_bytes(key, bytes).await
    }
    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError> {
        self.0.get_to_file(key, path).await
    }
    async fn get_bytes(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        self.0.get_bytes(key).await
    }
    async fn open_read(&self, key: &str) -> Result<(ObjectReader, u64), ObjectError> {
        self.0.open_read(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool, ObjectError> {
        self.0.exists(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<StoreMeta>, ObjectError> {
        self.0.list(prefix).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, ObjectError> {
        self.0.delete_prefix(prefix).await
    }
    async fn presigned_get(
        &self,
        key: &str,
        _expires: Duration,
    ) -> Result<Option<String>, ObjectError> {
        Ok(Some(format!("https://s3.test/{key}?op=get")))
    }
    async fn presigned_put(
        &self,
        key: &str,
        _expires: Duration,
    ) -> Result<Option<String>, ObjectError> {
        Ok(Some(format!("https://s3.test/{key}?op=put")))
    }
    fn describe(&self) -> String {
        "test".into()
    }
}
