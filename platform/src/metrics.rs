//! The process's Prometheus metrics (prometheus-client), one registry per process, served
//! as text at `http://<metrics_addr>/metrics` (the binary's `stack::serve_metrics`). Names and labels are the
//! operator's contract (README): `patchflow_tasks_submitted_total{door}`,
//! `patchflow_tasks_finished_total{status}`, `patchflow_task_step_seconds{step}`,
//! `patchflow_agents_running`, `patchflow_worker_slots{state}` (`used`, `free`: a worker's
//! agent slots), `patchflow_llm_requests_total{model,outcome}`,
//! `patchflow_llm_tokens_total{model,kind}`, `patchflow_llm_cost_usd_total{model}`,
//! `patchflow_tool_calls_total{tool,ok}`, `patchflow_tool_call_seconds{tool}`,
//! `patchflow_http_requests_total{route,code}`, `patchflow_grpc_requests_total{method,code}`,
//! `patchflow_kafka_messages_total{outcome}`. No label carries a tenant name unless
//! `metrics_tenant_labels` is on ([`Metrics::set_tenant_labels`]): then tasks submitted and
//! finished and the model cost also carry `tenant`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label set of one label and, with `metrics_tenant_labels`, the tenant.
macro_rules! tenant_label_set {
    ($name:ident, $label:ident) => {
        #[derive(Clone, Debug, Hash, PartialEq, Eq)]
        pub struct $name {
            pub $label: String,
            /// Only with `metrics_tenant_labels`; otherwise no `tenant` label at all.
            pub tenant: Option<String>,
        }

        impl EncodeLabelSet for $name {
            fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
                (stringify!($label), self.$label.as_str()).encode(encoder.encode_label())?;
                if let Some(t) = &self.tenant {
                    ("tenant", t.as_str()).encode(encoder.encode_label())?;
                }
                Ok(())
            }
        }
    };
}

tenant_label_set!(Door, door);
tenant_label_set!(Status, status);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotState {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Step {
    pub step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOutcome {
    pub model: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelKind {
    pub model: String,
    pub kind: String,
}

tenant_label_set!(Model, model);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolOk {
    pub tool: String,
    pub ok: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Tool {
    pub tool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteCode {
    pub route: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodCode {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

type Seconds = Family<Step, Histogram, fn() -> Histogram>;
type ToolSeconds = Family<Tool, Histogram, fn() -> Histogram>;

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    pub tasks_submitted: Family<Door, Counter>,
    pub tasks_finished: Family<Status, Counter>,
    pub task_step_seconds: Seconds,
    pub agents_running: Gauge,
    pub worker_slots: Family<SlotState, Gauge>,
    /// The agent slots of this process's worker (0: not a worker).
    agent_slots: Gauge,
    tenant_labels: AtomicBool,
    pub llm_requests: Family<ModelOutcome, Counter>,
    pub llm_tokens: Family<ModelKind, Counter>,
    pub llm_cost_usd: Family<Model, Counter<f64, AtomicU64>>,
    pub tool_calls: Family<ToolOk, Counter>,
    pub tool_call_seconds: ToolSeconds,
    pub http_requests: Family<RouteCode, Counter>,
    pub grpc_requests: Family<MethodCode, Counter>,
    pub kafka_messages: Family<Outcome, Counter>,
}

/// A step's duration: 5 ms to about 3 h.
fn step_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 22))
}

/// A tool call's duration: 1 ms to about 9 min.
fn tool_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("patchflow");
        let m = Self {
            tasks_submitted: Family::default(),
            tasks_finished: Family::default(),
            task_step_seconds: Family::new_with_constructor(step_histogram),
            agents_running: Gauge::default(),
            worker_slots: Family::default(),
            agent_slots: Gauge::default(),
            tenant_labels: AtomicBool::new(false),
            llm_requests: Family::default(),
            llm_tokens: Family::default(),
            llm_cost_usd: Family::default(),
            tool_calls: Family::default(),
            tool_call_seconds: Family::new_with_constructor(tool_histogram),
            http_requests: Family::default(),
            grpc_requests: Family::default(),
            kafka_messages: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "tasks_submitted",
            "Tasks accepted, by the door they came through",
            m.tasks_submitted.clone(),
        );
        registry.register(
            "tasks_finished",
            "Tasks that reached a final status",
            m.tasks_finished.clone(),
        );
        registry.register(
            "task_step_seconds",
            "Time a task spent in each step (queue, fetch, stage, environment, agent, publish)",
            m.task_step_seconds.clone(),
        );
        registry.register(
            "agents_running",
            "Agent runs in progress in this process",
            m.agents_running.clone(),
        );
        registry.register(
            "worker_slots",
            "This worker's agent slots (worker_max_agents), used and free",
            m.worker_slots.clone(),
        );
        registry.register(
            "llm_requests",
            "Model requests of the agents this process ran",
            m.llm_requests.clone(),
        );
        registry.register(
            "llm_tokens",
            "Tokens of the agents' model requests (prompt, completion, cached, reasoning)",
            m.llm_tokens.clone(),
        );
        registry.register(
            "llm_cost_usd",
            "What the agents' model answers cost, in US dollars",
            m.llm_cost_usd.clone(),
        );
        registry.register(
            "tool_calls",
            "Tool calls of the agents this process ran",
            m.tool_calls.clone(),
        );
        registry.register(
            "tool_call_seconds",
            "Duration of the agents' tool calls",
            m.tool_call_seconds.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status code",
            m.http_requests.clone(),
        );
        registry.register(
            "grpc_requests",
            "gRPC calls answered, by method and status code",
            m.grpc_requests.clone(),
        );
        registry.register(
            "kafka_messages",
            "Kafka task messages consumed, by what became of them",
            m.kafka_messages.clone(),
        );
        Self { registry, ..m }
    }

    /// This process runs a worker with `slots` agent slots.
    pub fn set_agent_slots(&self, slots: usize) {
        self.agent_slots
            .set(i64::try_from(slots).unwrap_or(i64::MAX));
        self.slots_changed();
    }

    fn slots_changed(&self) {
        let used = self.agents_running.get();
        let slot = |state: &str| SlotState {
            state: state.to_string(),
        };
        self.worker_slots.get_or_create(&slot("used")).set(used);
        self.worker_slots
            .get_or_create(&slot("free"))
            .set((self.agent_slots.get() - used).max(0));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// `metrics_tenant_labels`: whether tenants become labels from now on.
    pub fn set_tenant_labels(&self, on: bool) {
        self.tenant_labels.store(on, Ordering::Relaxed);
    }

    pub fn tenant_labels(&self) -> bool {
        self.tenant_labels.load(Ordering::Relaxed)
    }

    /// The `tenant` label value, when tenants are labels.
    fn tenant(&self, tenant: Option<&str>) -> Option<String> {
        self.tenant_labels()
            .then(|| label(tenant.unwrap_or("unknown")))
    }

    pub fn submitted(&self, door: &str, tenant: &str) {
        self.tasks_submitted
            .get_or_create(&Door {
                door: door.into(),
                tenant: self.tenant(Some(tenant)),
            })
            .inc();
    }

    /// A task reached `status` (its tenant, when known, for `metrics_tenant_labels`).
    pub fn finished(&self, status: &str, tenant: Option<&str>) {
        self.tasks_finished
            .get_or_create(&Status {
                status: status.into(),
                tenant: self.tenant(tenant),
            })
            .inc();
    }

    pub fn step(&self, step: &str, seconds: f64) {
        self.task_step_seconds
            .get_or_create(&Step { step: step.into() })
            .observe(seconds);
    }

    pub fn tool_call(&self, tool: &str, ok: bool, seconds: f64) {
        self.tool_calls
            .get_or_create(&ToolOk {
                tool: label(tool),
                ok: ok.to_string(),
            })
            .inc();
        self.tool_call_seconds
            .get_or_create(&Tool { tool: label(tool) })
            .observe(seconds);
    }

    /// One of an agent's progress events, as its runner relays it: a tool's result is a
    /// tool call.
    pub fn agent_event(&self, event: &patchflow_core::AgentEvent) {
        if let patchflow_core::AgentEvent::ToolResult {
            tool,
            ok,
            duration_ms,
            ..
        } = event
        {
            self.tool_call(tool, *ok, *duration_ms as f64 / 1000.0);
        }
    }

    /// An agent run's model use, from its summary; `tenant` labels its cost when tenants
    /// are labels.
    pub fn agent_ran(&self, summary: &patchflow_core::AgentSummary, tenant: &str) {
        let model = label(&summary.model);
        let failed = summary
            .error
            .as_deref()
            .is_some_and(|e| e.contains("model"));
        let answered = u64::from(summary.steps).saturating_sub(u64::from(failed));
        self.llm_requests
            .get_or_create(&ModelOutcome {
                model: model.clone(),
                outcome: "ok".into(),
            })
            .inc_by(answered);
        if failed {
            self.llm_requests
                .get_or_create(&ModelOutcome {
                    model: model.clone(),
                    outcome: "error".into(),
                })
                .inc();
        }
        for (kind, n) in [
            ("prompt", summary.prompt_tokens),
            ("completion", summary.completion_tokens),
            ("cached", summary.cached_tokens),
            ("reasoning", summary.reasoning_tokens),
        ] {
            self.llm_tokens
                .get_or_create(&ModelKind {
                    model: model.clone(),
                    kind: kind.into(),
                })
                .inc_by(n);
        }
        if summary.cost_usd.is_finite() && summary.cost_usd > 0.0 {
            self.llm_cost_usd
                .get_or_create(&Model {
                    model,
                    tenant: self.tenant(Some(tenant)),
                })
                .inc_by(summary.cost_usd);
        }
    }

    pub fn http(&self, route: &str, code: u16) {
        self.http_requests
            .get_or_create(&RouteCode {
                route: label(route),
                code: code.to_string(),
            })
            .inc();
    }

    pub fn grpc(&self, method: &str, code: &str) {
        self.grpc_requests
            .get_or_create(&MethodCode {
                method: label(method),
                code: code.into(),
            })
            .inc();
    }

    pub fn kafka(&self, outcome: &str) {
        self.kafka_messages
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// A label value from text others chose (a model's name, a tool's, a route): the exposition
/// does not escape label values, so only plain characters pass and at most 80 of them.
fn label(text: &str) -> String {
    text.chars()
        .take(80)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-:/{}@+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// This process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Counts an agent run as running while the guard lives.
pub struct RunningAgent(());

impl RunningAgent {
    pub fn start() -> Self {
        global().agents_running.inc();
        global().slots_changed();
        Self(())
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        global().agents_running.dec();
        global().slots_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_with_its_labels() {
        let m = Metrics::new();
        m.submitted("http", "acme");
        m.finished("COMPLETED", Some("acme"));
        m.step("agent", 1.5);
        m.tool_call("read_file_content", true, 0.002);
        m.http("/api/tasks", 202);
        m.grpc("SubmitTask", "OK");
        m.kafka("started");
        m.set_agent_slots(4);
        m.agents_running.inc();
        m.slots_changed();
        let summary = patchflow_core::AgentSummary {
            model: "gpt-x".into(),
            steps: 5,
            prompt_tokens: 100,
            completion_tokens: 20,
            cost_usd: 0.5,
            ..serde_json::from_value(serde_json::json!({
                "outcome": "finished", "summary": "", "model": "m", "steps": 0,
                "tool_calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                "total_tokens": 0, "wall_ms": 0, "files_changed": []
            }))
            .unwrap()
        };
        m.agent_ran(&summary, "acme");
        let text = m.encode();
        assert!(!text.contains("tenant"), "a tenant became a label:\n{text}");
        for want in [
            "patchflow_tasks_submitted_total{door=\"http\"} 1",
            "patchflow_tasks_finished_total{status=\"COMPLETED\"} 1",
            "patchflow_task_step_seconds_count{step=\"agent\"} 1",
            "patchflow_agents_running 1",
            "patchflow_worker_slots{state=\"used\"} 1",
            "patchflow_worker_slots{state=\"free\"} 3",
            "patchflow_llm_requests_total{model=\"gpt-x\",outcome=\"ok\"} 5",
            "patchflow_llm_tokens_total{model=\"gpt-x\",kind=\"prompt\"} 100",
            "patchflow_llm_cost_usd_total{model=\"gpt-x\"} 0.5",
            "patchflow_tool_calls_total{tool=\"read_file_content\",ok=\"true\"} 1",
            "patchflow_tool_call_seconds_count{tool=\"read_file_content\"} 1",
            "patchflow_http_requests_total{route=\"/api/tasks\",code=\"202\"} 1",
            "patchflow_grpc_requests_total{method=\"SubmitTask\",code=\"OK\"} 1",
            "patchflow_kafka_messages_total{outcome=\"started\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        // Text others chose cannot break out of its label.
        m.http("/x\"} 1\npatchflow_fake 2", 200);
        m.tool_call("t\"} 9\npatchflow_fake 3", false, 0.1);
        let text = m.encode();
        assert!(!text.contains("\npatchflow_fake"), "{text}");
        assert!(text.contains("route=\"/x_}_1_patchflow_fake_2\""), "{text}");
    }

    #[test]
    fn tenants_become_labels_only_when_asked_and_reduced_to_plain_characters() {
        let m = Metrics::new();
        m.set_tenant_labels(true);
        m.submitted("http", "acme\"} 1\npatchflow_fake 2");
        m.finished("FAILED", None);
        let summary: patchflow_core::AgentSummary = serde_json::from_value(serde_json::json!({
            "outcome": "finished", "summary": "", "model": "gpt-x", "steps": 1,
            "tool_calls": 0, "prompt_tokens": 1, "completion_tokens": 1,
            "total_tokens": 2, "cost_usd": 0.25, "wall_ms": 0, "files_changed": []
        }))
        .unwrap();
        m.agent_ran(&summary, "globex");
        let text = m.encode();
        for want in [
            "patchflow_tasks_finished_total{status=\"FAILED\",tenant=\"unknown\"} 1",
            "patchflow_llm_cost_usd_total{model=\"gpt-x\",tenant=\"globex\"} 0.25",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        let submitted = text
            .lines()
            .find(|l| l.starts_with("patchflow_tasks_submitted_total{"))
            .unwrap();
        assert!(
            submitted.starts_with("patchflow_tasks_submitted_total{door=\"http\",tenant=\""),
            "{submitted}"
        );
        assert!(
            !text.contains("\npatchflow_fake"),
            "a tenant name broke out of its label:\n{text}"
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("patchflow_tasks_submitted_total"))
                .count(),
            1
        );
    }
}
