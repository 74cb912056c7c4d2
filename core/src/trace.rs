//! Trace context that crosses a process boundary: a caller's `traceparent` header, a Kafka
//! message's, an agent's `TRACEPARENT`. Parsed here, in one place, and only when valid.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The `tracing` target of patchflow's trace spans (a task's submit, the agent, each model
/// request and tool call): exported over OTLP when `otlp_endpoint` is set, never logged.
pub const TRACE_TARGET: &str = "patchflow_trace";

/// The W3C header (and Kafka message header) a caller's trace context arrives in.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The parent a W3C `traceparent` value names, when it is a valid one; anything else
/// (empty, malformed, all-zero ids, oversized) is ignored, never an error: a caller's trace
/// context is a hint, not part of its request.
pub fn remote_parent(traceparent: Option<&str>) -> Option<opentelemetry::Context> {
    let value = traceparent?.trim();
    // A traceparent is 55 characters; anything much longer is not one.
    if value.is_empty() || value.len() > 128 {
        return None;
    }
    let carrier = HashMap::from([(TRACEPARENT_HEADER.to_string(), value.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_a_valid_traceparent_becomes_a_parent() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = remote_parent(Some(good)).unwrap();
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        for bad in [
            "",
            "garbage",
            // All-zero ids are invalid by the spec.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Hostile: a header injection attempt and a huge value.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nx-evil: 1",
            &"0".repeat(100_000),
        ] {
            assert!(remote_parent(Some(bad)).is_none(), "{bad:.60}");
        }
        assert!(remote_parent(None).is_none());
    }
}
