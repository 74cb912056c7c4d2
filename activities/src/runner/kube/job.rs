//! The Job of one attempt: two containers of the patchflow image running `patchflow
//! agent-pod` (their environment is the pod contract), `emptyDir` volumes, the
//! "restricted" security context, resources and scheduling from the config, and labels
//! naming the task, tenant and batch.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    LocalObjectReference, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use patchflow_core::{TaskId, TaskSpec};

use super::config::KubeRunnerConfig;
use super::pod_contract::{
    self, AGENT_CONTAINER, COMMAND, FETCH_STEP, PodUrls, RUN_STEP, SCRATCH, WORKSPACE,
};
use crate::runner::agent_runner::{RunTarget, RunnerError};

/// Seconds the Job may run past the task's wall budget before Kubernetes stops it.
pub const DEADLINE_GRACE_SECS: u64 = 60;
const USER: i64 = 65532;
const NAME_LABEL: &str = "app.kubernetes.io/name";
const TASK_LABEL: &str = "patchflow.dev/task-id";
const TENANT_LABEL: &str = "patchflow.dev/tenant";
const BATCH_LABEL: &str = "patchflow.dev/batch-id";
const CANDIDATE_LABEL: &str = "patchflow.dev/candidate";
const TURN_LABEL: &str = "patchflow.dev/turn";
/// Where an agent pod serves its metrics (`agent-pod run`).
pub const POD_METRICS_PORT: u16 = 9898;
/// The annotation naming the workflow run the Job belongs to.
const RUN_ANNOTATION: &str = "patchflow.dev/workflow-run";

/// The Job of one attempt (`name`, see [`job_name`]) of `task`'s `run`, its pods reading
/// `urls`.
pub fn build_job(
    c: &KubeRunnerConfig,
    name: &str,
    task: &TaskId,
    spec: &TaskSpec,
    urls: &PodUrls,
    run: &RunTarget,
) -> Result<Job, RunnerError> {
    let mut labels = BTreeMap::from([
        (NAME_LABEL.to_string(), "patchflow-agent".to_string()),
        (TASK_LABEL.to_string(), label_value(task.as_str())),
        (TENANT_LABEL.to_string(), label_value(&spec.tenant)),
    ]);
    if let Some(n) = run.candidate {
        labels.insert(CANDIDATE_LABEL.to_string(), n.to_string());
    }
    if let Some(f) = &run.followup {
        labels.insert(TURN_LABEL.to_string(), f.turn.to_string());
    }
    let mut annotations = BTreeMap::from([
        (TASK_LABEL.to_string(), task.as_str().to_string()),
        (TENANT_LABEL.to_string(), spec.tenant.clone()),
    ]);
    if let Some(batch) = &spec.batch_id {
        labels.insert(BATCH_LABEL.to_string(), label_value(batch));
        annotations.insert(BATCH_LABEL.to_string(), batch.clone());
    }
    if let Some(run_id) = &run.workflow_run {
        annotations.insert(RUN_ANNOTATION.to_string(), run_id.clone());
    }
    let spec_json =
        serde_json::to_string(spec).map_err(|e| RunnerError::BadInput(e.to_string()))?;
    let init_env = plain_env(pod_contract::fetch_env(task, urls));
    let mut agent_env = plain_env(pod_contract::run_env(task, &spec_json, &c.model, urls, run));
    if let Some(u) = &c.openai_base_url {
        agent_env.extend(plain_env([("OPENAI_BASE_URL", u.clone())]));
    }
    agent_env.extend(plain_env(c.agent_env.iter().cloned()));
    // Its metrics on the pod's address (a PodMonitor scrapes `metrics`), and the trace it
    // belongs to: the run_agent step's span, when tracing is on.
    agent_env.extend(plain_env(
        [(
            "PATCHFLOW_METRICS_ADDR".to_string(),
            format!("0.0.0.0:{POD_METRICS_PORT}"),
        )]
        .into_iter()
        .chain(
            patchflow_agent::telemetry::traceparent()
                .map(|t| (patchflow_agent::telemetry::TRACEPARENT.to_string(), t)),
        ),
    ));
    agent_env.push(EnvVar {
        name: "OPENAI_API_KEY".into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: c.api_key_secret_name.clone(),
                key: c.api_key_secret_key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    });
    for var in &c.model_key_envs {
        agent_env.push(EnvVar {
            name: var.clone(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: c.api_key_secret_name.clone(),
                    key: var.to_ascii_lowercase(),
                    optional: Some(true),
                }),
                ..Default::default()
            }),
        });
    }
    agent_env.extend(task_secret_env(c, spec)?);
    let mounts = vec![
        VolumeMount {
            name: "workspace".into(),
            mount_path: WORKSPACE.into(),
            ..Default::default()
        },
        VolumeMount {
            name: "scratch".into(),
            mount_path: SCRATCH.into(),
            ..Default::default()
        },
    ];
    let container = |name: &str, step: &str, env: Vec<EnvVar>| Container {
        name: name.to_string(),
        image: Some(c.image.clone()),
        image_pull_policy: c.image_pull_policy.clone(),
        command: Some(COMMAND.iter().map(|s| s.to_string()).collect()),
        args: Some(vec![step.to_string()]),
        env: Some(env),
        working_dir: Some(WORKSPACE.into()),
        volume_mounts: Some(mounts.clone()),
        resources: Some(resources(c)),
        security_context: Some(container_security()),
        ..Default::default()
    };
    let wall = spec.limits.wall_seconds.saturating_add(DEADLINE_GRACE_SECS);
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(c.namespace.clone()),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(i64::try_from(wall).unwrap_or(i64::MAX)),
            ttl_seconds_after_finished: c.ttl_seconds_after_finished,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    service_account_name: c.service_account.clone(),
                    security_context: Some(pod_security()),
                    init_containers: Some(vec![container(FETCH_STEP, FETCH_STEP, init_env)]),
                    containers: vec![Container {
                        ports: Some(vec![ContainerPort {
                            name: Some("metrics".into()),
                            container_port: i32::from(POD_METRICS_PORT),
                            ..Default::default()
                        }]),
                        ..container(AGENT_CONTAINER, RUN_STEP, agent_env)
                    }],
                    volumes: Some(vec![
                        Volume {
                            name: "workspace".into(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Default::default()
                        },
                        Volume {
                            name: "scratch".into(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Default::default()
                        },
                    ]),
                    node_selector: (!c.node_selector.is_empty()).then(|| c.node_selector.clone()),
                    tolerations: (!c.tolerations.is_empty()).then(|| c.tolerations.clone()),
                    image_pull_secrets: (!c.image_pull_secrets.is_empty()).then(|| {
                        c.image_pull_secrets
                            .iter()
                            .map(|n| LocalObjectReference { name: n.clone() })
                            .collect()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// Plain (not secret) variables as the container spec holds them.
fn plain_env<K: Into<String>>(pairs: impl IntoIterator<Item = (K, String)>) -> Vec<EnvVar> {
    pairs
        .into_iter()
        .map(|(k, v)| EnvVar {
            name: k.into(),
            value: Some(v),
            ..Default::default()
        })
        .collect()
}

/// The worker variables the task's `call_api` policy names, from the
/// `kube_task_secrets` Secret. A task that names any is refused without that Secret:
/// the worker's own environment never travels into a Job.
fn task_secret_env(c: &KubeRunnerConfig, spec: &TaskSpec) -> Result<Vec<EnvVar>, RunnerError> {
    let mut names: Vec<&str> = spec.policy.secrets.iter().map(|s| s.env.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let Some(secret) = &c.task_secrets else {
        return Err(RunnerError::BadInput(format!(
            "the task's policy names {} but kube_task_secrets is not set: name the Kubernetes Secret that holds them (one key per variable)",
            names.join(", ")
        )));
    };
    Ok(names
        .into_iter()
        .map(|name| EnvVar {
            name: name.to_string(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.clone(),
                    key: name.to_string(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        })
        .collect())
}

fn resources(c: &KubeRunnerConfig) -> ResourceRequirements {
    let pick = |cpu: &Option<String>, mem: &Option<String>| {
        let mut m = BTreeMap::new();
        if let Some(v) = cpu {
            m.insert("cpu".to_string(), Quantity(v.clone()));
        }
        if let Some(v) = mem {
            m.insert("memory".to_string(), Quantity(v.clone()));
        }
        (!m.is_empty()).then_some(m)
    };
    ResourceRequirements {
        requests: pick(&c.cpu_request, &c.memory_request),
        limits: pick(&c.cpu_limit, &c.memory_limit),
        ..Default::default()
    }
}

fn container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(USER),
        run_as_group: Some(USER),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default()),
        ..Default::default()
    }
}

fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(USER),
        run_as_group: Some(USER),
        fs_group: Some(USER),
        seccomp_profile: Some(runtime_default()),
        ..Default::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

/// Whether `job` was made for `task` (its annotation holds the full task id).
pub fn owned_by(job: &Job, task: &TaskId) -> bool {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TASK_LABEL))
        .is_some_and(|t| t == task.as_str())
}

/// Whether `job` was made by an earlier workflow run of its task than `run` (a retry of the
/// task reuses attempt numbers, so names meet). A Job naming no run is not known to be.
pub fn of_another_run(job: &Job, run: &RunTarget) -> bool {
    let theirs = job
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RUN_ANNOTATION));
    matches!((theirs, &run.workflow_run), (Some(a), Some(b)) if a != b)
}

/// `patchflow-<task id, DNS-1123>-<attempt>` (with `-c<n>` before the attempt for candidate
/// `n`, `-t<turn>` for a follow-up turn), at most 63 characters.
pub fn job_name(task: &TaskId, target: &RunTarget, attempt: u32) -> String {
    let run = match (&target.followup, target.candidate) {
        (Some(f), _) => format!("-t{}", f.turn),
        (None, Some(n)) => format!("-c{n}"),
        (None, None) => String::new(),
    };
    let suffix = format!("{run}-{attempt}");
    let room = 63 - "patchflow-".len() - suffix.len();
    let id: String = task
        .as_str()
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-') => c,
            _ => '-',
        })
        .take(room)
        .collect();
    let id = id.trim_matches('-');
    format!("patchflow-{id}{suffix}")
}

/// A label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
pub fn label_value(raw: &str) -> String {
    let v: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    v.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}
