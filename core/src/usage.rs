//! What tenants used: tasks, tokens and cost per day and model, as the task store sums them
//! from each task's summary (`GET /api/usage`, gRPC `GetUsage`, `patchflow usage`).

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// One tenant's use of one model on one day (UTC, of the tasks' creation). A task counts
/// with its last summary (a retried task: its latest attempt's); a task without one yet
/// counts as a task with no tokens, under its spec's model or, when it names none, the
/// configured default model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    /// `YYYY-MM-DD`.
    pub day: NaiveDate,
    pub tenant: String,
    pub model: String,
    pub tasks: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Part of `prompt_tokens`.
    pub cached_tokens: u64,
    /// Part of `completion_tokens`.
    pub reasoning_tokens: u64,
    pub total_tokens: u64,
    /// US dollars.
    pub cost_usd: f64,
}

/// The sum of some [`UsageRow`]s.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageTotal {
    pub tasks: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
}

impl UsageTotal {
    pub fn of<'a>(rows: impl IntoIterator<Item = &'a UsageRow>) -> Self {
        rows.into_iter().fold(Self::default(), |mut t, r| {
            t.tasks = t.tasks.saturating_add(r.tasks);
            t.prompt_tokens = t.prompt_tokens.saturating_add(r.prompt_tokens);
            t.completion_tokens = t.completion_tokens.saturating_add(r.completion_tokens);
            t.cached_tokens = t.cached_tokens.saturating_add(r.cached_tokens);
            t.reasoning_tokens = t.reasoning_tokens.saturating_add(r.reasoning_tokens);
            t.total_tokens = t.total_tokens.saturating_add(r.total_tokens);
            t.cost_usd += r.cost_usd;
            t
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_keeps_its_wire_names_and_totals_add_up() {
        let row = UsageRow {
            day: NaiveDate::from_ymd_opt(2026, 3, 9).unwrap(),
            tenant: "a".into(),
            model: "m".into(),
            tasks: 2,
            prompt_tokens: 100,
            completion_tokens: 10,
            cached_tokens: 40,
            reasoning_tokens: 3,
            total_tokens: 110,
            cost_usd: 0.5,
        };
        let v = serde_json::to_value(&row).unwrap();
        assert_eq!(v["day"], "2026-03-09");
        assert_eq!(v["cached_tokens"], 40);
        assert_eq!(serde_json::from_value::<UsageRow>(v).unwrap(), row);
        let t = UsageTotal::of([&row, &row]);
        assert_eq!((t.tasks, t.total_tokens, t.cached_tokens), (4, 220, 80));
        assert!((t.cost_usd - 1.0).abs() < 1e-12);
        assert_eq!(UsageTotal::of([]), UsageTotal::default());
    }
}
