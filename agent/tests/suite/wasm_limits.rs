//! A hostile guest (tools-wasm/probe) against the host's limits: a loop is stopped by the
//! CPU limit, unbounded allocation by the memory limit, and the agent carries on.

use std::time::Duration;

use patchflow_agent::wasm::CallLimits;
use serde_json::json;

use super::support::{Setup, fixture, probe_component, run_agent, tool_outputs};

#[tokio::test]
async fn looping_and_hoarding_guests_are_stopped_and_the_agent_goes_on() {
    let fx = fixture(Setup {
        component: probe_component(),
        limits: CallLimits {
            memory_bytes: 32 << 20,
            timeout: Duration::from_millis(300),
        },
        ..Setup::default()
    });
    let (summary, transcript) = run_agent(
        fx,
        vec![
            ("read_file_content", json!({"file_path": "a.py"})),
            ("search_code", json!({"pattern": "x"})),
            ("web_search_doc_and_reference", json!({"query": "anything"})),
        ],
    )
    .await;
    let outputs = tool_outputs(&transcript);
    assert_eq!(
        outputs[0],
        json!({"error": "the tool ran past its 300 ms time limit and was stopped"})
    );
    assert_eq!(
        outputs[1],
        json!({"error": "the tool ran out of its 32 MiB memory limit and was stopped"})
    );
    // The next call on the same host works: a limit ends one call, not the agent.
    assert_eq!(outputs[2]["provider"], "workspace-docs", "{}", outputs[2]);
    assert_eq!(summary.outcome, patchflow_core::AgentOutcome::Finished);
    assert_eq!(summary.tool_calls, 4);
}
