//! Wiring: stores, Temporal, the worker and the gateway, alone or together (`up`).

use patchflow_platform::secret_box::SecretBox;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use patchflow_activities::{
    Activities, ActivityConfig, AgentRunner, KubeRunner, KubeRunnerConfig, LocalRunner,
    LocalRunnerConfig,
};
use patchflow_core::Config;
use patchflow_core::config::Runner;
use patchflow_core::config::redact_url;
use patchflow_gateway::{ServiceConfig, TaskService};
use patchflow_platform::cache::{Hot, HotOptions, RateLimit};
use patchflow_platform::git_remote::RemotePolicy;
use patchflow_platform::{ObjectStore, TaskStore};
use patchflow_workflows::{CodeTask, WorkflowSettings};
use temporalio_client::Client;
use temporalio_sdk::{Runtime, Worker, WorkerOptions};

use crate::devserver::{self, DevServer};

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

pub struct Stores {
    pub tasks: Arc<dyn TaskStore>,
    pub objects: Arc<dyn ObjectStore>,
    pub hot: Hot,
    /// Seals and opens task credentials (`secrets_key`).
    pub secrets: Arc<SecretBox>,
}

pub async fn open_stores(config: &Config) -> anyhow::Result<Stores> {
    let tasks = patchflow_platform::db::open(&config.database_url())
        .await
        .with_context(|| {
            format!(
                "cannot open the task store {}",
                redact_url(&config.database_url())
            )
        })?;
    let objects = patchflow_platform::objectstore::open(&config.object_store_url())
        .await
        .with_context(|| {
            format!(
                "cannot open the object store {}",
                redact_url(&config.object_store_url())
            )
        })?;
    let options = HotOptions {
        rate_limit: RateLimit {
            capacity: config.server.submit_rate_capacity.max(1),
            refill_per_sec: config.server.submit_rate_per_sec,
        },
        ..HotOptions::default()
    };
    let hot = Hot::open_with(
        config.store.redis_url.as_deref(),
        &config.store.redis_prefix,
        options,
    )
    .await
    .with_context(|| {
        format!(
            "cannot set up the cache {}",
            config
                .store
                .redis_url
                .as_deref()
                .map(redact_url)
                .unwrap_or_default()
        )
    })?;
    tracing::info!(
        task_store = %redact_url(&config.database_url()),
        object_store = %objects.describe(),
        cache = %hot.describe(),
        "stores open"
    );
    Ok(Stores {
        tasks,
        objects,
        hot,
        secrets: Arc::new(
            SecretBox::from_settings(config.server.secrets_key.as_ref(), &config.server.data_dir)
                .map_err(anyhow::Error::msg)
                .context("the secrets key (secrets_key)")?,
        ),
    })
}

pub fn service(config: &Config, stores: &Stores, client: Client) -> anyhow::Result<TaskService> {
    let settings = WorkflowSettings {
        activity_max_attempts: config.temporal.activity_max_attempts,
        heartbeat_timeout_secs: config.temporal.heartbeat_timeout_secs,
        retry_initial_interval_ms: config.temporal.retry_initial_interval_ms,
        batch_concurrency: config.batch.batch_concurrency,
        // Per task, from its tenant's quota (the gateway sets it when it starts one).
        tenant_max_running: 0,
        // An ended task's workflow waits this long for a follow-up message (a retry
        // closes it first; a message after it closed starts a continuation).
        followup_idle_secs: (config.temporal.followup_idle_hours * 3600.0).round() as u64,
        continue_as_new_events: config.temporal.continue_as_new_events,
        agent_task_queue: Some(config.agent_task_queue()),
    };
    Ok(TaskService::new(
        stores.tasks.clone(),
        stores.objects.clone(),
        stores.hot.clone(),
        client,
        ServiceConfig {
            task_queue: config.temporal.task_queue.clone(),
            allow_local_sources: config.server.allow_local_sources,
            max_upload_bytes: config.server.max_upload_bytes,
            max_archive_entries: config.server.max_archive_entries,
            max_unpacked_bytes: config.server.max_unpacked_bytes,
            settings,
            // An in-process cache would not see the workers' writes: cache only in Redis.
            status_cache_ttl: config
                .store
                .redis_url
                .is_some()
                .then(|| Duration::from_secs(config.store.status_cache_ttl_secs)),
            idempotency_ttl: Duration::from_secs(config.store.idempotency_ttl_secs),
            rate_limited: config.server.submit_rate_capacity > 0,
            presign_expiry: Duration::from_secs(config.store.presign_expiry_secs),
            secrets: stores.secrets.clone(),
            auth: config.server.auth,
            jwt: jwt_verifier(config)?,
            webhooks: patchflow_gateway::webhooks::WebhookSettings {
                github_secret: config.forge.github_webhook_secret.clone(),
                github_label: config.forge.github_trigger_label.clone(),
                github_tenant: config.forge.github_webhook_tenant.clone(),
                gitlab_secret: config.forge.gitlab_webhook_secret.clone(),
                gitlab_label: config.forge.gitlab_trigger_label.clone(),
                gitlab_tenant: config.forge.gitlab_webhook_tenant.clone(),
            },
            tenants: config.tenancy.tenants.clone(),
            default_model: config.llm.model.clone(),
            workflow_ui_base: config.temporal_ui().map(|ui| {
                format!(
                    "{}/namespaces/{}/workflows",
                    ui.trim_end_matches('/'),
                    config.temporal.temporal_namespace
                )
            }),
        },
    ))
}

/// The forges and credentials pull requests are opened with (the `forge` section).
fn pr_settings(config: &Config) -> anyhow::Result<patchflow_activities::pull_request::PrSettings> {
    use patchflow_platform::forge::{Forge, Forges};
    let f = &config.forge;
    Ok(patchflow_activities::pull_request::PrSettings {
        forges: Forges::from_settings(
            &f.github_hosts,
            &f.github_api_url,
            &f.gitlab_hosts,
            &f.gitlab_api_url,
        ),
        forge: Forge::new().map_err(anyhow::Error::msg)?,
        github_token: f.github_token.clone(),
        github_app: match (&f.github_app_id, &f.github_app_private_key) {
            (Some(id), Some(key)) => Some(
                patchflow_platform::forge::GitHubApp::new(id, key)
                    .map_err(anyhow::Error::msg)
                    .context("github_app_private_key")?,
            ),
            (None, None) => None,
            _ => anyhow::bail!("a GitHub App needs both github_app_id and github_app_private_key"),
        },
        gitlab_token: f.gitlab_token.clone(),
        author_name: f.git_author_name.clone(),
        author_email: f.git_author_email.clone(),
        public_url: config.public_url(),
    })
}

/// The JWT checker `auth = "jwt"` needs (validate() made sure its settings are there).
fn jwt_verifier(
    config: &Config,
) -> anyhow::Result<Option<Arc<patchflow_gateway::jwt::JwtVerifier>>> {
    use patchflow_core::config::AuthMode;
    if config.server.auth != AuthMode::Jwt {
        return Ok(None);
    }
    let s = &config.server;
    let need = |v: &Option<String>, key: &str| {
        v.clone()
            .with_context(|| format!("auth = \"jwt\" needs {key}"))
    };
    let settings = patchflow_gateway::jwt::JwtSettings {
        jwks_url: need(&s.auth_jwt_jwks_url, "auth_jwt_jwks_url")?,
        issuer: need(&s.auth_jwt_issuer, "auth_jwt_issuer")?,
        audience: need(&s.auth_jwt_audience, "auth_jwt_audience")?,
        tenant_claim: s.auth_jwt_tenant_claim.clone(),
        role_claim: s.auth_jwt_role_claim.clone(),
    };
    Ok(Some(Arc::new(
        patchflow_gateway::jwt::JwtVerifier::new(settings).map_err(anyhow::Error::msg)?,
    )))
}

async fn activities(config: &Config, stores: &Stores) -> anyhow::Result<Activities> {
    let runner: Arc<dyn AgentRunner> = match config.kube.runner {
        Runner::Kube => Arc::new(kube_runner(config).await?),
        Runner::Local => {
            patchflow_agent::cli::check_sandbox(config).await.context(
                "the local runner's shell sandbox (`patchflow doctor` shows each layer)",
            )?;
            Arc::new(LocalRunner::new(LocalRunnerConfig {
                program: agent_program()?,
                model: config.llm.model.clone(),
                openai_base_url: config.llm.openai_base_url.clone(),
                openai_api_key: config.llm.openai_api_key.clone(),
                llm_max_retries: config.llm.llm_max_retries,
                llm_retry_backoff_ms: config.llm.llm_retry_backoff_ms,
                agent_env: agent_env(config, true)
                    .into_iter()
                    .chain(model_keys(config))
                    .collect(),
            }))
        }
    };
    Ok(Activities {
        store: stores.tasks.clone(),
        objects: stores.objects.clone(),
        hot: stores.hot.clone(),
        config: ActivityConfig {
            work_root: config.work_root(),
            allow_local_sources: config.server.allow_local_sources,
            git_remotes: RemotePolicy::from_settings(
                &config.server.git_allowed_protocols,
                &config.server.git_allowed_hosts,
            ),
            max_unpacked_bytes: config.server.max_unpacked_bytes,
            max_archive_entries: config.server.max_archive_entries,
            git_fetch_timeout: Duration::from_secs(config.server.git_fetch_timeout_secs),
            secrets: stores.secrets.clone(),
            batch_lease: Duration::from_secs(config.batch.batch_lease_secs),
            pull_requests: pr_settings(config)?,
            environments: patchflow_activities::environment::EnvSettings {
                config: config.clone(),
            },
            // Set by `run_worker`, which polls it.
            worker_queue: None,
        },
        results: crate::kafka::results_topic(config).await?,
        runner,
    })
}

/// The settings the agent process reads besides the model's (the `sandbox` section), as
/// `PATCHFLOW_*` variables: the runners start it with a scrubbed environment. Unset optional
/// ones are left out; so, unset, every agent of this user shares the agent's own default cache
/// of compiled tool code (a per-stack directory would make each new stack compile the tools
/// again).
///
/// With `local` (the agent runs on this machine), `sandbox_toolchains = "auto"` is
/// resolved here, in the worker's own environment: the agent starts with HOME moved to its
/// temp dir, where `~/.rustup` is not. A pod resolves it in its own image.
fn agent_env(config: &Config, local: bool) -> Vec<(String, String)> {
    Config::section_keys("sandbox")
        .iter()
        .chain(&MODEL_KEYS)
        .chain(&["otlp_endpoint"])
        .filter_map(|key| {
            let mut value = config.text(key)?;
            if local && *key == "sandbox_toolchains" && value.trim() == "auto" {
                let found = patchflow_agent::sandbox::toolchains::resolve(&value, |k| {
                    std::env::var(k).ok()
                })
                .unwrap_or_default();
                value = patchflow_agent::sandbox::toolchains::to_setting(&found);
            }
            Some((Config::env_name(key), value))
        })
        .chain(
            // The variables commands keep must reach the agent first (a pod has its own).
            local
                .then(|| {
                    patchflow_core::environment::passthrough(
                        &config.sandbox.shell_env_passthrough,
                        |k| std::env::var(k).ok(),
                    )
                })
                .into_iter()
                .flatten(),
        )
        .collect()
}

/// The model settings the agent reads besides those the runners pass themselves (model,
/// base URL, key, retries).
const MODEL_KEYS: [&str; 4] = ["wire_api", "llm_stream", "default_context_window", "models"];

/// The model table's `api_key_env` variables as the worker has them, for a local agent
/// (a pod gets them from the API key Secret instead: never inline).
fn model_keys(config: &Config) -> Vec<(String, String)> {
    model_key_envs(config)
        .into_iter()
        .filter_map(|var| std::env::var(&var).ok().map(|v| (var, v)))
        .collect()
}

fn model_key_envs(config: &Config) -> Vec<String> {
    let mut vars: Vec<String> = config
        .model_table
        .models
        .0
        .values()
        .filter_map(|p| p.api_key_env.clone())
        .collect();
    vars.sort();
    vars.dedup();
    vars
}

/// The agent binary this build's runners start (`patchflow-agent` beside this one, or
/// this one's `agent` subcommand).
pub fn agent_program() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("cannot find the patchflow executable")?;
    Ok(agent_program_of(&exe))
}

/// The agent binary the runners of the `patchflow` executable at `patchflow` start, if
/// it is of this build (see [`agent_program`]).
pub fn agent_program_of(patchflow: &std::path::Path) -> std::path::PathBuf {
    let program =
        patchflow_activities::runner::agent_program(patchflow, env!("PATCHFLOW_AGENT_BUILD"));
    tracing::info!(agent = %program.display(), "agent program");
    program
}

/// Where the patchflow image keeps the precompiled tool component (deploy/Dockerfile).
const IMAGE_TOOL_CACHE: &str = "/opt/patchflow/tools-cache";

/// The Kubernetes runner, on the cluster the worker runs in or the one `KUBECONFIG` names.
async fn kube_runner(config: &Config) -> anyhow::Result<KubeRunner> {
    let mut c = KubeRunnerConfig::new(
        config.kube.kube_namespace.clone().unwrap_or_default(),
        config.kube.kube_image.clone(),
        config.kube.kube_api_key_secret.clone(),
        config.kube.kube_api_key_secret_key.clone(),
        config.llm.model.clone(),
    );
    c.image_pull_policy = config.kube.kube_image_pull_policy.clone();
    c.service_account = config.kube.kube_service_account.clone();
    c.task_secrets = config.kube.kube_task_secrets.clone();
    c.openai_base_url = config.llm.openai_base_url.clone();
    c.cpu_request = config.kube.kube_cpu_request.clone();
    c.cpu_limit = config.kube.kube_cpu_limit.clone();
    c.memory_request = config.kube.kube_memory_request.clone();
    c.memory_limit = config.kube.kube_memory_limit.clone();
    c.node_selector = config.kube_node_selector()?.into_iter().collect();
    if let Some(t) = &config.kube.kube_tolerations {
        c.tolerations = KubeRunnerConfig::tolerations_from_json(t)
            .map_err(|e| anyhow::anyhow!("kube_tolerations: {e}"))?;
    }
    c.image_pull_secrets = config.kube_image_pull_secrets();
    c.ttl_seconds_after_finished =
        Some(i32::try_from(config.kube.kube_ttl_after_finished_secs).unwrap_or(i32::MAX));
    c.image_pull_grace = Duration::from_secs(config.kube.kube_image_pull_grace_secs);
    c.unschedulable_timeout = Duration::from_secs(config.kube.kube_unschedulable_timeout_secs);
    c.presign_expiry = Duration::from_secs(config.store.presign_expiry_secs);
    // The pod's file system is its own: the image carries the precompiled tools (see
    // deploy/Dockerfile); with other limits they are compiled in the pod, in memory.
    c.model_key_envs = model_key_envs(config);
    c.agent_env = agent_env(config, false)
        .into_iter()
        .filter(|(k, _)| k != "PATCHFLOW_TOOL_CACHE_DIR")
        .chain([(
            "PATCHFLOW_TOOL_CACHE_DIR".to_string(),
            IMAGE_TOOL_CACHE.to_string(),
        )])
        .collect();
    let runner = KubeRunner::infer(c)
        .await
        .context("cannot reach Kubernetes (in-cluster config or KUBECONFIG) for runner = kube")?;
    tracing::info!(namespace = %runner.config.namespace, image = %runner.config.image, "agents run as Kubernetes Jobs");
    Ok(runner)
}

/// Binds one of the gateway's addresses, naming its setting when that fails.
async fn bind(
    addr: &str,
    setting: &str,
) -> anyhow::Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({setting})"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves `GET /metrics` (Prometheus text) on `metrics_addr` until `stop`; `off` (or
/// empty) serves nothing. An address that cannot be bound is a warning, not a failure: the
/// process's work matters more than its metrics.
pub async fn serve_metrics(
    config: &Config,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Option<std::net::SocketAddr> {
    patchflow_platform::metrics::global().set_tenant_labels(config.server.metrics_tenant_labels);
    let addr = config.server.metrics_addr.trim();
    if addr.is_empty() || addr.eq_ignore_ascii_case("off") {
        return None;
    }
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot serve metrics (metrics_addr); going on without them");
            return None;
        }
    };
    let local = listener.local_addr().ok();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                patchflow_platform::metrics::global().encode(),
            )
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    });
    tracing::info!(addr = ?local, "metrics at /metrics");
    local
}

/// Serves the HTTP API until `stop` resolves.
pub async fn serve_http(
    config: &Config,
    service: TaskService,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(
    tokio::task::JoinHandle<anyhow::Result<()>>,
    std::net::SocketAddr,
)> {
    let (listener, addr) = bind(&config.server.http_addr, "PATCHFLOW_HTTP_ADDR").await?;
    tracing::info!(%addr, "HTTP API listening");
    let app = patchflow_gateway::http::router(service);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
            .context("HTTP server failed")
    });
    Ok((task, addr))
}

/// Serves the gRPC API (with health and reflection) until `stop` resolves.
pub async fn serve_grpc(
    config: &Config,
    service: TaskService,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(
    tokio::task::JoinHandle<anyhow::Result<()>>,
    std::net::SocketAddr,
)> {
    let (listener, addr) = bind(&config.server.grpc_addr, "PATCHFLOW_GRPC_ADDR").await?;
    tracing::info!(%addr, "gRPC API listening");
    let task = tokio::spawn(async move {
        patchflow_gateway::grpc::serve(service, listener, stop)
            .await
            .context("gRPC server failed")
    });
    Ok((task, addr))
}

/// Runs a worker until the process is told to stop; a worker error ends the process
/// (non-zero) so a supervisor restarts it, never a live process without a poller.
///
/// Told to stop, it drains: it stops polling at once, lets the agents it runs finish for up
/// to `drain_timeout_secs` (reporting how many are left), then Temporal's worker cancels the
/// rest, which it reports as a retryable failure (`WorkerShutdown`), so another worker runs
/// them again. A second SIGTERM or Ctrl-C stops it without waiting.
pub async fn run_worker(
    config: &Config,
    stores: &Stores,
    client: Client,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let runtime = Runtime::from_current_tokio(Default::default())
        .context("cannot start the Temporal runtime")?;
    let drain = Duration::from_secs(config.temporal.drain_timeout_secs);
    let mut acts = activities(config, stores).await?;
    // This worker's own queue: the stage after its fetch comes here, where the tree is.
    let own_queue = format!(
        "{}-host-{}",
        config.temporal.task_queue,
        patchflow_platform::process::worker_identity()
    );
    acts.config.worker_queue = Some(own_queue.clone());
    // Staged code kept for a local agent that ran elsewhere (or never ran) goes after a while.
    let _sweeper = patchflow_activities::handoff::Sweeper::start(acts.config.work_root.clone());
    // The agents' own queue and slots: a task beyond them waits in Temporal for any
    // worker with a free slot, and never holds up another task's fetch or publish here.
    let (cpus, memory) = machine();
    let max_agents = config.max_agents(cpus, memory);
    let agents_queue = config.agent_task_queue();
    let agents = WorkerOptions::new(agents_queue.clone())
        .graceful_shutdown_period(drain)
        .tuner(agent_tuner(config, max_agents))
        .register_activity::<patchflow_activities::RunAgentActivity>(Arc::new(acts.clone()))
        .build();
    // Workflows, fetch, stage, publish, and the agents of tasks started before the agents
    // had a queue of their own.
    let options = WorkerOptions::new(config.temporal.task_queue.clone())
        .graceful_shutdown_period(drain)
        .register_activities(acts.clone())
        .register_workflow::<CodeTask>()?
        .register_workflow::<patchflow_workflows::OpenPullRequest>()?
        .build();
    let own = WorkerOptions::new(own_queue.clone())
        .graceful_shutdown_period(drain)
        .register_activity::<patchflow_activities::StageCodeActivity>(Arc::new(acts.clone()))
        .build();
    let mut workers = Vec::with_capacity(3);
    for (options, what) in [
        (options, "the Temporal worker"),
        (own, "this worker's own Temporal worker"),
        (agents, "the agents' Temporal worker"),
    ] {
        workers.push(
            Worker::new(&runtime, client.clone(), options)
                .with_context(|| format!("cannot create {what}"))?,
        );
    }
    patchflow_platform::metrics::global().set_agent_slots(max_agents);
    let shutdowns: Vec<_> = workers.iter().map(Worker::shutdown_handle).collect();
    tracing::info!(
        task_queue = %config.temporal.task_queue,
        agents_task_queue = %agents_queue,
        own_task_queue = %own_queue,
        max_agents,
        tuner = %config.temporal.worker_tuner,
        "worker polling"
    );
    let run = async {
        futures::future::join_all(workers.iter_mut().map(Worker::run))
            .await
            .into_iter()
            .collect::<Result<(), _>>()
    };
    tokio::pin!(run);
    let mut stop = stop;
    tokio::select! {
        r = &mut run => return r.context("the worker stopped"),
        _ = stop.wait_for(|s| *s) => {}
    }
    let running = || patchflow_platform::metrics::global().agents_running.get();
    tracing::info!(
        agents_running = running(),
        drain_timeout_secs = drain.as_secs(),
        "worker draining: no new work is taken; running agents may finish"
    );
    for shutdown in &shutdowns {
        shutdown();
    }
    let started = tokio::time::Instant::now();
    // Past the drain, the cancelled agents need a moment to stop and report.
    let deadline = started + drain + Duration::from_secs(30);
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
    let again = shutdown_signal();
    tokio::pin!(again);
    loop {
        tokio::select! {
            r = &mut run => {
                tracing::info!(
                    after_secs = started.elapsed().as_secs_f64(),
                    agents_running = running(),
                    "worker drained"
                );
                return r.context("the worker stopped with an error");
            }
            _ = progress.tick() => {
                let left = drain.saturating_sub(started.elapsed());
                tracing::info!(
                    agents_running = running(),
                    cancel_in_secs = left.as_secs(),
                    "worker draining"
                );
            }
            _ = &mut again => {
                tracing::warn!(agents_running = running(), "stopping at once (second signal); running agents are cut off and retried elsewhere");
                return Ok(());
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(agents_running = running(), "worker did not stop within the drain; exiting");
                return Ok(());
            }
        }
    }
}

/// This machine's CPUs and memory (the cgroup's limits when they are lower).
fn machine() -> (usize, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb * 1024);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    (cpus, total.min(cgroup))
}

/// The agents' slots: `max` fixed, or Temporal's resource-based tuner up to `max`.
fn agent_tuner(config: &Config, max: usize) -> temporalio_sdk::runtime::worker_tuner::WorkerTuner {
    use patchflow_core::config::WorkerTunerKind;
    use temporalio_sdk::runtime::worker_tuner::{
        FixedSizeSlotSupplier, ResourceBasedSlotOptions, ResourceBasedSlotsForType,
        ResourceBasedTunerOptions, SlotSupplier, TunerHolder,
    };
    let activities: SlotSupplier = match config.temporal.worker_tuner {
        WorkerTunerKind::Fixed => FixedSizeSlotSupplier::new(max).into(),
        WorkerTunerKind::Resource => ResourceBasedSlotsForType::new(
            ResourceBasedTunerOptions::builder()
                .target_memory_usage(config.temporal.worker_target_memory)
                .target_cpu_usage(config.temporal.worker_target_cpu)
                .build(),
            ResourceBasedSlotOptions::builder()
                .minimum_slots(1)
                .maximum_slots(max)
                .build(),
        )
        .into(),
    };
    // This worker only runs agents: a few slots for the rest, which it never gets.
    TunerHolder::builder()
        .workflow_task_slot_supplier(FixedSizeSlotSupplier::new(2))
        .activity_task_slot_supplier(activities)
        .local_activity_task_slot_supplier(FixedSizeSlotSupplier::new(2))
        .nexus_task_slot_supplier(FixedSizeSlotSupplier::new(1))
        .build()
        .into()
}

fn stop_channel() -> (
    tokio::sync::watch::Sender<bool>,
    tokio::sync::watch::Receiver<bool>,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let tx2 = tx.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx2.send(true);
    });
    (tx, rx)
}

pub fn stopped(
    rx: &tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

pub async fn migrate(config: Config) -> anyhow::Result<ExitCode> {
    let url = config.database_url();
    patchflow_platform::db::open(&url)
        .await
        .with_context(|| format!("cannot migrate the task store {}", redact_url(&url)))?;
    println!("task store {} is up to date", redact_url(&url));
    Ok(ExitCode::SUCCESS)
}

pub async fn worker(config: Config, kafka: bool) -> anyhow::Result<ExitCode> {
    let stores = open_stores(&config).await?;
    let client = devserver::connect(&config).await?;
    let (_tx, rx) = stop_channel();
    serve_metrics(&config, stopped(&rx)).await;
    let trigger = if kafka {
        let service = service(&config, &stores, client.clone())?;
        let t = crate::kafka::start_trigger(&config, service, rx.clone()).await?;
        if t.is_none() {
            anyhow::bail!("worker --kafka needs kafka_brokers (PATCHFLOW_KAFKA_BROKERS)");
        }
        t
    } else {
        None
    };
    run_worker(&config, &stores, client, rx).await?;
    crate::kafka::join_trigger(trigger).await?;
    Ok(ExitCode::SUCCESS)
}

/// Who may call this gateway: with `auth = "tokens"` and no token yet, an admin token is
/// made (`PATCHFLOW_BOOTSTRAP_TOKEN`, or a new one into `<data_dir>/admin.token`, whose
/// path, never the token, is printed); with `auth = "none"`, a loud warning.
async fn bootstrap_auth(config: &Config, service: &TaskService) -> anyhow::Result<()> {
    use patchflow_core::config::AuthMode;
    match config.server.auth {
        AuthMode::None => {
            tracing::warn!(
                "auth = none: ANYONE WHO REACHES THIS GATEWAY MAY READ, SUBMIT AND CANCEL EVERY TASK (loopback only)"
            );
            eprintln!(
                "patchflow: WARNING: auth is off (auth = none); every task is open to anyone on this machine"
            );
        }
        AuthMode::Tokens | AuthMode::Jwt => {
            let preset = std::env::var(patchflow_gateway::auth::BOOTSTRAP_TOKEN_ENV)
                .ok()
                .filter(|t| !t.trim().is_empty())
                .map(|t| patchflow_core::Secret::new(t.trim()));
            if let Some(path) = service
                .bootstrap_admin(&config.server.data_dir, preset)
                .await
                .context("cannot make the first admin token")?
            {
                eprintln!(
                    "patchflow: an admin token was written to {} (mode 0600); clients on this machine use it",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

pub async fn gateway(config: Config) -> anyhow::Result<ExitCode> {
    let stores = open_stores(&config).await?;
    let client = devserver::connect(&config).await?;
    let (_tx, rx) = stop_channel();
    serve_metrics(&config, stopped(&rx)).await;
    let service = service(&config, &stores, client)?;
    bootstrap_auth(&config, &service).await?;
    let trigger = crate::kafka::start_trigger(&config, service.clone(), rx.clone()).await?;
    let (http, _) = serve_http(&config, service.clone(), stopped(&rx)).await?;
    let (grpc, _) = serve_grpc(&config, service, stopped(&rx)).await?;
    http.await.context("HTTP task panicked")??;
    grpc.await.context("gRPC task panicked")??;
    crate::kafka::join_trigger(trigger).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn up(config: Config) -> anyhow::Result<ExitCode> {
    let dev = if config.embedded_temporal() {
        tracing::info!(
            port = config.temporal.temporal_port,
            ui_port = config.temporal.temporal_ui_port,
            "starting the Temporal dev server"
        );
        Some(DevServer::start(&config).await?)
    } else {
        None
    };
    let result = async {
        let stores = open_stores(&config).await?;
        let client = devserver::connect(&config).await?;
        let (tx, rx) = stop_channel();
        serve_metrics(&config, stopped(&rx)).await;
        let service = service(&config, &stores, client.clone())?;
        bootstrap_auth(&config, &service).await?;
        let trigger = crate::kafka::start_trigger(&config, service.clone(), rx.clone()).await?;
        let (http, _) = serve_http(&config, service.clone(), stopped(&rx)).await?;
        let (grpc, _) = serve_grpc(&config, service, stopped(&rx)).await?;
        eprintln!(
            "patchflow is up: API http://{}  gRPC {}  Temporal {}{}",
            config.server.http_addr,
            config.server.grpc_addr,
            config.temporal_url(),
            config
                .temporal_ui()
                .map(|u| format!("  Web UI {u}"))
                .unwrap_or_default()
        );
        let worker = run_worker(&config, &stores, client, rx).await;
        // Whatever ended the worker ends the gateway too.
        let _ = tx.send(true);
        let http = http.await.context("HTTP task panicked")?;
        let grpc = grpc.await.context("gRPC task panicked")?;
        let trigger = crate::kafka::join_trigger(trigger).await;
        worker.and(http).and(grpc).and(trigger)
    }
    .await;
    if let Some(dev) = dev {
        dev.stop().await;
    }
    result.map(|()| ExitCode::SUCCESS)
}
