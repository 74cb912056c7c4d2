//! What the suites share: a tool host (compiled once, then loaded from a cache), the
//! sandboxed tools over a temporary workspace, a recording HTTP server and a helper that
//! runs the whole agent loop against the scripted model.
// Test set-up that cannot work should stop the test right there, with its panic message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use patchflow_agent::sandbox::{SandboxMode, ShellSandbox};
use patchflow_agent::tools::{GuestRunner, HostHandle, WorkspaceDocs};
use patchflow_agent::wasm::egress::Egress;
use patchflow_agent::wasm::{CallLimits, HostOptions, TOOLS_COMPONENT, ToolHost};
use patchflow_agent::{AgentRun, SandboxedTools, ShellEnv, Workspace};
use patchflow_core::{AgentSummary, TaskSource, TaskSpec, ToolPolicy};
use patchflow_scripted_model::{Script, ScriptedModel};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The hostile guest from `tools-wasm/probe` (loops in read-file, hoards in search-code).
pub fn probe_component() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(env!("PATCHFLOW_TOOLS_PROBE_WASM")).expect("probe wasm"))
}

fn cache_dir() -> PathBuf {
    std::env::temp_dir().join("patchflow-agent-tests-wasm-cache")
}

pub fn host(component: &'static [u8], limits: CallLimits) -> Arc<ToolHost> {
    let options = HostOptions {
        limits,
        cache_dir: Some(cache_dir()),
    };
    Arc::new(ToolHost::new(component, &options).expect("tool host"))
}

/// A workspace with a couple of files and the sandboxed tools over it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub scratch: tempfile::TempDir,
    pub tools: SandboxedTools,
}

impl Fixture {
    pub fn ws(&self) -> &Path {
        self.dir.path()
    }
}

pub fn sandbox(scratch: &Path, network: bool, max_processes: u64) -> ShellSandbox {
    let mut sb = ShellSandbox::new(
        PathBuf::from(env!("CARGO_BIN_EXE_patchflow-sandbox-exec")),
        scratch,
        SandboxMode::Strict,
    );
    sb.network = network;
    sb.max_processes = max_processes;
    sb.max_memory_bytes = 4 << 30;
    sb.max_file_bytes = 64 << 20;
    sb.toolchains =
        patchflow_agent::sandbox::toolchains::resolve("auto", |k| std::env::var(k).ok())
            .expect("toolchains");
    sb
}

pub struct Setup {
    pub component: &'static [u8],
    pub limits: CallLimits,
    pub egress: Egress,
    pub network: bool,
    pub max_processes: u64,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            component: TOOLS_COMPONENT,
            limits: CallLimits::default(),
            egress: Egress::none(),
            network: false,
            max_processes: 256,
        }
    }
}

pub fn fixture(setup: Setup) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.py"), "x = 1\ny = 1\n").unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let ws = Workspace::new(dir.path()).unwrap();
    let guest = GuestRunner {
        host: HostHandle::ready(host(setup.component, setup.limits)),
        root: ws.root().to_path_buf(),
    };
    let docs = Arc::new(WorkspaceDocs {
        guest: guest.clone(),
        ws: ws.clone(),
    });
    let scratch_path = scratch.path().canonicalize().unwrap();
    let tools = SandboxedTools::new(
        ws,
        guest,
        ShellEnv::minimal(&scratch_path),
        sandbox(&scratch_path, setup.network, setup.max_processes),
        setup.egress,
        docs,
        Instant::now() + Duration::from_secs(600),
    );
    Fixture {
        dir,
        scratch,
        tools,
    }
}

pub fn err(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

/// One request as the test server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub head: String,
    pub body: String,
}

/// A tiny HTTP/1.1 server on 127.0.0.1 that records what reaches it and answers with the
/// request's headers echoed back as JSON (so a leak through the response would show).
pub struct TestServer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<Mutex<u64>>,
}

impl TestServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (s, c) = (seen.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                *c.lock().unwrap() += 1;
                let s = s.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        let n = match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
                    s.lock().unwrap().push(Seen {
                        head: head.clone(),
                        body,
                    });
                    let answer = json!({"ok": true, "request_head": head}).to_string();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-echo: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                        head.lines()
                            .find(|l| l.to_ascii_lowercase().starts_with("x-api-key"))
                            .unwrap_or("none")
                            .replace(['\r', '\n'], ""),
                        answer.len()
                    );
                    let _ = sock.write_all(response.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Self {
            addr,
            seen,
            connections,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn connections(&self) -> u64 {
        *self.connections.lock().unwrap()
    }
}

/// Packs `dir` as the baseline archive the agent diffs against (tar + zstd).
fn pack(dir: &Path, out: &Path) {
    let file = std::fs::File::create(out).unwrap();
    let enc = zstd::Encoder::new(file, 3).unwrap().auto_finish();
    let mut tar = tar::Builder::new(enc);
    tar.append_dir_all(".", dir).unwrap();
    tar.finish().unwrap();
}

/// Runs the agent loop over `fx`'s tools with the scripted model playing `calls` then
/// `finish`; returns the summary and the transcript text.
pub async fn run_agent(fx: Fixture, calls: Vec<(&str, Value)>) -> (AgentSummary, String) {
    run_script(fx, Script::calls_then_finish(calls), None).await
}

/// [`run_agent`] with a whole script, and the task's `target_file`.
pub async fn run_script(
    fx: Fixture,
    script: Script,
    target_file: Option<&str>,
) -> (AgentSummary, String) {
    let model = ScriptedModel::start(script, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let baseline = work.path().join("code.tar.zst");
    pack(fx.ws(), &baseline);
    let out = work.path().join("out");
    let mut spec = TaskSpec::new(TaskSource::Archive { key: "t".into() }, "test");
    spec.policy = ToolPolicy::default();
    spec.target_file = target_file.map(str::to_string);
    let run = AgentRun {
        spec,
        workspace: fx.ws().to_path_buf(),
        baseline,
        out_dir: out.clone(),
        settings: patchflow_agent::ModelSettings::new("scripted", Some(model.base_url()), None),
        model_override: None,
        resume: None,
        max_retries: 0,
        retry_backoff: Duration::from_millis(10),
    };
    let summary = run.run(Arc::new(fx.tools), |_| {}).await.unwrap();
    let transcript = std::fs::read_to_string(out.join("transcript.jsonl")).unwrap();
    assert!(
        model.observed().violations.is_empty(),
        "{:?}",
        model.observed().violations
    );
    (summary, transcript)
}

/// The `output` of every tool result in a transcript, in order.
pub fn tool_outputs(transcript: &str) -> Vec<Value> {
    transcript
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "tool_result")
        .map(|v| v["output"].clone())
        .collect()
}
