//! The one typed configuration. Layers, weakest first: defaults, a TOML file, environment
//! variables, command-line flags. Every setting has a key in the file (`http_addr`), an
//! environment variable (`PATCHFLOW_HTTP_ADDR`) and a flag (`--set http_addr=...`, with the
//! common ones also as named flags). A few well-known variables are honoured too:
//! `TEMPORAL_ADDRESS`, `OPENAI_BASE_URL`, `OPENAI_API_KEY`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::secret::Secret;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP API and web page address.
    pub http_addr: String,
    /// gRPC API address.
    pub grpc_addr: String,
    /// Where the embedded defaults keep their files: task database, object store,
    /// workspaces, the dev server's database.
    pub data_dir: PathBuf,
    /// Task store; default `sqlite://<data_dir>/patchflow.db`.
    pub database_url: Option<String>,
    /// Object store; default `file://<data_dir>/objects`, or
    /// `s3://BUCKET[/PREFIX]?endpoint=URL&region=R&path_style=true` (S3, COS, MinIO).
    pub object_store_url: Option<String>,
    /// Redis for the status cache, idempotency keys, rate limits and live events
    /// (`redis://HOST:PORT/DB`); unset: in-process, one machine.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so several stacks can share one Redis.
    pub redis_prefix: String,
    /// How long a status read may be served from the cache (seconds).
    pub status_cache_ttl_secs: u64,
    /// How long an idempotency key is remembered in the cache (the database keeps it for good).
    pub idempotency_ttl_secs: u64,
    /// Submissions a tenant may burst (token bucket capacity); 0 turns the limit off.
    pub submit_rate_capacity: u32,
    /// Submissions per second a tenant's bucket refills.
    pub submit_rate_per_sec: f64,
    /// Lifetime of presigned URLs to result files (seconds).
    pub presign_expiry_secs: u64,
    /// An external Temporal frontend (`host:port` or URL). Unset: `up` starts the dev server.
    pub temporal_address: Option<String>,
    pub temporal_namespace: String,
    pub task_queue: String,
    /// Ports of the embedded dev server.
    pub temporal_port: u16,
    pub temporal_ui_port: u16,
    /// The `temporal` CLI used for the embedded dev server.
    pub temporal_cli: String,
    /// Where people open the Temporal Web UI; known by itself for the embedded server.
    pub temporal_ui_url: Option<String>,
    /// The model the agent asks.
    pub model: String,
    pub openai_base_url: Option<String>,
    pub openai_api_key: Option<Secret>,
    /// How often the agent retries a failed model request before giving up.
    pub llm_max_retries: u32,
    /// First backoff between model retries, in milliseconds (doubles each time).
    pub llm_retry_backoff_ms: u64,
    /// Shell sandbox: `best-effort` (default; runs with what the kernel offers and warns
    /// about what is missing, e.g. Landlock) or `strict` (refuses to run a command unless
    /// every layer is in force).
    pub sandbox_mode: String,
    /// Most processes a shell command may have at once (pids cgroup and RLIMIT_NPROC).
    pub shell_max_processes: u64,
    /// Address-space limit of a shell command, in MiB.
    pub shell_max_memory_mb: u64,
    /// Memory one WebAssembly tool call may grow to, in MiB.
    pub tool_memory_mb: u64,
    /// Time one WebAssembly tool call may run before it is interrupted (milliseconds).
    pub tool_timeout_ms: u64,
    /// Where compiled tool components are kept; default `<data_dir>/cache/wasm`. Never
    /// used when it lies inside a task's workspace or temp dir (a command could plant code).
    pub tool_cache_dir: Option<PathBuf>,
    /// Provider of `web_search_doc_and_reference`: `workspace` (offline: the repository's
    /// own documentation) or `http` (the endpoint in `doc_search_url`).
    pub doc_search_provider: String,
    /// The HTTP search endpoint (`GET URL?q=QUERY&n=MAX` answering
    /// `{"results": [{"title", "url", "snippet"}]}`); its host is the only one the provider reaches.
    pub doc_search_url: Option<String>,
    /// Accept `file://` URLs and local paths as git sources (tests, the demo).
    pub allow_local_sources: bool,
    /// Largest upload (ZIP) accepted by the gateway, in bytes.
    pub max_upload_bytes: u64,
    /// Largest unpacked size of a ZIP or repository, in bytes.
    pub max_unpacked_bytes: u64,
    /// Most entries a ZIP may hold.
    pub max_archive_entries: u64,
    /// How many attempts each activity gets before the task fails.
    pub activity_max_attempts: u32,
    /// How long a running agent may go without a heartbeat before Temporal retries it on
    /// another worker (seconds).
    pub heartbeat_timeout_secs: u64,
    /// First retry interval of a failed activity (milliseconds; doubles each time).
    pub retry_initial_interval_ms: u64,
    /// Which agent runner the worker uses: `local` (a sandboxed child process on the
    /// worker) or `kube` (a Kubernetes Job per attempt; needs an S3-compatible store).
    pub runner: String,
    /// Namespace of the agent Jobs; unset: the worker's own (in-cluster) or the kubeconfig's.
    pub kube_namespace: Option<String>,
    /// The patchflow image the agent pods run (`patchflow agent-pod fetch|run`).
    pub kube_image: String,
    /// `Always`, `IfNotPresent` or `Never`; unset: Kubernetes' default.
    pub kube_image_pull_policy: Option<String>,
    /// Service account of the agent pods (its token is never mounted).
    pub kube_service_account: Option<String>,
    /// The Secret and key the agent pods read `OPENAI_API_KEY` from.
    pub kube_api_key_secret: String,
    pub kube_api_key_secret_key: String,
    /// The Secret holding the `PATCHFLOW_SECRET_*` values task policies may name for
    /// `call_api` (one key per variable name); unset: a task that names one is refused.
    pub kube_task_secrets: Option<String>,
    /// Resources of each agent container, as Kubernetes quantities; empty: left out.
    pub kube_cpu_request: Option<String>,
    pub kube_cpu_limit: Option<String>,
    pub kube_memory_request: Option<String>,
    pub kube_memory_limit: Option<String>,
    /// Node selector of the agent pods: `key=value,key=value`.
    pub kube_node_selector: Option<String>,
    /// Tolerations of the agent pods, as a JSON array of Kubernetes tolerations.
    pub kube_tolerations: Option<String>,
    /// Image pull secrets of the agent pods: `name,name`.
    pub kube_image_pull_secrets: Option<String>,
    /// How long a finished Job is kept before Kubernetes deletes it (seconds).
    pub kube_ttl_after_finished_secs: u32,
    /// How long an image may fail to pull before the attempt fails (seconds).
    pub kube_image_pull_grace_secs: u64,
    /// How long an agent pod may stay unschedulable before the attempt fails (seconds).
    pub kube_unschedulable_timeout_secs: u64,
    /// `text` or `json`.
    pub log_format: String,
    /// Kafka bootstrap servers (`host:port,host:port`); unset: no Kafka trigger or results.
    pub kafka_brokers: Option<String>,
    /// Topic the trigger consumer reads task messages from.
    pub kafka_tasks_topic: String,
    /// Topic every finished task's result message goes to.
    pub kafka_results_topic: String,
    /// Topic malformed task messages are moved to.
    pub kafka_dlq_topic: String,
    /// Consumer group of the trigger consumers.
    pub kafka_group: String,
    /// Move malformed messages to the DLQ topic (off: they are logged and skipped).
    pub kafka_dlq: bool,
    /// Create missing topics at start-up; off: a missing topic is an error naming it.
    pub kafka_auto_create: bool,
    /// Partitions of topics created at start-up.
    pub kafka_partitions: u32,
    /// Extra librdkafka settings, `key=value,key=value` (SASL/SSL); shown as `***`.
    pub kafka_properties: Option<Secret>,
    /// Most tasks of one batch running the agent at once, across workers (0: no limit).
    pub batch_concurrency: u32,
    /// Lifetime of a batch slot lease without renewal (seconds): a crashed worker's slot
    /// frees itself after this.
    pub batch_lease_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8787".into(),
            grpc_addr: "127.0.0.1:8788".into(),
            data_dir: PathBuf::from(".patchflow"),
            database_url: None,
            object_store_url: None,
            redis_url: None,
            redis_prefix: "patchflow".into(),
            status_cache_ttl_secs: 10,
            idempotency_ttl_secs: 24 * 3600,
            submit_rate_capacity: 60,
            submit_rate_per_sec: 5.0,
            presign_expiry_secs: 3600,
            temporal_address: None,
            temporal_namespace: "default".into(),
            task_queue: "patchflow".into(),
            temporal_port: 7233,
            temporal_ui_port: 8233,
            temporal_cli: "temporal".into(),
            temporal_ui_url: None,
            model: "gpt-4.1-mini".into(),
            openai_base_url: None,
            openai_api_key: None,
            llm_max_retries: 4,
            llm_retry_backoff_ms: 500,
            sandbox_mode: "best-effort".into(),
            shell_max_processes: 256,
            shell_max_memory_mb: 8192,
            tool_memory_mb: 256,
            tool_timeout_ms: 10_000,
            tool_cache_dir: None,
            doc_search_provider: "workspace".into(),
            doc_search_url: None,
            allow_local_sources: false,
            max_upload_bytes: 100 * 1024 * 1024,
            max_unpacked_bytes: 1024 * 1024 * 1024,
            max_archive_entries: 100_000,
            activity_max_attempts: 3,
            heartbeat_timeout_secs: 10,
            retry_initial_interval_ms: 1000,
            runner: "local".into(),
            kube_namespace: None,
            kube_image: "patchflow:latest".into(),
            kube_image_pull_policy: None,
            kube_service_account: None,
            kube_api_key_secret: "patchflow-secrets".into(),
            kube_api_key_secret_key: "openai-api-key".into(),
            kube_task_secrets: None,
            kube_cpu_request: Some("500m".into()),
            kube_cpu_limit: Some("2".into()),
            kube_memory_request: Some("512Mi".into()),
            kube_memory_limit: Some("2Gi".into()),
            kube_node_selector: None,
            kube_tolerations: None,
            kube_image_pull_secrets: None,
            kube_ttl_after_finished_secs: 3600,
            kube_image_pull_grace_secs: 120,
            kube_unschedulable_timeout_secs: 600,
            log_format: "text".into(),
            kafka_brokers: None,
            kafka_tasks_topic: "patchflow.tasks".into(),
            kafka_results_topic: "patchflow.results".into(),
            kafka_dlq_topic: "patchflow.tasks.dlq".into(),
            kafka_group: "patchflow".into(),
            kafka_dlq: true,
            kafka_auto_create: true,
            kafka_partitions: 3,
            kafka_properties: None,
            batch_concurrency: 0,
            batch_lease_secs: 30,
        }
    }
}

/// Environment variables read besides `PATCHFLOW_<KEY>`, as `(variable, key)`.
pub const ENV_ALIASES: [(&str, &str); 3] = [
    ("TEMPORAL_ADDRESS", "temporal_address"),
    ("OPENAI_BASE_URL", "openai_base_url"),
    ("OPENAI_API_KEY", "openai_api_key"),
];

impl Config {
    /// Every key, in the order `patchflow config` prints them.
    pub const KEYS: [&'static str; 69] = [
        "http_addr",
        "grpc_addr",
        "data_dir",
        "database_url",
        "object_store_url",
        "redis_url",
        "redis_prefix",
        "status_cache_ttl_secs",
        "idempotency_ttl_secs",
        "submit_rate_capacity",
        "submit_rate_per_sec",
        "presign_expiry_secs",
        "temporal_address",
        "temporal_namespace",
        "task_queue",
        "temporal_port",
        "temporal_ui_port",
        "temporal_cli",
        "temporal_ui_url",
        "model",
        "openai_base_url",
        "openai_api_key",
        "llm_max_retries",
        "llm_retry_backoff_ms",
        "sandbox_mode",
        "shell_max_processes",
        "shell_max_memory_mb",
        "tool_memory_mb",
        "tool_timeout_ms",
        "tool_cache_dir",
        "doc_search_provider",
        "doc_search_url",
        "allow_local_sources",
        "max_upload_bytes",
        "max_unpacked_bytes",
        "max_archive_entries",
        "activity_max_attempts",
        "heartbeat_timeout_secs",
        "retry_initial_interval_ms",
        "runner",
        "kube_namespace",
        "kube_image",
        "kube_image_pull_policy",
        "kube_service_account",
        "kube_api_key_secret",
        "kube_api_key_secret_key",
        "kube_task_secrets",
        "kube_cpu_request",
        "kube_cpu_limit",
        "kube_memory_request",
        "kube_memory_limit",
        "kube_node_selector",
        "kube_tolerations",
        "kube_image_pull_secrets",
        "kube_ttl_after_finished_secs",
        "kube_image_pull_grace_secs",
        "kube_unschedulable_timeout_secs",
        "log_format",
        "kafka_brokers",
        "kafka_tasks_topic",
        "kafka_results_topic",
        "kafka_dlq_topic",
        "kafka_group",
        "kafka_dlq",
        "kafka_auto_create",
        "kafka_partitions",
        "kafka_properties",
        "batch_concurrency",
        "batch_lease_secs",
    ];

    /// Parses a TOML config file's text. Unknown keys are an error, so a typo is caught.
    pub fn from_toml(text: &str) -> Result<Self, CoreError> {
        toml::from_str(text).map_err(|e| CoreError::ConfigFile(e.to_string()))
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

    /// Sets one key from its text form. An empty value clears an optional key.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), CoreError> {
        fn opt(v: &str) -> Option<String> {
            (!v.is_empty()).then(|| v.to_string())
        }
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, CoreError> {
            v.trim().parse().map_err(|_| {
                CoreError::Invalid(crate::ValidationError::new(
                    key,
                    format!("`{v}` is not a number"),
                ))
            })
        }
        fn flag(key: &str, v: &str) -> Result<bool, CoreError> {
            match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" | "" => Ok(false),
                _ => Err(CoreError::Invalid(crate::ValidationError::new(
                    key,
                    format!("`{v}` is not true or false"),
                ))),
            }
        }
        match key {
            "http_addr" => self.http_addr = value.into(),
            "grpc_addr" => self.grpc_addr = value.into(),
            "data_dir" => self.data_dir = PathBuf::from(value),
            "database_url" => self.database_url = opt(value),
            "object_store_url" => self.object_store_url = opt(value),
            "redis_url" => self.redis_url = opt(value),
            "redis_prefix" => self.redis_prefix = value.into(),
            "status_cache_ttl_secs" => self.status_cache_ttl_secs = num(key, value)?,
            "idempotency_ttl_secs" => self.idempotency_ttl_secs = num(key, value)?,
            "submit_rate_capacity" => self.submit_rate_capacity = num(key, value)?,
            "submit_rate_per_sec" => self.submit_rate_per_sec = num(key, value)?,
            "presign_expiry_secs" => self.presign_expiry_secs = num(key, value)?,
            "temporal_address" => self.temporal_address = opt(value),
            "temporal_namespace" => self.temporal_namespace = value.into(),
            "task_queue" => self.task_queue = value.into(),
            "temporal_port" => self.temporal_port = num(key, value)?,
            "temporal_ui_port" => self.temporal_ui_port = num(key, value)?,
            "temporal_cli" => self.temporal_cli = value.into(),
            "temporal_ui_url" => self.temporal_ui_url = opt(value),
            "model" => self.model = value.into(),
            "openai_base_url" => self.openai_base_url = opt(value),
            "openai_api_key" => self.openai_api_key = opt(value).map(Secret::new),
            "llm_max_retries" => self.llm_max_retries = num(key, value)?,
            "llm_retry_backoff_ms" => self.llm_retry_backoff_ms = num(key, value)?,
            "sandbox_mode" => self.sandbox_mode = value.into(),
            "shell_max_processes" => self.shell_max_processes = num(key, value)?,
            "shell_max_memory_mb" => self.shell_max_memory_mb = num(key, value)?,
            "tool_memory_mb" => self.tool_memory_mb = num(key, value)?,
            "tool_timeout_ms" => self.tool_timeout_ms = num(key, value)?,
            "tool_cache_dir" => self.tool_cache_dir = opt(value).map(PathBuf::from),
            "doc_search_provider" => self.doc_search_provider = value.into(),
            "doc_search_url" => self.doc_search_url = opt(value),
            "allow_local_sources" => self.allow_local_sources = flag(key, value)?,
            "max_upload_bytes" => self.max_upload_bytes = num(key, value)?,
            "max_unpacked_bytes" => self.max_unpacked_bytes = num(key, value)?,
            "max_archive_entries" => self.max_archive_entries = num(key, value)?,
            "activity_max_attempts" => self.activity_max_attempts = num(key, value)?,
            "heartbeat_timeout_secs" => self.heartbeat_timeout_secs = num(key, value)?,
            "retry_initial_interval_ms" => self.retry_initial_interval_ms = num(key, value)?,
            "runner" => self.runner = value.into(),
            "kube_namespace" => self.kube_namespace = opt(value),
            "kube_image" => self.kube_image = value.into(),
            "kube_image_pull_policy" => self.kube_image_pull_policy = opt(value),
            "kube_service_account" => self.kube_service_account = opt(value),
            "kube_api_key_secret" => self.kube_api_key_secret = value.into(),
            "kube_api_key_secret_key" => self.kube_api_key_secret_key = value.into(),
            "kube_task_secrets" => self.kube_task_secrets = opt(value),
            "kube_cpu_request" => self.kube_cpu_request = opt(value),
            "kube_cpu_limit" => self.kube_cpu_limit = opt(value),
            "kube_memory_request" => self.kube_memory_request = opt(value),
            "kube_memory_limit" => self.kube_memory_limit = opt(value),
            "kube_node_selector" => self.kube_node_selector = opt(value),
            "kube_tolerations" => self.kube_tolerations = opt(value),
            "kube_image_pull_secrets" => self.kube_image_pull_secrets = opt(value),
            "kube_ttl_after_finished_secs" => self.kube_ttl_after_finished_secs = num(key, value)?,
            "kube_image_pull_grace_secs" => self.kube_image_pull_grace_secs = num(key, value)?,
            "kube_unschedulable_timeout_secs" => {
                self.kube_unschedulable_timeout_secs = num(key, value)?
            }
            "log_format" => self.log_format = value.into(),
            "kafka_brokers" => self.kafka_brokers = opt(value),
            "kafka_tasks_topic" => self.kafka_tasks_topic = value.into(),
            "kafka_results_topic" => self.kafka_results_topic = value.into(),
            "kafka_dlq_topic" => self.kafka_dlq_topic = value.into(),
            "kafka_group" => self.kafka_group = value.into(),
            "kafka_dlq" => self.kafka_dlq = flag(key, value)?,
            "kafka_auto_create" => self.kafka_auto_create = flag(key, value)?,
            "kafka_partitions" => self.kafka_partitions = num(key, value)?,
            "kafka_properties" => self.kafka_properties = opt(value).map(Secret::new),
            "batch_concurrency" => self.batch_concurrency = num(key, value)?,
            "batch_lease_secs" => self.batch_lease_secs = num(key, value)?,
            other => return Err(CoreError::UnknownSetting(other.to_string())),
        }
        Ok(())
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), CoreError> {
        let bad = |k: &str, r: &str| Err(CoreError::Invalid(crate::ValidationError::new(k, r)));
        match self.runner.as_str() {
            "local" => {}
            "kube" => {
                if self.kube_image.is_empty() {
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
                self.kube_image_pull_secrets();
            }
            _ => return bad("runner", "must be `local` or `kube`"),
        }
        if !matches!(self.sandbox_mode.as_str(), "strict" | "best-effort") {
            return bad("sandbox_mode", "must be `strict` or `best-effort`");
        }
        match self.doc_search_provider.as_str() {
            "workspace" => {}
            "http" if self.doc_search_url.is_some() => {}
            "http" => return bad("doc_search_url", "the http doc search provider needs a URL"),
            _ => return bad("doc_search_provider", "must be `workspace` or `http`"),
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad("log_format", "must be `text` or `json`");
        }
        if self.task_queue.is_empty() {
            return bad("task_queue", "must not be empty");
        }
        if !(self.submit_rate_per_sec.is_finite() && self.submit_rate_per_sec > 0.0) {
            return bad("submit_rate_per_sec", "must be a positive number");
        }
        if self.activity_max_attempts == 0 {
            return bad("activity_max_attempts", "must be at least 1");
        }
        for (key, topic) in [
            ("kafka_tasks_topic", &self.kafka_tasks_topic),
            ("kafka_results_topic", &self.kafka_results_topic),
            ("kafka_dlq_topic", &self.kafka_dlq_topic),
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
        if self.kafka_group.is_empty() {
            return bad("kafka_group", "must not be empty");
        }
        if self.kafka_partitions == 0 {
            return bad("kafka_partitions", "must be at least 1");
        }
        if self.batch_lease_secs < 2 {
            return bad("batch_lease_secs", "must be at least 2");
        }
        Ok(())
    }

    /// The agent pods' node selector, parsed from `key=value,key=value`.
    pub fn kube_node_selector(&self) -> Result<Vec<(String, String)>, CoreError> {
        let Some(text) = &self.kube_node_selector else {
            return Ok(Vec::new());
        };
        text.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_string(), v.trim().to_string()))
                }
                _ => Err(CoreError::Invalid(crate::ValidationError::new(
                    "kube_node_selector",
                    format!("`{pair}` is not key=value"),
                ))),
            })
            .collect()
    }

    /// The agent pods' image pull secrets, from `name,name`.
    pub fn kube_image_pull_secrets(&self) -> Vec<String> {
        self.kube_image_pull_secrets
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("patchflow.db").display()))
    }

    pub fn object_store_url(&self) -> String {
        self.object_store_url
            .clone()
            .unwrap_or_else(|| format!("file://{}", self.data_dir.join("objects").display()))
    }

    /// Whether `up` should start the Temporal dev server itself.
    pub fn embedded_temporal(&self) -> bool {
        self.temporal_address.is_none()
    }

    /// The Temporal frontend as a URL the client accepts.
    pub fn temporal_url(&self) -> String {
        let addr = self
            .temporal_address
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", self.temporal_port));
        if addr.contains("://") {
            addr
        } else {
            format!("http://{addr}")
        }
    }

    /// The Temporal Web UI's base URL, if known.
    pub fn temporal_ui(&self) -> Option<String> {
        self.temporal_ui_url.clone().or_else(|| {
            self.embedded_temporal()
                .then(|| format!("http://127.0.0.1:{}", self.temporal_ui_port))
        })
    }

    /// The link to one task's workflow in the Temporal Web UI.
    pub fn workflow_ui_link(&self, task_id: &str) -> Option<String> {
        self.temporal_ui().map(|ui| {
            format!(
                "{}/namespaces/{}/workflows/{task_id}",
                ui.trim_end_matches('/'),
                self.temporal_namespace
            )
        })
    }

    /// The effective configuration as TOML, secrets shown as `***` (including passwords
    /// inside store URLs).
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = shown.database_url.as_deref().map(redact_url);
        shown.object_store_url = shown.object_store_url.as_deref().map(redact_url);
        shown.redis_url = shown.redis_url.as_deref().map(redact_url);
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
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
        assert_eq!(c.http_addr, "0.0.0.0:1");
        let env: HashMap<&str, &str> = [
            ("PATCHFLOW_MODEL", "m-env"),
            ("OPENAI_API_KEY", "sk-secret"),
            ("TEMPORAL_ADDRESS", "temporal:7233"),
            ("PATCHFLOW_ALLOW_LOCAL_SOURCES", "true"),
        ]
        .into();
        c.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.model, "m-env");
        assert!(c.allow_local_sources);
        assert_eq!(c.temporal_url(), "http://temporal:7233");
        assert!(!c.embedded_temporal());
        c.set("model", "m-flag").unwrap();
        assert_eq!(c.model, "m-flag");
        let shown = c.to_redacted_toml();
        assert!(shown.contains("openai_api_key = \"***\""), "{shown}");
        assert!(!shown.contains("sk-secret"));
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
        let mut c = Config::default();
        let e = c.set("temporal_port", "abc").unwrap_err().to_string();
        assert!(e.contains("temporal_port") && e.contains("abc"), "{e}");
        assert!(matches!(
            c.set("nope", "1"),
            Err(CoreError::UnknownSetting(_))
        ));
    }

    #[test]
    fn the_kube_runner_needs_an_s3_store_and_well_formed_pod_settings() {
        let mut c = Config::default();
        c.set("runner", "kube").unwrap();
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
        c.set("runner", "docker").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`local` or `kube`"), "{e}");
    }

    #[test]
    fn every_key_is_settable() {
        let mut c = Config::default();
        for key in Config::KEYS {
            let v = match key {
                "temporal_port"
                | "temporal_ui_port"
                | "llm_max_retries"
                | "llm_retry_backoff_ms"
                | "shell_max_processes"
                | "shell_max_memory_mb"
                | "tool_memory_mb"
                | "tool_timeout_ms"
                | "max_upload_bytes"
                | "max_unpacked_bytes"
                | "max_archive_entries"
                | "activity_max_attempts"
                | "heartbeat_timeout_secs"
                | "retry_initial_interval_ms"
                | "status_cache_ttl_secs"
                | "idempotency_ttl_secs"
                | "submit_rate_capacity"
                | "submit_rate_per_sec"
                | "presign_expiry_secs"
                | "kafka_partitions"
                | "batch_concurrency"
                | "batch_lease_secs"
                | "kube_ttl_after_finished_secs"
                | "kube_image_pull_grace_secs"
                | "kube_unschedulable_timeout_secs" => "7",
                "allow_local_sources" | "kafka_dlq" | "kafka_auto_create" => "true",
                _ => "x",
            };
            c.set(key, v).unwrap();
        }
    }
}
