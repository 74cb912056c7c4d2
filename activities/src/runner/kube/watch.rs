//! Following one Job to its outcome with watches (never polling): the Job's and its pods'
//! watch streams merged, what the pods show so far (phases, waiting reasons, how
//! containers ended), the limits on a pod that cannot start, the relay of the agent's
//! progress lines, and the Job's conditions mapped to the attempt's outcome.

use std::collections::HashMap;
use std::time::Duration;

use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use patchflow_core::{AgentEvent, TaskSpec};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::api::delete_job;
use super::config::KubeRunnerConfig;
use super::job::DEADLINE_GRACE_SECS;
use super::pod_contract::AGENT_CONTAINER;
use crate::runner::agent_runner::RunnerError;

/// How long a cancel waits for the pod to go before giving up on watching it.
const CANCEL_WAIT: Duration = Duration::from_secs(120);
/// How often pending conditions (image pulls, scheduling) are checked against their limits.
const TICK: Duration = Duration::from_millis(250);

/// One Job being followed.
pub struct JobWatch<'a> {
    pub jobs: Api<Job>,
    pub pods: Api<Pod>,
    pub config: &'a KubeRunnerConfig,
    pub name: &'a str,
}

impl JobWatch<'_> {
    /// Lists the Job's pods once to learn how their containers ended (best effort).
    async fn note_pods(&self, state: &mut PodState) {
        let name = self.name;
        let lp = ListParams::default().labels(&format!("job-name={name}"));
        match self.pods.list(&lp).await {
            Ok(list) => list.items.iter().for_each(|p| state.note(p)),
            Err(e) => tracing::debug!(job = %name, error = %e, "cannot list the Job's pods"),
        }
    }

    /// Follows the Job until it finishes (`Ok`), fails or is cancelled, starting a relay of
    /// the agent's progress lines once its container runs.
    pub async fn until_done(
        &self,
        spec: &TaskSpec,
        events: &UnboundedSender<AgentEvent>,
        cancel: &CancellationToken,
        relays: &mut JoinSet<()>,
    ) -> Result<(), RunnerError> {
        let name = self.name;
        let jobs = watcher::watcher(
            self.jobs.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .default_backoff()
        .map(Seen::Job)
        .boxed();
        let pods = watcher::watcher(
            self.pods.clone(),
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
                    if let Err(e) = delete_job(&self.jobs, name).await {
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
                    if let Some(e) = state.overdue(self.config) {
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
                                        self.note_pods(&mut state).await;
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
                            relays.spawn(relay_progress(self.pods.clone(), pod, events.clone()));
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
