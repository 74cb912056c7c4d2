//! The two pages, rendered on the server from plain data so they read the same with or
//! without JavaScript: the task list with the submit form, and one task's page.
//!
//! They are maud templates: the markup is checked when the crate compiles, and every value
//! spliced into it (`(value)`) is escaped, in element content and attributes alike. Only the
//! diff and transcript, which their own renderers escape, go in as [`PreEscaped`].

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use maud::{Markup, PreEscaped, html};
use patchflow_core::{
    AgentSummary, Limits, TaskAttempt, TaskEvent, TaskEventKind, TaskRecord, TaskStatus,
};

use super::diff;
use super::html::{
    SignedIn, age, badge, clock, duration_ms, page, page_for, safe_href, thousands, time_el, usd,
};
use super::transcript;

/// First line of a text, cut to `max` characters: a title or a list cell.
fn headline(s: &str, max: usize) -> String {
    let line = s
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if line.chars().count() <= max {
        return line.to_string();
    }
    let cut: String = line.chars().take(max).collect();
    format!("{}…", cut.trim_end())
}

/// What the list shows above its rows: the filter as the user set it.
#[derive(Debug, Default)]
pub struct ListFilterView {
    pub status: Option<TaskStatus>,
    pub query: String,
    /// The tenant an admin narrowed the list to (empty: every tenant).
    pub tenant: String,
}

/// The values a refused submission had, so the form comes back filled in with the error.
#[derive(Debug, Default)]
pub struct FormState {
    pub error: Option<String>,
    pub git_url: String,
    pub git_ref: String,
    pub task_description: String,
    pub target_file: String,
    pub model: String,
    pub limits: Option<Limits>,
}

/// Whether a task matches the free-text search: repository, description, id, message.
pub fn matches_query(r: &TaskRecord, query: &str) -> bool {
    let q = query.trim().to_lowercase();
    q.is_empty() || search_text(r).contains(&q)
}

fn search_text(r: &TaskRecord) -> String {
    format!(
        "{} {} {} {}",
        r.task_id,
        r.spec.source.display_name(),
        r.spec.task_description,
        r.message
    )
    .to_lowercase()
}

/// The rows of the list (also what the script swaps in when it refreshes).
pub fn task_rows(tasks: &[TaskRecord], now: DateTime<Utc>) -> Markup {
    html! {
        @if tasks.is_empty() {
            p class="empty" { "No tasks yet. Submit one with the form." }
        } @else {
            ul class="tasks" {
                @for r in tasks {
                    li data-search=(search_text(r)) {
                        a href={ "/tasks/" (r.task_id) } {
                            (badge(r.status))
                            span class="repo" { (r.spec.source.display_name()) }
                            span class="desc" { (headline(&r.spec.task_description, 140)) }
                            span class="age" { (time_el(r.created_at, &age(r.created_at, now))) " ago" }
                        }
                    }
                }
            }
        }
    }
}

fn status_options(selected: Option<TaskStatus>) -> Markup {
    html! {
        option value="" selected[selected.is_none()] { "All statuses" }
        @for s in TaskStatus::ALL {
            option value=(s.as_str()) selected[selected == Some(s)] { (s.as_str()) }
        }
    }
}

fn submit_form(form: &FormState, csrf: Option<&str>) -> Markup {
    let num = |f: fn(&Limits) -> u64| form.limits.map(|l| f(&l).to_string()).unwrap_or_default();
    let d = Limits::default();
    html! {
        section id="submit" class="card" {
            h2 { "New task" }
            form method="post" action="/tasks" enctype="multipart/form-data" class="submit" {
                @if let Some(c) = csrf { input type="hidden" name="csrf" value=(c); }
                @if let Some(e) = &form.error {
                    p class="error" role="alert" { (e) }
                }
                label {
                    "Git repository URL"
                    input name="git_url" id="git_url" type="text" inputmode="url"
                        placeholder="https://github.com/owner/repo.git" value=(form.git_url);
                }
                label {
                    "Branch, tag or commit " small { "(optional)" }
                    input name="git_ref" id="git_ref" type="text" placeholder="main" value=(form.git_ref);
                }
                label {
                    "or a ZIP of the code"
                    input name="zip_file" id="zip_file" type="file" accept=".zip,application/zip";
                }
                label {
                    "What should the agent do?"
                    textarea name="task_description" id="task_description" rows="4" required
                        placeholder="Fix the failing test in calc.py" { (form.task_description) }
                }
                details class="opts" {
                    summary { "Model, limits, target file" }
                    label {
                        "Model " small { "(default from config)" }
                        input name="model" id="model" type="text" value=(form.model);
                    }
                    label {
                        "Git token " small { "(a private repository; sent to its host only)" }
                        input name="git_token" id="git_token" type="password"
                            autocomplete="off";
                    }
                    label {
                        "Target file " small { "(optional)" }
                        input name="target_file" id="target_file" type="text" value=(form.target_file);
                    }
                    div class="row3" {
                        label {
                            "Max steps"
                            input name="max_steps" type="number" min="1" placeholder=(d.max_steps)
                                value=(num(|l| u64::from(l.max_steps)));
                        }
                        label {
                            "Max tokens"
                            input name="max_tokens" type="number" min="1" placeholder=(d.max_tokens)
                                value=(num(|l| l.max_tokens));
                        }
                        label {
                            "Wall time (s)"
                            input name="wall_seconds" type="number" min="1" placeholder=(d.wall_seconds)
                                value=(num(|l| l.wall_seconds));
                        }
                    }
                    label {
                        "Max cost (USD) " small { "(optional; priced from the model table)" }
                        input name="max_cost_usd" id="max_cost_usd" type="number" min="0"
                            step="any" placeholder="no cap"
                            value=(form.limits.and_then(|l| l.max_cost_usd).map(|c| c.0.to_string()).unwrap_or_default());
                    }
                }
                button type="submit" id="submit-task" { "Submit task" }
            }
        }
    }
}

/// The front page: filter and search, the list, and the submit form.
pub fn list_page(
    tasks: &[TaskRecord],
    filter: &ListFilterView,
    next_cursor: Option<&str>,
    form: &FormState,
    now: DateTime<Utc>,
    who: Option<&SignedIn<'_>>,
) -> String {
    let status = filter.status.map(|s| s.as_str()).unwrap_or_default();
    let admin = who.is_some_and(|w| w.role == "admin");
    let body = html! {
        div class="home" {
            section class="list card" {
                div class="bar" {
                    h1 { "Tasks" }
                    form class="filter" method="get" action="/" role="search" {
                        select name="status" id="status-filter" aria-label="Status" {
                            (status_options(filter.status))
                        }
                        input type="search" name="q" id="search" placeholder="Search"
                            aria-label="Search tasks" value=(filter.query);
                        @if admin {
                            input type="text" name="tenant" id="tenant-filter"
                                placeholder="Every tenant" aria-label="Tenant"
                                value=(filter.tenant);
                        }
                        button type="submit" { "Filter" }
                    }
                }
                div id="task-list" data-live="list" { (task_rows(tasks, now)) }
                @if let Some(c) = next_cursor {
                    p class="more" {
                        a href={
                            "/?status=" (url_encode(status))
                            "&q=" (url_encode(&filter.query))
                            "&tenant=" (url_encode(&filter.tenant))
                            "&cursor=" (url_encode(c))
                        } { "Older tasks →" }
                    }
                }
            }
            (submit_form(form, who.map(|w| w.csrf)))
        }
    };
    page_for("Tasks", &body, who)
}

/// Percent-encodes a query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Everything the task page shows.
pub struct TaskPageData<'a> {
    pub record: &'a TaskRecord,
    pub events: &'a [TaskEvent],
    pub workflow_link: Option<String>,
    /// The diff text and whether it was cut short.
    pub diff: Option<(String, bool)>,
    pub transcript: Option<(String, bool)>,
    pub split: bool,
    pub now: DateTime<Utc>,
    pub who: Option<SignedIn<'a>>,
    /// A best-of-N task's candidates' diffs (text, cut short), by candidate number.
    pub candidate_diffs: Vec<(u32, Option<(String, bool)>)>,
}

/// One row of the facts list.
fn fact(name: &str, value: &Markup) -> Markup {
    html! { div { dt { (name) } dd { (value) } } }
}

fn facts(d: &TaskPageData<'_>) -> Markup {
    let r = d.record;
    let l = r.spec.limits;
    let created = r.created_at.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    html! {
        dl class="facts" {
            (fact("Repository", &html! { (r.spec.source.display_name()) }))
            (fact("Task", &html! { code { (r.task_id) } }))
            (fact("Created", &html! {
                (time_el(r.created_at, &created)) " (" (age(r.created_at, d.now)) " ago)"
            }))
            (fact("Attempt", &html! { span id="attempt" { (r.attempt) } }))
            (fact("Model", &html! { (r.spec.model.as_deref().unwrap_or("default")) }))
            (fact("Limits", &html! {
                (l.max_steps) " steps · " (thousands(l.max_tokens)) " tokens · "
                (duration_ms(l.wall_seconds * 1000))
                @if let Some(c) = l.max_cost_usd { " · " (usd(c.0)) }
            }))
            @if let Some(t) = &r.spec.target_file {
                (fact("Target file", &html! { (t) }))
            }
            @if let Some(url) = &r.pr_url {
                (fact("Pull request", &html! {
                    @if let Some(href) = safe_href(url) {
                        a href=(href) rel="noopener noreferrer" { (url) }
                    } @else {
                        (url)
                    }
                }))
            }
            @if let Some(e) = &r.pr_error {
                (fact("Pull request", &html! { span class="err" id="pr-error" { "not opened: " (e) } }))
            }
        }
    }
}

fn actions(d: &TaskPageData<'_>) -> Markup {
    let r = d.record;
    let id = &r.task_id;
    html! {
        div class="actions" {
            @if r.status.is_terminal() {
                form method="post" action={ "/tasks/" (id) "/retry" } class="inline"
                    data-api={ "/api/tasks/" (id) "/retry" } {
                    @if let Some(w) = &d.who { input type="hidden" name="csrf" value=(w.csrf); }
                    select name="mode" aria-label="Retry mode" {
                        option value="from_start" { "from the start" }
                        // A completed task has no failed step to resume from.
                        @if r.status != TaskStatus::Completed {
                            option value="from_failed_step" { "from the failed step" }
                        }
                    }
                    button type="submit" id="retry" { "Retry" }
                }
            } @else {
                form method="post" action={ "/tasks/" (id) "/cancel" } class="inline"
                    data-api={ "/api/tasks/" (id) "/cancel" } {
                    @if let Some(w) = &d.who { input type="hidden" name="csrf" value=(w.csrf); }
                    button type="submit" id="cancel" class="danger" { "Cancel" }
                }
            }
            @if let Some(link) = d.workflow_link.as_deref().and_then(safe_href) {
                a class="btn" id="workflow-link" href=(link) target="_blank"
                    rel="noopener noreferrer" { "Workflow in Temporal ↗" }
            }
            span class="raw" {
                "Raw: "
                a href={ "/api/tasks/" (id) "/diff" } { "diff" } " · "
                a href={ "/api/tasks/" (id) "/transcript" } { "transcript" } " · "
                a href={ "/api/tasks/" (id) "/log" } { "log" } " · "
                a href={ "/api/tasks/" (id) } { "JSON" }
            }
        }
        p id="flash" class="error" role="alert" hidden {}
    }
}

/// The conversation: each turn's message and outcome, and the box for the next one.
fn conversation(d: &TaskPageData<'_>) -> Markup {
    let r = d.record;
    let id = &r.task_id;
    let turns = patchflow_api::TaskView::turns_of(r);
    let open = matches!(r.status, TaskStatus::Completed | TaskStatus::Failed)
        && (r.spec.candidates <= 1 || r.selected.is_some());
    html! {
        section id="conversation" class="card" {
            h2 { "Conversation" }
            ol class="turns" {
                @for t in &turns {
                    li class="turn" data-turn=(t.turn) {
                        div class="bar" {
                            strong { "Turn " (t.turn) } " " (badge(t.status))
                            @if turns.len() > 1 {
                                " "
                                a href={ "/api/tasks/" (id) "/diff?turn=" (t.turn) } { "its change" }
                            }
                        }
                        p class="say" { (t.message) }
                        @if !t.summary.is_empty() { p class="msg" { (t.summary) } }
                    }
                }
            }
            @if open {
                form method="post" action={ "/tasks/" (id) "/messages" } class="message"
                    data-api={ "/api/tasks/" (id) "/messages" } {
                    @if let Some(w) = &d.who { input type="hidden" name="csrf" value=(w.csrf); }
                    label for="message" { "Follow-up" }
                    textarea name="message" id="message-box" rows="3" required
                        placeholder="Now also add a test for it" {}
                    button type="submit" id="send-message" { "Send" }
                }
            } @else if r.spec.candidates > 1 && r.selected.is_none() && r.status.is_terminal() {
                p class="empty" { "Select a candidate to go on from it." }
            }
        }
    }
}

/// A best-of-N task's candidates side by side: outcome, cost, files, diff, and Select.
fn candidates(d: &TaskPageData<'_>) -> Markup {
    let r = d.record;
    let id = &r.task_id;
    if r.spec.candidates <= 1 {
        return html! {};
    }
    let selectable = r.status.is_terminal() && r.turns.len() <= 1;
    html! {
        section id="candidates" class="card" {
            h2 { (r.spec.candidates) " candidates"
                @if let Some(rule) = r.spec.auto_select { " · auto-select " (rule.as_str()) } }
            div class="candidates" {
                @for n in 1..=r.spec.candidates {
                    @let c = r.candidates.iter().find(|c| c.candidate == n);
                    @let chosen = r.selected == Some(n);
                    div class={ "candidate" @if chosen { " selected" } } id={ "candidate-" (n) } {
                        div class="bar" {
                            strong { "Candidate " (n) }
                            " "
                            (badge(c.map_or(TaskStatus::Queued, |c| c.status)))
                            @if chosen { " " span class="chosen" { "selected" } }
                        }
                        @if let Some(c) = c {
                            p class="msg" { (c.error.as_deref().unwrap_or(&c.summary)) }
                            p class="figures" {
                                (usd(c.cost_usd)) " · " (c.files_changed.len()) " files"
                                @if let Some(ok) = c.tests_passed {
                                    " · tests " (if ok { "passed" } else { "failed" })
                                }
                            }
                        }
                        @match d.candidate_diffs.iter().find(|(m, _)| *m == n).and_then(|(_, t)| t.as_ref()) {
                            None => p class="empty" { "No diff yet." },
                            Some((text, _)) if text.trim().is_empty() => p class="empty" { "No change." },
                            Some((text, cut)) => {
                                (PreEscaped(diff::render_unified(&diff::parse(text))))
                                @if *cut {
                                    p class="empty" {
                                        a href={ "/api/tasks/" (id) "/candidates/" (n) "/diff" } { "the whole diff" }
                                    }
                                }
                            }
                        }
                        @if selectable && !chosen && c.is_some_and(|c| c.status == TaskStatus::Completed) {
                            form method="post" action={ "/tasks/" (id) "/select" } class="inline"
                                data-api={ "/api/tasks/" (id) "/select" } {
                                @if let Some(w) = &d.who { input type="hidden" name="csrf" value=(w.csrf); }
                                input type="hidden" name="candidate" value=(n);
                                button type="submit" id={ "select-" (n) } { "Select" }
                            }
                        }
                        span class="raw" {
                            a href={ "/api/tasks/" (id) "/candidates/" (n) "/transcript" } { "transcript" } " · "
                            a href={ "/api/tasks/" (id) "/candidates/" (n) "/log" } { "log" }
                        }
                    }
                }
            }
        }
    }
}

fn timeline(events: &[TaskEvent], attempts: &[TaskAttempt]) -> Markup {
    let statuses: Vec<&TaskEvent> = events
        .iter()
        .filter(|e| e.kind == TaskEventKind::Status)
        .collect();
    let ended = |e: &TaskEvent| e.status.is_some_and(TaskStatus::is_terminal);
    html! {
        section id="timeline" class="card" {
            h2 { "Status" }
            ol class="timeline" {
                @for (i, e) in statuses.iter().enumerate() {
                    // A step after an ended one opens the next turn (a follow-up) or the
                    // next attempt (a retry).
                    @if i > 0 && ended(statuses[i - 1]) {
                        li class="sep" {
                            @if let Some(t) = turn_of(&e.message) {
                                "Turn " (t)
                            } @else {
                                "Attempt "
                                (1 + (1..=i)
                                    .filter(|j| ended(statuses[j - 1]) && turn_of(&statuses[*j].message).is_none())
                                    .count())
                            }
                        }
                    }
                    li class={ "st" (status_class(e.status)) } {
                        (clock(e.at)) " " b { (e.status.map(|s| s.as_str()).unwrap_or("?")) }
                        // How long the step took; an ended attempt has no next step.
                        @if let Some(next) = statuses.get(i + 1).filter(|_| !ended(e)) {
                            span class="took" {
                                (duration_ms((next.at - e.at).num_milliseconds().max(0) as u64))
                            }
                        }
                        div class="m" { (e.message) }
                    }
                }
                @if statuses.is_empty() {
                    li class="st" { "No status changes yet." }
                }
            }
            // One attempt is the whole story above; the table only helps once there are more.
            @if attempts.len() > 1 {
                h3 { "Attempts" }
                table class="attempts" {
                    tr { th { "#" } th { "started" } th { "finished" } th { "outcome" } th { "worker" } }
                    @for a in attempts {
                        tr {
                            td { (a.attempt) }
                            td { (clock(a.started_at)) }
                            td {
                                @match a.finished_at {
                                    Some(t) => (clock(t)),
                                    None => "—",
                                }
                            }
                            td { (a.status) " " span class="m" { (a.message) } }
                            td class="m" { (a.worker.as_deref().unwrap_or("—")) }
                        }
                    }
                }
            }
        }
    }
}

/// The follow-up turn a status message belongs to (`turn 2: …`).
fn turn_of(message: &str) -> Option<u32> {
    message
        .strip_prefix("turn ")?
        .split_once(':')?
        .0
        .parse()
        .ok()
}

/// The timeline's colour for a step: the end states stand out.
fn status_class(status: Option<TaskStatus>) -> &'static str {
    match status {
        Some(TaskStatus::Completed) => " ok",
        Some(TaskStatus::Failed) => " bad",
        Some(TaskStatus::Cancelled) => " off",
        _ => "",
    }
}

fn agent_events(events: &[TaskEvent]) -> Markup {
    html! {
        section class="card" {
            h2 { "Agent events " span class="live-dot" hidden { "live" } }
            ol id="events" class="events" {
                @for e in events.iter().filter(|e| e.kind == TaskEventKind::Agent) {
                    li { (clock(e.at)) " " (e.message) }
                }
            }
        }
    }
}

/// One figure of the summary: the value large, what it counts below.
fn figure(value: &str, what: &str) -> Markup {
    html! { div { b { (value) } span { (what) } } }
}

fn summary(s: Option<&AgentSummary>) -> Markup {
    html! {
        section id="summary" class="card" {
            h2 { "Summary" }
            @if let Some(s) = s {
                @if !s.summary.trim().is_empty() {
                    p class="say" { (s.summary) }
                }
                div class="figures" {
                    (figure(s.outcome.describe().trim_start_matches("the agent "), "outcome"))
                    (figure(&s.steps.to_string(), "steps"))
                    (figure(&s.tool_calls.to_string(), "tool calls"))
                    (figure(&thousands(s.total_tokens), "tokens"))
                    (figure(
                        &format!("{} / {}", thousands(s.prompt_tokens), thousands(s.completion_tokens)),
                        "prompt / completion",
                    ))
                    (figure(
                        &format!("{} / {}", thousands(s.cached_tokens), thousands(s.reasoning_tokens)),
                        "cached / reasoning",
                    ))
                    (figure(&usd(s.cost_usd), "cost"))
                    @if s.compactions > 0 {
                        (figure(&s.compactions.to_string(), "compactions"))
                    }
                    (figure(&duration_ms(s.wall_ms), "agent time"))
                    (figure(&s.files_changed.len().to_string(), "files changed"))
                }
                @if let Some(e) = &s.error {
                    p class="error" { (e) }
                }
            } @else {
                p class="empty" { "Figures appear when the agent has run." }
            }
        }
    }
}

fn diff_section(d: &TaskPageData<'_>) -> Markup {
    let id = &d.record.task_id;
    html! {
        section id="diff" class="card" {
            div class="bar" {
                h2 { "Diff" }
                nav class="toggle" {
                    a href={ "/tasks/" (id) "?view=unified#diff" }
                        aria-current=[(!d.split).then_some("page")] { "Unified" }
                    a href={ "/tasks/" (id) "?view=split#diff" }
                        aria-current=[d.split.then_some("page")] { "Side by side" }
                }
            }
            @match &d.diff {
                None => p class="empty" { "No diff yet." },
                Some((text, _)) if text.trim().is_empty() => {
                    p class="empty" { "The agent changed nothing." }
                }
                Some((text, cut)) => {
                    @let files = diff::parse(text);
                    @if d.split {
                        (PreEscaped(diff::render_split(&files)))
                    } @else {
                        (PreEscaped(diff::render_unified(&files)))
                    }
                    @if *cut {
                        p class="empty" {
                            "The diff is longer than shown: "
                            a href={ "/api/tasks/" (id) "/diff" } { "the whole diff" } "."
                        }
                    }
                }
            }
        }
    }
}

fn transcript_section(d: &TaskPageData<'_>) -> Markup {
    let id = &d.record.task_id;
    html! {
        section id="transcript" class="card" {
            h2 { "Transcript" }
            @match &d.transcript {
                None => p class="empty" { "No transcript yet." },
                Some((text, cut)) => {
                    (PreEscaped(transcript::render(text)))
                    @if *cut {
                        p class="empty" {
                            "The transcript is longer than shown: "
                            a href={ "/api/tasks/" (id) "/transcript" } { "the whole transcript" } "."
                        }
                    }
                }
            }
        }
    }
}

/// One task: head with actions, status timeline, live agent events, summary, diff and
/// transcript. `data-*` on the root tell the script where to resume the live stream.
pub fn task_page(d: &TaskPageData<'_>) -> String {
    let r = d.record;
    let last_seq = d.events.iter().map(|e| e.seq).max().unwrap_or(0);
    let title = headline(&r.spec.task_description, 100);
    let shown_title = if title.is_empty() {
        "(no description)"
    } else {
        &title
    };
    let body = html! {
        div id="task" data-task=(r.task_id) data-last=(last_seq)
            data-terminal=(u8::from(r.status.is_terminal())) {
            p class="crumb" { a href="/" { "← All tasks" } }
            section id="head" class="card head" {
                div class="title" { h1 { (shown_title) } (badge(r.status)) }
                p class="msg" id="message" { (r.message) }
                @if r.spec.task_description.trim() != title {
                    details class="fulldesc" {
                        summary { "Full task description" }
                        p class="say" { (r.spec.task_description) }
                    }
                }
                (facts(d))
                (actions(d))
            }
            div class="cols" {
                (timeline(d.events, &r.attempts))
                (agent_events(d.events))
            }
            (candidates(d))
            (conversation(d))
            (summary(r.summary.as_ref()))
            (diff_section(d))
            (transcript_section(d))
        }
    };
    page_for(&format!("{} {}", r.status, title), &body, d.who.as_ref())
}

/// The sign-in form: a token, sent once; the answer sets the session cookie.
pub fn signin_page(error: Option<&str>) -> String {
    let body = html! {
        section class="card signin" {
            h1 { "Sign in" }
            @if let Some(e) = error { p class="error" role="alert" id="signin-error" { (e) } }
            form method="post" action="/signin" {
                label for="token" { "API token" }
                input name="token" id="token" type="password" autocomplete="off"
                    placeholder="pf_…" required;
                button type="submit" id="signin" { "Sign in" }
            }
            p class="hint" { "One machine: the token is in " code { "<data_dir>/admin.token" } "." }
        }
    };
    page("Sign in", &body)
}

/// A page that says what went wrong, with a way back.
pub fn error_page(title: &str, message: &str) -> String {
    let body = html! {
        section class="card" {
            h1 { (title) }
            p class="error" role="alert" { (message) }
            p { a href="/" { "← All tasks" } }
        }
    };
    page(title, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchflow_core::{AgentOutcome, TaskId, TaskSource, TaskSpec};

    const HOSTILE: &str = "<script>alert('x')</script>\"><img src=x onerror=alert(1)>";

    fn hostile_record() -> TaskRecord {
        let now = Utc::now();
        let mut spec = TaskSpec::new(
            TaskSource::Git {
                url: format!("https://example.com/{HOSTILE}.git"),
                git_ref: Some(HOSTILE.to_string()),
                git_token: None,
            },
            format!("{HOSTILE}\nsecond line {HOSTILE}"),
        );
        spec.model = Some(HOSTILE.to_string());
        spec.target_file = Some(HOSTILE.to_string());
        TaskRecord {
            task_id: TaskId::generate(),
            status: TaskStatus::Completed,
            message: HOSTILE.to_string(),
            created_at: now,
            updated_at: now,
            pr_url: Some("javascript:alert(1)".to_string()),
            pr_error: Some(HOSTILE.to_string()),
            summary: Some(AgentSummary {
                outcome: AgentOutcome::Finished,
                summary: HOSTILE.to_string(),
                model: HOSTILE.to_string(),
                steps: 2,
                tool_calls: 3,
                prompt_tokens: 1000,
                completion_tokens: 200,
                total_tokens: 1200,
                cached_tokens: 300,
                reasoning_tokens: 40,
                cost_usd: 0.012345,
                compactions: 1,
                wall_ms: 4200,
                files_changed: vec![HOSTILE.to_string()],
                tests_passed: None,
                error: Some(HOSTILE.to_string()),
                sandbox: None,
            }),
            tenant: "default".to_string(),
            batch_id: None,
            idempotency_key: None,
            spec,
            attempt: 2,
            turns: Vec::new(),
            candidates: Vec::new(),
            selected: None,
            attempts: (1..=2)
                .map(|n| TaskAttempt {
                    attempt: n,
                    started_at: now,
                    finished_at: Some(now),
                    status: TaskStatus::Failed,
                    message: HOSTILE.to_string(),
                    run_id: None,
                    worker: Some(HOSTILE.to_string()),
                })
                .collect(),
        }
    }

    fn assert_clean(html: &str) {
        for raw in [
            "<script>alert",
            "<img src=x",
            "\"><img",
            "href=\"javascript:",
        ] {
            assert!(!html.contains(raw), "{raw} reached the page:\n{html}");
        }
    }

    #[test]
    fn the_list_escapes_everything_a_user_wrote() {
        let r = hostile_record();
        let form = FormState {
            error: Some(HOSTILE.to_string()),
            git_url: HOSTILE.to_string(),
            task_description: format!("</textarea>{HOSTILE}"),
            ..FormState::default()
        };
        let html = list_page(
            std::slice::from_ref(&r),
            &ListFilterView {
                status: Some(TaskStatus::Completed),
                query: HOSTILE.to_string(),
                tenant: HOSTILE.to_string(),
            },
            Some("c&\"ursor"),
            &form,
            Utc::now(),
            Some(&SignedIn {
                tenant: HOSTILE,
                role: "admin",
                csrf: "c",
            }),
        );
        assert_clean(&html);
        assert!(
            html.contains("id=\"tenant-filter\""),
            "an admin may filter by tenant"
        );
        assert!(!html.contains("</textarea><script"));
        assert!(html.contains(&format!("<a href=\"/tasks/{}\">", r.task_id)));
        assert!(html.contains("&lt;script&gt;alert('x')&lt;/script&gt;"));
        assert!(html.contains("<option value=\"COMPLETED\" selected>"));
        assert!(html.contains("cursor=c%26%22ursor"));
    }

    #[test]
    fn the_task_page_escapes_record_events_diff_and_transcript() {
        let mut r = hostile_record();
        let now = Utc::now();
        // A raced task with follow-ups: candidates' and turns' text is the user's too.
        r.spec.candidates = 2;
        r.selected = Some(1);
        r.candidates = (1..=2)
            .map(|n| patchflow_core::CandidateRecord {
                candidate: n,
                status: TaskStatus::Completed,
                summary: HOSTILE.to_string(),
                files_changed: vec![HOSTILE.to_string()],
                cost_usd: 0.5,
                error: (n == 2).then(|| HOSTILE.to_string()),
                diff_bytes: 10,
                tests_passed: Some(true),
                finished_at: Some(now),
            })
            .collect();
        r.turns = (1..=2)
            .map(|t| patchflow_core::TurnRecord {
                turn: t,
                message: HOSTILE.to_string(),
                status: TaskStatus::Completed,
                summary: HOSTILE.to_string(),
                started_at: now,
                finished_at: Some(now),
            })
            .collect();
        let events = vec![
            TaskEvent {
                seq: 1,
                kind: TaskEventKind::Status,
                status: Some(TaskStatus::Queued),
                message: HOSTILE.to_string(),
                at: now,
            },
            TaskEvent {
                seq: 2,
                kind: TaskEventKind::Agent,
                status: None,
                message: HOSTILE.to_string(),
                at: now,
            },
        ];
        let diff = format!(
            "diff --git a/x.html b/x.html\n--- a/x.html\n+++ b/x.html\n@@ -1 +1 @@\n-{HOSTILE}\n+{HOSTILE}\n"
        );
        let transcript = format!(
            "{{\"type\":\"tool_result\",\"step\":1,\"tool\":\"{t}\",\"arguments\":\"{t}\",\"ok\":true,\"output\":\"{t}\"}}\n",
            t = HOSTILE.replace('"', "\\\"")
        );
        for split in [false, true] {
            let html = task_page(&TaskPageData {
                record: &r,
                events: &events,
                workflow_link: Some("http://127.0.0.1:8233/namespaces/default/workflows/x".into()),
                diff: Some((diff.clone(), true)),
                transcript: Some((transcript.clone(), false)),
                split,
                now,
                who: None,
                candidate_diffs: vec![(1, Some((diff.clone(), true))), (2, None)],
            });
            assert_clean(&html);
            assert!(html.contains("id=\"candidate-2\""), "{html}");
            assert!(html.contains("id=\"message-box\""), "{html}");
            assert!(html.contains(&format!(
                "data-task=\"{}\" data-last=\"2\" data-terminal=\"1\"",
                r.task_id
            )));
            assert!(html.contains("<span id=\"attempt\">2</span>"));
            assert!(html.contains("<b>$0.012345</b><span>cost</span>"), "{html}");
            assert!(html.contains("<span>cached / reasoning</span>"));
            assert!(html.contains("<h3>Attempts</h3>"));
            assert!(html.contains("The diff is longer than shown"));
            assert!(html.contains("<details><summary><b>&lt;script&gt;"));
            assert!(html.contains("id=\"retry\"") && !html.contains("id=\"cancel\""));
        }
    }

    /// Text a user wrote lands in element content and in attribute values (the search
    /// index of a row, the refilled form); in both it stays text.
    #[test]
    fn hostile_task_text_stays_text_in_content_and_attributes() {
        let mut r = hostile_record();
        r.spec.task_description = "\"><script>alert(1)</script> & 'quoted'".to_string();
        r.message = "done".to_string();
        let form = FormState {
            git_url: "\" onfocus=\"alert(1)".to_string(),
            task_description: r.spec.task_description.clone(),
            ..FormState::default()
        };
        let html = list_page(
            std::slice::from_ref(&r),
            &ListFilterView::default(),
            None,
            &form,
            Utc::now(),
            None,
        );
        let escaped = "&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt; &amp; 'quoted'";
        assert!(
            html.contains(&format!("<span class=\"desc\">{escaped}</span>")),
            "{html}"
        );
        assert!(
            html.contains(&format!("data-search=\"{} ", r.task_id)),
            "{html}"
        );
        assert!(html.contains(&format!("{escaped} done\">")), "{html}");
        assert!(
            html.contains("value=\"&quot; onfocus=&quot;alert(1)\">"),
            "{html}"
        );
        assert!(html.contains(&format!(
            "Fix the failing test in calc.py\">{escaped}</textarea>"
        )));
        assert!(!html.contains("<script>alert(1)") && !html.contains("\" onfocus"));

        let page = task_page(&TaskPageData {
            record: &r,
            events: &[],
            workflow_link: None,
            diff: None,
            transcript: None,
            split: false,
            now: Utc::now(),
            who: None,
            candidate_diffs: Vec::new(),
        });
        assert!(page.contains(&format!("<h1>{escaped}</h1>")), "{page}");
        assert!(
            page.contains(&format!("<title>COMPLETED {escaped} · patchflow</title>")),
            "{page}"
        );
        assert!(!page.contains("<script>alert(1)"), "{page}");
    }

    #[test]
    fn the_timeline_names_a_follow_up_a_turn_and_a_retry_an_attempt() {
        let now = Utc::now();
        let ev = |seq: i64, status: TaskStatus, message: &str| TaskEvent {
            seq,
            kind: TaskEventKind::Status,
            status: Some(status),
            message: message.to_string(),
            at: now,
        };
        let events = [
            ev(1, TaskStatus::Queued, "q"),
            ev(2, TaskStatus::Completed, "done"),
            ev(
                3,
                TaskStatus::RunningAgent,
                "turn 2: running the agent on the follow-up",
            ),
            ev(4, TaskStatus::Completed, "turn 2: done"),
            ev(
                5,
                TaskStatus::Queued,
                "retry from the start requested (attempt 2)",
            ),
            ev(6, TaskStatus::Completed, "done again"),
        ];
        let html = timeline(&events, &[]).into_string();
        let seps: Vec<&str> = html
            .split("<li class=\"sep\">")
            .skip(1)
            .map(|rest| rest.split("</li>").next().unwrap())
            .collect();
        assert_eq!(seps, ["Turn 2", "Attempt 2"], "{html}");
    }
}
