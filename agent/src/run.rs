//! The agent loop: ask the model, run the tools it calls, feed the results back, until it
//! calls `finish`, answers without a tool call, or a budget (steps, tokens, wall time) runs
//! out. Then write the diff, the summary and the end of the transcript.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionMessageToolCall, ChatCompletionMessageToolCalls,
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestSystemMessageContent, ChatCompletionRequestToolMessage,
    ChatCompletionRequestToolMessageContent, ChatCompletionRequestUserMessage,
    ChatCompletionRequestUserMessageContent, ChatCompletionTool, ChatCompletionTools,
    CreateChatCompletionRequest, CreateChatCompletionResponse, FunctionCall, FunctionObject,
};
use patchflow_core::{AgentEvent, AgentOutcome, AgentSummary, Secret, TaskSpec, layout};
use serde_json::json;

use crate::diff::diff_against_archive;
use crate::tools::{self, ToolDispatch};
use crate::transcript::Transcript;

/// The public OpenAI endpoint, used when no base URL is configured.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// Everything one run needs.
pub struct AgentRun {
    pub spec: TaskSpec,
    /// The restored repository the tools work in.
    pub workspace: PathBuf,
    /// The staged archive the workspace came from, for the diff.
    pub baseline: PathBuf,
    /// Where `diff.patch`, `transcript.jsonl` and `summary.json` go.
    pub out_dir: PathBuf,
    pub model: String,
    pub base_url: Option<String>,
    pub api_key: Option<Secret>,
    /// Retries of a failed model request (on top of the client's own for 429/5xx).
    pub max_retries: u32,
    pub retry_backoff: Duration,
}

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

fn tool_specs() -> Vec<ChatCompletionTools> {
    tools::schemas()
        .into_iter()
        .map(|(name, description, parameters)| {
            ChatCompletionTools::Function(ChatCompletionTool {
                function: FunctionObject {
                    name: name.to_string(),
                    description: Some(description.to_string()),
                    parameters: Some(parameters),
                    strict: None,
                },
            })
        })
        .collect()
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
        let model = self
            .spec
            .model
            .clone()
            .unwrap_or_else(|| self.model.clone());
        let limits = self.spec.limits;

        let base = self
            .base_url
            .clone()
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
        let mut config = OpenAIConfig::new().with_api_base(base.trim_end_matches('/'));
        if let Some(key) = &self.api_key {
            config = config.with_api_key(key.expose());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(std::io::Error::other)?;
        let client = Client::build(http, config);

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
        let user = user_prompt(&self.spec);
        let mut messages = vec![
            ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage {
                content: ChatCompletionRequestSystemMessageContent::Text(system.clone()),
                name: None,
            }),
            ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
                content: ChatCompletionRequestUserMessageContent::Text(user.clone()),
                name: None,
            }),
        ];
        let specs = tool_specs();
        transcript.write(
            "start",
            json!({
                "model": model,
                "limits": limits,
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
            model: model.clone(),
            max_steps: limits.max_steps,
        });

        let mut summary = AgentSummary {
            outcome: AgentOutcome::MaxSteps,
            summary: String::new(),
            model: model.clone(),
            steps: 0,
            tool_calls: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            wall_ms: 0,
            files_changed: Vec::new(),
            error: None,
            sandbox: None,
        };

        'steps: for step in 1..=limits.max_steps {
            if Instant::now() >= deadline {
                summary.outcome = AgentOutcome::WallTime;
                break;
            }
            if summary.total_tokens >= limits.max_tokens {
                summary.outcome = AgentOutcome::MaxTokens;
                break;
            }
            summary.steps = step;
            on_event(&AgentEvent::ModelRequest { step });
            let request = CreateChatCompletionRequest {
                model: model.clone(),
                messages: messages.clone(),
                tools: Some(specs.clone()),
                ..Default::default()
            };
            let asked = Instant::now();
            let response = match self
                .ask_model(&client, request, deadline, step, &mut transcript)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    summary.outcome = if Instant::now() >= deadline {
                        AgentOutcome::WallTime
                    } else {
                        AgentOutcome::Error
                    };
                    summary.error = Some(e);
                    break;
                }
            };
            let latency_ms = asked.elapsed().as_millis() as u64;
            if let Some(u) = &response.usage {
                summary.prompt_tokens += u64::from(u.prompt_tokens);
                summary.completion_tokens += u64::from(u.completion_tokens);
                summary.total_tokens += u64::from(u.total_tokens);
            }
            let Some(choice) = response.choices.into_iter().next() else {
                summary.outcome = AgentOutcome::Error;
                summary.error = Some("the model answered with no choices".into());
                break;
            };
            let content = choice.message.content.clone().unwrap_or_default();
            let calls: Vec<ChatCompletionMessageToolCall> = choice
                .message
                .tool_calls
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| match c {
                    ChatCompletionMessageToolCalls::Function(f) => Some(f),
                    ChatCompletionMessageToolCalls::Custom(_) => None,
                })
                .collect();
            transcript.write(
                "model_response",
                json!({
                    "step": step,
                    "content": content,
                    "tool_calls": calls.iter().map(|c| json!({"id": c.id, "name": c.function.name, "arguments": c.function.arguments})).collect::<Vec<_>>(),
                    "usage": response.usage.as_ref().map(|u| json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})),
                    "latency_ms": latency_ms,
                }),
            );
            if calls.is_empty() {
                summary.outcome = AgentOutcome::Answered;
                summary.summary = content;
                break;
            }
            messages.push(ChatCompletionRequestMessage::Assistant(
                #[allow(deprecated)]
                ChatCompletionRequestAssistantMessage {
                    content: (!content.is_empty()).then(|| {
                        ChatCompletionRequestAssistantMessageContent::Text(content.clone())
                    }),
                    tool_calls: Some(
                        calls
                            .iter()
                            .map(|c| {
                                ChatCompletionMessageToolCalls::Function(
                                    ChatCompletionMessageToolCall {
                                        id: c.id.clone(),
                                        function: FunctionCall {
                                            name: c.function.name.clone(),
                                            arguments: c.function.arguments.clone(),
                                        },
                                    },
                                )
                            })
                            .collect(),
                    ),
                    ..Default::default()
                },
            ));
            let mut finished = None;
            for call in &calls {
                let name = call.function.name.as_str();
                let args = call.function.arguments.as_str();
                summary.tool_calls += 1;
                on_event(&AgentEvent::ToolCall {
                    step,
                    tool: name.to_string(),
                    arguments: preview(args),
                });
                let t0 = Instant::now();
                let output = tools.call(name, args).await;
                let duration_ms = t0.elapsed().as_millis() as u64;
                let text = output.to_model_text();
                transcript.write(
                    "tool_result",
                    json!({
                        "step": step,
                        "tool_call_id": call.id,
                        "tool": name,
                        "arguments": args,
                        "ok": output.ok,
                        "output": output.value,
                        "duration_ms": duration_ms,
                    }),
                );
                on_event(&AgentEvent::ToolResult {
                    step,
                    tool: name.to_string(),
                    ok: output.ok,
                    duration_ms,
                });
                messages.push(ChatCompletionRequestMessage::Tool(
                    ChatCompletionRequestToolMessage {
                        content: ChatCompletionRequestToolMessageContent::Text(text),
                        tool_call_id: call.id.clone(),
                    },
                ));
                if name == tools::FINISH && output.ok {
                    let s = serde_json::from_str::<serde_json::Value>(args)
                        .ok()
                        .and_then(|v| {
                            v.get("summary")
                                .and_then(|s| s.as_str())
                                .map(str::to_string)
                        })
                        .unwrap_or_default();
                    finished = Some(s);
                }
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

    /// One model request, retried with exponential backoff. Errors are returned as text
    /// fit for the task's message.
    async fn ask_model(
        &self,
        client: &Client<OpenAIConfig>,
        request: CreateChatCompletionRequest,
        deadline: Instant,
        step: u32,
        transcript: &mut Transcript,
    ) -> Result<CreateChatCompletionResponse, String> {
        let mut backoff = self.retry_backoff;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("wall time ran out while waiting for the model".into());
            }
            let result = tokio::time::timeout(left, client.chat().create(request.clone())).await;
            let err = match result {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "wall time ran out while waiting for the model".to_string(),
            };
            tracing::warn!(step, attempt, error = %err, "model request failed");
            transcript.write(
                "model_error",
                json!({"step": step, "attempt": attempt, "error": err}),
            );
            if attempt > self.max_retries {
                return Err(format!(
                    "model endpoint failed after {attempt} attempts: {err}"
                ));
            }
            tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())))
                .await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}
