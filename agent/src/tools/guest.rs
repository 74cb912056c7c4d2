//! How the tools reach the WebAssembly host: [`HostHandle`] loads it on a blocking thread
//! while the agent asks the model its first question (loading takes milliseconds from
//! the cache, a second the first time), and [`GuestRunner`] runs one guest call off the
//! async threads.

use std::path::PathBuf;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use wasmtime::Store;

use super::ToolError;
use crate::wasm::exports::patchflow::tools::tools::Guest;
use crate::wasm::{GuestState, HostOptions, ToolHost, egress::Egress};

/// The tool host, ready or on its way.
#[derive(Clone)]
pub struct HostHandle(Shared<BoxFuture<'static, Result<Arc<ToolHost>, String>>>);

impl HostHandle {
    /// Starts loading `component` now; call on a tokio runtime.
    pub fn load(component: &'static [u8], options: HostOptions) -> Self {
        let task = tokio::task::spawn_blocking(move || {
            ToolHost::new(component, &options)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        });
        Self(
            async move {
                task.await
                    .map_err(|e| format!("loading the tool host failed: {e}"))?
            }
            .boxed()
            .shared(),
        )
    }

    /// A host that is already loaded.
    pub fn ready(host: Arc<ToolHost>) -> Self {
        Self(futures::future::ready(Ok(host)).boxed().shared())
    }

    pub async fn get(&self) -> Result<Arc<ToolHost>, ToolError> {
        self.0.clone().await.map_err(ToolError::new)
    }
}

/// Runs guest calls for one workspace.
#[derive(Clone)]
pub struct GuestRunner {
    pub host: HostHandle,
    pub root: PathBuf,
}

impl GuestRunner {
    /// Runs `f` on a fresh instance on a blocking thread.
    pub async fn run<R, F>(&self, egress: Arc<Egress>, f: F) -> Result<R, ToolError>
    where
        R: Send + 'static,
        F: FnOnce(&Guest, &mut Store<GuestState>) -> wasmtime::Result<Result<R, String>>
            + Send
            + 'static,
    {
        let host = self.host.get().await?;
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || host.call(&root, egress, f))
            .await
            .map_err(|e| ToolError::new(format!("the tool call failed: {e}")))?
    }
}
