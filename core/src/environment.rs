//! Environments: how a repository is set up before the agent runs (a setup script with
//! network, secrets only during setup, a maintenance script on a cache hit), inline in a
//! task (`setup`) or saved per tenant and named (`environment`).
//!
//! No I/O here: the definitions, their checks, and the names the rest of the code shares.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// Largest setup or maintenance script (64 KiB).
pub const MAX_SCRIPT_BYTES: usize = 64 * 1024;
/// Most entries in `env`, `secrets`, `allow_hosts`, `cache_paths`, `cache_key_files`.
pub const MAX_ENTRIES: usize = 64;
/// Largest value of one `env` variable or secret.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// The repository file used as the setup script when a task names none.
pub const REPO_SETUP_SCRIPT: &str = ".patchflow/setup.sh";

/// The lockfiles and manifests whose contents join the cache key, wherever they are in the
/// repository (a glob of a file name: `requirements*.txt`).
pub const LOCKFILES: [&str; 15] = [
    "Cargo.lock",
    "package-lock.json",
    "pnpm-lock.yaml",
    "yarn.lock",
    "poetry.lock",
    "uv.lock",
    "requirements*.txt",
    "go.sum",
    "Gemfile.lock",
    "Pipfile.lock",
    "pyproject.toml",
    "package.json",
    "Cargo.toml",
    "go.mod",
    "setup.py",
];

/// Whether the setup scripts may use the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetupNetwork {
    /// Installing needs it: the default for setup.
    #[default]
    On,
    Off,
}

impl SetupNetwork {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A setup definition: the task's inline `setup`, or the body of a saved environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupSpec {
    /// Runs (bash, in the workspace, in the sandbox) on a cache miss.
    #[serde(default)]
    pub setup_script: String,
    /// Runs on a cache hit, after the cached state is restored and the task's files laid
    /// over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_script: Option<String>,
    /// Variables of both scripts (not secret: stored and shown as they are).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub network: SetupNetwork,
    /// With network on, the only hosts the scripts may reach (through the worker's egress
    /// proxy); empty: any public host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// Whether the prepared state is cached (`false` bypasses the cache both ways).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub cache: bool,
    /// Paths kept in the cache besides the workspace: `~/…` (the scripts' HOME) or
    /// relative to the workspace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_paths: Vec<String>,
    /// Files whose contents join the cache key instead of the lockfiles found.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_key_files: Vec<String>,
}

impl Default for SetupSpec {
    fn default() -> Self {
        Self {
            setup_script: String::new(),
            maintenance_script: None,
            env: BTreeMap::new(),
            network: SetupNetwork::On,
            allow_hosts: Vec::new(),
            cache: true,
            cache_paths: Vec::new(),
            cache_key_files: Vec::new(),
        }
    }
}

/// A variable name the scripts may be given: `[A-Za-z_][A-Za-z0-9_]*`, at most 128, and
/// none the platform or the shell relies on.
pub fn validate_var_name(field: &str, name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(ValidationError::new(
            field,
            format!("`{name}` is not a variable name (letters, digits and `_`, at most 128)"),
        ));
    }
    const RESERVED: [&str; 6] = [
        "PATH",
        "HOME",
        "TMPDIR",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "BASH_ENV",
    ];
    if RESERVED.contains(&name) || name.starts_with("PATCHFLOW_") {
        return Err(ValidationError::new(
            field,
            format!("`{name}` is set by patchflow and cannot be given"),
        ));
    }
    Ok(())
}

/// A host name for `allow_hosts`: letters, digits, `-` and `.`, an optional leading `*.`.
fn is_host(h: &str) -> bool {
    let bare = h.strip_prefix("*.").unwrap_or(h);
    !bare.is_empty()
        && h.len() <= 253
        && bare.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A `cache_paths` entry: `~` or `~/rel`, or a workspace-relative path; never `..`.
pub fn validate_cache_path(field: &str, p: &str) -> Result<(), ValidationError> {
    let rel = match p.strip_prefix('~') {
        Some("") => return Ok(()),
        Some(rest) => match rest.strip_prefix('/') {
            Some(r) => r,
            None => {
                return Err(ValidationError::new(
                    field,
                    format!("`{p}`: only `~/…` (the scripts' HOME) is allowed, not another user's"),
                ));
            }
        },
        None => p,
    };
    crate::task::validate_relative_path(field, rel)
}

impl SetupSpec {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        let f = |name: &str| format!("{field}.{name}");
        if self.setup_script.trim().is_empty() {
            return Err(ValidationError::new(
                f("setup_script"),
                "is required and must not be blank",
            ));
        }
        for (name, script) in [
            ("setup_script", Some(&self.setup_script)),
            ("maintenance_script", self.maintenance_script.as_ref()),
        ] {
            if let Some(s) = script {
                if s.len() > MAX_SCRIPT_BYTES {
                    return Err(ValidationError::new(
                        f(name),
                        format!("is longer than {MAX_SCRIPT_BYTES} bytes"),
                    ));
                }
                if s.contains('\0') {
                    return Err(ValidationError::new(f(name), "contains a NUL byte"));
                }
            }
        }
        let counts = [
            ("env", self.env.len()),
            ("allow_hosts", self.allow_hosts.len()),
            ("cache_paths", self.cache_paths.len()),
            ("cache_key_files", self.cache_key_files.len()),
        ];
        for (name, n) in counts {
            if n > MAX_ENTRIES {
                return Err(ValidationError::new(
                    f(name),
                    format!("has more than {MAX_ENTRIES} entries"),
                ));
            }
        }
        for (k, v) in &self.env {
            validate_var_name(&f("env"), k)?;
            if v.len() > MAX_VALUE_BYTES || v.contains('\0') {
                return Err(ValidationError::new(
                    f("env"),
                    format!("`{k}`: at most {MAX_VALUE_BYTES} bytes, no NUL"),
                ));
            }
        }
        for h in &self.allow_hosts {
            if !is_host(h) {
                return Err(ValidationError::new(
                    f("allow_hosts"),
                    format!("`{h}` is not a host name (`example.com` or `*.example.com`)"),
                ));
            }
        }
        if !self.allow_hosts.is_empty() && self.network == SetupNetwork::Off {
            return Err(ValidationError::new(
                f("allow_hosts"),
                "names hosts, but network is off",
            ));
        }
        for p in &self.cache_paths {
            validate_cache_path(&f("cache_paths"), p)?;
        }
        for p in &self.cache_key_files {
            crate::task::validate_relative_path(&f("cache_key_files"), p)?;
        }
        Ok(())
    }
}

/// A saved environment's name: what `environment` names and the routes carry.
pub fn validate_environment_name(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "name",
            format!(
                "`{name}` is not an environment name (1 to 64 letters, digits, `.`, `_` or `-`, starting with a letter or digit)"
            ),
        ))
    }
}

/// A saved environment as the store keeps it: its secrets sealed (by the same secret box
/// as the tasks' tokens), never in plain text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentRecord {
    pub tenant: String,
    pub name: String,
    /// The repository it is meant for (informational; shown, not enforced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    pub setup: SetupSpec,
    /// Secret name → sealed value.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Bumped whenever the secrets change (it joins the cache key; the values do not).
    pub secrets_version: u64,
    /// Bumped by `reset-cache` (it joins the cache key, so older entries are never hit).
    pub cache_generation: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One prepared state in the environment cache (`envcache/<tenant>/<key>.tar.zst`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvCacheEntry {
    pub tenant: String,
    pub key: String,
    /// The saved environment it was made from, if any (`reset-cache` removes these).
    pub environment: Option<String>,
    pub bytes: u64,
    pub created_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
}

/// The object key of a prepared state.
pub fn cache_object_key(tenant: &str, key: &str) -> String {
    format!("envcache/{tenant}/{key}.tar.zst")
}

/// Parts of a variable name that mark it as a credential: never passed through.
const CREDENTIAL_MARKS: [&str; 4] = ["KEY", "TOKEN", "SECRET", "PASSWORD"];

/// The variables `shell_env_passthrough` keeps (comma-separated names), with their values
/// from `env`: names that are not variable names, that patchflow sets, or that look like
/// credentials (`*KEY*`, `*TOKEN*`, `*SECRET*`, `*PASSWORD*`, any case) are dropped.
pub fn passthrough(setting: &str, env: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    setting
        .split(',')
        .map(str::trim)
        .filter(|n| validate_var_name("shell_env_passthrough", n).is_ok())
        .filter(|n| {
            let upper = n.to_ascii_uppercase();
            !CREDENTIAL_MARKS.iter().any(|m| upper.contains(m))
        })
        .filter_map(|n| env(n).map(|v| (n.to_string(), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(script: &str) -> SetupSpec {
        SetupSpec {
            setup_script: script.into(),
            ..SetupSpec::default()
        }
    }

    #[test]
    fn passthrough_never_passes_credentials() {
        let env = |k: &str| Some(format!("v-{k}"));
        let got = passthrough(
            "GOPATH, JAVA_HOME,AWS_SECRET_ACCESS_KEY,github_token,DB_PASSWORD,apikey,PATH,PATCHFLOW_X,bad-name,,",
            env,
        );
        assert_eq!(
            got,
            [
                ("GOPATH".to_string(), "v-GOPATH".to_string()),
                ("JAVA_HOME".to_string(), "v-JAVA_HOME".to_string())
            ]
        );
        assert!(passthrough("GOPATH", |_| None).is_empty());
    }

    #[test]
    fn defaults_and_wire_names() {
        let s: SetupSpec =
            serde_json::from_str(r#"{"setup_script":"pip install -r r.txt"}"#).unwrap();
        assert_eq!(s.network, SetupNetwork::On);
        assert!(s.cache);
        let s: SetupSpec = serde_json::from_str(
            r#"{"setup_script":"x","network":"off","cache":false,"cache_paths":["~/.cache/pip"],"env":{"A":"1"}}"#,
        )
        .unwrap();
        assert_eq!(s.network, SetupNetwork::Off);
        assert!(!s.cache);
        s.validate("setup").unwrap();
        assert!(serde_json::from_str::<SetupSpec>(r#"{"setup_script":"x","nope":1}"#).is_err());
        assert!(
            serde_json::from_str::<SetupSpec>(r#"{"setup_script":"x","network":"maybe"}"#).is_err()
        );
    }

    #[test]
    fn hostile_definitions_are_refused() {
        let bad = |s: SetupSpec| s.validate("setup").unwrap_err().field;
        assert_eq!(bad(spec("  ")), "setup.setup_script");
        assert_eq!(
            bad(spec(&"x".repeat(MAX_SCRIPT_BYTES + 1))),
            "setup.setup_script"
        );
        for name in ["PATH", "LD_PRELOAD", "PATCHFLOW_X", "1A", "A-B", ""] {
            let mut s = spec("x");
            s.env.insert(name.into(), "v".into());
            assert_eq!(bad(s), "setup.env", "{name}");
        }
        for host in ["a b", "http://x", "", "*.", "a..b"] {
            let mut s = spec("x");
            s.allow_hosts = vec![host.into()];
            assert_eq!(bad(s), "setup.allow_hosts", "{host}");
        }
        let mut s = spec("x");
        s.allow_hosts = vec!["pypi.org".into()];
        s.network = SetupNetwork::Off;
        assert_eq!(bad(s), "setup.allow_hosts");
        for p in ["/etc", "~root/x", "../x", "~/../x", "a/../../b"] {
            let mut s = spec("x");
            s.cache_paths = vec![p.into()];
            assert_eq!(bad(s), "setup.cache_paths", "{p}");
        }
        let mut s = spec("x");
        s.cache_paths = vec!["~".into(), "~/.cache/pip".into(), ".venv".into()];
        s.allow_hosts = vec!["*.pythonhosted.org".into(), "pypi.org".into()];
        s.validate("setup").unwrap();
        for n in ["", "-x", "a/b", "a b", &"n".repeat(65)] {
            assert!(validate_environment_name(n).is_err(), "{n}");
        }
        validate_environment_name("py-3.11_env").unwrap();
    }
}
