//! Test harness: real processes (`patchflow up`, or a Temporal dev server with separate
//! `gateway` and `worker` processes), a real git repository, and the scripted model running
//! in the test process so tests can read what it saw.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use patchflow_core::{TaskEvent, TaskStatus};
use patchflow_scripted_model::{Script, ScriptedModel};
use serde_json::Value;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_patchflow"))
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A port no other test of this run holds, for a server a test starts.
///
/// Asking the kernel for port 0 and letting go is not enough when tests run in parallel:
/// the kernel hands a released port to the next caller (an outgoing connection, or another
/// test's server), and a stack that loses the race for its own port would answer health
/// checks through somebody else's. So ports come from below the kernel's ephemeral range
/// (`ip_local_port_range` starts at 32768), where outgoing connections never land, and each
/// is claimed by a file naming this test process; a claim whose process is gone is stale.
pub fn free_port() -> u16 {
    use std::io::Write;
    let claims = std::env::temp_dir().join("patchflow-test-ports");
    std::fs::create_dir_all(&claims).unwrap();
    let me = std::process::id();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    for i in 0..2000u32 {
        let port = 20_000
            + ((seed ^ me.wrapping_mul(2_654_435_761)).wrapping_add(i * 7919) % 12_000) as u16;
        let claim = claims.join(port.to_string());
        let taken = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&claim)
        {
            Ok(mut f) => {
                f.write_all(me.to_string().as_bytes()).unwrap();
                false
            }
            Err(_) => {
                let holder = std::fs::read_to_string(&claim).unwrap_or_default();
                let alive = holder.trim().parse::<u32>().is_ok_and(|pid| {
                    pid == me || std::path::Path::new(&format!("/proc/{pid}")).exists()
                });
                // A stale claim is taken over by whoever renames first.
                let tmp = claims.join(format!("{port}.{me}"));
                alive
                    || std::fs::write(&tmp, me.to_string()).is_err()
                    || std::fs::rename(&tmp, &claim).is_err()
                    || std::fs::read_to_string(&claim).unwrap_or_default() != me.to_string()
            }
        };
        if !taken && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free test port below the ephemeral range");
}

/// The model request bodies whose last user message holds `text` (a turn's first request).
pub fn requests_asking(bodies: &[Value], text: &str) -> Vec<Value> {
    bodies
        .iter()
        .filter(|b| {
            b["messages"].as_array().is_some_and(|m| {
                m.iter()
                    .rev()
                    .find(|m| m["role"] == "user")
                    .is_some_and(|m| m["content"].as_str().unwrap_or_default().contains(text))
            })
        })
        .cloned()
        .collect()
}

/// The demo's script, as the demo runs it.
pub fn demo_script() -> Script {
    Script::from_json(
        &std::fs::read_to_string(repo_root().join("examples/demo-script.json")).unwrap(),
    )
    .unwrap()
}

/// A copy of `examples/demo-repo` committed to a fresh git repository; returns its path.
pub fn demo_git_repo(dir: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let repo = dir.join(if n == 0 {
        "demo-repo".to_string()
    } else {
        format!("demo-repo-{n}")
    });
    std::fs::create_dir_all(&repo).unwrap();
    for f in ["calc.py", "test_calc.py", "README.md"] {
        std::fs::copy(repo_root().join("examples/demo-repo").join(f), repo.join(f)).unwrap();
    }
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "."]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@localhost",
        "commit",
        "-qm",
        "demo",
    ]);
    repo
}

/// A child process in its own group, killed with its group when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL to the process only (not its group): a crash, as the durability test needs.
    pub fn kill9(&mut self) {
        let _ = nix::sys::signal::kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Graceful stop: SIGTERM, then SIGKILL to the group after a grace period.
    pub fn terminate(&mut self) {
        let _ = nix::sys::signal::kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Which processes make up a stack.
pub enum Mode {
    /// `patchflow up`: gateway, worker and the embedded dev server in one process.
    Up,
    /// A harness-started dev server, and `patchflow gateway` + `patchflow worker` apart.
    Split,
}

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub base: String,
    /// The gRPC API's address, as a URL (`http://127.0.0.1:PORT`).
    pub grpc: String,
    pub model: ScriptedModel,
    pub temporal_port: u16,
    pub env: Vec<(String, String)>,
    pub temporal: Option<Proc>,
    pub up: Option<Proc>,
    pub gateway: Option<Proc>,
    pub extra_gateways: Vec<Proc>,
    pub workers: Vec<Proc>,
    /// Sends the admin token with every request (`admin.token`, written at start-up).
    pub http: reqwest::Client,
    /// The bootstrap admin token of the stack.
    pub token: String,
    /// `patchflow up`'s (or the first process's) metrics, as a URL (`…/metrics`).
    pub metrics: String,
}

/// Adds `authorization: Bearer <token>` to every gRPC call.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    }
}

pub type Grpc = patchflow_gateway::grpc::proto::tasks_client::TasksClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// A reqwest client that sends `token` with every request.
pub fn http_with(token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

impl Stack {
    pub async fn start(mode: Mode, script: Script, extra_env: &[(&str, &str)]) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let model = ScriptedModel::start(script, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let http_port = free_port();
        let grpc_port = free_port();
        let temporal_port = free_port();
        let metrics_port = free_port();
        let mut env: Vec<(String, String)> = vec![
            (
                "PATCHFLOW_METRICS_ADDR".into(),
                format!("127.0.0.1:{metrics_port}"),
            ),
            ("PATCHFLOW_DATA_DIR".into(), data_dir.display().to_string()),
            (
                "PATCHFLOW_HTTP_ADDR".into(),
                format!("127.0.0.1:{http_port}"),
            ),
            (
                "PATCHFLOW_GRPC_ADDR".into(),
                format!("127.0.0.1:{grpc_port}"),
            ),
            ("PATCHFLOW_TEMPORAL_PORT".into(), temporal_port.to_string()),
            ("PATCHFLOW_TEMPORAL_UI_PORT".into(), free_port().to_string()),
            ("PATCHFLOW_ALLOW_LOCAL_SOURCES".into(), "true".into()),
            ("OPENAI_BASE_URL".into(), model.base_url()),
            ("PATCHFLOW_MODEL".into(), "scripted-test".into()),
            ("PATCHFLOW_LLM_MAX_RETRIES".into(), "1".into()),
            ("PATCHFLOW_LLM_RETRY_BACKOFF_MS".into(), "50".into()),
            ("PATCHFLOW_RETRY_INITIAL_INTERVAL_MS".into(), "200".into()),
            ("RUST_LOG".into(), "info,temporalio_sdk_core=warn".into()),
            // Tests talk to loopback only: never ask a cloud metadata endpoint for credentials.
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ];
        if matches!(mode, Mode::Split) {
            env.push((
                "TEMPORAL_ADDRESS".into(),
                format!("127.0.0.1:{temporal_port}"),
            ));
        }
        let mut data_dir = data_dir;
        for (k, v) in extra_env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
            if *k == "PATCHFLOW_DATA_DIR" {
                data_dir = PathBuf::from(v);
            }
        }
        let mut stack = Stack {
            base: format!("http://127.0.0.1:{http_port}"),
            grpc: format!("http://127.0.0.1:{grpc_port}"),
            dir,
            data_dir,
            model,
            temporal_port,
            env,
            temporal: None,
            up: None,
            gateway: None,
            extra_gateways: Vec::new(),
            workers: Vec::new(),
            http: reqwest::Client::new(),
            token: String::new(),
            metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
        };
        match mode {
            Mode::Up => {
                stack.up = Some(stack.spawn_patchflow("up", &["up"]));
            }
            Mode::Split => {
                stack.temporal = Some(stack.start_temporal());
                stack.gateway = Some(stack.spawn_patchflow("gateway", &["gateway"]));
                stack.start_worker();
            }
        }
        stack.wait_healthy().await;
        if let Ok(t) = std::fs::read_to_string(stack.data_dir.join("admin.token")) {
            stack.token = t.trim().to_string();
            stack.http = http_with(Some(&stack.token));
        }
        stack
    }

    /// Kills `patchflow up` (and with it the embedded Temporal, whose database is kept)
    /// with SIGKILL, and starts it again on the same data directory.
    pub async fn kill_and_restart_up(&mut self) {
        if let Some(mut up) = self.up.take() {
            let group = Pid::from_raw(up.pid());
            up.kill9();
            // Its children (the dev server, an agent) go down with it, as in a crash.
            let _ = killpg(group, Signal::SIGKILL);
        }
        let data_dir = self.data_dir.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !processes_mentioning(&data_dir).is_empty() {
            assert!(Instant::now() < deadline, "the old stack outlived SIGKILL");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.up = Some(self.spawn_patchflow("up", &["up"]));
        self.wait_healthy().await;
    }

    /// A gRPC client of this stack's gateway with `token` (default: the admin token).
    pub async fn grpc_as(&self, token: Option<&str>) -> Grpc {
        let channel = tonic::transport::Endpoint::from_shared(self.grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        patchflow_gateway::grpc::proto::tasks_client::TasksClient::with_interceptor(
            channel,
            Bearer(token.map(str::to_string)),
        )
        .max_decoding_message_size(64 * 1024 * 1024)
    }

    /// A gRPC client with the admin token.
    pub async fn grpc_client(&self) -> Grpc {
        self.grpc_as(Some(&self.token.clone())).await
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env_remove("TEMPORAL_ADDRESS")
            .env_remove("OPENAI_API_KEY")
            .env_remove("PATCHFLOW_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    fn spawn_patchflow(&self, name: &str, args: &[&str]) -> Proc {
        self.spawn_patchflow_with(name, args, &[])
    }

    pub fn spawn_patchflow_with(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let log = self.dir.path().join(format!("{name}-{n}.log"));
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied());
        Proc::spawn(name, cmd, log)
    }

    /// Another gateway process on its own port, sharing everything else; returns its base URL.
    pub async fn start_extra_gateway(&mut self) -> String {
        self.start_extra_gateway_with_grpc().await.0
    }

    /// [`Stack::start_extra_gateway`], with its gRPC address too (`http://127.0.0.1:PORT`).
    pub async fn start_extra_gateway_with_grpc(&mut self) -> (String, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let grpc = format!("127.0.0.1:{}", free_port());
        let p = self.spawn_patchflow_with(
            "gateway",
            &["gateway"],
            &[
                ("PATCHFLOW_HTTP_ADDR", &addr),
                ("PATCHFLOW_GRPC_ADDR", &grpc),
            ],
        );
        self.extra_gateways.push(p);
        let base = format!("http://{addr}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.http.get(format!("{base}/healthz")).send().await
                && r.status().is_success()
            {
                return (base, format!("http://{grpc}"));
            }
            assert!(
                Instant::now() < deadline,
                "the extra gateway did not start:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn start_worker(&mut self) -> usize {
        let p = self.spawn_patchflow("worker", &["worker"]);
        self.workers.push(p);
        self.workers.len() - 1
    }

    pub fn start_temporal(&self) -> Proc {
        let mut cmd = Command::new("temporal");
        cmd.args([
            "server",
            "start-dev",
            "--headless",
            "--ip",
            "127.0.0.1",
            "--log-level",
            "error",
        ])
        .args(["--port", &self.temporal_port.to_string()]);
        let p = Proc::spawn("temporal", cmd, self.dir.path().join("temporal.log"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ok = self
                .temporal_cli(&[
                    "operator",
                    "namespace",
                    "describe",
                    "--namespace",
                    "default",
                ])
                .status
                .success();
            if ok {
                return p;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the Temporal dev server did not start: {}", p.log_text());
    }

    /// Runs the `temporal` CLI against this stack's server.
    pub fn temporal_cli(&self, args: &[&str]) -> std::process::Output {
        Command::new("temporal")
            .args(args)
            .args(["--address", &format!("127.0.0.1:{}", self.temporal_port)])
            .output()
            .unwrap()
    }

    /// The workflow history of a task, as the `temporal` CLI shows it (JSON).
    pub fn history(&self, task_id: &str) -> Value {
        let out = self.temporal_cli(&[
            "workflow",
            "show",
            "--workflow-id",
            task_id,
            "--output",
            "json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The workflow's description once it has closed. The task record reaches its final
    /// status a moment before the workflow itself completes, so this waits for that; an
    /// ended task's workflow waits for follow-ups, so it is asked to close (the `close`
    /// signal a retry sends too).
    pub async fn closed_workflow(&self, task_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut asked = false;
        loop {
            let out = self.temporal_cli(&[
                "workflow",
                "describe",
                "--workflow-id",
                task_id,
                "--output",
                "json",
            ]);
            let desc: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let status = desc["workflowExecutionInfo"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if !status.is_empty() && status != "WORKFLOW_EXECUTION_STATUS_RUNNING" {
                return desc;
            }
            if !asked && !status.is_empty() {
                asked = true;
                self.temporal_cli(&[
                    "workflow",
                    "signal",
                    "--workflow-id",
                    task_id,
                    "--name",
                    "close",
                    "--input",
                    "null",
                ]);
            }
            assert!(
                Instant::now() < deadline,
                "workflow {task_id} did not close: {desc}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The attempts Temporal recorded for each start of an activity type.
    pub fn activity_attempts(&self, task_id: &str, activity: &str) -> Vec<u64> {
        let h = self.history(task_id);
        let events = h["events"].as_array().cloned().unwrap_or_default();
        let mut scheduled_ids = Vec::new();
        for e in &events {
            let attrs = &e["activityTaskScheduledEventAttributes"];
            if attrs["activityType"]["name"] == activity {
                scheduled_ids.push(
                    e["eventId"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| e["eventId"].to_string()),
                );
            }
        }
        events
            .iter()
            .filter_map(|e| {
                let a = &e["activityTaskStartedEventAttributes"];
                let sid = a["scheduledEventId"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| a["scheduledEventId"].to_string());
                scheduled_ids
                    .contains(&sid)
                    .then(|| a["attempt"].as_u64().unwrap_or(1))
            })
            .collect()
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.base)).send().await
                && r.status().is_success()
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("the stack did not become healthy:\n{}", self.logs());
            }
            for p in self.up.iter().chain(self.gateway.iter()) {
                if has_exited(p) {
                    panic!("{} exited during start-up:\n{}", p.name, p.log_text());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every process log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in self
            .up
            .iter()
            .chain(self.gateway.iter())
            .chain(self.workers.iter())
            .chain(self.temporal.iter())
        {
            s.push_str(&format!(
                "----- {} ({}) -----\n{}\n",
                p.name,
                p.log.display(),
                p.log_text()
            ));
        }
        s
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }

    /// Submits the demo repository (as a fresh git repository) to the gateway at `base`;
    /// asserts 202 and returns the task id.
    pub async fn submit_demo_to(&self, base: &str) -> String {
        let repo = demo_git_repo(self.dir.path());
        let body = serde_json::json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix"});
        let r = self
            .http
            .post(format!("{base}/api/tasks"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        r.json::<Value>().await.unwrap()["task_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// [`Stack::submit_demo_to`] this stack's gateway.
    pub async fn submit_demo(&self) -> String {
        self.submit_demo_to(&self.base).await
    }

    /// One scrape of the stack's metrics (Prometheus text).
    pub async fn scrape(&self) -> String {
        reqwest::get(&self.metrics)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn record(&self, id: &str) -> Value {
        let (status, v) = self.get_json(&format!("/api/tasks/{id}")).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Waits until the task's status satisfies `done`; panics with the logs on timeout.
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(TaskStatus) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.record(id).await;
            let status: TaskStatus = serde_json::from_value(r["status"].clone()).unwrap();
            if done(status) {
                return r;
            }
            if Instant::now() > deadline {
                panic!(
                    "task {id} stuck in {status} ({}):\n{}",
                    r["message"],
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_terminal(&self, id: &str) -> Value {
        self.wait_for(id, Duration::from_secs(120), |s| s.is_terminal())
            .await
    }

    /// Waits until attempt `attempt` of the task has ended; returns the record.
    pub async fn wait_attempt_ends(&self, id: &str, attempt: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = self.record(id).await;
            let status: TaskStatus = serde_json::from_value(r["status"].clone()).unwrap();
            if r["attempt"] == attempt && status.is_terminal() {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "attempt {attempt} of {id} did not end: {r}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn events(&self, id: &str) -> Vec<TaskEvent> {
        let (status, v) = self.get_json(&format!("/api/tasks/{id}/events")).await;
        assert_eq!(status, 200, "{v}");
        serde_json::from_value(v["events"].clone()).unwrap()
    }

    pub async fn statuses(&self, id: &str) -> Vec<TaskStatus> {
        self.events(id)
            .await
            .into_iter()
            .filter_map(|e| e.status)
            .collect()
    }

    /// Runs a `patchflow` client command against this stack.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().unwrap()
    }
}

/// Whether a process is gone (or a zombie), without needing `&mut Child`.
fn has_exited(p: &Proc) -> bool {
    let alive = nix::sys::signal::kill(Pid::from_raw(p.pid()), None).is_ok();
    let zombie = std::fs::read_to_string(format!("/proc/{}/stat", p.pid()))
        .map(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
        .unwrap_or(true);
    !alive || zombie
}

/// Processes whose command line mentions `needle` (e.g. a task id in an agent's arguments).
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat.split(") ").nth(1).is_some_and(|r| r.starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// The distributed back-ends a stack can run on, each a real server on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    Sqlite,
    Postgres,
    MySql,
}

/// A database created for one test and dropped with it.
pub struct TestDatabase {
    pub kind: Database,
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub fn create(kind: Database, dir: &Path) -> TestDatabase {
        let name = format!(
            "pf_e2e_{}",
            &patchflow_core::TaskId::generate().as_str()[4..20]
        );
        let url = match kind {
            Database::Sqlite => format!("sqlite://{}", dir.join("patchflow.db").display()),
            Database::Postgres => {
                let out = Command::new("psql")
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-U",
                        "postgres",
                        "-d",
                        "test",
                        "-c",
                        &format!("CREATE DATABASE {name}"),
                    ])
                    .output()
                    .expect("psql is needed for the PostgreSQL tests");
                assert!(
                    out.status.success(),
                    "cannot create {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                format!("postgres://postgres@127.0.0.1:5432/{name}")
            }
            Database::MySql => {
                let out = Command::new("mysql")
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-u",
                        "root",
                        "-e",
                        &format!("CREATE DATABASE {name}"),
                    ])
                    .output()
                    .expect("the mysql client is needed for the MariaDB tests");
                assert!(
                    out.status.success(),
                    "cannot create {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                format!("mysql://root@127.0.0.1:3306/{name}")
            }
        };
        TestDatabase { kind, name, url }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {}", self.name);
        let _ = match self.kind {
            Database::Sqlite => return,
            Database::Postgres => Command::new("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    "test",
                    "-c",
                    &sql,
                ])
                .output(),
            Database::MySql => Command::new("mysql")
                .args(["-h", "127.0.0.1", "-u", "root", "-e", &sql])
                .output(),
        };
    }
}

/// An S3-compatible server (moto) for one test.
pub struct S3Server {
    pub proc: Proc,
    pub endpoint: String,
}

impl S3Server {
    pub fn start(dir: &Path) -> S3Server {
        let port = free_port();
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let proc = Proc::spawn("moto_server", cmd, dir.join("moto.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start: {}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server {
            proc,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn url(&self, bucket: &str) -> String {
        format!(
            "s3://{bucket}?endpoint={}&region=us-east-1&path_style=true&create_bucket=true",
            self.endpoint
        )
    }
}

/// A Kafka-protocol broker (Tansu) for one test, on a free port. `scripts/test` installs it
/// (`ensure_tansu`) into `~/.cache/patchflow/tansu` when it is not on PATH.
pub struct KafkaBroker {
    pub proc: Proc,
    pub port: u16,
    pub brokers: String,
    storage: String,
    log: PathBuf,
}

impl KafkaBroker {
    fn bin() -> PathBuf {
        let cached = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".cache/patchflow/tansu/bin/tansu");
        if cached.exists() {
            cached
        } else {
            PathBuf::from("tansu")
        }
    }

    /// A broker keeping everything in memory.
    pub fn start(dir: &Path) -> KafkaBroker {
        Self::start_with(dir, "memory://tansu/".to_string())
    }

    /// A broker on a SQLite file: topics and committed offsets survive a restart.
    pub fn start_sqlite(dir: &Path) -> KafkaBroker {
        Self::start_with(dir, format!("sqlite://{}", dir.join("tansu.db").display()))
    }

    fn start_with(dir: &Path, storage: String) -> KafkaBroker {
        let port = free_port();
        let log = dir.join(format!("tansu-{port}.log"));
        let proc = Self::spawn(port, &storage, &log);
        KafkaBroker {
            proc,
            port,
            brokers: format!("127.0.0.1:{port}"),
            storage,
            log,
        }
    }

    fn spawn(port: u16, storage: &str, log: &Path) -> Proc {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(Self::bin());
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            storage,
        ]);
        let proc = Proc::spawn("tansu", cmd, log.to_path_buf());
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not start: {}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        proc
    }

    /// Stops the broker and starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.proc.terminate();
        self.proc = Self::spawn(self.port, &self.storage, &self.log);
    }
}

/// A workflow history as text, its payloads decoded (the CLI shows them as base64 JSON),
/// for checks that something never reached Temporal.
pub fn history_text(history: &Value) -> String {
    fn walk(v: &Value, out: &mut String) {
        use base64::Engine as _;
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if let (true, Some(text)) = (k == "data", x.as_str())
                        && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(text)
                    {
                        out.push_str(&String::from_utf8_lossy(&bytes));
                    }
                    walk(x, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::String(s) => out.push_str(s),
            _ => {}
        }
    }
    let mut out = String::new();
    walk(history, &mut out);
    out
}
