//! The WebAssembly host the file, search and API tools run in (the `tool-guest` world of
//! `tools-wasm/`).
//!
//! Every call gets a fresh instance from an [`ToolGuestPre`] on a pooling allocator, so no
//! state leaks between calls and instantiation costs microseconds. The guest sees exactly
//! one directory, the workspace (read-write, at `/workspace`): no environment, no
//! arguments, no stdio, no sockets; outgoing HTTP exists only through `wasi:http`, and
//! [`egress`] decides there whether a request may leave. Each call runs under an epoch
//! deadline (CPU) and a [`ResourceLimiter`] (memory); hitting either ends the call with a
//! [`ToolError`] the model can read, and the agent goes on.
//!
//! The component is compiled once per content hash: [`ToolHost::new`] keeps the output of
//! `Engine::precompile_component` in the cache directory, named by the hash of the
//! component and of the engine's settings, and later processes deserialize it (a
//! millisecond) instead of compiling again (a second and a half, ~90 MB of memory).

pub mod egress;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap,
};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::tools::ToolError;
use egress::{Egress, EgressHooks};

wasmtime::component::bindgen!({
    world: "tool-guest",
    path: "../tools-wasm/wit",
});

pub use exports::patchflow::tools::tools::{
    ApiRequest, ApiResponse, DirEntry, DirListing, DocHit, EditResult, EntryKind, Hit, PatchedFile,
    ReadResult, SearchResult, SourceFile,
};

/// The tool guest, built from `tools-wasm/guest` by this crate's build script.
pub const TOOLS_COMPONENT: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/patchflow_tools_guest.wasm"));

/// Where the workspace appears inside the guest.
pub const GUEST_ROOT: &str = "/workspace";

/// Component instances that can be alive at once (calls running concurrently).
const POOL_SLOTS: u32 = 8;

/// Bytes of each memory and table slot kept mapped between calls (see [`ToolHost::new`]).
const KEEP_RESIDENT: usize = 1 << 20;

/// How often the engine's epoch advances; the CPU limit is counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Bounds of one tool call.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// Largest linear memory the guest may grow to.
    pub memory_bytes: usize,
    /// How long the guest may run before it is interrupted.
    pub timeout: Duration,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Settings of a [`ToolHost`].
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    pub limits: CallLimits,
    /// Where compiled components are kept (by content hash); `None`: compile in memory.
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    #[error("cannot load the tool component: {0}")]
    Component(String),
}

/// Why a call ended without a result.
fn trap_message(err: &wasmtime::Error, limiter: &MemoryCap, limits: &CallLimits) -> String {
    if limiter.hit {
        return format!(
            "the tool ran out of its {} MiB memory limit and was stopped",
            limits.memory_bytes >> 20
        );
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!(
            "the tool ran past its {} ms time limit and was stopped",
            limits.timeout.as_millis()
        ),
        Some(t) => format!("the tool crashed ({t}) and was stopped"),
        None => format!("the tool failed: {err:#}"),
    }
}

/// Caps linear memory growth and remembers whether the cap was what stopped the guest.
struct MemoryCap {
    max: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// What one instance owns: its WASI context (the one preopen), HTTP context and limits.
pub struct GuestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: EgressHooks,
    table: ResourceTable,
    limiter: MemoryCap,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl GuestState {
    /// The largest linear memory this instance may grow to.
    pub fn memory_limit(&self) -> usize {
        self.limiter.max
    }
}

/// Where the precompiled form of `component` for `engine` lives in `dir`: named by a hash
/// of the component's bytes and of the engine's compile settings, so another build or
/// other limits never pick up a file compiled for something else.
fn precompiled_path(engine: &Engine, component: &[u8], dir: &Path) -> PathBuf {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    component.hash(&mut h);
    engine.precompile_compatibility_hash().hash(&mut h);
    dir.join(format!("{PRECOMPILED_PREFIX}{:016x}.cwasm", h.finish()))
}

const PRECOMPILED_PREFIX: &str = "tools-";

/// Loads the precompiled form of `component` from `dir`, or compiles it and stores it
/// there (atomically, by rename).
fn precompiled(engine: &Engine, component: &[u8], dir: &Path) -> Result<Component, HostError> {
    let path = precompiled_path(engine, component, dir);
    if let Ok(bytes) = std::fs::read(&path) {
        match deserialize_trusted(engine, &bytes) {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "discarding a precompiled tool component that does not load")
            }
        }
    }
    let bytes = engine
        .precompile_component(component)
        .map_err(|e| HostError::Component(format!("{e:#}")))?;
    if let Err(e) = store_precompiled(dir, &path, &bytes) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the compiled tool component; the next agent compiles it again");
    }
    deserialize_trusted(engine, &bytes).map_err(|e| HostError::Component(format!("{e:#}")))
}

fn store_precompiled(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    // Forms of earlier builds go once nobody has written them for a while (several
    // components, or versions side by side, may share the directory meanwhile).
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > PRECOMPILED_KEPT);
        if stale && name.starts_with(PRECOMPILED_PREFIX) && name.ends_with(".cwasm") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// How long a precompiled form nobody rewrote stays in the cache directory.
const PRECOMPILED_KEPT: Duration = Duration::from_secs(30 * 24 * 3600);

/// `Component::deserialize` on bytes from this engine's `precompile_component`.
///
/// Deserializing is unsafe because the bytes become native code without any check
/// beyond the header. They are trusted here because they either were produced by
/// `precompile_component` in this very call, or were read from the tool cache directory,
/// which the agent accepts only when this user owns it, nobody else can write it and it
/// lies outside the workspace and the temp dir (the only places a sandboxed command can
/// write; see `cli::tool_cache_dir`). The file is read into memory, not mapped, so a
/// later change to it cannot reach the loaded code. wasmtime checks the header's engine
/// settings and version and refuses a mismatch with an error.
#[allow(unsafe_code)]
fn deserialize_trusted(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: see above: the bytes come from `Engine::precompile_component`, produced by
    // this process or kept in a directory only this user can write.
    unsafe { Component::deserialize(engine, bytes) }
}

/// Advances the engine's epoch until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: &Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        // A weak engine handle would be nicer; the flag ends the thread with the host.
        let (engine, flag) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .ok();
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The compiled tool component, ready to be instantiated per call.
pub struct ToolHost {
    pre: ToolGuestPre<GuestState>,
    limits: CallLimits,
    _ticker: EpochTicker,
}

impl ToolHost {
    /// Compiles (or loads from the cache) `component` and links it against WASI and
    /// `wasi:http`. Slow the first time a component is seen (about a second); afterwards
    /// a few milliseconds.
    pub fn new(component: &[u8], options: &HostOptions) -> Result<Self, HostError> {
        let engine_err = |e: wasmtime::Error| HostError::Engine(format!("{e:#}"));
        let limits = options.limits;
        let mut pool = PoolingAllocationConfig::new();
        // A call is one component instance and the agent calls one tool at a time: a small
        // pool keeps the reserved tables and instance slots small too.
        pool.total_component_instances(POOL_SLOTS)
            .total_core_instances(POOL_SLOTS * 8)
            .total_memories(POOL_SLOTS * 2)
            .total_tables(POOL_SLOTS * 8)
            .total_stacks(POOL_SLOTS)
            .max_memory_size(limits.memory_bytes)
            // A fresh instance's first touches of its memory would each take a page fault
            // (half of a small call's time): the slot's low megabyte stays mapped instead,
            // and PAGEMAP_SCAN (Linux 6.7+) resets only the pages the last call dirtied.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_reservation(limits.memory_bytes.next_power_of_two() as u64)
            .memory_guard_size(64 << 10);
        let engine = Engine::new(&config).map_err(engine_err)?;
        let component = match &options.cache_dir {
            Some(dir) => precompiled(&engine, component, dir)?,
            None => Component::new(&engine, component)
                .map_err(|e| HostError::Component(format!("{e:#}")))?,
        };
        let mut linker: Linker<GuestState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(engine_err)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker).map_err(engine_err)?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| HostError::Component(format!("{e:#}")))?;
        let pre = ToolGuestPre::new(pre).map_err(|e| HostError::Component(format!("{e:#}")))?;
        Ok(Self {
            _ticker: EpochTicker::start(&engine),
            pre,
            limits,
        })
    }

    /// Compiles `component` into `dir` for later processes (an image build, a warm-up);
    /// returns the file written. Nothing is written if it is already there.
    pub fn precompile_into(
        component: &[u8],
        options: &HostOptions,
        dir: &Path,
    ) -> Result<PathBuf, HostError> {
        let options = HostOptions {
            cache_dir: Some(dir.to_path_buf()),
            ..options.clone()
        };
        let host = Self::new(component, &options)?;
        Ok(precompiled_path(host.pre.engine(), component, dir))
    }

    pub fn limits(&self) -> CallLimits {
        self.limits
    }

    /// Runs `f` on a fresh instance that sees only `workspace` and may reach only what
    /// `egress` allows. Blocking: call it from `spawn_blocking`.
    pub fn call<R>(
        &self,
        workspace: &Path,
        egress: Arc<Egress>,
        f: impl FnOnce(
            &exports::patchflow::tools::tools::Guest,
            &mut Store<GuestState>,
        ) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, ToolError> {
        let mut wasi = WasiCtxBuilder::new();
        // The call already runs on a blocking thread: file operations go straight to the
        // kernel instead of each hopping to tokio's blocking pool (10x faster per file).
        wasi.allow_blocking_current_thread(true)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        wasi.preopened_dir(workspace, GUEST_ROOT, FsPerms::ReadWrite)
            .map_err(|e| ToolError::new(format!("cannot open the workspace: {e:#}")))?;
        let state = GuestState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks: EgressHooks::new(egress),
            table: ResourceTable::new(),
            limiter: MemoryCap {
                max: self.limits.memory_bytes,
                hit: false,
            },
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        let ticks = (self.limits.timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        let result = self
            .pre
            .instantiate(&mut store)
            .and_then(|guest| f(guest.patchflow_tools_tools(), &mut store));
        match result {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(msg)) => Err(ToolError::new(msg)),
            Err(e) => {
                let msg = trap_message(&e, &store.data().limiter, &self.limits);
                tracing::warn!(error = %format!("{e:#}"), "tool guest stopped");
                Err(ToolError::new(msg))
            }
        }
    }
}
