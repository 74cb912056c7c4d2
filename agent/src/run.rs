//! The agent loop: ask the model, run the tools it calls, feed the results back, until it
//! calls `finish`, answers without a tool call, or a budget (steps, tokens, dollars, wall
//! time) runs out. Then write the diff, the summary and the end of the transcript.
//!
//! The conversation is provider-neutral ([`crate::model::Item`]); the wire it goes out on
//! is the model's (`chat` or `responses`). Before a request would pass the model's context
//! window, older turns are compacted into a summary ([`crate::context`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchflow_core::config::{ModelProfile, ModelTable, WireApi, price};
use patchflow_core::{AgentEvent, AgentOutcome, AgentSummary, Secret, TaskSpec, layout};
use serde_json::json;
use tracing::Instrument as _;

use crate::context::{self, Budget};
use crate::diff::diff_against_archive;
pub use crate::model::DEFAULT_BASE_URL;
use crate::model::{Answer, Endpoint, Item, Model, ModelError, Request, ToolCall};
use crate::telemetry::TRACE_TARGET;
use crate::tools::{self, ToolDispatch};
use crate::transcript::Transcript;

/// How to reach the model a task names: the `llm` settings and the model table.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// The model asked when the task names none.
    pub model: String,
    pub base_url: Option<String>,
    pub api_key: Option<Secret>,
    pub wire_api: WireApi,
    pub stream: bool,
    pub models: ModelTable,
    pub default_context_window: u64,
    /// The sampling seed sent with each request (Chat Completions' `seed`): a best-of-N
    /// candidate's number, so its samples differ from its siblings' but repeat themselves.
    pub seed: Option<u64>,
}

impl ModelSettings {
    /// Chat Completions, streamed, no model table.
    pub fn new(model: &str, base_url: Option<String>, api_key: Option<Secret>) -> Self {
        Self {
            model: model.to_string(),
            base_url,
            api_key,
            wire_api: WireApi::Chat,
            stream: true,
            models: ModelTable::default(),
            default_context_window: 128_000,
            seed: None,
        }
    }

    /// The settings as the agent process's configuration gives them.
    pub fn from_config(config: &patchflow_core::Config) -> Self {
        Self {
            model: config.llm.model.clone(),
            base_url: config.llm.openai_base_url.clone(),
            api_key: config.llm.openai_api_key.clone(),
            wire_api: config.llm.wire_api,
            stream: config.llm.llm_stream,
            models: config.model_table.models.clone(),
            default_context_window: config.llm.default_context_window,
            seed: None,
        }
    }

    /// The endpoint and profile of `model`. A profile's `api_key_env` is read from this
    /// process's environment.
    pub fn resolve(&self, model: &str) -> (Endpoint, ModelProfile) {
        let profile = self.models.get(model).cloned().unwrap_or_default();
        let api_key = match &profile.api_key_env {
            Some(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Some(Secret::new(v)),
                _ => {
                    tracing::warn!(model, var = %var, "the model's api_key_env is not set");
                    None
                }
            },
            None => self.api_key.clone(),
        };
        let endpoint = Endpoint {
            model: model.to_string(),
            wire: profile.wire_api.unwrap_or(self.wire_api),
            base_url: profile
                .base_url
                .clone()
                .or_else(|| self.base_url.clone())
                .unwrap_or_else(|| DEFAULT_BASE_URL.to_string()),
            api_key,
            stream: self.stream,
            max_output_tokens: profile.max_output_tokens,
            reasoning_effort: profile.reasoning_effort.clone(),
            extra_headers: profile.extra_headers.clone(),
            seed: self.seed,
        };
        (endpoint, profile)
    }
}

/// Everything one run needs.
pub struct AgentRun {
    pub spec: TaskSpec,
    /// The restored repository the tools work in.
    pub workspace: PathBuf,
    /// The staged archive the workspace came from, for the diff.
    pub baseline: PathBuf,
    /// Where `diff.patch`, `transcript.jsonl` and `summary.json` go.
    pub out_dir: PathBuf,
    pub settings: ModelSettings,
    /// Retries of a failed model request (on top of the client's own for 429/5xx, which
    /// honour `Retry-After`).
    pub max_retries: u32,
    pub retry_backoff: Duration,
    /// Answer from this instead of the model's endpoint (replay).
    pub model_override: Option<Arc<dyn Model>>,
    /// A follow-up turn: the conversation it goes on with and the message it answers.
    pub resume: Option<Resume>,
}

/// What a follow-up turn resumes (`patchflow agent --resume DIR --followup FILE`).
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// 2 for the first follow-up.
    pub turn: u32,
    /// The user's follow-up message.
    pub message: String,
    /// The conversation the previous turn ended with (`conversation.json`).
    pub conversation: Vec<Item>,
    /// The previous turns' changes, already laid over the workspace: the turn's own diff
    /// is taken against them.
    pub prior: crate::changes::Changes,
}

/// What the model is told in a follow-up turn.
fn followup_prompt(turn: u32, message: &str) -> String {
    format!(
        "Follow-up request (turn {turn}). The workspace holds your changes so far. Continue from there:\n{}\n",
        message.trim()
    )
}

/// Whether a shell command runs a project's tests (its exit status then says whether they
/// passed: `tests_passed` in the summary).
fn is_test_command(command: &str) -> bool {
    static TESTS: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"(?x)\b(
                pytest | py\.test | -m\s+unittest | tox | nox
              | cargo\s+(?:\+\S+\s+)?(?:test|nextest)
              | go\s+test | (?:npm|pnpm|yarn|bun)\s+(?:run\s+)?test | jest | vitest | mocha
              | rspec | phpunit | mvn\s+(?:\S+\s+)*test | gradle\w*\s+(?:\S+\s+)*test
              | make\s+(?:test|check) | ctest | dotnet\s+test | mix\s+test
            )\b",
        )
        .unwrap_or_else(|_| unreachable!("a valid pattern"))
    });
    TESTS.is_match(command)
}

/// The smallest window a context-length error can teach (below it no turn fits anyway).
const MIN_WINDOW: u64 = 1024;

const SYSTEM_PROMPT: &str = "You are patchflow's coding agent, working in a checked-out repository (your working directory is its root). \
Make the change the task asks for, as a minimal, correct patch. Use the tools: read and search before you edit, \
edit with exact text, and run the project's tests or a quick check with run_shell_command to verify. \
Paths are relative to the repository root. When you are done, call finish with a short summary of the change and how you verified it.";

fn user_prompt(spec: &TaskSpec) -> String {
    let mut p = format!("Task:\n{}\n", spec.task_description.trim());
    if let Some(t) = &spec.target_file {
        p.push_str(&format!("\nStart with the file `{t}`.\n"));
    }
    p
}

/// A short one-line preview of tool arguments for progress events.
fn preview(s: &str) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > 120 {
        format!("{}…", one.chars().take(120).collect::<String>())
    } else {
        one
    }
}

/// Tools that change nothing: several of them in one answer run at once.
fn is_read_only(tool: &str) -> bool {
    matches!(
        tool,
        tools::READ_FILE_CONTENT | tools::SEARCH_CODE | tools::WEB_SEARCH
    )
}

/// Adds one answer's usage and its price under `profile` to `summary`; returns the price.
fn charge(summary: &mut AgentSummary, profile: &ModelProfile, answer: &Answer) -> f64 {
    let Some(u) = answer.usage else { return 0.0 };
    summary.prompt_tokens += u.prompt_tokens;
    summary.completion_tokens += u.completion_tokens;
    summary.total_tokens += if u.total_tokens > 0 {
        u.total_tokens
    } else {
        u.prompt_tokens + u.completion_tokens
    };
    summary.cached_tokens += u.cached_tokens;
    summary.reasoning_tokens += u.reasoning_tokens;
    let cost = price(
        profile,
        u.prompt_tokens,
        u.cached_tokens,
        u.completion_tokens,
    );
    summary.cost_usd += cost;
    cost
}

impl AgentRun {
    /// Runs the loop. `on_event` sees progress as it happens. Returns the summary, which is
    /// also written to `summary.json`; an `Err` means the results could not be written.
    pub async fn run(
        self,
        tools: Arc<dyn ToolDispatch>,
        mut on_event: impl FnMut(&AgentEvent),
    ) -> std::io::Result<AgentSummary> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(self.spec.limits.wall_seconds);
        std::fs::create_dir_all(&self.out_dir)?;
        let mut transcript = Transcript::create(&self.out_dir.join(layout::TRANSCRIPT))?;
        let turn = self.resume.as_ref().map_or(1, |r| r.turn);
        transcript.set_turn(turn);
        let model_name = self
            .spec
            .model
            .clone()
            .unwrap_or_else(|| self.settings.model.clone());
        let limits = self.spec.limits;
        let (endpoint, profile) = self.settings.resolve(&model_name);
        let window = profile
            .context_window
            .unwrap_or(self.settings.default_context_window);
        let schemas = tools::schemas();
        // The declared window; a provider that refuses a request as too long may teach a
        // smaller one (below), which holds for the rest of the run.
        let mut budget = Budget::new(window, profile.max_output_tokens, &schemas);
        let model: Arc<dyn Model> = match &self.model_override {
            Some(m) => m.clone(),
            None => Arc::from(endpoint.connect(schemas).map_err(std::io::Error::other)?),
        };

        let repo_rules =
            crate::instructions::agents_md(&self.workspace, self.spec.target_file.as_deref());
        let system = if repo_rules.files.is_empty() {
            SYSTEM_PROMPT.to_string()
        } else {
            format!(
                "{SYSTEM_PROMPT}\n\nThe repository's instructions for agents (AGENTS.md), to follow where they do not conflict with the task:\n{}",
                repo_rules.text
            )
        };
        let (user, mut items) = match &self.resume {
            None => {
                let user = user_prompt(&self.spec);
                (user.clone(), vec![Item::User { text: user }])
            }
            Some(r) => {
                let user = followup_prompt(r.turn, &r.message);
                let mut items = r.conversation.clone();
                items.push(Item::User { text: user.clone() });
                (user, items)
            }
        };
        transcript.write(
            "start",
            json!({
                "model": model_name,
                "wire": model.wire(),
                "context_window": window,
                "limits": limits,
                "resumed_items": self.resume.as_ref().map(|r| r.conversation.len()),
                "tools": tools::schemas().iter().map(|t| t.0).collect::<Vec<_>>(),
            }),
        );
        transcript.write(
            "instructions",
            json!({"files": repo_rules.files, "truncated": repo_rules.truncated}),
        );
        transcript.write("message", json!({"role": "system", "content": system}));
        transcript.write("message", json!({"role": "user", "content": user}));
        on_event(&AgentEvent::Started {
            model: model_name.clone(),
            max_steps: limits.max_steps,
        });

        let mut summary = AgentSummary {
            outcome: AgentOutcome::MaxSteps,
            summary: String::new(),
            model: model_name.clone(),
            steps: 0,
            tool_calls: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost_usd: 0.0,
            compactions: 0,
            wall_ms: 0,
            files_changed: Vec::new(),
            error: None,
            tests_passed: None,
            sandbox: None,
        };
        // The provider's own count of the last request's prompt, and how many items it
        // held: the next estimate starts from it.
        let mut calibration: Option<(u64, usize)> = None;

        'steps: for step in 1..=limits.max_steps {
            if Instant::now() >= deadline {
                summary.outcome = AgentOutcome::WallTime;
                break;
            }
            if summary.total_tokens >= limits.max_tokens {
                summary.outcome = AgentOutcome::MaxTokens;
                break;
            }
            if let Some(cap) = limits.max_cost_usd
                && summary.cost_usd >= cap.0
            {
                summary.outcome = AgentOutcome::MaxCost;
                summary.error = Some(format!(
                    "spent ${:.6} of max_cost_usd ${:.6}",
                    summary.cost_usd, cap.0
                ));
                break;
            }
            summary.steps = step;
            let mut overflowed = 0;
            let answer = loop {
                let estimate = budget.estimate(&system, &items, calibration);
                if overflowed > 0 || estimate > budget.limit() {
                    let plan = context::plan(&items, &budget);
                    if plan.is_none() && overflowed > 0 {
                        summary.outcome = AgentOutcome::Error;
                        summary.error = Some(format!(
                            "the conversation does not fit the model's context window ({} tokens) even compacted",
                            budget.window
                        ));
                        break 'steps;
                    }
                    if let Some(plan) = plan {
                        let ask = [Item::User {
                            text: plan.rendered.clone(),
                        }];
                        let request = Request {
                            instructions: context::INSTRUCTIONS,
                            items: &ask,
                            tools: false,
                        };
                        let answer = self
                            .ask_model(model.as_ref(), request, deadline, step, &mut transcript)
                            .await;
                        let (text, cost, usage) = match &answer {
                            Ok(a) => (
                                a.content.clone(),
                                charge(&mut summary, &profile, a),
                                a.usage,
                            ),
                            Err(e) => {
                                tracing::warn!(step, error = %e, "the compaction request failed; dropping the older turns unsummarised");
                                (
                                    format!(
                                        "(The summary of {} earlier messages could not be made: {e}.)",
                                        plan.compacted
                                    ),
                                    0.0,
                                    None,
                                )
                            }
                        };
                        context::apply(&mut items, &plan, &text);
                        calibration = None;
                        summary.compactions += 1;
                        let after = budget.estimate(&system, &items, None);
                        transcript.write(
                            "compaction",
                            json!({
                                "step": step,
                                "before_tokens": estimate,
                                "after_tokens": after,
                                "compacted_items": plan.compacted,
                                "kept_items": plan.kept,
                                "summary": text,
                                "usage": usage,
                                "cost_usd": cost,
                            }),
                        );
                    }
                }
                on_event(&AgentEvent::ModelRequest { step });
                let asked = Instant::now();
                let request = Request {
                    instructions: &system,
                    items: &items,
                    tools: true,
                };
                match self
                    .ask_model(model.as_ref(), request, deadline, step, &mut transcript)
                    .await
                {
                    Ok(a) => break (a, asked.elapsed()),
                    Err(ModelError::ContextLength(m)) if overflowed < 3 => {
                        tracing::info!(step, error = %m, "the provider found the request too long; compacting");
                        overflowed += 1;
                        // The window is smaller than declared: take the one the error states,
                        // else three quarters of what was refused.
                        let refused = budget.estimate(&system, &items, calibration);
                        let learned = crate::model::stated_window(&m)
                            .filter(|&w| w < budget.window)
                            .unwrap_or(refused.min(budget.window) * 3 / 4)
                            .max(MIN_WINDOW);
                        if learned < budget.window {
                            transcript.write(
                                "context_window",
                                json!({"step": step, "declared": budget.window, "learned": learned, "refused_tokens": refused}),
                            );
                            budget = budget.narrowed(learned, profile.max_output_tokens);
                        }
                    }
                    Err(e) => {
                        summary.outcome = if Instant::now() >= deadline {
                            AgentOutcome::WallTime
                        } else {
                            AgentOutcome::Error
                        };
                        summary.error = Some(e.to_string());
                        break 'steps;
                    }
                }
            };
            let (answer, latency) = answer;
            let cost = charge(&mut summary, &profile, &answer);
            if let Some(u) = answer.usage
                && u.prompt_tokens > 0
            {
                calibration = Some((u.prompt_tokens, items.len()));
            }
            transcript.write(
                "model_response",
                json!({
                    "step": step,
                    "content": answer.content,
                    "tool_calls": answer.calls,
                    "reasoning": answer.reasoning,
                    "usage": answer.usage,
                    "cost_usd": cost,
                    "latency_ms": latency.as_millis() as u64,
                }),
            );
            if answer.calls.is_empty() {
                summary.outcome = AgentOutcome::Answered;
                summary.summary = answer.content.clone();
                items.push(Item::Assistant {
                    content: answer.content,
                    calls: Vec::new(),
                    reasoning: answer.reasoning,
                });
                break;
            }
            let calls = answer.calls.clone();
            items.push(Item::Assistant {
                content: answer.content,
                calls: answer.calls,
                reasoning: answer.reasoning,
            });
            let mut finished = None;
            let mut i = 0;
            while i < calls.len() {
                // A run of read-only calls goes at once; anything else alone, in order.
                let mut j = i + 1;
                if is_read_only(&calls[i].name) {
                    while j < calls.len() && is_read_only(&calls[j].name) {
                        j += 1;
                    }
                }
                let batch = &calls[i..j];
                for call in batch {
                    summary.tool_calls += 1;
                    on_event(&AgentEvent::ToolCall {
                        step,
                        tool: call.name.clone(),
                        arguments: preview(&call.arguments),
                    });
                }
                let outputs = futures::future::join_all(batch.iter().map(|call| {
                    let tools = tools.clone();
                    let span = tracing::info_span!(
                        target: TRACE_TARGET,
                        "tool_call",
                        tool = %call.name,
                        step,
                        ok = tracing::field::Empty,
                    );
                    async move {
                        let t0 = Instant::now();
                        let out = tools
                            .call(&call.name, &call.arguments)
                            .instrument(span.clone())
                            .await;
                        span.record("ok", out.ok);
                        (out, t0.elapsed().as_millis() as u64)
                    }
                }))
                .await;
                for (call, (output, duration_ms)) in batch.iter().zip(outputs) {
                    if call.name == tools::RUN_SHELL_COMMAND
                        && let Ok(args) = serde_json::from_str::<serde_json::Value>(&call.arguments)
                        && args["command_string"].as_str().is_some_and(is_test_command)
                    {
                        summary.tests_passed =
                            Some(output.ok && output.value["exit_code"].as_i64() == Some(0));
                    }
                    if let Some(s) = self.record_result(
                        step,
                        call,
                        &output,
                        duration_ms,
                        &mut items,
                        &mut transcript,
                        &mut on_event,
                    ) {
                        finished = Some(s);
                    }
                }
                i = j;
            }
            if let Some(s) = finished {
                summary.outcome = AgentOutcome::Finished;
                summary.summary = s;
                break 'steps;
            }
        }

        let diff = {
            let (baseline, workspace) = (self.baseline.clone(), self.workspace.clone());
            tokio::task::spawn_blocking(move || diff_against_archive(&baseline, &workspace))
                .await
                .map_err(std::io::Error::other)??
        };
        std::fs::write(self.out_dir.join(layout::DIFF), &diff.patch)?;
        // What a follow-up turn resumes: the workspace's changes and the conversation.
        {
            let (workspace, changed, out) = (
                self.workspace.clone(),
                diff.files_changed.clone(),
                self.out_dir.join(layout::CHANGES),
            );
            tokio::task::spawn_blocking(move || {
                crate::changes::write_changes(&workspace, &changed, &out)
            })
            .await
            .map_err(std::io::Error::other)??;
        }
        std::fs::write(
            self.out_dir.join(layout::CONVERSATION),
            serde_json::to_vec(&items).map_err(std::io::Error::other)?,
        )?;
        if let Some(r) = &self.resume {
            let (baseline, workspace, prior, changed) = (
                self.baseline.clone(),
                self.workspace.clone(),
                r.prior.clone(),
                diff.files_changed.clone(),
            );
            let own = tokio::task::spawn_blocking(move || {
                crate::changes::turn_diff(&baseline, &prior, &workspace, &changed)
            })
            .await
            .map_err(std::io::Error::other)??;
            std::fs::write(self.out_dir.join(layout::TURN_DIFF), &own.patch)?;
        }
        summary.files_changed = diff.files_changed;
        summary.sandbox = tools.sandbox_report();
        summary.wall_ms = started.elapsed().as_millis() as u64;
        if summary.outcome == AgentOutcome::MaxSteps && summary.error.is_none() {
            summary.error = Some(format!(
                "stopped after max_steps ({}) without finishing",
                limits.max_steps
            ));
        }
        transcript.write("end", serde_json::to_value(&summary).unwrap_or_default());
        on_event(&AgentEvent::Finished {
            outcome: summary.outcome,
            steps: summary.steps,
        });
        let json = serde_json::to_vec_pretty(&summary).map_err(std::io::Error::other)?;
        std::fs::write(self.out_dir.join(layout::SUMMARY), json)?;
        Ok(summary)
    }

    /// Records one tool result (transcript, event, conversation); returns `finish`'s
    /// summary when this was a successful `finish`.
    #[allow(clippy::too_many_arguments)]
    fn record_result(
        &self,
        step: u32,
        call: &ToolCall,
        output: &tools::ToolOutput,
        duration_ms: u64,
        items: &mut Vec<Item>,
        transcript: &mut Transcript,
        on_event: &mut impl FnMut(&AgentEvent),
    ) -> Option<String> {
        let text = output.to_model_text();
        transcript.write(
            "tool_result",
            json!({
                "step": step,
                "tool_call_id": call.id,
                "tool": call.name,
                "arguments": call.arguments,
                "ok": output.ok,
                "output": output.value,
                "duration_ms": duration_ms,
            }),
        );
        on_event(&AgentEvent::ToolResult {
            step,
            tool: call.name.clone(),
            ok: output.ok,
            duration_ms,
        });
        items.push(Item::ToolResult {
            call_id: call.id.clone(),
            output: text,
        });
        (call.name == tools::FINISH && output.ok).then(|| {
            serde_json::from_str::<serde_json::Value>(&call.arguments)
                .ok()
                .and_then(|v| {
                    v.get("summary")
                        .and_then(|s| s.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_default()
        })
    }

    /// One model request, retried with exponential backoff while the failure is
    /// transient. Errors come back as text fit for the task's message.
    async fn ask_model(
        &self,
        model: &dyn Model,
        request: Request<'_>,
        deadline: Instant,
        step: u32,
        transcript: &mut Transcript,
    ) -> Result<Answer, ModelError> {
        let mut backoff = self.retry_backoff;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ModelError::Fatal(
                    "wall time ran out while waiting for the model".into(),
                ));
            }
            let span = tracing::info_span!(
                target: TRACE_TARGET,
                "model_request",
                wire = model.wire(),
                step,
                attempt,
                outcome = tracing::field::Empty,
                prompt_tokens = tracing::field::Empty,
                completion_tokens = tracing::field::Empty,
            );
            let asked = tokio::time::timeout(left, model.ask(request))
                .instrument(span.clone())
                .await;
            span.record(
                "outcome",
                match &asked {
                    Ok(Ok(_)) => "ok",
                    Ok(Err(e)) => e.kind(),
                    Err(_) => "timeout",
                },
            );
            let err = match asked {
                Ok(Ok(a)) => {
                    if let Some(u) = &a.usage {
                        span.record("prompt_tokens", u.prompt_tokens);
                        span.record("completion_tokens", u.completion_tokens);
                    }
                    return Ok(a);
                }
                Ok(Err(e)) => e,
                Err(_) => ModelError::Fatal("wall time ran out while waiting for the model".into()),
            };
            tracing::warn!(step, attempt, error = %err, "model request failed");
            transcript.write(
                "model_error",
                json!({
                    "step": step,
                    "attempt": attempt,
                    "kind": err.kind(),
                    "compaction": !request.tools,
                    "error": err.to_string(),
                }),
            );
            match err {
                ModelError::Transient(m) if attempt <= self.max_retries => {
                    tracing::debug!(error = %m, "retrying");
                }
                ModelError::Transient(m) => {
                    return Err(ModelError::Fatal(format!(
                        "model endpoint failed after {attempt} attempts: {m}"
                    )));
                }
                other => return Err(other),
            }
            tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())))
                .await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}
