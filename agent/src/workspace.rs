//! The task workspace and the one rule every tool obeys: a path the model names must stay
//! inside it. Absolute paths, `..` components and symlinks that lead outside are refused
//! with a message the model can act on.

use std::path::{Component, Path, PathBuf};

use crate::tools::ToolError;

#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// `root` must exist; it is canonicalised once so later checks compare real paths.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        Ok(Self {
            root: root.canonicalize()?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves a model-supplied relative path to a real path inside the workspace.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, ToolError> {
        let rel = rel.trim();
        if rel.contains('\0') {
            return Err(ToolError::new("path contains a NUL byte"));
        }
        let path = Path::new(rel);
        if path.is_absolute() {
            return Err(ToolError::new(format!(
                "`{rel}` is an absolute path; use a path relative to the repository root"
            )));
        }
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(ToolError::new(format!(
                "`{rel}` contains `..`; paths must stay inside the repository"
            )));
        }
        let joined = self.root.join(path);
        // Walk up to the deepest part that exists and check where it really points, so a
        // symlink anywhere on the way (even a dangling one) cannot lead outside.
        let mut probe = joined.clone();
        loop {
            match std::fs::symlink_metadata(&probe) {
                Ok(_) => break,
                Err(_) => {
                    if !probe.pop() {
                        break;
                    }
                }
            }
        }
        let real = probe.canonicalize().map_err(|_| {
            ToolError::new(format!(
                "`{rel}` goes through a symlink that leads nowhere inside the repository"
            ))
        })?;
        if !real.starts_with(&self.root) {
            return Err(ToolError::new(format!(
                "`{rel}` leads outside the repository through a symlink"
            )));
        }
        Ok(joined)
    }

    /// The workspace-relative form of a real path, with `/` separators.
    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .replace('\\', "/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_every_way_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("src/a.py"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("etc-link")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/x", dir.path().join("dangling")).unwrap();
        let ws = Workspace::new(dir.path()).unwrap();
        assert!(ws.resolve("src/a.py").is_ok());
        assert!(ws.resolve("src/new.py").is_ok());
        assert!(ws.resolve(".").is_ok());
        let e = |p: &str| ws.resolve(p).unwrap_err().to_string();
        assert!(e("/etc/passwd").contains("absolute path"));
        assert!(e("../x").contains("`..`"));
        assert!(e("src/../../x").contains("`..`"));
        assert!(e("etc-link/passwd").contains("outside the repository"));
        assert!(e("dangling").contains("symlink"));
    }
}
