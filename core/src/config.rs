//! The one typed configuration. Layers, weakest first: defaults, a TOML file, environment
//! variables, command-line flags. Every setting has a key in the file (`http_addr`), an
//! environment variable (`PATCHFLOW_HTTP_ADDR`) and a flag (`--set http_addr=...`, with the
//! common ones also as named flags). A few well-known variables are honoured too:
//! `TEMPORAL_ADDRESS`, `OPENAI_BASE_URL`, `OPENAI_API_KEY`.
//!
//! Settings are grouped in sections (`config.kube.kube_image`), each key declared once in
//! the `settings!` table below: its type, default and doc. The file stays flat (`kube_image
//! = "..."`, no `[kube]` table), so the keys people already use keep working.

mod models;
mod quota;
mod setting;

use std::path::PathBuf;

use serde::Serialize;

use crate::error::CoreError;
use crate::secret::Secret;

pub use models::{ModelProfile, ModelTable, price};
pub use quota::{TenantQuota, TenantQuotas};
pub use setting::Setting;
use setting::{choice_setting, invalid};

/// Declares every setting once: section by section, `key: Type = default` with its doc.
/// From that one table come the section structs, their defaults, [`Config::KEYS`], the
/// text setter behind env vars and `--set`, the file reader and the text form agents get.
macro_rules! settings {
    ($(
        $(#[doc = $sdoc:literal])*
        $section:ident: $Section:ident {
            $(
                $(#[doc = $doc:literal])*
                $key:ident: $ty:ty = $default:expr,
            )*
        }
    )*) => {
        $(
            $(#[doc = $sdoc])*
            #[derive(Debug, Clone, PartialEq, Serialize)]
            pub struct $Section {
                $($(#[doc = $doc])* pub $key: $ty,)*
            }

            impl Default for $Section {
                fn default() -> Self {
                    Self { $($key: $default,)* }
                }
            }
        )*

        /// Every setting, by section.
        #[derive(Debug, Clone, Default, PartialEq)]
        pub struct Config {
            $(pub $section: $Section,)*
        }

        impl Config {
            /// The sections and their keys, in the order `patchflow config` prints them.
            pub const SECTIONS: &'static [(&'static str, &'static [&'static str])] =
                &[$((stringify!($section), &[$(stringify!($key)),*])),*];

            /// Every key, in the order `patchflow config` prints them.
            pub const KEYS: &'static [&'static str] = &[$($(stringify!($key)),*),*];

            /// Sets one key from its text form. An empty value clears an optional key.
            pub fn set(&mut self, key: &str, value: &str) -> Result<(), CoreError> {
                match key {
                    $($(stringify!($key) => self.$section.$key = Setting::parse_text(key, value)?,)*)*
                    other => return Err(CoreError::UnknownSetting(other.to_string())),
                }
                Ok(())
            }

            /// The text form of one key's value (what `set` reads back); `None` when the
            /// key is unknown or an optional value is unset. Secrets come out in plain
            /// text: this is for a child process's environment, never for showing.
            pub fn text(&self, key: &str) -> Option<String> {
                match key {
                    $($(stringify!($key) => Setting::to_text(&self.$section.$key),)*)*
                    _ => None,
                }
            }

            fn set_from_file(&mut self, key: &str, value: toml::Value) -> Result<(), CoreError> {
                match key {
                    $($(stringify!($key) => self.$section.$key = file_value(key, value)?,)*)*
                    other => {
                        return Err(CoreError::ConfigFile(format!("unknown field `{other}`")));
                    }
                }
                Ok(())
            }

            fn section_tables(&self) -> Vec<(&'static str, Result<String, toml::ser::Error>)> {
                vec![$((stringify!($section), toml::to_string(&self.$section))),*]
            }
        }
    };
}

/// One value of the file, typed as its key wants it.
fn file_value<T: serde::de::DeserializeOwned>(
    key: &str,
    value: toml::Value,
) -> Result<T, CoreError> {
    value
        .try_into()
        .map_err(|e: toml::de::Error| CoreError::ConfigFile(format!("{key}: {}", e.message())))
}

choice_setting! {
    /// The provider API the agent speaks.
    WireApi {
        /// Chat Completions (`POST {base}/chat/completions`).
        Chat = "chat",
        /// The Responses API (`POST {base}/responses`).
        Responses = "responses",
    }
}

choice_setting! {
    /// Which agent runner the worker uses.
    Runner {
        /// A sandboxed child process on the worker.
        Local = "local",
        /// A Kubernetes Job per attempt (needs an S3-compatible store).
        Kube = "kube",
    }
}

choice_setting! {
    /// How a worker sizes its agent slots.
    WorkerTunerKind {
        /// A fixed number: `worker_max_agents`.
        Fixed = "fixed",
        /// Temporal's resource-based tuner, up to `worker_max_agents`.
        Resource = "resource",
    }
}

choice_setting! {
    /// How strictly shell commands are confined.
    SandboxMode {
        /// Refuse to run a command unless every layer is in force.
        Strict = "strict",
        /// Run with what the kernel offers and warn about what is missing.
        BestEffort = "best-effort",
    }
}

choice_setting! {
    /// The form of log lines.
    LogFormat {
        Text = "text",
        Json = "json",
    }
}

choice_setting! {
    /// How the gateway knows who is asking.
    AuthMode {
        /// Opaque API tokens (`pf_…`), stored as hashes in the task store.
        Tokens = "tokens",
        /// Bearer JWTs from an OIDC provider.
        Jwt = "jwt",
        /// Nobody is asked (refused unless every listening address is loopback).
        None = "none",
    }
}

choice_setting! {
    /// Where `web_search_doc_and_reference` looks.
    DocSearchProvider {
        /// Offline: the repository's own documentation.
        Workspace = "workspace",
        /// The HTTP endpoint in `doc_search_url`.
        Http = "http",
    }
}

settings! {
    /// The gateway's doors, the data directory, logs, and what a submission may be.
    server: ServerSettings {
        /// HTTP API and web page address.
        http_addr: String = "127.0.0.1:8787".into(),
        /// gRPC API address.
        grpc_addr: String = "127.0.0.1:8788".into(),
        /// Where the process serves Prometheus metrics (`GET /metrics`); `off` serves none.
        metrics_addr: String = "127.0.0.1:9898".into(),
        /// Label tasks submitted and finished and the model cost by tenant too
        /// (`tenant="…"`); off by default, since every tenant is then a series of its own.
        metrics_tenant_labels: bool = false,
        /// Where every process sends its traces: an OTLP/HTTP collector's base URL
        /// (`http://otel-collector:4318`; `/v1/traces` is added) or its full traces URL.
        /// Unset, nothing is traced.
        otlp_endpoint: Option<String> = None,
        /// `tokens` (default: `Authorization: Bearer pf_…` on every API call), `jwt`, or
        /// `none` (only when every listening address is loopback).
        auth: AuthMode = AuthMode::Tokens,
        /// With `auth = "jwt"`: the provider's JWKS URL (https, or http on loopback), whose
        /// keys sign the bearer JWTs.
        auth_jwt_jwks_url: Option<String> = None,
        /// With `auth = "jwt"`: the `iss` a token must carry.
        auth_jwt_issuer: Option<String> = None,
        /// With `auth = "jwt"`: the `aud` a token must carry.
        auth_jwt_audience: Option<String> = None,
        /// The claim naming a JWT's tenant (a top-level name, or a dotted path such as
        /// `org.tenant`).
        auth_jwt_tenant_claim: String = "tenant".into(),
        /// The claim naming a JWT's role: a string or a list; the most privileged of
        /// `admin`, `member`, `viewer` in it counts, and none of them means `viewer`.
        auth_jwt_role_claim: String = "role".into(),
        /// The token client commands send (`--token`); unset: `<data_dir>/admin.token`
        /// when it is readable (one machine).
        token: Option<Secret> = None,
        /// Where the embedded defaults keep their files: task database, object store,
        /// workspaces, the dev server's database.
        data_dir: PathBuf = PathBuf::from(".patchflow"),
        /// Where a worker fetches trees and runs local agents' workspaces: scratch, each
        /// task's deleted when its step ends; unset: `<data_dir>/work`. A tmpfs here (on
        /// Kubernetes an `emptyDir` with `medium: Memory`) takes the per-task file churn off
        /// the disk; size it for `worker_max_agents` trees of `max_unpacked_bytes`.
        work_dir: Option<PathBuf> = None,
        /// `text` or `json`.
        log_format: LogFormat = LogFormat::Text,
        /// Submissions a tenant may burst (token bucket capacity); 0 turns the limit off.
        submit_rate_capacity: u32 = 60,
        /// Submissions per second a tenant's bucket refills.
        submit_rate_per_sec: f64 = 5.0,
        /// Accept `file://` URLs and local paths as git sources (tests, the demo).
        allow_local_sources: bool = false,
        /// Schemes a remote `git_url` may use, comma-separated: `https` (default), `http`,
        /// `ssh`, `git`.
        git_allowed_protocols: String = "https".into(),
        /// Git hosts (`host` or `host:port`, comma-separated) whose addresses are not
        /// checked: without an entry, a host that resolves to a loopback, private,
        /// link-local or other non-public address is refused before git runs.
        git_allowed_hosts: String = String::new(),
        /// Longest a git fetch may take, in seconds, before it is stopped (and retried as a
        /// transient failure). What it downloads is bounded by `max_unpacked_bytes`.
        git_fetch_timeout_secs: u64 = 600,
        /// The key (32 bytes, base64) task credentials (`git_token`) are sealed with, the
        /// same on every gateway and worker; unset: one generated into
        /// `<data_dir>/secrets.key` (one machine).
        secrets_key: Option<Secret> = None,
        /// Largest upload (ZIP) accepted by the gateway, in bytes.
        max_upload_bytes: u64 = 100 * 1024 * 1024,
        /// Largest unpacked size of a ZIP or repository, in bytes.
        max_unpacked_bytes: u64 = 1024 * 1024 * 1024,
        /// Most entries a ZIP may hold.
        max_archive_entries: u64 = 100_000,
    }
    /// Task store, object store and cache.
    store: StoreSettings {
        /// Task store; default `sqlite://<data_dir>/patchflow.db`.
        database_url: Option<String> = None,
        /// Object store; default `file://<data_dir>/objects`, or
        /// `s3://BUCKET[/PREFIX]?endpoint=URL&region=R&path_style=true` (S3, COS, MinIO).
        object_store_url: Option<String> = None,
        /// Redis for the status cache, idempotency keys, rate limits and live events
        /// (`redis://HOST:PORT/DB`); unset: in-process, one machine.
        redis_url: Option<String> = None,
        /// Prefix of every Redis key, so several stacks can share one Redis.
        redis_prefix: String = "patchflow".into(),
        /// How long a status read may be served from the cache (seconds).
        status_cache_ttl_secs: u64 = 10,
        /// How long an idempotency key is remembered in the cache (the database keeps it for good).
        idempotency_ttl_secs: u64 = 24 * 3600,
        /// Lifetime of presigned URLs to result files (seconds).
        presign_expiry_secs: u64 = 3600,
    }
    /// The Temporal frontend and how activities are retried.
    temporal: TemporalSettings {
        /// An external Temporal frontend (`host:port` or URL). Unset: `up` starts the dev server.
        temporal_address: Option<String> = None,
        temporal_namespace: String = "default".into(),
        task_queue: String = "patchflow".into(),
        /// Ports of the embedded dev server.
        temporal_port: u16 = 7233,
        temporal_ui_port: u16 = 8233,
        /// The `temporal` CLI used for the embedded dev server.
        temporal_cli: String = "temporal".into(),
        /// Where people open the Temporal Web UI; known by itself for the embedded server.
        temporal_ui_url: Option<String> = None,
        /// How many attempts each activity gets before the task fails.
        activity_max_attempts: u32 = 3,
        /// How long a running agent may go without a heartbeat before Temporal retries it on
        /// another worker (seconds).
        heartbeat_timeout_secs: u64 = 10,
        /// First retry interval of a failed activity (milliseconds; doubles each time).
        retry_initial_interval_ms: u64 = 1000,
        /// How long an ended task's workflow stays open for follow-up messages (hours,
        /// fractions allowed); then it completes, and a later message starts a
        /// continuation from the stored results. 0: it closes at once.
        followup_idle_hours: f64 = 24.0,
        /// A conversation's workflow continues as new once its history holds this many
        /// events (or when Temporal suggests it), carrying its turns over.
        continue_as_new_events: u32 = 4000,
        /// How long a stopping worker (SIGTERM) lets its running agents finish after it stops
        /// taking work (seconds); then it cancels the rest with a retryable error, so another
        /// worker runs them again. A second signal stops it at once.
        drain_timeout_secs: u64 = 600,
        /// Most agents one worker runs at once, through Temporal's slots on the agents' own
        /// task queue (`<task_queue>-agents`), so a task beyond it waits in Temporal for any
        /// worker with a free slot and fetch, stage and publish never wait behind agents.
        /// 0: from the machine (local runner: 4 per CPU, at most one per 256 MiB of memory;
        /// kube runner: 64, the agents running in their own pods).
        worker_max_agents: u32 = 0,
        /// How the agents' slots are sized: `fixed` (worker_max_agents) or `resource`
        /// (Temporal's resource-based tuner: more slots while the machine's memory and CPU
        /// stay below worker_target_memory and worker_target_cpu, at most worker_max_agents).
        worker_tuner: WorkerTunerKind = WorkerTunerKind::Fixed,
        /// The resource-based tuner's targets, as fractions of the machine (0 to 1).
        worker_target_memory: f64 = 0.8,
        worker_target_cpu: f64 = 0.9,
    }
    /// The model the agent asks.
    llm: LlmSettings {
        /// The model the agent asks.
        model: String = "gpt-4.1-mini".into(),
        openai_base_url: Option<String> = None,
        openai_api_key: Option<Secret> = None,
        /// How often the agent retries a failed model request before giving up.
        llm_max_retries: u32 = 4,
        /// First backoff between model retries, in milliseconds (doubles each time).
        llm_retry_backoff_ms: u64 = 500,
        /// The provider API the agent speaks: `chat` (Chat Completions: vLLM, Ollama,
        /// OpenRouter, Azure, most gateways) or `responses` (OpenAI's Responses API).
        wire_api: WireApi = WireApi::Chat,
        /// Stream model answers (SSE) on either wire; a stream cut mid-answer is retried.
        llm_stream: bool = true,
        /// The context window assumed for a model the table gives none (tokens).
        default_context_window: u64 = 128_000,
    }
    /// How the agent's tools and shell commands are confined.
    sandbox: SandboxSettings {
        /// Shell sandbox: `strict` (default; refuses to run a command unless every layer is
        /// in force: namespaces by bubblewrap, seccomp, cgroups) or `best-effort` (runs with
        /// what the kernel offers, falling back to Landlock, and warns loudly about the rest).
        sandbox_mode: SandboxMode = SandboxMode::Strict,
        /// The bubblewrap program that puts commands in their namespaces; unset: `bwrap` on
        /// PATH, then /usr/bin/bwrap.
        sandbox_bwrap: Option<PathBuf> = None,
        /// Toolchain homes commands see read-only, comma-separated `VAR=path` (bound and
        /// exported, e.g. `RUSTUP_HOME=/opt/rustup`) or `path` (bound only); `auto` finds
        /// rustup, cargo, pyenv and nvm homes; `none` binds nothing beyond the system's.
        /// Credential files in them are hidden.
        sandbox_toolchains: String = "auto".into(),
        /// Size of each command's private /tmp (a tmpfs), in MiB.
        sandbox_tmp_mb: u64 = 512,
        /// Most disk a task's workspace and temp dir may hold together, in MiB; a command
        /// that grows them past it is stopped.
        shell_max_disk_mb: u64 = 8192,
        /// Most processes a shell command may have at once (pids cgroup and RLIMIT_NPROC).
        shell_max_processes: u64 = 256,
        /// Memory limit of a shell command, in MiB (its memory cgroup where the host
        /// delegates one, and its address space).
        shell_max_memory_mb: u64 = 8192,
        /// Memory one WebAssembly tool call may grow to, in MiB.
        tool_memory_mb: u64 = 256,
        /// Time one WebAssembly tool call may run before it is interrupted (milliseconds).
        tool_timeout_ms: u64 = 10_000,
        /// Where compiled tool components are kept; default `<data_dir>/cache/wasm`. Never
        /// used when it lies inside a task's workspace or temp dir (a command could plant code).
        tool_cache_dir: Option<PathBuf> = None,
        /// Provider of `web_search_doc_and_reference`: `workspace` (offline: the repository's
        /// own documentation) or `http` (the endpoint in `doc_search_url`).
        doc_search_provider: DocSearchProvider = DocSearchProvider::Workspace,
        /// The HTTP search endpoint (`GET URL?q=QUERY&n=MAX` answering
        /// `{"results": [{"title", "url", "snippet"}]}`); its host is the only one the provider reaches.
        doc_search_url: Option<String> = None,
        /// Variables of the agent's (and the worker's) environment that shell commands and
        /// setup scripts keep, comma-separated (e.g. `GOPATH,JAVA_HOME`). Names containing
        /// KEY, TOKEN, SECRET or PASSWORD are never passed, whatever this says.
        shell_env_passthrough: String = String::new(),
    }
    /// Environments: the setup before the agent runs, and the cache of prepared states.
    environments: EnvironmentSettings {
        /// With neither `setup` nor `environment` in a task, run the repository's own
        /// `.patchflow/setup.sh` when it has one.
        repo_setup_scripts: bool = true,
        /// How long a prepared state is reused after it was made (hours).
        env_cache_ttl_hours: u64 = 12,
        /// Most bytes of prepared states kept per tenant; the least recently used go first.
        env_cache_max_bytes: u64 = 10 << 30,
        /// Longest a setup or maintenance script may run (seconds).
        setup_timeout_secs: u64 = 1800,
        /// Names the toolchain or image in the cache key, so workers with different images
        /// never share a prepared state (default: the worker's toolchains and architecture).
        env_cache_image: Option<String> = None,
    }
    /// Which runner starts agents, and the Kubernetes Jobs of the `kube` runner.
    kube: KubeSettings {
        /// Which agent runner the worker uses: `local` (a sandboxed child process on the
        /// worker) or `kube` (a Kubernetes Job per attempt; needs an S3-compatible store).
        runner: Runner = Runner::Local,
        /// Namespace of the agent Jobs; unset: the worker's own (in-cluster) or the kubeconfig's.
        kube_namespace: Option<String> = None,
        /// The patchflow image the agent pods run (`patchflow agent-pod fetch|run`).
        kube_image: String = "patchflow:latest".into(),
        /// `Always`, `IfNotPresent` or `Never`; unset: Kubernetes' default.
        kube_image_pull_policy: Option<String> = None,
        /// Service account of the agent pods (its token is never mounted).
        kube_service_account: Option<String> = None,
        /// The Secret and key the agent pods read `OPENAI_API_KEY` from.
        kube_api_key_secret: String = "patchflow-secrets".into(),
        kube_api_key_secret_key: String = "openai-api-key".into(),
        /// The Secret holding the `PATCHFLOW_SECRET_*` values task policies may name for
        /// `call_api` (one key per variable name); unset: a task that names one is refused.
        kube_task_secrets: Option<String> = None,
        /// Resources of each agent container, as Kubernetes quantities; empty: left out.
        kube_cpu_request: Option<String> = Some("500m".into()),
        kube_cpu_limit: Option<String> = Some("2".into()),
        kube_memory_request: Option<String> = Some("512Mi".into()),
        kube_memory_limit: Option<String> = Some("2Gi".into()),
        /// Node selector of the agent pods: `key=value,key=value`.
        kube_node_selector: Option<String> = None,
        /// Tolerations of the agent pods, as a JSON array of Kubernetes tolerations.
        kube_tolerations: Option<String> = None,
        /// Image pull secrets of the agent pods: `name,name`.
        kube_image_pull_secrets: Option<String> = None,
        /// How long a finished Job is kept before Kubernetes deletes it (seconds).
        kube_ttl_after_finished_secs: u32 = 3600,
        /// How long an image may fail to pull before the attempt fails (seconds).
        kube_image_pull_grace_secs: u64 = 120,
        /// How long an agent pod may stay unschedulable before the attempt fails (seconds).
        kube_unschedulable_timeout_secs: u64 = 600,
    }
    /// The Kafka trigger and results topics.
    kafka: KafkaSettings {
        /// Kafka bootstrap servers (`host:port,host:port`); unset: no Kafka trigger or results.
        kafka_brokers: Option<String> = None,
        /// Topic the trigger consumer reads task messages from.
        kafka_tasks_topic: String = "patchflow.tasks".into(),
        /// Topic every finished task's result message goes to.
        kafka_results_topic: String = "patchflow.results".into(),
        /// Topic malformed task messages are moved to.
        kafka_dlq_topic: String = "patchflow.tasks.dlq".into(),
        /// Consumer group of the trigger consumers.
        kafka_group: String = "patchflow".into(),
        /// The tenant every task from the tasks topic belongs to, whatever its message says
        /// (a message's `tenant` is otherwise trusted as far as the topic is: secure it with
        /// broker ACLs); unset: the message's, else `default`.
        kafka_tenant: Option<String> = None,
        /// Move malformed messages to the DLQ topic (off: they are logged and skipped).
        kafka_dlq: bool = true,
        /// Create missing topics at start-up; off: a missing topic is an error naming it.
        kafka_auto_create: bool = true,
        /// Partitions of topics created at start-up.
        kafka_partitions: u32 = 3,
        /// Extra librdkafka settings, `key=value,key=value` (SASL/SSL); shown as `***`.
        kafka_properties: Option<Secret> = None,
    }
    /// Batches of tasks.
    batch: BatchSettings {
        /// Most tasks of one batch running the agent at once, across workers (0: no limit).
        batch_concurrency: u32 = 0,
        /// Lifetime of a batch slot lease without renewal (seconds): a crashed worker's slot
        /// frees itself after this.
        batch_lease_secs: u64 = 30,
    }
    /// Pull requests, the forges they are opened on, and the webhooks that start tasks.
    forge: ForgeSettings {
        /// The GitHub token a task that brings no `github_token` pushes and opens its pull
        /// request with.
        github_token: Option<Secret> = None,
        /// A GitHub App to act as instead of a token: its id (installation tokens are minted
        /// per push from the app's private key).
        github_app_id: Option<String> = None,
        /// The GitHub App's private key (PEM).
        github_app_private_key: Option<Secret> = None,
        /// The GitLab token a task that brings none pushes and opens its merge request with.
        gitlab_token: Option<Secret> = None,
        /// Hosts (`host` or `host:port`, comma-separated) whose repositories are GitHub's.
        github_hosts: String = "github.com".into(),
        /// GitHub's REST API (`https://HOST/api/v3` for GitHub Enterprise Server).
        github_api_url: String = "https://api.github.com".into(),
        /// Hosts whose repositories are GitLab's.
        gitlab_hosts: String = "gitlab.com".into(),
        /// GitLab's REST API.
        gitlab_api_url: String = "https://gitlab.com/api/v4".into(),
        /// The author and committer of the commit a pull request carries.
        git_author_name: String = "patchflow".into(),
        git_author_email: String = "patchflow@localhost".into(),
        /// The web page's address as users reach it (`https://patchflow.example`), for the
        /// task links in pull requests and issue comments; unset: `http://<http_addr>`.
        public_url: Option<String> = None,
        /// The secret GitHub signs webhook deliveries with (`X-Hub-Signature-256`); unset:
        /// `POST /api/webhooks/github` is refused.
        github_webhook_secret: Option<Secret> = None,
        /// The issue label that starts a task.
        github_trigger_label: String = "patchflow".into(),
        /// The tenant tasks from GitHub webhooks belong to.
        github_webhook_tenant: String = "default".into(),
        /// The token GitLab sends with webhooks (`X-Gitlab-Token`); unset:
        /// `POST /api/webhooks/gitlab` is refused.
        gitlab_webhook_secret: Option<Secret> = None,
        /// The issue label that starts a task from GitLab.
        gitlab_trigger_label: String = "patchflow".into(),
        /// The tenant tasks from GitLab webhooks belong to.
        gitlab_webhook_tenant: String = "default".into(),
    }
    /// The model table (its `[models."NAME"]` tables end the file, before the tenants').
    model_table: ModelTableSettings {
        /// Per-model overrides and prices (`[models."NAME"]` tables: `wire_api`,
        /// `base_url`, `api_key_env`, `context_window`, `max_output_tokens`,
        /// `input_price`, `cached_input_price`, `output_price` in USD per million tokens,
        /// `extra_headers`, `reasoning_effort`); `PATCHFLOW_MODELS` as JSON.
        models: ModelTable = ModelTable::default(),
    }
    /// What each tenant may do (kept last: its `[tenants.NAME]` tables end the file).
    tenancy: TenancySettings {
        /// Per-tenant quotas: `[tenants.NAME]` tables (`[tenants."*"]` for every other
        /// tenant) with `max_running`, `models`, `max_steps`, `wall_seconds`, `max_tokens`;
        /// as an environment variable, the same as JSON.
        tenants: TenantQuotas = TenantQuotas::default(),
    }
}

/// Environment variables read besides `PATCHFLOW_<KEY>`, as `(variable, key)`.
pub const ENV_ALIASES: [(&str, &str); 3] = [
    ("TEMPORAL_ADDRESS", "temporal_address"),
    ("OPENAI_BASE_URL", "openai_base_url"),
    ("OPENAI_API_KEY", "openai_api_key"),
];

/// Whether a listening address (`host:port`) is on loopback only.
fn is_loopback_addr(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Config {
    /// Parses a TOML config file's text. Unknown keys are an error, so a typo is caught.
    pub fn from_toml(text: &str) -> Result<Self, CoreError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| CoreError::ConfigFile(e.to_string()))?;
        let mut config = Self::default();
        for (key, value) in table {
            config.set_from_file(&key, value)?;
        }
        config
            .model_table
            .models
            .validate()
            .map_err(|e| invalid("models", e))?;
        config
            .tenancy
            .tenants
            .validate()
            .map_err(|e| invalid("tenants", e))?;
        Ok(config)
    }

    /// The keys of one section (empty for a section that does not exist).
    pub fn section_keys(section: &str) -> &'static [&'static str] {
        Self::SECTIONS
            .iter()
            .find(|(name, _)| *name == section)
            .map_or(&[], |(_, keys)| keys)
    }

    /// The environment variable for a key.
    pub fn env_name(key: &str) -> String {
        format!("PATCHFLOW_{}", key.to_ascii_uppercase())
    }

    /// Applies environment variables; `lookup` is `std::env::var` outside tests. The
    /// well-known aliases apply first so the `PATCHFLOW_` form wins when both are set.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<(), CoreError> {
        for (var, key) in ENV_ALIASES {
            if let Some(v) = lookup(var) {
                self.set(key, &v)?;
            }
        }
        for key in Self::KEYS {
            if let Some(v) = lookup(&Self::env_name(key)) {
                self.set(key, &v)?;
            }
        }
        Ok(())
    }

    /// The task queue the agents run on: their own, so their slots bound only them.
    pub fn agent_task_queue(&self) -> String {
        format!("{}-agents", self.temporal.task_queue)
    }

    /// `worker_max_agents`, or what this machine (`cpus`, `memory_bytes`) can hold.
    pub fn max_agents(&self, cpus: usize, memory_bytes: u64) -> usize {
        match self.temporal.worker_max_agents {
            0 if self.kube.runner == Runner::Kube => 64,
            0 => {
                let by_memory = usize::try_from(memory_bytes / (256 << 20)).unwrap_or(usize::MAX);
                (cpus.max(1) * 4).min(by_memory).max(1)
            }
            n => n as usize,
        }
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), CoreError> {
        let bad = |k: &str, r: &str| Err(invalid(k, r));
        let idle = self.temporal.followup_idle_hours;
        if !(idle.is_finite() && (0.0..=24.0 * 366.0).contains(&idle)) {
            return bad(
                "followup_idle_hours",
                "must be a number of hours from 0 to 8784 (a year)",
            );
        }
        for (key, v) in [
            ("worker_target_memory", self.temporal.worker_target_memory),
            ("worker_target_cpu", self.temporal.worker_target_cpu),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                return bad(
                    key,
                    "must be a fraction of the machine above 0 and at most 1",
                );
            }
        }
        if self.temporal.worker_max_agents > 10_000 {
            return bad(
                "worker_max_agents",
                "must be at most 10000 (0 sizes it from the machine)",
            );
        }
        if self.server.auth == AuthMode::None
            && ![&self.server.http_addr, &self.server.grpc_addr]
                .iter()
                .all(|a| is_loopback_addr(a))
        {
            return bad(
                "auth",
                "`none` lets anyone who reaches the gateway read and cancel every task: it is \
                 refused unless http_addr and grpc_addr are both loopback addresses",
            );
        }
        if self.server.auth == AuthMode::Jwt {
            let s = &self.server;
            for (key, value) in [
                ("auth_jwt_jwks_url", &s.auth_jwt_jwks_url),
                ("auth_jwt_issuer", &s.auth_jwt_issuer),
                ("auth_jwt_audience", &s.auth_jwt_audience),
            ] {
                if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
                    return bad(key, "`auth = \"jwt\"` needs it");
                }
            }
            let url = s.auth_jwt_jwks_url.as_deref().unwrap_or_default();
            let ok = match url::Url::parse(url) {
                Ok(u) if u.scheme() == "https" => true,
                Ok(u) if u.scheme() == "http" => u.host().is_some_and(|h| match h {
                    url::Host::Domain(d) => d == "localhost",
                    url::Host::Ipv4(a) => a.is_loopback(),
                    url::Host::Ipv6(a) => a.is_loopback(),
                }),
                _ => false,
            };
            if !ok {
                return bad(
                    "auth_jwt_jwks_url",
                    "must be an https:// URL (http:// only on a loopback address): the keys \
                     it serves decide who may call",
                );
            }
            for (key, value) in [
                ("auth_jwt_tenant_claim", &s.auth_jwt_tenant_claim),
                ("auth_jwt_role_claim", &s.auth_jwt_role_claim),
            ] {
                if value.trim().is_empty() {
                    return bad(key, "must name a claim");
                }
            }
        }
        if let Some(endpoint) = &self.server.otlp_endpoint {
            match url::Url::parse(endpoint) {
                Ok(u) if !matches!(u.scheme(), "http" | "https") || u.host().is_none() => {
                    return bad(
                        "otlp_endpoint",
                        "must be an http:// or https:// URL of an OTLP/HTTP collector",
                    );
                }
                Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                    return bad(
                        "otlp_endpoint",
                        "must not carry credentials (they would be shown wherever the URL \
                         is); put them in OTEL_EXPORTER_OTLP_HEADERS",
                    );
                }
                Ok(_) => {}
                Err(e) => return bad("otlp_endpoint", &format!("is not a URL: {e}")),
            }
        }
        for (key, tenant) in [
            ("github_webhook_tenant", &self.forge.github_webhook_tenant),
            ("gitlab_webhook_tenant", &self.forge.gitlab_webhook_tenant),
        ] {
            if !crate::auth::is_tenant_name(tenant) {
                return bad(key, "a tenant is 1 to 128 letters, digits, `-`, `_` or `.`");
            }
        }
        if self.kube.runner == Runner::Kube {
            if self.kube.kube_image.is_empty() {
                return bad("kube_image", "the kube runner needs an image");
            }
            if !self.object_store_url().starts_with("s3://") {
                return bad(
                    "runner",
                    "the kube runner moves code and results by presigned URLs: set \
                     object_store_url to an s3:// store (S3, COS, MinIO)",
                );
            }
            self.kube_node_selector()?;
        }
        if self.sandbox.doc_search_provider == DocSearchProvider::Http
            && self.sandbox.doc_search_url.is_none()
        {
            return bad("doc_search_url", "the http doc search provider needs a URL");
        }
        for scheme in self.server.git_allowed_protocols.split(',').map(str::trim) {
            if !matches!(scheme, "https" | "http" | "ssh" | "git") {
                return bad(
                    "git_allowed_protocols",
                    "a comma-separated list of `https`, `http`, `ssh`, `git`",
                );
            }
        }
        if self.temporal.task_queue.is_empty() {
            return bad("task_queue", "must not be empty");
        }
        let rate = self.server.submit_rate_per_sec;
        if !(rate.is_finite() && rate > 0.0) {
            return bad("submit_rate_per_sec", "must be a positive number");
        }
        if self.temporal.activity_max_attempts == 0 {
            return bad("activity_max_attempts", "must be at least 1");
        }
        let kafka = &self.kafka;
        for (key, topic) in [
            ("kafka_tasks_topic", &kafka.kafka_tasks_topic),
            ("kafka_results_topic", &kafka.kafka_results_topic),
            ("kafka_dlq_topic", &kafka.kafka_dlq_topic),
        ] {
            let ok = !topic.is_empty()
                && topic.len() <= 249
                && topic
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return bad(
                    key,
                    "a Kafka topic name: 1 to 249 of letters, digits, `.`, `_`, `-`",
                );
            }
        }
        if kafka.kafka_group.is_empty() {
            return bad("kafka_group", "must not be empty");
        }
        if kafka.kafka_partitions == 0 {
            return bad("kafka_partitions", "must be at least 1");
        }
        if self.batch.batch_lease_secs < 2 {
            return bad("batch_lease_secs", "must be at least 2");
        }
        Ok(())
    }

    /// The agent pods' node selector, parsed from `key=value,key=value`.
    pub fn kube_node_selector(&self) -> Result<Vec<(String, String)>, CoreError> {
        let Some(text) = &self.kube.kube_node_selector else {
            return Ok(Vec::new());
        };
        text.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_string(), v.trim().to_string()))
                }
                _ => Err(invalid(
                    "kube_node_selector",
                    format!("`{pair}` is not key=value"),
                )),
            })
            .collect()
    }

    /// The agent pods' image pull secrets, from `name,name`.
    pub fn kube_image_pull_secrets(&self) -> Vec<String> {
        self.kube
            .kube_image_pull_secrets
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    pub fn database_url(&self) -> String {
        self.store.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.server.data_dir.join("patchflow.db").display()
            )
        })
    }

    /// Where the worker's per-task scratch lives: `work_dir`, else `<data_dir>/work`.
    pub fn work_root(&self) -> PathBuf {
        self.server
            .work_dir
            .clone()
            .unwrap_or_else(|| self.server.data_dir.join("work"))
    }

    pub fn object_store_url(&self) -> String {
        self.store
            .object_store_url
            .clone()
            .unwrap_or_else(|| format!("file://{}", self.server.data_dir.join("objects").display()))
    }

    /// Where users reach the web page: `public_url`, else `http://<http_addr>`.
    pub fn public_url(&self) -> String {
        match &self.forge.public_url {
            Some(u) if !u.trim().is_empty() => u.trim().trim_end_matches('/').to_string(),
            _ => format!("http://{}", self.server.http_addr),
        }
    }

    /// Whether `up` should start the Temporal dev server itself.
    pub fn embedded_temporal(&self) -> bool {
        self.temporal.temporal_address.is_none()
    }

    /// The Temporal frontend as a URL the client accepts.
    pub fn temporal_url(&self) -> String {
        let addr = self
            .temporal
            .temporal_address
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", self.temporal.temporal_port));
        if addr.contains("://") {
            addr
        } else {
            format!("http://{addr}")
        }
    }

    /// The Temporal Web UI's base URL, if known.
    pub fn temporal_ui(&self) -> Option<String> {
        self.temporal.temporal_ui_url.clone().or_else(|| {
            self.embedded_temporal()
                .then(|| format!("http://127.0.0.1:{}", self.temporal.temporal_ui_port))
        })
    }

    /// The link to one task's workflow in the Temporal Web UI.
    pub fn workflow_ui_link(&self, task_id: &str) -> Option<String> {
        self.temporal_ui().map(|ui| {
            format!(
                "{}/namespaces/{}/workflows/{task_id}",
                ui.trim_end_matches('/'),
                self.temporal.temporal_namespace
            )
        })
    }

    /// The effective configuration as TOML, section by section (each a comment line, the
    /// keys flat as the file takes them), secrets shown as `***` (including passwords
    /// inside store URLs).
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        let store = &mut shown.store;
        for url in [
            &mut store.database_url,
            &mut store.object_store_url,
            &mut store.redis_url,
        ] {
            *url = url.as_deref().map(redact_url);
        }
        let mut out = String::new();
        for (section, table) in shown.section_tables() {
            match table {
                Ok(text) => out.push_str(&format!("\n# {section}\n{text}")),
                Err(e) => out.push_str(&format!("\n# {section}: cannot render: {e}\n")),
            }
        }
        out
    }
}

/// `url` with the password of its user part, if any, replaced by `***`: store URLs are
/// printed and logged, and may carry a secret.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn store_urls_lose_their_passwords_when_shown() {
        assert_eq!(
            redact_url("mysql://root:pw@db:3306/test"),
            "mysql://root:***@db:3306/test"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
        let mut c = Config::default();
        c.set("database_url", "postgres://app:hunter2@db/patchflow")
            .unwrap();
        let shown = c.to_redacted_toml();
        assert!(
            shown.contains("postgres://app:***@db/patchflow") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn layers_apply_in_order_and_secrets_stay_hidden() {
        let mut c = Config::from_toml("http_addr = \"0.0.0.0:1\"\nmodel = \"m-file\"\n").unwrap();
        assert_eq!(c.server.http_addr, "0.0.0.0:1");
        let env: HashMap<&str, &str> = [
            ("PATCHFLOW_MODEL", "m-env"),
            ("OPENAI_API_KEY", "sk-secret"),
            ("TEMPORAL_ADDRESS", "temporal:7233"),
            ("PATCHFLOW_ALLOW_LOCAL_SOURCES", "true"),
        ]
        .into();
        c.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.llm.model, "m-env");
        assert!(c.server.allow_local_sources);
        assert_eq!(c.temporal_url(), "http://temporal:7233");
        assert!(!c.embedded_temporal());
        c.set("model", "m-flag").unwrap();
        assert_eq!(c.llm.model, "m-flag");
        let shown = c.to_redacted_toml();
        assert!(shown.contains("openai_api_key = \"***\""), "{shown}");
        assert!(!shown.contains("sk-secret"));
    }

    #[test]
    fn the_printed_configuration_reads_back_as_a_flat_file() {
        let mut c = Config::default();
        c.set("runner", "kube").unwrap();
        c.set("kube_node_selector", "pool=agents").unwrap();
        c.set("log_format", "json").unwrap();
        let shown = c.to_redacted_toml();
        assert!(shown.contains("\n# kube\n"), "{shown}");
        assert!(!shown.contains("[kube]"), "{shown}");
        assert_eq!(Config::from_toml(&shown).unwrap(), c);
    }

    #[test]
    fn kafka_security_settings_are_never_shown() {
        let mut c = Config::default();
        c.set(
            "kafka_properties",
            "security.protocol=SASL_PLAINTEXT,sasl.mechanism=PLAIN,sasl.password=hunter2",
        )
        .unwrap();
        c.set("kafka_brokers", "k1:9092,k2:9092").unwrap();
        let shown = c.to_redacted_toml();
        assert!(shown.contains("kafka_properties = \"***\""), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("kafka_brokers = \"k1:9092,k2:9092\""),
            "{shown}"
        );
        let e = c.set("kafka_dlq", "maybe").unwrap_err().to_string();
        assert!(e.contains("kafka_dlq"), "{e}");
        c.set("kafka_tasks_topic", "bad topic").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("kafka_tasks_topic"), "{e}");
    }

    #[test]
    fn bad_settings_are_named() {
        let e = Config::from_toml("htp_addr = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("htp_addr"), "{e}");
        let e = Config::from_toml("temporal_port = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("temporal_port"), "{e}");
        let e = Config::from_toml("runner = \"docker\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("runner"), "{e}");
        let mut c = Config::default();
        let e = c.set("temporal_port", "abc").unwrap_err().to_string();
        assert!(e.contains("temporal_port") && e.contains("abc"), "{e}");
        assert!(matches!(
            c.set("nope", "1"),
            Err(CoreError::UnknownSetting(_))
        ));
        let e = c.set("sandbox_mode", "lax").unwrap_err().to_string();
        assert!(e.contains("`strict` or `best-effort`"), "{e}");
        let e = c.set("runner", "docker").unwrap_err().to_string();
        assert!(
            e.contains("`local` or `kube`") && e.contains("docker"),
            "{e}"
        );
    }

    #[test]
    fn jwt_auth_needs_its_provider_over_https_and_claims_to_read() {
        let mut c = Config::default();
        c.set("auth", "jwt").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("auth_jwt_jwks_url"), "{e}");
        c.set("auth_jwt_issuer", "https://idp.example").unwrap();
        c.set("auth_jwt_audience", "patchflow").unwrap();
        for refused in [
            "http://idp.example/jwks",
            "http://10.0.0.1/jwks",
            "file:///etc/jwks.json",
            "not a url",
        ] {
            c.set("auth_jwt_jwks_url", refused).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("auth_jwt_jwks_url") && e.contains("https"),
                "{refused}: {e}"
            );
        }
        for fine in [
            "https://idp.example/jwks",
            "http://127.0.0.1:9/jwks",
            "http://localhost/j",
        ] {
            c.set("auth_jwt_jwks_url", fine).unwrap();
            c.validate().unwrap();
        }
        c.set("auth_jwt_tenant_claim", " ").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("auth_jwt_tenant_claim"), "{e}");
    }

    #[test]
    fn traces_go_to_an_http_collector_without_credentials_in_its_url() {
        let mut c = Config::default();
        for (refused, says) in [
            ("collector:4318", "http"),
            ("file:///tmp/spans", "http"),
            ("grpc://c:4317", "http"),
            ("not a url", "not a URL"),
            ("http://user:hunter2@c:4318", "credentials"),
        ] {
            c.set("otlp_endpoint", refused).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("otlp_endpoint") && e.contains(says),
                "{refused}: {e}"
            );
            assert!(!e.contains("hunter2"), "{e}");
        }
        for fine in ["http://127.0.0.1:4318", "https://otel.example/v1/traces"] {
            c.set("otlp_endpoint", fine).unwrap();
            c.validate().unwrap();
        }
    }

    #[test]
    fn webhook_tasks_go_to_a_well_formed_tenant() {
        let mut c = Config::default();
        c.set("github_webhook_tenant", "../admin").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("github_webhook_tenant"), "{e}");
        c.set("github_webhook_tenant", "acme").unwrap();
        c.set("gitlab_webhook_tenant", "").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("gitlab_webhook_tenant"), "{e}");
    }

    #[test]
    fn the_kube_runner_needs_an_s3_store_and_well_formed_pod_settings() {
        let mut c = Config::default();
        c.set("runner", "kube").unwrap();
        assert_eq!(c.kube.runner, Runner::Kube);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("runner") && e.contains("s3://"), "{e}");
        c.set("object_store_url", "s3://tasks?region=eu-west-1")
            .unwrap();
        c.validate().unwrap();
        c.set("kube_node_selector", "pool=agents, disk").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("kube_node_selector") && e.contains("`disk`"),
            "{e}"
        );
        c.set("kube_node_selector", "pool=agents, disk=ssd")
            .unwrap();
        assert_eq!(
            c.kube_node_selector().unwrap(),
            vec![
                ("pool".into(), "agents".into()),
                ("disk".into(), "ssd".into())
            ]
        );
        c.set("kube_image_pull_secrets", "regcred, ,other").unwrap();
        assert_eq!(c.kube_image_pull_secrets(), vec!["regcred", "other"]);
    }

    /// Each key's text form (what agents are handed) reads back to the same value, and
    /// every key is in exactly one section.
    #[test]
    fn every_key_round_trips_through_its_text_form() {
        let mut c = Config::default();
        c.set("tool_cache_dir", "/var/cache/tools").unwrap();
        c.set("openai_api_key", "sk-x").unwrap();
        let mut seen = std::collections::HashSet::new();
        for key in Config::KEYS {
            assert!(seen.insert(*key), "{key} declared twice");
            let mut back = c.clone();
            match c.text(key) {
                Some(text) => back.set(key, &text).unwrap(),
                None => back.set(key, "").unwrap(),
            }
            assert_eq!(back, c, "{key}");
        }
        let in_sections: usize = Config::SECTIONS.iter().map(|(_, keys)| keys.len()).sum();
        assert_eq!(in_sections, Config::KEYS.len());
        assert_eq!(c.text("openai_api_key").as_deref(), Some("sk-x"));
        assert_eq!(c.text("nope"), None);
    }

    #[test]
    fn agent_slots_come_from_the_machine_unless_set_and_bad_tuner_targets_are_refused() {
        let mut c = Config::default();
        const GIB: u64 = 1 << 30;
        // 4 per CPU, at most one per 256 MiB, at least one.
        assert_eq!(c.max_agents(2, 24 * GIB), 8);
        assert_eq!(c.max_agents(16, GIB), 4);
        assert_eq!(c.max_agents(0, 0), 1);
        c.set("runner", "kube").unwrap();
        assert_eq!(
            c.max_agents(2, GIB),
            64,
            "kube agents run in their own pods"
        );
        c.set("worker_max_agents", "3").unwrap();
        assert_eq!(c.max_agents(64, 512 * GIB), 3);
        assert_eq!(c.agent_task_queue(), "patchflow-agents");
        c.set("runner", "local").unwrap();
        c.validate().unwrap();
        assert!(c.set("worker_max_agents", "-1").is_err());
        assert!(c.set("worker_tuner", "magic").is_err());
        c.set("worker_tuner", "resource").unwrap();
        for (key, bad) in [
            ("worker_target_cpu", "1.5"),
            ("worker_target_cpu", "0"),
            ("worker_target_memory", "NaN"),
            ("worker_target_memory", "-0.2"),
        ] {
            let mut c = c.clone();
            c.set(key, bad).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{key}={bad}: {e}");
        }
        c.set("worker_max_agents", "20000").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("worker_max_agents")
        );
    }
}
