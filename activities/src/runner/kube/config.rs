//! The kube runner's settings: where Jobs go, the image, the Secrets they read, resources
//! and scheduling, and the limits of waiting on a pod that cannot start.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Toleration;

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
    /// The model table's `api_key_env` variables: each is set on the agent container from
    /// the API key Secret's entry of the same name lower-cased (`OPENROUTER_KEY` →
    /// `openrouter_key`), optional, so a pod of a model without one still starts.
    pub model_key_envs: Vec<String>,
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
            model_key_envs: Vec::new(),
        }
    }
}

impl KubeRunnerConfig {
    /// Parses tolerations written as a JSON array of Kubernetes tolerations.
    pub fn tolerations_from_json(text: &str) -> Result<Vec<Toleration>, String> {
        serde_json::from_str(text).map_err(|e| format!("not a JSON array of tolerations: {e}"))
    }
}
