//! Configuration layers for the binary: defaults, the TOML file (`--config` or
//! `PATCHFLOW_CONFIG`), `PATCHFLOW_*` variables, then flags.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use patchflow_core::Config;
use patchflow_core::config::redact_url;

#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// TOML config file (also PATCHFLOW_CONFIG).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Set any config key: --set key=value (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// HTTP API address [PATCHFLOW_HTTP_ADDR].
    #[arg(long, global = true)]
    pub http_addr: Option<String>,
    /// Data directory of the embedded defaults [PATCHFLOW_DATA_DIR].
    #[arg(long, global = true)]
    pub data_dir: Option<String>,
    /// External Temporal frontend [TEMPORAL_ADDRESS].
    #[arg(long, global = true)]
    pub temporal_address: Option<String>,
    /// Dev server frontend port [PATCHFLOW_TEMPORAL_PORT].
    #[arg(long, global = true)]
    pub temporal_port: Option<String>,
    /// Dev server Web UI port [PATCHFLOW_TEMPORAL_UI_PORT].
    #[arg(long, global = true)]
    pub temporal_ui_port: Option<String>,
    /// Temporal task queue [PATCHFLOW_TASK_QUEUE].
    #[arg(long, global = true)]
    pub task_queue: Option<String>,
    /// Task store URL [PATCHFLOW_DATABASE_URL].
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// Object store URL [PATCHFLOW_OBJECT_STORE_URL].
    #[arg(long, global = true)]
    pub object_store_url: Option<String>,
    /// Model name [PATCHFLOW_MODEL].
    #[arg(long, global = true)]
    pub model: Option<String>,
    /// `text` or `json` [PATCHFLOW_LOG_FORMAT].
    #[arg(long, global = true)]
    pub log_format: Option<String>,
    /// API token client commands send [PATCHFLOW_TOKEN]; default: `<data_dir>/admin.token`.
    #[arg(long, global = true)]
    pub token: Option<String>,
}

pub fn load(opts: &GlobalOpts) -> anyhow::Result<Config> {
    let file = opts
        .config
        .clone()
        .or_else(|| std::env::var_os("PATCHFLOW_CONFIG").map(PathBuf::from));
    let mut config = patchflow_agent::cli::config_from(file.as_deref())?;
    let named = [
        ("http_addr", &opts.http_addr),
        ("data_dir", &opts.data_dir),
        ("temporal_address", &opts.temporal_address),
        ("temporal_port", &opts.temporal_port),
        ("temporal_ui_port", &opts.temporal_ui_port),
        ("task_queue", &opts.task_queue),
        ("database_url", &opts.database_url),
        ("object_store_url", &opts.object_store_url),
        ("model", &opts.model),
        ("log_format", &opts.log_format),
        ("token", &opts.token),
    ];
    for (key, value) in named {
        if let Some(v) = value {
            config.set(key, v)?;
        }
    }
    for kv in &opts.set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set `{kv}`: expected KEY=VALUE"))?;
        config.set(k.trim(), v)?;
    }
    config.validate()?;
    Ok(config)
}

/// Logs to stderr and, with `otlp_endpoint`, traces as `service` (`None`: a client
/// command, which traces nothing). Span ids are replay-safe, as the Temporal SDK's
/// tracing plugin needs them in a worker.
pub fn init_logging(
    config: &Config,
    quiet: bool,
    service: Option<&str>,
) -> patchflow_agent::telemetry::Telemetry {
    use patchflow_agent::telemetry::{self, Tracing};
    let default = if quiet {
        "warn"
    } else {
        "info,temporalio_sdk_core=warn,temporalio_sdk=warn"
    };
    let tracing = Tracing::new(
        service.unwrap_or("patchflow"),
        service.and(config.server.otlp_endpoint.as_deref()),
    )
    .with_ids(temporalio_sdk::opentelemetry::WorkflowIdGenerator::default());
    telemetry::init(config.server.log_format, default, tracing)
}

/// `patchflow config`: the effective settings, secrets as `***`, and what they select.
pub fn describe(config: &Config) -> String {
    let mut out = String::from("# effective patchflow configuration (secrets redacted)\n");
    out.push_str(&config.to_redacted_toml());
    out.push_str("\n# selected back-ends\n");
    out.push_str(&format!(
        "# task store:    {}\n",
        redact_url(&config.database_url())
    ));
    out.push_str(&format!(
        "# object store:  {}\n",
        redact_url(&config.object_store_url())
    ));
    out.push_str(&format!(
        "# cache:         {}\n",
        config
            .store
            .redis_url
            .as_deref()
            .map(|u| format!(
                "Redis {} (keys under `{}:`)",
                redact_url(u),
                config.store.redis_prefix
            ))
            .unwrap_or_else(|| "in-process (one machine)".into())
    ));
    out.push_str(&format!(
        "# temporal:      {}\n",
        if config.embedded_temporal() {
            format!(
                "embedded dev server on {} (UI {})",
                config.temporal_url(),
                config.temporal_ui().unwrap_or_default()
            )
        } else {
            config.temporal_url()
        }
    ));
    out.push_str(&format!(
        "# kafka:         {}\n",
        match &config.kafka.kafka_brokers {
            Some(b) => format!(
                "{b}: tasks `{}`, results `{}`, DLQ `{}`{}, group `{}`",
                config.kafka.kafka_tasks_topic,
                config.kafka.kafka_results_topic,
                config.kafka.kafka_dlq_topic,
                if config.kafka.kafka_dlq { "" } else { " (off)" },
                config.kafka.kafka_group
            ),
            None => "off (HTTP and gRPC only)".into(),
        }
    ));
    out.push_str(&format!("# runner:        {}\n", config.kube.runner));
    out.push_str(&format!(
        "# model:         {} at {}\n",
        config.llm.model,
        config
            .llm
            .openai_base_url
            .as_deref()
            .unwrap_or(patchflow_agent::run::DEFAULT_BASE_URL)
    ));
    out
}

/// The token client commands send: `--token`, else `PATCHFLOW_TOKEN`, else the local
/// `<data_dir>/admin.token` (so commands on the machine that runs `patchflow up` need no
/// extra step). `None`: send none (a gateway with `auth = "none"`).
pub fn client_token(config: &Config) -> Option<String> {
    if let Some(t) = &config.server.token {
        return Some(t.expose().trim().to_string());
    }
    let file = config
        .server
        .data_dir
        .join(patchflow_gateway::auth::ADMIN_TOKEN_FILE);
    std::fs::read_to_string(file)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}
