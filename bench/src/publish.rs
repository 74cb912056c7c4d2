//! `patchflow-bench publish`: what opening a pull request adds to a task's publish step,
//! i.e. `pull_request::open` (fetch the commit into a fresh directory, `git apply` the
//! diff, commit, force-push `pr_branch`, then the forge API), against a local git server
//! (the real `git http-backend`, token-checked) and the scripted forge. Three paths: a new
//! pull request with `pr_base` given, one whose base is looked up first, and a retry that
//! updates the pull request already open; then the forge API alone, for the split.
//!
//! Without `open_pr` the step reads the record and returns: nothing to time here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchflow_activities::ActivityConfig;
use patchflow_activities::pull_request::{self, PrSettings};
use patchflow_core::{
    AgentOutcome, AgentSummary, Secret, TaskId, TaskRecord, TaskSource, TaskSpec, TaskStatus,
};
use patchflow_platform::forge::{Forge, Forges, PullRequest, RepoRef};
use patchflow_platform::git_remote::RemotePolicy;
use patchflow_platform::secret_box::SecretBox;
use patchflow_scripted_model::forge::ScriptedForge;
use patchflow_scripted_model::git_server::{GitServer, init_bare};

use crate::harness::{ms, percentile};

const TOKEN: &str = "ghp_publishBenchToken";
const DEMO_REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo-repo");

/// The servers, the settings and the inputs every run shares.
struct Setup {
    _dirs: [tempfile::TempDir; 2],
    _git: GitServer,
    forge: ScriptedForge,
    config: ActivityConfig,
    url: String,
    repo: RepoRef,
    seed: String,
    diff: PathBuf,
    summary: AgentSummary,
}

/// The timings of one path, in ms, and the forge requests they made.
#[derive(Default)]
struct Timings {
    ms: Vec<f64>,
    calls: usize,
}

impl Timings {
    /// Times `f`; the forge's request log is read outside the timed span.
    async fn time<T>(
        &mut self,
        forge: &ScriptedForge,
        f: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let before = forge.requests().len();
        let t = Instant::now();
        let out = f.await?;
        self.ms.push(ms(t.elapsed()));
        self.calls += forge.requests().len() - before;
        Ok(out)
    }

    fn median(&self) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(&v, 0.5)
    }

    /// Median, p90, min, max and API calls per run.
    fn row(&self, name: &str) {
        let mut v = self.ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let (min, max) = (v.first(), v.last());
        println!(
            "{name:<68} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1}",
            percentile(&v, 0.5),
            percentile(&v, 0.9),
            min.copied().unwrap_or(f64::NAN),
            max.copied().unwrap_or(f64::NAN),
            self.calls as f64 / v.len().max(1) as f64
        );
    }
}

/// The diff a task would have produced: `add` fixed in the demo's `calc.py`.
fn calc_diff(text: &str) -> anyhow::Result<String> {
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == "return a - b")
        .context("calc.py has no `return a - b` to fix")?;
    let (from, to) = (at.saturating_sub(3), (at + 4).min(lines.len()));
    let mut d = format!(
        "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -{0},{1} +{0},{1} @@\n",
        from + 1,
        to - from
    );
    for (i, line) in lines.iter().enumerate().take(to).skip(from) {
        if i == at {
            d.push_str(&format!("-{line}\n+{}\n", line.replace("a - b", "a + b")));
        } else {
            d.push_str(&format!(" {line}\n"));
        }
    }
    Ok(d)
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

async fn setup() -> anyhow::Result<Setup> {
    let (root, data) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let seed = init_bare(root.path(), "acme/app.git", Path::new(DEMO_REPO))?;
    let git = GitServer::start(root.path()).await?;
    git.require_token(TOKEN);
    let forge = ScriptedForge::start().await?;
    forge.require_token(TOKEN);
    let url = git.url("acme/app.git");
    let diff = data.path().join("diff.patch");
    let calc = std::fs::read_to_string(Path::new(DEMO_REPO).join("calc.py"))?;
    std::fs::write(&diff, calc_diff(&calc)?)?;
    let (git_host, forge_host) = (host_of(&url), host_of(&forge.base_url()).to_string());
    let pull_requests = PrSettings {
        forges: Forges::from_settings(
            git_host,
            &forge.base_url(),
            "",
            "https://gitlab.invalid/api/v4",
        ),
        forge: Forge::new().map_err(anyhow::Error::msg)?,
        github_token: Some(Secret::new(TOKEN)),
        github_app: None,
        gitlab_token: None,
        author_name: "patchflow".into(),
        author_email: "patchflow@localhost".into(),
        public_url: "https://patchflow.example".into(),
    };
    let repo = pull_requests
        .forges
        .repo_of(&url)
        .context("the git server is not on the forge")?;
    let config = ActivityConfig {
        work_root: data.path().join("work"),
        allow_local_sources: false,
        git_remotes: RemotePolicy::from_settings("https,http", &format!("{git_host},{forge_host}")),
        max_unpacked_bytes: 1 << 30,
        max_archive_entries: 100_000,
        git_fetch_timeout: Duration::from_secs(60),
        secrets: Arc::new(SecretBox::from_settings(None, data.path()).map_err(anyhow::Error::msg)?),
        batch_lease: Duration::from_secs(30),
        pull_requests,
        environments: Default::default(),
        worker_queue: None,
    };
    let summary = AgentSummary {
        outcome: AgentOutcome::Finished,
        summary: "Fix add: it returned the difference".into(),
        model: "bench".into(),
        steps: 4,
        tool_calls: 3,
        prompt_tokens: 1200,
        completion_tokens: 80,
        total_tokens: 1280,
        cached_tokens: 0,
        reasoning_tokens: 0,
        cost_usd: 0.0,
        compactions: 0,
        wall_ms: 900,
        files_changed: vec!["calc.py".into()],
        tests_passed: None,
        error: None,
        sandbox: None,
    };
    Ok(Setup {
        _dirs: [root, data],
        _git: git,
        forge,
        config,
        url,
        repo,
        seed,
        diff,
        summary,
    })
}

impl Setup {
    /// A completed git task that asked for a pull request into `base` (`None`: the
    /// repository's default branch, looked up).
    fn record(&self, task_id: TaskId, base: Option<&str>) -> TaskRecord {
        let mut spec = TaskSpec::new(
            TaskSource::Git {
                url: self.url.clone(),
                git_ref: None,
                git_token: None,
            },
            "fix",
        );
        spec.open_pr = true;
        spec.pr_base = base.map(str::to_string);
        let now = chrono::Utc::now();
        TaskRecord {
            task_id,
            status: TaskStatus::Completed,
            message: "the agent finished".into(),
            created_at: now,
            updated_at: now,
            pr_url: None,
            pr_error: None,
            summary: Some(self.summary.clone()),
            tenant: spec.tenant.clone(),
            batch_id: None,
            idempotency_key: None,
            spec,
            attempt: 1,
            attempts: Vec::new(),
            turns: Vec::new(),
            candidates: Vec::new(),
            selected: None,
        }
    }

    /// `pull_request::open` as the publish step calls it, on the seed commit.
    async fn open(&self, record: &TaskRecord) -> anyhow::Result<String> {
        let c = &self.config;
        pull_request::open(
            c,
            &c.pull_requests,
            record,
            &self.summary,
            Some(&self.seed),
            &self.diff,
        )
        .await
        .map_err(|e| anyhow::anyhow!("pull_request::open: {}", e.0))
    }

    /// The forge API alone: open (or update) the pull request of `head`.
    async fn api(&self, head: String) -> anyhow::Result<()> {
        let pr = PullRequest {
            title: pull_request::title_of(&self.summary, "fix"),
            body: pull_request::body_of(&self.summary, "https://p.example", &TaskId::generate()),
            head,
            base: "main".into(),
            draft: false,
        };
        let forge = &self.config.pull_requests.forge;
        forge
            .open_or_update(&self.repo, &Secret::new(TOKEN), &pr)
            .await?;
        Ok(())
    }
}

/// Times each path of `pull_request::open` over `runs` rounds (one path after the other
/// in each, so drift hits all alike; one untimed round first) and prints the table.
pub async fn run(runs: usize) -> anyhow::Result<ExitCode> {
    let s = setup().await?;
    let f = &s.forge;
    let retried = s.record(TaskId::generate(), Some("main"));
    let (mut seen, mut retried_url) = (std::collections::HashSet::new(), None);
    let mut t: [Timings; 5] = Default::default();
    for round in 0..=runs.max(1) {
        if round == 1 {
            t = Default::default();
        }
        let new = s.record(TaskId::generate(), Some("main"));
        let url = t[0].time(f, s.open(&new)).await?;
        if !seen.insert(url.clone()) {
            bail!("a new task got the pull request {url} of another");
        }
        let looked_up = s.record(TaskId::generate(), None);
        t[1].time(f, s.open(&looked_up)).await?;
        let url = t[2].time(f, s.open(&retried)).await?;
        match &retried_url {
            None => retried_url = Some(url),
            Some(first) if *first != url => bail!("a retry opened {url}, not {first} again"),
            Some(_) => {}
        }
        t[3].time(f, s.api(format!("bench/api-{round}"))).await?;
        t[4].time(f, s.api("bench/api-same".into())).await?;
    }

    println!(
        "publish benchmark: pull_request::open against a local git http-backend and the scripted forge, {runs} runs (ms)"
    );
    println!(
        "{:<68} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "path", "median", "p90", "min", "max", "API calls"
    );
    println!(
        "{:<68} {:>8}  (without open_pr the step reads the record and returns: no git, no API call)",
        "publish: without a pull request", "0 added"
    );
    t[0].row("publish: pull request, new (push + POST pulls)");
    t[1].row("publish: pull request, new, base looked up (GET repo + push + POST)");
    t[2].row("publish: pull request, update (push + 422 + GET + PATCH)");
    println!("split of one run (medians):");
    t[3].row("  forge API alone, new (POST pulls)");
    t[4].row("  forge API alone, update (POST 422 + GET + PATCH)");
    for (name, total, api) in [("new", &t[0], &t[3]), ("update", &t[2], &t[4])] {
        println!(
            "{:<68} {:>8.1}",
            format!("  git (fetch + apply + commit + push), {name}: total - API"),
            total.median() - api.median()
        );
    }
    println!(
        "(not included: the record's pr_url write and the event the step appends, one store write each)"
    );
    Ok(ExitCode::SUCCESS)
}
