//! Two tasks at once on one `patchflow up`, the second trying every escape an attacker
//! would: find the first task's code and the task database, signal the stack, read the
//! model key from another process's environment, read the operator's ~/.netrc and the
//! tool cache, type into a terminal, fork-bomb, fill the disk and /tmp, allocate 10 GiB.
//! Each must be refused, the stack must live on, and the first task must complete with
//! exactly its own change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use patchflow_scripted_model::Script;
use serde_json::{Value, json};

use crate::support::{Mode, Stack, demo_git_repo};

const API_KEY: &str = "sk-isolation-test-key-4f9a";
const VICTIM_TOKEN: &str = "victim-token-81c2e7";
const NETRC_TOKEN: &str = "netrc-password-77d1";

/// The attacks, each one `run_shell_command` of the attacker (whose repository has a file
/// `ATTACKER`); in the victim's repository the same steps only wait, so both run at once.
fn attacks(data_dir: &str, home: &str, tool_cache: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "grep",
            format!(
                "grep -rsl {VICTIM_TOKEN} / --exclude-dir=proc --exclude-dir=usr --exclude-dir=.rustup --exclude-dir=.cargo --exclude-dir=.pyenv; echo data: $(ls -A {data_dir}); echo tasks: $(ls -A {data_dir}/work | wc -l); echo grep-done"
            ),
        ),
        (
            "database",
            format!("cat {data_dir}/*.db {data_dir}/patchflow.db 2>&1 | head -c 300; echo db-done"),
        ),
        (
            "signal",
            "ls /proc | grep -c '^[0-9]'; kill -9 -1; kill -TERM -1; echo signalled".into(),
        ),
        (
            "environ",
            format!(
                "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c {API_KEY}; grep -rs {API_KEY} /proc/*/cmdline /tmp 2>/dev/null; echo environ-done"
            ),
        ),
        (
            "netrc",
            format!("cat {home}/.netrc 2>&1; ls -a {home} 2>&1; echo netrc-done"),
        ),
        (
            "tool-cache",
            format!("ls {tool_cache} 2>&1; echo cache-done"),
        ),
        (
            "tiocsti",
            "python3 -c 'import fcntl,termios,os; fd=os.open(\"/dev/ptmx\", os.O_RDWR); fcntl.ioctl(fd, termios.TIOCSTI, b\"x\"); print(\"typed\")' 2>&1 | tail -1; cat /dev/tty 2>&1 | head -1".into(),
        ),
        (
            "fork-bomb",
            "bomb() { bomb | bomb & }; bomb; sleep 2; echo bomb-done".into(),
        ),
        (
            "fill-disk",
            "dd if=/dev/zero of=big.bin bs=1M count=100000 status=none; echo dd-exit=$?".into(),
        ),
        (
            "fill-disk-files",
            "for i in $(seq 2000); do head -c 1048576 /dev/zero > f$i.bin; done; echo wrote-all"
                .into(),
        ),
        ("clean-up", "rm -f big.bin f*.bin; echo removed".into()),
        (
            "fill-tmp",
            "dd if=/dev/zero of=/tmp/big bs=1M count=100 2>&1".into(),
        ),
        (
            "memory",
            "python3 -c 'b = bytearray(10 * 1024**3); print(\"allocated\")' 2>&1 | tail -1".into(),
        ),
    ]
}

fn script(steps: &[(&'static str, String)]) -> Script {
    let mut calls: Vec<(&str, Value)> = steps
        .iter()
        .map(|(_, attack)| {
            (
                "run_shell_command",
                json!({
                    "command_string": format!("if [ -f ATTACKER ]; then {attack}; else sleep 0.3; echo victim-idle; fi"),
                    "timeout_seconds": 20,
                }),
            )
        })
        .collect();
    // Both then make the demo's fix, so the victim's diff is checked to be its own.
    calls.push((
        "edit_file_content",
        json!({"file_path": "calc.py", "old_text": "return a - b", "new_text": "return a + b"}),
    ));
    Script::calls_then_finish(calls)
}

/// The attacker's tool results, in order, by attack name.
fn results(transcript: &str, steps: &[(&'static str, String)]) -> Vec<(&'static str, Value)> {
    let outputs: Vec<Value> = transcript
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["type"] == "tool_result" && e["tool"] == "run_shell_command")
        .map(|e| e["output"].clone())
        .collect();
    assert_eq!(outputs.len(), steps.len(), "{transcript}");
    steps.iter().map(|(n, _)| *n).zip(outputs).collect()
}

fn text(v: &Value) -> String {
    format!(
        "{}{}{}",
        v["stdout"].as_str().unwrap_or_default(),
        v["stderr"].as_str().unwrap_or_default(),
        v["error"].as_str().unwrap_or_default()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_task_cannot_reach_another_task_the_stack_or_the_operator() {
    let outer = tempfile::tempdir().unwrap();
    let home = outer.path().join("operator-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        home.join(".netrc"),
        format!("machine example.com login op password {NETRC_TOKEN}\n"),
    )
    .unwrap();
    let tool_cache = outer.path().join("tool-cache");
    // The toolchains the commands need (python3 from pyenv here), named as the operator
    // would: HOME is the fake operator home, where they are not.
    let real_home = std::env::var("HOME").unwrap_or_default();
    let toolchains: Vec<String> = [("PYENV_ROOT", ".pyenv"), ("RUSTUP_HOME", ".rustup")]
        .iter()
        .filter_map(|(var, dir)| {
            let p = std::path::Path::new(&real_home).join(dir);
            p.is_dir().then(|| format!("{var}={}", p.display()))
        })
        .collect();
    let toolchains = if toolchains.is_empty() {
        "none".to_string()
    } else {
        toolchains.join(",")
    };
    // The stack's data dir, named before it starts so the attacks can aim at it.
    let data_dir = outer.path().join("data").display().to_string();
    let steps = attacks(
        &data_dir,
        &home.display().to_string(),
        &tool_cache.display().to_string(),
    );
    let stack = Stack::start(
        Mode::Up,
        script(&steps),
        &[
            ("OPENAI_API_KEY", API_KEY),
            ("HOME", home.to_str().unwrap()),
            ("PATCHFLOW_DATA_DIR", data_dir.as_str()),
            ("PATCHFLOW_TOOL_CACHE_DIR", tool_cache.to_str().unwrap()),
            ("PATCHFLOW_SANDBOX_TOOLCHAINS", toolchains.as_str()),
            ("PATCHFLOW_SANDBOX_MODE", "strict"),
            ("PATCHFLOW_SHELL_MAX_PROCESSES", "64"),
            ("PATCHFLOW_SHELL_MAX_MEMORY_MB", "1024"),
            ("PATCHFLOW_SHELL_MAX_DISK_MB", "64"),
            ("PATCHFLOW_SANDBOX_TMP_MB", "16"),
        ],
    )
    .await;
    let up_pid = stack.up.as_ref().unwrap().pid();

    let victim_repo = demo_git_repo(stack.dir.path());
    std::fs::write(victim_repo.join("SECRET.txt"), VICTIM_TOKEN).unwrap();
    commit_all(&victim_repo);
    let attacker_repo = demo_git_repo(stack.dir.path());
    std::fs::write(attacker_repo.join("ATTACKER"), "").unwrap();
    commit_all(&attacker_repo);
    let submit = |repo: std::path::PathBuf| {
        let stack = &stack;
        async move {
            let (c, v) = stack
                .post_json(
                    "/api/tasks",
                    &json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix add"}),
                )
                .await;
            assert_eq!(c, 202, "{v}");
            v["task_id"].as_str().unwrap().to_string()
        }
    };
    let victim = submit(victim_repo).await;
    let attacker = submit(attacker_repo).await;
    let (v, a) = tokio::join!(stack.wait_terminal(&victim), stack.wait_terminal(&attacker));
    assert_eq!(v["status"], "COMPLETED", "victim: {v}\n{}", stack.logs());
    assert_eq!(a["status"], "COMPLETED", "attacker: {a}\n{}", stack.logs());
    // The stack survived `kill -9 -1`.
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(up_pid), None).is_ok());
    let (c, _) = stack.get_json("/healthz").await;
    assert_eq!(c, 200);

    // The victim's change is exactly its own fix.
    let (c, diff) = stack.get_text(&format!("/api/tasks/{victim}/diff")).await;
    assert_eq!(c, 200);
    assert!(diff.contains("+    return a + b"), "{diff}");
    assert!(
        !diff.contains("ATTACKER") && !diff.contains("big.bin"),
        "{diff}"
    );
    // The summary records the walls.
    let walls = &v["summary"]["sandbox"];
    assert_eq!(walls["walls"], "namespaces", "{v}");
    assert_eq!(walls["pid_namespace"], true, "{v}");

    let (c, transcript) = stack
        .get_text(&format!("/api/tasks/{attacker}/transcript"))
        .await;
    assert_eq!(c, 200);
    for (name, out) in results(&transcript, &steps) {
        let t = text(&out);
        assert!(
            !t.contains(VICTIM_TOKEN),
            "{name} read the victim's code: {t}"
        );
        assert!(!t.contains(API_KEY), "{name} read the model key: {t}");
        assert!(!t.contains(NETRC_TOKEN), "{name} read ~/.netrc: {t}");
        match name {
            "grep" => {
                assert!(t.contains("grep-done"), "{t}");
                // Of the data dir, only the empty path down to its own workspace is there
                // (bubblewrap makes it to mount the workspace): no database, no objects,
                // no other task.
                assert!(t.contains("data: work\n"), "the data dir is visible: {t}");
                assert!(
                    t.contains("tasks: 1\n"),
                    "another task's directory is visible: {t}"
                );
            }
            "database" => assert!(t.contains("No such file or directory"), "{t}"),
            "signal" => {
                let seen: u32 = t.lines().next().unwrap().trim().parse().unwrap();
                assert!(seen <= 5, "the command sees {seen} processes: {t}");
            }
            "environ" => assert!(t.starts_with("0\n"), "{t}"),
            "netrc" => assert!(t.contains("No such file or directory"), "{t}"),
            "tool-cache" => assert!(t.contains("No such file or directory"), "{t}"),
            "tiocsti" => {
                assert!(!t.contains("typed"), "TIOCSTI went through: {t}");
                assert!(t.contains("Operation not permitted"), "{t}");
            }
            "fork-bomb" => assert!(
                t.contains("Resource temporarily unavailable") || out["timed_out"] == true,
                "the fork bomb was not bounded: {out}"
            ),
            // One file stops at the cap (RLIMIT_FSIZE: SIGXFSZ is 25, so 128 + 25)...
            "fill-disk" => assert!(
                t.contains("dd-exit=153"),
                "one file grew past the cap: {out}"
            ),
            // ...and many files are stopped by the watcher.
            "fill-disk-files" => {
                assert!(
                    t.contains("shell_max_disk_mb"),
                    "the disk cap did not stop the writes: {out}"
                );
                assert!(!t.contains("wrote-all"), "{out}");
            }
            "clean-up" => assert_eq!(out["exit_code"], 0, "{out}"),
            "fill-tmp" => assert!(t.contains("No space left on device"), "{out}"),
            "memory" => assert!(t.contains("MemoryError"), "{out}"),
            other => panic!("unchecked attack {other}"),
        }
    }
    // The operator's files are untouched.
    assert!(
        std::fs::read_to_string(home.join(".netrc"))
            .unwrap()
            .contains(NETRC_TOKEN)
    );
}

fn commit_all(repo: &std::path::Path) {
    for args in [
        &["add", "."][..],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@localhost",
            "commit",
            "-qm",
            "more",
        ][..],
    ] {
        let status = std::process::Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    }
}
