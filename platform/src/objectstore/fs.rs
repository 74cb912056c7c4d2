//! The object store as a local directory: the embedded default. Each key is a file under
//! the root; writes go to a temporary file that is renamed into place, so a reader sees the
//! old object or the whole new one, never a torn write.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{ObjectError, ObjectMeta, ObjectReader, ObjectStore, validate_key};

pub struct FsObjectStore {
    root: PathBuf,
}

impl FsObjectStore {
    pub async fn open(root: &Path) -> Result<Self, ObjectError> {
        tokio::fs::create_dir_all(root)
            .await
            .map_err(|source| ObjectError::Io {
                key: root.display().to_string(),
                source,
            })?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, ObjectError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    /// A temporary sibling of `path`, unique to this write (the S3 store downloads into one
    /// too, then renames it into place).
    pub(super) fn temp_of(path: &Path) -> PathBuf {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp-{}-{}", std::process::id(), uuid_like()));
        path.with_file_name(name)
    }

    async fn prepare_parent(path: &Path, key: &str) -> Result<(), ObjectError> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| io(key, source))?;
        }
        Ok(())
    }
}

fn uuid_like() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn io(key: &str, source: std::io::Error) -> ObjectError {
    if source.kind() == std::io::ErrorKind::NotFound {
        ObjectError::NotFound(key.to_string())
    } else {
        ObjectError::Io {
            key: key.to_string(),
            source,
        }
    }
}

#[async_trait]
impl ObjectStore for FsObjectStore {
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError> {
        let dest = self.path_of(key)?;
        Self::prepare_parent(&dest, key).await?;
        let tmp = Self::temp_of(&dest);
        let size = tokio::fs::copy(path, &tmp)
            .await
            .map_err(|e| ObjectError::Io {
                key: key.to_string(),
                source: e,
            })?;
        tokio::fs::rename(&tmp, &dest)
            .await
            .map_err(|e| io(key, e))?;
        Ok(size)
    }

    async fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<(), ObjectError> {
        let dest = self.path_of(key)?;
        Self::prepare_parent(&dest, key).await?;
        let tmp = Self::temp_of(&dest);
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(|e| io(key, e))?;
        tokio::fs::rename(&tmp, &dest).await.map_err(|e| io(key, e))
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError> {
        let src = self.path_of(key)?;
        tokio::fs::copy(&src, path).await.map_err(|e| io(key, e))
    }

    async fn get_bytes(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        let src = self.path_of(key)?;
        tokio::fs::read(&src).await.map_err(|e| io(key, e))
    }

    async fn open_read(&self, key: &str) -> Result<(ObjectReader, u64), ObjectError> {
        let src = self.path_of(key)?;
        let file = tokio::fs::File::open(&src).await.map_err(|e| io(key, e))?;
        let size = file.metadata().await.map_err(|e| io(key, e))?.len();
        Ok((Box::pin(file), size))
    }

    async fn exists(&self, key: &str) -> Result<bool, ObjectError> {
        let p = self.path_of(key)?;
        tokio::fs::try_exists(&p).await.map_err(|e| io(key, e))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            // Walk only the deepest directory the prefix names, not the whole store.
            let dir_part = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            let start = root.join(dir_part);
            if !start.exists() {
                return Ok(out);
            }
            for entry in walkdir::WalkDir::new(&start) {
                let entry = entry.map_err(|e| ObjectError::Io {
                    key: prefix.clone(),
                    source: e.into(),
                })?;
                if !entry.file_type().is_file() {
                    continue;
                }
                let Ok(rel) = entry.path().strip_prefix(&root) else {
                    continue;
                };
                let key = rel.to_string_lossy().replace('\\', "/");
                if key.starts_with(&prefix) && !key.contains(".tmp-") {
                    let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    out.push(ObjectMeta { key, size });
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .map_err(|e| ObjectError::Io {
            key: "list".into(),
            source: std::io::Error::other(e),
        })?
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, ObjectError> {
        let objects = self.list(prefix).await?;
        for o in &objects {
            let p = self.path_of(&o.key)?;
            match tokio::fs::remove_file(&p).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&o.key, e)),
            }
        }
        Ok(objects.len() as u64)
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_lists_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsObjectStore::open(dir.path()).await.unwrap();
        store
            .put_bytes("results/t1/diff.patch", b"d")
            .await
            .unwrap();
        store
            .put_bytes("results/t1/summary.json", b"{}")
            .await
            .unwrap();
        store
            .put_bytes("results/t2/diff.patch", b"x")
            .await
            .unwrap();
        assert_eq!(
            store.get_bytes("results/t1/diff.patch").await.unwrap(),
            b"d"
        );
        let keys: Vec<_> = store
            .list("results/t1/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["results/t1/diff.patch", "results/t1/summary.json"]);
        assert_eq!(store.delete_prefix("results/t1/").await.unwrap(), 2);
        assert!(!store.exists("results/t1/diff.patch").await.unwrap());
        assert!(store.exists("results/t2/diff.patch").await.unwrap());
        assert!(matches!(
            store.get_bytes("results/t1/diff.patch").await,
            Err(ObjectError::NotFound(_))
        ));
        assert!(matches!(
            store.put_bytes("../escape", b"x").await,
            Err(ObjectError::InvalidKey(_))
        ));
    }
}
