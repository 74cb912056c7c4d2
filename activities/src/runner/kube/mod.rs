//! The Kubernetes runner: one `batch/v1` Job per attempt of `run_agent`.
//!
//! The Job is named from the task id, the run (`c<n>` for candidate `n` of a best-of-N task,
//! `t<turn>` for a follow-up turn) and the attempt (`patchflow-<task>[-c<n>|-t<turn>]-<attempt>`),
//! so a best-of-N task's candidates are separate Jobs running side by side, and a
//! retried activity (a worker that died, a lost heartbeat) finds the Job it already made
//! (`409 AlreadyExists` → `GET` → follow it) instead of starting a second agent. A retry of
//! the task is a new workflow run reusing attempt numbers: a Job annotated with another run
//! is deleted, and made again once it is gone. The runner
//! follows the Job and its pods with watches (never polling), relays the agent container's
//! progress lines (its log, one JSON [`AgentEvent`] per line) into the task's event stream,
//! maps what it sees to the attempt's outcome, deletes the Job (foreground) on cancel and
//! waits until its pod is gone.
//!
//! The files: `config` (the settings), `job` (the Job of one attempt), `watch` (following
//! it to its outcome), [`pod_contract`] (the environment between the runner and the pod,
//! both halves, and the pod's side of it), `api` (retried API calls).
//!
//! `/workspace` and `/scratch` are `emptyDir` volumes; the root file system is read-only and
//! every container runs as user 65532 without privileges (the "restricted" Pod Security
//! Standard). The attempt number comes from the name of the `work` directory the activity
//! passes (`run-<attempt>`); the directory itself is not used.

mod api;
mod config;
mod job;
pub mod pod_contract;
#[cfg(any(test, feature = "bench-support"))]
pub mod testing;
#[cfg(test)]
mod tests;
mod watch;

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use patchflow_core::{AgentEvent, AgentSummary, TaskId, TaskSpec, layout};
use patchflow_platform::ObjectStore;
use patchflow_workflows::io::PreparedEnv;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::api::{create_or_adopt, delete_and_wait, delete_job};
pub use self::config::KubeRunnerConfig;
pub use self::job::job_name;
use self::job::{DEADLINE_GRACE_SECS, build_job, of_another_run, owned_by};
use self::pod_contract::{PodUrls, RESULT_URLS, RESUME_URLS};
use self::watch::JobWatch;
use crate::runner::agent_runner::{AgentRunner, RunTarget, RunnerError};

/// How long the last progress lines may take to arrive once the Job has finished.
const LOG_DRAIN: Duration = Duration::from_secs(2);

pub struct KubeRunner {
    client: kube::Client,
    pub config: KubeRunnerConfig,
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

    async fn presign(
        &self,
        target: &RunTarget,
        task: &TaskId,
        spec: &TaskSpec,
        prepared: Option<&PreparedEnv>,
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
        // A prepared workspace (setup ran on the worker) replaces the staged code.
        let staged_key =
            prepared.map_or_else(|| layout::staged_key(task), |p| p.baseline_key.clone());
        let staged = objects
            .presigned_get(&staged_key, expires)
            .await?
            .ok_or_else(none)?;
        let prefix = target.prefix(task);
        let mut results = Vec::with_capacity(RESULT_URLS.len());
        for (_, file) in RESULT_URLS {
            let url = objects
                .presigned_put(&format!("{prefix}{file}"), expires)
                .await?
                .ok_or_else(none)?;
            results.push(url);
        }
        let results: [String; RESULT_URLS.len()] = results
            .try_into()
            .map_err(|_| RunnerError::Failed("presigning result URLs".into()))?;
        let home = match prepared.and_then(|p| p.home_key.as_deref()) {
            Some(key) => Some(
                objects
                    .presigned_get(key, expires)
                    .await?
                    .ok_or_else(none)?,
            ),
            None => None,
        };
        // A follow-up resumes the task's current conversation and changes: those it has.
        let mut resume = Vec::new();
        if target.followup.is_some() {
            for (name, file) in RESUME_URLS {
                let key = layout::result_key(task, file);
                if objects.exists(&key).await? {
                    let url = objects
                        .presigned_get(&key, expires)
                        .await?
                        .ok_or_else(none)?;
                    resume.push((name, url));
                }
            }
        }
        Ok(PodUrls {
            staged,
            home,
            results,
            resume,
        })
    }

    async fn follow(
        &self,
        name: &str,
        prefix: &str,
        spec: &TaskSpec,
        objects: &dyn ObjectStore,
        events: &UnboundedSender<AgentEvent>,
        cancel: &CancellationToken,
    ) -> Result<AgentSummary, RunnerError> {
        let mut relays = JoinSet::new();
        let watch = JobWatch {
            jobs: self.jobs(),
            pods: self.pods(),
            config: &self.config,
            name,
        };
        let outcome = watch.until_done(spec, events, cancel, &mut relays).await;
        if outcome.is_ok() {
            // Let the last progress lines in, then stop following the log.
            let _ = tokio::time::timeout(LOG_DRAIN, async {
                while relays.join_next().await.is_some() {}
            })
            .await;
        }
        relays.abort_all();
        match outcome {
            Ok(()) => read_summary(objects, prefix).await,
            Err(RunnerError::Cancelled) => Err(RunnerError::Cancelled),
            Err(e) => {
                // A failure the runner decided (scheduling, image) leaves a Job behind.
                if let Err(d) = delete_job(&self.jobs(), name).await {
                    tracing::warn!(job = %name, error = %d, "cannot delete the failed Job");
                }
                Err(e)
            }
        }
    }
}

/// The summary the pod stored under the run's `prefix`.
async fn read_summary(
    objects: &dyn ObjectStore,
    prefix: &str,
) -> Result<AgentSummary, RunnerError> {
    let key = format!("{prefix}{}", layout::SUMMARY);
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

/// The attempt from the activity's work directory (`run-<attempt>`, `run-c<n>-<attempt>`,
/// `run-t<turn>-<attempt>`): its last number; 1 when it has none.
fn attempt_of(work: &Path) -> u32 {
    work.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("run-"))
        .and_then(|n| n.rsplit('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

#[async_trait]
impl AgentRunner for KubeRunner {
    async fn run_target(
        &self,
        target: &RunTarget,
        task: &TaskId,
        spec: &TaskSpec,
        prepared: Option<&PreparedEnv>,
        objects: &dyn ObjectStore,
        work: &Path,
        events: UnboundedSender<AgentEvent>,
        cancel: CancellationToken,
    ) -> Result<AgentSummary, RunnerError> {
        let name = job_name(task, target, attempt_of(work));
        let urls = self.presign(target, task, spec, prepared, objects).await?;
        let job = build_job(&self.config, &name, task, spec, &urls, target)?;
        let jobs = self.jobs();
        let create = async {
            match create_or_adopt(&jobs, &job).await {
                // A retry of the task (a new workflow run) reuses attempt numbers: the Job
                // under this name is the earlier run's, whose outcome is not this run's.
                Ok(old) if owned_by(&old, task) && of_another_run(&old, target) => {
                    tracing::info!(task_id = %task, job = %name, "the Job is an earlier run's of this task; replacing it");
                    delete_and_wait(&jobs, &old)
                        .await
                        .map_err(RunnerError::Failed)?;
                    Ok::<_, RunnerError>(create_or_adopt(&jobs, &job).await)
                }
                r => Ok(r),
            }
        };
        let created = tokio::select! {
            r = create => r?,
            _ = cancel.cancelled() => {
                // The POST may have landed: make sure no agent runs on.
                let _ = delete_job(&jobs, &name).await;
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
            Ok(j) if of_another_run(&j, target) => {
                return Err(RunnerError::Failed(format!(
                    "the Job {name} of an earlier run came back while it was replaced"
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
        self.follow(&name, &target.prefix(task), spec, objects, &events, &cancel)
            .await
    }
}
