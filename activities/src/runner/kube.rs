//! The Kubernetes runner: one `batch/v1` Job per attempt of `run_agent`.
//!
//! The Job is named from the task id and the attempt (`patchflow-<task>-<attempt>`), so a
//! retried activity (a worker that died, a lost heartbeat) finds the Job it already made
//! (`409 AlreadyExists` → `GET` → follow it) instead of starting a second agent. The runner
//! follows the Job and its pods with watches (never polling), relays the agent container's
//! progress lines (its log, one JSON [`AgentEvent`] per line) into the task's event stream,
//! maps what it sees to the attempt's outcome, deletes the Job (foreground) on cancel and
//! waits until its pod is gone.
//!
//! # The pod contract
//!
//! The worker never shares a file system with the pod: everything moves through the object
//! store by presigned URLs, so the store needs them (S3, COS, MinIO; not a directory). Both
//! containers run `patchflow agent-pod <step>` with everything else in the environment:
//!
//! - init container, `patchflow agent-pod fetch`: downloads `PATCHFLOW_STAGED_URL` (HTTP `GET`
//!   of `staged/<task>/code.tar.zst`) to `PATCHFLOW_BASELINE` and unpacks it into
//!   `PATCHFLOW_WORKSPACE`.
//! - agent container, `patchflow agent-pod run`: runs the agent on `PATCHFLOW_TASK_SPEC` (the
//!   task spec as JSON) for task `PATCHFLOW_TASK_ID` in `PATCHFLOW_WORKSPACE` against
//!   `PATCHFLOW_BASELINE`, with `PATCHFLOW_SCRATCH` as its scratch directory (also `HOME`
//!   and `TMPDIR`), `PATCHFLOW_MODEL`, `OPENAI_BASE_URL` (when set) and `OPENAI_API_KEY`
//!   (from a Secret, never inline); then uploads each result file with HTTP `PUT`
//!   (`Content-Type: application/octet-stream`) to `PATCHFLOW_RESULT_URL_DIFF`,
//!   `PATCHFLOW_RESULT_URL_TRANSCRIPT`, `PATCHFLOW_RESULT_URL_LOG` and
//!   `PATCHFLOW_RESULT_URL_SUMMARY` (`results/<task>/{diff.patch, transcript.jsonl,
//!   agent.log, summary.json}`), the summary last. It exits 0 once the summary is stored.
//!
//! `/workspace` and `/scratch` are `emptyDir` volumes; the root file system is read-only and
//! every container runs as user 65532 without privileges (the "restricted" Pod Security
//! Standard). The attempt number comes from the name of the `work` directory the activity
//! passes (`run-<attempt>`); the directory itself is not used.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, LocalObjectReference, Pod,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use patchflow_core::{AgentEvent, AgentSummary, TaskId, TaskSpec, layout};
use patchflow_platform::ObjectStore;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{AgentRunner, RunnerError};

/// Seconds the Job may run past the task's wall budget before Kubernetes stops it.
const DEADLINE_GRACE_SECS: u64 = 60;
/// How long a cancel waits for the pod to go before giving up on watching it.
const CANCEL_WAIT: Duration = Duration::from_secs(120);
/// How often pending conditions (image pulls, scheduling) are checked against their limits.
const TICK: Duration = Duration::from_millis(250);
/// How long the last progress lines may take to arrive once the Job has finished.
const LOG_DRAIN: Duration = Duration::from_secs(2);
/// The container whose log carries the agent's progress events.
const AGENT_CONTAINER: &str = "agent";
const USER: i64 = 65532;
const WORKSPACE: &str = "/workspace";
const SCRATCH: &str = "/scratch";
const BASELINE: &str = "/scratch/code.tar.zst";
const NAME_LABEL: &str = "app.kubernetes.io/name";
const TASK_LABEL: &str = "patchflow.dev/task-id";
const TENANT_LABEL: &str = "patchflow.dev/tenant";
const BATCH_LABEL: &str = "patchflow.dev/batch-id";

#[derive(Debug, Clone)]
pub struct KubeRunnerConfig {
    pub namespace: String,
    /// The patchflow image; both the init and the agent container run it.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    pub service_account: Option<String>,
    /// The Secret and key holding the model's API key (`OPENAI_API_KEY`).
    pub api_key_secret_name: String,
    pub api_key_secret_key: String,
    /// The Secret holding the `PATCHFLOW_SECRET_*` values a task's policy may name (one
    /// key per variable); they reach the agent container by `secretKeyRef`, never inline.
    pub task_secrets: Option<String>,
    pub model: String,
    pub openai_base_url: Option<String>,
    /// Quantities such as `500m`, `1Gi`; `None` leaves the field out.
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub image_pull_secrets: Vec<String>,
    pub ttl_seconds_after_finished: Option<i32>,
    /// How long a container may wait on `ErrImagePull`/`ImagePullBackOff` before the attempt fails.
    pub image_pull_grace: Duration,
    /// How long the pod may stay unschedulable before the attempt fails.
    pub unschedulable_timeout: Duration,
    /// Lifetime of the presigned URLs (at least the Job's deadline plus a margin is used).
    pub presign_expiry: Duration,
    /// Settings the agent reads (`PATCHFLOW_SANDBOX_MODE`, `PATCHFLOW_TOOL_*`, …), set on the
    /// agent container as they are. Never secrets: they would be written into the Job.
    pub agent_env: Vec<(String, String)>,
}

impl KubeRunnerConfig {
    /// A configuration with the given namespace, image and API-key Secret, and defaults
    /// for the rest.
    pub fn new(
        namespace: impl Into<String>,
        image: impl Into<String>,
        secret_name: impl Into<String>,
        secret_key: impl Into<String>,
        model: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            image: image.into(),
            image_pull_policy: None,
            service_account: None,
            api_key_secret_name: secret_name.into(),
            api_key_secret_key: secret_key.into(),
            task_secrets: None,
            model: model.into(),
            openai_base_url: None,
            cpu_request: None,
            cpu_limit: None,
            memory_request: None,
            memory_limit: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            image_pull_secrets: Vec::new(),
            ttl_seconds_after_finished: Some(3600),
            image_pull_grace: Duration::from_secs(120),
            unschedulable_timeout: Duration::from_secs(600),
            presign_expiry: Duration::from_secs(3600),
            agent_env: Vec::new(),
        }
    }
}

impl KubeRunnerConfig {
    /// Parses tolerations written as a JSON array of Kubernetes tolerations.
    pub fn tolerations_from_json(text: &str) -> Result<Vec<Toleration>, String> {
        serde_json::from_str(text).map_err(|e| format!("not a JSON array of tolerations: {e}"))
    }
}

pub struct KubeRunner {
    client: kube::Client,
    pub config: KubeRunnerConfig,
}

/// The presigned URLs one pod needs.
#[derive(Debug, Clone)]
struct PodUrls {
    staged: String,
    diff: String,
    transcript: String,
    log: String,
    summary: String,
}

impl KubeRunner {
    pub fn new(client: kube::Client, config: KubeRunnerConfig) -> Self {
        Self { client, config }
    }

    /// A runner on the cluster the worker runs in, or the one `KUBECONFIG` names. An empty
    /// namespace in `config` means the client's default one (the worker's own in a cluster).
    pub async fn infer(mut config: KubeRunnerConfig) -> Result<Self, kube::Error> {
        let client = kube::Client::try_default().await?;
        if config.namespace.is_empty() {
            config.namespace = client.default_namespace().to_string();
        }
        Ok(Self::new(client, config))
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn build_job(
        &self,
        name: &str,
        task: &TaskId,
        spec: &TaskSpec,
        urls: &PodUrls,
    ) -> Result<Job, RunnerError> {
        let c = &self.config;
        let mut labels = BTreeMap::from([
            (NAME_LABEL.to_string(), "patchflow-agent".to_string()),
            (TASK_LABEL.to_string(), label_value(task.as_str())),
            (TENANT_LABEL.to_string(), label_value(&spec.tenant)),
        ]);
        let mut annotations = BTreeMap::from([
            (TASK_LABEL.to_string(), task.as_str().to_string()),
            (TENANT_LABEL.to_string(), spec.tenant.clone()),
        ]);
        if let Some(batch) = &spec.batch_id {
            labels.insert(BATCH_LABEL.to_string(), label_value(batch));
            annotations.insert(BATCH_LABEL.to_string(), batch.clone());
        }
        let spec_json =
            serde_json::to_string(spec).map_err(|e| RunnerError::BadInput(e.to_string()))?;
        let env = |pairs: &[(&str, &str)]| -> Vec<EnvVar> {
            pairs
                .iter()
                .map(|(k, v)| EnvVar {
                    name: (*k).to_string(),
                    value: Some((*v).to_string()),
                    ..Default::default()
                })
                .collect()
        };
        let common = [
            ("LANG", "C.UTF-8"),
            ("HOME", SCRATCH),
            ("TMPDIR", SCRATCH),
            ("PATCHFLOW_TASK_ID", task.as_str()),
            ("PATCHFLOW_WORKSPACE", WORKSPACE),
            ("PATCHFLOW_SCRATCH", SCRATCH),
            ("PATCHFLOW_BASELINE", BASELINE),
        ];
        let mut init_env = env(&common);
        init_env.extend(env(&[("PATCHFLOW_STAGED_URL", &urls.staged)]));
        let mut agent_env = env(&common);
        agent_env.extend(env(&[
            ("PATCHFLOW_TASK_SPEC", &spec_json),
            ("PATCHFLOW_MODEL", &c.model),
            ("PATCHFLOW_RESULT_URL_DIFF", &urls.diff),
            ("PATCHFLOW_RESULT_URL_TRANSCRIPT", &urls.transcript),
            ("PATCHFLOW_RESULT_URL_LOG", &urls.log),
            ("PATCHFLOW_RESULT_URL_SUMMARY", &urls.summary),
        ]));
        if let Some(u) = &c.openai_base_url {
            agent_env.extend(env(&[("OPENAI_BASE_URL", u)]));
        }
        for (k, v) in &c.agent_env {
            agent_env.extend(env(&[(k, v)]));
        }
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
        agent_env.extend(self.task_secret_env(spec)?);
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
            command: Some(vec!["patchflow".into(), "agent-pod".into()]),
            args: Some(vec![step.to_string()]),
            env: Some(env),
            working_dir: Some(WORKSPACE.into()),
            volume_mounts: Some(mounts.clone()),
            resources: Some(self.resources()),
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
                        init_containers: Some(vec![container("fetch", "fetch", init_env)]),
                        containers: vec![container("agent", "run", agent_env)],
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
                        node_selector: (!c.node_selector.is_empty())
                            .then(|| c.node_selector.clone()),
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

    /// The worker variables the task's `call_api` policy names, from the
    /// `kube_task_secrets` Secret. A task that names any is refused without that Secret:
    /// the worker's own environment never travels into a Job.
    fn task_secret_env(&self, spec: &TaskSpec) -> Result<Vec<EnvVar>, RunnerError> {
        let mut names: Vec<&str> = spec.policy.secrets.iter().map(|s| s.env.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let Some(secret) = &self.config.task_secrets else {
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

    fn resources(&self) -> ResourceRequirements {
        let c = &self.config;
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

    async fn presign(
        &self,
        task: &TaskId,
        spec: &TaskSpec,
        objects: &dyn ObjectStore,
    ) -> Result<PodUrls, RunnerError> {
        let c = &self.config;
        // URLs must outlive the pod: queueing, scheduling, the whole deadline, a margin.
        let floor = Duration::from_secs(
            spec.limits
                .wall_seconds
                .saturating_add(DEADLINE_GRACE_SECS + 600),
        ) + c.unschedulable_timeout;
        let expires = c.presign_expiry.max(floor);
        let none = || {
            RunnerError::BadInput(
                "the kube runner needs an object store with presigned URLs (S3/COS/MinIO)".into(),
            )
        };
        let staged = objects
            .presigned_get(&layout::staged_key(task), expires)
            .await?
            .ok_or_else(none)?;
        let mut put = Vec::with_capacity(4);
        for file in [
            layout::DIFF,
            layout::TRANSCRIPT,
            layout::AGENT_LOG,
            layout::SUMMARY,
        ] {
            let url = objects
                .presigned_put(&layout::result_key(task, file), expires)
                .await?
                .ok_or_else(none)?;
            put.push(url);
        }
        let [diff, transcript, log, summary]: [String; 4] = put
            .try_into()
            .map_err(|_| RunnerError::Failed("presigning result URLs".into()))?;
        Ok(PodUrls {
            staged,
            diff,
            transcript,
            log,
            summary,
        })
    }

    /// Creates the Job, or adopts the one an earlier try of this attempt made.
    async fn create_or_adopt(&self, job: &Job) -> Result<Job, kube::Error> {
        let api = self.jobs();
        let name = job.metadata.name.clone().unwrap_or_default();
        let once = || async {
            match api.create(&PostParams::default(), job).await {
                Ok(j) => Ok(j),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    tracing::info!(job = %name, "the Job exists already; following it");
                    api.get(&name).await
                }
                Err(e) => Err(e),
            }
        };
        once.retry(api_backoff())
            .when(transient)
            .notify(|e, after| tracing::warn!(job = %name, error = %e, ?after, "creating the Job failed; retrying"))
            .await
    }

    /// Deletes the Job and its pods (foreground); a Job already gone is fine.
    async fn delete_job(&self, name: &str) -> Result<(), kube::Error> {
        let api = self.jobs();
        let once = || async {
            match api.delete(name, &DeleteParams::foreground()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                Err(e) => Err(e),
            }
        };
        once.retry(api_backoff()).when(transient).await
    }

    /// Lists the Job's pods once to learn how their containers ended (best effort).
    async fn note_pods(&self, name: &str, state: &mut PodState) {
        let lp = ListParams::default().labels(&format!("job-name={name}"));
        match self.pods().list(&lp).await {
            Ok(list) => list.items.iter().for_each(|p| state.note(p)),
            Err(e) => tracing::debug!(job = %name, error = %e, "cannot list the Job's pods"),
        }
    }

    async fn follow(
        &self,
        name: &str,
        task: &TaskId,
        spec: &TaskSpec,
        objects: &dyn ObjectStore,
        events: &UnboundedSender<AgentEvent>,
        cancel: &CancellationToken,
    ) -> Result<AgentSummary, RunnerError> {
        let mut relays = JoinSet::new();
        let outcome = self
            .watch_until_done(name, spec, events, cancel, &mut relays)
            .await;
        if outcome.is_ok() {
            // Let the last progress lines in, then stop following the log.
            let _ = tokio::time::timeout(LOG_DRAIN, async {
                while relays.join_next().await.is_some() {}
            })
            .await;
        }
        relays.abort_all();
        match outcome {
            Ok(()) => read_summary(objects, task).await,
            Err(RunnerError::Cancelled) => Err(RunnerError::Cancelled),
            Err(e) => {
                // A failure the runner decided (scheduling, image) leaves a Job behind.
                if let Err(d) = self.delete_job(name).await {
                    tracing::warn!(job = %name, error = %d, "cannot delete the failed Job");
                }
                Err(e)
            }
        }
    }

    /// Follows the Job until it finishes (`Ok`), fails or is cancelled, starting a relay of
    /// the agent's progress lines once its container runs.
    async fn watch_until_done(
        &self,
        name: &str,
        spec: &TaskSpec,
        events: &UnboundedSender<AgentEvent>,
        cancel: &CancellationToken,
        relays: &mut JoinSet<()>,
    ) -> Result<(), RunnerError> {
        let jobs = watcher::watcher(
            self.jobs(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .default_backoff()
        .map(Seen::Job)
        .boxed();
        let pods = watcher::watcher(
            self.pods(),
            watcher::Config::default().labels(&format!("job-name={name}")),
        )
        .default_backoff()
        .map(Seen::Pod)
        .boxed();
        let mut stream = futures::stream::select(jobs, pods);
        let mut state = PodState::default();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    tracing::info!(job = %name, "cancel: deleting the Job");
                    if let Err(e) = self.delete_job(name).await {
                        tracing::warn!(job = %name, error = %e, "cannot delete the Job");
                    }
                    let gone = tokio::time::timeout(CANCEL_WAIT, async {
                        while !(state.listed && state.pods.is_empty()) {
                            match stream.next().await {
                                Some(Seen::Pod(Ok(ev))) => state.apply(ev),
                                Some(Seen::Pod(Err(e))) => tracing::warn!(error = %e, "pod watch"),
                                Some(Seen::Job(_)) => {}
                                None => break,
                            }
                        }
                    })
                    .await;
                    if gone.is_err() {
                        tracing::warn!(job = %name, "the pod was still there {CANCEL_WAIT:?} after the delete");
                    }
                    return Err(RunnerError::Cancelled);
                }
                _ = tick.tick() => {
                    if let Some(e) = state.overdue(&self.config) {
                        break Err(e);
                    }
                }
                seen = stream.next() => match seen {
                    Some(Seen::Job(Ok(ev))) => {
                        match ev {
                            Event::Apply(j) | Event::InitApply(j) => {
                                if let Some(done) = job_outcome(&j, spec, &state) {
                                    if done.is_err() && state.terminated.is_none() && !deadline_exceeded(&j) {
                                        // The pod watch may lag the Job: ask once why it ended.
                                        self.note_pods(name, &mut state).await;
                                        break job_outcome(&j, spec, &state).unwrap_or(done);
                                    }
                                    break done;
                                }
                            }
                            Event::Delete(_) => {
                                break Err(RunnerError::Failed(format!(
                                    "the Job {name} was deleted before it finished"
                                )));
                            }
                            Event::Init | Event::InitDone => {}
                        }
                    }
                    Some(Seen::Pod(Ok(ev))) => {
                        state.apply(ev);
                        if let Some(phase) = state.phase_change() {
                            tracing::info!(job = %name, %phase, "agent pod");
                            let _ = events.send(AgentEvent::Pod { phase });
                        }
                        for pod in state.agents_to_follow() {
                            relays.spawn(relay_progress(self.pods(), pod, events.clone()));
                        }
                    }
                    Some(Seen::Job(Err(e)) | Seen::Pod(Err(e))) => {
                        // The watcher restarts itself after a backoff.
                        tracing::warn!(job = %name, error = %e, "watch failed; retrying");
                    }
                    None => break Err(RunnerError::Failed("the Job watch ended".into())),
                }
            }
        }
    }
}

/// Copies the agent container's log into the task's events: each line the agent prints is
/// one JSON [`AgentEvent`]; anything else (a crash message) is left to the pod's log.
async fn relay_progress(pods: Api<Pod>, pod: String, events: UnboundedSender<AgentEvent>) {
    let params = LogParams {
        container: Some(AGENT_CONTAINER.into()),
        follow: true,
        ..Default::default()
    };
    let reader = match pods.log_stream(&pod, &params).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%pod, error = %e, "cannot follow the agent's log; progress events will be missing");
            return;
        }
    };
    let mut lines = reader.lines();
    while let Some(line) = lines.next().await {
        match line {
            Ok(line) => match serde_json::from_str::<AgentEvent>(&line) {
                Ok(ev) => {
                    if events.send(ev).is_err() {
                        return;
                    }
                }
                Err(_) => tracing::debug!(%pod, %line, "agent log line is not an event"),
            },
            Err(e) => {
                tracing::debug!(%pod, error = %e, "the agent's log stream ended");
                return;
            }
        }
    }
}

// One item of the merged watch streams, consumed at once: the size does not matter.
#[allow(clippy::large_enum_variant)]
enum Seen {
    Job(Result<Event<Job>, watcher::Error>),
    Pod(Result<Event<Pod>, watcher::Error>),
}

/// What the pod watch has shown so far.
#[derive(Default)]
struct PodState {
    pods: HashMap<String, Pod>,
    relisting: Option<HashMap<String, Pod>>,
    /// The first list has been seen, so an empty `pods` means no pod.
    listed: bool,
    unschedulable: Option<(Instant, String)>,
    /// Since when an image cannot be pulled: the image and the reason.
    pull_failing: Option<(Instant, (String, String))>,
    /// Since when a container cannot be created (a Secret or key it names is missing).
    config_failing: Option<(Instant, String)>,
    /// The last container termination reason seen (`OOMKilled`, `Error`, …).
    terminated: Option<String>,
    /// Pods whose agent log is already being relayed.
    followed: std::collections::HashSet<String>,
    /// The pod phase last reported.
    phase: Option<String>,
}

impl PodState {
    fn apply(&mut self, ev: Event<Pod>) {
        match ev {
            Event::Apply(p) => self.insert(p),
            Event::Delete(p) => {
                self.pods.remove(&pod_name(&p));
            }
            Event::Init => self.relisting = Some(HashMap::new()),
            Event::InitApply(p) => {
                let name = pod_name(&p);
                self.note(&p);
                match &mut self.relisting {
                    Some(m) => {
                        m.insert(name, p);
                    }
                    None => {
                        self.pods.insert(name, p);
                    }
                }
            }
            Event::InitDone => {
                if let Some(m) = self.relisting.take() {
                    self.pods = m;
                }
                self.listed = true;
            }
        }
        self.refresh();
    }

    /// The pod's phase with the reason it waits, if that changed since the last call.
    fn phase_change(&mut self) -> Option<String> {
        let pod = self.pods.values().next()?;
        let status = pod.status.as_ref()?;
        let mut phase = status.phase.clone().unwrap_or_else(|| "Pending".into());
        let waiting = statuses(pod).find_map(|c| {
            let w = c.state.as_ref()?.waiting.as_ref()?;
            Some(format!(
                "{} {}",
                c.name,
                w.reason.clone().unwrap_or_default()
            ))
        });
        let unscheduled = status.conditions.iter().flatten().find_map(|c| {
            (c.type_ == "PodScheduled" && c.status == "False")
                .then(|| c.reason.clone().unwrap_or_default())
        });
        if let Some(why) = unscheduled.or(waiting).filter(|w| !w.trim().is_empty()) {
            phase = format!("{phase}: {}", why.trim());
        }
        if self.phase.as_ref() == Some(&phase) {
            return None;
        }
        self.phase = Some(phase.clone());
        Some(phase)
    }

    /// Pods whose agent container has started (so its log exists) and whose log nobody
    /// follows yet; they count as followed from now on.
    fn agents_to_follow(&mut self) -> Vec<String> {
        let started: Vec<String> = self
            .pods
            .values()
            .filter(|p| {
                statuses(p).any(|c| {
                    c.name == AGENT_CONTAINER
                        && c.state
                            .as_ref()
                            .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
                })
            })
            .map(pod_name)
            .filter(|n| !self.followed.contains(n))
            .collect();
        self.followed.extend(started.iter().cloned());
        started
    }

    fn insert(&mut self, p: Pod) {
        self.note(&p);
        self.pods.insert(pod_name(&p), p);
    }

    /// Remembers how a container ended, which outlives the pod.
    fn note(&mut self, p: &Pod) {
        for cs in statuses(p) {
            let reason = cs
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.reason.clone().map(|r| (r, t.exit_code)));
            if let Some((r, code)) = reason
                && r != "Completed"
            {
                self.terminated = Some(format!("{r} (container {}, exit code {code})", cs.name));
            }
        }
    }

    fn refresh(&mut self) {
        let now = Instant::now();
        let unschedulable = self.pods.values().find_map(|p| {
            p.status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
                .map(|c| c.message.clone().unwrap_or_else(|| "Unschedulable".into()))
        });
        self.unschedulable = lasting(self.unschedulable.take(), unschedulable, now);
        let config_failing = self
            .waiting_for(&["CreateContainerConfigError"])
            .map(|(name, _, _, msg)| format!("container {name}: {msg}"));
        self.config_failing = lasting(self.config_failing.take(), config_failing, now);
        let pulling = self
            .waiting_for(&["ErrImagePull", "ImagePullBackOff"])
            .map(|(_, image, reason, msg)| (image, format!("{reason}: {msg}")));
        self.pull_failing = lasting(self.pull_failing.take(), pulling, now);
    }

    /// The first container waiting for one of `reasons`: its name, image, reason and
    /// message.
    fn waiting_for(&self, reasons: &[&str]) -> Option<(String, String, String, String)> {
        self.pods.values().find_map(|p| {
            statuses(p).find_map(|cs| {
                let w = cs.state.as_ref()?.waiting.as_ref()?;
                let r = w.reason.as_deref()?;
                reasons.contains(&r).then(|| {
                    (
                        cs.name.clone(),
                        cs.image.clone(),
                        r.to_string(),
                        w.message.clone().unwrap_or_default(),
                    )
                })
            })
        })
    }

    fn overdue(&self, c: &KubeRunnerConfig) -> Option<RunnerError> {
        if let Some((since, msg)) = &self.unschedulable
            && since.elapsed() >= c.unschedulable_timeout
        {
            return Some(RunnerError::Failed(format!(
                "the agent pod could not be scheduled within {:?}: {msg}",
                c.unschedulable_timeout
            )));
        }
        if let Some((since, msg)) = &self.config_failing
            && since.elapsed() >= c.image_pull_grace
        {
            return Some(RunnerError::Failed(format!(
                "the agent pod cannot start (for {:?}): {msg}; is a Secret or key it names missing?",
                c.image_pull_grace
            )));
        }
        if let Some((since, (image, msg))) = &self.pull_failing
            && since.elapsed() >= c.image_pull_grace
        {
            let image = if image.is_empty() { &c.image } else { image };
            return Some(RunnerError::Failed(format!(
                "cannot pull the image `{image}` (for {:?}): {msg}",
                c.image_pull_grace
            )));
        }
        None
    }
}

/// A condition that lasts keeps the time it was first seen; one that is gone is forgotten.
fn lasting<T>(
    seen: Option<(Instant, T)>,
    now_seen: Option<T>,
    now: Instant,
) -> Option<(Instant, T)> {
    now_seen.map(|v| (seen.map_or(now, |(since, _)| since), v))
}

fn pod_name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

fn statuses(p: &Pod) -> impl Iterator<Item = &k8s_openapi::api::core::v1::ContainerStatus> {
    let s = p.status.as_ref();
    s.and_then(|s| s.init_container_statuses.as_ref())
        .into_iter()
        .flatten()
        .chain(
            s.and_then(|s| s.container_statuses.as_ref())
                .into_iter()
                .flatten(),
        )
}

fn deadline_exceeded(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Failed" && c.reason.as_deref() == Some("DeadlineExceeded"))
        })
}

/// `Some` once the Job has finished: `Ok` on `Complete`, the failure otherwise.
fn job_outcome(job: &Job, spec: &TaskSpec, pods: &PodState) -> Option<Result<(), RunnerError>> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let holds = |t: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == t && c.status == "True")
    };
    if holds("Complete").is_some() {
        return Some(Ok(()));
    }
    let failed = holds("Failed")?;
    let reason = failed.reason.clone().unwrap_or_default();
    let message = failed.message.clone().unwrap_or_default();
    let text = match reason.as_str() {
        "DeadlineExceeded" => format!(
            "the agent pod exceeded its wall time ({} s + {DEADLINE_GRACE_SECS} s) and was stopped",
            spec.limits.wall_seconds
        ),
        _ => match &pods.terminated {
            Some(t) => format!("the agent pod failed: {t} ({reason}: {message})"),
            None => format!("the agent pod failed ({reason}: {message})"),
        },
    };
    Some(Err(RunnerError::Failed(text)))
}

async fn read_summary(
    objects: &dyn ObjectStore,
    task: &TaskId,
) -> Result<AgentSummary, RunnerError> {
    let key = layout::result_key(task, layout::SUMMARY);
    let bytes = match objects.get_bytes(&key).await {
        Ok(b) => b,
        Err(patchflow_platform::ObjectError::NotFound(_)) => {
            return Err(RunnerError::Failed(
                "the agent pod completed without storing a summary".into(),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| RunnerError::Failed(format!("the agent wrote an unreadable summary: {e}")))
}

fn api_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(8)
        .with_jitter()
}

/// Server errors, throttling and transport failures may pass; a refusal (4xx) will not.
fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::HttpError(_) => true,
        _ => false,
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
fn owned_by(job: &Job, task: &TaskId) -> bool {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TASK_LABEL))
        .is_some_and(|t| t == task.as_str())
}

/// `patchflow-<task id, DNS-1123>-<attempt>`, at most 63 characters.
pub fn job_name(task: &TaskId, attempt: u32) -> String {
    let suffix = format!("-{attempt}");
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
fn label_value(raw: &str) -> String {
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

/// The attempt from the activity's `run-<attempt>` work directory; 1 when it has no number.
fn attempt_of(work: &Path) -> u32 {
    work.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("run-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

#[async_trait]
impl AgentRunner for KubeRunner {
    async fn run(
        &self,
        task: &TaskId,
        spec: &TaskSpec,
        objects: &dyn ObjectStore,
        work: &Path,
        events: UnboundedSender<AgentEvent>,
        cancel: CancellationToken,
    ) -> Result<AgentSummary, RunnerError> {
        let name = job_name(task, attempt_of(work));
        let urls = self.presign(task, spec, objects).await?;
        let job = self.build_job(&name, task, spec, &urls)?;
        let created = tokio::select! {
            r = self.create_or_adopt(&job) => r,
            _ = cancel.cancelled() => {
                // The POST may have landed: make sure no agent runs on.
                let _ = self.delete_job(&name).await;
                return Err(RunnerError::Cancelled);
            }
        };
        match created {
            Ok(job) if !owned_by(&job, task) => {
                // Names are cut to 63 characters, so two very long task ids could meet.
                return Err(RunnerError::BadInput(format!(
                    "the Job {name} already exists for another task; not adopting it"
                )));
            }
            Ok(_) => {
                tracing::info!(task_id = %task, job = %name, namespace = %self.config.namespace, "agent Job running")
            }
            // A Job Kubernetes finds invalid stays invalid; RBAC or quota may be fixed.
            Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => {
                return Err(RunnerError::BadInput(format!(
                    "Kubernetes refused the Job {name}: {s}"
                )));
            }
            Err(e) => {
                return Err(RunnerError::Failed(format!(
                    "cannot create the Job {name}: {e}"
                )));
            }
        }
        self.follow(&name, task, spec, objects, &events, &cancel)
            .await
    }
}

#[cfg(any(test, feature = "bench-support"))]
pub mod testing;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use http::{Method, Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;
    use patchflow_core::{AgentOutcome, TaskSource};
    use patchflow_platform::objectstore::FsObjectStore;
    use serde_json::{Value, json};
    use tokio::task::JoinHandle;
    use tower_test::mock::{Handle, SendResponse};

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
            let job = format!("{jobs}/{JOB}");
            let pods = format!("/api/v1/namespaces/{NS}/pods");
            let watch = query.contains("watch=true");
            Some(match (method.as_str(), path) {
                ("POST", p) if p == jobs => Route::CreateJob,
                ("GET", p) if p == job => Route::GetJob,
                ("DELETE", p) if p == job => Route::DeleteJob,
                ("GET", p) if p == jobs && query.contains("fieldSelector=metadata.name") => {
                    if watch {
                        Route::WatchJobs
                    } else {
                        Route::ListJobs
                    }
                }
                ("GET", p) if p == format!("{pods}/{JOB}-xyz/log") => Route::PodLog,
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

    fn pod_json(status: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{JOB}-xyz"), "namespace": NS, "resourceVersion": "11",
                "labels": {"job-name": JOB}},
            "spec": {"containers": []},
            "status": status
        })
    }

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
            wall_ms: 1000,
            files_changed: vec!["a.rs".into()],
            error: None,
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
        if store_summary {
            store
                .put_bytes(
                    &layout::result_key(&task, layout::SUMMARY),
                    &serde_json::to_vec(&summary()).unwrap(),
                )
                .await
                .unwrap();
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
        let fut = runner.run(&task, &spec, &store, &work, tx, cancel);
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

    #[test]
    fn job_names_are_dns_labels() {
        let t: TaskId = "tsk_ABC_123".parse().unwrap();
        assert_eq!(job_name(&t, 3), "patchflow-tsk-abc-123-3");
        let long: TaskId = "x".repeat(128).parse().unwrap();
        let n = job_name(&long, 12);
        assert!(n.len() <= 63, "{n}");
        assert!(n.ends_with("-12"));
        assert_eq!(label_value("Acme Corp/!"), "Acme-Corp");
        assert_eq!(attempt_of(Path::new("/w/run-7")), 7);
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
        let env = |c: &Value| -> BTreeMap<String, Value> {
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
        };
        let (ie, ae) = (env(init), env(agent));
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
            ("PATCHFLOW_RESULT_URL_SUMMARY", "summary.json"),
        ] {
            assert_eq!(
                ae[var],
                format!("https://s3.test/results/{TASK}/{file}?op=put")
            );
        }
        assert_eq!(ae["PATCHFLOW_MODEL"], "gpt-x");
        assert_eq!(ae["OPENAI_BASE_URL"], "https://llm.test/v1");
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
}
