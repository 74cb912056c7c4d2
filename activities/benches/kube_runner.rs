//! The kube runner's own overhead, against kube's mock service instead of a cluster:
//!
//! - create: from `run()` to the Job's `POST` answered (presigning five URLs, building the
//!   Job, serializing it, the API round trip through the kube client);
//! - watch → outcome: from the API server sending the Job's `Complete` event to `run()`
//!   returning the summary (decoding the watch line, deciding, reading `summary.json`).
//!
//! What a cluster adds (scheduling, pulling, starting the pod) is not patchflow's and not
//! here. Run: `cargo bench -p patchflow-activities --features bench-support --bench kube_runner`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;
use patchflow_activities::AgentRunner;
use patchflow_activities::runner::kube::testing::Presigning;
use patchflow_activities::runner::kube::{KubeRunner, KubeRunnerConfig};
use patchflow_core::{AgentOutcome, AgentSummary, TaskId, TaskSource, TaskSpec, layout};
use patchflow_platform::ObjectStore;
use patchflow_platform::objectstore::FsObjectStore;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const RUNS: usize = 300;
const NS: &str = "bench";

#[derive(Default)]
struct Marks {
    post_answered: Option<Instant>,
    complete_sent: Option<Instant>,
}

fn reply(v: Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string().into_bytes()))
        .expect("a response")
}

fn job(name: &str, conditions: Value) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "2"},
        "spec": {"template": {"spec": {"containers": []}}},
        "status": {"conditions": conditions}})
}

/// A cluster that accepts the Job and reports it complete as soon as it is watched.
async fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    name: String,
    marks: Arc<Mutex<Marks>>,
) {
    let mut quiet = Vec::new();
    while let Some((req, send)) = handle.next_request().await {
        let (path, query) = (
            req.uri().path().to_string(),
            req.uri().query().unwrap_or("").to_string(),
        );
        let watch = query.contains("watch=true");
        let now = || Some(Instant::now());
        match (req.method().as_str(), path.contains("/jobs"), watch) {
            ("POST", true, _) => {
                send.send_response(reply(job(&name, json!([]))));
                marks.lock().expect("marks").post_answered = now();
            }
            ("GET", true, false) => send.send_response(reply(json!({"apiVersion": "batch/v1",
                "kind": "JobList", "metadata": {"resourceVersion": "2"},
                "items": [job(&name, json!([]))]}))),
            ("GET", true, true) => {
                let done = job(&name, json!([{"type": "Complete", "status": "True"}]));
                let line = json!({"type": "MODIFIED", "object": done}).to_string() + "\n";
                marks.lock().expect("marks").complete_sent = now();
                send.send_response(
                    Response::builder()
                        .status(200)
                        .body(Body::from(line.into_bytes()))
                        .expect("a response"),
                );
            }
            ("GET", false, false) => send.send_response(reply(json!({"apiVersion": "v1",
                "kind": "PodList", "metadata": {"resourceVersion": "2"}, "items": []}))),
            // A quiet pod watch: never answered while the run lasts.
            _ => quiet.push(send),
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Presigning(
        FsObjectStore::open(&dir.path().join("objects"))
            .await
            .expect("a store"),
    );
    let spec = TaskSpec::new(
        TaskSource::Git {
            url: "https://git.example/r.git".into(),
            git_ref: None,
            git_token: None,
        },
        "bench",
    );
    let summary = AgentSummary {
        outcome: AgentOutcome::Finished,
        summary: "done".into(),
        model: "m".into(),
        steps: 1,
        tool_calls: 1,
        prompt_tokens: 1,
        completion_tokens: 1,
        total_tokens: 2,
        cached_tokens: 0,
        reasoning_tokens: 0,
        cost_usd: 0.0,
        compactions: 0,
        wall_ms: 1,
        files_changed: vec![],
        tests_passed: None,
        error: None,
        sandbox: None,
    };
    let (mut create, mut watch) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let task = TaskId::generate();
        store
            .put_bytes(
                &layout::result_key(&task, layout::SUMMARY),
                &serde_json::to_vec(&summary).expect("json"),
            )
            .await
            .expect("stored summary");
        let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let runner = KubeRunner::new(
            kube::Client::new(mock, NS),
            KubeRunnerConfig::new(NS, "patchflow:bench", "llm", "key", "m"),
        );
        let name = patchflow_activities::runner::kube::job_name(
            &task,
            &patchflow_activities::runner::RunTarget::default(),
            1,
        );
        let marks = Arc::new(Mutex::new(Marks::default()));
        let server = tokio::spawn(serve(handle, name, marks.clone()));
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let work = dir.path().join(i.to_string()).join("run-1");
        let started = Instant::now();
        let got = runner
            .run(
                &task,
                &spec,
                None,
                &store,
                &work,
                tx,
                CancellationToken::new(),
            )
            .await
            .expect("the run completes");
        let ended = Instant::now();
        assert_eq!(got.summary, "done");
        server.abort();
        let m = marks.lock().expect("marks");
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        create.push(ms(m.post_answered.expect("posted") - started));
        watch.push(ms(ended - m.complete_sent.expect("watched")));
    }
    for (what, v) in [
        ("create (presign + build + POST round trip)", &mut create),
        (
            "watch event -> outcome (incl. reading summary.json)",
            &mut watch,
        ),
    ] {
        v.sort_by(f64::total_cmp);
        println!(
            "kube runner {what}: p50 {:.3} ms, p95 {:.3} ms, max {:.3} ms ({RUNS} runs)",
            percentile(v, 0.5),
            percentile(v, 0.95),
            v[v.len() - 1]
        );
    }
}
