//! A task: what the user asked for (`TaskSpec`), the states it moves through (`TaskStatus`),
//! and what the store keeps of it (`TaskRecord`).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ValidationError;
use crate::summary::AgentSummary;

/// A task's id; it is also its Temporal workflow id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(String);

impl TaskId {
    const PREFIX: &'static str = "tsk_";

    /// A fresh id, time-ordered (UUIDv7) so ids sort roughly by submission.
    pub fn generate() -> Self {
        Self(format!("{}{}", Self::PREFIX, uuid::Uuid::now_v7().simple()))
    }

    /// The id a submission with this idempotency key always gets: the same key from the same
    /// tenant maps to the same task, whichever gateway or Kafka consumer sees it first.
    pub fn from_idempotency_key(tenant: &str, key: &str) -> Self {
        let mut h = Sha256::new();
        h.update(tenant.as_bytes());
        h.update([0]);
        h.update(key.as_bytes());
        let digest = hex::encode(h.finalize());
        Self(format!("{}{}", Self::PREFIX, &digest[..32]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TaskId {
    type Err = ValidationError;

    /// Parses an id from a URL or CLI argument. Only the characters ids are made of are
    /// accepted, so an id is always safe inside an object key or a file name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(ValidationError::new(
                "task_id",
                format!("`{s}` is not a task id (letters, digits, `_` and `-`, at most 128)"),
            ))
        }
    }
}

/// The blueprint's states. A task moves forward through them and ends in one of the last three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    Pending,
    Queued,
    DownloadingCode,
    StagingCode,
    PreparingEnvironment,
    RunningAgent,
    UploadingResults,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 10] = [
        Self::Pending,
        Self::Queued,
        Self::DownloadingCode,
        Self::StagingCode,
        Self::PreparingEnvironment,
        Self::RunningAgent,
        Self::UploadingResults,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Queued => "QUEUED",
            Self::DownloadingCode => "DOWNLOADING_CODE",
            Self::StagingCode => "STAGING_CODE",
            Self::PreparingEnvironment => "PREPARING_ENVIRONMENT",
            Self::RunningAgent => "RUNNING_AGENT",
            Self::UploadingResults => "UPLOADING_RESULTS",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Position in the forward order; terminal states share the last rank.
    fn rank(self) -> u8 {
        match self {
            Self::Pending => 0,
            Self::Queued => 1,
            Self::DownloadingCode => 2,
            Self::StagingCode => 3,
            Self::PreparingEnvironment => 4,
            Self::RunningAgent => 5,
            Self::UploadingResults => 6,
            Self::Completed | Self::Failed | Self::Cancelled => 7,
        }
    }

    /// Whether a record in `self` may move to `next` within one attempt: forward moves
    /// only, any non-terminal state may end, and an ended attempt stays ended. The one way
    /// back is a new attempt ([`TaskStatus::can_begin_attempt`]), so a late or repeated
    /// write of an old step can never reopen a finished task.
    pub fn can_move_to(self, next: TaskStatus) -> bool {
        if self.is_terminal() {
            return false;
        }
        next.is_terminal() || next.rank() > self.rank()
    }

    /// Whether a new attempt may begin from `self`. A retry through patchflow (which
    /// records QUEUED first) starts from an ended task; a reset done by hand in Temporal
    /// may also replace a run still in flight, which the store then closes.
    pub fn can_begin_attempt(self, first: TaskStatus) -> bool {
        self != Self::Pending && first != Self::Pending
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                ValidationError::new(
                    "status",
                    format!(
                        "unknown status `{s}` (one of {})",
                        Self::ALL.map(|s| s.as_str()).join(", ")
                    ),
                )
            })
    }
}

/// Where the code comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskSource {
    /// A git repository; `git_ref` is a branch, tag or commit (default: the remote's HEAD).
    Git {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        git_ref: Option<String>,
        /// The credential for this repository (a token; `git_token` in a submission),
        /// sealed by the gateway before anything stores or sends it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        git_token: Option<GitToken>,
    },
    /// A ZIP archive already uploaded to the object store under `key`.
    Archive { key: String },
}

/// A task's git credential. Plain only between the door that received it and the
/// gateway's submit, which seals it ([`Self::Sealed`]: AEAD ciphertext bound to the task id,
/// base64) before the task is stored or its workflow started; a plain one refuses to be
/// serialized, so it can reach neither the database nor Temporal's history by mistake.
#[derive(Clone, PartialEq, Eq)]
pub enum GitToken {
    Plain(crate::Secret),
    Sealed(String),
}

impl std::fmt::Debug for GitToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain(_) => "GitToken::Plain(***)",
            Self::Sealed(_) => "GitToken::Sealed(***)",
        })
    }
}

impl Serialize for GitToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Sealed(sealed) => s.serialize_str(sealed),
            Self::Plain(_) => Err(serde::ser::Error::custom(
                "a git_token must be sealed before the task is stored or sent",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for GitToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::Sealed)
    }
}

impl TaskSource {
    /// A short human name of the source, for lists and logs.
    pub fn display_name(&self) -> String {
        match self {
            Self::Git { url, git_ref, .. } => match git_ref {
                Some(r) => format!("{url}@{r}"),
                None => url.clone(),
            },
            Self::Archive { .. } => "uploaded zip".to_string(),
        }
    }
}

/// Worker environment variables a task's policy may name as secrets.
pub const SECRET_ENV_PREFIX: &str = "PATCHFLOW_SECRET_";

/// What a task's tools may reach beyond the workspace. The default reaches nothing: shell
/// commands run without network, `call_api` is refused for every host.
///
/// ```json
/// {"network": false,
///  "allow_hosts": ["api.example.com", "127.0.0.1:8080"],
///  "secrets": [{"host": "api.example.com", "header": "Authorization", "env": "PATCHFLOW_SECRET_EXAMPLE"}]}
/// ```
///
/// A secret is named, never given: the agent's host reads the environment variable `env`
/// of its own process and adds the header to requests to `host`, so the value is never in
/// the spec, the model's context or the transcript. Only variables named
/// `PATCHFLOW_SECRET_*` can be named: the operator decides which of the worker's secrets
/// tasks may use, so a task can never ask for the worker's own credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolPolicy {
    /// Shell commands may open network sockets.
    pub network: bool,
    /// Hosts `call_api` may reach: `name` (any port) or `name:port`.
    pub allow_hosts: Vec<String>,
    /// Headers the host injects from its own environment.
    pub secrets: Vec<SecretHeader>,
}

/// One secret header of a [`ToolPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretHeader {
    /// The allowed host whose requests get the header.
    pub host: String,
    /// The header's name, e.g. `Authorization`.
    pub header: String,
    /// The environment variable holding the value.
    pub env: String,
}

impl ToolPolicy {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        for h in &self.allow_hosts {
            if h.is_empty()
                || h.len() > 253
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
            {
                return Err(ValidationError::new(
                    "policy.allow_hosts",
                    format!("`{h}` is not a host or host:port"),
                ));
            }
        }
        for s in &self.secrets {
            if !self.allow_hosts.contains(&s.host) {
                return Err(ValidationError::new(
                    "policy.secrets",
                    format!("host `{}` is not in allow_hosts", s.host),
                ));
            }
            if s.header.is_empty()
                || !s
                    .header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(ValidationError::new(
                    "policy.secrets",
                    format!("`{}` is not a header name", s.header),
                ));
            }
            if !s.env.starts_with(SECRET_ENV_PREFIX) || s.env.len() == SECRET_ENV_PREFIX.len() {
                return Err(ValidationError::new(
                    "policy.secrets",
                    format!(
                        "`{}` is not a task secret: name a variable starting with {SECRET_ENV_PREFIX} \
                         (the operator sets those on the workers)",
                        s.env
                    ),
                ));
            }
            if s.env.is_empty()
                || !s
                    .env
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(ValidationError::new(
                    "policy.secrets",
                    format!(
                        "`{}` is not an environment variable name (A-Z, 0-9, _)",
                        s.env
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Budgets for one agent run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    pub max_steps: u32,
    pub max_tokens: u64,
    pub wall_seconds: u64,
    /// Most the run may spend on the model, priced from the model table (outcome
    /// `max_cost` when reached); unset: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<Usd>,
}

/// An amount of US dollars: finite and not negative once validated. Compared by value, so
/// specs holding one stay `Eq`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Usd(pub f64);

impl PartialEq for Usd {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0).is_eq()
    }
}

impl Eq for Usd {}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_steps: 30,
            max_tokens: 200_000,
            wall_seconds: 1800,
            max_cost_usd: None,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !(1..=1000).contains(&self.max_steps) {
            return Err(ValidationError::new(
                "limits.max_steps",
                "must be between 1 and 1000",
            ));
        }
        if !(1_000..=100_000_000).contains(&self.max_tokens) {
            return Err(ValidationError::new(
                "limits.max_tokens",
                "must be between 1000 and 100000000",
            ));
        }
        if !(5..=7 * 24 * 3600).contains(&self.wall_seconds) {
            return Err(ValidationError::new(
                "limits.wall_seconds",
                "must be between 5 and 604800 (a week)",
            ));
        }
        if let Some(Usd(c)) = self.max_cost_usd
            && !(c.is_finite() && c > 0.0 && c <= 1_000_000.0)
        {
            return Err(ValidationError::new(
                "limits.max_cost_usd",
                "must be a number of dollars above 0 and at most 1000000",
            ));
        }
        Ok(())
    }
}

/// What a user asks for. Secrets live here only sealed ([`GitToken::Sealed`]: `git_token`,
/// `github_token`), so a spec can be stored, logged and shown freely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub source: TaskSource,
    pub task_description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    /// Open a pull (merge) request with the diff when the agent succeeds.
    #[serde(default)]
    pub open_pr: bool,
    /// The branch the pull request merges into (default: `git_ref`, else the
    /// repository's default branch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_base: Option<String>,
    /// The branch the work is pushed to (default `patchflow/<task_id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_branch: Option<String>,
    #[serde(default)]
    pub pr_draft: bool,
    /// The forge token that pushes and opens the pull request, sealed like `git_token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_token: Option<GitToken>,
    /// The blueprint's older name of `pr_branch` (used when `pr_branch` is not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_name: Option<String>,
    /// The forge issue a task was started from (the resolver), commented on when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issue: Option<IssueRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// What the tools may reach beyond the workspace (default: nothing).
    #[serde(default, skip_serializing_if = "ToolPolicy::is_default")]
    pub policy: ToolPolicy,
    /// How the repository is set up before the agent runs (inline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<crate::environment::SetupSpec>,
    /// A saved environment of the tenant's, by name (instead of `setup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// Agents run at once on the same staged code (best-of-N), 1 to 8.
    #[serde(default = "one_candidate", skip_serializing_if = "is_one_candidate")]
    pub candidates: u32,
    /// How a best-of-N task picks its candidate by itself (none: the user selects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_select: Option<crate::AutoSelect>,
}

fn one_candidate() -> u32 {
    1
}

fn is_one_candidate(n: &u32) -> bool {
    *n == 1
}

pub fn default_tenant() -> String {
    "default".to_string()
}

/// Longest task description accepted (64 KiB): a prompt, not a document dump.
pub const MAX_DESCRIPTION_BYTES: usize = 64 * 1024;

impl TaskSpec {
    /// A spec with defaults around a source and a description.
    pub fn new(source: TaskSource, task_description: impl Into<String>) -> Self {
        Self {
            source,
            task_description: task_description.into(),
            target_file: None,
            model: None,
            limits: Limits::default(),
            open_pr: false,
            pr_base: None,
            pr_branch: None,
            pr_draft: false,
            github_token: None,
            branch_name: None,
            issue: None,
            idempotency_key: None,
            tenant: default_tenant(),
            batch_id: None,
            policy: ToolPolicy::default(),
            setup: None,
            environment: None,
            candidates: 1,
            auto_select: None,
        }
    }

    /// Checks everything that does not need I/O. `allow_local` permits `file://` URLs and
    /// plain paths as git sources (tests, the demo); production gateways refuse them.
    pub fn validate(&self, allow_local: bool) -> Result<(), ValidationError> {
        let desc = self.task_description.trim();
        if desc.is_empty() {
            return Err(ValidationError::new(
                "task_description",
                "is required and must not be blank",
            ));
        }
        if self.task_description.len() > MAX_DESCRIPTION_BYTES {
            return Err(ValidationError::new(
                "task_description",
                format!("is longer than {MAX_DESCRIPTION_BYTES} bytes"),
            ));
        }
        self.source.validate(allow_local)?;
        if let Some(t) = &self.target_file {
            validate_relative_path("target_file", t)?;
        }
        if let Some(m) = &self.model
            && (m.is_empty() || m.len() > 200)
        {
            return Err(ValidationError::new("model", "must be 1 to 200 characters"));
        }
        if self.open_pr && !matches!(self.source, TaskSource::Git { .. }) {
            return Err(ValidationError::new(
                "open_pr",
                "a pull request needs a git_url to push to (not a ZIP upload)",
            ));
        }
        for (field, branch) in [
            ("pr_base", &self.pr_base),
            ("pr_branch", &self.pr_branch),
            ("branch_name", &self.branch_name),
        ] {
            if let Some(b) = branch
                && !is_branch_name(b)
            {
                return Err(ValidationError::new(
                    field,
                    "must be a branch name: letters, digits, `-`, `_`, `.` and `/`, no `..`, \
                     at most 200 characters",
                ));
            }
        }
        if self.tenant.is_empty()
            || self.tenant.len() > 64
            || !self
                .tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(ValidationError::new(
                "tenant",
                "must be 1 to 64 letters, digits, `.`, `_` or `-`",
            ));
        }
        if let Some(k) = &self.idempotency_key
            && (k.is_empty() || k.len() > 256)
        {
            return Err(ValidationError::new(
                "idempotency_key",
                "must be 1 to 256 characters",
            ));
        }
        if let Some(setup) = &self.setup {
            if self.environment.is_some() {
                return Err(ValidationError::new(
                    "setup",
                    "give `setup` or `environment`, not both",
                ));
            }
            setup.validate("setup")?;
        }
        if let Some(name) = &self.environment {
            crate::environment::validate_environment_name(name)
                .map_err(|e| ValidationError::new("environment", e.reason))?;
        }
        if !(1..=crate::conversation::MAX_CANDIDATES).contains(&self.candidates) {
            return Err(ValidationError::new(
                "candidates",
                format!(
                    "must be between 1 and {}",
                    crate::conversation::MAX_CANDIDATES
                ),
            ));
        }
        if self.auto_select.is_some() && self.candidates < 2 {
            return Err(ValidationError::new(
                "auto_select",
                "chooses among candidates: set candidates to 2 or more",
            ));
        }
        self.policy.validate()?;
        self.limits.validate()
    }
}

impl TaskSource {
    /// Checks the source as a submission is checked; workers check it again, since a
    /// workflow can be started in Temporal without passing a gateway.
    pub fn validate(&self, allow_local: bool) -> Result<(), ValidationError> {
        match self {
            TaskSource::Git { url, git_ref, .. } => {
                validate_git_url(url, allow_local)?;
                if let Some(r) = git_ref {
                    validate_git_ref(r)?;
                }
            }
            TaskSource::Archive { key } => {
                if key.is_empty() || key.contains("..") {
                    return Err(ValidationError::new("source", "invalid archive key"));
                }
            }
        }
        Ok(())
    }
}

/// Schemes a remote git source may use.
const REMOTE_SCHEMES: [&str; 4] = ["https://", "http://", "ssh://", "git://"];

fn validate_git_url(url: &str, allow_local: bool) -> Result<(), ValidationError> {
    if url.trim().is_empty() {
        return Err(ValidationError::new("git_url", "is empty"));
    }
    if url.starts_with('-') || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ValidationError::new(
            "git_url",
            format!("`{url}` is not a valid repository URL"),
        ));
    }
    if let Some(scheme) = REMOTE_SCHEMES.iter().find(|s| url.starts_with(**s)) {
        let rest = &url[scheme.len()..];
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        // `ssh://git@host` names a login, not a secret; anything else before `@` (a
        // password, a token as the user name) would be stored and shown with the task.
        if let Some((user_info, _)) = authority.rsplit_once('@')
            && (*scheme != "ssh://" || user_info.contains(':'))
        {
            return Err(ValidationError::new(
                "git_url",
                "must not carry credentials (`user:password@` or a token before `@`): they \
                 would be stored and shown with the task; give the token as `git_token`, \
                 which is sealed and never stored or shown in plain text",
            ));
        }
        return Ok(());
    }
    // scp-like `git@host:owner/repo.git`
    if let Some((user_host, path)) = url.split_once(':')
        && user_host.contains('@')
        && !user_host.contains('/')
        && !path.is_empty()
    {
        return Ok(());
    }
    let local = url.starts_with("file://") || url.starts_with('/') || url.starts_with('.');
    if local {
        if allow_local {
            return Ok(());
        }
        return Err(ValidationError::new(
            "git_url",
            format!(
                "local repositories (`{url}`) are not allowed by this server (allow_local_sources is off)"
            ),
        ));
    }
    Err(ValidationError::new(
        "git_url",
        format!(
            "`{url}` is not a supported repository URL (https, http, ssh, git or user@host:path)"
        ),
    ))
}

fn validate_git_ref(r: &str) -> Result<(), ValidationError> {
    let ok = !r.is_empty()
        && r.len() <= 256
        && !r.starts_with('-')
        && !r.contains("..")
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "git_ref",
            format!("`{r}` is not a valid branch, tag or commit"),
        ))
    }
}

/// A path that must stay inside the repository: relative, no `..`, no NUL.
pub fn validate_relative_path(field: &str, p: &str) -> Result<(), ValidationError> {
    let bad = p.is_empty()
        || p.starts_with('/')
        || p.contains('\0')
        || p.split(['/', '\\']).any(|c| c == "..");
    if bad {
        return Err(ValidationError::new(
            field,
            format!("`{p}` must be a relative path inside the repository"),
        ));
    }
    Ok(())
}

/// Whether `b` is a branch name patchflow will push to or name: conservative (a subset
/// of what git allows), so it can go into a ref, a URL query and an API body safely.
pub fn is_branch_name(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 200
        && !b.starts_with(['-', '/', '.'])
        && !b.ends_with(['/', '.'])
        && !b.contains("..")
        && !b.contains("//")
        && !b.ends_with(".lock")
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c))
}

/// A forge issue: the repository's web URL and the issue's number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueRef {
    /// The repository's git URL (the task's source).
    pub repo_url: String,
    pub number: u64,
}

/// What the task store keeps of a task, and what `GET /api/tasks/{task_id}` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub task_id: TaskId,
    pub status: TaskStatus,
    pub message: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub pr_url: Option<String>,
    /// Why the pull request asked for (`open_pr`) could not be opened, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_error: Option<String>,
    pub summary: Option<AgentSummary>,
    pub tenant: String,
    pub batch_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub spec: TaskSpec,
    /// The current attempt: 1, then one more for each retry or reset.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// Every attempt, oldest first, each with its outcome.
    #[serde(default)]
    pub attempts: Vec<TaskAttempt>,
    /// The conversation's turns once a follow-up was sent (empty: the task's one turn).
    #[serde(default)]
    pub turns: Vec<crate::TurnRecord>,
    /// A best-of-N task's candidates (empty for a task with one agent).
    #[serde(default)]
    pub candidates: Vec<crate::CandidateRecord>,
    /// The candidate whose results are the task's.
    #[serde(default)]
    pub selected: Option<u32>,
}

fn first_attempt() -> u32 {
    1
}

/// One run of a task's workflow: the first submission, a retry, or a reset done in the
/// Temporal Web UI or CLI. `status`/`message` are the attempt's latest (its outcome once
/// `finished_at` is set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskAttempt {
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub status: TaskStatus,
    pub message: String,
    /// The Temporal run that carries it, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The worker that ran its agent (`patchflow@host:pid`), once one started it; the last
    /// one when a crash moved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_may_name_only_task_secrets() {
        let mut s = spec("https://git.example/r.git");
        s.policy.allow_hosts = vec!["api.example.com".into()];
        s.policy.secrets = vec![SecretHeader {
            host: "api.example.com".into(),
            header: "Authorization".into(),
            env: "AWS_SECRET_ACCESS_KEY".into(),
        }];
        let e = s.validate(false).unwrap_err().to_string();
        assert!(
            e.contains("AWS_SECRET_ACCESS_KEY") && e.contains("PATCHFLOW_SECRET_"),
            "{e}"
        );
        s.policy.secrets[0].env = "PATCHFLOW_SECRET_".into();
        assert!(s.validate(false).is_err(), "a bare prefix names nothing");
        s.policy.secrets[0].env = "PATCHFLOW_SECRET_API".into();
        s.validate(false).unwrap();
    }

    fn spec(url: &str) -> TaskSpec {
        TaskSpec::new(
            TaskSource::Git {
                url: url.into(),
                git_ref: None,
                git_token: None,
            },
            "fix it",
        )
    }

    #[test]
    fn status_names_are_the_blueprints() {
        let names: Vec<_> = TaskStatus::ALL.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            names,
            [
                "PENDING",
                "QUEUED",
                "DOWNLOADING_CODE",
                "STAGING_CODE",
                "PREPARING_ENVIRONMENT",
                "RUNNING_AGENT",
                "UPLOADING_RESULTS",
                "COMPLETED",
                "FAILED",
                "CANCELLED"
            ]
        );
        for s in TaskStatus::ALL {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
            assert_eq!(s.as_str().parse::<TaskStatus>().unwrap(), s);
        }
        assert!("RUNNING".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn transitions_go_forward_or_end() {
        use TaskStatus::*;
        assert!(Pending.can_move_to(Queued));
        assert!(Queued.can_move_to(DownloadingCode));
        assert!(RunningAgent.can_move_to(Cancelled));
        assert!(StagingCode.can_move_to(PreparingEnvironment));
        assert!(PreparingEnvironment.can_move_to(RunningAgent));
        assert!(
            StagingCode.can_move_to(RunningAgent),
            "without setup the step is skipped"
        );
        assert!(!RunningAgent.can_move_to(PreparingEnvironment));
        assert!(!RunningAgent.can_move_to(Queued));
        assert!(!Completed.can_move_to(Failed));
        // Back only through a new attempt.
        assert!(!Failed.can_move_to(Queued));
        assert!(!Failed.can_move_to(DownloadingCode));
        assert!(Failed.can_begin_attempt(Queued));
        assert!(Cancelled.can_begin_attempt(RunningAgent));
        assert!(!Pending.can_begin_attempt(Queued));
    }

    #[test]
    fn idempotency_key_maps_to_one_id_per_tenant() {
        let a = TaskId::from_idempotency_key("t1", "k");
        assert_eq!(a, TaskId::from_idempotency_key("t1", "k"));
        assert_ne!(a, TaskId::from_idempotency_key("t2", "k"));
        assert!(a.as_str().parse::<TaskId>().is_ok());
        assert!("../x".parse::<TaskId>().is_err());
    }

    #[test]
    fn validation_names_the_field() {
        assert!(spec("https://github.com/o/r.git").validate(false).is_ok());
        assert!(spec("git@github.com:o/r.git").validate(false).is_ok());
        assert!(spec("ssh://git@github.com/o/r.git").validate(false).is_ok());
        for leaky in [
            "https://user:hunter2@github.com/o/r.git",
            "https://ghp_secret@github.com/o/r.git",
            "http://a:b@127.0.0.1/r.git",
            "ssh://git:hunter2@github.com/o/r.git",
        ] {
            let e = spec(leaky).validate(false).unwrap_err();
            assert_eq!(e.field, "git_url", "{leaky}");
            assert!(e.reason.contains("credentials"), "{e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        // An `@` in the path is not user info.
        assert!(
            spec("https://git.example/o/r@v2.git")
                .validate(false)
                .is_ok()
        );
        let e = spec("file:///tmp/r").validate(false).unwrap_err();
        assert_eq!(e.field, "git_url");
        assert!(e.reason.contains("not allowed"));
        assert!(spec("file:///tmp/r").validate(true).is_ok());
        assert_eq!(spec("ftp://x").validate(true).unwrap_err().field, "git_url");
        assert_eq!(
            spec("--upload-pack=x").validate(true).unwrap_err().field,
            "git_url"
        );
        let mut s = spec("https://x/y");
        s.task_description = "  ".into();
        assert_eq!(s.validate(false).unwrap_err().field, "task_description");
        let mut s = spec("https://x/y");
        s.target_file = Some("../etc/passwd".into());
        assert_eq!(s.validate(false).unwrap_err().field, "target_file");
        let mut s = spec("https://x/y");
        s.limits.max_steps = 0;
        assert_eq!(s.validate(false).unwrap_err().field, "limits.max_steps");
    }
}
