//! The agent Job's containers (`patchflow agent-pod fetch|run`) against a real S3 server,
//! with nothing but presigned URLs, as a pod on a cluster gets them: the staged code comes
//! in, the agent runs on the scripted model, the results go out; a follow-up turn's pod
//! resumes the task's conversation and changes, a candidate's pod seeds the model with its
//! number; a bad URL or setting fails clearly without printing the URL's signature.
//!
//! Also the opt-in live test: the demo task as a Kubernetes Job on a real cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::process::Command;

use patchflow_core::{AgentSummary, TaskId, TaskSource, TaskSpec, layout};
use patchflow_platform::ObjectStore;
use patchflow_platform::objectstore::S3ObjectStore;
use patchflow_scripted_model::{ScriptedCall, ScriptedModel, Turn};
use serde_json::json;

use crate::support::{S3Server, bin, demo_git_repo, demo_script, requests_asking};

const EXPIRY: Duration = Duration::from_secs(600);

async fn store(s3: &S3Server, bucket: &str) -> S3ObjectStore {
    S3ObjectStore::with_credentials(&s3.url(bucket), "test", "test")
        .await
        .expect("moto bucket")
}

/// `patchflow agent-pod STEP` with only the pod's environment. Awaited, not blocked on:
/// the scripted model answers from this test's runtime.
async fn pod_step(step: &str, env: &[(&str, String)]) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.args(["agent-pod", step])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LANG", "C.UTF-8");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.expect("run patchflow agent-pod")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn the_pod_steps_move_code_and_results_by_presigned_urls_only() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path());
    let objects = store(&s3, "pods").await;
    let task = TaskId::generate();

    // What stage_code leaves behind: the repository as code.tar.zst.
    let repo = demo_git_repo(dir.path());
    let staged = dir.path().join("code.tar.zst");
    patchflow_platform::archive::pack_tar_zst(&repo, &staged, 3).unwrap();
    objects
        .put_file(&layout::staged_key(&task), &staged)
        .await
        .unwrap();

    let (workspace, scratch) = (dir.path().join("workspace"), dir.path().join("scratch"));
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::create_dir_all(&scratch).unwrap();
    let baseline = scratch.join("code.tar.zst");
    let common = vec![
        ("PATCHFLOW_TASK_ID", task.to_string()),
        ("PATCHFLOW_WORKSPACE", workspace.display().to_string()),
        ("PATCHFLOW_SCRATCH", scratch.display().to_string()),
        ("PATCHFLOW_BASELINE", baseline.display().to_string()),
        ("HOME", scratch.display().to_string()),
        ("TMPDIR", scratch.display().to_string()),
    ];

    // The init container.
    let get = objects
        .presign_get(&layout::staged_key(&task), EXPIRY)
        .await
        .unwrap();
    // A prepared environment's HOME cache paths come along.
    let home_src = dir.path().join("home-src");
    std::fs::create_dir_all(home_src.join(".cache/pip")).unwrap();
    std::fs::write(home_src.join(".cache/pip/wheel.txt"), "cached").unwrap();
    let home_tar = dir.path().join("home.tar.zst");
    patchflow_platform::archive::pack_tar_zst(&home_src, &home_tar, 3).unwrap();
    let home_key = format!("staged/{task}/home.tar.zst");
    objects.put_file(&home_key, &home_tar).await.unwrap();
    let mut env = common.clone();
    env.push(("PATCHFLOW_STAGED_URL", get));
    env.push((
        "PATCHFLOW_HOME_URL",
        objects.presign_get(&home_key, EXPIRY).await.unwrap(),
    ));
    let out = pod_step("fetch", &env).await;
    assert!(out.status.success(), "fetch: {}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(scratch.join(".cache/pip/wheel.txt")).unwrap(),
        "cached",
        "the HOME cache paths are restored into the pod's HOME"
    );
    assert_eq!(
        std::fs::read_to_string(workspace.join("calc.py")).unwrap(),
        std::fs::read_to_string(repo.join("calc.py")).unwrap()
    );
    assert!(baseline.exists(), "the baseline stays for the diff");

    // The agent container. Its last answer is slow, so its metrics can be read mid-run.
    let mut script = demo_script();
    script.turns.last_mut().unwrap().delay_ms = 1500;
    let model = ScriptedModel::start(script, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let metrics = format!("127.0.0.1:{}", crate::support::free_port());
    let spec = TaskSpec::new(
        TaskSource::Git {
            url: "https://git.example/demo.git".into(),
            git_ref: None,
            git_token: None,
        },
        "Fix add() so the tests pass",
    );
    let mut env = common.clone();
    env.extend([
        ("PATCHFLOW_TASK_SPEC", serde_json::to_string(&spec).unwrap()),
        ("PATCHFLOW_MODEL", "scripted-test".into()),
        ("OPENAI_BASE_URL", model.base_url()),
        ("OPENAI_API_KEY", "sk-pod-secret-0042".into()),
        ("PATCHFLOW_METRICS_ADDR", metrics.clone()),
    ]);
    for (var, file) in [
        ("PATCHFLOW_RESULT_URL_DIFF", layout::DIFF),
        ("PATCHFLOW_RESULT_URL_TRANSCRIPT", layout::TRANSCRIPT),
        ("PATCHFLOW_RESULT_URL_LOG", layout::AGENT_LOG),
        ("PATCHFLOW_RESULT_URL_SUMMARY", layout::SUMMARY),
    ] {
        let url = objects
            .presign_put(&layout::result_key(&task, file), EXPIRY)
            .await
            .unwrap();
        env.push((var, url));
    }
    let run = tokio::spawn(async move { pod_step("run", &env).await });
    // While it runs, the pod serves its own metrics: the agent running, its tool calls so
    // far (counted from its event stream).
    let scrape_url = format!("http://{metrics}/metrics");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let scrape = loop {
        if let Ok(r) = reqwest::get(&scrape_url).await
            && let Ok(t) = r.text().await
            && t.contains("patchflow_tool_calls_total{tool=\"run_shell_command\",ok=\"true\"} 1")
        {
            break t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pod served no metrics"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        scrape.contains("\npatchflow_agents_running 1\n"),
        "{scrape}"
    );
    assert!(
        scrape.contains("patchflow_tool_calls_total{tool=\"read_file_content\",ok=\"true\"} 1"),
        "{scrape}"
    );
    let out = run.await.unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "run: {stderr}\n{stdout}");
    // Progress events on stdout, one JSON object per line: what the runner relays.
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(events.first().unwrap()["event"], "started", "{stdout}");
    assert_eq!(events.last().unwrap()["event"], "finished", "{stdout}");
    assert!(model.observed().violations.is_empty());

    // Everything reached the store.
    let summary: AgentSummary = serde_json::from_slice(
        &objects
            .get_bytes(&layout::result_key(&task, layout::SUMMARY))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(summary.files_changed, vec!["calc.py".to_string()]);
    let diff = text(
        &objects
            .get_bytes(&layout::result_key(&task, layout::DIFF))
            .await
            .unwrap(),
    );
    assert!(
        diff.contains("-    return a - b") && diff.contains("+    return a + b"),
        "{diff}"
    );
    for file in [layout::TRANSCRIPT, layout::AGENT_LOG] {
        let bytes = objects
            .get_bytes(&layout::result_key(&task, file))
            .await
            .unwrap();
        assert!(
            !text(&bytes).contains("sk-pod-secret-0042"),
            "{file} holds the key"
        );
    }
    assert!(
        !stdout.contains("X-Amz-Signature") && !stderr.contains("X-Amz-Signature"),
        "a presigned URL was printed"
    );
}

/// Every result variable of the pod contract and its file, the summary last.
const RESULT_VARS: [(&str, &str); 7] = [
    ("PATCHFLOW_RESULT_URL_DIFF", layout::DIFF),
    ("PATCHFLOW_RESULT_URL_TRANSCRIPT", layout::TRANSCRIPT),
    ("PATCHFLOW_RESULT_URL_LOG", layout::AGENT_LOG),
    ("PATCHFLOW_RESULT_URL_CONVERSATION", layout::CONVERSATION),
    ("PATCHFLOW_RESULT_URL_CHANGES", layout::CHANGES),
    ("PATCHFLOW_RESULT_URL_TURN_DIFF", layout::TURN_DIFF),
    ("PATCHFLOW_RESULT_URL_SUMMARY", layout::SUMMARY),
];

/// One pod's own directories (its two `emptyDir` volumes) and the variables both
/// containers see.
fn pod_volumes(
    dir: &Path,
    name: &str,
    task: &TaskId,
) -> (std::path::PathBuf, Vec<(&'static str, String)>) {
    let (workspace, scratch) = (
        dir.join(name).join("workspace"),
        dir.join(name).join("scratch"),
    );
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::create_dir_all(&scratch).unwrap();
    let env = vec![
        ("PATCHFLOW_TASK_ID", task.to_string()),
        ("PATCHFLOW_WORKSPACE", workspace.display().to_string()),
        ("PATCHFLOW_SCRATCH", scratch.display().to_string()),
        (
            "PATCHFLOW_BASELINE",
            scratch.join("code.tar.zst").display().to_string(),
        ),
        ("HOME", scratch.display().to_string()),
        ("TMPDIR", scratch.display().to_string()),
    ];
    (workspace, env)
}

/// The agent container's variables for a run storing under `prefix`.
async fn run_vars(
    objects: &S3ObjectStore,
    prefix: &str,
    model: &ScriptedModel,
) -> Vec<(&'static str, String)> {
    let spec = TaskSpec::new(
        TaskSource::Git {
            url: "https://git.example/demo.git".into(),
            git_ref: None,
            git_token: None,
        },
        "Fix add() so the tests pass",
    );
    let mut env = vec![
        ("PATCHFLOW_TASK_SPEC", serde_json::to_string(&spec).unwrap()),
        ("PATCHFLOW_MODEL", "scripted-test".into()),
        ("OPENAI_BASE_URL", model.base_url()),
        ("OPENAI_API_KEY", "sk-pod-secret-0042".into()),
    ];
    for (var, file) in RESULT_VARS {
        let url = objects
            .presign_put(&format!("{prefix}{file}"), EXPIRY)
            .await
            .unwrap();
        env.push((var, url));
    }
    env
}

async fn stored_text(objects: &S3ObjectStore, key: &str) -> String {
    text(
        &objects
            .get_bytes(key)
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}")),
    )
}

#[tokio::test]
async fn a_follow_up_pod_resumes_the_task_and_a_candidate_pod_seeds_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path());
    let objects = store(&s3, "pods-turns").await;
    let task = TaskId::generate();
    let repo = demo_git_repo(dir.path());
    let staged = dir.path().join("code.tar.zst");
    patchflow_platform::archive::pack_tar_zst(&repo, &staged, 3).unwrap();
    objects
        .put_file(&layout::staged_key(&task), &staged)
        .await
        .unwrap();
    let staged_url = objects
        .presign_get(&layout::staged_key(&task), EXPIRY)
        .await
        .unwrap();

    // The demo, then one follow-up turn adding subtract().
    let mut script = demo_script();
    script.turns.extend([
        Turn {
            tool_calls: vec![ScriptedCall {
                name: "edit_file_content".into(),
                arguments: json!({
                    "file_path": "calc.py",
                    "old_text": "return a * b",
                    "new_text": "return a * b\n\n\ndef subtract(a, b):\n    return a - b",
                }),
            }],
            ..Turn::default()
        },
        Turn {
            tool_calls: vec![ScriptedCall {
                name: "finish".into(),
                arguments: json!({"summary": "Added subtract()."}),
            }],
            ..Turn::default()
        },
    ]);
    let model = ScriptedModel::start(script, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();

    // Turn 1: the task's own files, the conversation and changes among them.
    let (_, pod) = pod_volumes(dir.path(), "turn-1", &task);
    let mut env = pod.clone();
    env.push(("PATCHFLOW_STAGED_URL", staged_url.clone()));
    let out = pod_step("fetch", &env).await;
    assert!(out.status.success(), "fetch: {}", text(&out.stderr));
    let mut env = pod.clone();
    env.extend(run_vars(&objects, &layout::results_prefix(&task), &model).await);
    let out = pod_step("run", &env).await;
    assert!(out.status.success(), "run: {}", text(&out.stderr));
    for file in [layout::CONVERSATION, layout::CHANGES] {
        assert!(
            objects
                .exists(&layout::result_key(&task, file))
                .await
                .unwrap(),
            "turn 1 did not store {file}"
        );
    }

    // Turn 2, in a new pod: only presigned URLs of the task's current files to resume from.
    let (workspace, pod) = pod_volumes(dir.path(), "turn-2", &task);
    let resume = dir.path().join("turn-2/scratch/resume");
    let mut env = pod.clone();
    env.push(("PATCHFLOW_STAGED_URL", staged_url.clone()));
    env.push(("PATCHFLOW_RESUME_DIR", resume.display().to_string()));
    for (var, file) in [
        ("PATCHFLOW_RESUME_URL_CONVERSATION", layout::CONVERSATION),
        ("PATCHFLOW_RESUME_URL_CHANGES", layout::CHANGES),
    ] {
        let url = objects
            .presign_get(&layout::result_key(&task, file), EXPIRY)
            .await
            .unwrap();
        env.push((var, url));
    }
    let out = pod_step("fetch", &env).await;
    assert!(out.status.success(), "fetch: {}", text(&out.stderr));
    assert!(resume.join(layout::CONVERSATION).is_file());
    assert!(resume.join(layout::CHANGES).is_file());
    assert!(workspace.join("calc.py").is_file());
    let turn2 = layout::turn_key(&task, 2, "");
    let mut env = pod.clone();
    env.extend(run_vars(&objects, &turn2, &model).await);
    env.extend([
        ("PATCHFLOW_TURN", "2".to_string()),
        (
            "PATCHFLOW_FOLLOWUP_MESSAGE",
            "Also add subtract().".to_string(),
        ),
        ("PATCHFLOW_RESUME_DIR", resume.display().to_string()),
    ]);
    let out = pod_step("run", &env).await;
    assert!(out.status.success(), "run: {}", text(&out.stderr));
    let seen = model.observed();
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    let asked = requests_asking(&seen.bodies, "Also add subtract().");
    assert!(!asked.is_empty(), "the follow-up never reached the model");
    let carried = asked[0].to_string();
    for earlier in ["return a - b", "Fixed add() in calc.py"] {
        assert!(
            carried.contains(earlier),
            "{earlier} missing from {carried}"
        );
    }
    let cumulative = stored_text(&objects, &format!("{turn2}{}", layout::DIFF)).await;
    assert!(
        cumulative.contains("+    return a + b") && cumulative.contains("+def subtract(a, b):"),
        "{cumulative}"
    );
    let own = stored_text(&objects, &format!("{turn2}{}", layout::TURN_DIFF)).await;
    assert!(own.contains("+def subtract(a, b):"), "{own}");
    assert!(
        !own.contains("+    return a + b"),
        "turn 1's change in turn 2's own diff: {own}"
    );
    let summary: AgentSummary =
        serde_json::from_str(&stored_text(&objects, &format!("{turn2}{}", layout::SUMMARY)).await)
            .unwrap();
    assert_eq!(summary.summary, "Added subtract().");

    // A candidate's pod: its number is the model's seed; its files under its own prefix.
    let model = ScriptedModel::start(demo_script(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let (_, pod) = pod_volumes(dir.path(), "candidate-2", &task);
    let mut env = pod.clone();
    env.push(("PATCHFLOW_STAGED_URL", staged_url));
    let out = pod_step("fetch", &env).await;
    assert!(out.status.success(), "fetch: {}", text(&out.stderr));
    let prefix = layout::candidate_key(&task, 2, "");
    let mut env = pod.clone();
    env.extend(run_vars(&objects, &prefix, &model).await);
    env.push(("PATCHFLOW_CANDIDATE", "2".to_string()));
    let out = pod_step("run", &env).await;
    assert!(out.status.success(), "run: {}", text(&out.stderr));
    let seen = model.observed();
    assert!(!seen.bodies.is_empty());
    assert!(
        seen.bodies.iter().all(|b| b["seed"] == 2),
        "{:?}",
        seen.bodies[0]
    );
    let diff = stored_text(&objects, &format!("{prefix}{}", layout::DIFF)).await;
    assert!(diff.contains("+    return a + b"), "{diff}");
}

#[tokio::test]
async fn a_pod_with_a_bad_url_fails_clearly_without_printing_it() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path());
    let objects = store(&s3, "pods-bad").await;
    let task = TaskId::generate();
    // Signed for an object that was never staged.
    let get = objects
        .presign_get(&layout::staged_key(&task), EXPIRY)
        .await
        .unwrap();
    let workspace = dir.path().join("workspace");
    std::fs::create_dir_all(&workspace).unwrap();
    let out = pod_step(
        "fetch",
        &[
            ("PATCHFLOW_STAGED_URL", get),
            ("PATCHFLOW_WORKSPACE", workspace.display().to_string()),
            (
                "PATCHFLOW_BASELINE",
                dir.path().join("code.tar.zst").display().to_string(),
            ),
        ],
    )
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot download the staged code") && err.contains("HTTP 404"),
        "{err}"
    );
    assert!(!err.contains("X-Amz-Signature"), "{err}");
    assert_eq!(std::fs::read_dir(&workspace).unwrap().count(), 0);

    // The agent container checks its task spec before anything else.
    let out = pod_step(
        "run",
        &[
            ("PATCHFLOW_TASK_ID", task.to_string()),
            ("PATCHFLOW_TASK_SPEC", "{\"not\": \"a spec\"}".into()),
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("PATCHFLOW_TASK_SPEC is not a task spec"),
        "{}",
        text(&out.stderr)
    );

    // A turn or candidate that is not a number is refused before the agent starts, and
    // so is a follow-up turn without its message.
    let spec = TaskSpec::new(
        TaskSource::Git {
            url: "https://git.example/demo.git".into(),
            git_ref: None,
            git_token: None,
        },
        "x",
    );
    let mut base = vec![
        ("PATCHFLOW_TASK_ID", task.to_string()),
        ("PATCHFLOW_TASK_SPEC", serde_json::to_string(&spec).unwrap()),
        ("PATCHFLOW_WORKSPACE", workspace.display().to_string()),
        ("PATCHFLOW_SCRATCH", dir.path().display().to_string()),
        (
            "PATCHFLOW_BASELINE",
            dir.path().join("code.tar.zst").display().to_string(),
        ),
    ];
    for (var, _) in RESULT_VARS {
        base.push((var, "http://127.0.0.1:9/never".into()));
    }
    for (extra, expected) in [
        (
            vec![("PATCHFLOW_TURN", "2; rm -rf /")],
            "PATCHFLOW_TURN is not a number",
        ),
        (
            vec![("PATCHFLOW_CANDIDATE", "-1")],
            "PATCHFLOW_CANDIDATE is not a number",
        ),
        (
            vec![("PATCHFLOW_TURN", "3")],
            "PATCHFLOW_FOLLOWUP_MESSAGE is not set",
        ),
    ] {
        let mut env = base.clone();
        env.extend(extra.into_iter().map(|(k, v)| (k, v.to_string())));
        let out = pod_step("run", &env).await;
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(expected), "{expected}: {err}");
        assert!(
            !dir.path().join("out").join(layout::AGENT_LOG).exists(),
            "the agent ran"
        );
    }
}

/// The demo task as a Kubernetes Job on a real cluster. Needs `PATCHFLOW_KUBE_TEST=1`, a
/// `KUBECONFIG`, an image the cluster can pull (`PATCHFLOW_KUBE_IMAGE`), an S3 store the
/// cluster can reach (`PATCHFLOW_OBJECT_STORE_URL` and AWS credentials) and a Secret with
/// the model key (`PATCHFLOW_KUBE_API_KEY_SECRET`); see the README's Kubernetes section.
#[tokio::test]
async fn live_cluster_runs_the_demo_as_a_job() {
    let wanted = std::env::var("PATCHFLOW_KUBE_TEST").is_ok_and(|v| v == "1");
    let kubeconfig = std::env::var("KUBECONFIG").ok();
    let (true, Some(kubeconfig)) = (wanted, kubeconfig) else {
        eprintln!(
            "SKIPPED live_cluster_runs_the_demo_as_a_job: set PATCHFLOW_KUBE_TEST=1 and KUBECONFIG \
             (plus PATCHFLOW_KUBE_IMAGE and PATCHFLOW_OBJECT_STORE_URL) to run it on a cluster"
        );
        return;
    };
    assert!(
        Path::new(&kubeconfig).exists(),
        "KUBECONFIG={kubeconfig} does not exist"
    );
    for var in ["PATCHFLOW_KUBE_IMAGE", "PATCHFLOW_OBJECT_STORE_URL"] {
        assert!(
            std::env::var(var).is_ok(),
            "{var} is needed for the live test"
        );
    }
    // The stack inherits the cluster settings from the environment; the model key comes
    // from the cluster's Secret, the model from OPENAI_BASE_URL as the pods see it.
    // The pods must reach the model: a real endpoint, or `patchflow scripted-model` served
    // where the cluster can reach it (PATCHFLOW_KUBE_TEST_MODEL_URL).
    let mut env = vec![("PATCHFLOW_RUNNER", "kube".to_string())];
    if let Ok(url) = std::env::var("PATCHFLOW_KUBE_TEST_MODEL_URL") {
        env.push(("OPENAI_BASE_URL", url));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stack = crate::support::Stack::start(crate::support::Mode::Up, demo_script(), &env).await;
    let id = stack.submit_demo().await;
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED", "{r}");
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert!(diff.contains("+    return a + b"), "{diff}");
}
