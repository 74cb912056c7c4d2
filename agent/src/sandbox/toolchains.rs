//! The toolchain homes commands see read-only (`sandbox_toolchains`): rustup's, cargo's,
//! pyenv's, nvm's. Commands have a HOME of their own, so a toolchain found through
//! `$HOME/.rustup` outside is named by its variable inside (`RUSTUP_HOME=…`).

use std::path::{Path, PathBuf};

/// One toolchain home: bound read-only at the same path, and exported as `var` if named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toolchain {
    pub var: Option<String>,
    pub path: PathBuf,
}

/// The homes `auto` looks for: the variable that names each, and where it is by default
/// under HOME.
const AUTO: [(&str, &str); 4] = [
    ("RUSTUP_HOME", ".rustup"),
    ("CARGO_HOME", ".cargo"),
    ("PYENV_ROOT", ".pyenv"),
    ("NVM_DIR", ".nvm"),
];

/// Files in a toolchain home that hold keys, hidden inside even when world-readable.
pub const CREDENTIAL_FILES: [&str; 4] = [
    "credentials",
    "credentials.toml",
    ".credentials.toml",
    ".netrc",
];

/// The toolchains a `sandbox_toolchains` value names, with `env` the environment `auto`
/// looks in. Only absolute paths to existing directories are kept; `/` and the system
/// directories (bound anyway) are refused, so a setting cannot widen the root.
pub fn resolve(
    setting: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Vec<Toolchain>, String> {
    let setting = setting.trim();
    let mut out = Vec::new();
    match setting {
        "" | "none" => {}
        "auto" => {
            let home = env("HOME").filter(|h| !h.is_empty());
            for (var, default) in AUTO {
                let path = env(var)
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
                    .or_else(|| home.as_ref().map(|h| Path::new(h).join(default)));
                if let Some(path) = path.filter(|p| p.is_absolute() && p.is_dir()) {
                    out.push(Toolchain {
                        var: Some(var.to_string()),
                        path,
                    });
                }
            }
        }
        list => {
            for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let (var, path) = match entry.split_once('=') {
                    Some((var, path)) => (Some(var.trim()), path.trim()),
                    None => (None, entry),
                };
                if let Some(var) = var
                    && (var.is_empty()
                        || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                        || var.as_bytes()[0].is_ascii_digit())
                {
                    return Err(format!(
                        "sandbox_toolchains: `{var}` is not a variable name"
                    ));
                }
                let path = PathBuf::from(path);
                if !path.is_absolute() || path.components().any(|c| c.as_os_str() == "..") {
                    return Err(format!(
                        "sandbox_toolchains: `{}` is not an absolute path",
                        path.display()
                    ));
                }
                if super::bwrap::SYSTEM_DIRS
                    .iter()
                    .any(|d| Path::new(d) == path)
                    || path == Path::new("/")
                {
                    return Err(format!(
                        "sandbox_toolchains: `{}` is a system directory (bound read-only anyway) or the root",
                        path.display()
                    ));
                }
                if path.is_dir() {
                    out.push(Toolchain {
                        var: var.map(str::to_string),
                        path,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The setting's text for an explicit list (what a worker hands its agents after resolving
/// `auto` in its own environment).
pub fn to_setting(toolchains: &[Toolchain]) -> String {
    if toolchains.is_empty() {
        return "none".into();
    }
    toolchains
        .iter()
        .map(|t| match &t.var {
            Some(v) => format!("{v}={}", t.path.display()),
            None => t.path.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_finds_homes_by_variable_or_under_home() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".rustup")).unwrap();
        let cargo = tempfile::tempdir().unwrap();
        let h = home.path().display().to_string();
        let c = cargo.path().display().to_string();
        let env = |k: &str| match k {
            "HOME" => Some(h.clone()),
            "CARGO_HOME" => Some(c.clone()),
            _ => None,
        };
        let found = resolve("auto", env).unwrap();
        assert_eq!(
            found,
            vec![
                Toolchain {
                    var: Some("RUSTUP_HOME".into()),
                    path: home.path().join(".rustup")
                },
                Toolchain {
                    var: Some("CARGO_HOME".into()),
                    path: cargo.path().to_path_buf()
                },
            ]
        );
        let text = to_setting(&found);
        assert_eq!(resolve(&text, |_| None).unwrap(), found);
        assert_eq!(to_setting(&[]), "none");
        assert!(resolve("none", env).unwrap().is_empty());
    }

    #[test]
    fn hostile_lists_are_refused() {
        for bad in [
            "relative/dir",
            "/",
            "/usr",
            "/etc",
            "/opt/../root",
            "BAD-NAME=/opt",
            "=/opt",
            "1X=/opt",
        ] {
            assert!(resolve(bad, |_| None).is_err(), "{bad} was accepted");
        }
        // A path that does not exist is left out, not an error (a machine without nvm).
        assert!(
            resolve("NVM_DIR=/nonexistent/nvm", |_| None)
                .unwrap()
                .is_empty()
        );
    }
}
