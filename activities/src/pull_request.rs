//! The pull (merge) request of a task that asked for one (`open_pr`): its diff as one
//! commit on top of the fetched commit, force-pushed to `pr_branch` on the source remote
//! with the forge token, then the pull request opened, or brought up to date when one is
//! open for that branch already. A retried step or a new attempt therefore lands on the
//! same branch and the same pull request.
//!
//! Nothing here fails the task: the diff is good whatever the forge says, so a refusal
//! becomes the record's `pr_error` (and `POST /api/tasks/{id}/pull-request` tries again).

use std::path::Path;
use std::time::Duration;

use patchflow_core::{AgentSummary, GitToken, Secret, TaskId, TaskRecord, TaskSource, TaskStatus};
use patchflow_platform::forge::{Forge, ForgeKind, Forges, PullRequest, RepoRef};

use crate::ActivityConfig;
use crate::fetch::{GitFailure, GitRun, remote_settings};

/// What a deployment brings for pull requests (the `forge` settings).
#[derive(Clone)]
pub struct PrSettings {
    pub forges: Forges,
    pub forge: Forge,
    /// Used when a task brings no `github_token`.
    pub github_token: Option<Secret>,
    /// A GitHub App to mint installation tokens with (before `github_token`).
    pub github_app: Option<patchflow_platform::forge::GitHubApp>,
    pub gitlab_token: Option<Secret>,
    pub author_name: String,
    pub author_email: String,
    /// Where the task pages are (`public_url`), for the link in the body.
    pub public_url: String,
}

impl std::fmt::Debug for PrSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrSettings")
            .field("forges", &self.forges)
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

/// Why no pull request was opened: said in the record's `pr_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrError(pub String);

/// The branch a task's work is pushed to.
pub fn branch_of(record: &TaskRecord) -> String {
    record
        .spec
        .pr_branch
        .clone()
        .or_else(|| record.spec.branch_name.clone())
        .unwrap_or_else(|| format!("patchflow/{}", record.task_id))
}

/// The token that pushes and opens the pull request: the task's `github_token`, else its
/// `git_token`, else the deployment's: a GitHub App's installation token for the
/// repository, or the token configured for that forge.
async fn token_for(
    config: &ActivityConfig,
    pr: &PrSettings,
    record: &TaskRecord,
    repo: &RepoRef,
) -> Result<Secret, PrError> {
    let kind = repo.kind;
    let sealed = |t: &GitToken| match t {
        GitToken::Sealed(s) => config
            .secrets
            .open(s, &record.task_id)
            .map_err(|e| PrError(format!("cannot open the task's token: {e}"))),
        GitToken::Plain(_) => Err(PrError("the task's token was never sealed".into())),
    };
    if let Some(t) = &record.spec.github_token {
        return sealed(t);
    }
    if let TaskSource::Git {
        git_token: Some(t), ..
    } = &record.spec.source
    {
        return sealed(t);
    }
    if kind == ForgeKind::GitHub
        && let Some(app) = &pr.github_app
    {
        return pr
            .forge
            .installation_token(repo, app)
            .await
            .map_err(|e| PrError(format!("the GitHub App's installation token: {e}")));
    }
    let configured = match kind {
        ForgeKind::GitHub => pr.github_token.clone(),
        ForgeKind::GitLab => pr.gitlab_token.clone(),
    };
    configured.ok_or_else(|| {
        PrError(format!(
            "no token to open the {} with: give the task a github_token, or set {} in the configuration",
            kind.request_name(),
            match kind {
                ForgeKind::GitHub => "github_token (or github_app_id)",
                ForgeKind::GitLab => "gitlab_token",
            }
        ))
    })
}

/// Pushes the task's diff and opens (or updates) its pull request; the URL, or why not.
pub async fn open(
    config: &ActivityConfig,
    pr: &PrSettings,
    record: &TaskRecord,
    summary: &AgentSummary,
    commit: Option<&str>,
    diff: &Path,
) -> Result<String, PrError> {
    let TaskSource::Git { url, git_ref, .. } = &record.spec.source else {
        return Err(PrError("a pull request needs a git source".into()));
    };
    let repo = pr.forges.repo_of(url).ok_or_else(|| {
        PrError(format!(
            "{url} is not on a known forge (github_hosts: {}; gitlab_hosts: {})",
            pr.forges.github_hosts.join(","),
            pr.forges.gitlab_hosts.join(",")
        ))
    })?;
    check_api(config, &repo).await?;
    let token = token_for(config, pr, record, &repo).await?;
    let head = branch_of(record);
    let base = match record.spec.pr_base.clone().or_else(|| git_ref.clone()) {
        Some(b) => b,
        None => pr
            .forge
            .default_branch(&repo, &token)
            .await
            .map_err(|e| PrError(e.to_string()))?,
    };
    if head == base {
        return Err(PrError(format!(
            "pr_branch `{head}` is the base branch: the work is force-pushed to pr_branch, so it must be a branch of its own"
        )));
    }
    let title = title_of(summary, &record.spec.task_description);
    let body = body_of(summary, &pr.public_url, &record.task_id);
    push(
        config,
        pr,
        record,
        url,
        commit.or(git_ref.as_deref()),
        &token,
        &repo,
        &head,
        &title,
        diff,
    )
    .await?;
    let opened = pr
        .forge
        .open_or_update(
            &repo,
            &token,
            &PullRequest {
                title,
                body,
                head,
                base,
                draft: record.spec.pr_draft,
            },
        )
        .await
        .map_err(|e| PrError(e.to_string()))?;
    Ok(opened.url)
}

/// The forge's API must pass the same host checks as the push.
async fn check_api(config: &ActivityConfig, repo: &RepoRef) -> Result<(), PrError> {
    patchflow_platform::git_remote::GitRemote::parse(&repo.api_url)
        .map_err(|e| PrError(e.to_string()))?
        .check(&config.git_remotes)
        .await
        .map(|_| ())
        .map_err(|e| PrError(format!("the forge API {}: {e}", repo.api_url)))
}

/// The diff as one commit on `commit` (or the source's ref), force-pushed to `head`.
#[allow(clippy::too_many_arguments)]
async fn push(
    config: &ActivityConfig,
    pr: &PrSettings,
    record: &TaskRecord,
    url: &str,
    commit: Option<&str>,
    token: &Secret,
    repo: &RepoRef,
    head: &str,
    title: &str,
    diff: &Path,
) -> Result<(), PrError> {
    let failed = |e: GitFailure| PrError(e.message);
    let work = config.work_dir(&record.task_id).join("pr");
    let home = config.work_dir(&record.task_id).join("pr-home");
    for dir in [&work, &home] {
        if dir.exists() {
            tokio::fs::remove_dir_all(dir)
                .await
                .map_err(|e| PrError(format!("cannot clear {}: {e}", dir.display())))?;
        }
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| PrError(format!("cannot make {}: {e}", dir.display())))?;
    }
    let settings = remote_settings(config, url, true, "push")
        .await
        .map_err(|e| PrError(e.message))?;
    let run = GitRun {
        url,
        home: &home,
        settings,
        timeout: config.git_fetch_timeout,
        max_bytes: config.max_unpacked_bytes,
        auth_header: Some(patchflow_platform::secret_box::basic_auth_header_as(
            repo.kind.push_user(),
            token,
        )),
        verb: "push",
    };
    let patch = diff.display().to_string();
    let author_name = format!("user.name={}", pr.author_name);
    let author_email = format!("user.email={}", pr.author_email);
    let message = format!("{title}\n\nMade by patchflow task {}.", record.task_id);
    let steps: [&[&str]; 6] = [
        &["init", "-q"],
        &["remote", "add", "origin", url],
        &[
            "fetch",
            "-q",
            "--depth",
            "1",
            "--no-tags",
            "origin",
            commit.unwrap_or("HEAD"),
        ],
        &["checkout", "-q", "--detach", "FETCH_HEAD"],
        &["apply", "--index", "--whitespace=nowarn", &patch],
        &[
            "-c",
            &author_name,
            "-c",
            &author_email,
            "commit",
            "-q",
            "--no-verify",
            "-m",
            &message,
        ],
    ];
    for args in steps {
        run.exec(&work, args).await.map_err(failed)?;
    }
    let refspec = format!("HEAD:refs/heads/{head}");
    // One more try for a push that failed on the way; a refused one fails alike (and a
    // force push twice is the same push).
    let push = ["push", "-q", "--force", "origin", refspec.as_str()];
    if let Err(e) = run.exec(&work, &push).await {
        tracing::warn!(task_id = %record.task_id, error = %e.message, "push failed; trying once more");
        tokio::time::sleep(Duration::from_secs(1)).await;
        run.exec(&work, &push).await.map_err(failed)?;
    }
    Ok(())
}

/// The pull request's title: the summary's first line, else the task's, cut to 72.
pub fn title_of(summary: &AgentSummary, description: &str) -> String {
    let first = |s: &str| {
        s.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    };
    let t = first(&summary.summary)
        .or_else(|| first(description))
        .unwrap_or_else(|| "Changes by patchflow".into());
    let mut out: String = t.chars().take(72).collect();
    if t.chars().count() > 72 {
        out.pop();
        out.push('…');
    }
    out
}

/// The pull request's body: the summary, the files changed, tokens used, the task link.
pub fn body_of(summary: &AgentSummary, public_url: &str, task: &TaskId) -> String {
    use std::fmt::Write as _;
    let mut b = String::new();
    if !summary.summary.trim().is_empty() {
        let _ = writeln!(b, "{}\n", summary.summary.trim());
    }
    if !summary.files_changed.is_empty() {
        let _ = writeln!(b, "**Files changed**\n");
        for f in &summary.files_changed {
            let _ = writeln!(b, "- `{f}`");
        }
        b.push('\n');
    }
    let _ = writeln!(
        b,
        "{} steps, {} tokens ({} prompt, {} completion) with `{}`.\n",
        summary.steps,
        summary.total_tokens,
        summary.prompt_tokens,
        summary.completion_tokens,
        summary.model
    );
    let _ = write!(b, "Task: {}/tasks/{task}", public_url.trim_end_matches('/'));
    b
}

/// Says on the issue a task was started from how it ended: the pull request, or why
/// there is none. Tasks not started from an issue: nothing.
pub async fn comment_on_issue(
    config: &ActivityConfig,
    pr: &PrSettings,
    record: &TaskRecord,
) -> Result<(), PrError> {
    let Some(issue) = &record.spec.issue else {
        return Ok(());
    };
    let repo = pr
        .forges
        .repo_of(&issue.repo_url)
        .ok_or_else(|| PrError(format!("{} is not on a known forge", issue.repo_url)))?;
    check_api(config, &repo).await?;
    let token = token_for(config, pr, record, &repo).await?;
    let link = format!(
        "{}/tasks/{}",
        pr.public_url.trim_end_matches('/'),
        record.task_id
    );
    let text = match (record.status, &record.pr_url, &record.pr_error) {
        (TaskStatus::Completed, Some(url), _) => {
            format!("patchflow opened {url} for this issue.\n\nTask: {link}")
        }
        (TaskStatus::Completed, None, Some(e)) => format!(
            "patchflow finished, but could not open a {}: {e}\n\nTask: {link}",
            repo.kind.request_name()
        ),
        (TaskStatus::Completed, None, None) => format!(
            "patchflow finished without a change to propose: {}\n\nTask: {link}",
            record.message
        ),
        (status, ..) => format!(
            "patchflow could not resolve this issue (the task is {status}): {}\n\nTask: {link}",
            record.message
        ),
    };
    pr.forge
        .comment(&repo, &token, issue.number, &text)
        .await
        .map_err(|e| PrError(e.to_string()))
}
