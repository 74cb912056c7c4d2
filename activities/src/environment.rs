//! `prepare_environment`: the staged code set up before the agent runs.
//!
//! The setup comes from the task (`setup`), a saved environment of its tenant
//! (`environment`, with its secrets opened here and only here), or the repository's own
//! `.patchflow/setup.sh`. Its cache key hashes the definition, the secrets' names and
//! version, the repository, the worker's toolchain identity and the lockfiles found. On a
//! hit the cached products (what setup added or changed in the workspace, plus the
//! `cache_paths` of its HOME) are restored, the task's files laid over them, and the
//! maintenance script runs; on a miss the setup script runs and its products are stored as
//! `envcache/<tenant>/<key>.tar.zst`. Either way the workspace as prepared becomes the
//! agent's starting point and its diff's baseline (`staged/<task>/prepared.tar.zst`).
//!
//! The scripts run under the task's sandbox walls ([`patchflow_agent::setup`]) with the
//! setup's network; their output becomes the task's events, secrets redacted.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use patchflow_core::environment::{
    self, EnvCacheEntry, LOCKFILES, REPO_SETUP_SCRIPT, SetupNetwork, SetupSpec,
};
use patchflow_core::{Config, Secret, TaskEventKind, TaskId, TaskSource, TaskSpec, layout};
use patchflow_platform::archive;
use patchflow_workflows::io::{PrepareInput, PreparedEnv};
use sha2::{Digest, Sha256};
use temporalio_sdk::activities::{ActivityContext, ActivityError};

use crate::{Activities, bad_input, transient};

/// Script output lines that become events (the rest are counted, and the tail kept).
const MAX_EVENT_LINES: u64 = 200;
/// Directories never searched for lockfiles (they hold other projects' manifests).
const SKIP_DIRS: [&str; 6] = [".git", "node_modules", ".venv", "venv", "target", "vendor"];
/// How deep lockfiles are looked for.
const LOCKFILE_DEPTH: usize = 4;
/// zstd level of prepared states: fast, a fair ratio on installed packages.
const ZSTD_LEVEL: i32 = 3;

/// The environments settings a worker runs with.
#[derive(Debug, Clone, Default)]
pub struct EnvSettings {
    /// The settings the shell sandbox is built from (the `sandbox` section) and the
    /// `environments` section.
    pub config: Config,
}

/// A setup resolved for one task: the definition and its secrets in the clear.
struct Plan {
    setup: SetupSpec,
    environment: Option<String>,
    secrets: Vec<(String, Secret)>,
    secrets_version: u64,
    cache_generation: u64,
}

impl Activities {
    /// Which setup a task runs, with a saved environment's secrets opened.
    async fn plan_of(&self, spec: &TaskSpec, repo_setup: bool) -> Result<Plan, ActivityError> {
        if let Some(setup) = &spec.setup {
            return Ok(Plan {
                setup: setup.clone(),
                environment: None,
                secrets: Vec::new(),
                secrets_version: 0,
                cache_generation: 0,
            });
        }
        if let Some(name) = &spec.environment {
            let env = self
                .store
                .get_environment(&spec.tenant, name)
                .await
                .map_err(transient)?
                .ok_or_else(|| {
                    bad_input(format!(
                        "no environment `{name}` in tenant `{}` (it may have been deleted)",
                        spec.tenant
                    ))
                })?;
            let mut secrets = Vec::new();
            for (secret, sealed) in &env.secrets {
                let context =
                    patchflow_platform::secret_box::environment_context(&spec.tenant, name, secret);
                let plain = self
                    .config
                    .secrets
                    .open_in(sealed, &context)
                    .map_err(|_| {
                        bad_input(format!(
                            "cannot open secret `{secret}` of environment `{name}`: it was sealed under another secrets_key; set it again"
                        ))
                    })?;
                secrets.push((secret.clone(), plain));
            }
            return Ok(Plan {
                setup: env.setup,
                environment: Some(name.clone()),
                secrets,
                secrets_version: env.secrets_version,
                cache_generation: env.cache_generation,
            });
        }
        if repo_setup {
            return Ok(Plan {
                setup: SetupSpec {
                    setup_script: format!("bash ./{REPO_SETUP_SCRIPT}"),
                    ..SetupSpec::default()
                },
                environment: None,
                secrets: Vec::new(),
                secrets_version: 0,
                cache_generation: 0,
            });
        }
        Err(bad_input("prepare_environment: the task has no setup"))
    }

    /// The `prepare_environment` step (see the module's documentation).
    pub(crate) async fn prepare(
        &self,
        ctx: &ActivityContext,
        id: &TaskId,
        input: &PrepareInput,
    ) -> Result<PreparedEnv, ActivityError> {
        let started = Instant::now();
        let plan = self.plan_of(&input.spec, input.repo_setup).await?;
        plan.setup
            .validate("setup")
            .map_err(|e| bad_input(format!("refused setup: {e}")))?;
        let settings = &self.config.environments.config;
        let work = self.config.work_dir(id).join("prepare");
        if work.exists() {
            tokio::fs::remove_dir_all(&work).await.map_err(transient)?;
        }
        let (workspace, home) = (work.join("workspace"), work.join("home"));
        for d in [&workspace, &home] {
            tokio::fs::create_dir_all(d).await.map_err(transient)?;
        }
        let code = work.join("code.tar.zst");
        self.objects
            .get_to_file(&layout::staged_key(id), &code)
            .await
            .map_err(transient)?;
        unpack(&code, &workspace).await?;

        let tenant = &input.spec.tenant;
        let cache_key = if plan.setup.cache {
            let (ws, image) = (workspace.clone(), image_identity(settings));
            let identity = KeyInput {
                setup: &plan.setup,
                secret_names: plan.secrets.iter().map(|(n, _)| n.as_str()).collect(),
                secrets_version: plan.secrets_version,
                cache_generation: plan.cache_generation,
                environment: plan.environment.as_deref(),
                repo: repo_identity(&input.spec.source),
                image: &image,
            };
            let identity = serde_json::to_vec(&identity).map_err(transient)?;
            let key_files = plan.setup.cache_key_files.clone();
            Some(
                tokio::task::spawn_blocking(move || cache_key(&identity, &ws, &key_files))
                    .await
                    .map_err(transient)?
                    .map_err(|e| transient(format!("cannot hash the lockfiles: {e}")))?,
            )
        } else {
            None
        };
        let hit = match &cache_key {
            Some(key) => self.cached(tenant, key).await,
            None => None,
        };

        let mut env: Vec<(String, String)> = plan
            .setup
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.extend(
            plan.secrets
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string())),
        );
        let redact: Vec<String> = plan
            .secrets
            .iter()
            .map(|(_, v)| v.expose().to_string())
            .filter(|v| v.len() >= 3)
            .collect();

        let hit_key = match (&cache_key, hit) {
            (Some(key), Some(object)) => {
                self.record_event(
                    id,
                    TaskEventKind::Agent,
                    format!("environment cache hit {key}"),
                )
                .await;
                let cached = work.join("cached.tar.zst");
                let restored = match self.objects.get_to_file(&object, &cached).await {
                    Ok(_) => restore_cached(&cached, &workspace, &home).await,
                    Err(e) => Err(e.to_string()),
                };
                match restored {
                    Ok(()) => {
                        let _ = tokio::fs::remove_file(&cached).await;
                        // The task's files over the cached products.
                        unpack(&code, &workspace).await?;
                        if let Err(e) = self.store.env_cache_touch(tenant, key).await {
                            tracing::warn!(task_id = %id, error = %e, "cannot mark the cached environment used");
                        }
                        Some(key.clone())
                    }
                    Err(e) => {
                        tracing::warn!(task_id = %id, error = %e, "cached environment unreadable; running setup");
                        self.record_event(
                            id,
                            TaskEventKind::Agent,
                            format!("environment cache entry unreadable ({e}); running setup"),
                        )
                        .await;
                        let _ = self.store.env_cache_delete(tenant, key).await;
                        tokio::fs::remove_dir_all(&workspace)
                            .await
                            .map_err(transient)?;
                        tokio::fs::remove_dir_all(&home).await.map_err(transient)?;
                        tokio::fs::create_dir_all(&home).await.map_err(transient)?;
                        unpack(&code, &workspace).await?;
                        None
                    }
                }
            }
            _ => None,
        };
        let before = if hit_key.is_none() {
            if let Some(key) = &cache_key {
                self.record_event(
                    id,
                    TaskEventKind::Agent,
                    format!("environment cache miss {key}"),
                )
                .await;
            }
            let ws = workspace.clone();
            Some(
                tokio::task::spawn_blocking(move || snapshot(&ws))
                    .await
                    .map_err(transient)?,
            )
        } else {
            None
        };

        let (which, script) = match &hit_key {
            Some(_) => ("maintenance", plan.setup.maintenance_script.clone()),
            None => ("setup", Some(plan.setup.setup_script.clone())),
        };
        if let Some(script) = script.filter(|s| !s.trim().is_empty()) {
            self.run_script(
                ctx,
                id,
                which,
                &script,
                plan.setup.network,
                &plan.setup.allow_hosts,
                &workspace,
                &home,
                &env,
                &redact,
            )
            .await?;
        }

        // A miss with the cache on stores what setup made.
        if let (Some(key), Some(before)) = (&cache_key, &before) {
            let out = work.join("products.tar.zst");
            let (ws, h, o, b, paths) = (
                workspace.clone(),
                home.clone(),
                out.clone(),
                before.clone(),
                plan.setup.cache_paths.clone(),
            );
            let packed =
                tokio::task::spawn_blocking(move || pack_products(&ws, &h, &b, &paths, &o))
                    .await
                    .map_err(transient)?;
            match packed {
                Ok(()) => {
                    self.store_cached(id, tenant, key, plan.environment.as_deref(), &out)
                        .await;
                }
                Err(e) => {
                    tracing::warn!(task_id = %id, error = %e, "cannot pack the prepared environment; not cached");
                }
            }
            let _ = tokio::fs::remove_file(&out).await;
        }

        // The workspace as prepared: the agent's start and baseline; HOME's cache paths.
        let baseline = work.join("prepared.tar.zst");
        let home_tar = work.join("home.tar.zst");
        let (ws, b, h, ht, paths) = (
            workspace.clone(),
            baseline.clone(),
            home.clone(),
            home_tar.clone(),
            plan.setup.cache_paths.clone(),
        );
        let home_files = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            archive::pack_tar_zst(&ws, &b, ZSTD_LEVEL)?;
            pack_home(&h, &paths, &ht)
        })
        .await
        .map_err(transient)?
        .map_err(|e| transient(format!("cannot pack the prepared workspace: {e}")))?;
        let baseline_key = layout::prepared_key(id);
        self.objects
            .put_file(&baseline_key, &baseline)
            .await
            .map_err(transient)?;
        let home_key = if home_files > 0 {
            let key = layout::prepared_home_key(id);
            self.objects
                .put_file(&key, &home_tar)
                .await
                .map_err(transient)?;
            Some(key)
        } else {
            None
        };
        let _ = tokio::fs::remove_dir_all(&work).await;
        let millis = started.elapsed().as_millis() as u64;
        self.record_event(
            id,
            TaskEventKind::Agent,
            format!(
                "environment prepared in {millis} ms ({})",
                match (&cache_key, &hit_key) {
                    (_, Some(_)) => "cache hit",
                    (Some(_), None) => "cache miss",
                    (None, _) => "cache off",
                }
            ),
        )
        .await;
        Ok(PreparedEnv {
            baseline_key,
            home_key,
            cache_key,
            cache_hit: hit_key.is_some(),
            millis,
        })
    }

    /// The object of a fresh cache entry of `key`, if there is one; an expired or missing
    /// one is dropped.
    async fn cached(&self, tenant: &str, key: &str) -> Option<String> {
        let entry = match self.store.env_cache_get(tenant, key).await {
            Ok(Some(e)) => e,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the environment cache index; treating as a miss");
                return None;
            }
        };
        let settings = &self.config.environments.config.environments;
        let ttl = chrono::Duration::hours(settings.env_cache_ttl_hours as i64);
        let object = environment::cache_object_key(tenant, key);
        let fresh = entry.created_at + ttl > chrono::Utc::now();
        if fresh && self.objects.exists(&object).await.unwrap_or(false) {
            return Some(object);
        }
        let _ = self.store.env_cache_delete(tenant, key).await;
        let _ = self.objects.delete_prefix(&object).await;
        None
    }

    /// Stores a prepared state under `key` and evicts the tenant's least recently used
    /// ones past `env_cache_max_bytes`. A failure only costs the next task a miss.
    async fn store_cached(
        &self,
        id: &TaskId,
        tenant: &str,
        key: &str,
        environment: Option<&str>,
        file: &Path,
    ) {
        let object = environment::cache_object_key(tenant, key);
        let bytes = match self.objects.put_file(&object, file).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(task_id = %id, error = %e, "cannot store the prepared environment");
                return;
            }
        };
        let now = chrono::Utc::now();
        let entry = EnvCacheEntry {
            tenant: tenant.to_string(),
            key: key.to_string(),
            environment: environment.map(str::to_string),
            bytes,
            created_at: now,
            last_used_at: now,
        };
        if let Err(e) = self.store.env_cache_put(&entry).await {
            tracing::warn!(task_id = %id, error = %e, "cannot index the prepared environment");
            return;
        }
        self.record_event(
            id,
            TaskEventKind::Agent,
            format!("environment cached: {bytes} bytes as {object}"),
        )
        .await;
        let max = self
            .config
            .environments
            .config
            .environments
            .env_cache_max_bytes;
        let Ok(entries) = self.store.env_cache_list(tenant).await else {
            return;
        };
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        for old in entries {
            if total <= max {
                break;
            }
            if old.key == key {
                continue;
            }
            let _ = self.store.env_cache_delete(tenant, &old.key).await;
            let _ = self
                .objects
                .delete_prefix(&environment::cache_object_key(tenant, &old.key))
                .await;
            total = total.saturating_sub(old.bytes);
            tracing::info!(tenant, key = %old.key, bytes = old.bytes, "environment cache entry evicted (least recently used)");
        }
    }

    /// Runs one script in the sandbox, its output (redacted) as the task's events; a
    /// failure ends the task (not retried: the script would fail again).
    #[allow(clippy::too_many_arguments)]
    async fn run_script(
        &self,
        ctx: &ActivityContext,
        id: &TaskId,
        which: &str,
        script: &str,
        network: SetupNetwork,
        allow_hosts: &[String],
        workspace: &Path,
        home: &Path,
        env: &[(String, String)],
        redact: &[String],
    ) -> Result<(), ActivityError> {
        let config = &self.config.environments.config;
        let mut sandbox =
            patchflow_agent::cli::shell_sandbox(config, network == SetupNetwork::On, home)
                .map_err(|e| bad_input(format!("the shell sandbox: {e}")))?;
        let mut shell_env = patchflow_agent::cli::shell_env(config, home, &sandbox);
        // `allow_hosts`: no network but the egress proxy, which lets only those hosts through.
        let _proxy = if network == SetupNetwork::On && !allow_hosts.is_empty() {
            let dir = home.parent().unwrap_or(home).join("egress");
            let proxy = crate::egress::start(&dir, allow_hosts.to_vec())
                .map_err(|e| transient(format!("cannot start the egress proxy: {e}")))?;
            sandbox.proxy_socket = Some(proxy.socket.clone());
            let url = format!("http://{}", patchflow_agent::sandbox::forward::FORWARD_ADDR);
            for var in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                shell_env.vars.push((var.to_string(), url.clone()));
            }
            shell_env.vars.push(("NO_PROXY".into(), String::new()));
            Some(proxy)
        } else {
            None
        };
        let ws = patchflow_agent::Workspace::new(workspace).map_err(transient)?;
        self.record_event(
            id,
            TaskEventKind::Agent,
            format!(
                "running the {which} script (network {})",
                if network == SetupNetwork::On && !allow_hosts.is_empty() {
                    format!("only to {}", allow_hosts.join(", "))
                } else {
                    network.as_str().to_string()
                }
            ),
        )
        .await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let run = patchflow_agent::setup::run(
            patchflow_agent::setup::Script {
                workspace: &ws,
                sandbox: &sandbox,
                env: &shell_env,
                extra_env: env,
                script,
                timeout: Duration::from_secs(config.environments.setup_timeout_secs.max(1)),
                redact,
            },
            move |line| {
                let _ = tx.send(line);
            },
        );
        tokio::pin!(run);
        let mut shown = 0u64;
        let outcome = loop {
            tokio::select! {
                r = &mut run => break r,
                Some(line) = rx.recv() => {
                    shown += 1;
                    if shown <= MAX_EVENT_LINES {
                        self.record_event(id, TaskEventKind::Agent, format!("{which}: {line}")).await;
                    }
                }
                _ = ctx.cancelled() => return Err(ActivityError::cancelled()),
            }
        };
        while let Ok(line) = rx.try_recv() {
            shown += 1;
            if shown <= MAX_EVENT_LINES {
                self.record_event(id, TaskEventKind::Agent, format!("{which}: {line}"))
                    .await;
            }
        }
        if shown > MAX_EVENT_LINES {
            self.record_event(
                id,
                TaskEventKind::Agent,
                format!(
                    "{which}: … {} more lines not shown",
                    shown - MAX_EVENT_LINES
                ),
            )
            .await;
        }
        let outcome = outcome.map_err(bad_input)?;
        if outcome.success() {
            self.record_event(
                id,
                TaskEventKind::Agent,
                format!(
                    "{which} script finished in {} ms",
                    outcome.duration.as_millis()
                ),
            )
            .await;
            return Ok(());
        }
        Err(bad_input(format!(
            "the {which} script {}",
            outcome.failure()
        )))
    }
}

async fn unpack(archive: &Path, dest: &Path) -> Result<(), ActivityError> {
    let (a, d) = (archive.to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || archive::unpack_tar_zst(&a, &d))
        .await
        .map_err(transient)?
        .map_err(|e| transient(format!("cannot unpack {}: {e}", archive.display())))
}

/// What identifies a setup besides the lockfiles: hashed into the key.
#[derive(serde::Serialize)]
struct KeyInput<'a> {
    setup: &'a SetupSpec,
    secret_names: Vec<&'a str>,
    secrets_version: u64,
    cache_generation: u64,
    environment: Option<&'a str>,
    repo: String,
    image: &'a str,
}

/// The repository a cache entry is for (never a URL's credentials).
fn repo_identity(source: &TaskSource) -> String {
    match source {
        TaskSource::Git { url, .. } => match url.split_once("://") {
            Some((scheme, rest)) => {
                let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                format!("{scheme}://{rest}")
            }
            None => url.clone(),
        },
        TaskSource::Archive { .. } => "upload".to_string(),
    }
}

/// The worker's toolchain identity: `env_cache_image` when set, else the architecture and
/// the toolchain homes commands see.
fn image_identity(config: &Config) -> String {
    if let Some(image) = &config.environments.env_cache_image {
        return image.clone();
    }
    let toolchains =
        patchflow_agent::sandbox::toolchains::resolve(&config.sandbox.sandbox_toolchains, |k| {
            std::env::var(k).ok()
        })
        .unwrap_or_default();
    format!(
        "{}-{}:{}",
        std::env::consts::ARCH,
        std::env::consts::OS,
        patchflow_agent::sandbox::toolchains::to_setting(&toolchains)
    )
}

/// The cache key: SHA-256 over the identity and each lockfile's path and contents
/// (`key_files` instead of the lockfiles found, when given).
fn cache_key(identity: &[u8], workspace: &Path, key_files: &[String]) -> std::io::Result<String> {
    let mut h = Sha256::new();
    h.update(b"patchflow-envcache-v1\0");
    h.update(identity);
    h.update(b"\0");
    let files: Vec<String> = if key_files.is_empty() {
        lockfiles(workspace)?
    } else {
        key_files.to_vec()
    };
    for rel in files {
        h.update(rel.as_bytes());
        h.update(b"\0");
        match std::fs::File::open(workspace.join(&rel)) {
            Ok(mut f) => {
                let mut fh = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    fh.update(&buf[..n]);
                }
                h.update(fh.finalize());
            }
            Err(_) => h.update(b"(missing)"),
        }
        h.update(b"\0");
    }
    Ok(hex::encode(h.finalize()))
}

/// Workspace-relative paths of the lockfiles and manifests in `workspace`, sorted.
pub fn lockfiles(workspace: &Path) -> std::io::Result<Vec<String>> {
    let mut set = globset::GlobSetBuilder::new();
    for pattern in LOCKFILES {
        set.add(globset::Glob::new(pattern).map_err(std::io::Error::other)?);
    }
    let set = set.build().map_err(std::io::Error::other)?;
    let mut out = Vec::new();
    let walk = walkdir::WalkDir::new(workspace)
        .max_depth(LOCKFILE_DEPTH)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            e.depth() == 0
                || !(e.file_type().is_dir()
                    && SKIP_DIRS.contains(&e.file_name().to_string_lossy().as_ref()))
        });
    for entry in walk.flatten() {
        if entry.file_type().is_file()
            && set.is_match(entry.file_name())
            && let Ok(rel) = entry.path().strip_prefix(workspace)
        {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    out.sort();
    Ok(out)
}

/// Each entry of the tree (files and links) with its size and modification time.
pub type Snapshot = HashMap<PathBuf, (u64, Option<SystemTime>)>;

pub fn snapshot(root: &Path) -> Snapshot {
    walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .into_iter()
        .flatten()
        .filter(|e| !e.file_type().is_dir())
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            let rel = e.path().strip_prefix(root).ok()?.to_path_buf();
            Some((rel, (meta.len(), meta.modified().ok())))
        })
        .collect()
}

/// Packs what setup added or changed in the workspace (as `workspace/…`) and the HOME
/// `cache_paths` (as `home/…`) into `out`.
pub fn pack_products(
    workspace: &Path,
    home: &Path,
    before: &Snapshot,
    cache_paths: &[String],
    out: &Path,
) -> std::io::Result<()> {
    let file = std::fs::File::create(out)?;
    let encoder = zstd::stream::write::Encoder::new(file, ZSTD_LEVEL)?;
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    let before_dirs: std::collections::HashSet<&Path> =
        before.keys().flat_map(|p| p.ancestors().skip(1)).collect();
    for entry in walkdir::WalkDir::new(workspace)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.map_err(std::io::Error::other)?;
        let rel = entry
            .path()
            .strip_prefix(workspace)
            .map_err(std::io::Error::other)?;
        if rel.starts_with(".git") {
            continue;
        }
        let meta = entry.metadata().map_err(std::io::Error::other)?;
        let changed = if entry.file_type().is_dir() {
            // New directories come along with their files; empty new ones too.
            !before_dirs.contains(rel)
        } else {
            before.get(rel) != Some(&(meta.len(), meta.modified().ok()))
        };
        if changed {
            tar.append_path_with_name(entry.path(), Path::new("workspace").join(rel))?;
        }
    }
    for (rel, path) in home_paths(home, cache_paths) {
        if path.is_dir() {
            tar.append_dir_all(Path::new("home").join(&rel), &path)?;
        } else if path.exists() {
            tar.append_path_with_name(&path, Path::new("home").join(&rel))?;
        }
    }
    tar.into_inner()?.finish()?;
    Ok(())
}

/// The `~/…` entries of `cache_paths`, as (HOME-relative, path under `home`).
fn home_paths(home: &Path, cache_paths: &[String]) -> Vec<(PathBuf, PathBuf)> {
    cache_paths
        .iter()
        .filter_map(|p| p.strip_prefix('~'))
        .map(|rest| {
            let rel = PathBuf::from(rest.trim_start_matches('/'));
            let path = if rel.as_os_str().is_empty() {
                home.to_path_buf()
            } else {
                home.join(&rel)
            };
            (rel, path)
        })
        .collect()
}

/// HOME's `cache_paths` as a tar.zst (paths relative to HOME); the number of entries.
fn pack_home(home: &Path, cache_paths: &[String], out: &Path) -> std::io::Result<u64> {
    let paths: Vec<_> = home_paths(home, cache_paths)
        .into_iter()
        .filter(|(_, p)| p.exists())
        .collect();
    if paths.is_empty() {
        return Ok(0);
    }
    let file = std::fs::File::create(out)?;
    let encoder = zstd::stream::write::Encoder::new(file, ZSTD_LEVEL)?;
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    let mut n = 0;
    for (rel, path) in paths {
        if path.is_dir() {
            tar.append_dir_all(
                if rel.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    &rel
                },
                &path,
            )?;
        } else {
            tar.append_path_with_name(&path, &rel)?;
        }
        n += 1;
    }
    tar.into_inner()?.finish()?;
    Ok(n)
}

/// Restores a cached prepared state: `workspace/…` into `workspace`, `home/…` into
/// `home`. Entries elsewhere, absolute, or with `..` are refused.
pub async fn restore_cached(
    archive_path: &Path,
    workspace: &Path,
    home: &Path,
) -> Result<(), String> {
    let (a, w, h) = (
        archive_path.to_path_buf(),
        workspace.to_path_buf(),
        home.to_path_buf(),
    );
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let file = std::fs::File::open(&a)?;
        let decoder = zstd::stream::read::Decoder::new(file)?;
        let mut tar = tar::Archive::new(decoder);
        tar.set_preserve_permissions(true);
        tar.set_overwrite(true);
        let mut roots: BTreeMap<&str, &Path> = BTreeMap::new();
        roots.insert("workspace", &w);
        roots.insert("home", &h);
        for entry in tar.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.into_owned();
            let mut parts = path.components();
            let top = parts
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .unwrap_or("");
            let rest = parts.as_path().to_path_buf();
            let Some(root) = roots.get(top) else {
                return Err(std::io::Error::other(format!(
                    "unexpected entry {} in a cached environment",
                    path.display()
                )));
            };
            if rest.as_os_str().is_empty() {
                continue;
            }
            let plain = rest
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            let kind = entry.header().entry_type();
            if !plain || !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
                return Err(std::io::Error::other(format!(
                    "refused entry {} in a cached environment",
                    path.display()
                )));
            }
            let target = root.join(&rest);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
                // Never through a symlink out of the root.
                let real = parent.canonicalize()?;
                if !real.starts_with(root.canonicalize()?) {
                    return Err(std::io::Error::other(format!(
                        "entry {} in a cached environment leads outside",
                        path.display()
                    )));
                }
            }
            entry.unpack(&target)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockfiles_are_found_and_vendored_ones_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for f in [
            "Cargo.lock",
            "requirements-dev.txt",
            "web/package-lock.json",
            "node_modules/x/package.json",
            ".venv/lib/pyproject.toml",
            "src/main.rs",
        ] {
            std::fs::create_dir_all(p.join(f).parent().unwrap()).unwrap();
            std::fs::write(p.join(f), f).unwrap();
        }
        assert_eq!(
            lockfiles(p).unwrap(),
            [
                "Cargo.lock",
                "requirements-dev.txt",
                "web/package-lock.json"
            ]
        );
    }

    #[test]
    fn the_key_changes_with_a_lockfile_and_the_definition_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("requirements.txt"), "six==1.16.0\n").unwrap();
        std::fs::write(dir.path().join("app.py"), "print(1)\n").unwrap();
        let a = cache_key(b"def-1", dir.path(), &[]).unwrap();
        std::fs::write(dir.path().join("app.py"), "print(2)\n").unwrap();
        assert_eq!(
            a,
            cache_key(b"def-1", dir.path(), &[]).unwrap(),
            "source edits keep the key"
        );
        assert_ne!(a, cache_key(b"def-2", dir.path(), &[]).unwrap());
        std::fs::write(dir.path().join("requirements.txt"), "six==1.17.0\n").unwrap();
        assert_ne!(a, cache_key(b"def-1", dir.path(), &[]).unwrap());
        // Named key files replace the lockfiles found.
        let k = cache_key(b"def-1", dir.path(), &["app.py".into()]).unwrap();
        std::fs::write(dir.path().join("requirements.txt"), "other\n").unwrap();
        assert_eq!(
            k,
            cache_key(b"def-1", dir.path(), &["app.py".into()]).unwrap()
        );
    }

    #[test]
    fn repo_identity_drops_credentials() {
        let s = |url: &str| TaskSource::Git {
            url: url.into(),
            git_ref: None,
            git_token: None,
        };
        assert_eq!(
            repo_identity(&s("https://user:pw@github.com/o/r.git")),
            "https://github.com/o/r.git"
        );
    }

    #[tokio::test]
    async fn products_round_trip_and_hostile_archives_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ws, home) = (dir.path().join("ws"), dir.path().join("home"));
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::create_dir_all(home.join(".cache/pip")).unwrap();
        std::fs::write(ws.join("app.py"), "x").unwrap();
        let before = snapshot(&ws);
        std::fs::create_dir_all(ws.join(".venv/lib")).unwrap();
        std::fs::write(ws.join(".venv/lib/six.py"), "six").unwrap();
        std::fs::write(home.join(".cache/pip/wheel"), "w").unwrap();
        let out = dir.path().join("p.tar.zst");
        pack_products(&ws, &home, &before, &["~/.cache/pip".into()], &out).unwrap();
        let (ws2, home2) = (dir.path().join("ws2"), dir.path().join("home2"));
        std::fs::create_dir_all(&ws2).unwrap();
        std::fs::create_dir_all(&home2).unwrap();
        restore_cached(&out, &ws2, &home2).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(ws2.join(".venv/lib/six.py")).unwrap(),
            "six"
        );
        assert!(
            !ws2.join("app.py").exists(),
            "only what setup made is cached"
        );
        assert_eq!(
            std::fs::read_to_string(home2.join(".cache/pip/wheel")).unwrap(),
            "w"
        );

        // An archive with an entry outside both roots is refused.
        let bad = dir.path().join("bad.tar.zst");
        {
            let f = std::fs::File::create(&bad).unwrap();
            let enc = zstd::stream::write::Encoder::new(f, 1)
                .unwrap()
                .auto_finish();
            let mut b = tar::Builder::new(enc);
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, "etc/passwd", &b"x"[..]).unwrap();
            b.finish().unwrap();
        }
        assert!(restore_cached(&bad, &ws2, &home2).await.is_err());
    }
}
