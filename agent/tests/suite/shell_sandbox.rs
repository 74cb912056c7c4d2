//! `run_shell_command` in the OS sandbox: writes outside the workspace fail, the network
//! is off unless the policy allows it, a fork bomb and a sleeper end at their limits, and
//! the workspace is intact afterwards.

use patchflow_agent::ToolDispatch;
use serde_json::{Value, json};

use super::support::{Setup, TestServer, fixture, sandbox};

async fn sh(fx: &super::support::Fixture, cmd: &str, timeout: u64) -> Value {
    let args = json!({"command_string": cmd, "timeout_seconds": timeout}).to_string();
    fx.tools.call("run_shell_command", &args).await.value
}

#[tokio::test]
async fn every_layer_is_in_force_on_this_kernel() {
    let scratch = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let report = sandbox(scratch.path(), false, 64)
        .probe(ws.path())
        .await
        .unwrap();
    assert!(report.missing.is_empty(), "{:?}", report.missing);
    assert!(report.landlock && report.network_confined && report.pids_cgroup);
    assert!(report.no_new_privs && report.rlimits && report.seccomp);
}

/// Runs `cmd` through `sandbox-exec` without the network namespace, so only seccomp
/// and Landlock's TCP rules stand between it and the network.
#[allow(clippy::unwrap_used)]
fn without_netns(cmd: &str) -> std::process::Output {
    let (scratch, ws) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sb = sandbox(scratch.path(), false, 64);
    let name = format!("skip-netns-{}-{}", std::process::id(), cmd.len());
    let out = std::process::Command::new(&sb.program)
        .args(sb.exec_args(ws.path(), &name, 10, false))
        .args(["--skip-netns", "--", "/bin/bash", "-c", cmd])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .output()
        .unwrap();
    patchflow_agent::sandbox::remove_cgroup(&name);
    out
}

#[tokio::test]
async fn seccomp_refuses_ip_sockets_even_without_a_network_namespace() {
    // UDP: Landlock has no rule for it, so only the seccomp filter can refuse this.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let port = udp.local_addr().unwrap().port();
    let out = without_netns(&format!("echo leak > /dev/udp/127.0.0.1/{port}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut buf = [0u8; 16];
    assert!(udp.recv(&mut buf).is_err(), "a datagram left the sandbox");

    // TCP and IPv6 fail at socket(), before any connect; a Unix socket pair still works.
    let server = TestServer::start().await;
    let port = server.addr.port();
    let script = "import socket\n\
         for fam in (socket.AF_INET, socket.AF_INET6):\n\
         \ttry:\n\
         \t\tsocket.socket(fam, socket.SOCK_STREAM)\n\
         \t\tprint('open', fam)\n\
         \texcept PermissionError:\n\
         \t\tprint('refused', int(fam))\n\
         a, b = socket.socketpair()\n\
         a.send(b'unix ok')\n\
         print(b.recv(16).decode())\n";
    let dir = tempfile::tempdir().unwrap();
    let py = dir.path().join("sockets.py");
    std::fs::write(&py, script).unwrap();
    let out = without_netns(&format!(
        "python3 {}; exec 3<>/dev/tcp/127.0.0.1/{port}",
        py.display()
    ));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(stdout, "refused 2\nrefused 10\nunix ok\n", "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn shell_writes_only_inside_the_workspace_and_temp_dir() {
    let fx = fixture(Setup::default());
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("escaped");
    let out = sh(&fx, &format!("touch {}", target.display()), 10).await;
    assert_ne!(out["exit_code"], 0, "{out}");
    assert!(
        out["stderr"]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{out}"
    );
    assert!(!target.exists());
    let out = sh(
        &fx,
        "touch inside.txt && echo hi > \"$TMPDIR/t\" && cat \"$TMPDIR/t\"",
        10,
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{out}");
    assert_eq!(out["stdout"], "hi\n");
    assert!(fx.ws().join("inside.txt").exists());
    assert!(fx.scratch.path().join("t").exists());
}

#[tokio::test]
async fn shell_reports_exit_and_sees_only_the_minimal_environment() {
    let fx = fixture(Setup::default());
    let out = sh(&fx, "echo hi; echo oops >&2; exit 3", 10).await;
    assert_eq!(out["exit_code"], 3);
    assert_eq!(out["stdout"], "hi\n");
    assert_eq!(out["stderr"], "oops\n");
    let out = sh(&fx, "env", 10).await;
    assert!(std::env::vars().any(|(k, _)| k.starts_with("CARGO")));
    let allowed = [
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "TERM",
        "PAGER",
        "GIT_PAGER",
        "PYTHONDONTWRITEBYTECODE",
        "CI",
        "PWD",
        "SHLVL",
        "_",
        "OLDPWD",
    ];
    for line in out["stdout"].as_str().unwrap().lines() {
        let key = line.split('=').next().unwrap_or_default();
        assert!(
            allowed.contains(&key),
            "`{key}` leaked into the shell environment"
        );
    }
}

const CONNECT: &str =
    "exec 3<>/dev/tcp/127.0.0.1/PORT && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && head -c 12 <&3";

#[tokio::test]
async fn shell_network_is_off_unless_the_policy_allows_it() {
    let server = TestServer::start().await;
    let cmd = CONNECT.replace("PORT", &server.addr.port().to_string());
    let off = fixture(Setup::default());
    let out = sh(&off, &cmd, 10).await;
    assert_ne!(out["exit_code"], 0, "{out}");
    assert!(
        out["stderr"]
            .as_str()
            .unwrap()
            // The seccomp filter refuses the socket before the empty namespace is reached.
            .contains("socket: Permission denied"),
        "{out}"
    );
    assert_eq!(server.connections(), 0);
    let on = fixture(Setup {
        network: true,
        ..Setup::default()
    });
    let out = sh(&on, &cmd, 10).await;
    assert_eq!(out["exit_code"], 0, "{out}");
    assert_eq!(out["stdout"], "HTTP/1.1 200");
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn fork_bomb_and_sleeper_end_at_their_limits_and_the_workspace_survives() {
    let fx = fixture(Setup {
        max_processes: 32,
        ..Setup::default()
    });
    let before = std::fs::read_to_string(fx.ws().join("a.py")).unwrap();
    let out = sh(&fx, "bomb() { bomb | bomb; }; bomb", 3).await;
    let stderr = out["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("Resource temporarily unavailable"),
        "the process limit did not bind: {out}"
    );
    let out = sh(&fx, "sleep 1000", 1).await;
    assert_eq!(out["timed_out"], true, "{out}");
    assert_eq!(out["error"], "command timed out after 1 s and was killed");
    // The next command works, and neither left a cgroup (with processes) behind.
    let out = sh(&fx, "echo still-here", 10).await;
    assert_eq!(out["stdout"], "still-here\n", "{out}");
    assert_eq!(
        std::fs::read_to_string(fx.ws().join("a.py")).unwrap(),
        before
    );
    let leftovers: Vec<_> = std::fs::read_dir("/sys/fs/cgroup/pids/patchflow")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("cmd-{}-", std::process::id()))
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "cgroups left behind: {leftovers:?}");
}
