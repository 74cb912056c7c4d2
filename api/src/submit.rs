//! The submit body: `POST /api/tasks` as JSON or as multipart fields, the web page's form,
//! the fields of a Kafka task message and of a batch line, and gRPC's task options once
//! mapped. [`SubmitBody::into_spec`] is the one conversion of all of them into a
//! [`TaskSpec`], so every door accepts and refuses alike. [`StatusAnswer`] is the short
//! answer of submit (and of cancel).

use patchflow_core::{GitToken, Limits, Secret, TaskId, TaskSource, TaskSpec, TaskStatus};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value, json};

use crate::error::InvalidBody;

/// The submit body (the README's names). Unknown fields are refused, so a typo is an
/// error rather than a silently ignored option. (The optional fields carry no
/// `serde(default)`: a missing one is `None` all the same, and a JSON array is refused
/// rather than read by position.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsBody>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub open_pr: bool,
    /// The branch the pull request merges into (default: `git_ref`, else the
    /// repository's default branch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pr_base: Option<String>,
    /// The branch the work is pushed to (default `patchflow/<task_id>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pr_branch: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub pr_draft: bool,
    /// The token that pushes the branch and opens the pull request (GitHub's or GitLab's);
    /// sealed by the gateway like `git_token`, and used by that step only. A client
    /// sending this body sends the value itself (see [`expose_secret`]).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "expose_secret"
    )]
    pub github_token: Option<Secret>,
    /// The credential for a private `git_url` (a token: GitHub's, GitLab's, a forge's
    /// PAT), sent as HTTP Basic auth by the fetch; sealed by the gateway, never stored or
    /// shown in plain text. Credentials in the URL itself are refused.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "expose_secret"
    )]
    pub git_token: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// How the repository is set up before the agent runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup: Option<patchflow_core::environment::SetupSpec>,
    /// A saved environment of the tenant's, by name (instead of `setup`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// Best-of-N: how many agents race on the same code (1 to 8; the tenant's quota may
    /// cap it lower).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidates: Option<u32>,
    /// How a best-of-N task picks its candidate unasked (`first_finished`,
    /// `smallest_passing`); without it, `POST /api/tasks/{id}/select` does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_select: Option<patchflow_core::AutoSelect>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A [`Secret`] serializes as `***` everywhere else; a submit body is the one place it
/// must travel, from the client that holds it to the gateway that keeps it off the record.
fn expose_secret<S: Serializer>(secret: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(v) => s.serialize_some(v.expose()),
        None => s.serialize_none(),
    }
}

/// The budgets as a client gives them: each one optional, the missing ones the defaults
/// of [`Limits`]. Named `Limits` on the wire so serde's messages read as they always did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename = "Limits")]
pub struct LimitsBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_seconds: Option<u64>,
    /// Most the run may spend on the model, in US dollars (unset: no cap). Checked by
    /// [`Limits::validate`]; what JSON cannot read as a number (a string, `1e400`) is
    /// refused here, naming the field.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "dollars"
    )]
    pub max_cost_usd: Option<f64>,
}

/// The message of a `max_cost_usd` that is not a usable amount.
pub const MAX_COST_USD_RULE: &str =
    "limits.max_cost_usd: must be a number of dollars above 0 and at most 1000000";

/// `max_cost_usd` as given: a JSON number, or null for none. Anything else (a string, a
/// number too large for a double) is refused with the field named, not serde's bare
/// "expected f64".
fn dollars<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d).map_err(|_| serde::de::Error::custom(MAX_COST_USD_RULE))
}

impl LimitsBody {
    /// The limits meant: what was given, the defaults for the rest.
    pub fn resolve(self) -> Limits {
        let d = Limits::default();
        Limits {
            max_steps: self.max_steps.unwrap_or(d.max_steps),
            max_tokens: self.max_tokens.unwrap_or(d.max_tokens),
            wall_seconds: self.wall_seconds.unwrap_or(d.wall_seconds),
            max_cost_usd: self.max_cost_usd.map(patchflow_core::Usd),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl From<Limits> for LimitsBody {
    fn from(l: Limits) -> Self {
        Self {
            max_steps: Some(l.max_steps),
            max_tokens: Some(l.max_tokens),
            wall_seconds: Some(l.wall_seconds),
            max_cost_usd: l.max_cost_usd.map(|c| c.0),
        }
    }
}

/// An optional text with blanks meaning "not given".
fn given(o: Option<String>) -> Option<String> {
    o.filter(|s| !s.trim().is_empty())
}

/// Longest `git_token` accepted (forge tokens are under 300 characters).
pub const MAX_GIT_TOKEN_CHARS: usize = 4096;

/// A credential field as given (`git_token`, `github_token`): empty is none; a value must be
/// printable ASCII without spaces, at most [`MAX_GIT_TOKEN_CHARS`]. Plain until sealed.
pub fn secret_token(
    t: Option<Secret>,
    field: &'static str,
) -> Result<Option<GitToken>, InvalidBody> {
    let Some(t) = t else { return Ok(None) };
    let v = t.expose();
    if v.is_empty() {
        return Ok(None);
    }
    if v.len() > MAX_GIT_TOKEN_CHARS {
        return Err(InvalidBody::Token(field, "longer than 4096 characters"));
    }
    if !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidBody::Token(
            field,
            "must be printable ASCII without spaces or line breaks",
        ));
    }
    Ok(Some(GitToken::Plain(t)))
}

impl SubmitBody {
    /// The spec this body asks for. `has_upload` says a ZIP came with it (its key is set
    /// once it is stored). Checks that need no I/O beyond the source are
    /// [`TaskSpec::validate`]'s.
    pub fn into_spec(self, has_upload: bool) -> Result<TaskSpec, InvalidBody> {
        let url = given(self.git_url);
        let source = match (url, has_upload) {
            (Some(_), true) => return Err(InvalidBody::TwoSources),
            (None, true) if self.git_token.is_some() => {
                return Err(InvalidBody::Token("git_token", "only with a git_url"));
            }
            (None, true) => TaskSource::Archive { key: String::new() },
            (Some(url), false) => TaskSource::Git {
                url: url.trim().to_string(),
                git_ref: given(self.git_ref),
                git_token: secret_token(self.git_token, "git_token")?,
            },
            (None, false) => return Err(InvalidBody::NoSource),
        };
        let mut spec = TaskSpec::new(source, self.task_description.unwrap_or_default());
        spec.target_file = given(self.target_file);
        spec.model = given(self.model);
        spec.limits = self.limits.map(LimitsBody::resolve).unwrap_or_default();
        spec.open_pr = self.open_pr;
        spec.pr_base = given(self.pr_base).map(|b| b.trim().to_string());
        spec.pr_branch = given(self.pr_branch).map(|b| b.trim().to_string());
        spec.pr_draft = self.pr_draft;
        spec.github_token = secret_token(self.github_token, "github_token")?;
        spec.branch_name = given(self.branch_name);
        spec.setup = self.setup;
        spec.environment = given(self.environment).map(|e| e.trim().to_string());
        if let Some(t) = given(self.tenant) {
            spec.tenant = t;
        }
        spec.batch_id = given(self.batch_id);
        spec.idempotency_key = given(self.idempotency_key);
        if let Some(n) = self.candidates {
            spec.candidates = n;
        }
        spec.auto_select = self.auto_select;
        Ok(spec)
    }
}

impl SubmitBody {
    /// The body as multipart text fields (a client uploading a ZIP sends these beside its
    /// `zip_file` part); [`FormFields`] reads them back into the same body.
    pub fn to_form_fields(&self) -> Vec<(String, String)> {
        let Ok(Value::Object(fields)) = serde_json::to_value(self) else {
            return Vec::new();
        };
        fields
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect()
    }
}

/// The text fields of a multipart submit (`POST /api/tasks` or the web page's form),
/// gathered one by one and read as a [`SubmitBody`] at the end. A browser form sends every
/// field, so empty number fields mean "not given"; `max_steps`, `max_tokens`,
/// `wall_seconds` and `max_cost_usd` fields go into `limits`, and `open_pr` is a
/// checkbox's word.
#[derive(Debug, Default)]
pub struct FormFields {
    fields: Map<String, Value>,
}

impl FormFields {
    /// Adds one text field as it came.
    pub fn add(&mut self, name: &str, text: &str) -> Result<(), InvalidBody> {
        let value = match name {
            // Read as the typed limits, so a bad field is named (`max_cost_usd: 1e400`).
            "limits" => serde_json::from_str::<LimitsBody>(text)
                .and_then(serde_json::to_value)
                .map_err(|e| InvalidBody::LimitsNotJson(e.to_string()))?,
            "open_pr" => json!(matches!(text.trim(), "true" | "on" | "1" | "yes")),
            "setup" if text.trim().is_empty() => return Ok(()),
            "setup" => serde_json::from_str(text)
                .map_err(|e| InvalidBody::FormFields(format!("setup is not a JSON object: {e}")))?,
            "max_steps" | "max_tokens" | "wall_seconds" | "max_cost_usd" | "git_token"
            | "candidates" | "auto_select"
                if text.trim().is_empty() =>
            {
                return Ok(());
            }
            "max_steps" | "max_tokens" | "wall_seconds" | "max_cost_usd" => {
                let n = if name == "max_cost_usd" {
                    // Rust reads `1e400` as infinity and `NaN` as NaN, which JSON cannot
                    // carry: refused here, not dropped on the way into `limits`.
                    match text.trim().parse::<f64>() {
                        Ok(usd) if usd.is_finite() => json!(usd),
                        _ => return Err(InvalidBody::FormFields(MAX_COST_USD_RULE.into())),
                    }
                } else {
                    let n: u64 = text
                        .trim()
                        .parse()
                        .map_err(|_| InvalidBody::NotANumber(name.to_string()))?;
                    json!(n)
                };
                let limits = self
                    .fields
                    .entry("limits")
                    .or_insert_with(|| Value::Object(Map::new()));
                let Some(limits) = limits.as_object_mut() else {
                    return Err(InvalidBody::FormFields(format!(
                        "field `{name}` cannot go into a `limits` that is not an object"
                    )));
                };
                limits.insert(name.to_string(), n);
                return Ok(());
            }
            "candidates" => json!(
                text.trim()
                    .parse::<u32>()
                    .map_err(|_| InvalidBody::NotANumber(name.to_string()))?
            ),
            "auto_select" => json!(text.trim()),
            _ => json!(text),
        };
        self.fields.insert(name.to_string(), value);
        Ok(())
    }

    /// The body the fields make; unknown or mistyped fields are refused.
    pub fn finish(self) -> Result<SubmitBody, InvalidBody> {
        serde_json::from_value(Value::Object(self.fields))
            .map_err(|e| InvalidBody::FormFields(e.to_string()))
    }
}

/// `{"task_id", "status", "message"}`: how submit answers (202 new, 200 already there),
/// and cancel (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusAnswer {
    pub task_id: TaskId,
    pub status: TaskStatus,
    pub message: String,
}
