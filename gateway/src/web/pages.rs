//! The two pages, rendered on the server from plain data so they read the same with or
//! without JavaScript: the task list with the submit form, and one task's page.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use patchflow_core::{
    AgentSummary, Limits, TaskAttempt, TaskEvent, TaskEventKind, TaskRecord, TaskStatus,
};

use super::diff;
use super::html::{age, badge, clock, duration_ms, esc, page, safe_href, thousands, time_el};
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
pub fn task_rows(tasks: &[TaskRecord], now: DateTime<Utc>) -> String {
    if tasks.is_empty() {
        return "<p class=\"empty\">No tasks yet. Submit one with the form.</p>".to_string();
    }
    let mut out = String::from("<ul class=\"tasks\">");
    for r in tasks {
        let _ = write!(
            out,
            "<li data-search=\"{search}\"><a href=\"/tasks/{id}\">{badge}\
<span class=\"repo\">{repo}</span><span class=\"desc\">{desc}</span>\
<span class=\"age\">{age} ago</span></a></li>",
            search = esc(&search_text(r)),
            id = r.task_id,
            badge = badge(r.status),
            repo = esc(&r.spec.source.display_name()),
            desc = esc(&headline(&r.spec.task_description, 140)),
            age = time_el(r.created_at, &age(r.created_at, now)),
        );
    }
    out.push_str("</ul>");
    out
}

fn status_options(selected: Option<TaskStatus>) -> String {
    let mut out = format!(
        "<option value=\"\"{}>All statuses</option>",
        if selected.is_none() { " selected" } else { "" }
    );
    for s in TaskStatus::ALL {
        let _ = write!(
            out,
            "<option value=\"{s}\"{sel}>{s}</option>",
            s = s.as_str(),
            sel = if selected == Some(s) { " selected" } else { "" }
        );
    }
    out
}

fn submit_form(form: &FormState) -> String {
    let limits = form.limits;
    let num = |f: fn(&Limits) -> u64| limits.map(|l| f(&l).to_string()).unwrap_or_default();
    let d = Limits::default();
    let mut out = String::from(
        "<section id=\"submit\" class=\"card\"><h2>New task</h2>\
<form method=\"post\" action=\"/tasks\" enctype=\"multipart/form-data\" class=\"submit\">",
    );
    if let Some(e) = &form.error {
        let _ = write!(out, "<p class=\"error\" role=\"alert\">{}</p>", esc(e));
    }
    let _ = write!(
        out,
        "<label>Git repository URL<input name=\"git_url\" id=\"git_url\" type=\"text\" inputmode=\"url\" \
placeholder=\"https://github.com/owner/repo.git\" value=\"{url}\"></label>\
<label>Branch, tag or commit <small>(optional)</small><input name=\"git_ref\" id=\"git_ref\" type=\"text\" placeholder=\"main\" value=\"{gref}\"></label>\
<label>or a ZIP of the code<input name=\"zip_file\" id=\"zip_file\" type=\"file\" accept=\".zip,application/zip\"></label>\
<label>What should the agent do?<textarea name=\"task_description\" id=\"task_description\" rows=\"4\" required \
placeholder=\"Fix the failing test in calc.py\">{desc}</textarea></label>\
<details class=\"opts\"><summary>Model, limits, target file</summary>\
<label>Model <small>(default from config)</small><input name=\"model\" id=\"model\" type=\"text\" value=\"{model}\"></label>\
<label>Target file <small>(optional)</small><input name=\"target_file\" id=\"target_file\" type=\"text\" value=\"{target}\"></label>\
<div class=\"row3\"><label>Max steps<input name=\"max_steps\" type=\"number\" min=\"1\" placeholder=\"{ds}\" value=\"{ms}\"></label>\
<label>Max tokens<input name=\"max_tokens\" type=\"number\" min=\"1\" placeholder=\"{dt}\" value=\"{mt}\"></label>\
<label>Wall time (s)<input name=\"wall_seconds\" type=\"number\" min=\"1\" placeholder=\"{dw}\" value=\"{mw}\"></label></div>\
</details><button type=\"submit\" id=\"submit-task\">Submit task</button></form></section>",
        url = esc(&form.git_url),
        gref = esc(&form.git_ref),
        desc = esc(&form.task_description),
        model = esc(&form.model),
        target = esc(&form.target_file),
        ds = d.max_steps,
        dt = d.max_tokens,
        dw = d.wall_seconds,
        ms = num(|l| u64::from(l.max_steps)),
        mt = num(|l| l.max_tokens),
        mw = num(|l| l.wall_seconds),
    );
    out
}

/// The front page: filter and search, the list, and the submit form.
pub fn list_page(
    tasks: &[TaskRecord],
    filter: &ListFilterView,
    next_cursor: Option<&str>,
    form: &FormState,
    now: DateTime<Utc>,
) -> String {
    let mut body = String::from("<div class=\"home\"><section class=\"list card\">");
    let _ = write!(
        body,
        "<div class=\"bar\"><h1>Tasks</h1><form class=\"filter\" method=\"get\" action=\"/\" role=\"search\">\
<select name=\"status\" id=\"status-filter\" aria-label=\"Status\">{opts}</select>\
<input type=\"search\" name=\"q\" id=\"search\" placeholder=\"Search\" aria-label=\"Search tasks\" value=\"{q}\">\
<button type=\"submit\">Filter</button></form></div>\
<div id=\"task-list\" data-live=\"list\">{rows}</div>",
        opts = status_options(filter.status),
        q = esc(&filter.query),
        rows = task_rows(tasks, now),
    );
    if let Some(c) = next_cursor {
        let status = filter.status.map(|s| s.as_str()).unwrap_or_default();
        let _ = write!(
            body,
            "<p class=\"more\"><a href=\"/?status={}&amp;q={}&amp;cursor={}\">Older tasks →</a></p>",
            esc(&url_encode(status)),
            esc(&url_encode(&filter.query)),
            esc(&url_encode(c))
        );
    }
    body.push_str("</section>");
    body.push_str(&submit_form(form));
    body.push_str("</div>");
    page("Tasks", &body)
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
}

fn facts(d: &TaskPageData<'_>) -> String {
    let r = d.record;
    let mut out = String::from("<dl class=\"facts\">");
    let mut fact = |k: &str, v: String| {
        let _ = write!(out, "<div><dt>{k}</dt><dd>{v}</dd></div>");
    };
    fact("Repository", esc(&r.spec.source.display_name()));
    fact("Task", format!("<code>{}</code>", r.task_id));
    fact(
        "Created",
        format!(
            "{} ({} ago)",
            time_el(
                r.created_at,
                &r.created_at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
            ),
            age(r.created_at, d.now)
        ),
    );
    fact(
        "Attempt",
        format!("<span id=\"attempt\">{}</span>", r.attempt),
    );
    fact("Model", esc(r.spec.model.as_deref().unwrap_or("default")));
    let l = r.spec.limits;
    fact(
        "Limits",
        format!(
            "{} steps · {} tokens · {}",
            l.max_steps,
            thousands(l.max_tokens),
            duration_ms(l.wall_seconds * 1000)
        ),
    );
    if let Some(t) = &r.spec.target_file {
        fact("Target file", esc(t));
    }
    if let Some(url) = &r.pr_url {
        match safe_href(url) {
            Some(href) => fact(
                "Pull request",
                format!(
                    "<a href=\"{href}\" rel=\"noopener noreferrer\">{}</a>",
                    esc(url)
                ),
            ),
            None => fact("Pull request", esc(url)),
        }
    }
    out.push_str("</dl>");
    out
}

fn actions(d: &TaskPageData<'_>) -> String {
    let r = d.record;
    let id = &r.task_id;
    let mut out = String::from("<div class=\"actions\">");
    if r.status.is_terminal() {
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/tasks/{id}/retry\" class=\"inline\" data-api=\"/api/tasks/{id}/retry\">\
<select name=\"mode\" aria-label=\"Retry mode\"><option value=\"from_start\">from the start</option>{resume}</select>\
<button type=\"submit\" id=\"retry\">Retry</button></form>",
            // A completed task has no failed step to resume from.
            resume = if r.status == TaskStatus::Completed {
                ""
            } else {
                "<option value=\"from_failed_step\">from the failed step</option>"
            }
        );
    } else {
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/tasks/{id}/cancel\" class=\"inline\" data-api=\"/api/tasks/{id}/cancel\">\
<button type=\"submit\" id=\"cancel\" class=\"danger\">Cancel</button></form>"
        );
    }
    if let Some(link) = d.workflow_link.as_deref().and_then(safe_href) {
        let _ = write!(
            out,
            "<a class=\"btn\" id=\"workflow-link\" href=\"{link}\" target=\"_blank\" rel=\"noopener noreferrer\">Workflow in Temporal ↗</a>"
        );
    }
    let _ = write!(
        out,
        "<span class=\"raw\">Raw: <a href=\"/api/tasks/{id}/diff\">diff</a> · <a href=\"/api/tasks/{id}/transcript\">transcript</a> · <a href=\"/api/tasks/{id}/log\">log</a> · <a href=\"/api/tasks/{id}\">JSON</a></span></div><p id=\"flash\" class=\"error\" role=\"alert\" hidden></p>"
    );
    out
}

fn timeline(events: &[TaskEvent], attempts: &[TaskAttempt]) -> String {
    let mut out = String::from(
        "<section id=\"timeline\" class=\"card\"><h2>Status</h2><ol class=\"timeline\">",
    );
    let statuses: Vec<&TaskEvent> = events
        .iter()
        .filter(|e| e.kind == TaskEventKind::Status)
        .collect();
    let mut attempt = 1;
    for (i, e) in statuses.iter().enumerate() {
        let ended = e.status.is_some_and(TaskStatus::is_terminal);
        // How long the step took; an ended attempt has no next step, only a later retry.
        let took = statuses
            .get(i + 1)
            .filter(|_| !ended)
            .map(|n| duration_ms((n.at - e.at).num_milliseconds().max(0) as u64))
            .map(|t| format!("<span class=\"took\">{t}</span>"))
            .unwrap_or_default();
        if i > 0 && statuses[i - 1].status.is_some_and(TaskStatus::is_terminal) {
            attempt += 1;
            let _ = write!(out, "<li class=\"sep\">Attempt {attempt}</li>");
        }
        let status = e.status.map(|s| s.as_str()).unwrap_or("?");
        let cls = match e.status {
            Some(TaskStatus::Completed) => " ok",
            Some(TaskStatus::Failed) => " bad",
            Some(TaskStatus::Cancelled) => " off",
            _ => "",
        };
        let _ = write!(
            out,
            "<li class=\"st{cls}\">{} <b>{status}</b>{took}<div class=\"m\">{}</div></li>",
            clock(e.at),
            esc(&e.message)
        );
    }
    if statuses.is_empty() {
        out.push_str("<li class=\"st\">No status changes yet.</li>");
    }
    out.push_str("</ol>");
    // One attempt is the whole story above; the table only helps once there are more.
    if attempts.len() > 1 {
        out.push_str("<h3>Attempts</h3><table class=\"attempts\"><tr><th>#</th><th>started</th><th>finished</th><th>outcome</th></tr>");
        for a in attempts {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} <span class=\"m\">{}</span></td></tr>",
                a.attempt,
                clock(a.started_at),
                a.finished_at.map(clock).unwrap_or_else(|| "—".into()),
                a.status,
                esc(&a.message)
            );
        }
        out.push_str("</table>");
    }
    out.push_str("</section>");
    out
}

fn agent_events(events: &[TaskEvent]) -> String {
    let mut out = String::from(
        "<section class=\"card\"><h2>Agent events <span class=\"live-dot\" hidden>live</span></h2><ol id=\"events\" class=\"events\">",
    );
    for e in events.iter().filter(|e| e.kind == TaskEventKind::Agent) {
        let _ = write!(out, "<li>{} {}</li>", clock(e.at), esc(&e.message));
    }
    out.push_str("</ol></section>");
    out
}

fn summary(s: Option<&AgentSummary>) -> String {
    let Some(s) = s else {
        return "<section id=\"summary\" class=\"card\"><h2>Summary</h2><p class=\"empty\">Figures appear when the agent has run.</p></section>".to_string();
    };
    let mut out = String::from("<section id=\"summary\" class=\"card\"><h2>Summary</h2>");
    if !s.summary.trim().is_empty() {
        let _ = write!(out, "<p class=\"say\">{}</p>", esc(&s.summary));
    }
    out.push_str("<div class=\"figures\">");
    let mut fig = |v: String, k: &str| {
        let _ = write!(out, "<div><b>{v}</b><span>{k}</span></div>");
    };
    fig(
        esc(s.outcome.describe().trim_start_matches("the agent ")),
        "outcome",
    );
    fig(s.steps.to_string(), "steps");
    fig(s.tool_calls.to_string(), "tool calls");
    fig(thousands(s.total_tokens), "tokens");
    fig(
        format!(
            "{} / {}",
            thousands(s.prompt_tokens),
            thousands(s.completion_tokens)
        ),
        "prompt / completion",
    );
    fig(duration_ms(s.wall_ms), "agent time");
    fig(s.files_changed.len().to_string(), "files changed");
    out.push_str("</div>");
    if let Some(e) = &s.error {
        let _ = write!(out, "<p class=\"error\">{}</p>", esc(e));
    }
    out.push_str("</section>");
    out
}

fn diff_section(d: &TaskPageData<'_>) -> String {
    let id = &d.record.task_id;
    let mut out =
        String::from("<section id=\"diff\" class=\"card\"><div class=\"bar\"><h2>Diff</h2>");
    let _ = write!(
        out,
        "<nav class=\"toggle\"><a href=\"/tasks/{id}?view=unified#diff\"{u}>Unified</a><a href=\"/tasks/{id}?view=split#diff\"{s}>Side by side</a></nav></div>",
        u = if d.split {
            ""
        } else {
            " aria-current=\"page\""
        },
        s = if d.split {
            " aria-current=\"page\""
        } else {
            ""
        },
    );
    match &d.diff {
        None => out.push_str("<p class=\"empty\">No diff yet.</p>"),
        Some((text, _)) if text.trim().is_empty() => {
            out.push_str("<p class=\"empty\">The agent changed nothing.</p>")
        }
        Some((text, cut)) => {
            let files = diff::parse(text);
            out.push_str(&if d.split {
                diff::render_split(&files)
            } else {
                diff::render_unified(&files)
            });
            if *cut {
                let _ = write!(
                    out,
                    "<p class=\"empty\">The diff is longer than shown: <a href=\"/api/tasks/{id}/diff\">the whole diff</a>.</p>"
                );
            }
        }
    }
    out.push_str("</section>");
    out
}

fn transcript_section(d: &TaskPageData<'_>) -> String {
    let id = &d.record.task_id;
    let mut out = String::from("<section id=\"transcript\" class=\"card\"><h2>Transcript</h2>");
    match &d.transcript {
        None => out.push_str("<p class=\"empty\">No transcript yet.</p>"),
        Some((text, cut)) => {
            out.push_str(&transcript::render(text));
            if *cut {
                let _ = write!(
                    out,
                    "<p class=\"empty\">The transcript is longer than shown: <a href=\"/api/tasks/{id}/transcript\">the whole transcript</a>.</p>"
                );
            }
        }
    }
    out.push_str("</section>");
    out
}

/// One task: head with actions, status timeline, live agent events, summary, diff and
/// transcript. `data-*` on the root tell the script where to resume the live stream.
pub fn task_page(d: &TaskPageData<'_>) -> String {
    let r = d.record;
    let last_seq = d.events.iter().map(|e| e.seq).max().unwrap_or(0);
    let title = headline(&r.spec.task_description, 100);
    let mut body = String::new();
    let _ = write!(
        body,
        "<div id=\"task\" data-task=\"{id}\" data-last=\"{last_seq}\" data-terminal=\"{term}\">\
<p class=\"crumb\"><a href=\"/\">← All tasks</a></p>\
<section id=\"head\" class=\"card head\"><div class=\"title\"><h1>{title}</h1>{badge}</div>\
<p class=\"msg\" id=\"message\">{msg}</p>",
        id = r.task_id,
        term = u8::from(r.status.is_terminal()),
        title = esc(if title.is_empty() {
            "(no description)"
        } else {
            &title
        }),
        badge = badge(r.status),
        msg = esc(&r.message),
    );
    if r.spec.task_description.trim() != title {
        let _ = write!(
            body,
            "<details class=\"fulldesc\"><summary>Full task description</summary><p class=\"say\">{}</p></details>",
            esc(&r.spec.task_description)
        );
    }
    body.push_str(&facts(d));
    body.push_str(&actions(d));
    body.push_str("</section><div class=\"cols\">");
    body.push_str(&timeline(d.events, &r.attempts));
    body.push_str(&agent_events(d.events));
    body.push_str("</div>");
    body.push_str(&summary(r.summary.as_ref()));
    body.push_str(&diff_section(d));
    body.push_str(&transcript_section(d));
    body.push_str("</div>");
    page(&format!("{} {}", r.status, title), &body)
}

/// A page that says what went wrong, with a way back.
pub fn error_page(title: &str, message: &str) -> String {
    page(
        title,
        &format!(
            "<section class=\"card\"><h1>{}</h1><p class=\"error\" role=\"alert\">{}</p><p><a href=\"/\">← All tasks</a></p></section>",
            esc(title),
            esc(message)
        ),
    )
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
            summary: Some(AgentSummary {
                outcome: AgentOutcome::Finished,
                summary: HOSTILE.to_string(),
                model: HOSTILE.to_string(),
                steps: 2,
                tool_calls: 3,
                prompt_tokens: 1000,
                completion_tokens: 200,
                total_tokens: 1200,
                wall_ms: 4200,
                files_changed: vec![HOSTILE.to_string()],
                error: Some(HOSTILE.to_string()),
            }),
            tenant: "default".to_string(),
            batch_id: None,
            idempotency_key: None,
            spec,
            attempt: 2,
            attempts: (1..=2)
                .map(|n| TaskAttempt {
                    attempt: n,
                    started_at: now,
                    finished_at: Some(now),
                    status: TaskStatus::Failed,
                    message: HOSTILE.to_string(),
                    run_id: None,
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
            },
            Some("c&\"ursor"),
            &form,
            Utc::now(),
        );
        assert_clean(&html);
        assert!(!html.contains("</textarea><script"));
        assert!(html.contains(&format!("<a href=\"/tasks/{}\">", r.task_id)));
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(html.contains("<option value=\"COMPLETED\" selected>"));
        assert!(html.contains("cursor=c%26%22ursor"));
    }

    #[test]
    fn the_task_page_escapes_record_events_diff_and_transcript() {
        let r = hostile_record();
        let now = Utc::now();
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
            });
            assert_clean(&html);
            assert!(html.contains(&format!(
                "data-task=\"{}\" data-last=\"2\" data-terminal=\"1\"",
                r.task_id
            )));
            assert!(html.contains("<span id=\"attempt\">2</span>"));
            assert!(html.contains("<h3>Attempts</h3>"));
            assert!(html.contains("The diff is longer than shown"));
            assert!(html.contains("<details><summary><b>&lt;script&gt;"));
            assert!(html.contains("id=\"retry\"") && !html.contains("id=\"cancel\""));
        }
    }
}
