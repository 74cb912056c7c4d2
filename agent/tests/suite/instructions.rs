//! The repository's AGENTS.md reach the model's instructions: the scripted model refuses a
//! request whose system message lacks them, and the transcript says which files were read.
//! One that is not on the way to the target file, or that links out of the workspace, is not.

use patchflow_scripted_model::Script;
use serde_json::Value;

use super::support::{Setup, fixture, run_script};

#[tokio::test]
async fn agents_md_on_the_way_to_the_target_file_joins_the_instructions() {
    let fx = fixture(Setup::default());
    let ws = fx.ws().to_path_buf();
    std::fs::create_dir_all(ws.join("pkg/sub")).unwrap();
    std::fs::create_dir_all(ws.join("elsewhere")).unwrap();
    std::fs::write(ws.join("AGENTS.md"), "Run `make check` first. ROOT-RULE\n").unwrap();
    std::fs::write(ws.join("pkg/AGENTS.md"), "Keep the API stable. PKG-RULE\n").unwrap();
    std::fs::write(ws.join("elsewhere/AGENTS.md"), "ELSEWHERE-RULE").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("AGENTS.md"), "OUTSIDE-RULE").unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("AGENTS.md"),
        ws.join("pkg/sub/AGENTS.md"),
    )
    .unwrap();
    let mut script = Script::calls_then_finish(Vec::new());
    script.expect_in_instructions = vec!["ROOT-RULE".into(), "PKG-RULE".into()];
    let (summary, transcript) = run_script(fx, script, Some("pkg/sub/mod.py")).await;
    assert_eq!(summary.outcome, patchflow_core::AgentOutcome::Finished);
    let lines: Vec<Value> = transcript
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let read = lines
        .iter()
        .find(|v| v["type"] == "instructions")
        .expect("the transcript says which AGENTS.md were read");
    assert_eq!(
        read["files"],
        serde_json::json!(["AGENTS.md", "pkg/AGENTS.md"])
    );
    assert!(!transcript.contains("ELSEWHERE-RULE") && !transcript.contains("OUTSIDE-RULE"));
}
