//! The WebAssembly file and search tools: the refusals (each through the guest, whose only
//! directory is the workspace) and the shapes the model sees.

use std::sync::Arc;

use patchflow_agent::ToolDispatch;
use patchflow_agent::wasm::CallLimits;
use patchflow_agent::wasm::egress::Egress;
use serde_json::json;

use super::support::{Setup, err, fixture};

#[tokio::test]
async fn wasm_read_refuses_every_way_out() {
    let fx = fixture(Setup::default());
    std::os::unix::fs::symlink("/etc", fx.ws().join("etc-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", fx.ws().join("pw")).unwrap();
    std::os::unix::fs::symlink("../", fx.ws().join("up")).unwrap();
    let read = |p: &str| {
        let tools = &fx.tools;
        let args = json!({ "file_path": p }).to_string();
        async move { tools.call("read_file_content", &args).await }
    };
    let out = read("/etc/passwd").await;
    assert!(!out.ok);
    assert_eq!(
        err(&out.value),
        "`/etc/passwd` is an absolute path; use a path relative to the repository root"
    );
    let out = read("../../etc/passwd").await;
    assert_eq!(
        err(&out.value),
        "`../../etc/passwd` contains `..`; paths must stay inside the repository"
    );
    // These pass every lexical check: the capability layer is what refuses them.
    for p in ["etc-link/passwd", "pw", "up/etc/passwd"] {
        let out = read(p).await;
        assert!(!out.ok, "{p} was read: {}", out.value);
        assert_eq!(
            err(&out.value),
            format!("`{p}` leads outside the repository through a symlink")
        );
        assert!(!out.value.to_string().contains("root:"), "{}", out.value);
    }
    let out = read("missing.py").await;
    assert_eq!(err(&out.value), "`missing.py` does not exist");
}

#[tokio::test]
async fn wasm_read_keeps_the_native_shape_and_markers() {
    let fx = fixture(Setup::default());
    let out = fx
        .tools
        .call(
            "read_file_content",
            r#"{"file_path":"a.py","start_line":2}"#,
        )
        .await;
    assert!(out.ok, "{}", out.value);
    assert_eq!(
        out.value,
        json!({"file_path": "a.py", "start_line": 2, "end_line": 2, "total_lines": 2, "content": "y = 1\n", "truncated": false})
    );
    let long: String = (1..=1000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(fx.ws().join("long.txt"), long).unwrap();
    let out = fx
        .tools
        .call("read_file_content", r#"{"file_path":"long.txt"}"#)
        .await;
    assert_eq!(out.value["truncated"], true);
    assert_eq!(out.value["end_line"], 256);
    assert!(
        out.value["content"]
            .as_str()
            .unwrap()
            .ends_with("[... lines 257-1000 not shown; read them with start_line=257 ...]\n")
    );
    std::fs::create_dir(fx.ws().join("pkg")).unwrap();
    std::fs::write(fx.ws().join("pkg/m.py"), "").unwrap();
    let out = fx
        .tools
        .call("read_file_content", r#"{"file_path":"pkg"}"#)
        .await;
    assert_eq!(
        err(&out.value),
        "`pkg` is a directory; it holds: m.py. Read one of its files"
    );
    let out = fx
        .tools
        .call("read_file_content", r#"{"path":"a.py"}"#)
        .await;
    assert!(err(&out.value).contains("invalid arguments for read_file_content"));
}

#[tokio::test]
async fn wasm_edit_refuses_missing_ambiguous_and_escaping_edits() {
    let fx = fixture(Setup::default());
    let edit = |p: &str, old: &str, new: &str| {
        let args = json!({"file_path": p, "old_text": old, "new_text": new}).to_string();
        let tools = &fx.tools;
        async move { tools.call("edit_file_content", &args).await }
    };
    let out = edit("a.py", "= 1", "= 2").await;
    assert_eq!(
        err(&out.value),
        "old_text matches 2 places in `a.py`; include more surrounding lines so it matches exactly once"
    );
    let out = edit("a.py", "z", "w").await;
    assert!(err(&out.value).contains("old_text was not found in `a.py`"));
    assert_eq!(
        std::fs::read_to_string(fx.ws().join("a.py")).unwrap(),
        "x = 1\ny = 1\n"
    );
    let out = edit("a.py", "y = 1", "y = 2").await;
    assert_eq!(
        out.value,
        json!({"file_path": "a.py", "created": false, "replaced": 1, "at_line": 2})
    );
    assert_eq!(
        std::fs::read_to_string(fx.ws().join("a.py")).unwrap(),
        "x = 1\ny = 2\n"
    );
    let out = edit("new/b.py", "", "b\n").await;
    assert_eq!(
        out.value,
        json!({"file_path": "new/b.py", "created": true, "replaced": 0, "lines": 1})
    );
    assert_eq!(
        std::fs::read_to_string(fx.ws().join("new/b.py")).unwrap(),
        "b\n"
    );
    let out = edit("a.py", "", "again").await;
    assert_eq!(
        err(&out.value),
        "`a.py` already exists; give old_text to change it"
    );
    // Creating through a symlinked directory that points outside is refused, and nothing
    // appears outside.
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), fx.ws().join("out-link")).unwrap();
    let out = edit("out-link/planted.txt", "", "x").await;
    assert_eq!(
        err(&out.value),
        "`out-link/planted.txt` leads outside the repository through a symlink"
    );
    assert!(!outside.path().join("planted.txt").exists());
    let out = edit("/tmp/planted.txt", "", "x").await;
    assert!(err(&out.value).contains("is an absolute path"));
}

#[tokio::test]
async fn wasm_edit_applies_a_unified_diff_all_or_nothing() {
    let fx = fixture(Setup::default());
    std::fs::write(fx.ws().join("c.py"), "a\nb\nc\nd\n").unwrap();
    let diff = "--- a/c.py\n+++ b/c.py\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n@@ -4 +4 @@\n-d\n+D\n";
    let args = json!({"file_path": "c.py", "old_text": "", "new_text": diff}).to_string();
    let out = fx.tools.call("edit_file_content", &args).await;
    assert!(out.ok, "{}", out.value);
    assert_eq!(out.value["replaced"], 2);
    assert_eq!(
        std::fs::read_to_string(fx.ws().join("c.py")).unwrap(),
        "a\nB\nc\nD\n"
    );
    // A hunk that does not match leaves the file as it was.
    let bad = "--- a/c.py\n+++ b/c.py\n@@ -1,2 +1,2 @@\n a\n-B\n+X\n@@ -3 +3 @@\n-nope\n+Y\n";
    let args = json!({"file_path": "c.py", "old_text": "", "new_text": bad}).to_string();
    let out = fx.tools.call("edit_file_content", &args).await;
    assert_eq!(
        err(&out.value),
        "hunk 2 of `c.py` does not match the file; read the file and make the diff again"
    );
    assert_eq!(
        std::fs::read_to_string(fx.ws().join("c.py")).unwrap(),
        "a\nB\nc\nD\n"
    );
    let other = "--- a/a.py\n+++ b/a.py\n@@ -1 +1 @@\n-x = 1\n+x = 9\n";
    let args = json!({"file_path": "c.py", "old_text": "", "new_text": other}).to_string();
    let out = fx.tools.call("edit_file_content", &args).await;
    assert!(err(&out.value).contains("changes other files than `c.py`"));
    assert_eq!(
        std::fs::read_to_string(fx.ws().join("a.py")).unwrap(),
        "x = 1\ny = 1\n"
    );
}

#[tokio::test]
async fn wasm_search_is_bounded_and_globbed() {
    let fx = fixture(Setup::default());
    std::fs::create_dir(fx.ws().join("src")).unwrap();
    for i in 0..20 {
        std::fs::write(
            fx.ws().join(format!("src/m{i:02}.rs")),
            format!("fn f{i}() {{}}\n// TODO {i}\n"),
        )
        .unwrap();
    }
    std::fs::write(fx.ws().join("notes.md"), "TODO: docs\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", fx.ws().join("src/pw.rs")).unwrap();
    let out = fx
        .tools
        .call(
            "search_code",
            r#"{"pattern":"TODO \\d+","path_glob":"src/**/*.rs","max_results":5}"#,
        )
        .await;
    assert!(out.ok, "{}", out.value);
    let matches = out.value["matches"].as_array().unwrap();
    assert_eq!(matches.len(), 5);
    assert_eq!(
        matches[0],
        json!({"file_path": "src/m00.rs", "line": 2, "text": "// TODO 0"})
    );
    assert_eq!(out.value["truncated"], true);
    let out = fx.tools.call("search_code", r#"{"pattern":"root:"}"#).await;
    assert_eq!(out.value["matches"], json!([]), "{}", out.value);
    let out = fx.tools.call("search_code", r#"{"pattern":"("}"#).await;
    assert!(err(&out.value).starts_with("invalid regex `(`"));
    let out = fx
        .tools
        .call("web_search_doc_and_reference", r#"{"query":"TODO docs"}"#)
        .await;
    assert_eq!(out.value["provider"], "workspace-docs");
    assert_eq!(out.value["results"][0]["location"], "notes.md:1");
}

#[tokio::test]
async fn search_over_more_than_one_batch_keeps_file_order_and_the_hit_bound() {
    let fx = fixture(Setup::default());
    // Six files of 1.5 MiB: more than one batch of contents goes to the guest.
    let filler = "x\n".repeat(768 * 1024);
    for i in 0..6 {
        std::fs::write(
            fx.ws().join(format!("big_{i}.txt")),
            format!("HIT start {i}\n{filler}HIT end {i}\n"),
        )
        .unwrap();
    }
    let search = |max: usize| {
        let args = json!({"pattern": "^HIT", "max_results": max}).to_string();
        let tools = &fx.tools;
        async move { tools.call("search_code", &args).await.value }
    };
    let all = search(100).await;
    let hits: Vec<String> = all["matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}:{}",
                m["file_path"].as_str().unwrap(),
                m["text"].as_str().unwrap()
            )
        })
        .collect();
    let expected: Vec<String> = (0..6)
        .flat_map(|i| {
            [
                format!("big_{i}.txt:HIT start {i}"),
                format!("big_{i}.txt:HIT end {i}"),
            ]
        })
        .collect();
    assert_eq!(hits, expected);
    assert_eq!(all["matches"][1]["line"], 768 * 1024 + 2);
    assert_eq!(all["truncated"], false);
    assert_eq!(all["files_searched"], 7, "the six and a.py");
    // Exactly the first batch's hits: the next batch is still asked whether there are more.
    let six = search(6).await;
    assert_eq!(six["matches"].as_array().unwrap().len(), 6);
    assert_eq!(six["matches"][5]["text"], "HIT end 2");
    assert_eq!(six["truncated"], true, "{six}");
    let four = search(4).await;
    assert_eq!(four["matches"][3]["text"], "HIT end 1");
    assert_eq!(four["truncated"], true);
}

#[tokio::test]
async fn the_component_is_precompiled_once_and_a_damaged_file_is_compiled_again() {
    use patchflow_agent::wasm::{HostOptions, ToolHost};
    let cache = tempfile::tempdir().unwrap();
    let options = HostOptions {
        limits: CallLimits::default(),
        cache_dir: Some(cache.path().to_path_buf()),
    };
    let component = super::support::probe_component();
    let file = ToolHost::precompile_into(component, &options, cache.path()).unwrap();
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("tools-") && name.ends_with(".cwasm"),
        "{name}"
    );
    let compiled = std::fs::read(&file).unwrap();
    assert!(compiled.starts_with(b"\x7fELF"), "a compiled artifact");
    let ws = tempfile::tempdir().unwrap();
    let list = |host: &ToolHost| {
        host.call(ws.path(), Arc::new(Egress::none()), |g, s| {
            g.call_list_dir(s, ".", 10)
        })
        .map(|l| l.entries.len())
    };
    // A second host loads that file instead of writing another.
    let host = ToolHost::new(component, &options).unwrap();
    assert_eq!(list(&host).unwrap(), 0);
    assert_eq!(std::fs::read(&file).unwrap(), compiled);
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);
    // A damaged file is not loaded: the component is compiled again and the file replaced.
    std::fs::write(&file, b"not a compiled component").unwrap();
    let host = ToolHost::new(component, &options).unwrap();
    assert_eq!(list(&host).unwrap(), 0);
    assert_eq!(std::fs::read(&file).unwrap(), compiled);
}
