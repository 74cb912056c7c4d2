//! Saved environments on the wire: [`EnvironmentBody`] is what `POST /api/environments`
//! and `PUT /api/environments/{name}` take (and gRPC's `EnvironmentDefinition` once
//! mapped), checked once by [`EnvironmentBody::into_input`]; [`EnvironmentView`] is what
//! every read answers. Secret values travel in a body only, from the client to the gateway
//! that seals them; no answer ever carries one, only their names.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use patchflow_core::environment::{
    EnvironmentRecord, MAX_ENTRIES, MAX_VALUE_BYTES, SetupNetwork, SetupSpec,
    validate_environment_name, validate_var_name,
};
use patchflow_core::{Secret, ValidationError};
use serde::{Deserialize, Serialize, Serializer};

/// Longest `repo` accepted.
pub const MAX_REPO_CHARS: usize = 2048;

/// A saved environment as a client gives it. Unknown fields are refused, so a typo is an
/// error rather than a silently ignored option.
///
/// On `PUT` the definition is replaced whole (a field left out takes its default), except
/// `secrets`: left out, the stored secrets are kept as they are (and `secrets_version`
/// stays); given (even as `{}`), they replace the stored ones and `secrets_version` is
/// bumped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentBody {
    /// Required on `POST`; on `PUT` the route's name is the name (a different one here is
    /// refused).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The repository it is meant for (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default)]
    pub setup_script: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_script: Option<String>,
    /// Variables of both scripts (not secret: stored and shown as they are).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Variables given to the setup script only, sealed at once and never shown again. A
    /// client sending this body sends the values themselves (see [`expose_secrets`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "expose_secrets"
    )]
    pub secrets: Option<BTreeMap<String, Secret>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SetupNetwork>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_key_files: Vec<String>,
}

/// A [`Secret`] serializes as `***` everywhere else; a body is the one place the values
/// must travel, from the client that holds them to the gateway that seals them.
fn expose_secrets<S: Serializer>(
    secrets: &Option<BTreeMap<String, Secret>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match secrets {
        Some(m) => s.collect_map(m.iter().map(|(k, v)| (k, v.expose()))),
        None => s.serialize_none(),
    }
}

/// What a body asks for, checked: secrets still plain (the gateway seals them) and `None`
/// when the body left them out.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentInput {
    pub name: String,
    pub repo: Option<String>,
    pub setup: SetupSpec,
    pub secrets: Option<BTreeMap<String, Secret>>,
}

impl EnvironmentBody {
    /// The environment this body asks for, validated (fields named as in the body, without
    /// a `setup.` prefix). `route_name` is the name of a `PUT`'s route: the body's name may
    /// be left out there, and must match when given.
    pub fn into_input(self, route_name: Option<&str>) -> Result<EnvironmentInput, ValidationError> {
        let given = self.name.trim();
        let name = match route_name {
            Some(route) if given.is_empty() || given == route => route.to_string(),
            Some(route) => {
                return Err(ValidationError::new(
                    "name",
                    format!(
                        "`{given}` differs from the name in the path (`{route}`); an environment cannot be renamed"
                    ),
                ));
            }
            None if given.is_empty() => {
                return Err(ValidationError::new("name", "is required"));
            }
            None => given.to_string(),
        };
        validate_environment_name(&name)?;
        let repo = self
            .repo
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty());
        if let Some(r) = &repo
            && (r.chars().count() > MAX_REPO_CHARS || r.chars().any(char::is_control))
        {
            return Err(ValidationError::new(
                "repo",
                format!("at most {MAX_REPO_CHARS} characters, no control characters"),
            ));
        }
        let setup = SetupSpec {
            setup_script: self.setup_script,
            maintenance_script: self.maintenance_script,
            env: self.env,
            network: self.network.unwrap_or_default(),
            allow_hosts: self.allow_hosts,
            cache: self.cache.unwrap_or(true),
            cache_paths: self.cache_paths,
            cache_key_files: self.cache_key_files,
        };
        setup.validate("setup").map_err(|e| {
            let field = e
                .field
                .strip_prefix("setup.")
                .unwrap_or(&e.field)
                .to_string();
            ValidationError::new(field, e.reason)
        })?;
        if let Some(secrets) = &self.secrets {
            if secrets.len() > MAX_ENTRIES {
                return Err(ValidationError::new(
                    "secrets",
                    format!("has more than {MAX_ENTRIES} entries"),
                ));
            }
            for (k, v) in secrets {
                validate_var_name("secrets", k)?;
                let v = v.expose();
                if v.len() > MAX_VALUE_BYTES || v.contains('\0') {
                    return Err(ValidationError::new(
                        "secrets",
                        format!("`{k}`: at most {MAX_VALUE_BYTES} bytes, no NUL"),
                    ));
                }
                if setup.env.contains_key(k) {
                    return Err(ValidationError::new(
                        "secrets",
                        format!("`{k}` is in `env` too; give it once"),
                    ));
                }
            }
        }
        Ok(EnvironmentInput {
            name,
            repo,
            setup,
            secrets: self.secrets,
        })
    }
}

/// A saved environment as every read shows it: the definition, the names of its secrets
/// (never their values), its versions and times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentView {
    pub name: String,
    pub repo: Option<String>,
    pub setup_script: String,
    pub maintenance_script: Option<String>,
    pub env: BTreeMap<String, String>,
    pub secret_names: Vec<String>,
    pub network: SetupNetwork,
    pub allow_hosts: Vec<String>,
    pub cache: bool,
    pub cache_paths: Vec<String>,
    pub cache_key_files: Vec<String>,
    pub secrets_version: u64,
    pub cache_generation: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl EnvironmentView {
    pub fn new(r: &EnvironmentRecord) -> Self {
        let s = &r.setup;
        Self {
            name: r.name.clone(),
            repo: r.repo.clone(),
            setup_script: s.setup_script.clone(),
            maintenance_script: s.maintenance_script.clone(),
            env: s.env.clone(),
            secret_names: r.secrets.keys().cloned().collect(),
            network: s.network,
            allow_hosts: s.allow_hosts.clone(),
            cache: s.cache,
            cache_paths: s.cache_paths.clone(),
            cache_key_files: s.cache_key_files.clone(),
            secrets_version: r.secrets_version,
            cache_generation: r.cache_generation,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// `GET /api/environments`: the tenant's environments, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentList {
    pub environments: Vec<EnvironmentView>,
}

/// `POST /api/environments/{name}/reset-cache`: the new generation and how many cached
/// states were removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetCacheAnswer {
    pub name: String,
    pub cache_generation: u64,
    pub removed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Result<EnvironmentBody, crate::InvalidBody> {
        crate::error::from_json(json.as_bytes())
    }

    fn refused(json: &str, route: Option<&str>) -> String {
        body(json).unwrap().into_input(route).unwrap_err().field
    }

    #[test]
    fn a_body_becomes_a_checked_environment() {
        let input = body(
            r#"{"name":"py","repo":" https://x/r.git ","setup_script":"pip install .","env":{"A":"1"},
                "secrets":{"TOKEN_X":"v1"},"network":"on","cache":false}"#,
        )
        .unwrap()
        .into_input(None)
        .unwrap();
        assert_eq!(input.name, "py");
        assert_eq!(input.repo.as_deref(), Some("https://x/r.git"));
        assert!(!input.setup.cache);
        assert!(input.setup.allow_hosts.is_empty());
        assert_eq!(input.secrets.unwrap()["TOKEN_X"].expose(), "v1");
        // Left out: secrets are None (a PUT keeps the stored ones); `{}` is given.
        let b = body(r#"{"setup_script":"x"}"#).unwrap();
        assert_eq!(b.clone().into_input(Some("py")).unwrap().secrets, None);
        assert_eq!(b.into_input(Some("py")).unwrap().name, "py");
        let b = body(r#"{"setup_script":"x","secrets":{}}"#).unwrap();
        assert_eq!(
            b.into_input(Some("py")).unwrap().secrets,
            Some(BTreeMap::new())
        );
    }

    #[test]
    fn bad_bodies_name_their_field() {
        assert_eq!(refused(r#"{"setup_script":"x"}"#, None), "name");
        assert_eq!(
            refused(r#"{"name":"../x","setup_script":"x"}"#, None),
            "name"
        );
        assert_eq!(
            refused(r#"{"name":"other","setup_script":"x"}"#, Some("py")),
            "name"
        );
        assert_eq!(
            refused(r#"{"name":"py","setup_script":" "}"#, None),
            "setup_script"
        );
        assert_eq!(
            refused(
                r#"{"name":"py","setup_script":"x","secrets":{"PATH":"v"}}"#,
                None
            ),
            "secrets"
        );
        assert_eq!(
            refused(
                r#"{"name":"py","setup_script":"x","env":{"A":"1"},"secrets":{"A":"v"}}"#,
                None
            ),
            "secrets"
        );
        assert_eq!(
            refused(
                r#"{"name":"py","setup_script":"x","env":{"LD_PRELOAD":"v"}}"#,
                None
            ),
            "env"
        );
        let long = format!(
            r#"{{"name":"py","setup_script":"{}"}}"#,
            "x".repeat(70 * 1024)
        );
        assert_eq!(refused(&long, None), "setup_script");
        let big = format!(
            r#"{{"name":"py","setup_script":"x","secrets":{{"K":"{}"}}}}"#,
            "x".repeat(MAX_VALUE_BYTES + 1)
        );
        assert_eq!(refused(&big, None), "secrets");
        let repo = format!(
            r#"{{"name":"py","setup_script":"x","repo":"{}"}}"#,
            "r".repeat(MAX_REPO_CHARS + 1)
        );
        assert_eq!(refused(&repo, None), "repo");
        let err = body(r#"{"name":"py","setup_script":"x","nope":1}"#).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(body(r#"{"name":"py","setup_script":"x","network":"maybe"}"#).is_err());
    }

    #[test]
    fn secrets_travel_in_a_body_and_never_in_a_view() {
        let b = body(r#"{"name":"py","setup_script":"x","secrets":{"K":"s3cret"}}"#).unwrap();
        let sent = serde_json::to_string(&b).unwrap();
        assert!(sent.contains(r#""secrets":{"K":"s3cret"}"#), "{sent}");
        assert_eq!(body(&sent).unwrap(), b);
        let input = b.into_input(None).unwrap();
        let mut secrets = BTreeMap::new();
        secrets.insert("K".to_string(), "sealed-value".to_string());
        let rec = EnvironmentRecord {
            tenant: "t".into(),
            name: input.name,
            repo: None,
            setup: input.setup,
            secrets,
            secrets_version: 1,
            cache_generation: 0,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        let shown = serde_json::to_string(&EnvironmentView::new(&rec)).unwrap();
        assert!(shown.contains(r#""secret_names":["K"]"#), "{shown}");
        assert!(!shown.contains("sealed-value") && !shown.contains("s3cret"));
    }
}
