//! Calls to the Kubernetes API that must survive a flaky API server: creating (or adopting)
//! and deleting a Job, retried with backoff while the failure may pass.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};

/// How long a replaced Job may take to be gone (its pod stopped) before the attempt fails.
const GONE_WITHIN: Duration = Duration::from_secs(120);

/// Creates the Job, or adopts the one an earlier try of this attempt made.
pub async fn create_or_adopt(api: &Api<Job>, job: &Job) -> Result<Job, kube::Error> {
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
pub async fn delete_job(api: &Api<Job>, name: &str) -> Result<(), kube::Error> {
    let once = || async {
        match api.delete(name, &DeleteParams::foreground()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    };
    once.retry(api_backoff()).when(transient).await
}

/// Deletes `old` (foreground) and waits, by watching it, until it is gone, so its name is
/// free again.
pub async fn delete_and_wait(api: &Api<Job>, old: &Job) -> Result<(), String> {
    let name = old.metadata.name.clone().unwrap_or_default();
    let uid = old.metadata.uid.clone().unwrap_or_default();
    delete_job(api, &name)
        .await
        .map_err(|e| format!("cannot delete the Job {name}: {e}"))?;
    match tokio::time::timeout(
        GONE_WITHIN,
        await_condition(api.clone(), &name, conditions::is_deleted(&uid)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("watching the Job {name} go: {e}")),
        Err(_) => Err(format!(
            "the Job {name} was still there {GONE_WITHIN:?} after its delete"
        )),
    }
}

pub fn api_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(8)
        .with_jitter()
}

/// Server errors, throttling and transport failures may pass; a refusal (4xx) will not.
pub fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::HttpError(_) => true,
        _ => false,
    }
}
