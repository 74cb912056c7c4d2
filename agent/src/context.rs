//! Staying inside the model's context window. When the next request would pass the
//! window minus a reserve for the answer, the older turns are summarised by the model
//! into one message; the instructions (with AGENTS.md), the task and the latest turns
//! stay verbatim. A turn is an assistant message with its tool results, so a kept turn
//! never loses the calls its results answer.

use crate::model::{Item, ToolSchema};

/// Marks a compaction request (the scripted model answers those apart).
pub const COMPACTION_MARKER: &str = "[patchflow-compaction]";

/// The instructions of a compaction request.
pub const INSTRUCTIONS: &str = "[patchflow-compaction] You are compacting the history of a coding agent's work on a repository, \
so it can go on within its context window. Summarise the conversation you are given for the agent itself: the files it read or \
changed and what it learnt from them, the commands it ran and their outcome, errors met, decisions taken, and what remains to be done. \
Keep exact file paths, names and error messages. At most 400 words. Answer with the summary only.";

/// What the conversation may hold.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub window: u64,
    /// Kept free for the answer.
    pub reserve: u64,
    /// The tool schemas' share of every request.
    pub tools_tokens: u64,
}

fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// What a window keeps free for the answer: `max_output_tokens`, else an eighth of it.
fn reserve(window: u64, max_output: Option<u32>) -> u64 {
    max_output
        .map(u64::from)
        .unwrap_or((window / 8).clamp(256, 16_384))
        .min(window / 2)
}

impl Budget {
    pub fn new(window: u64, max_output: Option<u32>, schemas: &[ToolSchema]) -> Self {
        let tools_tokens = schemas
            .iter()
            .map(|(n, d, p)| tokens(n) + tokens(d) + tokens(&p.to_string()) + 8)
            .sum();
        Self {
            window,
            reserve: reserve(window, max_output),
            tools_tokens,
        }
    }

    /// The same budget in a smaller window (one a provider's refusal taught).
    pub fn narrowed(&self, window: u64, max_output: Option<u32>) -> Self {
        Self {
            window,
            reserve: reserve(window, max_output),
            tools_tokens: self.tools_tokens,
        }
    }

    /// The most a request's prompt may hold.
    pub fn limit(&self) -> u64 {
        self.window.saturating_sub(self.reserve)
    }

    /// The next request's prompt size: from the provider's count of the last prompt
    /// (`calibration`: its tokens and how many items it held) plus what came since, or
    /// from the text alone.
    pub fn estimate(&self, system: &str, items: &[Item], calibration: Option<(u64, usize)>) -> u64 {
        let rough = |items: &[Item]| items.iter().map(Item::estimate_tokens).sum::<u64>();
        match calibration {
            Some((prompt, n)) if n <= items.len() => prompt + rough(&items[n..]),
            _ => tokens(system) + self.tools_tokens + rough(items),
        }
    }
}

/// A compaction to make: summarise `items[1..keep_from]`.
#[derive(Debug, Clone)]
pub struct Plan {
    pub keep_from: usize,
    /// The part to summarise, as text for the compaction request.
    pub rendered: String,
    pub compacted: usize,
    pub kept: usize,
}

/// Where each turn starts (after the task at 0): at an assistant message, or at a user
/// message (an earlier summary).
fn turn_starts(items: &[Item]) -> Vec<usize> {
    (1..items.len())
        .filter(|&i| !matches!(items[i], Item::ToolResult { .. }))
        .collect()
}

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} more bytes]", &s[..end], s.len() - end)
}

/// The conversation part as plain text, each piece clipped.
fn render(items: &[Item]) -> String {
    let mut out = String::new();
    for item in items {
        match item {
            Item::User { text } => out.push_str(&format!("[user]\n{}\n\n", clip(text, 4000))),
            Item::Assistant { content, calls, .. } => {
                if !content.is_empty() {
                    out.push_str(&format!("[assistant]\n{}\n", clip(content, 2000)));
                }
                for c in calls {
                    out.push_str(&format!(
                        "[assistant called {}] {}\n",
                        c.name,
                        clip(&c.arguments, 1000)
                    ));
                }
                out.push('\n');
            }
            Item::ToolResult { output, .. } => {
                out.push_str(&format!("[tool result]\n{}\n\n", clip(output, 1500)))
            }
        }
    }
    out
}

/// What to compact so the conversation fits again; `None` when there is nothing older
/// than the latest turn to summarise.
pub fn plan(items: &[Item], budget: &Budget) -> Option<Plan> {
    let starts = turn_starts(items);
    // Keep the latest turns within about a third of the window, at least one.
    let keep_budget = budget.limit() / 3;
    let mut keep_from = items.len();
    let mut kept_tokens = 0;
    for &s in starts.iter().rev() {
        let turn: u64 = items[s..keep_from].iter().map(Item::estimate_tokens).sum();
        if keep_from != items.len() && kept_tokens + turn > keep_budget {
            break;
        }
        kept_tokens += turn;
        keep_from = s;
    }
    if keep_from <= 1 {
        return None;
    }
    // The compaction request must fit too: clip the text to its share of the window,
    // keeping the most recent part.
    let max_bytes = (budget.limit().saturating_sub(tokens(INSTRUCTIONS) + 64) * 3) as usize;
    let mut rendered = render(&items[1..keep_from]);
    if rendered.len() > max_bytes {
        let mut start = rendered.len() - max_bytes;
        while !rendered.is_char_boundary(start) {
            start += 1;
        }
        rendered = format!("[… the earliest part is omitted]\n{}", &rendered[start..]);
    }
    Some(Plan {
        keep_from,
        rendered,
        compacted: keep_from - 1,
        kept: items.len() - keep_from,
    })
}

/// The one message that replaces the compacted turns.
pub fn summary_message(summary: &str) -> String {
    format!(
        "Summary of your earlier steps on this task (compacted to fit the context window):\n{}",
        summary.trim()
    )
}

/// Replaces the planned turns with `summary`.
pub fn apply(items: &mut Vec<Item>, plan: &Plan, summary: &str) {
    let kept = items.split_off(plan.keep_from);
    items.truncate(1);
    items.push(Item::User {
        text: summary_message(summary),
    });
    items.extend(kept);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ToolCall;

    fn turn(n: usize, output_len: usize) -> Vec<Item> {
        vec![
            Item::Assistant {
                content: String::new(),
                calls: vec![ToolCall {
                    id: format!("call_{n}_1"),
                    name: "read_file_content".into(),
                    arguments: "{}".into(),
                }],
                reasoning: vec![],
            },
            Item::ToolResult {
                call_id: format!("call_{n}_1"),
                output: "x".repeat(output_len),
            },
        ]
    }

    #[test]
    fn older_turns_go_and_the_task_and_latest_turns_stay() {
        let budget = Budget::new(8192, None, &[]);
        let mut items = vec![Item::User {
            text: "the task".into(),
        }];
        for n in 1..=20 {
            items.extend(turn(n, 2000));
        }
        let before = budget.estimate("sys", &items, None);
        assert!(before > budget.limit());
        let p = plan(&items, &budget).unwrap();
        assert!(p.kept >= 2 && p.kept.is_multiple_of(2), "{p:?}");
        apply(&mut items, &p, "did things");
        assert_eq!(
            items[0],
            Item::User {
                text: "the task".into()
            }
        );
        assert!(matches!(&items[1], Item::User { text } if text.contains("did things")));
        // The kept part starts at an assistant message whose results follow it.
        assert!(matches!(&items[2], Item::Assistant { .. }));
        let Item::ToolResult { call_id, .. } = items.last().unwrap() else {
            panic!()
        };
        assert_eq!(call_id, "call_20_1");
        assert!(budget.estimate("sys", &items, None) < budget.limit());
    }

    #[test]
    fn nothing_to_compact_when_only_the_latest_turn_is_there() {
        let budget = Budget::new(2048, None, &[]);
        let mut items = vec![Item::User { text: "t".into() }];
        items.extend(turn(1, 50_000));
        assert!(plan(&items, &budget).is_none());
    }

    #[test]
    fn the_compaction_request_is_clipped_to_fit() {
        let budget = Budget::new(4096, None, &[]);
        let mut items = vec![Item::User { text: "t".into() }];
        for n in 1..=200 {
            items.extend(turn(n, 1400));
        }
        let p = plan(&items, &budget).unwrap();
        assert!(p.rendered.len() <= (budget.limit() * 3) as usize + 64);
        assert!(p.rendered.starts_with("[… the earliest part is omitted]"));
    }
}
