//! `patchflow batch`'s formats. A line of a batch file is either a submit body (the fields
//! of `POST /api/tasks`) or a SWE-bench instance (`instance_id`, `repo`, `base_commit`,
//! `problem_statement`); [`parse_line`] turns either into the [`SubmitBody`] the batch
//! sends over HTTP or as a Kafka task message. The idempotency key of a batch's task is
//! `<batch>/<instance>` ([`task_key`], read back by [`instance_of`]). [`Prediction`] is one
//! entry of `batch export --format preds`, [`BatchCounts`] the answer of
//! `batch status --json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::submit::SubmitBody;

/// Why one line of a batch file cannot be a task.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct BadLine(pub String);

/// `owner/name` -> its GitHub clone URL; URLs and paths are kept as they are.
pub fn repo_url(repo: &str) -> String {
    let r = repo.trim();
    let looks_like_slug = !r.contains("://")
        && !r.starts_with('/')
        && !r.starts_with('.')
        && !r.contains('@')
        && r.split('/').count() == 2
        && r.split('/').all(|p| !p.is_empty());
    if looks_like_slug {
        format!("https://github.com/{r}.git")
    } else {
        r.to_string()
    }
}

/// The idempotency key of a batch's task: submitting the same file to the same batch again
/// finds the same tasks.
pub fn task_key(batch_id: &str, instance: &str) -> String {
    format!("{batch_id}/{instance}")
}

/// The instance a task of a batch stands for: its key without the `<batch>/` prefix.
pub fn instance_of<'a>(idempotency_key: &'a str, batch_id: &str) -> &'a str {
    idempotency_key
        .strip_prefix(batch_id)
        .and_then(|rest| rest.strip_prefix('/'))
        .unwrap_or(idempotency_key)
}

/// A required text field of a line: present, a string, not blank.
fn text(obj: &Map<String, Value>, k: &str) -> Result<String, BadLine> {
    match obj.get(k) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(_) => Err(BadLine(format!("`{k}` must be a non-empty string"))),
        None => Err(BadLine(format!("`{k}` is missing"))),
    }
}

/// One line of the file (number `line_no`, from 1) as the body of a task of `batch_id`;
/// `model`, when given, is every task's model.
pub fn parse_line(
    line: &str,
    line_no: usize,
    batch_id: &str,
    model: Option<&str>,
) -> Result<SubmitBody, BadLine> {
    let v: Value = serde_json::from_str(line).map_err(|e| BadLine(format!("not JSON: {e}")))?;
    let Value::Object(mut obj) = v else {
        return Err(BadLine("not a JSON object".into()));
    };
    let (mut body, instance) = if obj.contains_key("instance_id") {
        // A SWE-bench instance: its other fields (hints, tests) are the harness's.
        let instance = text(&obj, "instance_id")?;
        let repo = text(&obj, "repo")?;
        let commit = text(&obj, "base_commit")?;
        let problem = text(&obj, "problem_statement")?;
        let body = SubmitBody {
            git_url: Some(repo_url(&repo)),
            git_ref: Some(commit),
            task_description: Some(problem),
            ..SubmitBody::default()
        };
        (body, instance)
    } else {
        text(&obj, "task_description")?;
        if !obj.contains_key("git_url") {
            return Err(BadLine(
                "`git_url` is missing (or give a SWE-bench `instance_id`)".into(),
            ));
        }
        let instance = match obj.remove("idempotency_key") {
            Some(Value::String(k)) if !k.is_empty() => k,
            _ => line_no.to_string(),
        };
        obj.remove("schema");
        let body: SubmitBody = serde_json::from_value(Value::Object(obj))
            .map_err(|e| BadLine(format!("not a submit body: {e}")))?;
        (body, instance)
    };
    body.batch_id = Some(batch_id.to_string());
    body.idempotency_key = Some(task_key(batch_id, &instance));
    if let Some(m) = model {
        body.model = Some(m.to_string());
    }
    Ok(body)
}

/// One entry of SWE-bench's `preds.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prediction {
    pub instance_id: String,
    pub model_name_or_path: String,
    pub model_patch: String,
}

/// `batch status --json`: how many tasks, how many ended, and how many per status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCounts {
    pub batch_id: String,
    pub total: usize,
    pub ended: usize,
    pub counts: BTreeMap<String, usize>,
}
