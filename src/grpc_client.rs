//! The gRPC side of the CLI: `submit --grpc` (a ZIP streams in chunks) and `watch`, which
//! follows a task over `WatchTask` and, when the connection drops, resumes after the last
//! event it printed, so nothing is missed or printed twice. The arguments and the ZIP
//! packing are the HTTP client's (crate::client); the arrow points one way, from here.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use patchflow_core::Config;
use patchflow_gateway::grpc::proto;
use proto::tasks_client::TasksClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::client::{GrpcServerOpt, SubmitArgs, zip_directory};

/// Size of one upload chunk (well under gRPC's 4 MiB message limit).
const CHUNK_BYTES: usize = 256 * 1024;

#[derive(Debug, Args)]
pub struct WatchArgs {
    pub task_id: String,
    /// Resume after this event (the `seq` of the last one seen).
    #[arg(long, default_value_t = 0)]
    pub after: i64,
    /// Print each event and the final record as JSON lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: GrpcServerOpt,
}

/// Adds the caller's `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .context("the token has characters gRPC metadata cannot carry")
            })
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = TasksClient<InterceptedService<Channel, Bearer>>;

pub async fn connect(url: &str, token: Option<&str>) -> anyhow::Result<Client> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("`{url}` is not a gRPC URL"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the patchflow gRPC API at {url}: is `patchflow up` running?")
        })?;
    Ok(TasksClient::with_interceptor(channel, Bearer::new(token)?)
        .max_decoding_message_size(64 * 1024 * 1024))
}

/// A gRPC error as the CLI shows it: the server's message and the code.
fn failed(s: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

fn options(a: &SubmitArgs) -> anyhow::Result<proto::TaskOptions> {
    let limits = (a.max_steps.is_some()
        || a.max_tokens.is_some()
        || a.wall_seconds.is_some()
        || a.max_cost_usd.is_some())
    .then(|| proto::Limits {
        max_steps: a.max_steps.unwrap_or(0),
        max_tokens: a.max_tokens.unwrap_or(0),
        wall_seconds: a.wall_seconds.unwrap_or(0),
        max_cost_usd: a.max_cost_usd,
    });
    Ok(proto::TaskOptions {
        task_description: a.task_description.clone(),
        target_file: a.target_file.clone(),
        model: a.task_model.clone(),
        limits,
        idempotency_key: a.idempotency_key.clone(),
        environment: a.environment.clone(),
        setup_json: match &a.setup {
            Some(p) if p.as_os_str() == "-" => Some(std::io::read_to_string(std::io::stdin())?),
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?,
            ),
            None => None,
        },
        candidates: a.candidates,
        auto_select: a.auto_select.clone(),
        ..proto::TaskOptions::default()
    })
}

/// `patchflow submit --grpc`: a git URL through `SubmitTask`, a directory or ZIP through
/// the chunked `UploadTask`.
pub async fn submit(config: &Config, a: SubmitArgs) -> anyhow::Result<ExitCode> {
    let url = a.grpc_server.url(config);
    let token = crate::settings::client_token(config);
    let mut client = connect(&url, token.as_deref()).await?;
    let local = PathBuf::from(&a.source);
    let response = if local.exists() {
        let _guard;
        let zip_path = if local.is_dir() {
            let z =
                zip_directory(&local).with_context(|| format!("cannot zip {}", local.display()))?;
            let p = z.path().to_path_buf();
            _guard = Some(z);
            p
        } else {
            _guard = None;
            local.clone()
        };
        let bytes = tokio::fs::read(&zip_path)
            .await
            .with_context(|| format!("cannot read {}", zip_path.display()))?;
        let mut messages = vec![proto::UploadTaskRequest {
            part: Some(proto::upload_task_request::Part::Options(options(&a)?)),
        }];
        messages.extend(bytes.chunks(CHUNK_BYTES).map(|c| proto::UploadTaskRequest {
            part: Some(proto::upload_task_request::Part::Chunk(c.to_vec())),
        }));
        client
            .upload_task(futures::stream::iter(messages))
            .await
            .map_err(|s| failed(&s))?
    } else {
        client
            .submit_task(proto::SubmitTaskRequest {
                git_url: a.source.clone(),
                git_ref: a.git_ref.clone(),
                options: Some(options(&a)?),
                git_token: a.git_token.as_ref().map(|t| t.expose().to_string()),
            })
            .await
            .map_err(|s| failed(&s))?
    }
    .into_inner();
    println!("{}", response.task_id);
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    watch_task(&url, token.as_deref(), &response.task_id, 0, a.json).await
}

pub async fn watch(config: &Config, a: WatchArgs) -> anyhow::Result<ExitCode> {
    let token = crate::settings::client_token(config);
    watch_task(
        &a.server.url(config),
        token.as_deref(),
        &a.task_id,
        a.after,
        a.json,
    )
    .await
}

/// Prints a task's events until the final record; exits 0 only if it COMPLETED.
async fn watch_task(
    url: &str,
    token: Option<&str>,
    id: &str,
    after: i64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use proto::watch_task_response::Item;
    let mut after = after;
    let mut failures = 0u32;
    let mut stderr = std::io::stderr();
    loop {
        let stream = async {
            let mut client = connect(url, token).await?;
            client
                .watch_task(proto::WatchTaskRequest {
                    task_id: id.to_string(),
                    after_seq: after,
                })
                .await
                .map_err(|s| failed(&s))
        }
        .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            // An answer from the server (unknown task, bad id) is final.
            Err(e)
                if e.to_string().contains("(NotFound)")
                    || e.to_string().contains("(InvalidArgument)") =>
            {
                return Err(e);
            }
            Err(e) => {
                failures += 1;
                if failures > 5 {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(msg)) => match msg.item {
                    Some(Item::Event(ev)) => {
                        after = ev.seq;
                        failures = 0;
                        if json {
                            println!("{}", event_json(&ev));
                        } else {
                            let status = ev.status.as_deref().unwrap_or("");
                            let _ = writeln!(stderr, "{}  {:<18} {}", ev.at, status, ev.message);
                        }
                    }
                    Some(Item::Final(task)) => {
                        if json {
                            println!(
                                "{}",
                                serde_json::json!({"final": {"task_id": task.task_id, "status": task.status, "message": task.message, "attempt": task.attempt}})
                            );
                        } else {
                            println!("{}  {}  {}", task.task_id, task.status, task.message);
                        }
                        return Ok(if task.status == "COMPLETED" {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::FAILURE
                        });
                    }
                    None => {}
                },
                // The stream ended without the final record: resume after the last event.
                Ok(None) => break,
                Err(s)
                    if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown =>
                {
                    failures += 1;
                    if failures > 5 {
                        bail!("the watch of {id} keeps failing: {}", s.message());
                    }
                    break;
                }
                Err(s) => return Err(failed(&s)),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn event_json(ev: &proto::TaskEvent) -> serde_json::Value {
    serde_json::json!({"seq": ev.seq, "kind": ev.kind, "status": ev.status, "message": ev.message, "at": ev.at})
}
