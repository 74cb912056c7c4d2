//! `patchflow replay TASK_ID [--attempt N]`: runs the agent again on the code a finished
//! task started from, with the same sandboxed tools, answering every model request from
//! the task's recorded transcript, and reports whether each tool result and the final
//! diff came out the same. It needs the gateway (for the record, the transcript, the diff
//! and the staged code, all scoped to the caller's tenant) but no model endpoint.
//!
//! Exit status: 0 when the replay is identical, 1 when something differs (the report
//! says which step), 2 when the replay cannot be set up (no such attempt, no transcript).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use patchflow_agent::cli::ReplayPaths;
use patchflow_agent::model::replay::{ReplayReport, StepDifference};
use patchflow_api::TaskView;
use patchflow_core::{Config, Limits, TaskSource, TaskSpec};
use serde_json::Value;

use crate::client::{ServerOpt, http, send};

#[derive(Debug, Args)]
pub struct ReplayArgs {
    pub task_id: String,
    /// Which attempt to replay (default: the latest).
    #[arg(long)]
    pub attempt: Option<u32>,
    /// The report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep the replay's workspace and result files in this directory (default: a
    /// temporary directory, removed afterwards).
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub server: ServerOpt,
}

pub async fn run(config: &Config, a: ReplayArgs) -> anyhow::Result<ExitCode> {
    match replay(config, a).await {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("patchflow: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

async fn replay(config: &Config, a: ReplayArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    let id = &a.task_id;
    let view: TaskView = send(client.get(format!("{base}/api/tasks/{id}")), &base)
        .await?
        .json()
        .await
        .context("the gateway's task record is not what this client reads")?;
    let attempt = a.attempt.unwrap_or(view.attempt);
    if !view.attempts.iter().any(|t| t.attempt == attempt) {
        anyhow::bail!(
            "task {id} has no attempt {attempt} (it has {})",
            view.attempts.len()
        );
    }
    let fetch = |what: &'static str| {
        let (client, base) = (&client, &base);
        async move {
            let url = format!("{base}/api/tasks/{id}/{what}");
            let req = match a.attempt {
                Some(n) => client.get(url).query(&[("attempt", n)]),
                None => client.get(url),
            };
            send(req, base)
                .await
                .with_context(|| format!("cannot fetch the {what} of task {id}"))
        }
    };
    let recorded = fetch("transcript").await?.text().await?;
    let recorded_diff = fetch("diff").await?.text().await?;
    let source = send(client.get(format!("{base}/api/tasks/{id}/source")), &base)
        .await
        .with_context(|| format!("cannot fetch the staged code of task {id}"))?
        .bytes()
        .await?;

    let tmp;
    let dir = match &a.keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let paths = ReplayPaths {
        workspace: dir.join("workspace"),
        baseline: dir.join("code.tar.zst"),
        out: dir.join("out"),
        scratch: dir.join("tmp"),
    };
    for d in [&paths.workspace, &paths.out, &paths.scratch] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&paths.baseline, &source)?;
    patchflow_platform::archive::unpack_tar_zst(&paths.baseline, &paths.workspace)
        .with_context(|| format!("the staged code of task {id} is not a tar.zst archive"))?;
    // The HOME paths a setup kept, where the agent's commands found them.
    let home = client
        .get(format!("{base}/api/tasks/{id}/source"))
        .query(&[("part", "home")])
        .send()
        .await
        .with_context(|| format!("cannot reach the patchflow gateway at {base}"))?;
    if home.status() != reqwest::StatusCode::NOT_FOUND {
        let bytes = crate::client::check(home)
            .await
            .with_context(|| format!("cannot fetch the prepared HOME of task {id}"))?
            .bytes()
            .await?;
        let archive = dir.join("home.tar.zst");
        std::fs::write(&archive, &bytes)?;
        patchflow_platform::archive::unpack_tar_zst(&archive, &paths.scratch)
            .with_context(|| format!("the prepared HOME of task {id} is not a tar.zst archive"))?;
    }

    let spec = spec_of(&view, &recorded);
    let report = patchflow_agent::cli::replay(config, spec, &paths, &recorded, &recorded_diff)
        .await
        .with_context(|| format!("cannot replay task {id}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let kept = a.keep.as_ref().map(|_| paths.out.as_path());
        print!("{}", describe(id, attempt, &report, kept));
    }
    Ok(if report.identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The spec the recorded run had: the record's task and policy, the transcript's limits
/// (the attempt's own; the record's if the transcript does not say).
fn spec_of(view: &TaskView, recorded: &str) -> TaskSpec {
    let start = recorded
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["type"] == "start");
    let limits = start
        .as_ref()
        .and_then(|s| serde_json::from_value::<Limits>(s["limits"].clone()).ok())
        .unwrap_or(view.limits);
    let model = start
        .as_ref()
        .and_then(|s| s["model"].as_str().map(str::to_string))
        .or_else(|| view.model.clone());
    let mut spec = TaskSpec::new(
        TaskSource::Archive {
            key: "replay".into(),
        },
        view.task_description.clone(),
    );
    spec.target_file = view.target_file.clone();
    spec.model = model;
    spec.limits = limits;
    spec.policy = view.policy.clone();
    spec.tenant = view.tenant.clone();
    spec
}

/// At most this many characters of an output in the text report.
const SHOWN: usize = 400;

fn shown(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match text.char_indices().nth(SHOWN) {
        Some((i, _)) => format!("{}… ({} characters)", &text[..i], text.chars().count()),
        None => text,
    }
}

fn step_report(d: &StepDifference) -> String {
    let ok = |o: Option<bool>| match o {
        Some(true) => "ok",
        Some(false) => "failed",
        None => "absent",
    };
    format!(
        "  step {} (tool result {}): {} {}\n    recorded ({}): {}\n    replayed ({}): {}\n",
        d.step,
        d.index,
        d.tool,
        d.arguments,
        ok(d.recorded_ok),
        shown(&d.recorded_output),
        ok(d.replayed_ok),
        shown(&d.replayed_output),
    )
}

fn describe(id: &str, attempt: u32, r: &ReplayReport, kept: Option<&Path>) -> String {
    if r.identical {
        return format!(
            "replay of task {id} attempt {attempt}: identical ({} tool results, the same diff, outcome {})\n",
            r.tool_results, r.replayed_outcome
        );
    }
    let mut s = format!(
        "replay of task {id} attempt {attempt}: DIFFERS ({} of {} tool results differ; the diff is {})\n",
        r.differences.len(),
        r.tool_results,
        if r.diff_identical {
            "the same"
        } else {
            "different"
        }
    );
    for d in &r.differences {
        s.push_str(&step_report(d));
    }
    if r.recorded_outcome != r.replayed_outcome {
        s.push_str(&format!(
            "  outcome: recorded {}, replayed {}\n",
            r.recorded_outcome, r.replayed_outcome
        ));
    }
    if !r.diff_identical {
        s.push_str(&match kept {
            Some(out) => format!(
                "  the replayed diff is {}\n",
                out.join(patchflow_core::layout::DIFF).display()
            ),
            None => "  (--keep DIR keeps the replayed diff and transcript)\n".to_string(),
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_output_is_cut_on_a_character_boundary() {
        let long = Value::String("é".repeat(SHOWN + 10));
        let s = shown(&long);
        assert!(s.starts_with(&"é".repeat(SHOWN)));
        assert!(s.ends_with(&format!("({} characters)", SHOWN + 10)), "{s}");
        assert_eq!(shown(&Value::String("short".into())), "short");
    }
}
